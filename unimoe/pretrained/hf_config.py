"""A Hugging Face causal-LM ``config.json`` -> the backbone fields of an :class:`AudioLMConfig`.

The backbone (width, depth, heads, FFN, norms, RoPE, text vocabulary, LM head, tokenizer) is
read from the pretrained model so a recipe never restates it; the audio parts (codebooks,
delays, vision, MoE, sequence length) come from the recipe. Anything the unimoe backbone
cannot reproduce exactly is refused with the field that says so, rather than loaded into a
model that silently computes something else.

Supported ``model_type``: ``qwen2`` (Qwen2, Qwen2.5; q/k/v biases) and ``llama`` (Llama 2/3,
3.1/3.2 RoPE scaling). Both the old (``rope_theta`` + ``rope_scaling``) and the newer
(``rope_parameters``) ways of writing RoPE settings are read.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

from unimoe.model.config import AudioLMConfig
from unimoe.model.rope import check_rope_scaling
from unimoe.registry import plain_spec, spec_parts
from unimoe.pretrained.hub import PretrainedError

log = logging.getLogger("unimoe.pretrained")

SUPPORTED_MODEL_TYPES = {"qwen2": "Qwen2 / Qwen2.5", "llama": "Llama"}

BACKBONE_FIELDS = (
    "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "qkv_bias",
    "norm_eps", "rope_theta", "rope_scaling", "text_tokenizer", "text_vocab_size", "text_head", "tie_text_head",
)
"""AudioLMConfig fields a pretrained LM decides; every other field comes from the recipe."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_hf_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` parsed (PretrainedError naming the file when missing or not JSON)."""
    from unimoe.checkpoint import CheckpointError, read_folder_config

    try:
        return read_folder_config(folder)
    except CheckpointError as exc:
        raise PretrainedError(str(exc)) from exc


def backbone_from_hf(cfg: dict[str, Any], folder: Path, ref: Optional[str] = None) -> dict[str, Any]:
    """The :data:`BACKBONE_FIELDS` of the model in ``folder`` (its parsed ``config.json`` is ``cfg``;
    ``ref``: the Hub id it was resolved from, if any)."""
    where = folder / "config.json"
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise PretrainedError(f"{where}: model_type {model_type!r} is not supported; supported: {supported}")

    def positive(key: str, default: Any = None) -> int:
        value = cfg.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PretrainedError(f"{where}: {key} must be a positive integer, got {value!r}")
        return value

    def refuse(condition: bool, what: str) -> None:
        if condition:
            raise PretrainedError(f"{where}: {what}, which the unimoe backbone does not implement")

    hidden, heads = positive("hidden_size"), positive("num_attention_heads")
    kv_heads = positive("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden % heads == 0 else None)
    if not isinstance(head_dim, int) or head_dim < 1:
        raise PretrainedError(f"{where}: head_dim must be set when hidden_size is not a multiple of num_attention_heads")
    refuse(cfg.get("hidden_act", "silu") != "silu", f"hidden_act is {cfg.get('hidden_act')!r} (unimoe's FFN is SwiGLU)")
    refuse(cfg.get("mlp_bias", False), "mlp_bias is true")
    refuse(cfg.get("pretraining_tp", 1) not in (1, None), "pretraining_tp is not 1")
    if model_type == "qwen2":
        qkv_bias = True  # Qwen2 attention always has q/k/v biases and no o_proj bias
        refuse(bool(cfg.get("use_sliding_window", False)), "use_sliding_window is true (sliding-window attention)")
        refuse(any(t != "full_attention" for t in cfg.get("layer_types") or []), "layer_types has sliding-window layers")
    else:
        refuse(cfg.get("attention_bias", False), "attention_bias is true (an o_proj bias)")
        qkv_bias = False
    theta, scaling = _rope(cfg, where)
    return {
        "hidden_size": hidden,
        "num_layers": positive("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": None if head_dim * heads == hidden else head_dim,
        "intermediate_size": positive("intermediate_size"),
        "qkv_bias": qkv_bias,
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "text_tokenizer": tokenizer_spec(folder, ref),
        "text_vocab_size": positive("vocab_size"),
        "text_head": True,
        "tie_text_head": bool(cfg.get("tie_word_embeddings", False)),
    }


def _rope(cfg: dict[str, Any], where: Path) -> tuple[float, Optional[dict[str, Any]]]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise PretrainedError(f"{where}: per-layer-type rope_parameters are not supported")
    if isinstance(params, dict) and params:
        theta, scaling = params.get("rope_theta", cfg.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise PretrainedError(f"{where}: rope_theta must be a positive number, got {theta!r}")
    rope = params if isinstance(params, dict) else {}
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if factor not in (1, None):
        raise PretrainedError(f"{where}: partial_rotary_factor {factor} is not supported (unimoe rotates the whole head)")
    try:
        return float(theta), check_rope_scaling(scaling, f"{where}: rope scaling")
    except ValueError as exc:
        raise PretrainedError(str(exc)) from exc


def tokenizer_spec(folder: Path, ref: Optional[str] = None) -> dict[str, Any]:
    """The ``hf`` text tokenizer of ``folder`` (special tokens: its ``tokenizer_config.json``).

    ``ref`` (a Hub id the folder was resolved from) is what the spec records, so it names the
    same tokenizer on any machine with that Hub cache.
    """
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PretrainedError(
            f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}): the pretrained text embeddings only mean "
            "something with the model's own tokenizer; copy its tokenizer files into the folder"
        )
    return {"class_path": "hf", "init_args": {"path": ref or str(folder)}}


def _same_tokenizer(a: Any, b: Any) -> bool:
    """Two ``hf`` specs naming the same folder, however the spec or the path is written (the recipe
    may add special-token choices of its own)."""
    (name_a, args_a), (name_b, args_b) = spec_parts(a), spec_parts(b)
    if name_a != name_b or "path" not in args_a or "path" not in args_b:
        return plain_spec(a) == plain_spec(b)

    def where(args: dict) -> str:
        path = Path(str(args["path"])).expanduser()
        return str(path.resolve()) if path.exists() else str(args["path"])

    return where(args_a) == where(args_b)


def merge_backbone(user: Optional[AudioLMConfig], backbone: dict[str, Any], source: str, *,
                   from_preset: bool = False) -> AudioLMConfig:
    """The recipe's config with its backbone replaced by the pretrained one.

    ``user`` None = the pretrained backbone with unimoe's default audio parts. A backbone value
    the recipe wrote itself (one that differs from the AudioLMConfig default) must agree with
    the pretrained model; a preset (``from_preset``) contributes only its non-backbone fields.
    """
    if user is None:
        return AudioLMConfig(**backbone)
    defaults = AudioLMConfig()
    if not from_preset:
        conflicts = [
            f"{f}: recipe {getattr(user, f)!r} vs pretrained {backbone[f]!r}" for f in BACKBONE_FIELDS
            if getattr(user, f) != getattr(defaults, f) and not _agrees(f, getattr(user, f), backbone[f])
        ]
        if conflicts:
            raise ValueError(
                f"model config disagrees with the pretrained model {source} ({'; '.join(conflicts)}). The backbone comes "
                f"from the pretrained config: leave these fields out of `model` ({', '.join(BACKBONE_FIELDS)})"
            )
    merged = dict(backbone)
    if _agrees("text_tokenizer", user.text_tokenizer, backbone["text_tokenizer"]):
        merged["text_tokenizer"] = user.text_tokenizer  # the recipe's spelling, shared with its data module
    changed = [f for f in BACKBONE_FIELDS if getattr(user, f) != merged[f]]
    if changed:
        log.info("backbone from %s: %s", source, ", ".join(f"{f}={merged[f]!r}" for f in changed))
    return dataclasses.replace(user, **merged)


def _agrees(name: str, ours: Any, theirs: Any) -> bool:
    return _same_tokenizer(ours, theirs) if name == "text_tokenizer" else ours == theirs
