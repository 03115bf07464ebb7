"""Data-index benchmark: memory per process and open time of the shard index, old vs new.

For each size (default 1M and 5M synthetic examples) it writes one shard folder with the
memory-mapped index (:mod:`unimoe.data.index`) and, up to ``--old-max`` examples, the same
table as the old ``index.json``. Each measurement runs in a fresh process that

1. imports everything, then records its memory (the baseline),
2. opens the training split (``ShardDataset`` for the new index; for the old one the
   reading main had before: ``json.loads`` into one Python list per column, kept per split),
3. runs a DataLoader with ``W`` worker processes (fork, as Linux defaults to) over random
   batches drawn from the whole split, each item read from its shard as in training,
4. while the workers are alive, reads ``/proc/<pid>/smaps_rollup`` of itself and of every
   worker: RSS, PSS (shared pages divided among the processes mapping them: what the
   node really pays) and USS (private pages: what this process alone costs).

Ratios old / new are computed in the same run. The synthetic folder has one real shard of
``--shard-items`` examples; index rows point at them cyclically (ids repeat with that period),
so the index has the full size while the shard data stays small: the benchmark measures
the index, not audio tokens. ``--datamodule`` also times ``UniMoEDataModule`` setup on the new
index (sequence lengths + one epoch's batch plan) and reports its memory per example.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("tts", "t2m", "v2m")
SPLITS = ("train", "val", "test")
WORDS = ("the", "a", "calm", "slow", "piano", "voice", "bright", "melody", "river", "over", "with", "drums",
         "she", "said", "that", "music", "of", "soft", "guitar", "night", "morning", "song", "and", "beat")


# ---------------------------------------------------------------------- synthetic folders
def _strings(pool: list[str], choice: np.ndarray) -> tuple[np.ndarray, bytes, np.ndarray]:
    """A packed string column whose row i is ``pool[choice[i]]`` (built in chunks: bounded memory)."""
    encoded = [p.encode("utf-8") for p in pool]
    lens = np.array([len(e) for e in encoded], np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    buf = np.frombuffer(b"".join(encoded), np.uint8)
    offsets = np.concatenate([[0], np.cumsum(lens[choice])])
    out = np.empty(int(offsets[-1]), np.uint8)
    step = 1 << 18
    for a in range(0, len(choice), step):
        c = choice[a: a + step]
        row_lens, first = lens[c], offsets[a]
        pos = np.repeat(starts[c] - (offsets[a: a + len(c)] - first), row_lens) + np.arange(int(row_lens.sum()))
        out[first: first + len(pos)] = buf[pos]
    return offsets, out.tobytes(), np.zeros(len(choice), bool)


def synthetic_columns(n: int, shard_items: int, seed: int = 0) -> dict[str, Any]:
    """Index columns of ``n`` examples shaped like the paper's data (tts-heavy, ~20 s clips)."""
    rng = np.random.default_rng(seed)
    task = rng.choice(3, n, p=[0.8, 0.15, 0.05]).astype(np.int32)
    split = rng.choice(3, n, p=[0.98, 0.01, 0.01]).astype(np.int32)
    pos = (np.arange(n) % shard_items).astype(np.int32)
    duration = rng.uniform(2.0, 20.0, n)
    frames = (duration * 50).astype(np.int32)
    is_video = task == 2
    sentences = [" ".join(rng.choice(WORDS, int(rng.integers(6, 40)))) for _ in range(4096)]
    ids = [f"syn-{i:07d}" for i in range(shard_items)]
    speakers = [f"speaker-{i:05d}" for i in range(20000)]
    video_size = np.where(is_video[:, None], 224, -1).astype(np.int32) * np.ones((1, 2), np.int32)
    return {
        "id": _strings(ids, pos), "task": (task, list(TASKS)), "split": (split, list(SPLITS)),
        "speaker": _strings(speakers, rng.integers(0, len(speakers), n)), "shard": np.zeros(n, np.int32),
        "pos": pos, "line": np.arange(1, n + 1, dtype=np.int64), "duration": duration.round(4), "frames": frames,
        "prompt_frames": np.where(task == 0, 150, 0).astype(np.int32),
        "text": _strings(sentences, rng.integers(0, len(sentences), n)),
        "prompt_text": _strings(sentences, rng.integers(0, len(sentences), n)),
        "video_frames": np.where(is_video, 8, 0).astype(np.int32), "video_size": video_size,
    }


def _write_shard(folder: Path, shard_items: int) -> dict[str, Any]:
    import torch

    from unimoe.data.shards import SHARD_FORMAT, SHARD_VERSION, save_shard

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    items = [{"id": f"syn-{i:07d}", "task": "tts", "split": "train", "text": "a short line", "speaker": "s", "lang": "en",
              "prompt_text": None, "duration": 1.0, "line": i + 1, "meta": "{}",
              "codes": torch.randint(0, 1024, (8, 50), generator=g, dtype=torch.int16), "prompt_codes": None,
              "video": None, "video_fps": None} for i in range(shard_items)]
    codec = {"name": "synthetic", "num_codebooks": 8, "cardinality": 1024}
    save_shard(folder, 0, {"format": SHARD_FORMAT, "version": SHARD_VERSION, "codec": codec, "fingerprint": "synthetic",
                           "shard": 0, "items": items, "skipped": []})
    return {"codec": codec, "config": {}, "manifest": "synthetic", "skipped": {},
            "shards": [{"file": "shard-00000.pt", "items": shard_items, "skipped": 0}]}


def _legacy_json(folder: Path, header: dict[str, Any], columns: dict[str, Any]) -> None:
    """The same table as an ``index.json`` of the first format (one list per column)."""
    from unimoe.data.index import SCHEMA
    from unimoe.data.shards import SHARD_FORMAT, SHARD_VERSION

    items: dict[str, list] = {}
    for name, kind in SCHEMA.items():
        value = columns[name]
        if kind == "str":
            offsets, data, _ = value
            items[name] = [data[offsets[i]: offsets[i + 1]].decode() for i in range(len(offsets) - 1)]
        elif kind == "cat":
            codes, categories = value
            items[name] = [categories[c] for c in codes.tolist()]
        elif kind == "size2":
            items[name] = [None if h < 0 else [h, w] for h, w in value.tolist()]
        else:
            items[name] = value.tolist()
    n = len(items["id"])
    with open(folder / "index.json", "w", encoding="utf-8") as f:
        json.dump({"format": SHARD_FORMAT + "-index", "version": SHARD_VERSION, **header, "num_items": n, "items": items}, f)


def build_folders(root: Path, n: int, shard_items: int, old: bool) -> dict[str, Any]:
    """``root/new-<n>`` (columns) and, with ``old``, ``root/old-<n>`` (index.json); sizes on disk."""
    from unimoe.data.index import write_columns

    columns = synthetic_columns(n, shard_items)
    new = root / f"new-{n}"
    header = _write_shard(new, shard_items)
    t0 = time.perf_counter()
    write_columns(new, header, columns)
    out: dict[str, Any] = {"new": str(new), "write_columns_s": round(time.perf_counter() - t0, 2),
                           "new_index_mb": round(_du(new / "index") / 2**20, 1)}
    if old:
        legacy = root / f"old-{n}"
        legacy.mkdir(parents=True, exist_ok=True)
        shutil.copy(new / "shard-00000.pt", legacy / "shard-00000.pt")
        _legacy_json(legacy, header, columns)
        out.update(old=str(legacy), old_index_mb=round((legacy / "index.json").stat().st_size / 2**20, 1))
    return out


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


# ---------------------------------------------------------------------- the old reading (baseline)
class ListIndexDataset:
    """What ``ShardDataset`` did before the columnar index: ``index.json`` as Python lists.

    Kept here only as the benchmark's baseline: the per-split row filter, the row dict and
    the shard read are the same as in unimoe up to the change.
    """

    def __init__(self, directory: str | Path, split: str | None = "train") -> None:
        from collections import OrderedDict

        self.directory = Path(directory)
        index = json.loads((self.directory / "index.json").read_text(encoding="utf-8"))
        self.shard_files = [s["file"] for s in index["shards"]]
        columns = index["items"]
        keep = [i for i in range(index["num_items"]) if split is None or columns["split"][i] == split]
        self.rows = {key: [values[i] for i in keep] for key, values in columns.items()}
        self._open: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows["id"])

    def row(self, i: int) -> dict[str, Any]:
        return {key: values[i] for key, values in self.rows.items()}

    def __getitem__(self, i: int):
        from unimoe.data.shards import load_shard

        row = self.row(i)
        if row["shard"] not in self._open:
            self._open[row["shard"]] = load_shard(self.directory / self.shard_files[row["shard"]])
        item = self._open[row["shard"]]["items"][row["pos"]]
        assert item["id"] == row["id"]
        return item["codes"].long()


# ---------------------------------------------------------------------- measuring one process tree
def smaps(pid: int | str = "self") -> dict[str, float]:
    """Memory of one process (MiB) from ``/proc/<pid>/smaps_rollup``.

    ``uss`` = private pages (clean + dirty): what only this process holds; ``pss`` = RSS
    with each shared page divided by the processes mapping it, split into ``pss_anon``
    (heap: Python objects, arrays) and ``pss_file`` (mapped files: libraries, the index).
    A file page mapped by one process alone counts as its USS too, though the page cache
    would share it with any other process mapping the file.
    """
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    kb = 1024
    return {"rss_mb": round(fields["Rss"] / kb, 1), "pss_mb": round(fields["Pss"] / kb, 1),
            "uss_mb": round((fields["Private_Clean"] + fields["Private_Dirty"]) / kb, 1),
            "shared_mb": round((fields["Shared_Clean"] + fields["Shared_Dirty"]) / kb, 1),
            "pss_anon_mb": round(fields.get("Pss_Anon", 0) / kb, 1), "pss_file_mb": round(fields.get("Pss_File", 0) / kb, 1)}


def _children() -> list[int]:
    pids: list[int] = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as f:
            pids += [int(p) for p in f.read().split()]
    return sorted(set(pids))


class RandomBatches:
    """``num_batches`` batches of ``batch_size`` indices drawn uniformly from the whole dataset."""

    def __init__(self, size: int, batch_size: int, num_batches: int, seed: int = 0) -> None:
        self.size, self.batch_size, self.num_batches, self.seed = size, batch_size, num_batches, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for _ in range(self.num_batches):
            yield rng.integers(0, self.size, self.batch_size).tolist()

    def __len__(self) -> int:
        return self.num_batches


def count_tokens(examples: list) -> int:
    """Collate: the number of codes read (keeps the batch small; the work is the item reads)."""
    return sum(int((e.codes if hasattr(e, "codes") else e).numel()) for e in examples)


def measure(fmt: str, folder: str, workers: int, batches: int, batch_size: int, start_method: str) -> dict[str, Any]:
    """One measurement (runs in a fresh process; see the module docstring)."""
    import torch
    from torch.utils.data import DataLoader

    from unimoe.data.dataset import ShardDataset

    torch.set_num_threads(1)
    gc.collect()
    base = smaps()
    t0 = time.perf_counter()
    ds = ShardDataset(folder, split="train") if fmt == "new" else ListIndexDataset(folder, split="train")
    open_s = time.perf_counter() - t0
    gc.collect()
    opened = smaps()
    loader = DataLoader(ds, batch_sampler=RandomBatches(len(ds), batch_size, batches), collate_fn=count_tokens,
                        num_workers=workers, persistent_workers=workers > 0,
                        multiprocessing_context=start_method if workers else None)
    t0 = time.perf_counter()
    it = iter(loader)
    tokens = sum(next(it) for _ in range(len(loader)))
    load_s = time.perf_counter() - t0
    gc.collect()
    main = smaps()
    procs = [smaps(pid) for pid in _children()] if workers else []
    del it
    return {
        "format": fmt, "examples": len(ds), "workers": workers, "open_s": round(open_s, 3),
        "load_s": round(load_s, 2), "items_read": batches * batch_size, "tokens_read": tokens,
        "main_baseline": base, "main_after_open": opened, "main": main, "worker_procs": procs,
        "index_uss_mb": round(opened["uss_mb"] - base["uss_mb"], 1),
        "index_pss_mb": round(opened["pss_mb"] - base["pss_mb"], 1),
        "index_anon_mb": round(opened["pss_anon_mb"] - base["pss_anon_mb"], 1),
        "worker_uss_mb_max": max((p["uss_mb"] for p in procs), default=0.0),
        "worker_pss_mb_max": max((p["pss_mb"] for p in procs), default=0.0),
        "total_pss_mb": round(main["pss_mb"] + sum(p["pss_mb"] for p in procs), 1),
        "total_uss_mb": round(main["uss_mb"] + sum(p["uss_mb"] for p in procs), 1),
    }


def measure_datamodule(folder: str, max_tokens: int) -> dict[str, Any]:
    """``UniMoEDataModule`` setup on the new index: lengths + one epoch's batch plan, time and memory."""
    import torch

    from unimoe.data.datamodule import UniMoEDataModule
    from unimoe.model.config import AudioLMConfig

    from unimoe.data.dataset import ShardDataset
    from unimoe.data.sequences import SequenceMaker

    torch.set_num_threads(1)
    model = AudioLMConfig.from_preset("tiny", num_codebooks=8, codebook_size=1024, delays=list(range(8)),
                                      max_seq_len=max_tokens)
    warm = ShardDataset(folder, split=None)  # import what building prefixes imports, outside the measurement
    index = warm.parts[0].index
    for task in range(len(index.categories("task"))):
        first = int(np.nonzero(np.asarray(index.column("task")) == task)[0][0])
        SequenceMaker(model).length(index.row(first))
    del warm, index
    gc.collect()
    base = smaps()
    t0 = time.perf_counter()
    dm = UniMoEDataModule(sources={"syn": folder}, model=model, mix="raw", max_tokens=max_tokens, val_split=None,
                          test_split=None)
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sampler = dm.train_batch_sampler()
    num_batches = len(sampler)
    plan_s = time.perf_counter() - t0
    gc.collect()
    after = smaps()
    n = len(dm._data["train"].concat)
    return {"examples": n, "setup_s": round(setup_s, 2), "plan_s": round(plan_s, 2), "batches": num_batches,
            "main_baseline": base, "main": after,
            "anon_bytes_per_example": round((after["pss_anon_mb"] - base["pss_anon_mb"]) * 2**20 / max(n, 1), 1)}


# ---------------------------------------------------------------------- the run
def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON."""
    cmd = [sys.executable, "-m", "unimoe.bench.data", "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def run(sizes: list[int], workers: list[int], old_max: int, batches: int, batch_size: int, shard_items: int,
        start_method: str, root: Path | None, keep: bool, datamodule: bool, max_tokens: int,
        log=lambda msg: None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="unimoe-bench-data-", dir=root))
    results: dict[str, Any] = {"benchmark": "data_index", "host": platform.node(), "cpus": os.cpu_count(),
                               "start_method": start_method, "batches": batches, "batch_size": batch_size,
                               "sizes": {}}
    try:
        for n in sizes:
            log(f"building {n:,} synthetic examples in {tmp}")
            t0 = time.perf_counter()
            folders = build_folders(tmp, n, shard_items, old=n <= old_max)
            entry: dict[str, Any] = {"build_s": round(time.perf_counter() - t0, 1), **{k: v for k, v in folders.items()
                                                                                       if k not in ("new", "old")},
                                     "runs": []}
            for w in workers:
                for fmt in ("old", "new"):
                    if fmt not in folders:
                        continue
                    log(f"  {fmt} index, {n:,} examples, {w} workers")
                    entry["runs"].append(_child({"fmt": fmt, "folder": folders[fmt], "workers": w, "batches": batches,
                                                 "batch_size": batch_size, "start_method": start_method}))
            if "old" in folders:
                log(f"  converting the {n:,}-example index.json")
                entry["convert"] = _child({"convert": folders["old"]})
            if datamodule:
                log(f"  datamodule setup on {n:,} examples")
                entry["datamodule"] = _child({"datamodule": folders["new"], "max_tokens": max_tokens})
            entry["ratios_old_over_new"] = _ratios(entry["runs"])
            results["sizes"][str(n)] = entry
            for fmt in ("old", "new"):
                if fmt in folders:
                    shutil.rmtree(folders[fmt], ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results["flatness_new"] = _flatness(results["sizes"])
    results["summary"] = _summary(results["sizes"])
    return results


def _ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    by = {(r["format"], r["workers"]): r for r in runs}
    for (fmt, w), new in by.items():
        old = by.get(("old", w))
        if fmt != "new" or old is None:
            continue
        out[f"workers={w}"] = {
            "open_time": _ratio(old["open_s"], new["open_s"]),
            "main_pss": _ratio(old["main"]["pss_mb"], new["main"]["pss_mb"]),
            "worker_uss_max": _ratio(old["worker_uss_mb_max"], new["worker_uss_mb_max"]) if w else None,
            "total_pss": _ratio(old["total_pss_mb"], new["total_pss_mb"]),
        }
    return out


def _flatness(sizes: dict[str, Any]) -> dict[str, Any]:
    """New index: how per-process memory moves between the smallest and the largest size."""
    keys = sorted(sizes, key=int)
    if len(keys) < 2:
        return {}
    lo, hi = sizes[keys[0]], sizes[keys[-1]]
    out = {"from_examples": int(keys[0]), "to_examples": int(keys[-1])}
    for a in lo["runs"]:
        b = next((r for r in hi["runs"] if r["format"] == "new" and r["workers"] == a["workers"]), None)
        if a["format"] != "new" or b is None:
            continue
        out[f"workers={a['workers']}"] = {
            "main_uss_mb": [a["main"]["uss_mb"], b["main"]["uss_mb"]],
            "main_pss_mb": [a["main"]["pss_mb"], b["main"]["pss_mb"]],
            "main_pss_anon_mb": [a["main"]["pss_anon_mb"], b["main"]["pss_anon_mb"]],
            "index_anon_mb": [a["index_anon_mb"], b["index_anon_mb"]],
            "worker_uss_mb_max": [a["worker_uss_mb_max"], b["worker_uss_mb_max"]],
            "worker_pss_mb_max": [a["worker_pss_mb_max"], b["worker_pss_mb_max"]],
            "open_s": [a["open_s"], b["open_s"]],
        }
    return out


def _summary(sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per run: the numbers a reader compares (MiB, seconds)."""
    rows = []
    for n, entry in sorted(sizes.items(), key=lambda kv: int(kv[0])):
        for r in entry["runs"]:
            rows.append({"examples": int(n), "format": r["format"], "workers": r["workers"], "open_s": r["open_s"],
                         "index_anon_mb": r["index_anon_mb"], "main_uss_mb": r["main"]["uss_mb"],
                         "main_pss_mb": r["main"]["pss_mb"], "worker_uss_mb_max": r["worker_uss_mb_max"],
                         "worker_pss_mb_max": r["worker_pss_mb_max"], "total_pss_mb": r["total_pss_mb"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unimoe bench data", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000], help="examples per index")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="DataLoader worker counts")
    parser.add_argument("--old-max", type=int, default=1_000_000,
                        help="largest size also measured with the old index.json (it costs ~1 GB per process per 1M)")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-items", type=int, default=4096, help="examples in the one real shard")
    parser.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default="fork")
    parser.add_argument("--datamodule", action="store_true", help="also time UniMoEDataModule setup on the new index")
    parser.add_argument("--max-tokens", type=int, default=32768, help="token budget of the --datamodule plan")
    parser.add_argument("--root", default=None, help="folder for the synthetic data (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic folders")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        if "convert" in spec:
            from unimoe.data.index import convert_legacy_index

            t0 = time.perf_counter()
            index = convert_legacy_index(spec["convert"], in_memory_fallback=False)
            print(json.dumps({"examples": len(index), "convert_s": round(time.perf_counter() - t0, 2)}))
        elif "datamodule" in spec:
            print(json.dumps(measure_datamodule(spec["datamodule"], spec["max_tokens"])))
        else:
            print(json.dumps(measure(**spec)))
        return 0
    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run(args.sizes, args.workers, args.old_max, args.batches, args.batch_size, args.shard_items,
                 args.start_method, Path(args.root) if args.root else None, args.keep, args.datamodule,
                 args.max_tokens, log=log)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
