"""Model files that know how to rebuild themselves, and that never run code when read.

Two formats, one reader (:func:`open_model_file`):

* a **model folder** (``unimoe export``, the stage finalizer, ``unimoe upcycle``):
  ``model.safetensors`` (the AudioLM state dict, no prefix) + ``config.json`` (plain JSON:
  ``{"format": "unimoe-model", "format_version", "config", "codec", "stage", "tasks",
  "extra"}``). Pickle-free: the file to share.
* a **Lightning ``.ckpt``** (a stage's ``last.ckpt`` for crash resume, older runs' final
  checkpoints, ``save_model_checkpoint``): ``state_dict`` with the AudioLM under the
  ``model.`` prefix and ``checkpoint["unimoe"]`` holding the same metadata as plain data.
  It is read with ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors
  and plain containers: a crafted file that would run code is refused with a
  :class:`CheckpointError` (its payload never runs).

The metadata (model config, the codec spec the tokens came from, the stage that wrote it,
task builder specs, lineage in ``extra``) is plain JSON by construction
(:func:`plain_json` is enforced when it is written), so neither format needs any class to
be allow-listed and adding a field is adding a key. Generation, evaluation and the next
curriculum stage rebuild the model from it alone, never from Lightning's saved
hyper-parameters (which also restore the *class*: the trap in LIGHTNING_NOTES).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from unimoe.atomic import atomic_path, fault_point, folder_write_errors
from unimoe.model.config import AudioLMConfig
from unimoe.moe.config import MoEConfig
from unimoe.model.tasks import TaskIds
from unimoe.registry import ComponentSpec
from unimoe.sharded_checkpoint import is_sharded_checkpoint

METADATA_KEY = "unimoe"
MODEL_PREFIX = "model."
FORMAT_VERSION = 1
FOLDER_FORMAT = "unimoe-model"
FOLDER_CONFIG = "config.json"
FOLDER_WEIGHTS = "model.safetensors"


class CheckpointError(RuntimeError):
    """A model file is missing, unreadable, unsafe, or was not written by unimoe; the message names it."""


def config_to_dict(config: AudioLMConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> AudioLMConfig:
    """Inverse of :func:`config_to_dict`, rebuilding the nested MoEConfig."""
    data = dict(data)
    if data.get("moe") is not None and not isinstance(data["moe"], MoEConfig):
        data["moe"] = MoEConfig(**data["moe"])
    known = {f.name for f in dataclasses.fields(AudioLMConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"checkpoint model config has fields this unimoe does not know: {unknown}")
    return AudioLMConfig(**data)


def plain_json(value: Any, where: str = "metadata") -> Any:
    """``value`` as plain JSON data (dict with str keys, list, str, int, float, bool, None).

    Paths become strings, tuples lists, dataclasses and jsonargparse Namespaces dicts;
    anything else raises, naming the field, so no checkpoint ever needs an unpickler that
    builds custom objects.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_json(dataclasses.asdict(value), where)
    if hasattr(value, "as_dict") and callable(value.as_dict):
        return plain_json(value.as_dict(), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: key {k!r} is not a string; checkpoint metadata must be plain JSON")
            out[k] = plain_json(v, f"{where}.{k}")
        return out
    raise CheckpointError(f"{where} is a {type(value).__name__} ({value!r:.80}); checkpoint metadata must be plain JSON")


@dataclass
class CheckpointMetadata:
    """What a model file says about itself (plain JSON; see the module docstring)."""

    config: AudioLMConfig
    codec: Optional[ComponentSpec] = None
    stage: str = "unknown"
    tasks: dict[str, ComponentSpec] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    task_ids: Optional[list[str]] = None
    """Task names in id order (the model's :class:`~unimoe.model.tasks.TaskIds`); None in
    checkpoints written before ids were stored (:meth:`task_table` falls back to the old order)."""

    def task_table(self) -> TaskIds:
        """The task ids this model was trained with (stored, else the legacy order)."""
        return TaskIds(self.task_ids) if self.task_ids is not None else TaskIds.legacy()

    def to_dict(self) -> dict[str, Any]:
        return plain_json({
            "format_version": FORMAT_VERSION,
            "config": config_to_dict(self.config),
            "codec": self.codec,
            "stage": self.stage,
            "tasks": dict(self.tasks),
            "task_ids": None if self.task_ids is None else list(self.task_ids),
            "extra": dict(self.extra),
        })

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "<checkpoint>") -> "CheckpointMetadata":
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: unimoe metadata must be a mapping, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{source}: unsupported unimoe format_version {version!r} (expected {FORMAT_VERSION})")
        try:
            return cls(
                config=config_from_dict(data["config"]),
                codec=data.get("codec"),
                stage=data.get("stage", "unknown"),
                tasks=dict(data.get("tasks") or {}),
                extra=dict(data.get("extra") or {}),
                task_ids=None if data.get("task_ids") is None else [str(n) for n in data["task_ids"]],
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid unimoe metadata ({type(exc).__name__}: {exc})") from exc


@dataclass
class ModelFile:
    """An opened model file: its metadata and its AudioLM tensors (read lazily from a folder)."""

    path: Path
    metadata: CheckpointMetadata
    tensors: Mapping[str, torch.Tensor]
    """AudioLM state-dict keys (no ``model.`` prefix) -> tensors."""
    checkpoint: Optional[dict[str, Any]] = None
    """The whole Lightning checkpoint (``global_step``, ...) for a ``.ckpt``; None for a folder."""


# ---------------------------------------------------------------------- reading
def open_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> ModelFile:
    """A unimoe model folder (or its ``model.safetensors``) or ``.ckpt`` -> :class:`ModelFile`."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        if (path.parent / FOLDER_CONFIG).is_file():
            return read_model_folder(path.parent)
        raise CheckpointError(
            f"{path} is a bare safetensors file: it does not say which model it holds. unimoe reads a model "
            f"folder ({FOLDER_WEIGHTS} + {FOLDER_CONFIG}, written by 'unimoe export') or a unimoe .ckpt"
        )
    if path.is_dir() and not is_sharded_checkpoint(path):
        return read_model_folder(path)
    checkpoint = read_checkpoint(path, map_location=map_location)  # a file, or a sharded folder assembled
    metadata = read_metadata(checkpoint, path)
    return ModelFile(path=path, metadata=metadata, tensors=model_state_dict(checkpoint), checkpoint=checkpoint)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ``.ckpt`` with ``weights_only=True`` (memory-mapped); errors name the file.

    A file that holds pickled objects other than tensors and plain containers (which could
    run code when unpickled) is refused; nothing in it is executed. A sharded checkpoint
    folder (``MoEParallelStrategy``) is assembled in memory into the same dictionary
    (:mod:`unimoe.sharded_checkpoint`; its ``meta.pt`` is read with ``weights_only=True`` too).
    """
    from unimoe.sharded_checkpoint import ShardedCheckpointError, checkpoint_exists, is_sharded_checkpoint, read_sharded_checkpoint

    path = Path(path).expanduser()
    if not checkpoint_exists(path) and not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_sharded_checkpoint(path):
        try:
            return read_sharded_checkpoint(path)
        except ShardedCheckpointError as exc:
            raise CheckpointError(str(exc)) from exc
    if not path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint file")
    try:
        checkpoint = _torch_load(path, map_location)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects other than tensors and plain data, and "
            f"unpickling them could run code from the file. unimoe only loads weights (torch.load weights_only=True) "
            f"and safetensors model folders ({_unpickling_reason(exc)})"
        ) from exc
    except Exception as exc:  # truncated zip, random bytes, permission...
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint, or truncated ({_first_line(exc)})") from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a unimoe checkpoint (it holds a {type(checkpoint).__name__}, not a mapping)")
    return checkpoint


def _torch_load(path: Path, map_location) -> Any:
    with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses anyway
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(str(path), map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(str(path), map_location=map_location, weights_only=True)


def _unpickling_reason(exc: BaseException) -> str:
    """The line of torch's message that says what was blocked (not its advice to load unsafely)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.lower().startswith(("trying to load unsupported", "unsupported global", "unsupported operand")):
            return line
    return "blocked by the weights-only unpickler"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_metadata(checkpoint: dict[str, Any], path: str | Path = "<checkpoint>") -> CheckpointMetadata:
    if METADATA_KEY not in checkpoint:
        raise CheckpointError(
            f"{path} is not a unimoe checkpoint (no {METADATA_KEY!r} entry); "
            f"it must come from a unimoe training stage, 'unimoe upcycle' or 'unimoe export'"
        )
    return CheckpointMetadata.from_dict(checkpoint[METADATA_KEY], path)


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The AudioLM's own state dict (``model.`` prefix stripped)."""
    state = checkpoint.get("state_dict", {})
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def read_folder_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` parsed; a clear error when it is missing or not JSON."""
    config = folder / FOLDER_CONFIG
    if not config.is_file():
        raise CheckpointError(f"{folder} is not a model folder: it has no {FOLDER_CONFIG}")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{config}: must hold a JSON object, got {type(data).__name__}")
    return data


def read_model_folder(folder: str | Path) -> ModelFile:
    """A unimoe model folder -> :class:`ModelFile` (tensors stay on disk until read)."""
    from unimoe.safetensors_io import SafetensorsTensors

    folder = Path(folder).expanduser()
    data = read_folder_config(folder)
    if data.get("format") != FOLDER_FORMAT:
        hint = ""
        if "model_type" in data:
            hint = (f" It looks like a Hugging Face model (model_type {data['model_type']!r}): start a stage from it "
                    f"with init_from (see docs/training.md, 'Starting from a pretrained LM').")
        raise CheckpointError(f"{folder / FOLDER_CONFIG} is not a unimoe model config (no \"format\": \"{FOLDER_FORMAT}\").{hint}")
    metadata = CheckpointMetadata.from_dict(data, folder / FOLDER_CONFIG)
    weights = folder / FOLDER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {FOLDER_WEIGHTS}")
    return ModelFile(path=folder, metadata=metadata, tensors=SafetensorsTensors.open(weights))


# ---------------------------------------------------------------------- writing
def save_model_checkpoint(path: str | Path, model: torch.nn.Module, metadata: CheckpointMetadata) -> Path:
    """Write a standalone ``.ckpt`` (same layout as a stage's Lightning checkpoint), atomically."""
    from unimoe.finite import check_finite_weights

    path = Path(path)
    check_finite_weights(model.state_dict(), str(path))  # a NaN checkpoint never replaces a good one
    payload = {
        "state_dict": {MODEL_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()},
        METADATA_KEY: metadata.to_dict(),
    }
    with atomic_path(path) as tmp:  # never a half-written checkpoint under the final name
        torch.save(payload, str(tmp))
    return path


def save_model_folder(
    path: str | Path, state: torch.nn.Module | Mapping[str, torch.Tensor], metadata: CheckpointMetadata,
    *, dtype: torch.dtype | None = None, extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Write a model folder (``model.safetensors`` + ``config.json``) atomically.

    ``state`` is an AudioLM or its state dict (or a lazy mapping, e.g. a converter's: tensors
    are read and written one at a time); ``dtype`` casts floating tensors (e.g. bf16 to halve the size). The folder is built under a temporary name and renamed into place; an
    existing *model folder* at ``path`` is replaced, any other existing path is refused.
    """
    from unimoe.safetensors_io import stream_safetensors

    path = Path(path).expanduser()
    if path.exists() and not _is_replaceable(path):
        raise CheckpointError(f"{path} exists and is not a unimoe model folder; refusing to replace it")
    from unimoe.finite import FiniteCheckedTensors, raise_if_nonfinite

    # a lazy mapping stays lazy; each tensor is checked as it is written (a NaN model never replaces a good one)
    tensors = FiniteCheckedTensors(state.state_dict() if isinstance(state, torch.nn.Module) else state)
    config = {"format": FOLDER_FORMAT, **metadata.to_dict()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with folder_write_errors(path, tmp):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            stream_safetensors(tmp / FOLDER_WEIGHTS, tensors, dtype=dtype,
                               metadata={"format": "pt", "unimoe": FOLDER_FORMAT})
            raise_if_nonfinite(tensors.bad, str(path))
            for name, source in (extra_files or {}).items():  # e.g. tokenizer/<file>: shipped inside the folder
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp / name)
            (tmp / FOLDER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            fault_point(path)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not path.exists():
                os.replace(old, path)  # put the previous model back
            raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def _is_replaceable(path: Path) -> bool:
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return read_folder_config(path).get("format") == FOLDER_FORMAT
    except CheckpointError:
        return False


def save_model(path: str | Path, model: torch.nn.Module, metadata: CheckpointMetadata) -> Path:
    """A model folder, or a ``.ckpt`` when ``path`` ends in ``.ckpt`` (the format follows the name)."""
    if Path(path).suffix == ".ckpt":
        return save_model_checkpoint(path, model, metadata)
    return save_model_folder(path, model, metadata)


# ---------------------------------------------------------------------- models
def load_state_into(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str | Path, *, check_only: bool = False,
) -> None:
    """Copy every tensor of ``model.state_dict()`` from ``tensors``, one at a time (no second full copy).

    Key sets and shapes are checked first (from the headers, for a folder), so a foreign or
    mismatched file fails before anything is copied; ``check_only`` stops there (a model
    built on the meta device is enough).
    """
    from unimoe.safetensors_io import tensor_shape
    from unimoe.state_dicts import shape_differences

    own = model.state_dict()
    found = {k: tensor_shape(tensors, k) for k in tensors}  # from the headers of a lazy mapping: nothing is read
    missing, unexpected, mismatched = shape_differences(found, {k: v.shape for k, v in own.items()})
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match its own model config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    bad = [f"{k}: file {found[k]} vs model {tuple(own[k].shape)}" for k in mismatched]
    if bad:
        raise CheckpointError(f"{source} does not match its own model config: shape mismatch {bad[:6]}")
    if check_only:
        return
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(tensors[key])


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the AudioLM of a unimoe model folder or ``.ckpt`` -> ``(model, metadata)`` (eval mode)."""
    from unimoe.model.transformer import AudioLM

    opened = open_model_file(path, map_location=map_location)
    try:
        model = AudioLM(opened.metadata.config)
    except Exception as exc:  # a tokenizer or vision spec that no longer builds here
        raise CheckpointError(f"{opened.path}: cannot build its model ({type(exc).__name__}: {exc})") from exc
    load_state_into(model, opened.tensors, opened.path)
    return model.eval(), opened.metadata
