"""Stage 1 -> 2: merge dense specialists into one Dynamic-Capacity MoE model (upcycling).

For N dense specialists and ``pieces = k``:

* every MoE layer's routed experts are the specialists' SwiGLU FFNs split into ``k`` pieces
  along the intermediate dimension (each piece keeps its gate and up rows together and the
  matching ``down_proj`` columns): expert ``s * k + j`` is piece ``j`` of specialist ``s``
  (the paper: 4 specialists x 2 = 8 experts);
* attention, norms, embeddings, heads (and dense FFNs of non-MoE layers) are the element-wise
  average of the specialists;
* the vision encoder is the video specialist's (the one whose data had a task that takes
  ``video``), else the average;
* routers and shared experts start random (``router_init: grouped`` gives all pieces of one
  specialist the same gate row, so they are selected together; ``shared_init: zero`` zeroes
  the shared experts' ``down_proj`` so the initial MoE output is the routed part alone).

Width rule (validated, see docs/training.md): ``routed_intermediate_size`` must equal
``specialist intermediate_size / k`` and ``num_routed_experts`` must equal ``N * k``: the
split is exact, nothing is pruned or padded. The paper's numbers (specialists of 11008,
experts of 2752, 4 x 2 = 8 experts) cannot all hold at once: 8 x 2752 = 2 x 11008, i.e.
its experts hold two dense FFNs, not four. ``recipes/paper`` keeps the paper's MoE
(8 x 2752, 7.1B) and trains specialists of FFN 5504 = 2 x 2752.

Scaling: a routed expert's output is weighted by its normalised top-p weight. When a token
gives its whole dynamic mass to the ``k`` pieces of one specialist with equal weights
``1/k``, the routed output is ``(scale / k) * dense(x)``; the default ``expert_scale = k``
multiplies each piece's ``down_proj`` by ``k`` so that this output is exactly the
specialist's dense FFN output.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Literal, Optional, Sequence, Union

import torch

from unimoe.checkpoint import CheckpointError, CheckpointMetadata, config_to_dict, open_model_file, save_model
from unimoe.model.config import AudioLMConfig
from unimoe.model.tasks import TaskIds, task_class
from unimoe.moe.config import MoEConfig
from unimoe.moe.experts import SwiGLUExperts
from unimoe.registry import RegistryError

log = logging.getLogger("unimoe.upcycle")

RouterInit = Literal["random", "grouped"]
SharedInit = Literal["random", "zero"]


class UpcycleError(ValueError):
    """The specialists cannot be merged with the requested MoE layout; the message says why."""


@dataclass
class Specialist:
    """One dense specialist: its AudioLM tensors (no ``model.`` prefix; read lazily from a folder) and metadata."""

    state: Mapping[str, torch.Tensor]
    metadata: CheckpointMetadata
    name: str
    path: Optional[str] = None

    @property
    def tasks(self) -> list[str]:
        return list(self.metadata.extra.get("data_tasks") or [])


@dataclass
class UpcycleResult:
    model: torch.nn.Module
    """The upcycled :class:`~unimoe.model.transformer.AudioLM`."""
    metadata: CheckpointMetadata
    expert_labels: List[str] = field(default_factory=list)


def check_upcycle_layout(dense: AudioLMConfig, moe: MoEConfig, num_specialists: int, pieces: int) -> None:
    """The width rule: routed experts are exactly the specialists' FFN pieces (named-field errors)."""
    if not isinstance(pieces, int) or pieces < 1:
        raise UpcycleError(f"upcycle: pieces must be a positive int, got {pieces!r}")
    f = dense.intermediate_size
    if f % pieces:
        raise UpcycleError(
            f"upcycle: specialist intermediate_size {f} cannot be split into pieces={pieces} equal parts"
        )
    if moe.routed_intermediate_size != f // pieces:
        raise UpcycleError(
            f"upcycle: moe.routed_intermediate_size must be specialist intermediate_size / pieces = "
            f"{f} / {pieces} = {f // pieces}, got {moe.routed_intermediate_size}. Each routed expert is one "
            f"exact piece of a specialist FFN (no pruning, no padding). The paper's 2752-wide experts with "
            f"pieces=2 need specialists of FFN 5504; specialists of 11008 need experts of 5504 (pieces=2) "
            f"or pieces=4 (experts of 2752, 4 per specialist)."
        )
    if moe.num_routed_experts != num_specialists * pieces:
        raise UpcycleError(
            f"upcycle: moe.num_routed_experts must be number of specialists x pieces = "
            f"{num_specialists} x {pieces} = {num_specialists * pieces}, got {moe.num_routed_experts}"
        )
    if moe.expert not in ("swiglu", {"name": "swiglu"}):
        raise UpcycleError(f"upcycle: moe.expert must be 'swiglu' (the dense FFN's layout) to hold FFN pieces, got {moe.expert!r}")


def _specialist_config(specialists: Sequence[Specialist]) -> AudioLMConfig:
    """The shared dense config; every specialist must have the same architecture."""
    if not specialists:
        raise UpcycleError("upcycle: give at least one specialist checkpoint")
    first = specialists[0]
    base = config_to_dict(first.metadata.config)
    for sp in specialists:
        if sp.metadata.config.moe is not None:
            raise UpcycleError(f"upcycle: {sp.name} is already an MoE model; specialists must be dense")
        other = config_to_dict(sp.metadata.config)
        diff = sorted(k for k in base if base[k] != other.get(k))
        if diff:
            details = ", ".join(f"{k}: {base[k]!r} vs {other.get(k)!r}" for k in diff[:6])
            raise UpcycleError(f"upcycle: {sp.name} has another architecture than {first.name} ({details})")
    return first.metadata.config


def _codec(specialists: Sequence[Specialist]):
    codecs = [sp.metadata.codec for sp in specialists if sp.metadata.codec is not None]
    for sp in specialists:
        if sp.metadata.codec is not None and sp.metadata.codec != codecs[0]:
            raise UpcycleError(
                f"upcycle: specialists were trained on different codecs ({specialists[0].name}: {codecs[0]!r}, "
                f"{sp.name}: {sp.metadata.codec!r}); their audio tokens do not mean the same thing"
            )
    return codecs[0] if codecs else None


def _vision_source(specialists: Sequence[Specialist], vision_from: Union[None, int, str]) -> Optional[int]:
    """Index of the specialist whose vision encoder is kept (None = average)."""
    if vision_from is None:
        video = [i for i, sp in enumerate(specialists) if any(_takes_video(t) for t in sp.tasks)]
        return video[0] if len(video) == 1 else None
    if isinstance(vision_from, int):
        if not 0 <= vision_from < len(specialists):
            raise UpcycleError(f"upcycle: vision_from={vision_from} is not a specialist index (0..{len(specialists) - 1})")
        return vision_from
    names = [sp.name for sp in specialists]
    matches = [i for i, sp in enumerate(specialists) if vision_from in (sp.name, sp.path)]
    if not matches:
        raise UpcycleError(f"upcycle: vision_from={vision_from!r} names no specialist; specialists: {names}")
    return matches[0]


def upcycle(
    specialists: Sequence[Specialist],
    moe: MoEConfig,
    *,
    pieces: int = 2,
    moe_layers: Optional[List[int]] = None,
    vision_from: Union[None, int, str] = None,
    router_init: RouterInit = "random",
    shared_init: SharedInit = "random",
    expert_scale: Optional[float] = None,
    seed: int = 0,
) -> UpcycleResult:
    """Merge dense specialists into an MoE state dict (see the module docstring for the rules)."""
    from unimoe.model.transformer import AudioLM

    if router_init not in ("random", "grouped"):
        raise UpcycleError(f"upcycle: router_init must be 'random' or 'grouped', got {router_init!r}")
    if shared_init not in ("random", "zero"):
        raise UpcycleError(f"upcycle: shared_init must be 'random' or 'zero', got {shared_init!r}")
    dense = _specialist_config(specialists)
    check_upcycle_layout(dense, moe, len(specialists), pieces)
    scale = float(pieces if expert_scale is None else expert_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise UpcycleError(f"upcycle: expert_scale must be a positive number, got {expert_scale!r}")
    config = dense.replace(moe=moe, moe_layers=moe_layers)
    vision_index = _vision_source(specialists, vision_from)

    torch.manual_seed(seed)  # routers, shared experts and plug-in extra experts start from this seed
    target = AudioLM(config)
    fresh = target.state_dict()
    f = dense.intermediate_size // pieces
    out: dict[str, torch.Tensor] = {}
    for key, value in fresh.items():
        layer = _moe_layer_of(key, config)
        if layer is not None:
            out[key] = _moe_tensor(key, layer, value, specialists, f, pieces, scale, router_init, shared_init)
        elif key.startswith("vision.") and vision_index is not None:
            out[key] = specialists[vision_index].state[key].to(value.dtype).clone()
        else:
            out[key] = _average(key, value, specialists)
    _check_experts_are_swiglu(target)
    target.load_state_dict(out)

    names = [sp.name for sp in specialists]
    labels = [f"{names[s]}.{j}" for s in range(len(specialists)) for j in range(pieces)]
    tasks: dict[str, Any] = {}
    task_ids = TaskIds()
    for sp in specialists:  # each specialist's ids in turn: the first keeps its numbering, the others append
        tasks.update(sp.metadata.tasks)
        task_ids = _merge_ids(task_ids, sp.metadata.task_table())
    extra = {
        "upcycle": {
            "specialists": [{"name": sp.name, "path": sp.path, "stage": sp.metadata.stage, "data_tasks": sp.tasks}
                            for sp in specialists],
            "pieces": pieces,
            "expert_labels": labels,
            "expert_scale": scale,
            "vision_from": None if vision_index is None else names[vision_index],
            "router_init": router_init,
            "shared_init": shared_init,
            "seed": seed,
        },
        "expert_labels": labels,
        "data_tasks": sorted({t for sp in specialists for t in sp.tasks}),
    }
    metadata = CheckpointMetadata(config=config, codec=_codec(specialists), stage="upcycle", tasks=tasks, extra=extra,
                                  task_ids=task_ids.names)
    return UpcycleResult(model=target, metadata=metadata, expert_labels=labels)


def _takes_video(task: str) -> bool:
    """Whether ``task`` conditions on video (a task whose plug-in is gone counts as no)."""
    try:
        return task_class(task).accepts("video")
    except RegistryError:
        return False


def _merge_ids(table: TaskIds, other: TaskIds) -> TaskIds:
    """``table`` followed by the tasks of ``other`` it lacks, in ``other``'s id order."""
    return TaskIds([*table, *(n for n in other if n not in table)])


def _moe_layer_of(key: str, config: AudioLMConfig) -> Optional[int]:
    """Layer index when ``key`` is inside an MoE FFN (``blocks.<i>.ffn.``), else None."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "blocks" and parts[2] == "ffn" and config.is_moe_layer(int(parts[1])):
        return int(parts[1])
    return None


def _moe_tensor(
    key: str, layer: int, fresh: torch.Tensor, specialists: Sequence[Specialist], f: int, pieces: int,
    scale: float, router_init: RouterInit, shared_init: SharedInit,
) -> torch.Tensor:
    prefix = f"blocks.{layer}.ffn."
    name = key[len(prefix):]
    if name in ("experts.0.gate_up_proj", "experts.0.down_proj"):
        which = name.split(".")[-1]
        dense_key = prefix + which  # the specialist's SwiGLU: gate_up_proj [2, F, D], down_proj [D, F]
        pieces_out = []
        for sp in specialists:
            w = sp.state[dense_key]
            for j in range(pieces):
                if which == "gate_up_proj":
                    pieces_out.append(w[:, j * f:(j + 1) * f, :])  # [2, f, D]: gate and up rows of piece j
                else:
                    pieces_out.append(w[:, j * f:(j + 1) * f] * scale)  # [D, f]
        stacked = torch.stack(pieces_out).to(fresh.dtype)  # [E, 2, f, D] or [E, D, f]
        if stacked.shape != fresh.shape:
            raise UpcycleError(f"upcycle: {key} would be {tuple(stacked.shape)} but the MoE layer has {tuple(fresh.shape)}")
        return stacked.contiguous()
    if name == "router.gate.weight":
        gate = fresh.clone()  # [E_dyn + S, D]
        if router_init == "grouped":
            for s in range(len(specialists)):
                gate[s * pieces:(s + 1) * pieces] = gate[s * pieces]
        return gate
    if name == "shared_experts.down_proj" and shared_init == "zero":
        return torch.zeros_like(fresh)
    return fresh.clone()  # shared experts, plug-in experts: fresh (seeded) init


def _average(key: str, fresh: torch.Tensor, specialists: Sequence[Specialist]) -> torch.Tensor:
    tensors = []
    for sp in specialists:
        if key not in sp.state:
            raise UpcycleError(f"upcycle: specialist {sp.name} has no tensor {key!r}")
        t = sp.state[key]
        if t.shape != fresh.shape:
            raise UpcycleError(f"upcycle: {sp.name}'s {key} is {tuple(t.shape)}, expected {tuple(fresh.shape)}")
        tensors.append(t.double())
    return (torch.stack(tensors).mean(0)).to(fresh.dtype)


def _check_experts_are_swiglu(model) -> None:
    for block in model.blocks:
        if block.is_moe and not isinstance(block.ffn.experts[0], SwiGLUExperts):
            raise UpcycleError(f"upcycle: routed experts must be SwiGLUExperts, got {type(block.ffn.experts[0]).__name__}")


# ---------------------------------------------------------------------- files
def load_specialist(path: str | Path, name: Optional[str] = None) -> Specialist:
    """Open a specialist (a model folder or ``.ckpt``; tensors memory-mapped, read when used)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"specialist checkpoint not found: {path}")
    opened = open_model_file(path)
    metadata, state = opened.metadata, opened.tensors
    label = name or metadata.extra.get("label") or "+".join(metadata.extra.get("data_tasks") or []) or path.stem
    return Specialist(state=state, metadata=metadata, name=str(label), path=str(path))


def upcycle_checkpoints(
    specialists: List[str],
    out: str,
    moe: MoEConfig,
    pieces: int = 2,
    names: Optional[List[str]] = None,
    moe_layers: Optional[List[int]] = None,
    vision_from: Union[None, int, str] = None,
    router_init: RouterInit = "random",
    shared_init: SharedInit = "random",
    expert_scale: Optional[float] = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Upcycle specialist model files into one self-describing MoE model at ``out``.

    Args:
        specialists: specialist model folders or .ckpt files (order = expert order: specialist s owns
            experts s*k..s*k+k-1)
        out: the MoE model to write (atomically): a model folder, or a .ckpt file when the name ends in
            .ckpt; an existing one is kept unless ``overwrite``
        moe: the MoE layer config (``num_routed_experts = N * pieces``, ``routed_intermediate_size = F / pieces``)
        pieces: FFN pieces per specialist (k; the paper: 2)
        names: labels of the specialists (default: their data tasks, e.g. ``tts``)
        moe_layers: layers that become MoE (None = all)
        vision_from: specialist (index, name or path) whose vision encoder is kept (default: the one
            whose data had a task that takes video, e.g. v2m)
        router_init: ``random`` or ``grouped`` (pieces of one specialist share a gate row)
        shared_init: ``random`` or ``zero`` (shared experts' down_proj zeroed)
        expert_scale: factor on each piece's down_proj (default ``pieces``: exact dense output, see above)
        seed: seed of the fresh routers / shared experts
        overwrite: replace an existing ``out``
    """
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"upcycle: {out_path} exists; pass overwrite=True (--overwrite) to replace it")
    if names is not None and len(names) != len(specialists):
        raise UpcycleError(f"upcycle: {len(names)} names for {len(specialists)} specialists")
    loaded = [load_specialist(p, None if names is None else names[i]) for i, p in enumerate(specialists)]
    if len({sp.name for sp in loaded}) != len(loaded):
        loaded = [Specialist(sp.state, sp.metadata, f"{sp.name}{i}", sp.path) for i, sp in enumerate(loaded)]
    result = upcycle(
        loaded, moe, pieces=pieces, moe_layers=moe_layers, vision_from=vision_from, router_init=router_init,
        shared_init=shared_init, expert_scale=expert_scale, seed=seed,
    )
    return save_model(out_path, result.model, result.metadata)
