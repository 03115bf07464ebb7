"""Sharded (distributed) checkpoints: the folders ``MoEParallelStrategy`` writes, read anywhere.

Lightning's ``ModelParallelStrategy`` (and so unimoe's ``MoEParallelStrategy``) saves a
checkpoint as a folder: ``torch.distributed.checkpoint`` shards (``__<rank>_0.distcp``, one
per rank, plus ``.metadata`` with every tensor's global shape) holding ``state_dict`` and
``optimizer_<i>``, and ``meta.pt`` (rank 0) with everything else: hyper-parameters, loop
and data-loader state, callbacks and ``checkpoint["unimoe"]``.

Because the shards hold global shapes, a folder resumes at any world size and expert-parallel
size (``torch.distributed.checkpoint`` reshards). Outside training it is read here in one
process, with no process group: :func:`read_sharded_checkpoint` assembles the full weights
(never the optimizer state unless asked) into the same dictionary a single-file checkpoint
holds, so ``unimoe.checkpoint.read_checkpoint`` - and with it generation, evaluation,
upcycling and ``init_from`` - reads folders and files alike. :func:`consolidate` writes that
dictionary as one file (``unimoe checkpoint consolidate``).

Saving is atomic (see :func:`swap_in`): the new folder is written beside the old one and
renamed into place, so a kill during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from unimoe.atomic import fault_point
from unimoe.state_dicts import shape_differences

META_FILE = "meta.pt"
"""Lightning's name for the non-tensor part of a sharded checkpoint (``lightning.fabric.utilities.load``)."""
STATE_PREFIX = "state_dict."


class ShardedCheckpointError(RuntimeError):
    """A sharded checkpoint folder is incomplete, unreadable or does not fit (the message names it)."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file()


def checkpoint_exists(path: str | Path) -> bool:
    """A checkpoint file, a model folder (``unimoe export`` / a stage's ``final/``), or a complete
    sharded checkpoint folder (after finishing an interrupted swap)."""
    from unimoe.checkpoint import FOLDER_CONFIG, FOLDER_WEIGHTS

    path = Path(path)
    recover_swap(path)
    is_model_folder = path.is_dir() and (path / FOLDER_CONFIG).is_file() and (path / FOLDER_WEIGHTS).is_file()
    return path.is_file() or is_model_folder or is_sharded_checkpoint(path)


def read_header(path: str | Path) -> dict[str, Any]:
    """Everything but the tensors of a sharded folder (``meta.pt``): hparams, loops, step, ``unimoe``."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ShardedCheckpointError(f"{path} is not a sharded checkpoint folder (no {META_FILE} inside)")
    try:
        return torch.load(str(path / META_FILE), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ShardedCheckpointError(f"cannot read {path / META_FILE}: {exc}") from exc


def tensor_shapes(path: str | Path, prefix: str = STATE_PREFIX) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every saved tensor whose key starts with ``prefix`` (prefix stripped)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:
        raise ShardedCheckpointError(f"cannot read the shard index of {path} (.metadata): {exc}") from exc
    return {
        key[len(prefix):]: (tuple(meta.size), meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }


def read_sharded_checkpoint(path: str | Path, *, optimizer: bool = False) -> dict[str, Any]:
    """The folder as one in-memory checkpoint dict: ``meta.pt`` + full ``state_dict`` (CPU, one process)."""
    from torch.distributed.checkpoint import FileSystemReader, load

    path = Path(path)
    checkpoint = read_header(path)
    shapes = tensor_shapes(path)
    if not shapes:
        raise ShardedCheckpointError(f"{path} holds no model tensors (no '{STATE_PREFIX}*' entries in its shard index)")
    state = {"state_dict": {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}}
    if optimizer:
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        state = {}
        _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    else:
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
        except Exception as exc:
            raise ShardedCheckpointError(f"cannot read the shards of {path}: {exc}") from exc
    checkpoint.update(state)
    return checkpoint


def check_fits(path: str | Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a folder whose tensors are not the model's (other config, other stage) before any collective.

    ``expected``: model key (``model.blocks.0...``, the LightningModule's state-dict keys) -> global shape.
    """
    saved = {k: shape for k, (shape, _) in tensor_shapes(path).items()}
    missing, unexpected, wrong = shape_differences(saved, expected)
    mismatched = sorted(f"{k}: checkpoint {saved[k]} vs model {tuple(expected[k])}" for k in wrong)
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}")
        if missing:
            parts.append(f"{len(missing)} model tensor(s) not in it: {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) the model does not have: {_preview(unexpected)}")
        raise ShardedCheckpointError(
            f"sharded checkpoint {path} was written for another model layout ({'; '.join(parts)}); resume it with the "
            "model config it was trained with (any world size / expert-parallel size works), or start a new stage "
            "from its weights with init_from"
        )


def consolidate(path: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a sharded folder's weights + metadata as one checkpoint file (no optimizer or loop state)."""
    from unimoe.atomic import atomic_path

    out = Path(out)
    if out.exists() and not overwrite:
        raise ShardedCheckpointError(f"{out} exists; choose another --out or pass --overwrite")
    checkpoint = read_sharded_checkpoint(path)
    keep = {k: checkpoint[k] for k in ("state_dict", "unimoe", "hyper_parameters", "epoch", "global_step",
                                        "pytorch-lightning_version") if k in checkpoint}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(keep, str(tmp))
    return out


# ---------------------------------------------------------------------- atomic save
def staging_path(path: Path) -> Path:
    """Where a new version of the folder ``path`` is written before it replaces the old one."""
    return path.with_name(f".{path.name}.partial")


def _previous_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.previous")


def swap_in(staged: Path, path: Path) -> None:
    """Replace ``path`` by the complete folder ``staged`` (two renames; the old one is deleted last).

    A kill between the renames leaves ``.<name>.previous`` and no ``path``: :func:`recover_swap`
    (called by every reader) puts the previous checkpoint back.
    """
    fault_point(path)  # the fault-injection harness's "killed inside this checkpoint's write"
    previous = _previous_path(path)
    if previous.exists():
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
    if path.exists():
        os.replace(path, previous)
    os.replace(staged, path)
    if previous.exists():
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()


def recover_swap(path: Path) -> None:
    """Finish a swap a kill interrupted: ``path`` missing but its previous version complete."""
    previous = _previous_path(Path(path))
    if not Path(path).exists() and (previous.is_file() or is_sharded_checkpoint(previous)):
        os.replace(previous, path)


def _preview(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
