"""The delay pattern against a plain per-element implementation, and its exact round trip."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unimoe.model.delay import (
    CodecSpecials,
    apply_delay,
    delayed_segment,
    forced_tokens,
    revert_delay,
    segment_to_codes,
)

K = 16
SP = CodecSpecials(K)


def naive_delay(codes: list[list[int]], delays: list[int], bos: int, pad: int) -> list[list[int]]:
    T = len(codes[0])
    D = max(delays)
    out = []
    for k, row in enumerate(codes):
        new = []
        for t in range(T + D):
            s = t - delays[k]
            new.append(bos if s < 0 else (row[s] if s < T else pad))
        out.append(new)
    return out


@st.composite
def codes_and_delays(draw):
    C = draw(st.integers(1, 5))
    T = draw(st.integers(0, 12))
    delays = draw(st.lists(st.integers(0, 6), min_size=C, max_size=C))
    codes = draw(st.lists(st.lists(st.integers(0, K - 1), min_size=T, max_size=T), min_size=C, max_size=C))
    return codes, delays


@settings(max_examples=150, deadline=None)
@given(codes_and_delays())
def test_apply_matches_naive_and_round_trips(case):
    codes, delays = case
    x = torch.tensor(codes, dtype=torch.long).reshape(len(codes), -1)
    y = apply_delay(x, delays, bos=SP.bos, pad=SP.pad)
    assert y.tolist() == naive_delay(codes, delays, SP.bos, SP.pad)
    assert torch.equal(revert_delay(y, delays), x)
    # batched form gives the same per row
    xb = torch.stack([x, x.flip(-1)])
    yb = apply_delay(xb, delays, bos=SP.bos, pad=SP.pad)
    assert torch.equal(yb[0], y) and torch.equal(revert_delay(yb, delays), xb)


@settings(max_examples=100, deadline=None)
@given(codes_and_delays())
def test_segment_round_trip(case):
    codes, delays = case
    x = torch.tensor(codes, dtype=torch.long).reshape(len(codes), -1)
    seg = delayed_segment(x, delays, SP)
    T = x.shape[1]
    assert seg.shape == (len(codes), T + 2 + max(delays))
    assert (seg[:, 0] == SP.bos).all()  # the audio BOS frame
    # each codebook: BOS x (d_k + 1), its codes, one EOS, PAD to the end
    for k, d in enumerate(delays):
        expect = [SP.bos] * (d + 1) + codes[k] + [SP.eos] + [SP.pad] * (max(delays) - d)
        assert seg[k].tolist() == expect
    assert torch.equal(segment_to_codes(seg, delays, SP), x)


def test_paper_pattern_shape():
    delays = [0] + list(range(8, 19))
    x = torch.randint(0, 1024, (12, 50))
    sp = CodecSpecials(1024)
    y = apply_delay(x, delays, bos=sp.bos, pad=sp.pad)
    assert y.shape == (12, 68)
    assert y[1, 8].item() == x[1, 0].item() and y[11, 18 + 49].item() == x[11, 49].item()
    assert (sp.eos, sp.pad, sp.bos, sp.vocab_size) == (1024, 1025, 1026, 1027)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=4), st.integers(0, 6), st.integers(1, 5))
def test_forced_tokens_agree_with_the_segment(delays, T, extra):
    """Everything the segment holds that is not a real code is exactly what forcing dictates."""
    codes = torch.randint(0, K, (len(delays), T))
    seg = delayed_segment(codes, delays, SP)  # EOS frame index is T + 1
    for step in range(1, seg.shape[1]):
        mask, values = forced_tokens(torch.tensor([step]), torch.tensor([T + 1]), delays, SP)
        special = seg[:, step] >= K
        assert torch.equal(mask[0], special)
        assert torch.equal(values[0][special], seg[:, step][special])
    # while no EOS was decided, only the BOS run is forced
    mask, values = forced_tokens(torch.tensor([T + extra]), torch.tensor([-1]), delays, SP)
    assert torch.equal(mask[0], torch.tensor([T + extra <= d for d in delays]))
