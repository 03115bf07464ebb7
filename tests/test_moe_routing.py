"""Property tests of routing: top-p selection, expert-count bounds, null experts, padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from unimoe.moe import MoEConfig, TopPRouter, build_moe_layer

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def small_layer(null: int = 1, shared: int = 2, gating: str = "weighted", top_p: float = 0.7, routed: int = 4):
    cfg = MoEConfig(
        num_routed_experts=routed, routed_intermediate_size=8, num_null_experts=null,
        num_shared_experts=shared, shared_intermediate_size=8, shared_gating=gating,
        router={"name": "top_p", "top_p": top_p, "jitter": 0.0},
    )
    return build_moe_layer(8, cfg).eval()


@SETTINGS
@given(
    logits=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)), elements=st.floats(-6, 6, width=32)),
    p=st.floats(0.05, 1.0),
)
def test_top_p_selects_smallest_prefix_reaching_p(logits, p):
    t, e = logits.shape
    router = TopPRouter(hidden_size=1, num_experts=e, top_p=p, jitter=0.0)
    lg = torch.from_numpy(logits)
    probs = lg.softmax(-1)
    selected, weights = router.select(lg, probs)
    pr = probs.double().numpy()
    for row in range(t):
        sel = selected[row].numpy()
        chosen, rest = pr[row][sel], pr[row][~sel]
        assert sel.sum() >= 1
        # a prefix of the sorted order: every chosen prob >= every unchosen one
        if rest.size:
            assert chosen.min() >= rest.max() - 1e-7
        # reaches p (up to fp32 rounding of the softmax) ...
        assert chosen.sum() >= p - 1e-5
        # ... and is the smallest such prefix: without its smallest member it falls short
        assert chosen.sum() - chosen.min() < p + 1e-5
        assert sel.sum() <= math.ceil(p * e - 1e-6) or sel.sum() == 1
        # weights: the probabilities renormalised over the chosen set
        expected = np.where(sel, pr[row] / chosen.sum(), 0.0)
        np.testing.assert_allclose(weights[row].double().numpy(), expected, rtol=1e-5, atol=1e-7)


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    routed=st.integers(1, 6),
    null=st.integers(0, 3),
    p=st.floats(0.1, 1.0),
    scale=st.floats(0.0, 8.0),
)
def test_real_experts_per_token_within_bounds(seed, routed, null, p, scale):
    torch.manual_seed(seed)
    layer = small_layer(null=null, top_p=p, routed=routed)
    with torch.no_grad():
        layer.router.gate.weight.mul_(scale)
    x = torch.randn(2, 5, 8)
    route = layer.router(x.reshape(-1, 8))
    real = route.selected[:, :routed].sum(-1)
    upper = math.ceil(p * (routed + null) - 1e-6)
    assert int(real.min()) >= 0 and int(real.max()) <= upper
    assert int(route.selected.sum(-1).min()) >= 1
    _, info = layer(x)
    hist = info.active_real_hist.tolist()
    assert len(hist) == routed + 1 and sum(hist) == 10
    assert all(h == 0 for k, h in enumerate(hist) if k > upper)


def plain_shared(layer, x, v):
    """Shared experts by hand: sum_s v[:, s] * SwiGLU_s(x), x [T, D], v [T, S]."""
    sh = layer.shared_experts
    out = torch.zeros_like(x)
    for s in range(sh.num_experts):
        h = torch.nn.functional.silu(x @ sh.gate_up_proj[s, 0].T) * (x @ sh.gate_up_proj[s, 1].T)
        out = out + v[:, s : s + 1] * (h @ sh.down_proj[s].T)
    return out


@SETTINGS
@given(seed=st.integers(0, 10_000), gating=st.sampled_from(["weighted", "unweighted"]), frac=st.floats(0.0, 1.0))
def test_null_only_tokens_get_exactly_the_shared_output_and_cost_nothing(seed, gating, frac):
    torch.manual_seed(seed)
    layer = small_layer(null=1, shared=2, gating=gating)
    u = torch.zeros(8)
    u[0] = 1.0
    with torch.no_grad():  # null expert (index 4) wins by a mile when x[0] > 0
        layer.router.gate.weight[4] = 60.0 * u
        if gating == "weighted":  # shared logits large too, so their weights are not ~0
            layer.router.gate.weight[5] = 59.0 * u
            layer.router.gate.weight[6] = 58.5 * u
    x = torch.randn(1, 12, 8)
    null_only = torch.rand(12) < frac
    x[0, :, 0] = torch.where(null_only, torch.rand(12) + 0.5, -torch.rand(12) - 0.5)

    rows_seen = []
    hook = layer.experts[0].register_forward_pre_hook(lambda mod, args: rows_seen.append(args[0].shape[0]))
    y, info = layer(x)
    hook.remove()
    route = layer.router(x[0])
    assert bool((route.selected[null_only, :4].sum(-1) == 0).all()), "construction: these tokens must be null-only"

    xt = x[0]
    if gating == "weighted":
        logits = xt @ layer.router.gate.weight.T  # [T, 7]
        joint = torch.stack([logits[:, 4], logits[:, 5], logits[:, 6]], -1).softmax(-1)
        v = joint[:, 1:]
    else:
        v = torch.ones(12, 2)
    expected = plain_shared(layer, xt, v)
    torch.testing.assert_close(y[0][null_only], expected[null_only], rtol=1e-6, atol=1e-6)
    # cost: the routed experts saw exactly one row per (token, real expert) pair
    assert rows_seen == [int(route.selected[:, :4].sum())]
    assert int(info.active_real_hist[0]) == int(null_only.sum())


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(0.5, 6.0))
def test_padding_changes_neither_losses_nor_statistics(seed, scale):
    torch.manual_seed(seed)
    layer = small_layer(null=1, shared=2)
    with torch.no_grad():
        layer.router.gate.weight.mul_(scale)
    x = torch.randn(2, 6, 8)
    mask = torch.rand(2, 6) > 0.4
    mask[0, 0] = True
    task = torch.randint(0, 3, (2, 6))
    x_other = torch.where(mask.unsqueeze(-1), x, 100 * torch.randn(2, 6, 8))  # padding replaced by junk
    task_other = torch.where(mask, task, 2)

    y1, i1 = layer(x, mask, task)
    y2, i2 = layer(x_other, mask, task_other)
    assert torch.equal(y1[mask], y2[mask])
    for name in ("load_balance", "z_loss", "entropy", "mean_active_real", "router_entropy"):
        torch.testing.assert_close(getattr(i1, name), getattr(i2, name), rtol=0, atol=0)
    for name in ("tokens_per_expert", "active_real_hist", "num_tokens"):
        assert torch.equal(getattr(i1, name), getattr(i2, name)), name
    assert torch.equal(i1.tokens_per_expert_by_task, i2.tokens_per_expert_by_task[: i1.tokens_per_expert_by_task.shape[0]])
    # and the statistics equal those of the real tokens alone, run without a mask
    y3, i3 = layer(x[mask].unsqueeze(0))
    torch.testing.assert_close(y3[0], y1[mask])
    assert torch.equal(i3.tokens_per_expert, i1.tokens_per_expert)
    torch.testing.assert_close(i3.load_balance, i1.load_balance)


def test_top_p_inference_override_changes_compute_and_restores():
    torch.manual_seed(0)
    layer = small_layer(null=1, shared=1, top_p=0.9)
    x = torch.randn(2, 16, 8)
    _, before = layer(x)
    layer.top_p = 0.2
    assert layer.top_p == 0.2
    _, low = layer(x)
    assert float(low.mean_active_real) < float(before.mean_active_real)
    layer.top_p = None
    assert layer.top_p == 0.9
    _, again = layer(x)
    assert torch.equal(again.tokens_per_expert, before.tokens_per_expert)
    with pytest.raises(ValueError, match="top_p"):
        layer.top_p = 1.5
    topk = build_moe_layer(8, MoEConfig(num_routed_experts=4, routed_intermediate_size=8, router={"name": "top_k", "top_k": 2}))
    assert topk.top_p is None
    with pytest.raises(TypeError, match="top-p"):
        topk.top_p = 0.5


def test_jitter_only_in_training():
    torch.manual_seed(0)
    cfg = MoEConfig(num_routed_experts=4, routed_intermediate_size=8, router={"name": "top_p", "jitter": 0.3})
    layer = build_moe_layer(8, cfg)
    x = torch.randn(64, 8)
    clean = x @ layer.router.gate.weight.T
    layer.eval()
    assert torch.equal(layer.router.compute_logits(x), clean)
    layer.train()
    noisy = layer.router.compute_logits(x)
    assert not torch.equal(noisy, clean)
    # multiplicative U(0.7, 1.3) noise on the input: logits stay within the interval's image
    ratio_bound = (x.abs() @ layer.router.gate.weight.abs().T) * 0.3 + 1e-5
    assert bool(((noisy - clean).abs() <= ratio_bound).all())
