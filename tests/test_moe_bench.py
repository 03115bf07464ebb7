"""Smoke test of the MoE benchmark (tiny shape): it runs, its baselines compute the same
function as the layer, and the JSON has every field. Speed itself is never asserted."""

from __future__ import annotations

import json

from unimoe.commands.bench import BENCHMARKS, main

TINY = ["--tokens", "96", "--hidden", "32", "--routed-intermediate", "48", "--shared-intermediate", "16",
        "--repeats", "1", "--warmup", "0"]


def test_bench_moe_json(capsys):
    assert main(["moe", "--json", *TINY]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("ours_ms", "loop_ms", "padded_ms", "ideal_ms", "efficiency", "speedup_vs_padded",
                "speedup_vs_loop", "null_saving", "device", "dtype", "shape", "routing", "timer"):
        assert key in result, key
    assert result["shape"]["tokens"] == 96 and result["dtype"] == "fp32" and result["device"] == "cpu"
    assert result["max_abs_diff_vs_ours"]["loop"] < 1e-5 and result["max_abs_diff_vs_ours"]["padded"] < 1e-5
    assert result["null_saving_rows_ratio"] < 0.6  # half of the tokens really were null-only
    routing = result["routing"]
    assert sum(routing["tokens_per_expert"][:8]) == routing["routed_pairs"]
    assert routing["max_over_mean_load"] > 1.2  # the biased router skews the loads


def test_bench_dispatch_table(capsys):
    assert "moe" in BENCHMARKS
    assert main(["nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert main([]) == 0
