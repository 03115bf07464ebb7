"""The expert budget (PI controller on the top-p threshold, DTop-p): it converges to the target on
random inputs in training and at inference, never exceeds its cap, applies updates once per
model-level forward (so checkpoint recomputation sees the same threshold), and leaves plain
top-p exactly the paper's rule when off (checked against a naive per-token reference)."""

from __future__ import annotations

import pytest
import torch
from generation_helpers import RecordingCodec, tiny_model

from unimoe.generation import GenerationRequest, GenerationSettings, Generator
from unimoe.moe import MoEConfig, build_moe_layer
from unimoe.moe.routers import BudgetRouter, TopKRouter, TopPRouter

pytestmark = pytest.mark.usefixtures("single_thread")


def layer_with(router: dict, hidden: int = 32):
    torch.manual_seed(0)
    return build_moe_layer(hidden, MoEConfig(num_routed_experts=8, routed_intermediate_size=16, num_null_experts=1,
                                             num_shared_experts=1, shared_intermediate_size=8, router=router))


def real_per_token(layer, x):
    _, info = layer(x, stats="counts")
    return info.real_per_token.float()


def naive_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Per token: the smallest set of experts, by descending probability, whose mass reaches p."""
    selected = torch.zeros_like(probs, dtype=torch.bool)
    for t in range(probs.shape[0]):
        mass = 0.0
        for e in sorted(range(probs.shape[1]), key=lambda i: -float(probs[t, i])):
            if mass >= p:
                break
            selected[t, e] = True
            mass += float(probs[t, e])
    return selected


@pytest.mark.parametrize("target", [1.5, 2.0, 3.5])
def test_training_converges_to_the_target_on_random_inputs(target):
    layer = layer_with({"name": "budget", "target_experts": target, "top_p": 0.7}).train()
    means = []
    for _ in range(120):
        layer.router.begin_forward()  # the model does this once per forward
        means.append(float(real_per_token(layer, torch.randn(1, 256, 32) * 3).mean()))
    settled = sum(means[-40:]) / 40
    assert abs(settled - target) / target < 0.03, (target, settled, means[:5])
    assert abs(means[0] - target) / target > 0.05  # it did have to move (0.7 gives another count)


def test_never_more_than_the_cap():
    layer = layer_with({"name": "budget", "target_experts": 6.0, "max_experts": 3}).train()
    for _ in range(30):
        layer.router.begin_forward()
        x = torch.randn(1, 128, 32) * 3
        route = layer.router(x.view(-1, 32))
        assert int(route.selected.sum(-1).max()) <= 3  # counting null experts too
    assert float(layer.router.controller.threshold) == 1.0  # the target is out of reach: saturated, no wind-up
    assert layer.router.max_selected() == 3


def test_plain_top_p_is_the_papers_rule_and_a_budget_leaves_no_trace():
    layer = layer_with({"name": "top_p", "top_p": 0.6}).eval()
    x = torch.randn(64, 32) * 2
    with torch.no_grad():
        before = layer.router(x)
        assert torch.equal(before.selected, naive_top_p(before.probs, 0.6))
        layer.router.set_budget(2.0)
        for _ in range(5):
            layer.router.begin_forward()
            layer.router(x)
        assert float(layer.router.controller.threshold) != 0.6
        layer.router.set_budget(None)
        after = layer.router(x)
    assert torch.equal(before.selected, after.selected) and torch.equal(before.weights, after.weights)
    assert layer.router.top_p == 0.6 and "controller" not in dict(layer.router.named_modules())
    assert not any("controller" in k for k in layer.state_dict())


def test_updates_apply_once_per_model_forward_so_recomputation_is_exact():
    layer = layer_with({"name": "budget", "target_experts": 2.0, "top_p": 0.9, "jitter": 0.0}).train()
    x = torch.randn(1, 64, 32) * 3
    layer.router.begin_forward()
    first = layer.router(x.view(-1, 32)).selected
    recomputed = layer.router(x.view(-1, 32)).selected  # a checkpointed block re-running its forward
    assert torch.equal(first, recomputed)
    layer.router.begin_forward()  # the next model forward applies the staged update
    assert not torch.equal(first, layer.router(x.view(-1, 32)).selected)


def test_budget_router_state_is_saved_and_frozen_in_eval():
    layer = layer_with({"name": "budget", "target_experts": 2.0}).train()
    for _ in range(20):
        layer.router.begin_forward()
        real_per_token(layer, torch.randn(1, 128, 32) * 3)
    layer.router.begin_forward()
    learned = float(layer.router.controller.threshold)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert "router.controller.threshold" in state
    layer.eval()
    with torch.no_grad():
        for _ in range(5):
            layer.router.begin_forward()
            real_per_token(layer, torch.randn(1, 128, 32))
    assert float(layer.router.controller.threshold) == learned
    fresh = layer_with({"name": "budget", "target_experts": 2.0})
    fresh.load_state_dict(state)
    assert float(fresh.router.controller.threshold) == learned
    fresh.router.set_budget(1.0)  # adapt at inference to another target, then come back
    with torch.no_grad():
        for _ in range(10):
            fresh.router.begin_forward()
            real_per_token(fresh.eval(), torch.randn(1, 128, 32) * 3)
    assert float(fresh.router.controller.threshold) != learned
    fresh.router.set_budget(None)
    assert float(fresh.router.controller.threshold) == learned and float(fresh.router.controller.target) == 2.0


def test_bad_budgets_fail_clearly():
    with pytest.raises(ValueError, match="expert budget must be in"):
        layer_with({"name": "budget", "target_experts": 0.0})
    with pytest.raises(ValueError, match="max_experts"):
        layer_with({"name": "budget", "target_experts": 2.0, "max_experts": 20})
    topk = TopKRouter(16, 4, top_k=2)
    with pytest.raises(TypeError, match="top-p router"):
        topk.set_budget(2.0)
    with pytest.raises(ValueError, match="held by its controller"):
        BudgetRouter(16, 4).override_top_p(0.5)
    router = TopPRouter(16, 4)
    router.set_budget(2.0)
    with pytest.raises(ValueError, match="expert budget"):
        router.override_top_p(0.5)


def test_generation_holds_the_budget_within_five_percent_and_reports_it():
    model = tiny_model("tiny-moe", seed=4)  # 4 routed + 1 null experts per layer
    requests = [GenerationRequest(id="a", task="t2m", text="piano"),
                GenerationRequest(id="b", task="t2m", text="slow strings with a soft choir")]
    settings = GenerationSettings(temperature=1.0, min_seconds=2.0, max_seconds=2.0, cfg_scale=3.0,
                                  experts_per_token=1.5)
    clips = Generator(model, RecordingCodec(), settings).generate(requests)
    for clip in clips:
        budget = clip.metadata["expert_budget"]
        assert budget["target"] == 1.5 and abs(budget["relative_error"]) < 0.05, budget
        assert clip.metadata["router_top_p"] is None and clip.metadata["frames"] == 200
    plain = Generator(model, RecordingCodec(), settings.replace(experts_per_token=None)).generate(requests[:1])
    assert abs(plain[0].metadata["activated_experts_per_token"] - 1.5) / 1.5 > 0.05  # the trained top-p uses another count
    assert all(b.ffn.router.controller is None and b.ffn.top_p == 0.7 for b in model.blocks)  # nothing left behind


def test_trains_with_gradient_checkpointing_like_without():
    """The budget moves between model forwards, never inside one, so recomputed blocks match their forward."""
    from unimoe.model.config import AudioLMConfig
    from unimoe.model.tasks import build_task_builder, collate
    from unimoe.model.transformer import AudioLM

    base = AudioLMConfig.from_preset("tiny-moe", vision=None)
    base.moe.router = {"name": "budget", "target_experts": 1.5, "jitter": 0.0}
    t2m = build_task_builder("t2m", base)
    g = torch.Generator().manual_seed(0)
    batch = collate([t2m.build(torch.randint(0, 16, (4, 12), generator=g), text="piano"),
                     t2m.build(torch.randint(0, 16, (4, 9), generator=g), text="drums and bass")])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AudioLM(base.replace(gradient_checkpointing=checkpointing)).train()
        for _ in range(3):  # the threshold moves between the steps
            model.zero_grad()
            out = model(batch, logits="none")
            (out.loss + out.aux.load_balance).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        thresholds = [float(b.ffn.router.controller.threshold) for b in model.blocks]
        assert thresholds != [0.7] * len(thresholds)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
