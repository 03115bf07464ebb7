"""Apply FSDP2 + expert parallelism to an :class:`~unimoe.model.transformer.AudioLM` (called from ``configure_model``).

Per transformer block, innermost first (FSDP2 groups must be created children before parents):

* MoE layers with ``ep > 1``: every token-taking expert group's stacked weights become
  DTensors sharded on dim 0 over the expert-parallel mesh (each EP rank keeps
  ``num_experts / ep`` experts), then FSDP2-sharded over the ``data_parallel`` dim. Their
  gradients (which already sum every EP peer's tokens, via the all-to-all's backward) are
  divided by the world size like everything else. The layer gets an
  :class:`~unimoe.moe.expert_parallel.ExpertParallelDispatcher`. With ``ep == 1`` nothing of
  this happens: the experts are ordinary FSDP parameters and the layer keeps the local
  dispatch (exactly the single-device path).
* the router is its own FSDP group with an fp32 policy, so its weights are never cast to
  bf16 (the paper computes the gate in fp32; ``Router.compute_logits`` runs in fp32); it
  stays gathered between forward and backward (it is tiny, and its output is a dataclass
  FSDP cannot hook to re-gather it);
* the block (attention, norms, shared experts) is one FSDP group over all ranks.

Then the vision encoder (its own group; it runs on every rank for every batch, on a blank
clip weighted 0 when the batch has no video, so its all-gathers and gradient reductions match
across ranks) and the text embedding (its own group) and the root (audio
embedding, final norm, heads; gathered from forward to backward for the same reason). ``mixed_precision="bf16"``: bf16 parameters and compute,
fp32 gradient reduction, fp32 master weights and optimizer state (FSDP2's
``MixedPrecisionPolicy``). ``activation_checkpointing``: recompute each block in backward
(``AudioLM.gradient_checkpointing``; the all-to-alls are recomputed too, on every rank alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from unimoe.moe.dispatch import group_slots
from unimoe.moe.expert_parallel import ExpertParallelError, check_expert_parallel, shard_experts
from unimoe.training.parallel.mesh import DATA_PARALLEL, EXPERT_PARALLEL, SHARDED, MeshError

if TYPE_CHECKING:
    from unimoe.model.transformer import AudioLM

MixedPrecision = Literal["bf16", "fp32"]
MIXED_PRECISIONS: tuple[str, ...] = ("bf16", "fp32")


@dataclass(frozen=True)
class ParallelSettings:
    """How the model is sharded (the strategy's init args of the same names)."""

    mixed_precision: MixedPrecision = "bf16"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"MoEParallelStrategy.mixed_precision must be one of {MIXED_PRECISIONS}, "
                             f"got {self.mixed_precision!r}")


def is_parallelized(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check_model_layout(model: "AudioLM", expert_parallel_size: int) -> None:
    """Refuse a model the expert-parallel layout cannot split (before any collective runs)."""
    if expert_parallel_size == 1:
        return
    moe = model.config.moe
    if moe is None:
        raise MeshError(
            f"MoEParallelStrategy.expert_parallel_size={expert_parallel_size} needs an MoE model, but this model is "
            "dense (model.moe is null; e.g. a SpecialistStage): use expert_parallel_size: 1 (plain FSDP2) for dense stages"
        )
    if moe.num_routed_experts % expert_parallel_size:
        raise MeshError(
            f"MoEConfig.num_routed_experts={moe.num_routed_experts} is not divisible by "
            f"MoEParallelStrategy.expert_parallel_size={expert_parallel_size}: every EP rank must hold the same "
            f"number of experts (use an expert_parallel_size that divides {moe.num_routed_experts})"
        )
    for i, block in enumerate(model.blocks):
        if block.is_moe:
            try:
                check_expert_parallel(group_slots(block.ffn.experts), expert_parallel_size, where=f"blocks.{i}.ffn")
            except ExpertParallelError as exc:
                raise MeshError(str(exc)) from exc
            for g in block.ffn.experts:
                for name, p in g.named_parameters():
                    if g.takes_tokens and p.shape[0] != g.num_experts:
                        raise MeshError(f"blocks.{i}.ffn: {type(g).__name__}.{name} {tuple(p.shape)} does not stack its "
                                        f"{g.num_experts} experts on dim 0, so it cannot be split over EP ranks")


def parallelize_audiolm(model: "AudioLM", mesh: Any, settings: ParallelSettings) -> None:
    """Shard ``model`` in place over ``mesh`` (the strategy's 2-D data x expert mesh)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if is_parallelized(model):
        return  # a second fit/validate/test of the same module: already sharded
    ep = mesh[EXPERT_PARALLEL].size()
    world = mesh.size()
    check_model_layout(model, ep)
    everyone = mesh[SHARDED]
    if settings.mixed_precision == "bf16":
        compute = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        compute = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    reshard = settings.reshard_after_forward

    for block in model.blocks:
        if block.is_moe:
            layer = block.ffn
            if ep > 1:
                shard_experts(layer, mesh[EXPERT_PARALLEL])  # DTensor Shard(0) over EP + the EP dispatcher
                for group in layer.experts:
                    if not group.takes_tokens:
                        continue
                    fully_shard(group, mesh=mesh[DATA_PARALLEL], mp_policy=compute, reshard_after_forward=reshard)
                    # the local gradient already sums all EP peers' tokens: average over every rank
                    group.set_gradient_divide_factor(float(world))
                    group.set_force_sum_reduction_for_comms(True)
            # a RouterOutput is not a tensor FSDP can hook for backward: keep the tiny gate gathered
            fully_shard(layer.router, mesh=everyone, mp_policy=fp32, reshard_after_forward=False)
        fully_shard(block, mesh=everyone, mp_policy=compute, reshard_after_forward=reshard)
    if model.vision is not None:
        if model.vision.input_frames is None or model.vision.input_size is None:
            raise MeshError(f"vision encoder {type(model.vision).__name__} sets no input_frames / input_size: sharded "
                            "training runs it on a blank clip for batches without video, so it needs both")
        fully_shard(model.vision, mesh=everyone, mp_policy=compute, reshard_after_forward=reshard)
        model.vision_every_batch = True  # every rank joins the encoder's collectives on every batch
    fully_shard(model.text_embed, mesh=everyone, mp_policy=compute, reshard_after_forward=reshard)
    # the root returns an AudioLMOutput (no tensor FSDP can hook for backward) and the loss needs the heads
    # right after forward: keep the root group (audio embedding, final norm, heads) gathered until backward
    fully_shard(model, mesh=everyone, mp_policy=compute, reshard_after_forward=False)
    register_fsdp_forward_method(model, "step")  # incremental decoding on the sharded model
    if settings.activation_checkpointing:
        model.gradient_checkpointing = True


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on global rank 0 (CPU), None elsewhere. Collective: every rank calls it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None
