"""Grouped GEMM path == loop fallback == plain per-expert matmuls; no garbage tail rows;
every expert parameter gets a gradient every step (the DDP requirement)."""

from __future__ import annotations

import pytest
import torch

from unimoe.moe import MoEConfig, SwiGLUExperts, build_moe_layer, grouped_mm
from unimoe.moe.grouped import grouped_kernel_supported

requires_kernel = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


def plain(x, w, counts):
    """Row r of expert e: x[r] @ w[e], written as a row loop."""
    out, r = torch.zeros(x.shape[0], w.shape[-1], dtype=x.dtype), 0
    for e, c in enumerate(counts):
        for _ in range(c):
            out[r] = x[r] @ w[e]
            r += 1
    return out


@requires_kernel
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_equals_loop_and_plain(counts, transposed):
    torch.manual_seed(sum(counts))
    n, k, m, e = sum(counts), 16, 8, len(counts)
    x = torch.randn(n, k, requires_grad=True)
    w_base = torch.randn(e, m, k) if transposed else torch.randn(e, k, m)
    w = w_base.requires_grad_()
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    g = torch.randn(n, m)
    results = {}
    for impl in ("grouped", "loop"):
        ww = w.transpose(1, 2) if transposed else w
        out = grouped_mm(x, ww, offsets, impl=impl, exact_rows=True)
        gx, gw = torch.autograd.grad((out * g).sum(), [x, w])
        results[impl] = (out, gx, gw)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref = plain(xr, wr.transpose(1, 2) if transposed else wr, counts)
    ref_gx, ref_gw = torch.autograd.grad((ref * g).sum(), [xr, wr]) if n else (torch.zeros_like(x), torch.zeros_like(w))
    for impl, (out, gx, gw) in results.items():
        torch.testing.assert_close(out, ref, msg=lambda msg: f"{impl} output: {msg}")
        torch.testing.assert_close(gx, ref_gx, msg=lambda msg: f"{impl} grad x: {msg}")
        torch.testing.assert_close(gw, ref_gw, msg=lambda msg: f"{impl} grad w: {msg}")
        for ex, c in enumerate(counts):  # empty experts: zero (not missing) gradient
            if c == 0:
                assert torch.equal(gw[ex], torch.zeros_like(gw[ex]))


@requires_kernel
@pytest.mark.parametrize("impl", ["grouped", "loop", "auto"])
def test_tail_rows_past_last_offset_never_leak(impl):
    """Rows allocated past offsets[-1]: zero output, zero gradient, finite everything."""
    torch.manual_seed(0)
    counts, tail, k, m = [4, 0, 3], 5, 16, 8
    n = sum(counts)
    x = torch.randn(n + tail, k)
    x[n:] = torch.tensor(float("inf"))  # whatever sits there must not matter
    x.requires_grad_()
    w = torch.randn(3, k, m, requires_grad=True)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    for _ in range(3):  # repeat: the kernel's garbage differs between allocations
        out = grouped_mm(x, w, offsets, impl=impl)
        loss = out.sum()  # stride-0 grad_output: must be made contiguous for the kernel
        gx, gw = torch.autograd.grad(loss, [x, w])
        assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
        assert torch.equal(out[n:], torch.zeros(tail, m))
        assert torch.equal(gx[n:], torch.zeros(tail, k))
        xr, wr = x.detach()[:n].clone().requires_grad_(), w.detach().clone().requires_grad_()
        ref = plain(xr, wr, counts)
        rgx, rgw = torch.autograd.grad(ref.sum(), [xr, wr])
        torch.testing.assert_close(out[:n], ref)
        torch.testing.assert_close(gx[:n], rgx)
        torch.testing.assert_close(gw, rgw)


@requires_kernel
def test_auto_picks_the_kernel_only_where_valid():
    w = torch.randn(2, 16, 8)
    assert grouped_kernel_supported(torch.randn(4, 16), w)
    assert not grouped_kernel_supported(torch.randn(4, 16, dtype=torch.float64), w.double())
    assert not grouped_kernel_supported(torch.randn(4, 6), torch.randn(2, 6, 8))  # 24-byte rows
    assert not grouped_kernel_supported(torch.randn(0, 16), w)
    # misaligned input falls back to the loop and still computes the right thing
    x = torch.randn(5, 6)
    w6 = torch.randn(2, 6, 8)
    offs = torch.tensor([2, 5], dtype=torch.int32)
    torch.testing.assert_close(grouped_mm(x, w6, offs), plain(x, w6, [2, 3]))


@requires_kernel
def test_swiglu_experts_grouped_equals_loop_bf16_and_fp32():
    torch.manual_seed(1)
    grouped = SwiGLUExperts(hidden_size=16, intermediate_size=24, num_experts=3, grouped_mm="grouped")
    loop = SwiGLUExperts(hidden_size=16, intermediate_size=24, num_experts=3, grouped_mm="loop")
    loop.load_state_dict(grouped.state_dict())
    counts = torch.tensor([5, 0, 4])
    x = torch.randn(9, 16)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        outs, grads = [], []
        for mod in (grouped, loop):
            xi = x.to(dtype).detach().clone().requires_grad_()
            y = mod(xi, counts)
            y.float().square().sum().backward()
            outs.append(y.float())
            grads.append([xi.grad.float(), mod.gate_up_proj.grad.clone(), mod.down_proj.grad.clone()])
            mod.zero_grad()
        torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # and both equal each expert's SwiGLU written out
    y = grouped(x, counts)
    r = 0
    for e, c in enumerate(counts.tolist()):
        for _ in range(c):
            gate = x[r] @ grouped.gate_up_proj[e, 0].T
            up = x[r] @ grouped.gate_up_proj[e, 1].T
            ref = grouped.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
            torch.testing.assert_close(y[r], ref, rtol=1e-5, atol=1e-6)
            r += 1


@pytest.mark.parametrize("routing", ["one_expert", "all_null", "mixed"])
def test_every_parameter_gets_a_gradient_every_step(routing):
    """DDP needs a (possibly zero) grad for every parameter, however tokens are routed."""
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_routed_experts=4, routed_intermediate_size=8, num_null_experts=1, num_shared_experts=1,
        shared_intermediate_size=8, router={"name": "top_p", "top_p": 0.5, "jitter": 0.0},
    )
    layer = build_moe_layer(8, cfg)
    with torch.no_grad():
        gate = layer.router.gate.weight
        if routing == "one_expert":
            gate[:5] = 0.0
            gate[2, 0] = 50.0
        elif routing == "all_null":
            gate[:5] = 0.0
            gate[4, 0] = 50.0
    x = torch.randn(2, 5, 8)
    x[..., 0] = x[..., 0].abs() + 1.0
    y, info = layer(x)
    (y.square().sum() + info.load_balance).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    counts = info.tokens_per_expert.tolist()
    routed_grad = layer.experts[0].gate_up_proj.grad
    for e in range(4):  # experts without tokens: exactly zero gradient
        if counts[e] == 0:
            assert torch.equal(routed_grad[e], torch.zeros_like(routed_grad[e]))
    if routing == "all_null":
        assert counts[:4] == [0, 0, 0, 0] and int(info.active_real_hist[0]) == 10
    if routing == "one_expert":
        assert counts[2] == 10
