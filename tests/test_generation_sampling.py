"""The sampling kernel against plain per-codebook references written here: temperature, top-k and
top-p per codebook, the special-token rules (EOS only as the argmax of the deciding codebook),
guidance, draw frequencies, and the counter-based per-request random streams."""

from __future__ import annotations

import math

import pytest
import torch

from unimoe.generation.sampling import CodebookSampling, FrameSampler, counter_uniforms, fold_seed, guide
from unimoe.generation.settings import GenerationSettings, SettingsError
from unimoe.model.delay import CodecSpecials

pytestmark = pytest.mark.usefixtures("single_thread")

SP = CodecSpecials(16)  # eos 16, pad 17, bos 18; V = 19
NEG = float("-inf")


def params(temperature, top_k, top_p) -> CodebookSampling:
    return CodebookSampling(torch.tensor(temperature, dtype=torch.float32), torch.tensor(top_k),
                            torch.tensor(top_p, dtype=torch.float32))


def sampler(temperature, top_k, top_p, eos_codebook=0) -> FrameSampler:
    return FrameSampler(params(temperature, top_k, top_p), SP, eos_codebook, "cpu")


def naive_frame(logits: torch.Tensor, temperature, top_k, top_p, allow_eos: bool) -> list[list[float]]:
    """One row's per-codebook distributions with the special-token rules applied token by token."""
    out = []
    for c in range(logits.shape[0]):
        row = logits[c].tolist()
        row[SP.bos] = row[SP.pad] = NEG
        real_max = max(row[: SP.cardinality])
        if c != 0 or not allow_eos or not row[SP.eos] > real_max:
            row[SP.eos] = NEG
        if temperature[c] == 0:
            best = max(range(len(row)), key=lambda i: (row[i], -i))
            out.append([1.0 if i == best else 0.0 for i in range(len(row))])
        else:
            out.append(naive_distribution(row, temperature[c], top_k[c], top_p[c]))
    return out


def naive_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The distribution one codebook is drawn from, computed token by token (-inf logits never drawn)."""
    V = len(logits)
    scaled = [x / temperature for x in logits]
    order = [i for i in sorted(range(V), key=lambda i: -scaled[i]) if scaled[i] > NEG]
    kept = order[:top_k] if top_k > 0 else order
    z = sum(math.exp(scaled[i]) for i in kept)
    probs = {i: math.exp(scaled[i]) / z for i in kept}
    if top_p < 1.0:
        nucleus, mass = [], 0.0
        for i in kept:  # descending probability
            if mass >= top_p and nucleus:
                break
            nucleus.append(i)
            mass += probs[i]
        z = sum(probs[i] for i in nucleus)
        probs = {i: probs[i] / z for i in nucleus}
    return [probs.get(i, 0.0) for i in range(V)]


def test_distribution_matches_naive_per_codebook_with_the_eos_rules():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, 19) * 2
    logits[1, 0, SP.eos] = 9.0  # EOS is codebook 0's argmax in rows 1 and 2 ...
    logits[2, 0, SP.eos] = 9.0
    logits[3, 2, SP.eos] = 9.0  # ... and codebook 2's in row 3, which never ends a clip
    logits[:, :, SP.bos] = 20.0  # never drawn, however likely
    allow = torch.tensor([True, True, False, True, True, True])  # row 2: EOS not allowed yet
    temperature, top_k, top_p = [1.0, 0.7, 0.0, 1.3], [0, 5, 3, 4], [0.8, 0.9, 1.0, 0.5]
    got = sampler(temperature, top_k, top_p).distribution(logits, allow)
    for n in range(6):
        ref = naive_frame(logits[n], temperature, top_k, top_p, bool(allow[n]))
        for c in range(4):
            assert torch.allclose(got[n, c], torch.tensor(ref[c]), atol=1e-6), (n, c)
            assert set((got[n, c] > 0).nonzero().flatten().tolist()) == {i for i, q in enumerate(ref[c]) if q > 0}
    assert got[1, 0, SP.eos] > 0 and got[2, 0, SP.eos] == 0 and got[3, 2, SP.eos] == 0


def test_sampled_frequencies_match_the_distribution():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 19).expand(40000, 2, 19).clone()
    logits[:, 0, SP.eos] = logits[0, 0, : SP.cardinality].max() + 0.5  # EOS allowed and the argmax: drawable
    s = FrameSampler(params([1.0, 0.8], [6, 0], [1.0, 0.8]), SP, 0, "cpu")
    allow = torch.tensor(True)
    uniforms = counter_uniforms(torch.arange(40000), torch.tensor([7]), 2)[:, 0]  # one draw per seed
    tokens = s.sample(logits, allow, uniforms)  # [N, 2]
    ref = s.distribution(logits[:1], allow)[0]
    naive = naive_frame(logits[0], [1.0, 0.8], [6, 0], [1.0, 0.8], True)
    assert torch.allclose(ref, torch.tensor(naive), atol=1e-6)
    for c in range(2):
        freq = torch.bincount(tokens[:, c], minlength=19).float() / tokens.shape[0]
        assert bool((freq[ref[c] == 0] == 0).all()), "a filtered-out token was drawn"
        assert float((freq - ref[c]).abs().max()) < 0.015  # ~6 standard deviations at 40k draws


def test_greedy_codebooks_take_the_argmax():
    torch.manual_seed(2)
    logits = torch.randn(7, 4, 19)
    logits[3, 0, SP.eos] = 50.0  # the deciding codebook may end with EOS when it is the argmax
    uniforms = torch.rand(7, 4)
    mixed = sampler([0.0, 1.0, 0.0, 1.0], [0] * 4, [1.0] * 4).sample(logits, torch.tensor(True), uniforms)
    real_argmax = logits[..., : SP.cardinality].argmax(-1)
    assert torch.equal(mixed[:, 2], real_argmax[:, 2])
    assert int(mixed[3, 0]) == SP.eos and torch.equal(mixed[[0, 1, 2, 4, 5, 6], 0], real_argmax[[0, 1, 2, 4, 5, 6], 0])
    greedy = sampler([0.0] * 4, [0] * 4, [1.0] * 4).sample(logits, torch.tensor(False), None)
    assert torch.equal(greedy, real_argmax)  # EOS not allowed: the best real code


def test_eos_only_in_deciding_codebook_and_only_as_argmax():
    logits = torch.zeros(3, 4, 19)
    logits[:, :, 3] = 5.0
    logits[:, :, SP.eos] = 4.0  # EOS second best everywhere
    logits[1, 0, SP.eos] = 9.0  # row 1: EOS is codebook 0's argmax
    logits[2, 0, SP.eos] = 9.0  # row 2 too, but EOS not allowed yet
    logits[:, :, SP.bos] = logits[:, :, SP.pad] = 20.0  # never drawn, however likely
    rows = logits.repeat(300, 1, 1)
    allow = torch.tensor([True, True, False]).repeat(300)
    uniforms = counter_uniforms(torch.arange(rows.shape[0]), torch.tensor([0]), 4)[:, 0]
    tokens = sampler([1.0] * 4, [0] * 4, [1.0] * 4).sample(rows, allow, uniforms)
    assert not bool((tokens[:, 1:] == SP.eos).any()) and not bool((tokens >= SP.pad).any())
    which = torch.arange(tokens.shape[0]) % 3
    assert not bool((tokens[which != 1, 0] == SP.eos).any())
    assert bool((tokens[which == 1, 0] == SP.eos).float().mean() > 0.9)  # softmax(9 vs 5): ~98%


def test_guidance_formula():
    cond, uncond = torch.randn(2, 4, 19), torch.randn(2, 4, 19)
    assert torch.allclose(guide(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.allclose(guide(cond, uncond, 1.0), cond)
    assert guide(cond, None, 3.0) is cond


def test_counter_uniforms_are_per_request_and_uniform():
    seeds = torch.tensor([fold_seed(s) for s in (10, 11, 12, 2**40 + 11)])
    steps = torch.arange(500)
    u = counter_uniforms(seeds, steps, 4)  # [4, 500, 4]
    assert u.shape == (4, 500, 4) and bool(((u > 0) & (u < 1)).all())
    alone = counter_uniforms(seeds[1:2], steps[100:], 4)  # one request, a later window of steps
    assert torch.equal(alone[0], u[1, 100:])  # a function of (seed, step, codebook) only
    assert not torch.equal(u[1], u[3])  # seeds differing above 32 bits still differ
    many = counter_uniforms(torch.arange(200), torch.arange(100), 4).flatten()  # 80k values
    hist = torch.histc(many, bins=20, min=0.0, max=1.0) / many.numel()
    assert float((hist - 0.05).abs().max()) < 0.004  # ~5 standard deviations of a uniform histogram
    pairs = torch.stack([many[:-1], many[1:]])
    assert abs(float(torch.corrcoef(pairs)[0, 1])) < 0.02  # neighbours uncorrelated


def test_settings_validation_names_the_field():
    with pytest.raises(SettingsError, match="top_p"):
        GenerationSettings(top_p=0.0)
    with pytest.raises(SettingsError, match="temperature"):
        GenerationSettings(temperature=-1.0)
    with pytest.raises(SettingsError, match="router_top_p"):
        GenerationSettings(router_top_p=1.5)
    with pytest.raises(SettingsError, match="min_seconds"):
        GenerationSettings(min_seconds=5.0, max_seconds=1.0)
    with pytest.raises(SettingsError, match="top_k has 3 values"):
        GenerationSettings(top_k=[1, 2, 3]).per_codebook("top_k", 4)
    with pytest.raises(SettingsError, match="unknown generation setting"):
        GenerationSettings.from_options({"temprature": 1.0})
    s = CodebookSampling.from_settings(GenerationSettings(temperature=[0.0, 1.0, 1.0, 0.5], top_k=7), 4)
    assert s.greedy.tolist() == [True, False, False, False] and s.top_k.tolist() == [7] * 4
