"""The memory-mapped shard index: old ``index.json`` folders read the same, bad files are named,
batch plans equal the naive reference, datasets pickle without their data, resume stays exact."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_data_datamodule import MODEL, shards  # noqa: F401  (module-scoped shard fixture)
from test_data_resume import STEPS, _every_step, _fit
from unimoe.data.datamodule import UniMoEDataModule
from unimoe.data.dataset import ShardDataset
from unimoe.data.index import INDEX_DIR, SCHEMA, IndexWriter, check_index, load_columns, open_index
from unimoe.data.sampler import MixtureSampler, TokenBudgetBatchSampler
from unimoe.data.sequences import SequenceMaker
from unimoe.data.shards import SHARD_FORMAT, SHARD_VERSION, ShardError

pytestmark = pytest.mark.usefixtures("single_thread")


def legacy_copy(src: str | Path, dst: Path) -> Path:
    """A copy of a shard folder in the first format: shards + ``index.json`` (no ``index/``).

    The ``index.json`` is written the way tokenisation wrote it before the columnar index:
    one JSON object with the header fields and ``items`` as one list per column.
    """
    src = Path(src)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(INDEX_DIR))
    index = open_index(src)
    rows = [index.row(i) for i in range(len(index))]
    header = {k: index.meta[k] for k in ("codec", "config", "manifest", "shards", "skipped")}
    (dst / "index.json").write_text(json.dumps({
        "format": SHARD_FORMAT + "-index", "version": SHARD_VERSION, **header, "num_items": len(rows),
        "items": {key: [r[key] for r in rows] for key in SCHEMA},
    }, indent=1))
    return dst


@pytest.fixture(scope="module")
def legacy(shards, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("legacy")
    return {name: str(legacy_copy(d, root / name)) for name, d in shards.items()}


def _examples(ds: ShardDataset) -> list[tuple]:
    out = []
    for i in range(len(ds)):
        e = ds[i]
        out.append((e.id, e.task, e.text, e.prompt_text, e.speaker, e.split, e.duration, e.codes.tolist(),
                    None if e.prompt_codes is None else e.prompt_codes.tolist(),
                    None if e.video is None else e.video.sum().item()))
    return out


@pytest.mark.parametrize("split", [None, "train", "val"])
def test_old_and_new_folders_give_identical_datasets(shards, legacy, split, tmp_path, caplog):  # noqa: F811
    fresh = legacy_copy(shards["speech"], tmp_path / "speech")
    with caplog.at_level(logging.WARNING, logger="unimoe.data.index"):
        old = ShardDataset(fresh, split=split)
    assert "converting it once to memory-mapped columns" in caplog.text and (fresh / INDEX_DIR / "meta.json").is_file()
    new = ShardDataset(shards["speech"], split=split)
    assert len(old) == len(new) > 0
    assert [old.row(i) for i in range(len(old))] == [new.row(i) for i in range(len(new))]
    assert _examples(old) == _examples(new)
    # the rows are exactly index.json's, in its order (an independent reading of the old file)
    items = json.loads((fresh / "index.json").read_text())["items"]
    expected = [i for i in range(len(items["id"])) if split is None or items["split"][i] == split]
    assert [old.row(i)["id"] for i in range(len(old))] == [items["id"][i] for i in expected]
    assert [old.row(i)["text"] for i in range(len(old))] == [items["text"][i] for i in expected]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unimoe.data.index"):
        ShardDataset(fresh, split=split)
    assert "converting" not in caplog.text  # once


def test_old_and_new_folders_give_identical_batches(shards, legacy):  # noqa: F811
    def batches(sources, epochs=2):
        dm = UniMoEDataModule(sources=sources, model=MODEL, mix="balanced", temperature=2.0, max_tokens=700, seed=3,
                              cond_drop_prob=0.0, samples_per_epoch=30)
        dm.setup("fit")
        loader = dm.train_dataloader()
        out = []
        for epoch in range(epochs):
            loader.batch_sampler.set_epoch(epoch)
            for b in loader:
                out.append((b.audio_codes.tolist(), b.text_ids.tolist(), b.task_ids.tolist()))
        val = [b.audio_codes.tolist() for b in dm.val_dataloader()]
        return out, val

    assert batches(legacy) == batches(shards)


def test_lengths_vectorised_equal_per_row_lengths(shards):  # noqa: F811
    maker = SequenceMaker(MODEL, cond_drop_prob=0.0)
    for name in shards:
        ds = ShardDataset(shards[name], split=None)
        fresh = SequenceMaker(MODEL, cond_drop_prob=0.0)  # no memo shared with the vectorised pass
        assert maker.lengths(ds, chunk=3).tolist() == [fresh.length(ds.row(i)) for i in range(len(ds))]
        assert [len(fresh.sequence(ds[i])) for i in range(len(ds))] == maker.lengths(ds).tolist()


def test_unwritable_old_folder_is_read_in_memory(shards, tmp_path, caplog, monkeypatch):  # noqa: F811
    folder = legacy_copy(shards["music"], tmp_path / "ro")

    def refuse(self, directory, *args, **kwargs):  # what a read-only mount does to the first write
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(IndexWriter, "write", refuse)
    with caplog.at_level(logging.WARNING, logger="unimoe.data.index"):
        ds = ShardDataset(folder, split=None)
    assert "not writable" in caplog.text and "unimoe data index" in caplog.text
    assert not (folder / INDEX_DIR).exists() and not ds.parts[0].index.memory_mapped
    ref = ShardDataset(shards["music"], split=None)
    assert _examples(ds) == _examples(ref)
    assert _examples(pickle.loads(pickle.dumps(ds))) == _examples(ref)
    with pytest.raises(ShardError, match="cannot write"):
        open_index(folder, in_memory_fallback=False)


def test_rewritten_index_json_is_converted_again(shards, tmp_path):  # noqa: F811
    folder = legacy_copy(shards["music"], tmp_path / "m")
    assert len(open_index(folder)) == 8
    data = json.loads((folder / "index.json").read_text())
    for key in data["items"]:
        data["items"][key] = data["items"][key][:3]
    data["num_items"] = 3
    (folder / "index.json").write_text(json.dumps(data))  # e.g. an older unimoe re-tokenised the folder
    assert open_index(folder).values("id") == data["items"]["id"]


def _break(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" + raw[8:])
    elif how == "flip":  # same size, one byte of content changed
        path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))


@pytest.mark.parametrize("name, how, message", [
    ("text.bytes", "truncate", "truncated or was modified"),
    ("frames.npy", "truncate", "truncated or was modified"),
    ("frames.npy", "garbage", "not a readable .npy array"),
    ("meta.json", "truncate", "not valid JSON"),
    ("id.offsets.npy", "delete", "is missing"),
])
def test_corrupt_or_truncated_index_names_the_file(shards, tmp_path, name, how, message):  # noqa: F811
    folder = tmp_path / "s"
    shutil.copytree(shards["speech"], folder)
    target = folder / INDEX_DIR / name
    target.unlink() if how == "delete" else _break(target, how)
    with pytest.raises(ShardError, match=message) as err:
        ShardDataset(folder)
    assert str(target) in str(err.value) and "re-run 'unimoe tokenize'" in str(err.value)
    assert check_index(folder) and str(target) in check_index(folder)[0]


def test_flipped_byte_is_found_by_validate(shards, tmp_path):  # noqa: F811
    folder = tmp_path / "s"
    shutil.copytree(shards["speech"], folder)
    assert check_index(folder) == []
    _break(folder / INDEX_DIR / "text.bytes", "flip")
    problems = check_index(folder)
    assert any("text.bytes: SHA-256 differs" in p for p in problems)
    cmd = [sys.executable, "-m", "unimoe", "data", "validate", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "SHA-256 differs" in done.stdout


def test_data_validate_and_index_commands(shards, tmp_path):  # noqa: F811
    folder = legacy_copy(shards["speech"], tmp_path / "s")
    run = lambda *a: subprocess.run([sys.executable, "-m", "unimoe", "data", *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    done = run("index", str(folder))
    assert done.returncode == 0 and "converted from index.json" in done.stdout, done.stderr
    assert "up to date" in run("index", str(folder)).stdout
    done = run("validate", str(folder))
    assert done.returncode == 0 and "OK; 24 examples" in done.stdout and "'train': 22, 'val': 2" in done.stdout
    (folder / "index.json").write_text("{not json")
    done = run("validate", str(folder))
    assert done.returncode == 1 and "index.json is not valid JSON" in done.stdout


def test_corrupt_old_index_json_names_the_file(shards, tmp_path):  # noqa: F811
    folder = legacy_copy(shards["music"], tmp_path / "m")
    data = json.loads((folder / "index.json").read_text())
    del data["items"]["frames"]
    (folder / "index.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"index\.json: the per-example table .* missing \['frames'\]"):
        ShardDataset(folder)


def test_empty_and_null_columns_round_trip(tmp_path):
    header = {"codec": {}, "config": {}, "manifest": "m", "shards": [], "skipped": {}}
    IndexWriter().write(tmp_path / "empty", header)
    empty = load_columns(tmp_path / "empty")
    assert len(empty) == 0 and empty.split_rows("train").shape == (0,) and check_index(tmp_path / "empty") == []
    rows = [{**{k: 0 for k in SCHEMA}, "id": "é1", "task": "t2m", "split": "test", "speaker": None, "duration": 1.25,
             "text": "", "prompt_text": None, "video_size": [24, 32]},
            {**{k: 1 for k in SCHEMA}, "id": "x", "task": "tts", "split": "train", "speaker": "s", "duration": 2.0,
             "text": "日本", "prompt_text": "p", "video_size": None}]
    writer = IndexWriter()
    for r in rows:
        writer.add(r)
    writer.write(tmp_path / "two", header)
    index = load_columns(tmp_path / "two")
    assert [index.row(i) for i in range(2)] == rows
    assert index.split_rows("train").tolist() == [1] and index.split_rows("test").tolist() == [0]
    assert index.strings("text").byte_lengths().tolist() == [0, 6]


def test_dataset_pickles_without_its_index_data(shards):  # noqa: F811
    ds = ShardDataset(list(shards.values()), split="train")
    blob = pickle.dumps(ds)
    assert len(blob) < 8000  # paths and small metadata; the columns are mapped again
    again = pickle.loads(blob)
    assert _examples(again) == _examples(ds)
    assert again.parts[0].index.memory_mapped and isinstance(again.parts[0].rows, np.memmap)


def _reference_plan(order, lengths, max_tokens, boundaries, max_batch_size, oversize):
    """The token-budget cut fed one index at a time (the sampler's original algorithm)."""
    buckets, longest, batches = {}, {}, []
    for index in order:
        if index in oversize:
            continue
        length = int(lengths[index])
        b = int(np.searchsorted(boundaries, length, side="left"))
        current = buckets.setdefault(b, [])
        new_max = max(longest.get(b, 0), length)
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and ((len(current) + 1) * new_max > max_tokens or full):
            batches.append(current)
            current = buckets[b] = []
            new_max = length
        current.append(int(index))
        longest[b] = new_max
    batches.extend(buckets[b] for b in sorted(buckets) if buckets[b])
    return batches


@pytest.mark.parametrize("max_batch_size, replicas, shuffle", [(None, 1, False), (3, 1, True), (None, 3, True), (1, 2, False)])
def test_batch_plan_equals_the_one_at_a_time_reference(max_batch_size, replicas, shuffle):
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 400, 3000).astype(np.int32)
    lengths[[7, 99]] = 900  # too long: skipped
    sampler = MixtureSampler([np.arange(1000), np.arange(2000)], [0.3, 0.7], num_samples=2500,
                             offsets=[0, 1000], seed=5)
    for rank in range(replicas):
        bs = TokenBudgetBatchSampler(sampler, lengths, 800, num_buckets=6, max_batch_size=max_batch_size,
                                     shuffle=shuffle, seed=2, num_replicas=replicas, rank=rank, oversize="skip")
        for epoch in (0, 1):
            bs.set_epoch(epoch)
            ref = _reference_plan(list(sampler), lengths, 800, bs.boundaries, max_batch_size, {7, 99})
            if shuffle:
                ref = [ref[i] for i in np.random.default_rng([2, epoch, 3]).permutation(len(ref))]
            per_rank = -(-len(ref) // replicas)
            ref = (ref + [ref[i % len(ref)] for i in range(per_rank * replicas - len(ref))])[rank::replicas]
            assert list(bs) == ref and len(bs) == len(ref)
    assert bs.num_oversize == 2


def test_old_folder_run_resumes_the_exact_batch_sequence(shards, legacy, tmp_path):  # noqa: F811
    """Interrupt a run on old-format folders (converted when first opened) and resume it:
    the batches equal an uninterrupted run on the new-format folders, step for step."""
    reference, _ = _fit(shards, tmp_path / "ref", workers=0, max_steps=STEPS)
    root = tmp_path / "old"
    first, _ = _fit(legacy, root, workers=0, max_steps=9, callbacks=_every_step(root))
    assert first == reference[:9]
    ckpt = root / "step=9.ckpt"
    assert torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    resumed, _ = _fit(legacy, tmp_path / "resumed", workers=2, max_steps=STEPS, ckpt_path=ckpt)
    assert first + resumed == reference
