"""The shard index as memory-mapped columns, shared by every process of a node.

Datasets, samplers and mixes need every example's sizes, task, split and text before any
shard is read. Held as Python lists (the first format, ``index.json``) that costs about
0.8 GB and 3 s per process at a million examples, repeated in every rank and DataLoader
worker. Here the table is a folder of flat arrays that every process maps read-only, so
the pages live once in the page cache of the node::

    <shards>/index/
      meta.json                 written last: format, codec, settings, shard list, column
                                kinds, file sizes and SHA-256, split ranges
      <name>.npy                a numeric column (shard, pos, line, duration, frames, ...),
                                the codes of a categorical column (task, split) or video_size
                                [N, 2] (-1 = no video)
      <name>.offsets.npy        a string column (id, speaker, text, prompt_text): int64
      <name>.bytes              offsets [N + 1] into the UTF-8 bytes of all values
      <name>.null.npy           (only when some value is None) bool [N]
      by_split.npy              row numbers grouped by split (stable), ``meta["splits"]``
                                gives each split's range: a split is a slice, not a copy

The folder is written under a temporary name and renamed into place, so a reader sees a
complete index or none. Opening it checks every file against ``meta.json`` (size, array
header, length): a truncated or foreign file is a :class:`~unimoe.data.shards.ShardError`
naming it. :func:`check_index` also verifies the SHA-256 sums and value ranges
(``unimoe data validate <shard folder>``).

Folders tokenised before this format have only ``index.json``; :func:`open_index` converts
it once, next to it (a log line says so), and reads the columns from then on. When the
folder is not writable it builds the same columns in memory for this process only and says
how to convert it for good (``unimoe data index DIR``).
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import mmap
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unimoe.atomic import fault_point, folder_write_errors
from unimoe.data.shards import SETTINGS_FILE, SHARD_FORMAT, SHARD_VERSION, ShardError

log = logging.getLogger(__name__)

INDEX_DIR = "index"
META_FILE = "meta.json"
LEGACY_INDEX_FILE = "index.json"
COLUMNS_FORMAT = SHARD_FORMAT + "-columns"
COLUMNS_VERSION = 1
SPLIT_ORDER = "by_split"

SCHEMA: dict[str, str] = {
    "id": "str", "task": "cat", "split": "cat", "speaker": "str",
    "shard": "int32", "pos": "int32", "line": "int64", "duration": "float64",
    "frames": "int32", "prompt_frames": "int32", "text": "str", "prompt_text": "str",
    "video_frames": "int32", "video_size": "size2",
}
"""The per-example table (one row per example, in shard order) and each column's kind:
``str`` (string table, may hold None), ``cat`` (few distinct strings: int32 codes plus the
values in ``meta.json``), ``int32`` / ``int64`` / ``float64``, ``size2`` (``[H, W]`` or None)."""

HEADER_KEYS = ("codec", "config", "manifest", "shards", "skipped")
"""What ``meta.json`` carries besides the columns (the same fields ``index.json`` had)."""

_TYPECODES = {"int32": "i", "int64": "q", "float64": "d"}


# ---------------------------------------------------------------------- writing
class _Numbers:
    def __init__(self, name: str, kind: str) -> None:
        self.name, self.kind, self.values = name, kind, array.array(_TYPECODES[kind])

    def add(self, value: Any) -> None:
        if value is None:
            raise ValueError(f"index column {self.name!r} ({self.kind}) has no value at row {len(self.values)}")
        self.values.append(value)

    def packed(self) -> np.ndarray:
        return np.frombuffer(self.values, dtype=np.dtype(self.kind)) if self.values else np.zeros(0, self.kind)


class _Categories:
    def __init__(self, name: str) -> None:
        self.name, self.codes, self.lookup = name, array.array("i"), {}

    def add(self, value: Any) -> None:
        if not isinstance(value, str):
            raise ValueError(f"index column {self.name!r} needs a string at row {len(self.codes)}, got {value!r}")
        self.codes.append(self.lookup.setdefault(value, len(self.lookup)))

    def packed(self) -> tuple[np.ndarray, list[str]]:
        return np.frombuffer(self.codes, dtype=np.int32) if self.codes else np.zeros(0, np.int32), list(self.lookup)


class _Strings:
    def __init__(self, name: str) -> None:
        self.name, self.data, self.offsets, self.nulls = name, bytearray(), array.array("q", [0]), array.array("b")

    def add(self, value: Any) -> None:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"index column {self.name!r} needs a string or null at row {len(self.nulls)}, got {value!r}")
        self.nulls.append(value is None)
        if value:
            self.data += value.encode("utf-8")
        self.offsets.append(len(self.data))

    def packed(self) -> tuple[np.ndarray, bytes, np.ndarray]:
        nulls = np.frombuffer(self.nulls, dtype=np.int8).astype(bool) if self.nulls else np.zeros(0, bool)
        return np.frombuffer(self.offsets, dtype=np.int64), bytes(self.data), nulls


class _Sizes:
    def __init__(self, name: str) -> None:
        self.name, self.values = name, array.array("i")

    def add(self, value: Any) -> None:
        if value is None:
            self.values.extend((-1, -1))
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            self.values.extend((int(value[0]), int(value[1])))
        else:
            raise ValueError(f"index column {self.name!r} needs [H, W] or null at row {len(self.values) // 2}, got {value!r}")

    def packed(self) -> np.ndarray:
        return np.frombuffer(self.values, dtype=np.int32).reshape(-1, 2) if self.values else np.zeros((0, 2), np.int32)


def _builder(name: str, kind: str):
    if kind == "str":
        return _Strings(name)
    if kind == "cat":
        return _Categories(name)
    if kind == "size2":
        return _Sizes(name)
    return _Numbers(name, kind)


class IndexWriter:
    """Collects index rows (``add``) or whole columns (``extend``), then writes the folder.

    Memory while collecting is the packed values (bytes of the strings, 4-8 bytes per
    number), not Python objects per example.
    """

    def __init__(self) -> None:
        self.columns = {name: _builder(name, kind) for name, kind in SCHEMA.items()}
        self.num_items = 0

    def add(self, row: Mapping[str, Any]) -> None:
        missing = [k for k in SCHEMA if k not in row]
        if missing:
            raise ValueError(f"index row {self.num_items} lacks {', '.join(missing)}")
        for name, column in self.columns.items():
            column.add(row[name])
        self.num_items += 1

    def extend(self, columns: Mapping[str, Sequence[Any]], where: str = "index") -> None:
        """Append whole columns (the ``items`` mapping of an ``index.json``)."""
        missing = [k for k in SCHEMA if k not in columns]
        unknown = [k for k in columns if k not in SCHEMA]
        if missing or unknown:
            raise ShardError(f"{where}: the per-example table has columns {sorted(columns)}; "
                             f"missing {missing}, unknown {unknown} (written by another unimoe version?)")
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ShardError(f"{where}: its columns have different lengths {sorted(lengths)}")
        for name, column in self.columns.items():
            try:
                for value in columns[name]:
                    column.add(value)
            except ValueError as exc:
                raise ShardError(f"{where}: {exc}") from None
        self.num_items += lengths.pop() if lengths else 0

    def packed(self) -> dict[str, Any]:
        """Every column in the form :func:`write_columns` takes."""
        return {name: column.packed() for name, column in self.columns.items()}

    def write(self, directory: str | Path, header: Mapping[str, Any], source: Mapping[str, Any] | None = None) -> Path:
        """Write ``<directory>/index/`` (see :func:`write_columns`)."""
        return write_columns(directory, header, self.packed(), source=source)

    def in_memory(self, directory: str | Path, header: Mapping[str, Any]) -> "ShardIndex":
        """The same index held by this process only (for folders that cannot be written)."""
        files, spec = _files(self.packed())
        meta = _meta(header, self.num_items, spec, None)
        return ShardIndex(Path(directory), meta, {_file_name(k): v for k, v in files.items()})


def write_columns(directory: str | Path, header: Mapping[str, Any], columns: Mapping[str, Any],
                  source: Mapping[str, Any] | None = None) -> Path:
    """Write ``<directory>/index/`` atomically (temporary folder, fsync, rename); return it.

    ``columns`` has every :data:`SCHEMA` column packed: numbers as an array, ``size2`` as an
    int32 ``[N, 2]`` array (-1 = None), ``cat`` as ``(int32 codes, categories)``, ``str`` as
    ``(int64 offsets [N + 1], UTF-8 bytes, bool nulls [N])``. ``header`` holds
    :data:`HEADER_KEYS`; ``source`` records the ``index.json`` a conversion read (size and
    mtime), so a later rewrite of that file is noticed. An existing index folder is replaced.
    """
    directory = Path(directory)
    final = directory / INDEX_DIR
    tmp = directory / f".{INDEX_DIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    files, spec = _files(columns)
    meta = _meta(header, len(files[SPLIT_ORDER]), spec, source)
    try:
        with folder_write_errors(final, tmp):
            tmp.mkdir(parents=True)
            for name, values in files.items():
                path = tmp / _file_name(name)
                if isinstance(values, (bytes, bytearray)):
                    path.write_bytes(values)
                else:
                    np.save(path, np.ascontiguousarray(values), allow_pickle=False)
                meta["files"][path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            _fsync_tree(tmp)
            fault_point(final)
            _replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _files(columns: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The index files (stem -> array or bytes) and the column part of ``meta.json``."""
    missing = [k for k in SCHEMA if k not in columns]
    if missing:
        raise ValueError(f"index columns missing: {', '.join(missing)}")
    files: dict[str, Any] = {}
    spec: dict[str, Any] = {}
    lengths = set()
    for name, kind in SCHEMA.items():
        value = columns[name]
        entry: dict[str, Any] = {"kind": kind}
        if kind == "str":
            offsets, data, nulls = value
            files[name + ".offsets"], files[name + ".bytes"] = np.asarray(offsets, np.int64), bytes(data)
            entry["nullable"] = bool(np.asarray(nulls).any())
            if entry["nullable"]:
                files[name + ".null"] = np.asarray(nulls, bool)
            lengths.add(len(offsets) - 1)
        elif kind == "cat":
            codes, categories = value
            files[name] = np.asarray(codes, np.int32)
            entry["categories"] = list(categories)
            lengths.add(len(codes))
        else:
            files[name] = np.asarray(value, np.int32 if kind == "size2" else kind)
            lengths.add(len(value))
        spec[name] = entry
    if len(lengths) != 1:
        raise ValueError(f"index columns have different lengths: {sorted(lengths)}")
    n = lengths.pop()
    codes, categories = files["split"], spec["split"]["categories"]
    files[SPLIT_ORDER] = np.argsort(codes, kind="stable").astype(_row_dtype(n))
    counts = np.bincount(codes, minlength=len(categories)) if n else np.zeros(len(categories), np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    splits = {value: [int(starts[c]), int(starts[c + 1])] for c, value in enumerate(categories)}
    return files, {"columns": spec, "splits": splits}


def _row_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def _file_name(name: str) -> str:
    return name if name.endswith(".bytes") else name + ".npy"


def _meta(header: Mapping[str, Any], num_items: int, spec: dict[str, Any], source: Mapping[str, Any] | None) -> dict[str, Any]:
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise ValueError(f"index header lacks {', '.join(missing)}")
    meta = {"format": COLUMNS_FORMAT, "version": COLUMNS_VERSION, "shard_version": SHARD_VERSION,
            **{k: header[k] for k in HEADER_KEYS}, "num_items": num_items, **spec, "files": {}}
    if source is not None:
        meta["source"] = dict(source)
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an old ``final`` is moved aside first and removed."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, old)
        except FileNotFoundError:
            pass  # another process replaced it just now
        else:
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / META_FILE).is_file():  # not a concurrent writer's finished index
            raise


# ---------------------------------------------------------------------- reading
class StringColumn:
    """A string column: ``column[i]`` is a ``str`` or None, without holding Python strings."""

    def __init__(self, offsets: np.ndarray, data: bytes | mmap.mmap, nulls: np.ndarray | None) -> None:
        self.offsets, self.data, self.nulls = offsets, data, nulls

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str | None:
        if self.nulls is not None and self.nulls[i]:
            return None
        return self.data[int(self.offsets[i]): int(self.offsets[i + 1])].decode("utf-8")

    def byte_lengths(self, rows: np.ndarray | None = None) -> np.ndarray:
        """UTF-8 byte length of each value (0 for None), for ``rows`` or all."""
        if rows is None:
            return np.diff(self.offsets)
        return self.offsets[rows + 1] - self.offsets[rows]

    def is_null(self, rows: np.ndarray | None = None) -> np.ndarray:
        n = len(self) if rows is None else len(rows)
        if self.nulls is None:
            return np.zeros(n, bool)
        return np.asarray(self.nulls if rows is None else self.nulls[rows], dtype=bool)


class ShardIndex:
    """The per-example table of one shard folder (see the module docstring).

    ``column(name)`` is a read-only array (memory-mapped unless built in memory),
    ``strings(name)`` a :class:`StringColumn`, ``row(i)`` the dict of one example (the keys
    of :data:`SCHEMA`, values as ``index.json`` had them), ``split_rows(split)`` the row
    numbers of a split (a slice of ``by_split.npy``). Pickling keeps the path, not the data:
    a spawned DataLoader worker maps the same files again.
    """

    def __init__(self, directory: Path, meta: dict[str, Any], arrays: dict[str, Any], files: Path | None = None) -> None:
        self.directory = directory
        self.meta = meta
        self.num_items = int(meta["num_items"])
        self._arrays = arrays
        self._files = files  # the index folder when memory-mapped (None: built in memory)
        self._strings: dict[str, StringColumn] = {}

    # ------------------------------------------------------------------ header
    @property
    def codec(self) -> dict[str, Any]:
        return self.meta["codec"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.meta["shards"]

    @property
    def memory_mapped(self) -> bool:
        return self._files is not None

    def __len__(self) -> int:
        return self.num_items

    def categories(self, name: str) -> list[str]:
        return list(self.meta["columns"][name]["categories"])

    # ------------------------------------------------------------------ columns
    def column(self, name: str) -> np.ndarray:
        kind = self._kind(name)
        if kind == "str":
            raise TypeError(f"index column {name!r} holds strings: use strings({name!r})")
        return self._arrays[name + ".npy"]

    def strings(self, name: str) -> StringColumn:
        if self._kind(name) != "str":
            raise TypeError(f"index column {name!r} is not a string column")
        col = self._strings.get(name)
        if col is None:
            col = self._strings[name] = StringColumn(self._arrays[name + ".offsets.npy"], self._arrays[name + ".bytes"],
                                                     self._arrays.get(name + ".null.npy"))
        return col

    def values(self, name: str, rows: Iterable[int] | None = None) -> list[Any]:
        """Python values of a column (all rows, or ``rows``), as ``index.json`` listed them."""
        rows = range(self.num_items) if rows is None else rows
        return [self._value(name, int(i)) for i in rows]

    def row(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num_items:
            raise IndexError(f"row {i} out of range for {self.num_items} examples in {self.directory}")
        return {name: self._value(name, i) for name in SCHEMA}

    def split_rows(self, split: str | None) -> np.ndarray | None:
        """Row numbers of ``split`` in shard order (None for ``split=None``: every row)."""
        if split is None:
            return None
        start, end = self.meta["splits"].get(split, (0, 0))
        return self._arrays[SPLIT_ORDER + ".npy"][start:end]

    def _kind(self, name: str) -> str:
        spec = self.meta["columns"].get(name)
        if spec is None:
            raise KeyError(f"index of {self.directory} has no column {name!r}; columns: {', '.join(self.meta['columns'])}")
        return spec["kind"]

    def _value(self, name: str, i: int) -> Any:
        kind = self._kind(name)
        if kind == "str":
            return self.strings(name)[i]
        values = self._arrays[name + ".npy"]
        if kind == "cat":
            return self.meta["columns"][name]["categories"][int(values[i])]
        if kind == "size2":
            h, w = int(values[i, 0]), int(values[i, 1])
            return None if h < 0 else [h, w]
        return float(values[i]) if kind == "float64" else int(values[i])

    def __reduce__(self):
        if self._files is None:  # built in memory: the data itself has to travel
            return (ShardIndex, (self.directory, self.meta, self._arrays))
        return (load_columns, (self.directory,))


def load_columns(directory: str | Path) -> ShardIndex:
    """Map ``<directory>/index/`` after checking every file against ``meta.json``."""
    directory = Path(directory)
    folder = directory / INDEX_DIR
    meta_path = folder / META_FILE
    meta = _read_meta(meta_path)
    arrays: dict[str, Any] = {}
    for name, record in meta["files"].items():
        path = folder / name
        if not path.is_file():
            raise ShardError(f"{path} is missing ({meta_path} lists it); {_rebuild_hint(directory)}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ShardError(f"{path} is truncated or was modified: {size} bytes, {meta_path} records {record['bytes']}; "
                             f"{_rebuild_hint(directory)}")
        arrays[name] = _map_bytes(path) if name.endswith(".bytes") else _map_array(path, directory)
    _check_shapes(meta, arrays, folder, directory)
    return ShardIndex(directory, meta, arrays, files=folder)


def _read_json(path: Path, hint: str = "") -> Any:
    """A JSON file, or a :class:`ShardError` naming it (missing, not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path} is not valid JSON ({exc}){hint}") from exc


def _read_meta(path: Path) -> dict[str, Any]:
    meta = _read_json(path, f"; {_rebuild_hint(path.parent.parent)}")
    if not isinstance(meta, dict) or meta.get("format") != COLUMNS_FORMAT:
        raise ShardError(f"{path} is not a {COLUMNS_FORMAT} file")
    if meta.get("version") != COLUMNS_VERSION:
        raise ShardError(f"{path} has index version {meta.get('version')}, this code reads {COLUMNS_VERSION}")
    missing = [k for k in (*HEADER_KEYS, "num_items", "columns", "splits", "files") if k not in meta]
    if missing:
        raise ShardError(f"{path} lacks {', '.join(missing)}; {_rebuild_hint(path.parent.parent)}")
    return meta


def _map_array(path: Path, directory: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure is a bad file
        raise ShardError(f"{path} is not a readable .npy array ({exc}); {_rebuild_hint(directory)}") from exc


def _map_bytes(path: Path) -> bytes | mmap.mmap:
    if path.stat().st_size == 0:
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _check_shapes(meta: dict[str, Any], arrays: dict[str, Any], folder: Path, directory: Path) -> None:
    n = int(meta["num_items"])

    def fail(name: str, what: str) -> None:
        raise ShardError(f"{folder / name}: {what} ({folder / META_FILE} says {n} examples); {_rebuild_hint(directory)}")

    for name, spec in meta["columns"].items():
        kind = spec["kind"]
        if kind == "str":
            offsets, data = arrays.get(f"{name}.offsets.npy"), arrays.get(f"{name}.bytes")
            if offsets is None or data is None:
                fail(f"{name}.offsets.npy", "string column files missing from meta.json")
            if offsets.shape != (n + 1,) or offsets.dtype != np.int64:
                fail(f"{name}.offsets.npy", f"shape {offsets.shape} {offsets.dtype}, expected ({n + 1},) int64")
            if int(offsets[0]) != 0 or int(offsets[-1]) != len(data):
                fail(f"{name}.offsets.npy", f"offsets run {int(offsets[0])}..{int(offsets[-1])}, "
                                            f"{name}.bytes holds {len(data)} bytes")
            nulls = arrays.get(f"{name}.null.npy")
            if nulls is not None and nulls.shape != (n,):
                fail(f"{name}.null.npy", f"shape {nulls.shape}, expected ({n},)")
            continue
        values = arrays.get(name + ".npy")
        if values is None:
            fail(name + ".npy", "column file missing from meta.json")
        expected = (n, 2) if kind == "size2" else (n,)
        dtype = np.dtype("int32" if kind in ("cat", "size2") else kind)
        if values.shape != expected or values.dtype != dtype:
            fail(name + ".npy", f"shape {values.shape} {values.dtype}, expected {expected} {dtype}")
    order = arrays.get(SPLIT_ORDER + ".npy")
    if order is None or order.shape != (n,):
        fail(SPLIT_ORDER + ".npy", f"shape {None if order is None else order.shape}, expected ({n},)")


def _rebuild_hint(directory: Path) -> str:
    if (directory / LEGACY_INDEX_FILE).is_file():
        return f"delete {directory / INDEX_DIR} to rebuild it from {LEGACY_INDEX_FILE}"
    return f"re-run 'unimoe tokenize' into {directory} to rewrite it"


# ---------------------------------------------------------------------- opening any folder
def open_index(directory: str | Path, *, in_memory_fallback: bool = True) -> ShardIndex:
    """The index of a finished shard folder: its columns, or its ``index.json`` converted once.

    ``in_memory_fallback``: see :func:`convert_legacy_index`.

    Raises :class:`~unimoe.data.shards.ShardError` naming the folder or file when there is
    no finished index, or when a file of it is missing, truncated or corrupt.
    """
    directory = Path(directory)
    legacy = directory / LEGACY_INDEX_FILE
    if (directory / INDEX_DIR / META_FILE).is_file():
        if not legacy.is_file():
            return load_columns(directory)
        index = load_columns(directory)
        if index.meta.get("source") == _source_record(legacy):
            return index
        log.warning("%s: %s changed after the columns in %s were made from it; converting it again",
                    directory, LEGACY_INDEX_FILE, directory / INDEX_DIR)
    if legacy.is_file():
        return convert_legacy_index(directory, in_memory_fallback=in_memory_fallback)
    hint = (" (tokenisation did not finish: re-run 'unimoe tokenize' with the same --out to resume)"
            if (directory / SETTINGS_FILE).exists() else "")
    raise ShardError(f"{directory} has no {INDEX_DIR}/{META_FILE} or {LEGACY_INDEX_FILE}; "
                     f"it is not a finished shard directory{hint}")


def _source_record(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"file": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_legacy_index(directory: str | Path) -> dict[str, Any]:
    """The ``index.json`` of a folder tokenised before the columnar index (a dict of lists)."""
    path = Path(directory) / LEGACY_INDEX_FILE
    index = _read_json(path)
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT + "-index":
        raise ShardError(f"{path} is not a shard index")
    missing = [k for k in (*HEADER_KEYS, "items") if k not in index]
    if missing:
        raise ShardError(f"{path} lacks {', '.join(missing)}")
    return index


def convert_legacy_index(directory: str | Path, *, in_memory_fallback: bool = True) -> ShardIndex:
    """Write ``<directory>/index/`` from its ``index.json`` (once) and open it.

    A folder that cannot be written gets the columns in this process's memory instead
    (``in_memory_fallback``), with a warning naming the command that converts it for good.
    """
    directory = Path(directory)
    legacy = directory / LEGACY_INDEX_FILE
    source = _source_record(legacy)
    log.warning("%s has the old shard index (%s): converting it once to memory-mapped columns in %s",
                directory, LEGACY_INDEX_FILE, directory / INDEX_DIR)
    old = read_legacy_index(directory)
    writer = IndexWriter()
    writer.extend(old["items"], where=str(legacy))
    if writer.num_items != old.get("num_items", writer.num_items):
        raise ShardError(f"{legacy}: num_items is {old.get('num_items')} but its table has {writer.num_items} rows")
    header = {k: old[k] for k in HEADER_KEYS}
    del old
    try:
        writer.write(directory, header, source=source)
    except OSError as exc:
        if not in_memory_fallback:
            raise ShardError(f"cannot write {directory / INDEX_DIR}: {exc}") from exc
        log.warning("%s is not writable (%s): the converted index is held in this process's memory only; run "
                    "'unimoe data index %s' with write access to convert it for good", directory, exc, directory)
        return writer.in_memory(directory, header)
    return load_columns(directory)


# ---------------------------------------------------------------------- deep check
def check_index(directory: str | Path) -> list[str]:
    """Every problem of a shard folder's index: checksums, value ranges, shard files present.

    Empty list = sound. Opening problems (missing / truncated files) are returned as one
    problem each, not raised.
    """
    directory = Path(directory)
    try:
        index = open_index(directory)
    except ShardError as exc:
        return [str(exc)]
    problems: list[str] = []
    folder = directory / INDEX_DIR
    if index.memory_mapped:
        for name, record in index.meta["files"].items():
            if _sha256(folder / name) != record["sha256"]:
                problems.append(f"{folder / name}: SHA-256 differs from {folder / META_FILE} (corrupt or modified)")
    n = len(index)
    for name, spec in index.meta["columns"].items():
        if spec["kind"] == "str":
            offsets = np.asarray(index.strings(name).offsets)
            if n and (np.diff(offsets) < 0).any():
                problems.append(f"{folder / (name + '.offsets.npy')}: offsets decrease")
        elif spec["kind"] == "cat":
            codes = np.asarray(index.column(name))
            if n and (codes.min() < 0 or codes.max() >= len(spec["categories"])):
                problems.append(f"{folder / (name + '.npy')}: codes outside 0..{len(spec['categories']) - 1}")
    shards = index.shards
    shard, pos = np.asarray(index.column("shard")), np.asarray(index.column("pos"))
    if n and (shard.min() < 0 or shard.max() >= len(shards)):
        problems.append(f"{folder / 'shard.npy'}: shard numbers outside 0..{len(shards) - 1}")
    elif n:
        sizes = np.asarray([s.get("items", 0) for s in shards], dtype=np.int64)
        if (pos < 0).any() or (pos >= sizes[shard]).any():
            problems.append(f"{folder / 'pos.npy'}: positions beyond their shard's item count")
    for s in shards:
        if not (directory / s["file"]).is_file():
            problems.append(f"{directory / s['file']}: listed in the index but missing")
    order = np.asarray(index._arrays[SPLIT_ORDER + ".npy"])
    if n and not np.array_equal(np.sort(order), np.arange(n)):
        problems.append(f"{folder / (SPLIT_ORDER + '.npy')}: not a permutation of the rows")
    return problems
