"""Per-device training memory of an AudioLM: parameters, gradients, optimizer, activations.

The estimate behind ``unimoe plan`` (:mod:`unimoe.training.plan` reads recipes into these
inputs). Everything is counted from the model itself, built on the meta device, and from
the tensors this code base's forward saves for backward:

* **static**: weights (fp32 master copies, or the ``*-true`` dtype), gradients and the two
  AdamW moments of the *trainable* parameters only (frozen ones never reach the optimizer);
  under FSDP2 every one of them is sharded over all ``world_size`` ranks (routed experts are
  split over the ``ep`` ranks of a group and sharded over the ``world_size / ep`` groups:
  also ``1 / world_size`` each). DDP adds its gradient buckets (one more gradient copy) and
  ``bf16-mixed`` autocast its cached bf16 copies of the trainable weights during forward.
  FSDP2 adds the gathered working set: the root group (embeddings, heads) stays unsharded
  through the step, two blocks are gathered at a time (the current and the prefetched one)
  and one block's unsharded gradient exists before its reduce-scatter.
* **activations** of one micro-batch of ``tokens`` (padded tokens: the data module's
  ``max_tokens``), per LM layer per token, from the saved tensors of
  :class:`~unimoe.model.transformer.Block` (RMSNorm keeps its fp32 input and normalised
  value; q/k/v inputs; rotated q, k; v; the attention output and its log-sum-exp; the
  o_proj input; the SwiGLU hidden ``2F``, ``silu`` and product; for the MoE layer the router's
  fp32 input (and jitter noise), ``active_experts`` gathered rows per token through the
  experts' grouped GEMMs plus their fp32 weighted outputs, and the shared experts), plus the
  loss head (``C x V`` fp32 log-probabilities per labelled token and the backward's
  temporaries) and, when the vision tower trains, its patches. A block's backward needs
  about half its saved size again for the gradients of its intermediates
  (:data:`BLOCK_BACKWARD_WORKSPACE`). With activation checkpointing a block keeps only its
  input and one block is recomputed at a time.
* **peak** = static without gradients + max(activations + autocast weight copies at the start
  of backward, all gradients + the optimizer step's temporaries at its end): activations are
  freed layer by layer as gradients appear.

Attention memory is linear in the sequence length (PyTorch's flash / memory-efficient SDPA
kernels). Expert parallelism is assumed balanced (each rank receives as many routed rows as
it sends); a skewed router adds to the activations of the busiest rank.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal, Sequence

from torch import nn

GiB = 2**30
STRATEGIES = ("single", "ddp", "fsdp")
BLOCK_BACKWARD_WORKSPACE = 0.5
"""Gradients of a block's intermediates alive while its backward runs, as a share of the block's
saved activations (measured with PyTorch's MemTracker on dense and MoE blocks: 0.43-0.51)."""


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the weights kept, of matmul inputs/outputs and of the residual stream."""

    name: str
    param_bytes: int
    compute_bytes: int
    residual_bytes: int
    autocast: bool = False
    """``*-mixed`` autocast: activations are cast copies, trainable weights cached in low precision."""


TRAINER_PRECISIONS: dict[str, Precision] = {
    **{k: Precision(k, 4, 4, 4) for k in ("32", "32-true")},
    **{k: Precision(k, 8, 8, 8) for k in ("64", "64-true")},
    **{k: Precision(k, 4, 2, 4, autocast=True) for k in ("bf16-mixed", "16-mixed", "bf16", "16")},
    **{k: Precision(k, 2, 2, 2) for k in ("bf16-true", "16-true")},
}
"""Lightning's ``trainer.precision`` values (DDP / single device)."""

SHARDED_PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16 (fp32 master, bf16 compute)", 4, 2, 2),
    "fp32": Precision("fp32", 4, 4, 4),
}
"""FSDP mixed precision: fp32 sharded master weights, compute (and the residual stream) in bf16."""


@dataclass(frozen=True)
class Layout:
    """How the model is spread over devices (see :mod:`unimoe.training.plan` for recipes)."""

    strategy: Literal["single", "ddp", "fsdp"]
    precision: Precision
    world_size: int = 1
    expert_parallel_size: int = 1
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    gpu: bool = True
    """GPUs run AdamW's multi-tensor (foreach) step, whose temporaries hold one more fp32 copy."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Layout.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.world_size < 1 or self.expert_parallel_size < 1 or self.world_size % self.expert_parallel_size:
            raise ValueError(f"world size {self.world_size} is not a multiple of expert_parallel_size "
                             f"{self.expert_parallel_size}")
        if self.expert_parallel_size > 1 and self.strategy != "fsdp":
            raise ValueError("expert parallelism needs the sharded strategy (MoEParallelStrategy)")

    @property
    def shards(self) -> int:
        return self.world_size if self.strategy == "fsdp" else 1


@dataclass(frozen=True)
class Workload:
    """One micro-batch: padded tokens, real routed experts per token, videos through the vision tower."""

    tokens: int
    active_experts: float = 0.0
    videos: int = 0
    patches_per_video: int = 0


@dataclass
class ModelShape:
    """What the estimate needs from a model, read from its (meta) modules and parameter names."""

    total: int
    trainable: int
    trainable_names: set[str] = field(repr=False, default_factory=set)
    groups: list[tuple[str, int, int, int]] = field(default_factory=list)
    """FSDP groups: (name, parameters, of which routed-expert parameters, trainable)."""
    hidden: int = 0
    q_width: int = 0
    kv_width: int = 0
    heads: int = 0
    dense_layers: list[int] = field(default_factory=list)
    """Intermediate size of each dense FFN layer."""
    moe_layers: list[dict] = field(default_factory=list)
    """Per MoE layer: routed intermediate, shared experts and their size, router width, jitter."""
    head_width: int = 0
    """C x V: logits per labelled token."""
    vision: dict | None = None
    """width, intermediate, depth, heads, patch input size, trainable (bool)."""

    @property
    def layers(self) -> int:
        return len(self.dense_layers) + len(self.moe_layers)


def model_shape(model: nn.Module, trainable: Iterable[str]) -> ModelShape:
    """Shape of an :class:`~unimoe.model.transformer.AudioLM` (meta parameters are fine)."""
    from unimoe.moe.layer import MoELayer

    trainable = set(trainable)
    params = dict(model.named_parameters())
    cfg = model.config
    shape = ModelShape(total=sum(p.numel() for p in params.values()),
                       trainable=sum(params[n].numel() for n in trainable), trainable_names=trainable,
                       hidden=cfg.hidden_size, q_width=cfg.num_heads * cfg.head_size,
                       kv_width=cfg.num_kv_heads * cfg.head_size, heads=cfg.num_heads,
                       head_width=cfg.num_codebooks * cfg.audio_vocab_size)
    grouped: set[str] = set()

    def group(name: str, prefix: str) -> None:
        names = [n for n in params if n.startswith(prefix) and n not in grouped]
        grouped.update(names)
        experts = sum(params[n].numel() for n in names if ".ffn.experts." in n)
        shape.groups.append((name, sum(params[n].numel() for n in names), experts,
                             sum(params[n].numel() for n in names if n in trainable)))

    for i, block in enumerate(model.blocks):
        group(f"blocks.{i}", f"blocks.{i}.")
        if isinstance(block.ffn, MoELayer):
            layer = block.ffn
            shared = layer.shared_experts
            jitter = float(getattr(layer.router, "jitter", 0.0) or 0.0)
            sizes = [g.intermediate_size for g in layer.experts if g.takes_tokens and hasattr(g, "intermediate_size")]
            shape.moe_layers.append({
                "routed_intermediate": max(sizes) if sizes else 0,
                "shared_experts": shared.num_experts if shared is not None else 0,
                "shared_intermediate": shared.intermediate_size if shared is not None else 0,
                "router_width": layer.num_experts + (shared.num_experts if shared is not None else 0),
                "jitter": jitter > 0,
            })
        else:
            shape.dense_layers.append(block.ffn.intermediate_size)
    if model.vision is not None:
        group("vision", "vision.")
        v = model.vision
        first = v.blocks[0] if len(v.blocks) else None
        shape.vision = {
            "width": v.width, "depth": len(v.blocks),
            "intermediate": first.mlp.gate_proj.out_features if first is not None else 0,
            "heads": first.attn.num_heads if first is not None else 0,
            "patch_input": v.patch_embed.in_features,
            "trainable": any(n.startswith("vision.") for n in trainable),
        }
    group("text_embed", "text_embed.")
    group("root", "")
    return shape


def trainable_names(model: nn.Module, *, trainable: Sequence[str] | None = None, freeze: Sequence[str] = ()) -> list[str]:
    """Parameter names that train: matching ``trainable`` globs (WarmupStage) or not matching ``freeze``."""
    names = [n for n, _ in model.named_parameters()]
    patterns = list(trainable) if trainable is not None else list(freeze)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            kind = "trainable" if trainable is not None else "freeze"
            raise ValueError(f"{kind} pattern {pattern!r} matches no model parameter")
    if trainable is not None:
        return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in trainable)]
    return [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in freeze)]


# ---------------------------------------------------------------------- activations (bytes per token)
def attention_bytes(s: ModelShape, p: Precision) -> float:
    """Saved tensors of the attention half of one block, per token.

    RMSNorm input + normalised value (fp32), the q/k/v input, rotated q and k, v, the SDPA
    output (also the o_proj input: a view) and its log-sum-exp.
    """
    c, r = p.compute_bytes, p.residual_bytes
    linear_inputs = 3 * s.hidden * c if p.autocast else s.hidden * r  # autocast casts the input per projection
    return 8 * s.hidden + linear_inputs + 2 * s.q_width * c + 2 * s.kv_width * c + 4 * s.heads


def dense_ffn_bytes(s: ModelShape, p: Precision, intermediate: int) -> float:
    c, r = p.compute_bytes, p.residual_bytes
    return 8 * s.hidden + (s.hidden * c if p.autocast else s.hidden * r) + 4 * intermediate * c


def moe_ffn_bytes(s: ModelShape, p: Precision, layer: dict, active_experts: float) -> float:
    c, r, d = p.compute_bytes, p.residual_bytes, s.hidden
    n_shared = layer["shared_experts"]
    flat = n_shared * d * c if p.autocast else d * r  # the normalised input, or each shared expert's cast copy
    router = (8 * d if layer["jitter"] else (0 if r == 4 else 4 * d)) + 20 * layer["router_width"]
    routed = active_experts * (d * c + 4 * layer["routed_intermediate"] * c + 4 * d)
    shared = n_shared * (4 * layer["shared_intermediate"] * c + d * c)
    return 8 * d + flat + router + routed + shared


def layer_bytes(s: ModelShape, p: Precision, active_experts: float) -> list[float]:
    """Saved bytes per token of every LM block (attention + FFN)."""
    attn = attention_bytes(s, p)
    out = [attn + dense_ffn_bytes(s, p, f) for f in s.dense_layers]
    out += [attn + moe_ffn_bytes(s, p, layer, active_experts) for layer in s.moe_layers]
    return out


def loss_bytes(s: ModelShape, p: Precision) -> float:
    """Per labelled token: the head's input copy, fp32 log-probabilities and the CE backward's temporaries."""
    head_input = s.hidden * (p.compute_bytes if p.autocast else p.residual_bytes)
    # log-probabilities (saved) + the gradient of the loss wrt them and wrt the logits (in backward)
    return head_input + 12 * s.head_width + 8 * s.hidden  # + the final RMSNorm


def vision_bytes_per_patch(s: ModelShape, p: Precision) -> float:
    """Saved bytes per patch of the whole vision tower (0 when it is frozen: nothing needs its graph)."""
    v = s.vision
    if v is None or not v["trainable"]:
        return 0.0
    c, r, w = p.compute_bytes, p.residual_bytes, v["width"]
    linear_inputs = 2 * (w * c if p.autocast else w * r)
    per_block = 16 * w + linear_inputs + 7 * w * c + 4 * v["intermediate"] * c + 4 * v["heads"]
    return v["depth"] * per_block + v["patch_input"] * 4


# ---------------------------------------------------------------------- the estimate
@dataclass
class MemoryEstimate:
    """Bytes per device by component, and the peak."""

    components: dict[str, float]
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    peak: float
    peak_phase: str
    """``backward start`` (activations dominate) or ``optimizer step`` (gradients + step temporaries)."""

    def gib(self) -> dict[str, float]:
        return {k: round(v / GiB, 3) for k, v in self.components.items()}

    def to_dict(self) -> dict:
        return asdict(self)


def activation_bytes(s: ModelShape, layout: Layout, work: Workload, checkpointing: bool) -> float:
    """Activations of one micro-batch at the start of backward."""
    p = layout.precision
    per_layer = layer_bytes(s, p, work.active_experts)
    loss = work.tokens * loss_bytes(s, p)
    block = work.tokens * (max(per_layer) if per_layer else 0)
    workspace = BLOCK_BACKWARD_WORKSPACE * block
    if checkpointing:
        # each block keeps only its input; the loss's backward (its peak) is over before the
        # first block is recomputed, and blocks are recomputed (then backpropagated) one at a time
        inputs = work.tokens * s.layers * s.hidden * p.residual_bytes
        lm = inputs + max(loss, block + workspace)
    else:
        lm = work.tokens * sum(per_layer) + max(loss, workspace)
    return lm + work.videos * work.patches_per_video * vision_bytes_per_patch(s, p)


def estimate(s: ModelShape, layout: Layout, work: Workload) -> MemoryEstimate:
    """Per-device memory of one training step (see the module docstring for the model)."""
    p, n = layout.precision, layout.shards
    comp: dict[str, float] = {
        "parameters": s.total * p.param_bytes / n,
        "gradients": s.trainable * p.param_bytes / n,
        "optimizer_states": 2 * s.trainable * p.param_bytes / n,  # AdamW exp_avg + exp_avg_sq
    }
    if layout.strategy == "ddp":
        comp["ddp_gradient_buckets"] = s.trainable * p.param_bytes
    if p.autocast:
        comp["autocast_weight_copies"] = s.trainable * p.compute_bytes
    if layout.strategy == "fsdp":
        comp["fsdp_gathered"] = _fsdp_gathered(s, layout)
    comp["optimizer_step_temporaries"] = s.trainable * 4 / n if layout.gpu else 0.0
    without = activation_bytes(s, layout, work, checkpointing=False)
    with_ac = activation_bytes(s, layout, work, checkpointing=True)
    comp["activations"] = with_ac if layout.activation_checkpointing else without
    static = sum(v for k, v in comp.items() if k not in ("gradients", "activations", "autocast_weight_copies",
                                                          "optimizer_step_temporaries"))
    start = comp["activations"] + comp.get("autocast_weight_copies", 0.0)
    end = comp["gradients"] + comp["optimizer_step_temporaries"]
    peak = static + max(start, end)
    return MemoryEstimate(comp, without, with_ac, peak, "backward start" if start >= end else "optimizer step")


def _fsdp_gathered(s: ModelShape, layout: Layout) -> float:
    """Unsharded parameters (compute dtype) and one group's unsharded gradient alive at once under FSDP2."""
    c, ep = layout.precision.compute_bytes, layout.expert_parallel_size

    def local(g: tuple[str, int, int, int]) -> float:  # a group as gathered on one EP rank
        return g[1] - g[2] + g[2] / ep

    root = [g for g in s.groups if g[0] == "root"]
    others = [g for g in s.groups if g[0] != "root"]
    largest = max((local(g) for g in others), default=0.0)
    largest_trainable = max((g[3] * local(g) / g[1] for g in others if g[1]), default=0.0)
    if layout.reshard_after_forward:
        params = sum(local(g) for g in root) + 2 * largest
    else:
        params = sum(local(g) for g in s.groups)
    return params * c + largest_trainable * (c + 4)


def fits(peak: float, device_bytes: float, reserve_bytes: float) -> bool:
    return peak + reserve_bytes <= device_bytes


def gib(x: float) -> float:
    return round(x / GiB, 2)


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))
