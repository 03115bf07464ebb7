"""Sampling rules against plain per-codebook references written here: temperature, top-k and
top-p per codebook, the special-token rules (EOS only as the argmax of the deciding codebook),
guidance, and per-request random streams."""

from __future__ import annotations

import math

import pytest
import torch

from unimoe.generation.sampling import CodebookSampling, filter_logits, guide, mask_specials, sample
from unimoe.generation.settings import GenerationSettings, SettingsError
from unimoe.model.delay import CodecSpecials

pytestmark = pytest.mark.usefixtures("single_thread")

SP = CodecSpecials(16)  # eos 16, pad 17, bos 18; V = 19


def naive_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The distribution one codebook is drawn from, computed token by token."""
    V = len(logits)
    scaled = [x / temperature for x in logits]
    order = sorted(range(V), key=lambda i: -scaled[i])
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


def params(temperature, top_k, top_p) -> CodebookSampling:
    return CodebookSampling(torch.tensor(temperature, dtype=torch.float32), torch.tensor(top_k),
                            torch.tensor(top_p, dtype=torch.float32))


def test_filter_matches_naive_per_codebook():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 19) * 2
    p = params([1.0, 0.7, 1.5, 1.0], [0, 5, 3, 0], [1.0, 0.9, 0.5, 0.3])
    probs = filter_logits(logits, p).softmax(-1)
    for n in range(5):
        for c in range(4):
            ref = naive_distribution(logits[n, c].tolist(), float(p.temperature[c]), int(p.top_k[c]), float(p.top_p[c]))
            assert torch.allclose(probs[n, c], torch.tensor(ref), atol=1e-6), (n, c)
            assert set((probs[n, c] > 0).nonzero().flatten().tolist()) == {i for i, q in enumerate(ref) if q > 0}


def test_sampled_frequencies_match_the_distribution():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 19).expand(40000, 2, 19)
    p = params([1.0, 0.8], [6, 0], [1.0, 0.8])
    tokens = sample(logits, p)  # [N, 2]
    for c in range(2):
        ref = torch.tensor(naive_distribution(logits[0, c].tolist(), float(p.temperature[c]), int(p.top_k[c]),
                                              float(p.top_p[c])))
        freq = torch.bincount(tokens[:, c], minlength=19).float() / tokens.shape[0]
        assert bool((freq[ref == 0] == 0).all()), "a filtered-out token was drawn"
        assert float((freq - ref).abs().max()) < 0.015  # ~6 standard deviations at 40k draws


def test_greedy_codebooks_take_the_argmax():
    torch.manual_seed(2)
    logits = torch.randn(7, 4, 19)
    tokens = sample(logits, params([0.0, 1.0, 0.0, 1.0], [0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(tokens[:, 0], logits[:, 0].argmax(-1)) and torch.equal(tokens[:, 2], logits[:, 2].argmax(-1))


def test_eos_only_in_deciding_codebook_and_only_as_argmax():
    logits = torch.zeros(3, 4, 19)
    logits[:, :, 3] = 5.0
    logits[:, :, SP.eos] = 4.0  # EOS second best everywhere
    logits[1, 0, SP.eos] = 9.0  # row 1: EOS is codebook 0's argmax
    logits[2, 0, SP.eos] = 9.0  # row 2 too, but EOS not allowed yet
    logits[:, :, SP.bos] = logits[:, :, SP.pad] = 20.0  # never drawn, however likely
    masked = mask_specials(logits, SP, eos_codebook=0, allow_eos=torch.tensor([True, True, False]))
    assert bool(torch.isinf(masked[:, :, [SP.bos, SP.pad]]).all())
    assert masked[1, 0, SP.eos] == 9.0
    assert bool(torch.isinf(masked[0, :, SP.eos]).all()) and bool(torch.isinf(masked[2, :, SP.eos]).all())
    assert bool(torch.isinf(masked[:, 1:, SP.eos]).all())  # other codebooks never choose the end
    tokens = sample(masked.expand(3, 4, 19).repeat(300, 1, 1), params([1.0] * 4, [0] * 4, [1.0] * 4))
    assert not bool((tokens[:, 1:] == SP.eos).any()) and not bool((tokens >= SP.pad).any())
    rows = torch.arange(tokens.shape[0]) % 3
    assert not bool((tokens[rows != 1, 0] == SP.eos).any())
    assert bool((tokens[rows == 1, 0] == SP.eos).float().mean() > 0.9)  # softmax(9 vs 5): ~98%


def test_guidance_formula():
    cond, uncond = torch.randn(2, 4, 19), torch.randn(2, 4, 19)
    assert torch.allclose(guide(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.allclose(guide(cond, uncond, 1.0), cond)
    assert guide(cond, None, 3.0) is cond


def test_per_request_generators_make_draws_batch_independent():
    torch.manual_seed(3)
    logits = torch.randn(3, 4, 19)
    p = params([1.0] * 4, [0] * 4, [1.0] * 4)
    together = sample(logits, p, [torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = sample(logits[1:2], p, [torch.Generator().manual_seed(11)])
    assert torch.equal(together[1], alone[0])
    again = sample(logits, p, [torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    assert torch.equal(together, again)


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
