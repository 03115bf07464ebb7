"""Smoke test of the generation benchmark at tiny sizes: every section runs the real decoding loop (and
the peer decoder), the JSON has the fields the docs quote, and the paths it compares agree.
Speed itself is never asserted."""

from __future__ import annotations

import json

import pytest
import torch

from unimoe.bench.generate import GenerateBenchConfig, run
from unimoe.bench.reference_decoder import ReferenceDecoder, ReferenceDecoderConfig
from unimoe.commands.bench import BENCHMARKS, main

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--frames", "6", "--cache-frames", "8", "--batch-sizes", "1,2", "--batch-frames", "4", "--moe-layers", "1",
        "--dispatch-rows", "1,16", "--repeats", "1", "--warmup", "0", "--no-compile", "--device", "cpu"]


def test_bench_generate_json(capsys):
    assert "generate" in BENCHMARKS
    assert main(["generate", "--json", *TINY]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("peer", "cache", "batch", "moe", "dispatch", "gpu", "device", "threads", "timer"):
        assert key in result, key
    peer = result["peer"]
    assert set(peer["variants"]) == {"unimoe_eager", "reference"} and "unimoe_eager" in peer["speed_vs_reference"]
    assert peer["aten_ops_per_frame"]["reference"] > 0
    assert result["cache"]["cache_matches_recompute"] == "1/1 requests token-identical"
    assert set(result["batch"]["batches"]) == {"1", "2"}
    two = result["batch"]["batches"]["2"]["eager"]
    assert two["frames_per_second"] == pytest.approx(two["requests_per_second"] * 4, rel=1e-2)
    moe = result["moe"]["variants"]
    assert moe["top_p_0.3"]["activated_experts_per_token"] < moe["top_p_0.7"]["activated_experts_per_token"]
    assert result["moe"]["budget"]["target"] == 2.0 and result["moe"]["budget"]["reached"] is not None
    assert result["dispatch"]["rows"]["1"]["auto_picks"] == "small_batch"
    assert result["dispatch"]["rows"]["16"]["auto_picks"] == "grouped"
    assert "skipped" in result["gpu"]  # no CUDA here


def test_bench_rejects_unknown_sections():
    with pytest.raises(ValueError, match="unknown"):
        run(GenerateBenchConfig(sections="peer,warp"))


def test_reference_decoder_follows_the_delay_pattern():
    """The peer decoder: greedy decoding is deterministic, codes are real codes, and its streaming
    (one step at a time with concatenated keys) equals running the whole interleaved sequence at once."""
    torch.manual_seed(0)
    cfg = ReferenceDecoderConfig(dim=32, num_layers=2, num_heads=4, n_q=3, card=16)
    model = ReferenceDecoder(cfg).eval()
    codes = model.generate(5, [0, 1, 2], temperature=0.0)
    assert codes.shape == (1, 3, 5) and bool((codes < 16).all())
    assert torch.equal(codes, model.generate(5, [0, 1, 2], temperature=0.0))
    sampled = model.generate(5, [0, 1, 2], temperature=1.0, top_k=4, generator=torch.Generator().manual_seed(1))
    assert bool((sampled < 16).all())
    with torch.no_grad():  # streaming == full forward on the interleaved sequence
        seq = torch.randint(0, 17, (1, 3, 7))
        model.reset()
        full = model(seq)
        model.reset()
        steps = torch.cat([model(seq[..., t : t + 1]) for t in range(7)], dim=2)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_bench_adaptive_on_a_checkpoint(tmp_path, tmp_path_factory):
    """Loss and decoding speed per routing setting of a (random) MoE checkpoint on real shards."""
    from generation_helpers import write_checkpoint
    from training_helpers import tiny_data

    from unimoe.bench.adaptive import AdaptiveBenchConfig
    from unimoe.bench.adaptive import run as run_adaptive

    data = tiny_data(tmp_path_factory.getbasetemp())
    ckpt = write_checkpoint(tmp_path, codec=False)
    result = run_adaptive(AdaptiveBenchConfig(ckpt=str(ckpt), shards=str(data / "shards"), top_p="0.3", budgets="1.0",
                                              requests=1, frames=5, repeats=1))
    rows = result["settings"]
    assert set(rows) == {"top_p=0.7", "top_p=0.3", "budget=1"} and result["eval_examples"] > 0
    assert rows["top_p=0.3"]["experts_per_token"] < rows["top_p=0.7"]["experts_per_token"]
    assert rows["top_p=0.7"]["speed_vs_trained"] == 1.0 and "decode_budget_error" in rows["budget=1"]
    assert all(r["audio_loss"] > 0 for r in rows.values())
    with pytest.raises(ValueError, match="no shard folders"):
        run_adaptive(AdaptiveBenchConfig(ckpt=str(ckpt), shards=str(tmp_path)))


def test_bench_names_the_first_differing_step():
    from types import SimpleNamespace

    from unimoe.bench.generate import _same

    a = torch.zeros(2, 6, dtype=torch.long)
    b = a.clone()
    b[1, 4] = 7
    result = _same(SimpleNamespace(segments=[a, a]), SimpleNamespace(segments=[a, b]))
    assert result == "1/2 requests token-identical (others first differ at step 4)"
