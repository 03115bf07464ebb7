"""The release's ``config.json`` (``UniAudioRVQQwen2_5VLMoEConfig``) -> unimoe :class:`AudioLMConfig`.

Top level: the codec fields (``codec_channels``, ``codec_vocab_size``, ``codec_delay_pattern``,
``codec_{eos,pad,bos}_value``); ``text_config``: the Qwen2.5-VL text stack plus the MoE fields
(``mlp_dynamic_expert_num`` routed, ``mlp_dynamic_null_expert_num`` null, ``mlp_fixed_expert_num``
shared, their intermediate sizes, ``mlp_dynamic_top_p``, ``router_jitter_noise``,
``input_jitter_noise``, ``l_aux_weight`` -> ``min_l_aux_weight`` over ``l_aux_weight_decay_steps``).
Anything the release can do that unimoe would compute differently is refused with the field
named (top-k mode, token dropping, specials in another order, sliding windows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unimoe.model.config import AudioLMConfig
from unimoe.moe.config import MoEConfig
from unimoe.moe.losses import AuxLossSchedule
from unimoe.pretrained.hub import PretrainedError

MODEL_TYPE = "uni_audio_rvq_qwen2_5vl_moe"
ROUTER = "uni_moe_audio_top_p"


def read_release_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise PretrainedError(f"{folder} is not a UniMoE-Audio release folder: it has no config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PretrainedError(f"cannot read {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        found = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise PretrainedError(f"{path}: model_type is {found!r}, not the release's {MODEL_TYPE!r}"
                              f" (for a plain Qwen2/Llama LM use init_from; see docs/pretrained.md)")
    if not isinstance(data.get("text_config"), dict):
        raise PretrainedError(f"{path}: has no 'text_config' object")
    return data


def _field(cfg: dict[str, Any], name: str, where: str, kind: type | tuple[type, ...] = int) -> Any:
    if name not in cfg:
        raise PretrainedError(f"{where}: missing field {name!r}")
    value = cfg[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise PretrainedError(f"{where}: field {name!r} = {value!r} has the wrong type")
    return value


def release_to_config(data: dict[str, Any], source: Path, *, text_vocab_size: int, tokenizer: Any,
                      tie_text_head: bool, max_seq_len: int = 8192) -> AudioLMConfig:
    """The unimoe config of a release ``config.json`` (``data``); ``source`` names it in errors."""
    top, text = str(source), f"{source} text_config"
    t = data["text_config"]
    channels = _field(data, "codec_channels", top)
    vocab = _field(data, "codec_vocab_size", top)
    delays = _field(data, "codec_delay_pattern", top, list)
    k = vocab - 3
    specials = {"codec_eos_value": k, "codec_pad_value": k + 1, "codec_bos_value": k + 2}
    for name, expected in specials.items():
        if _field(data, name, top) != expected:
            raise PretrainedError(f"{top}: {name} = {data[name]} but unimoe's codec specials are eos=K, pad=K+1, "
                                  f"bos=K+2 with K = codec_vocab_size - 3 = {k} (expected {expected})")
    if len(delays) != channels:
        raise PretrainedError(f"{top}: codec_delay_pattern has {len(delays)} entries, codec_channels is {channels}")
    top_p = _field(t, "mlp_dynamic_top_p", text, (int, float))
    if top_p == 0:
        raise PretrainedError(f"{text}: mlp_dynamic_top_p = 0 (fixed top-k routing) is not supported; "
                              f"the released model uses top-p")
    if t.get("token_drop"):
        raise PretrainedError(f"{text}: token_drop = true (capacity dropping) is not supported (unimoe is dropless)")
    if t.get("use_sliding_window"):
        raise PretrainedError(f"{text}: use_sliding_window = true is not supported")
    rope = t.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        raise PretrainedError(f"{text}: rope_scaling {rope} is not supported (the release uses 'default' M-RoPE, which "
                              f"is plain RoPE for text and audio positions)")
    hidden, heads = _field(t, "hidden_size", text), _field(t, "num_attention_heads", text)
    moe = MoEConfig(
        num_routed_experts=_field(t, "mlp_dynamic_expert_num", text),
        routed_intermediate_size=_field(t, "dynamic_intermediate_size", text),
        num_null_experts=_field(t, "mlp_dynamic_null_expert_num", text),
        num_shared_experts=_field(t, "mlp_fixed_expert_num", text),
        shared_intermediate_size=_field(t, "shared_intermediate_size", text),
        router={"name": ROUTER, "top_p": float(top_p),
                "band": float(t.get("router_jitter_noise", 0.0)), "jitter": float(t.get("input_jitter_noise", 0.0))},
        shared_gating="weighted",
        load_balance=AuxLossSchedule(start=float(t.get("l_aux_weight", 0.0)), end=float(t.get("min_l_aux_weight", 0.0)),
                                     steps=int(t.get("l_aux_weight_decay_steps", 1))),
    )
    try:
        return AudioLMConfig(
            hidden_size=hidden, num_layers=_field(t, "num_hidden_layers", text), num_heads=heads,
            num_kv_heads=_field(t, "num_key_value_heads", text), head_dim=hidden // heads,
            intermediate_size=_field(t, "intermediate_size", text), qkv_bias=True,
            norm_eps=float(_field(t, "rms_norm_eps", text, (int, float))),
            rope_theta=float(_field(t, "rope_theta", text, (int, float))), rope_scaling=None,
            max_seq_len=min(max_seq_len, int(t.get("max_position_embeddings", max_seq_len))),
            moe=moe, text_tokenizer=tokenizer, text_vocab_size=text_vocab_size,
            text_head=True, tie_text_head=tie_text_head,
            num_codebooks=channels, codebook_size=k, delays=[int(d) for d in delays],
        )
    except ValueError as exc:
        raise PretrainedError(f"{source}: {exc}") from exc
