"""Aux losses against closed forms; micro-batch accumulation == one big batch; schedule."""

from __future__ import annotations

import math

import pytest
import torch

from unimoe.moe import (
    AuxLossSchedule,
    MoEConfig,
    Router,
    build_moe_layer,
    load_balance_loss,
    mean_over_layers,
)
from unimoe.moe.layer import MoELayer
from unimoe.moe.experts import NullExperts, SwiGLUExperts


class FixedRouter(Router):
    """Routes by a hand-written table (test only): token t uses experts ROUTES[t]."""

    def __init__(self, routes: list[list[int]], **kw):
        super().__init__(**kw)
        self.routes = routes

    def select(self, logits, probs):
        sel = torch.zeros_like(probs, dtype=torch.bool)
        for t, experts in enumerate(self.routes):
            sel[t, experts] = True
        kept = probs * sel
        return sel, kept / kept.sum(-1, keepdim=True)


def test_load_balance_matches_closed_form_on_hand_made_routing():
    torch.manual_seed(0)
    routes = [[0], [0, 1], [0, 3], [3], [2, 0, 1]]  # expert 3 is the null expert
    mask = [True, True, True, True, False]  # the last token is padding
    router = FixedRouter(routes, hidden_size=8, num_experts=4, jitter=0.0)
    layer = MoELayer(router=router, experts=[SwiGLUExperts(8, 8, 3), NullExperts(1)])
    x = torch.randn(1, 5, 8)
    _, info = layer(x, torch.tensor([mask]))
    probs = (x[0] @ router.gate.weight.T).softmax(-1).detach()
    # by hand: pairs of real tokens: e0 x3, e1 x1, e3 x2 -> 6 pairs; P_e = mean prob over 4 real tokens
    f = [3 / 6, 1 / 6, 0.0, 2 / 6]
    p_mean = probs[:4].mean(0).tolist()
    expected = 4 * sum(fi * pi for fi, pi in zip(f, p_mean))
    assert math.isclose(float(info.load_balance.detach()), expected, rel_tol=1e-6)
    assert info.tokens_per_expert.tolist() == [3, 1, 0, 2]
    assert info.active_real_hist.tolist() == [1, 2, 1, 0]  # token 3 used only the null expert
    # balanced routing with uniform probabilities gives exactly 1
    assert math.isclose(float(load_balance_loss(torch.tensor([5, 5, 5, 5]), torch.full((4,), 2.5), torch.tensor(10))), 1.0)
    # all mass on one expert with all its tokens gives E
    assert math.isclose(float(load_balance_loss(torch.tensor([7, 0, 0]), torch.tensor([7.0, 0, 0]), torch.tensor(7))), 3.0)


def test_z_loss_and_entropy_closed_form():
    torch.manual_seed(1)
    layer = build_moe_layer(8, MoEConfig(num_routed_experts=3, routed_intermediate_size=8, num_null_experts=1,
                                         num_shared_experts=2, shared_intermediate_size=8,
                                         router={"name": "top_p", "jitter": 0.0}))
    x = torch.randn(1, 4, 8)
    _, info = layer(x)
    logits = (x[0] @ layer.router.gate.weight.T).double()  # [4, 4 dynamic + 2 shared]
    z = [math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()]
    ent = []
    for row in logits[:, :4].tolist():
        ps = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
        ent.append(-sum(p * math.log(p) for p in ps))
    assert math.isclose(float(info.z_loss.detach()), sum(z) / 4, rel_tol=1e-5)
    assert math.isclose(float(info.entropy.detach()), sum(ent) / 4, rel_tol=1e-5)
    assert math.isclose(float(info.router_entropy), sum(ent) / 4, rel_tol=1e-5)


def test_global_batch_balance_from_summed_counts_equals_the_big_batch():
    """Per-micro-batch losses with counts summed over micro-batches add up to the big batch's loss.

    ``load_balance_loss(global_counts, info.prob_sum, info.num_tokens)`` weighted by each
    micro-batch's token share is the global-batch balance (the seam for gradient accumulation
    and expert parallelism): same value and same router gradient as one forward on the concatenation.
    """
    torch.manual_seed(2)
    cfg = MoEConfig(num_routed_experts=4, routed_intermediate_size=8, num_null_experts=1, num_shared_experts=1,
                    shared_intermediate_size=8, router={"name": "top_p", "top_p": 0.6, "jitter": 0.0})
    layer = build_moe_layer(8, cfg)
    with torch.no_grad():
        layer.router.gate.weight.mul_(3)
    x = torch.randn(4, 6, 8)
    mask = torch.rand(4, 6) > 0.25
    _, big = layer(x, mask)
    g_big = torch.autograd.grad(big.load_balance, [layer.router.gate.weight])[0]
    _, a = layer(x[:2], mask[:2])
    _, b = layer(x[2:], mask[2:])
    counts = a.tokens_per_expert + b.tokens_per_expert
    assert torch.equal(counts, big.tokens_per_expert)
    total = big.num_tokens.float()
    merged = sum(load_balance_loss(counts, i.prob_sum, i.num_tokens) * (i.num_tokens.float() / total) for i in (a, b))
    g_merged = torch.autograd.grad(merged, [layer.router.gate.weight])[0]
    torch.testing.assert_close(merged, big.load_balance)
    torch.testing.assert_close(g_merged, g_big)
    # closed form of one micro-batch's term: E * sum_e f_e(global) * mean_p_e(micro-batch)
    f = counts.float() / counts.sum()
    expected = a.num_experts * (f * a.prob_sum / a.num_tokens).sum()
    torch.testing.assert_close(load_balance_loss(counts, a.prob_sum, a.num_tokens), expected)


def test_mean_over_layers_skips_dense_layers_and_config_weights_once():
    torch.manual_seed(3)
    layer = build_moe_layer(8, MoEConfig(num_routed_experts=2, routed_intermediate_size=8, num_shared_experts=0, num_null_experts=0,
                                         router={"name": "top_k", "top_k": 1, "jitter": 0.0}))
    _, i1 = layer(torch.randn(1, 5, 8))
    _, i2 = layer(torch.randn(1, 5, 8))
    mean = mean_over_layers([i1, None, i2])
    torch.testing.assert_close(mean.load_balance, (i1.load_balance + i2.load_balance) / 2)
    torch.testing.assert_close(mean.z_loss, (i1.z_loss + i2.z_loss) / 2)
    assert float(mean.mean_active_real) == 1.0  # top-1 over 2 real experts, no null
    zero = mean_over_layers([None, None])
    assert float(zero.load_balance) == 0.0
    cfg = MoEConfig(z_loss_coef=0.1, entropy_loss_coef=0.2, load_balance=AuxLossSchedule(0.02, 0.0, 100))
    total = cfg.aux_loss([i1, None, i2], step=50)
    torch.testing.assert_close(total, 0.01 * mean.load_balance + 0.1 * mean.z_loss + 0.2 * mean.entropy)
    # a stage's own schedule replaces the config's load-balance weight (and only that weight)
    staged = cfg.aux_loss([i1, None, i2], step=50, schedule=AuxLossSchedule(0.5, 0.5, 1))
    torch.testing.assert_close(staged, 0.5 * mean.load_balance + 0.1 * mean.z_loss + 0.2 * mean.entropy)


def test_schedule_endpoints_midpoint_and_resume_purity():
    s = AuxLossSchedule()  # paper: 0.025 -> 0.001 over 10k steps
    assert s.weight(0) == pytest.approx(0.025)
    assert s.weight(5_000) == pytest.approx(0.013)
    assert s.weight(10_000) == pytest.approx(0.001)
    assert s.weight(50_000) == pytest.approx(0.001)
    assert s.weight(2_500) == pytest.approx(0.025 - 0.024 * 0.25)
    assert [AuxLossSchedule().weight(k) for k in (7, 3, 7)] == [s.weight(7), s.weight(3), s.weight(7)]
    assert AuxLossSchedule(0.5, 0.1, 0).weight(0) == 0.1
    with pytest.raises(ValueError, match="steps"):
        AuxLossSchedule(steps=-1)
    with pytest.raises(ValueError, match="start"):
        AuxLossSchedule(start=-0.1)
    with pytest.raises(ValueError, match="step"):
        s.weight(-1)
