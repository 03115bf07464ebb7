"""Grouped matrix multiply: one GEMM per expert over contiguous row blocks, in one call.

Rows ``[offsets[e-1], offsets[e])`` of ``x`` are multiplied by ``w[e]``. This is the core
of dropless MoE: tokens are sorted by expert, so each expert owns one contiguous block and
no row is padded. ``torch._grouped_mm`` does it in one kernel (fused on Hopper GPUs, an
internal loop on CPU); the Python loop is the fallback where that kernel is unavailable and
the reference the tests compare against.

Traps handled here (see docs/moe.md):
* rows past ``offsets[-1]`` come back UNINITIALISED from ``torch._grouped_mm``, in the
  output and in the input gradient. Unless the caller promises there are none
  (``exact_rows=True``), they are masked with ``torch.where`` on both sides: multiplying
  by zero would turn ``inf`` garbage into ``nan``.
* the kernel rejects a stride-0 output gradient (``y.sum().backward()``), so gradients
  are made contiguous on the way back.
* offsets must be int32 and strides multiples of 16 bytes; misaligned inputs use the loop.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

GroupedImpl = Literal["auto", "grouped", "loop"]
GROUPED_IMPLS: tuple[str, ...] = ("auto", "grouped", "loop")

_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm(
    x: Tensor, w: Tensor, offsets: Tensor, *, impl: GroupedImpl = "auto", exact_rows: bool = False
) -> Tensor:
    """``out[r] = x[r] @ w[e]`` for every row ``r`` in expert ``e``'s block.

    x:       [R, K] rows sorted by expert
    w:       [E, K, M] one matrix per expert (any strides; a transposed view is fine)
    offsets: [E] int32 cumulative row ends (``counts.cumsum(0)``), on x's device
    returns  [R, M]; rows past ``offsets[-1]`` are zero and pass no gradient back.

    ``exact_rows=True`` promises ``offsets[-1] == R`` (the MoE dispatcher guarantees it),
    which skips the tail guard.
    """
    if impl not in GROUPED_IMPLS:
        raise ValueError(f"grouped_mm impl must be one of {GROUPED_IMPLS}, got {impl!r}")
    if impl == "loop" or (impl == "auto" and not grouped_kernel_supported(x, w)):
        return _loop_mm(x, w, offsets)
    offsets = offsets.to(torch.int32)
    if exact_rows:
        return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offsets))
    valid = (torch.arange(x.shape[0], device=x.device) < offsets[-1]).unsqueeze(-1)  # [R, 1]
    # Masking the input drops the garbage the kernel writes into the tail of grad_x.
    x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    out = _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offsets))
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def grouped_kernel_supported(x: Tensor, w: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs natively (not via a host-syncing fallback) here."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.shape[0] == 0:
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype in _CPU_DTYPES
    elif x.device.type == "cuda":
        # The fused CUTLASS kernel is bf16 on sm90/sm100; other cases loop with a host sync.
        ok_dtype = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] in (9, 10)
    else:
        ok_dtype = False
    return ok_dtype and _aligned(x) and _aligned(w)


def _aligned(t: Tensor) -> bool:
    """16-byte aligned base pointer and leading stride (the kernel's requirement)."""
    align = 16 // t.element_size()
    if t.data_ptr() % 16:
        return False
    s_row, s_col = t.stride(-2), t.stride(-1)
    if s_col == 1:
        return s_row % align == 0
    if s_row == 1:
        return s_col % align == 0
    return False


def _loop_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """One matmul per expert. Empty experts still run, so every expert gets a gradient."""
    ends = offsets.tolist()  # host sync: the fallback needs the block sizes on the host
    pieces, start = [], 0
    for e, end in enumerate(ends):
        pieces.append(x[start:end] @ w[e])  # [n_e, M]
        start = end
    if start < x.shape[0]:  # rows past the last offset are defined to be zero
        pieces.append(x.new_zeros(x.shape[0] - start, w.shape[-1]))
    if not pieces:
        return x.new_zeros(x.shape[0], w.shape[-1])
    return torch.cat(pieces)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (stride-0 trap)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()
