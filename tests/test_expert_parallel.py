"""Expert-parallel dispatch on real gloo processes against the single-process layer.

Each rank routes its own tokens; the routed experts are split over the ranks. Outputs,
routing and every gradient must equal a single-process layer holding all experts, run on
each rank's tokens (expert gradients: summed over the ranks' tokens, as they arrive).
"""

from __future__ import annotations

import pytest
import torch

from ep_workers import (  # noqa: E402  (tests/helpers on sys.path, see conftest)
    HIDDEN, all_null_layer, global_inputs, layer_forward_backward, moe_config, null_only_tokens_are_not_sent,
)
from spawn_helpers import run_ranks  # noqa: E402

from unimoe.moe import build_moe_layer
from unimoe.moe.dispatch import group_slots
from unimoe.moe.expert_parallel import ExpertParallelError, check_expert_parallel


def reference(world: int, routed: int) -> dict:
    torch.manual_seed(0)
    layer = build_moe_layer(HIDDEN, moe_config(routed))
    xs, gs = global_inputs(world)
    out = {"y": [], "x_grad": [], "router_grad": [], "shared_grad": [], "selected": [], "tokens_per_expert": []}
    for r in range(world):  # per-rank parts: router / shared grads are each rank's own
        layer.zero_grad()
        x = xs[r].clone().requires_grad_()
        y, info = layer(x.unsqueeze(0))
        (y[0] * gs[r]).sum().backward()
        out["y"].append(y[0].detach())
        out["x_grad"].append(x.grad)
        out["router_grad"].append(layer.router.gate.weight.grad.clone())
        out["shared_grad"].append(layer.shared_experts.gate_up_proj.grad.clone())
        out["selected"].append(layer.router(xs[r]).selected)
        out["tokens_per_expert"].append(info.tokens_per_expert)
    layer.zero_grad()
    total = sum((layer(xs[r].unsqueeze(0))[0][0] * gs[r]).sum() for r in range(world))
    total.backward()
    out["expert_grads"] = {n: p.grad for n, p in layer.experts[0].named_parameters()}
    return out


@pytest.mark.parametrize("world,routed", [(2, 4), (4, 4)])
def test_expert_parallel_layer_equals_single_process(world, routed):
    ranks = run_ranks(layer_forward_backward, world, routed)
    ref = reference(world, routed)
    per_rank = routed // world
    for r, got in enumerate(ranks):
        assert torch.equal(got["selected"], ref["selected"][r])  # every token picks the same experts
        assert torch.equal(got["tokens_per_expert"], ref["tokens_per_expert"][r])
        torch.testing.assert_close(got["y"], ref["y"][r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["x_grad"], ref["x_grad"][r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["router_grad"], ref["router_grad"][r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["shared_grad"], ref["shared_grad"][r], rtol=1e-5, atol=1e-6)
        for name, grad in got["expert_grads"].items():  # this rank's experts, from every rank's tokens
            torch.testing.assert_close(grad, ref["expert_grads"][name][r * per_rank:(r + 1) * per_rank],
                                       rtol=1e-5, atol=1e-6)
        real_pairs = int(ref["selected"][r][:, :routed].sum())
        assert got["sent_rows"] == real_pairs  # one row per (token, real expert) pair: dropless, unpadded
    assert sum(g["received_rows"] for g in ranks) == sum(g["sent_rows"] for g in ranks)


def test_null_only_tokens_never_leave_their_rank():
    ranks = run_ranks(null_only_tokens_are_not_sent, 2)
    for got in ranks:
        torch.testing.assert_close(got["y"], got["y_ref"], rtol=1e-5, atol=1e-6)
        sent = set(got["sent_token_ids"].tolist())
        assert 0 not in sent and 3 not in sent  # the null-only tokens
        assert sent == {1, 2, 4, 5}
        assert got["sent_rows"] == got["real_pairs"] == 8
    assert ranks[0]["received_rows"] + ranks[1]["received_rows"] == 16
    assert run_ranks(all_null_layer, 2) == [True, True]


def test_expert_count_not_divisible_by_ep_size_is_refused():
    layer = build_moe_layer(HIDDEN, moe_config(6))
    with pytest.raises(ExpertParallelError, match="6 experts, not divisible by expert_parallel_size=4"):
        check_expert_parallel(group_slots(layer.experts), 4)
    check_expert_parallel(group_slots(layer.experts), 3)  # 6 / 3 is fine


def test_expert_groups_without_ep_support_are_refused():
    from unimoe.moe.experts import ExpertGroup

    class Opaque(ExpertGroup):
        def forward(self, x, counts):
            return x

    with pytest.raises(ExpertParallelError, match="Opaque .* does not support expert parallelism"):
        check_expert_parallel(group_slots([Opaque(4)]), 2)
