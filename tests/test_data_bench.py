"""Smoke test of the data-index benchmark at a tiny size: it runs, reads the old and the new
index in fresh processes, and the synthetic folders it builds are valid shard folders."""

from __future__ import annotations

import json

import numpy as np

from unimoe.bench.data import build_folders, smaps
from unimoe.commands.bench import main
from unimoe.data.dataset import ShardDataset
from unimoe.data.index import SCHEMA, check_index, open_index


def test_synthetic_folders_are_valid_and_old_equals_new(tmp_path):
    folders = build_folders(tmp_path, 3000, shard_items=64, old=True)
    assert check_index(folders["new"]) == []
    new = open_index(folders["new"])
    old = json.loads((tmp_path / "old-3000" / "index.json").read_text())["items"]
    for name in SCHEMA:
        assert new.values(name, range(0, 3000, 97)) == [old[name][i] for i in range(0, 3000, 97)], name
    ds = ShardDataset(folders["new"], split="train")
    assert ds[5].id == ds.row(5)["id"]  # rows point at real shard items


def test_smaps_reads_this_process():
    m = smaps()
    assert m["rss_mb"] >= m["pss_mb"] > 0 and m["uss_mb"] > 0
    assert abs(m["pss_anon_mb"] + m["pss_file_mb"] - m["pss_mb"]) < 1.0


def test_bench_data_json(capsys):
    assert main(["data", "--json", "--sizes", "3000", "--workers", "0", "1", "--old-max", "3000", "--batches", "3",
                 "--batch-size", "4", "--shard-items", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    entry = result["sizes"]["3000"]
    runs = {(r["format"], r["workers"]): r for r in entry["runs"]}
    assert set(runs) == {("old", 0), ("new", 0), ("old", 1), ("new", 1)}
    assert all(r["items_read"] == 12 and r["tokens_read"] == 12 * 8 * 50 for r in runs.values())
    assert len(runs[("new", 1)]["worker_procs"]) == 1 and not runs[("new", 0)]["worker_procs"]
    assert runs[("old", 0)]["index_anon_mb"] > runs[("new", 0)]["index_anon_mb"]  # Python lists vs mapped files
    assert set(entry["ratios_old_over_new"]) == {"workers=0", "workers=1"} and entry["convert"]["examples"] == 3000
    assert np.isfinite(entry["ratios_old_over_new"]["workers=1"]["open_time"])
