"""Initialise a stage's model from another stage's checkpoint (weights only, step 0).

This is deliberately separate from Lightning's ``ckpt_path``: ``ckpt_path`` resumes the
*same* stage (optimizer, step, loops, and since Lightning 2.5 its saved hyper-parameters
including the module class), while ``init_from`` starts a *new* stage from the previous
stage's weights with a fresh optimizer and schedule. The two are mutually exclusive
(see :mod:`unimoe.training.cli`).

Rules, applied to the checkpoint's AudioLM state-dict keys (``model.`` prefix stripped):

1. ``include`` / ``exclude``: ``fnmatch`` globs choose checkpoint keys (include first);
2. ``remap``: ordered ``{regex: replacement}`` rewrites of the chosen keys (``re.sub``);
3. every kept key must exist in the model with the same shape; with ``strict`` every model
   parameter and persistent buffer must also be covered (errors list the offending keys).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from unimoe.checkpoint import CheckpointError, CheckpointMetadata, open_model_file
from unimoe.safetensors_io import tensor_shape


@dataclass
class InitFrom:
    """Where a stage's initial weights come from, and which ones.

    path:    a unimoe model folder or ``.ckpt`` (a stage's final model, ``unimoe upcycle`` output), or a
             pretrained causal LM: a Hugging Face Qwen2 / Qwen2.5 / Llama folder or Hub id (its
             backbone and tokenizer; codec embeddings, codec head and vision stay fresh)
    include: globs of checkpoint keys to load; default all
    exclude: globs of checkpoint keys to skip
    remap:   ordered ``{regex: replacement}`` renaming the chosen checkpoint keys to model keys
    strict:  every model parameter/buffer must be initialised from the checkpoint
    """

    path: str
    include: List[str] = field(default_factory=lambda: ["*"])
    exclude: List[str] = field(default_factory=list)
    remap: Dict[str, str] = field(default_factory=dict)
    strict: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            raise ValueError(f"init_from.path must be a checkpoint path, got {self.path!r}")
        self.path = str(self.path)
        for pattern in self.remap:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"init_from.remap: {pattern!r} is not a valid regular expression: {exc}") from exc

    @classmethod
    def coerce(cls, value: Union[None, str, Path, Dict[str, Any], "InitFrom"]) -> Optional["InitFrom"]:
        """``None`` / a path / a mapping / an :class:`InitFrom` -> ``InitFrom`` or None."""
        if value is None or isinstance(value, InitFrom):
            return value
        if isinstance(value, (str, Path)):
            return cls(path=str(value))
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"path", "include", "exclude", "remap", "strict"})
            if unknown:
                raise ValueError(f"init_from: unknown field(s) {unknown}; known: path, include, exclude, remap, strict")
            return cls(**value)
        raise ValueError(f"init_from must be a checkpoint path or a mapping, got {type(value).__name__}")


@dataclass
class InitReport:
    """What :func:`load_initial_weights` did (logged by the stage)."""

    path: str
    loaded: List[str]
    skipped: List[str]
    not_initialised: List[str]

    def summary(self) -> str:
        text = f"init_from {self.path}: loaded {len(self.loaded)} tensors"
        if self.skipped:
            text += f", skipped {len(self.skipped)} by include/exclude"
        if self.not_initialised:
            text += f", {len(self.not_initialised)} model tensors keep their fresh init ({_preview(self.not_initialised)})"
        return text


def read_init_checkpoint(spec: InitFrom) -> tuple[CheckpointMetadata, Mapping[str, torch.Tensor]]:
    """The metadata and AudioLM tensors of ``spec.path`` (lazy for folders; CheckpointError names the file).

    A Hugging Face causal-LM folder (or Hub id) gives ``stage: pretrained`` metadata whose
    config holds the pretrained backbone, and its tensors under unimoe keys (:mod:`unimoe.pretrained`).
    """
    from unimoe.pretrained import is_pretrained_ref, open_pretrained

    if is_pretrained_ref(spec.path):
        pretrained = open_pretrained(spec.path)
        return pretrained.metadata(), pretrained.tensors
    opened = open_model_file(spec.path)
    if not opened.tensors:
        raise CheckpointError(f"{spec.path} holds no model weights (no 'model.*' keys in its state_dict)")
    return opened.metadata, opened.tensors


def select_weights(spec: InitFrom, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], list[str]]:
    """Apply ``include``/``exclude`` then ``remap`` -> (kept ``{model key: checkpoint key}``, skipped checkpoint keys).

    Only names are handled here: tensors are read one at a time when they are copied.
    """
    kept: dict[str, str] = {}
    skipped: list[str] = []
    for key in state:
        wanted = any(fnmatch.fnmatchcase(key, p) for p in spec.include) and not any(
            fnmatch.fnmatchcase(key, p) for p in spec.exclude
        )
        if not wanted:
            skipped.append(key)
            continue
        new = key
        for pattern, replacement in spec.remap.items():
            new = re.sub(pattern, replacement, new)
        if new in kept:
            raise ValueError(f"init_from.remap maps two checkpoint keys onto {new!r} ({spec.path}); "
                             "narrow init_from.include")
        kept[new] = key
    return kept, skipped


def load_initial_weights(model: nn.Module, spec: InitFrom, state: Mapping[str, torch.Tensor] | None = None) -> InitReport:
    """Copy the selected checkpoint tensors into ``model`` (in place, no grad)."""
    if state is None:
        _, state = read_init_checkpoint(spec)
    kept, skipped = select_weights(spec, state)
    own = model.state_dict()
    unexpected = sorted(k for k in kept if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tensor_shape(state, kept[k])} vs model {tuple(own[k].shape)}"
        for k in kept
        if k in own and tensor_shape(state, kept[k]) != tuple(own[k].shape)
    )
    missing = sorted(k for k in own if k not in kept)
    fresh = getattr(state, "fresh", ())  # parts a pretrained text LM cannot have (codec embeddings, head, vision)
    required = [k for k in missing if not any(fnmatch.fnmatchcase(k, p) for p in fresh)]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint key(s) the model does not have: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}")
    if spec.strict and required:
        problems.append(
            f"{len(required)} model key(s) not in the checkpoint (set init_from.strict: false or adjust "
            f"include/exclude/remap): {_preview(required)}"
        )
    if problems:
        raise ValueError(f"init_from {spec.path} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, source_key in kept.items():  # one tensor in memory at a time
            own[key].copy_(state[source_key])
    return InitReport(path=spec.path, loaded=sorted(kept), skipped=skipped, not_initialised=missing)


def _preview(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
