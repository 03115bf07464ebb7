"""Global-batch load balancing: over ranks (real gloo processes) and over accumulated micro-batches."""

from __future__ import annotations

import torch

from ep_workers import HIDDEN, global_balance_loss, global_inputs, moe_config  # noqa: E402  (tests/helpers)
from spawn_helpers import run_ranks  # noqa: E402

from unimoe.moe import build_moe_layer
from unimoe.training.balance import GlobalLoadBalance


def test_over_ranks_the_loss_and_its_gradient_are_the_concatenated_batchs():
    world = 2
    ranks = run_ranks(global_balance_loss, world)
    torch.manual_seed(0)
    layer = build_moe_layer(HIDDEN, moe_config(4))
    xs, _ = global_inputs(world)
    _, info = layer(xs.reshape(1, -1, HIDDEN))  # one process, the whole global batch
    info.load_balance.backward()
    for got in ranks:
        assert abs(got["value"] - float(info.load_balance.detach())) < 1e-6
        assert abs(got["mean_active"] - float(info.mean_active_real)) < 1e-6
    assert abs(ranks[0]["local_value"] - ranks[1]["local_value"]) > 1e-4  # the per-rank losses really differ
    mean_grad = sum(r["router_grad"] for r in ranks) / world  # what DDP / FSDP hand the optimizer
    torch.testing.assert_close(mean_grad, layer.router.gate.weight.grad, rtol=1e-5, atol=1e-7)


def test_over_micro_batches_the_value_is_the_accumulated_batchs_and_resets_each_step():
    torch.manual_seed(0)
    layer = build_moe_layer(HIDDEN, moe_config(4))
    xs, _ = global_inputs(3)
    infos = [layer(x.unsqueeze(0))[1] for x in xs]
    balance = GlobalLoadBalance()
    first = balance(infos[:1], step=7, accumulate=2, world_size=1).routing[0].load_balance
    second = balance(infos[1:2], step=7, accumulate=2, world_size=1).routing[0].load_balance
    torch.testing.assert_close(first, infos[0].load_balance)
    concatenated = layer(xs[:2].reshape(1, -1, HIDDEN))[1]  # one forward on both micro-batches (no jitter)
    torch.testing.assert_close(second, concatenated.load_balance)  # both micro-batches' counts
    third = balance(infos[2:3], step=8, accumulate=2, world_size=1).routing[0].load_balance  # next optimizer step
    torch.testing.assert_close(third, infos[2].load_balance)
    # the gradient of the last micro-batch flows through its own probabilities with the accumulated f
    second.backward()
    assert layer.router.gate.weight.grad is not None


def test_one_process_without_accumulation_is_untouched():
    torch.manual_seed(0)
    layer = build_moe_layer(HIDDEN, moe_config(4))
    _, info = layer(global_inputs(1)[0])
    out = GlobalLoadBalance()([None, info], step=0, accumulate=1, world_size=1)
    assert out.routing[0] is None and out.routing[1] is info
