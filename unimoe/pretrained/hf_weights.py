"""A Hugging Face Qwen2 / Llama checkpoint seen as unimoe AudioLM tensors, read one at a time.

Key map (HF ``model.layers.<i>.`` -> unimoe ``blocks.<i>.``):

=====================================================  =======================================
``model.embed_tokens.weight``                          ``text_embed.weight``
``input_layernorm.weight``                             ``attn_norm.weight``
``self_attn.{q,k,v,o}_proj.weight`` (+ q/k/v ``bias``)  ``attn.{q,k,v,o}_proj.weight`` / ``.bias``
``post_attention_layernorm.weight``                    ``ffn_norm.weight``
``mlp.gate_proj.weight``, ``mlp.up_proj.weight``       ``ffn.gate_up_proj`` ``[2, F, D]`` (stacked)
``mlp.down_proj.weight``                               ``ffn.down_proj``
``model.norm.weight``                                  ``norm.weight``
``lm_head.weight`` (untied models)                     ``text_head.weight``
=====================================================  =======================================

Both use the split-halves rotary convention and ``nn.Linear`` orientation, so no tensor is
permuted. The codec embeddings and head and the vision encoder have no pretrained
counterpart: they keep their fresh initialisation (:data:`FRESH`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from unimoe.pretrained.hub import PretrainedError
from unimoe.safetensors_io import INDEX_SUFFIX, SafetensorsTensors

FRESH = ("audio_embed.*", "audio_head.*", "vision.*")
"""unimoe tensors a pretrained text LM cannot provide (``init_from`` strictness ignores them)."""
IGNORED = ("model.layers.*.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq")
"""Tensors some older HF checkpoints carry that the model recomputes."""


def hf_key_map(num_layers: int, qkv_bias: bool, tie: bool) -> dict[str, tuple[str, ...]]:
    """unimoe key -> the HF key(s) it is made of (two keys = stacked along a new dim 0)."""
    keys: dict[str, tuple[str, ...]] = {"text_embed.weight": ("model.embed_tokens.weight",),
                                        "norm.weight": ("model.norm.weight",)}
    if not tie:
        keys["text_head.weight"] = ("lm_head.weight",)
    for i in range(num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        keys[ours + "attn_norm.weight"] = (theirs + "input_layernorm.weight",)
        keys[ours + "ffn_norm.weight"] = (theirs + "post_attention_layernorm.weight",)
        for name in ("q", "k", "v", "o"):
            keys[ours + f"attn.{name}_proj.weight"] = (theirs + f"self_attn.{name}_proj.weight",)
            if qkv_bias and name != "o":
                keys[ours + f"attn.{name}_proj.bias"] = (theirs + f"self_attn.{name}_proj.bias",)
        keys[ours + "ffn.gate_up_proj"] = (theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight")
        keys[ours + "ffn.down_proj"] = (theirs + "mlp.down_proj.weight",)
    return keys


def open_hf_weights(folder: Path) -> SafetensorsTensors:
    """``model.safetensors`` or the sharded ``model.safetensors.index.json`` of ``folder``."""
    single, index = folder / "model.safetensors", folder / f"model.safetensors{INDEX_SUFFIX}"
    if index.is_file():
        return SafetensorsTensors.open(index)
    if single.is_file():
        return SafetensorsTensors.open(single)
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickled:
        raise PretrainedError(
            f"{folder} holds only pickled weights ({', '.join(pickled[:3])}); unimoe reads safetensors only, so loading "
            "never runs code. Convert them once where you trust the file (transformers: "
            "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`)"
        )
    raise PretrainedError(f"{folder} has no model.safetensors (or model.safetensors.index.json)")


class HFCausalLMTensors(Mapping):
    """Read-only ``{unimoe key: tensor}`` over an HF checkpoint; each access reads only its tensor(s)."""

    fresh = FRESH

    def __init__(self, files: SafetensorsTensors, keys: dict[str, tuple[str, ...]], source: Path) -> None:
        self.files, self.keys_map, self.source = files, keys, source
        missing = sorted(k for parts in keys.values() for k in parts if k not in files)
        if missing:
            raise PretrainedError(f"{source}: tensors its config.json implies are missing: {_preview(missing)}")
        used = {k for parts in keys.values() for k in parts}
        tied_head = {"lm_head.weight"} if "text_head.weight" not in keys else set()
        unexpected = sorted(k for k in files if k not in used and k not in tied_head
                            and not any(fnmatch.fnmatchcase(k, p) for p in IGNORED))
        if unexpected:
            raise PretrainedError(
                f"{source}: tensors with no place in a plain causal LM of this config (another architecture?): "
                f"{_preview(unexpected)}"
            )

    def shape_of(self, key: str) -> tuple[int, ...]:
        parts = self.keys_map[key]
        first = self.files.shape_of(parts[0])
        return (len(parts), *first) if len(parts) > 1 else first

    def __getitem__(self, key: str) -> torch.Tensor:
        parts = self.keys_map[key]
        if len(parts) == 1:
            return self.files[parts[0]]
        return torch.stack([self.files[p] for p in parts])  # [2, F, D]: one layer's gate and up, briefly

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_map)

    def __len__(self) -> int:
        return len(self.keys_map)

    def __contains__(self, key: object) -> bool:
        return key in self.keys_map


def _preview(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
