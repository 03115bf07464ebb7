"""Gradient-norm clipping over parameters sharded on different meshes.

``torch.nn.utils.clip_grad_norm_`` stacks per-parameter norms, which fails when gradients
are DTensors on different meshes (the non-expert parameters on the flat mesh of all ranks,
the routed experts on the 2-D data x expert mesh). Here every rank sums the squares of its
local shards, counting a shard replicated over ``k`` ranks ``1/k`` times, and one all-reduce
gives the exact global norm; the scale is then applied to the local shards.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``; returns the norm before."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    device = grads[0].device if grads else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    locals_: list[Tensor] = []
    for g in grads:
        if isinstance(g, DTensor):
            mesh = g.device_mesh
            replicas = math.prod(mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
            local = g.to_local()
        else:  # a plain tensor is the same on every rank
            replicas, local = world, g
        locals_.append(local)
        total_sq += local.float().pow(2).sum() / replicas
    if world > 1:
        dist.all_reduce(total_sq)
    norm = total_sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for local in locals_:
        local.mul_(coef.to(local.dtype))
    return norm
