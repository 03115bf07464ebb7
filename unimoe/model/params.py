"""Parameter accounting: total, per component, and "activated" per token.

A token that uses ``k`` real routed experts in every MoE layer touches every parameter
except the other routed experts: all embeddings, attention, norms, routers, shared
experts, heads and the vision tower are counted (the paper's convention: a min of 2.8B
"when only the shared expert is active" still includes all of them). See docs/model.md
for the paper-size derivation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from torch import nn

from unimoe.moe.layer import MoELayer
from unimoe.moe.routers import max_experts_for

if TYPE_CHECKING:
    from unimoe.model.transformer import AudioLM


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside moves to the meta device (buffers stay real).

    Building a 7B model this way takes no memory and seconds. Unlike a plain
    ``torch.device("meta")`` context it also works for components that compute host-side
    numbers from buffers in their constructor (a meta tensor has no values to read).
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def routed_expert_sizes(layer: MoELayer) -> list[int]:
    """Parameters of each real routed expert of one MoE layer (null experts have none)."""
    sizes: list[int] = []
    for group in layer.experts:
        if group.takes_tokens:
            sizes += [_numel(group) // group.num_experts] * group.num_experts
    return sizes


def active_experts_range(layer: MoELayer) -> tuple[int, int]:
    """(min, max) real routed experts one token can use in ``layer``, from its router.

    Top-p over ``E`` dynamic experts selects 1..ceil(p E) of them; top-k exactly k. Null
    experts among the selection lower the count of real ones (down to 0).
    """
    num_dynamic, num_real = layer.num_experts, layer.num_real_experts
    num_null = num_dynamic - num_real
    if hasattr(layer.router, "max_selected"):  # top-p, with or without an expert budget
        lo, hi = 1, layer.router.max_selected()
    elif layer.top_p is not None:
        lo, hi = 1, max_experts_for(layer.top_p, num_dynamic)
    elif getattr(layer.router, "top_k", None) is not None:
        lo = hi = int(layer.router.top_k)
    else:
        raise ValueError(f"cannot tell how many experts router {type(layer.router).__name__} selects; pass active=<int>")
    return max(0, lo - num_null), min(hi, num_real)


def count_parameters(model: nn.Module, active: int | str | None = None) -> int:
    """Parameters of ``model`` (each shared tensor once).

    ``active=None``: the total. ``active=k`` (int): those one token touches when it uses
    ``k`` real routed experts in every MoE layer (the k largest, if sizes differ).
    ``"min"`` / ``"max"``: k at the router's lower / upper bound in each layer
    (:func:`active_experts_range`: top-p 0.7 over 8 routed + 1 null -> 0 and 7).
    """
    total = _numel(model)
    if active is None:
        return total
    if isinstance(active, str) and active not in ("min", "max"):
        raise ValueError(f"active must be None, an int or 'min'/'max', got {active!r}")
    if isinstance(active, int) and active < 0:
        raise ValueError(f"active must be >= 0, got {active}")
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        sizes = sorted(routed_expert_sizes(layer), reverse=True)
        if isinstance(active, str):
            lo, hi = active_experts_range(layer)
            k = lo if active == "min" else hi
        else:
            k = min(active, len(sizes))
        total -= sum(sizes[k:])
    return total


def parameter_breakdown(model: "AudioLM") -> dict[str, int]:
    """Parameters by component (sums to the total); used by docs/model.md and the tests."""
    out = {
        "text_embed": _numel(model.text_embed),
        "audio_embed": _numel(model.audio_embed),
        "vision": _numel(model.vision),
        "attention": 0,
        "norms": _numel(model.norm),
        "dense_ffn": 0,
        "moe_routed": 0,
        "moe_shared": 0,
        "moe_router": 0,
        "audio_head": _numel(model.audio_head),
        "text_head": _numel(model.text_head),
    }
    for block in model.blocks:
        out["attention"] += _numel(block.attn)
        out["norms"] += _numel(block.attn_norm) + _numel(block.ffn_norm)
        if isinstance(block.ffn, MoELayer):
            out["moe_routed"] += sum(_numel(g) for g in block.ffn.experts)
            out["moe_shared"] += _numel(block.ffn.shared_experts)
            out["moe_router"] += _numel(block.ffn.router)
        else:
            out["dense_ffn"] += _numel(block.ffn)
    return out


def describe_parameters(model: "AudioLM") -> str:
    """A short human-readable table: components, total, min/max activated (MoE only)."""
    parts = parameter_breakdown(model)
    lines = [f"{name:12s} {n / 1e6:12.2f}M" for name, n in parts.items() if n]
    lines.append(f"{'total':12s} {count_parameters(model) / 1e6:12.2f}M")
    if any(isinstance(m, MoELayer) for m in model.modules()):
        for which in ("min", "max"):
            lines.append(f"{'active ' + which:12s} {count_parameters(model, which) / 1e6:12.2f}M")
    return "\n".join(lines)

