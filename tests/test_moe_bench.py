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


def test_bench_moe_expert_parallel_json(capsys):
    """`--ep 2`: two gloo processes; the sharded layer computes the single-process layer's function."""
    assert main(["moe", "--ep", "2", "--json", *TINY]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("single_process_ms", "ep_ms", "ep_over_single", "ep_forward_ms", "all_to_all_forward_ms",
                "all_to_all_share_forward", "rows_sent_per_rank", "rows_computed_per_rank"):
        assert key in result, key
    assert result["ep"] == 2 and result["backend"] == "gloo" and result["shape"]["experts_per_rank"] == 4
    assert result["max_abs_diff_ep_vs_single"] < 1e-5
    assert result["rows_sent_per_rank"] == result["real_pairs_per_rank"]  # one row per real pair, none for null
    assert sum(result["rows_computed_per_rank"]) == sum(result["rows_sent_per_rank"])
    assert 0 < result["all_to_all_share_forward"] <= 1


def test_bench_moe_expert_parallel_refuses_an_uneven_split(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["moe", "--ep", "3", *TINY])
    assert "--routed-experts 8 is not divisible by --ep 3" in capsys.readouterr().err
