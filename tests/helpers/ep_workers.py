"""Per-rank bodies of the expert-parallel layer tests (run by spawn_helpers.run_ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from unimoe.moe import MoEConfig, build_moe_layer
from unimoe.moe.dispatch import group_slots
from unimoe.moe import expert_parallel

HIDDEN, TOKENS = 16, 24


def moe_config(routed: int = 4) -> MoEConfig:
    return MoEConfig(num_routed_experts=routed, routed_intermediate_size=24, num_null_experts=1,
                     num_shared_experts=1, shared_intermediate_size=8,
                     router={"name": "top_p", "top_p": 0.7, "jitter": 0.0})


def global_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's tokens [world, T, D] and output gradients (the same on every rank)."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(world, TOKENS, HIDDEN, generator=g), torch.randn(world, TOKENS, HIDDEN, generator=g)


def shard_experts(layer, ep_mesh) -> None:
    """Split the routed experts over the EP mesh (what unimoe.training.parallel does per layer)."""
    expert_parallel.shard_experts(layer, ep_mesh).trace.record_tokens = True


def layer_forward_backward(rank: int, world: int, routed: int) -> dict:
    """EP over all ranks: each rank routes its own tokens; returns outputs, routing and grads."""
    torch.manual_seed(0)
    layer = build_moe_layer(HIDDEN, moe_config(routed))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("expert_parallel",))
    shard_experts(layer, mesh)
    xs, gs = global_inputs(world)
    x = xs[rank].clone().requires_grad_()
    y, info = layer(x.unsqueeze(0))
    (y[0] * gs[rank]).sum().backward()
    experts = layer.experts[0]
    return {
        "y": y[0].detach(), "x_grad": x.grad, "selected": layer.router(x.detach()).selected,
        "expert_grads": {n: p.grad.to_local() for n, p in experts.named_parameters()},
        "router_grad": layer.router.gate.weight.grad, "shared_grad": layer.shared_experts.gate_up_proj.grad,
        "sent_rows": layer.dispatcher.trace.sent_rows, "received_rows": layer.dispatcher.trace.received_rows,
        "tokens_per_expert": info.tokens_per_expert,
    }


def null_only_tokens_are_not_sent(rank: int, world: int) -> dict:
    """Explicit routing with null-only tokens: they never leave their rank."""
    torch.manual_seed(0)
    layer = build_moe_layer(HIDDEN, moe_config(4))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("expert_parallel",))
    full = build_moe_layer(HIDDEN, moe_config(4))
    full.load_state_dict(layer.state_dict())
    shard_experts(layer, mesh)
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(rank))
    selected = torch.zeros(6, 5, dtype=torch.bool)
    selected[0, 4] = True  # null only
    selected[1, [0, 4]] = True  # one real expert (rank 0's) + null
    selected[2, [1, 2]] = True  # experts on rank 0 and rank 1
    selected[3, 4] = True  # null only
    selected[4, 3] = True  # rank 1's expert
    selected[5, [0, 1, 2, 3]] = True  # all real experts
    weights = torch.where(selected, torch.rand(6, 5, generator=torch.Generator().manual_seed(9)), 0.0)
    y = layer.dispatcher(x, selected, weights, group_slots(layer.experts))
    y_ref = full.dispatcher(x, selected, weights, group_slots(full.experts))  # the local dispatch
    trace = layer.dispatcher.trace
    return {"y": y, "y_ref": y_ref, "sent_token_ids": trace.sent_token_ids, "sent_rows": trace.sent_rows,
            "received_rows": trace.received_rows, "real_pairs": int(selected[:, :4].sum())}


def all_null_layer(rank: int, world: int) -> bool:
    """A layer whose rows all go to null experts still runs on every rank (no collective mismatch)."""
    torch.manual_seed(0)
    layer = build_moe_layer(HIDDEN, moe_config(2))
    shard_experts(layer, init_device_mesh("cpu", (world,), mesh_dim_names=("expert_parallel",)))
    selected = torch.zeros(5, 3, dtype=torch.bool)
    selected[:, 2] = True
    x = torch.randn(5, HIDDEN)
    y = layer.dispatcher(x, selected, selected.float(), group_slots(layer.experts))
    dist.barrier()
    return bool((y == 0).all()) and layer.dispatcher.trace.sent_rows == 0


def global_balance_loss(rank: int, world: int) -> dict:
    """Each rank routes its own tokens; the balance loss uses every rank's counts (unimoe.training.balance)."""
    from unimoe.training.balance import GlobalLoadBalance

    torch.manual_seed(0)
    layer = build_moe_layer(HIDDEN, moe_config(4))
    xs, _ = global_inputs(world)
    _, info = layer(xs[rank].unsqueeze(0))
    balanced = GlobalLoadBalance()([info], step=0, world_size=world)
    loss = balanced.routing[0].load_balance
    loss.backward()
    return {"value": float(loss.detach()), "local_value": float(info.load_balance.detach()),
            "router_grad": layer.router.gate.weight.grad.clone(), "mean_active": float(balanced.mean_active_real)}
