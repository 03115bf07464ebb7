"""The release's safetensors seen as unimoe AudioLM tensors, each built when it is read.

Key map (``L = language_model.`` as the release's class names it; ``model.`` and
``model.language_model.`` spellings are accepted too; ``i`` = layer)::

    L.embed_tokens.weight                           text_embed.weight
    codec_embed_tokens.{k}.weight   x C, [V, D]     audio_embed.weight [C * V, D] (row k * V + code)
    L.layers.i.input_layernorm.weight               blocks.i.attn_norm.weight
    L.layers.i.self_attn.{q,k,v,o}_proj.*           blocks.i.attn.{q,k,v,o}_proj.*
    L.layers.i.post_attention_layernorm.weight      blocks.i.ffn_norm.weight
    L.layers.i.mlp.gate.weight  [E + N + S, D]      blocks.i.ffn.router.gate.weight (rows: routed, null, shared)
    L.layers.i.mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.{e}.{gate,up,down}_proj.weight
                                                    blocks.i.ffn.experts.0.gate_up_proj [E, 2, F, D], .down_proj [E, D, F]
    L.layers.i.mlp.fixed_real_moe.{s}.{gate,up,down}_proj.weight
                                                    blocks.i.ffn.shared_experts.gate_up_proj [S, 2, Fs, D], .down_proj
    L.norm.weight                                   norm.weight
    lm_head.weight (absent when tied)               text_head.weight
    codec_head.weight [C * V, D]                    audio_head.weight

``visual.*`` (the Qwen2.5-VL vision tower) has no unimoe counterpart and is left out
(:data:`SKIPPED`); every other tensor must have a place, and every place a tensor.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from unimoe.pretrained.hf_weights import _preview, open_hf_weights
from unimoe.pretrained.hub import PretrainedError
from unimoe.safetensors_io import SafetensorsTensors

TEXT_PREFIXES = ("language_model.", "model.language_model.", "model.")
SKIPPED = ("visual.*", "model.visual.*", "*.rotary_emb.inv_freq")
"""Release tensors unimoe does not use: the vision tower, recomputed rotary tables."""
EXPERTS = "mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts"


def _text_prefix(files: SafetensorsTensors) -> str:
    for prefix in TEXT_PREFIXES:
        if f"{prefix}embed_tokens.weight" in files:
            return prefix
    raise PretrainedError(f"{files.source}: no text embedding found (looked for "
                          f"{', '.join(p + 'embed_tokens.weight' for p in TEXT_PREFIXES)}); is this the UniMoE-Audio release?")


def _codec_prefix(files: SafetensorsTensors) -> str:
    for prefix in ("", "model."):
        if f"{prefix}codec_head.weight" in files:
            return prefix
    raise PretrainedError(f"{files.source}: no codec_head.weight found; is this the UniMoE-Audio release?")


def release_key_map(files: SafetensorsTensors, *, num_layers: int, num_codebooks: int, num_routed: int,
                    num_shared: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """unimoe key -> (how, release keys): ``copy`` one, ``concat`` along dim 0, ``stack2`` pairs per expert."""
    t, c = _text_prefix(files), _codec_prefix(files)
    keys: dict[str, tuple[str, tuple[str, ...]]] = {
        "text_embed.weight": ("copy", (t + "embed_tokens.weight",)),
        "audio_embed.weight": ("concat", tuple(f"{c}codec_embed_tokens.{k}.weight" for k in range(num_codebooks))),
        "norm.weight": ("copy", (t + "norm.weight",)),
        "audio_head.weight": ("copy", (c + "codec_head.weight",)),
    }
    if "lm_head.weight" in files:
        keys["text_head.weight"] = ("copy", ("lm_head.weight",))
    for i in range(num_layers):
        ours, theirs = f"blocks.{i}.", f"{t}layers.{i}."
        keys[ours + "attn_norm.weight"] = ("copy", (theirs + "input_layernorm.weight",))
        keys[ours + "ffn_norm.weight"] = ("copy", (theirs + "post_attention_layernorm.weight",))
        for name in ("q", "k", "v", "o"):
            keys[ours + f"attn.{name}_proj.weight"] = ("copy", (theirs + f"self_attn.{name}_proj.weight",))
            if name != "o":
                keys[ours + f"attn.{name}_proj.bias"] = ("copy", (theirs + f"self_attn.{name}_proj.bias",))
        keys[ours + "ffn.router.gate.weight"] = ("copy", (theirs + "mlp.gate.weight",))
        for group, source, n in (("experts.0", f"{EXPERTS}.{{e}}", num_routed),
                                 ("shared_experts", "mlp.fixed_real_moe.{e}", num_shared)):
            experts = [theirs + source.format(e=e) for e in range(n)]
            keys[f"{ours}ffn.{group}.gate_up_proj"] = (
                "stack2", tuple(k for x in experts for k in (f"{x}.gate_proj.weight", f"{x}.up_proj.weight")))
            keys[f"{ours}ffn.{group}.down_proj"] = ("stack", tuple(f"{x}.down_proj.weight" for x in experts))
    return keys


class ReleaseTensors(Mapping):
    """Read-only ``{unimoe key: tensor}`` over the release's safetensors; one output tensor in memory at a time."""

    def __init__(self, folder: Path, *, num_layers: int, num_codebooks: int, num_routed: int, num_shared: int) -> None:
        self.files = open_hf_weights(folder)
        self.source = self.files.source
        self.keys_map = release_key_map(self.files, num_layers=num_layers, num_codebooks=num_codebooks,
                                        num_routed=num_routed, num_shared=num_shared)
        used = {k for _, parts in self.keys_map.values() for k in parts}
        missing = sorted(k for k in used if k not in self.files)
        if missing:
            raise PretrainedError(f"{self.source}: tensors its config.json implies are missing: {_preview(missing)}")
        rest = [k for k in self.files if k not in used]
        self.skipped = sorted(k for k in rest if any(fnmatch.fnmatchcase(k, p) for p in SKIPPED))
        unexpected = sorted(set(rest) - set(self.skipped))
        if unexpected:
            raise PretrainedError(f"{self.source}: tensors with no place in the model its config.json describes "
                                  f"(another layout or config?): {_preview(unexpected)}")

    def shape_of(self, key: str) -> tuple[int, ...]:
        how, parts = self.keys_map[key]
        shapes = [self.files.shape_of(p) for p in parts]
        if any(s != shapes[0] for s in shapes) and how != "concat":
            raise PretrainedError(f"{self.source}: {parts[0]} and the tensors stacked with it for {key} differ in shape: "
                                  f"{sorted(set(shapes))}")
        if how == "copy":
            return shapes[0]
        if how == "concat":
            if any(s[1:] != shapes[0][1:] for s in shapes):
                raise PretrainedError(f"{self.source}: the codec embedding tables differ in width: {shapes}")
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        if how == "stack2":
            return (len(parts) // 2, 2, *shapes[0])
        return (len(parts), *shapes[0])

    def dtype_of(self, key: str) -> torch.dtype:
        return self.files.dtype_of(self.keys_map[key][1][0])

    def __getitem__(self, key: str) -> torch.Tensor:
        how, parts = self.keys_map[key]
        if how == "copy":
            return self.files[parts[0]]
        shape = self.shape_of(key)
        out = torch.empty(shape, dtype=self.dtype_of(key))  # filled part by part: no list of copies
        flat = out.view(-1, *shape[2:]) if how == "stack2" else out
        row = 0
        for i, part in enumerate(parts):
            tensor = self.files[part]
            if how == "concat":
                out[row: row + tensor.shape[0]] = tensor
                row += tensor.shape[0]
            else:
                flat[i] = tensor
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_map)

    def __len__(self) -> int:
        return len(self.keys_map)

    def __contains__(self, key: object) -> bool:
        return key in self.keys_map

