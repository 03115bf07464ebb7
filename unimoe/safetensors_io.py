"""Tensors read one at a time from safetensors files (single or sharded), never unpickled.

safetensors holds a JSON header and raw tensor bytes: reading it cannot run code, and a
file is memory-mapped, so a model is filled tensor by tensor without a second full copy in
memory (a 3B model in bf16 is 6 GB on disk; building the model plus holding its whole
state dict would need twice that). :class:`SafetensorsTensors` is a read-only mapping
``key -> tensor`` over one ``*.safetensors`` file or a sharded checkpoint (the Hugging Face
``model.safetensors.index.json`` whose ``weight_map`` names the shard of every tensor);
each ``[key]`` reads that tensor only. Every failure is a :class:`CheckpointError` naming
the file.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from unimoe.checkpoint import CheckpointError

INDEX_SUFFIX = ".index.json"
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
"""safetensors dtype names -> torch dtypes (the ones model files hold)."""
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def _safe_open(path: Path):
    try:
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is a declared dependency
        raise CheckpointError("reading .safetensors files needs the 'safetensors' package (pip install safetensors)") from exc
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError: truncated, not safetensors, bad header
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file (truncated or another format): {exc}") from exc


class SafetensorsTensors(Mapping):
    """Read-only ``{key: tensor}`` over safetensors file(s); tensors are read on access.

    ``SafetensorsTensors.open(path)``: ``path`` is a ``.safetensors`` file or a
    ``*.safetensors.index.json`` shard index.
    """

    def __init__(self, files: dict[str, Path], source: Path) -> None:
        self.source = source
        self._file_of = files  # key -> file holding it
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open(cls, path: str | Path) -> "SafetensorsTensors":
        path = Path(path)
        if path.name.endswith(INDEX_SUFFIX):
            return cls(_read_index(path), path)
        handle = _safe_open(path)
        tensors = cls({key: path for key in handle.keys()}, path)
        tensors._handles[path] = handle
        return tensors

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _safe_open(path)
        return self._handles[path]

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` string map of the (first) file's header."""
        first = next(iter(self._file_of.values()), None)
        return dict(self._handle(first).metadata() or {}) if first is not None else {}

    def shape_of(self, key: str) -> tuple[int, ...]:
        """Shape from the header, without reading the tensor."""
        return tuple(self._slice(key).get_shape())

    def dtype_of(self, key: str) -> torch.dtype:
        """Dtype from the header, without reading the tensor."""
        name = self._slice(key).get_dtype()
        if name not in DTYPES:
            raise CheckpointError(f"{self._file_of[key]}: tensor {key!r} has dtype {name}, which unimoe does not read")
        return DTYPES[name]

    def _slice(self, key: str):
        path = self._file_of[key]
        try:
            return self._handle(path).get_slice(key)
        except Exception as exc:  # a shard index naming a key its shard lacks
            raise CheckpointError(f"{path} has no tensor {key!r} (named by {self.source}): {exc}") from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self._file_of[key]  # KeyError for unknown keys, as a Mapping should
        try:
            return self._handle(path).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from {path}: {exc}") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, key: object) -> bool:
        return key in self._file_of


def _read_index(path: Path) -> dict[str, Path]:
    if not path.is_file():
        raise CheckpointError(f"shard index not found: {path}")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read shard index {path}: not valid JSON: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path} is not a safetensors shard index (no 'weight_map' of tensor -> file)")
    files: dict[str, Path] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"{path}: weight_map[{key!r}] must be a file name in the same folder, got {name!r}")
        files[key] = path.parent / name
    missing = sorted({p.name for p in files.values() if not p.is_file()})
    if missing:
        raise CheckpointError(f"{path} names shard file(s) that do not exist: {missing}")
    return files


def tensor_shape(tensors: Mapping, key: str) -> tuple[int, ...]:
    """Shape of ``tensors[key]``, from the header when the mapping is lazy."""
    shape_of = getattr(tensors, "shape_of", None)
    return shape_of(key) if shape_of is not None else tuple(tensors[key].shape)


def tensor_dtype(tensors: Mapping, key: str) -> torch.dtype:
    """Dtype of ``tensors[key]``, from the header when the mapping is lazy."""
    dtype_of = getattr(tensors, "dtype_of", None)
    return dtype_of(key) if dtype_of is not None else tensors[key].dtype


def stream_safetensors(path: str | Path, tensors: Mapping, *, dtype: torch.dtype | None = None,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (a lazy mapping is fine) to one safetensors file, one tensor in memory at a time.

    The header is laid out from shapes and dtypes first (``shape_of``/``dtype_of`` of a lazy
    mapping: nothing is read), then each tensor is read, cast (``dtype`` applies to floating
    tensors), checked against its header entry and written, so converting a checkpoint never
    holds a second copy of it (``safetensors.torch.save_file`` needs them all at once).
    """
    keys = list(tensors)
    plan: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in keys:
        shape, kind = tensor_shape(tensors, key), tensor_dtype(tensors, key)
        if dtype is not None and kind.is_floating_point:
            kind = dtype
        nbytes = math.prod(shape) * torch.empty((), dtype=kind).element_size()
        header[key] = {"dtype": NAMES[kind], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        plan[key] = (tuple(shape), kind)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in keys:
            shape, kind = plan[key]
            tensor = tensors[key].detach().to("cpu", kind).contiguous()
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, its header says {shape}")
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return Path(path)


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (contiguous CPU copies are made as needed) to ``path`` (not atomic: callers rename)."""
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(plain, str(path), metadata=metadata)
    return Path(path)
