"""Smoke test of the generation benchmark on a tiny model: it runs the real decoding loop in all
three variants, the cached and recomputed variants agree, and the JSON has every field.
Speed itself is never asserted."""

from __future__ import annotations

import json

import pytest

from unimoe.bench.generate import GenerateBenchConfig, run
from unimoe.commands.bench import BENCHMARKS, main

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--preset", "tiny-moe", "--layers", "0", "--frames", "5", "--requests", "2", "--repeats", "1",
        "--warmup", "0", "--low-top-p", "0.2", "--device", "cpu"]


def test_bench_generate_json(capsys):
    assert "generate" in BENCHMARKS
    assert main(["generate", "--json", *TINY]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("variants", "cache_speedup", "low_top_p_speedup", "activated_experts_per_token", "model",
                "prompt_lengths", "frame_rate_assumed", "device", "threads"):
        assert key in result, key
    assert set(result["variants"]) == {"cache", "no_cache", "cache_low_top_p"}
    assert result["cache_matches_recompute"] == "2/2 requests token-identical"
    assert result["rows"] == 4 and result["frames_per_request"] == 5
    experts = result["activated_experts_per_token"]
    assert set(experts) == {"0.7", "0.2"} and experts["0.2"] < experts["0.7"]
    cache = result["variants"]["cache"]
    assert cache["real_time_factor"] == pytest.approx(cache["seconds"] / (2 * 5 / 50.0), rel=1e-2)


def test_bench_generate_needs_moe():
    with pytest.raises(ValueError, match="dense"):
        run(GenerateBenchConfig(preset="tiny", layers=0, frames=2, requests=1, repeats=1, warmup=0))
