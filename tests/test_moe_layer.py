"""The MoE layer equals a naive per-token reference, outputs and gradients.

The reference below is written plainly, token by token, from the paper's description:
gate logits, softmax over the dynamic experts, sort, take the smallest prefix reaching p
(or the top k), renormalise, optionally gate the shared experts with a softmax over
{selected dynamic} U {shared} logits, run each selected expert's SwiGLU. It shares no code
with unimoe.moe; it only reads the layer's parameter tensors.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from unimoe.moe import MoEConfig, build_moe_layer
from unimoe.moe.dispatch import dispatch

D, F_ROUTED, F_SHARED, E_ROUTED = 16, 24, 16, 4


def silu(v: torch.Tensor) -> torch.Tensor:
    return v / (1 + torch.exp(-v))


def expert_swiglu(xt, gate_up, down):
    """One expert on one token: gate_up [2, F, D], down [D, F]."""
    gate = gate_up[0] @ xt
    up = gate_up[1] @ xt
    return down @ (silu(gate) * up)


def reference(layer, x, mask, rule: str, k_or_p: float, weighted: bool):
    """Per-token reference. Returns y [T, D] and the three aux losses."""
    wg = layer.router.gate.weight  # [E + S, D]
    routed = layer.experts[0]
    num_real = routed.num_experts
    e_dyn = layer.num_experts
    shared = layer.shared_experts
    s = shared.num_experts if shared is not None else 0
    outs, counts, prob_sums, z_terms, ent_terms = [], [0] * e_dyn, [0.0] * e_dyn, [], []
    n_real = 0
    for t in range(x.shape[0]):
        xt = x[t]
        logits = [wg[i] @ xt for i in range(wg.shape[0])]
        dyn = torch.stack(logits[:e_dyn])
        probs = torch.exp(dyn) / torch.exp(dyn).sum()
        order = sorted(range(e_dyn), key=lambda i: -probs[i].item())
        if rule == "top_p":
            chosen, total = [], 0.0
            for i in order:
                chosen.append(i)
                total += probs[i].item()
                if total >= k_or_p:
                    break
        else:
            chosen = order[: int(k_or_p)]
        if not mask[t]:
            chosen = []
        y = torch.zeros(D)
        if chosen:
            norm = sum(probs[i] for i in chosen)
            mass = 1.0
            if weighted and s:
                denom = sum(torch.exp(logits[i]) for i in chosen) + sum(torch.exp(logits[e_dyn + j]) for j in range(s))
                mass = sum(torch.exp(logits[i]) for i in chosen) / denom
            for i in chosen:
                if i < num_real:  # null experts output zero
                    y = y + mass * probs[i] / norm * expert_swiglu(xt, routed.gate_up_proj[i], routed.down_proj[i])
        for j in range(s):
            if weighted:
                denom = sum(torch.exp(logits[i]) for i in chosen) + sum(torch.exp(logits[e_dyn + q]) for q in range(s))
                v = torch.exp(logits[e_dyn + j]) / denom
            else:
                v = 1.0
            y = y + v * expert_swiglu(xt, shared.gate_up_proj[j], shared.down_proj[j])
        outs.append(y)
        if mask[t]:
            n_real += 1
            for i in chosen:
                counts[i] += 1
            for i in range(e_dyn):
                prob_sums[i] = prob_sums[i] + probs[i]
            z_terms.append(torch.log(sum(torch.exp(v) for v in logits)) ** 2)
            ent_terms.append(-sum(p * torch.log(p) for p in probs))
    pairs = sum(counts)
    lb = e_dyn * sum((counts[i] / pairs) * (prob_sums[i] / n_real) for i in range(e_dyn))
    return torch.stack(outs), lb, sum(z_terms) / n_real, sum(ent_terms) / n_real, counts


CASES = [
    # rule, k_or_p, null, shared, gating, padded
    ("top_p", 0.7, 1, 2, "weighted", True),
    ("top_p", 0.7, 1, 2, "unweighted", True),
    ("top_p", 0.5, 0, 0, "weighted", False),
    ("top_p", 0.9, 2, 1, "weighted", False),
    ("top_k", 2, 1, 2, "weighted", True),
    ("top_k", 3, 0, 1, "unweighted", False),
]


@pytest.mark.parametrize("rule,k_or_p,null,shared,gating,padded", CASES)
@pytest.mark.parametrize("impl", ["auto", "loop"])
def test_layer_matches_per_token_reference(rule, k_or_p, null, shared, gating, padded, impl):
    check_against_reference(rule, k_or_p, null, shared, gating, padded, impl, "auto")


@pytest.mark.parametrize("rule,k_or_p,null,shared,gating,padded", CASES)
@pytest.mark.parametrize("path", ["grouped", "small_batch", "dense"])
def test_every_expert_path_matches_per_token_reference(rule, k_or_p, null, shared, gating, padded, path):
    """The decoding paths (few rows) compute the same layer, forward and backward, as the grouped one."""
    check_against_reference(rule, k_or_p, null, shared, gating, padded, "auto", path)


def test_dispatch_path_is_chosen_by_row_count(monkeypatch):
    layer = build_moe_layer(D, MoEConfig(num_routed_experts=E_ROUTED, routed_intermediate_size=F_ROUTED,
                                         num_shared_experts=0, small_batch_rows=8))
    assert [layer.dispatch_path(r) for r in (1, 8, 9, 4096)] == ["small_batch", "small_batch", "grouped", "grouped"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert layer.dispatch_path(4) == "dense"  # no host sync while a graph is traced
    layer.small_batch_capable = False  # e.g. a plug-in expert group without the single-expert methods
    assert layer.dispatch_path(1) == "grouped"
    with pytest.raises(ValueError, match="dispatch"):
        MoEConfig(dispatch="fast")


def test_an_injected_dispatcher_takes_every_forward():
    """Expert parallelism installs its own dispatcher; the few-row paths (all experts local) then never run."""
    layer = build_moe_layer(D, MoEConfig(num_routed_experts=E_ROUTED, routed_intermediate_size=F_ROUTED,
                                         num_shared_experts=0)).eval()  # eval: no router jitter
    calls = []

    def recording(x, selected, weights, slots):
        calls.append(x.shape[0])
        return dispatch(x, selected, weights, slots)

    x = torch.randn(1, 2, D)
    local, _ = layer(x)
    layer.dispatcher = recording
    assert layer.dispatch_path(2) == "grouped"
    injected, _ = layer(x)
    assert calls == [2] and torch.allclose(local, injected, atol=1e-6)
    layer.dispatch = "small_batch"
    with pytest.raises(ValueError, match="expert parallelism"):
        layer(x)


def check_against_reference(rule, k_or_p, null, shared, gating, padded, impl, path):
    torch.manual_seed(zlib.crc32(repr((rule, k_or_p, null, shared, gating, padded)).encode()))
    router = {"name": rule, ("top_p" if rule == "top_p" else "top_k"): k_or_p, "jitter": 0.0}
    cfg = MoEConfig(
        num_routed_experts=E_ROUTED,
        routed_intermediate_size=F_ROUTED,
        num_null_experts=null,
        num_shared_experts=shared,
        shared_intermediate_size=F_SHARED,
        router=router,
        shared_gating=gating,
        grouped_mm=impl,
        dispatch=path,
    )
    layer = build_moe_layer(D, cfg)
    with torch.no_grad():  # peaked gates, so some tokens use 1 expert and some only the null one
        layer.router.gate.weight.mul_(4.0)
    b, l = 2, 6
    x = torch.randn(b, l, D, requires_grad=True)
    mask = torch.ones(b, l, dtype=torch.bool)
    if padded:
        mask[0, -2:] = False
        mask[1, -4:] = False
    g = torch.randn(b, l, D)

    y, info = layer(x, mask if padded else None)
    loss = (y * g).sum() + info.load_balance + info.z_loss + info.entropy
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(loss, [x, *params])

    flat_mask = mask.reshape(-1).tolist() if padded else [True] * (b * l)
    y_ref, lb, z, ent, counts = reference(layer, x.reshape(-1, D), flat_mask, rule, k_or_p, gating == "weighted")
    loss_ref = (y_ref * g.reshape(-1, D)).sum() + lb + z + ent
    grads_ref = torch.autograd.grad(loss_ref, [x, *params], allow_unused=True)

    torch.testing.assert_close(y.reshape(-1, D), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info.load_balance, torch.as_tensor(lb, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(info.z_loss, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info.entropy, ent, rtol=1e-5, atol=1e-6)
    assert info.tokens_per_expert.tolist() == counts
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, got, want in zip(names, grads, grads_ref):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_routing_statistics_match_counts():
    """Histogram, mean and per-task table agree with counts done by hand on the selection."""
    torch.manual_seed(3)
    cfg = MoEConfig(
        num_routed_experts=4, routed_intermediate_size=8, num_null_experts=1, num_shared_experts=1,
        shared_intermediate_size=8, router={"name": "top_p", "top_p": 0.6, "jitter": 0.0},
    )
    layer = build_moe_layer(8, cfg)
    with torch.no_grad():
        layer.router.gate.weight.mul_(5.0)
    x = torch.randn(3, 7, 8)
    mask = torch.rand(3, 7) > 0.3
    task = torch.randint(-1, 3, (3, 7))
    route = layer.router(x.reshape(-1, 8), mask.reshape(-1))
    _, info = layer(x, mask, task)
    sel = route.selected
    real_per_tok = sel[:, :4].sum(-1)
    flat_mask = mask.reshape(-1)
    hist = [0] * 5
    by_task = [[0] * 5 for _ in range(int(task.max()) + 1)]
    for t in range(sel.shape[0]):
        if flat_mask[t]:
            hist[int(real_per_tok[t])] += 1
            if task.reshape(-1)[t] >= 0:
                for e in range(5):
                    by_task[int(task.reshape(-1)[t])][e] += int(sel[t, e])
    assert info.active_real_hist.tolist() == hist
    assert info.tokens_per_expert_by_task.tolist() == by_task
    assert math.isclose(float(info.mean_active_real), sum(k * h for k, h in enumerate(hist)) / sum(hist), rel_tol=1e-6)
    assert int(info.num_tokens) == int(flat_mask.sum())
    assert info.real_experts.tolist() == [True] * 4 + [False]


def test_several_groups_with_null_in_the_middle():
    """Groups [swiglu x2, null x1, swiglu x3]: rows reach the right group and local expert."""
    from unimoe.moe import MoELayer, NullExperts, SwiGLUExperts, TopPRouter

    torch.manual_seed(7)
    groups = [SwiGLUExperts(8, 16, 2), NullExperts(1), SwiGLUExperts(8, 8, 3, grouped_mm="loop")]
    layer = MoELayer(router=TopPRouter(8, 6, top_p=0.8, jitter=0.0), experts=groups, shared_gating="unweighted")
    with torch.no_grad():
        layer.router.gate.weight.mul_(3.0)
    x = torch.randn(1, 20, 8)
    y, info = layer(x)
    route = layer.router(x[0])
    owner = [(groups[0], 0), (groups[0], 1), (None, 0), (groups[2], 0), (groups[2], 1), (groups[2], 2)]
    for t in range(20):
        want = torch.zeros(8)
        for e in range(6):
            group, local = owner[e]
            if route.selected[t, e] and group is not None:
                want = want + route.weights[t, e] * expert_swiglu(x[0, t], group.gate_up_proj[local], group.down_proj[local])
        torch.testing.assert_close(y[0, t], want, rtol=1e-5, atol=1e-6)
    assert info.real_experts.tolist() == [True, True, False, True, True, True]
    assert info.active_real_hist.shape == (6,)
