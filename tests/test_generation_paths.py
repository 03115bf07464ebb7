"""Every decoding path gives the same tokens: static vs dynamic vs no cache, small-batch vs grouped vs
dense MoE expert paths, compiled vs eager; at temperature 0 and with a fixed seed while sampling.
The no-cache path (the whole sequence recomputed each step, checked against a naive loop in
test_generation_decode) is the independent reference."""

from __future__ import annotations

import pytest
import torch
from generation_helpers import prompts, tiny_model

from unimoe.generation import GenerationSettings, decode
from unimoe.generation.compiled import CompileError, check_toolchain
from unimoe.generation.sampling import CodebookSampling

pytestmark = pytest.mark.usefixtures("single_thread")

GREEDY = CodebookSampling.from_settings(GenerationSettings(temperature=0.0), 4)
SAMPLED = CodebookSampling.from_settings(GenerationSettings(temperature=[0.0, 1.1, 1.0, 0.9], top_k=6, top_p=0.9), 4)


def run(model, sampling, **kwargs):
    cond, uncond = prompts(model)
    return decode(model, cond, uncond, sampling, max_frames=[14, 9, 11], cfg_scale=2.5, seeds=[5, 6, 7], **kwargs)


def assert_same(a, b):
    assert [s.shape for s in a.segments] == [s.shape for s in b.segments]
    assert all(torch.equal(x, y) for x, y in zip(a.segments, b.segments))
    assert a.stop_reasons == b.stop_reasons
    if a.expert_sums is not None:
        assert torch.equal(a.expert_tokens, b.expert_tokens)
        assert torch.allclose(a.expert_sums, b.expert_sums)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_static_dynamic_and_no_cache_agree(preset, sampling):
    model = tiny_model(preset, seed=7)
    static = run(model, sampling)
    assert static.cache == "static"
    assert_same(static, run(model, sampling, cache="dynamic"))
    assert_same(static, run(model, sampling, use_cache=False))
    assert_same(static, run(model, sampling, check_every=4))  # finished rows wait, masked, for the next check


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_moe_expert_paths_agree(sampling):
    model = tiny_model("tiny-moe", seed=8)
    results = {}
    for path in ("grouped", "small_batch", "dense"):
        for block in model.blocks:
            block.ffn.dispatch = path
        results[path] = run(model, sampling)
    for block in model.blocks:
        block.ffn.dispatch = "auto"
    assert_same(results["grouped"], results["small_batch"])
    assert_same(results["grouped"], results["dense"])
    assert_same(results["grouped"], run(model, sampling))  # auto picks small_batch at 6 rows


def test_a_request_does_not_depend_on_its_batch_when_sampling():
    model = tiny_model("tiny-moe", seed=9)
    cond, uncond = prompts(model)
    together = decode(model, cond, uncond, SAMPLED, max_frames=[12] * 3, cfg_scale=2.0, seeds=[1, 2, 3])
    alone = decode(model, cond[2:], uncond[2:], SAMPLED, max_frames=[12], cfg_scale=2.0, seeds=[3])
    assert torch.equal(alone.segments[0], together.segments[2])
    other_seed = decode(model, cond[2:], uncond[2:], SAMPLED, max_frames=[12], cfg_scale=2.0, seeds=[4])
    assert not torch.equal(other_seed.segments[0], together.segments[2])


def test_compiled_step_matches_eager():
    """One compile (about 15 s on two CPU cores): greedy and sampled codebooks, MoE rows, CFG, ragged prompts."""
    model = tiny_model("tiny-moe", seed=10)
    eager = run(model, SAMPLED)
    compiled = run(model, SAMPLED, compile=True)
    assert compiled.compiled and not eager.compiled
    assert_same(eager, compiled)
    again = run(model, SAMPLED, compile=True)  # a second call reuses the compiled step
    assert_same(eager, again)


def test_compile_errors_are_clear(monkeypatch):
    model = tiny_model("tiny", seed=1)
    with pytest.raises(ValueError, match="static KV cache"):
        run(model, GREEDY, compile=True, cache="dynamic")
    with pytest.raises(ValueError, match="keep_trace"):
        run(model, GREEDY, compile=True, keep_trace=True)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("unimoe.generation.compiled.shutil.which", lambda name: None)
    with pytest.raises(CompileError, match="C\\+\\+ compiler.*without --compile"):
        check_toolchain(torch.device("cpu"))
    with pytest.raises(CompileError, match="without --compile"):
        run(model, GREEDY, compile=True)
