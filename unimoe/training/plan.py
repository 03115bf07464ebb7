"""``unimoe plan``: read a stage recipe (or one stage of a curriculum) into a memory estimate.

What it reads, and from where:

* the model: the stage's ``model.init_args.model`` (a preset or ``AudioLMConfig`` fields); else
  the ``init_from`` checkpoint's config when that file exists (read memory-mapped, no weights
  loaded); in a curriculum, else the stage it starts from (an upcycle stage = its first
  specialist's model with the upcycle's ``moe``); ``--model`` overrides all;
* what trains: ``WarmupStage``'s ``trainable`` globs (its default when unset), other stages'
  ``freeze`` globs;
* the layout: ``trainer.devices x trainer.num_nodes`` (or ``--gpus``), ``trainer.precision``
  and ``trainer.strategy``: ``auto``/``ddp*``/``DDPStrategy`` (replicated), ``fsdp``/
  ``FSDPStrategy``, ``ModelParallelStrategy`` (FSDP2) and
  ``unimoe.training.parallel.MoEParallelStrategy`` (FSDP2 x expert parallel) by its init args
  ``expert_parallel_size``, ``data_parallel_size``, ``mixed_precision``,
  ``activation_checkpointing``, ``reshard_after_forward`` (read from the YAML: the class need
  not be importable); activation checkpointing is on when the strategy or the model
  (``gradient_checkpointing``) says so;
* the micro-batch: ``data.init_args.max_tokens`` padded tokens, all of them labelled; routed
  experts per token at the router's upper bound (top-p over ``E`` picks up to ``ceil(p E)``:
  what a freshly upcycled, still near-uniform router does in the first warmup and joint
  steps); videos per micro-batch from the sources' shard index when it is readable (the
  shortest video-to-music sequence fills the budget), else from the vision encoder's input
  size with 500 codec frames of audio per clip.

Every number it assumes is listed in the report's ``assumptions``.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from unimoe.model.config import AudioLMConfig
from unimoe.training.memory import (
    GiB, SHARDED_PRECISIONS, TRAINER_PRECISIONS, Layout, Precision, Workload, estimate, fits,
    model_shape, trainable_names,
)

PLACEHOLDER_DATA_ROOT = "/DATA_ROOT"
"""Stands in for ``${data_root}`` when none is given: the plan needs no data files."""

MOE_PARALLEL_ARGS = ("expert_parallel_size", "data_parallel_size", "activation_checkpointing", "mixed_precision",
                     "reshard_after_forward", "save_distributed_checkpoint", "process_group_backend", "timeout")
"""Init args of ``unimoe.training.parallel.MoEParallelStrategy`` (its documented YAML contract)."""
MODEL_PARALLEL_ARGS = ("data_parallel_size", "tensor_parallel_size", "save_distributed_checkpoint",
                       "process_group_backend", "timeout")
AUDIO_FRAMES_PER_VIDEO_CLIP = 500
"""Codec frames assumed per video-to-music clip when no shard index is readable (10 s at 50 Hz)."""


class PlanError(ValueError):
    """The recipe cannot be planned; the message names the file, field and numbers."""


@dataclass
class StageRecipe:
    """A stage's composed LightningCLI config and where it came from."""

    config: dict[str, Any]
    where: str
    curriculum: Any = None
    stage: Any = None


@dataclass
class PlanInputs:
    model: AudioLMConfig
    model_source: str
    stage_class: str
    trainable: list[str]
    layout: Layout
    strategy: dict[str, Any]
    workload: Workload
    assumptions: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- reading recipes
def load_stage(path: str | Path, stage: Optional[str] = None, data_root: Optional[str] = None) -> StageRecipe:
    """A stage recipe file, or stage ``stage`` of a curriculum file (``stages:``), composed by the
    one composition path (:mod:`unimoe.training.recipes`) exactly as ``unimoe fit`` / ``unimoe
    curriculum`` compose it."""
    from unimoe.training.recipe_vars import RecipeError, resolve_data_root
    from unimoe.training.recipes import compose_file, load_tree

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"--config {path}: file not found")
    try:
        tree, _ = load_tree(path)
        if "stages" in tree:
            return _curriculum_stage(path, tree, stage, data_root)
        if stage is not None:
            raise PlanError(f"--stage {stage!r}: {path} is a stage recipe, not a curriculum (it has no 'stages')")
        root = resolve_data_root(data_root) or Path(PLACEHOLDER_DATA_ROOT)
        config = compose_file(path, root)
    except RecipeError as exc:
        raise PlanError(str(exc)) from exc
    return StageRecipe(config=config, where=str(path))


def _curriculum_stage(path: Path, tree: dict[str, Any], stage: Optional[str], data_root: Optional[str]) -> StageRecipe:
    import os

    from unimoe.training.curriculum import compose_stage, load_curriculum
    from unimoe.training.recipe_vars import ENV_DATA_ROOT

    has_root = bool(tree.get("data_root")) or bool(os.environ.get(ENV_DATA_ROOT))
    cur = load_curriculum(path, data_root=data_root or (None if has_root else PLACEHOLDER_DATA_ROOT))
    fit = [s.name for s in cur.stages if s.kind == "fit"]
    if stage is None:
        raise PlanError(f"{path} is a curriculum: choose a stage with --stage NAME (training stages: {', '.join(fit)})")
    try:
        chosen = cur.stage(stage)
    except KeyError:
        close = difflib.get_close_matches(stage, [s.name for s in cur.stages], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PlanError(f"--stage {stage!r}: no such stage in {path}{hint}; training stages: {', '.join(fit)}") from None
    if chosen.kind != "fit":
        raise PlanError(f"--stage {stage!r} is an upcycle stage: it trains nothing; training stages: {', '.join(fit)}")
    return StageRecipe(config=compose_stage(cur, chosen), where=f"{path} stage {stage!r}", curriculum=cur, stage=chosen)


# ---------------------------------------------------------------------- the model
def model_config(value: Any, where: str) -> AudioLMConfig:
    """A preset name, ``{preset: ..., fields}``, a mapping of AudioLMConfig fields, or a YAML file / string of one."""
    from unimoe.model.config import model_config as parse_model

    if isinstance(value, str):
        candidate = Path(value)
        if candidate.suffix in (".yaml", ".yml", ".json") and candidate.is_file():
            value = yaml.safe_load(candidate.read_text(encoding="utf-8"))
        elif value.lstrip().startswith("{"):
            value = yaml.safe_load(value)
    if isinstance(value, dict) and "class_path" in value:
        value = value.get("init_args") or {}
    try:
        return parse_model(value, where)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise PlanError(message if message.startswith(where) else f"{where}: {message}") from exc


def resolve_model(recipe: StageRecipe, override: Any = None) -> tuple[AudioLMConfig, str]:
    if override is not None:
        return model_config(override, "--model"), "--model"
    args = _init_args(recipe.config.get("model"))
    if args.get("model") is not None:
        return model_config(args["model"], f"{recipe.where}: model.init_args.model"), "model.init_args.model"
    init = args.get("init_from")
    path = init.get("path") if isinstance(init, dict) else init
    if path is not None and Path(str(path)).exists():
        return _checkpoint_config(Path(str(path))), f"init_from checkpoint {path}"
    if recipe.curriculum is not None and recipe.stage is not None and recipe.stage.init_from is not None:
        return _curriculum_model(recipe.curriculum, recipe.stage, ())
    hint = f" (init_from {path} does not exist yet)" if path else ""
    raise PlanError(f"{recipe.where}: the stage's model comes from its init_from checkpoint{hint}; give --model "
                    f"PRESET|YAML, or plan the curriculum file with --stage NAME")


def _checkpoint_config(path: Path) -> AudioLMConfig:
    """The model config a ``.ckpt`` or model folder records (memory-mapped, ``weights_only``: nothing runs)."""
    from unimoe.checkpoint import CheckpointError, open_model_file

    try:
        return open_model_file(path).metadata.config
    except CheckpointError as exc:
        raise PlanError(str(exc)) from exc


def _curriculum_model(cur: Any, stage: Any, seen: tuple[str, ...]) -> tuple[AudioLMConfig, str]:
    """The model a curriculum stage trains, derived through the stages it starts from."""
    from unimoe.model.config import moe_config
    from unimoe.training.curriculum import compose_stage
    from unimoe.training.curriculum.schema import checkpoint_of as _checkpoint_of, looks_like_path as _looks_like_path

    if stage.name in seen:
        raise PlanError(f"stage {stage.name!r}: init_from loops back to itself")
    final = stage.final_checkpoint(cur.root)
    if final.is_file():
        return _checkpoint_config(final), f"checkpoint {final}"
    if stage.kind == "upcycle":
        spec = stage.upcycle
        first = spec["specialists"][0]
        if isinstance(first, str) and not _looks_like_path(first):
            dense, src = _curriculum_model(cur, cur.stage(first), (*seen, stage.name))
        else:
            dense, src = _checkpoint_config(_checkpoint_of(cur, str(first))), f"checkpoint {first}"
        try:
            moe = moe_config(spec["moe"], f"stage {stage.name!r}: upcycle.moe")
        except (TypeError, ValueError) as exc:
            raise PlanError(f"stage {stage.name!r}: upcycle.moe: {exc}") from exc
        return dense.replace(moe=moe, moe_layers=spec.get("moe_layers")), f"upcycle {stage.name!r} of {src}"
    args = _init_args(compose_stage(cur, stage).get("model"))
    if args.get("model") is not None:
        return model_config(args["model"], f"stage {stage.name!r}: model.init_args.model"), f"stage {stage.name!r}"
    ref = stage.init_from if isinstance(stage.init_from, str) else (stage.init_from or {}).get("stage") or \
        (stage.init_from or {}).get("path")
    if ref is None:
        raise PlanError(f"stage {stage.name!r} has neither model.init_args.model nor init_from")
    if _looks_like_path(str(ref)):
        path = _checkpoint_of(cur, str(ref))
        if not path.is_file():
            raise PlanError(f"stage {stage.name!r}: init_from {path} does not exist; give --model")
        return _checkpoint_config(path), f"checkpoint {path}"
    return _curriculum_model(cur, cur.stage(ref), (*seen, stage.name))


def _init_args(section: Any) -> dict[str, Any]:
    if isinstance(section, dict):
        return dict(section.get("init_args") or {})
    return {}


def stage_trainable(recipe: StageRecipe, model: Any) -> tuple[str, list[str]]:
    """The stage class's short name and the parameter names it trains."""
    section = recipe.config.get("model")
    class_path = section.get("class_path", "") if isinstance(section, dict) else str(section or "")
    short = class_path.rsplit(".", 1)[-1]
    args = _init_args(section)
    cls = _stage_class(short)
    if cls is not None:
        needs_moe = short in ("WarmupStage", "JointStage")
        if needs_moe and model.config.moe is None:
            raise PlanError(f"{recipe.where}: {short} trains an MoE model, but the model is dense (moe: null)")
        if short == "SpecialistStage" and model.config.moe is not None:
            raise PlanError(f"{recipe.where}: SpecialistStage trains a dense model, but the model has moe set")
    try:
        if "trainable" in args or (cls is not None and "trainable" in inspect.signature(cls.__init__).parameters):
            default = inspect.signature(cls.__init__).parameters["trainable"].default if cls is not None else None
            return short, trainable_names(model, trainable=args.get("trainable", default))
        return short, trainable_names(model, freeze=args.get("freeze") or ())
    except ValueError as exc:
        raise PlanError(f"{recipe.where}: model.init_args: {exc}") from exc


def _stage_class(short: str):
    from unimoe.training import stages

    cls = getattr(stages, short, None)
    return cls if isinstance(cls, type) else None


# ---------------------------------------------------------------------- the layout
def world_size(trainer: dict[str, Any], gpus: Optional[int], where: str) -> int:
    if gpus is not None:
        if gpus < 1:
            raise PlanError(f"--gpus must be >= 1, got {gpus}")
        return gpus
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if isinstance(devices, list):
        count = len(devices)
    elif isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        count = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    else:
        raise PlanError(f"{where}: trainer.devices is {devices!r}, which depends on the machine; pass --gpus N")
    if not isinstance(nodes, int) or nodes < 1:
        raise PlanError(f"{where}: trainer.num_nodes must be a positive int, got {nodes!r}")
    return count * nodes


def layout_from_trainer(trainer: dict[str, Any], model: AudioLMConfig, world: int, where: str,
                        strategy_override: Any = None) -> tuple[Layout, dict[str, Any]]:
    """The memory layout of ``trainer.strategy`` (or ``strategy_override``) at ``world`` devices."""
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    gpu = accelerator not in ("cpu",)
    precision_name = str(trainer.get("precision", "32-true"))
    if precision_name not in TRAINER_PRECISIONS:
        raise PlanError(f"{where}: trainer.precision {precision_name!r} is not one unimoe plan knows: "
                        f"{', '.join(TRAINER_PRECISIONS)}")
    precision = TRAINER_PRECISIONS[precision_name]
    strategy = trainer.get("strategy", "auto") if strategy_override is None else strategy_override
    field_name = "--strategy" if strategy_override is not None else "trainer.strategy"
    ac_model = bool(model.gradient_checkpointing)
    if strategy is None or isinstance(strategy, str):
        name = (strategy or "auto").lower()
        if name == "auto":
            kind = "single" if world == 1 else "ddp"
        elif name.startswith("ddp"):
            kind = "ddp"
        elif name == "single_device":
            if world != 1:
                raise PlanError(f"{where}: {field_name} single_device runs on one device, but the world size is {world}")
            kind = "single"
        elif name.startswith("fsdp"):
            return _sharded(world, 1, _fsdp1_precision(precision), ac_model, True, gpu), \
                {"name": name, "kind": "fsdp", "world_size": world, "precision": precision.name}
        else:
            raise PlanError(f"{where}: unknown {field_name} {strategy!r}; unimoe plan knows auto, ddp*, single_device, "
                            f"fsdp, DDPStrategy, FSDPStrategy, ModelParallelStrategy and MoEParallelStrategy")
        if kind == "single" and world > 1:
            kind = "ddp"
        return Layout(kind, precision, world_size=world, activation_checkpointing=ac_model, gpu=gpu), \
            {"name": name, "kind": kind, "world_size": world, "precision": precision.name}
    if not isinstance(strategy, dict) or "class_path" not in strategy:
        raise PlanError(f"{where}: {field_name} must be a name or {{class_path, init_args}}, got {strategy!r}")
    class_path = str(strategy["class_path"])
    short = class_path.rsplit(".", 1)[-1]
    args = dict(strategy.get("init_args") or {})
    if short == "MoEParallelStrategy":
        return _moe_parallel(args, model, world, where, field_name, ac_model, gpu, precision_name)
    if short == "ModelParallelStrategy":
        _unknown_args(args, MODEL_PARALLEL_ARGS, f"{where}: {field_name}.init_args ({short})")
        tp = args.get("tensor_parallel_size", "auto")
        if tp not in ("auto", 1):
            raise PlanError(f"{where}: {field_name}.init_args.tensor_parallel_size={tp}: unimoe plans no tensor "
                            "parallelism (the AudioLM is sharded with FSDP2 only); use 1")
        dp = args.get("data_parallel_size", "auto")
        if dp != "auto" and dp != world:
            raise PlanError(f"{where}: {field_name}.init_args.data_parallel_size={dp} x tensor_parallel_size=1 "
                            f"= {dp}, but the world size is {world} (num_nodes x devices)")
        layout = _sharded(world, 1, _fsdp1_precision(precision), ac_model, True, gpu)
        return layout, {"name": short, "kind": "fsdp", "world_size": world, "data_parallel_size": world,
                        "precision": layout.precision.name}
    if short == "DDPStrategy":
        return Layout("ddp", precision, world_size=world, activation_checkpointing=ac_model, gpu=gpu), \
            {"name": short, "kind": "ddp", "world_size": world, "precision": precision.name}
    if short == "FSDPStrategy":
        return _sharded(world, 1, _fsdp1_precision(precision), ac_model, True, gpu), \
            {"name": short, "kind": "fsdp", "world_size": world, "precision": precision.name}
    if short == "SingleDeviceStrategy":
        return Layout("single", precision, world_size=1, activation_checkpointing=ac_model, gpu=gpu), \
            {"name": short, "kind": "single", "world_size": 1, "precision": precision.name}
    raise PlanError(f"{where}: unknown {field_name} class {class_path!r}; unimoe plan knows DDPStrategy, FSDPStrategy, "
                    f"ModelParallelStrategy, unimoe.training.parallel.MoEParallelStrategy (and the names auto, ddp, fsdp)")


def _fsdp1_precision(p: Precision) -> Precision:
    """Sharded mixed precision keeps fp32 master shards and computes in the low dtype (no autocast)."""
    if p.autocast:
        return Precision(f"{p.name} (sharded)", 4, p.compute_bytes, p.compute_bytes)
    return p


def _sharded(world: int, ep: int, precision: Precision, ac: bool, reshard: bool, gpu: bool) -> Layout:
    return Layout("fsdp", precision, world_size=world, expert_parallel_size=ep, activation_checkpointing=ac,
                  reshard_after_forward=reshard, gpu=gpu)


def _moe_parallel(args: dict[str, Any], model: AudioLMConfig, world: int, where: str, field_name: str, ac_model: bool,
                  gpu: bool, trainer_precision: str) -> tuple[Layout, dict[str, Any]]:
    at = f"{where}: {field_name}.init_args"
    _unknown_args(args, MOE_PARALLEL_ARGS, f"{at} (MoEParallelStrategy)")
    ep = args.get("expert_parallel_size", 1)
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise PlanError(f"{at}.expert_parallel_size must be an integer >= 1, got {ep!r}")
    if world % ep:
        raise PlanError(f"{at}.expert_parallel_size={ep} does not divide the world size {world} (num_nodes x devices); "
                        f"use a world size that is a multiple of {ep}")
    dp = args.get("data_parallel_size", "auto")
    if dp != "auto" and (not isinstance(dp, int) or dp * ep != world):
        raise PlanError(f"{at}: data_parallel_size={dp} x expert_parallel_size={ep} = "
                        f"{dp * ep if isinstance(dp, int) else '?'}, but the world size is {world} (num_nodes x devices); "
                        f"set data_parallel_size: {world // ep} (or 'auto')")
    if ep > 1:
        moe = model.moe
        if moe is None:
            raise PlanError(f"{at}.expert_parallel_size={ep} needs an MoE model, but this stage's model is dense "
                            "(moe: null): use expert_parallel_size: 1")
        counts = [("MoEConfig.num_routed_experts", moe.num_routed_experts)]
        counts += [(f"MoEConfig.extra_experts[{i}].num_experts", int(spec.get("num_experts", 0)))
                   for i, spec in enumerate(moe.extra_experts) if isinstance(spec, dict)]
        for name, n in counts:
            if n % ep:
                raise PlanError(f"{name}={n} is not divisible by {field_name}.init_args.expert_parallel_size={ep}: every "
                                f"EP rank must hold the same number of experts (use an expert_parallel_size that divides {n})")
    mp = args.get("mixed_precision", "bf16")
    if mp not in SHARDED_PRECISIONS:
        raise PlanError(f"{at}.mixed_precision must be one of {', '.join(SHARDED_PRECISIONS)}, got {mp!r}")
    ac = bool(args.get("activation_checkpointing", False)) or ac_model
    reshard = bool(args.get("reshard_after_forward", True))
    layout = _sharded(world, ep, SHARDED_PRECISIONS[mp], ac, reshard, gpu)
    info = {"name": "MoEParallelStrategy", "kind": "fsdp", "world_size": world, "expert_parallel_size": ep,
            "data_parallel_size": world // ep, "mixed_precision": mp, "activation_checkpointing": ac,
            "reshard_after_forward": reshard}
    if trainer_precision not in ("32", "32-true"):
        info["warning"] = (f"trainer.precision is {trainer_precision!r}; MoEParallelStrategy's mixed_precision sets "
                           "the precision, leave trainer.precision at 32-true")
    return layout, info


def _unknown_args(args: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in args:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PlanError(f"{where}: unknown init arg {key!r}{hint}; known: {', '.join(known)}")


# ---------------------------------------------------------------------- the micro-batch
def workload(recipe: StageRecipe, model: Any, trainable: list[str], *, max_tokens: Optional[int] = None,
             active_experts: Optional[float] = None, videos: Optional[int] = None) -> tuple[Workload, list[str]]:
    from unimoe.data.datamodule import UniMoEDataModule
    from unimoe.model.params import active_experts_range
    from unimoe.moe.layer import MoELayer

    notes: list[str] = []
    data = _init_args(recipe.config.get("data"))
    defaults = inspect.signature(UniMoEDataModule.__init__).parameters
    tokens = max_tokens or data.get("max_tokens") or defaults["max_tokens"].default
    if not isinstance(tokens, int) or tokens < 1:
        raise PlanError(f"{recipe.where}: data.init_args.max_tokens must be a positive int, got {tokens!r}")
    notes.append(f"micro-batch of {tokens} padded tokens (data.init_args.max_tokens), all labelled")
    k = 0.0
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if moe_layers:
        if active_experts is not None:
            k = float(active_experts)
            notes.append(f"{k:g} real routed experts per token (--active-experts)")
        else:
            k = float(max(active_experts_range(m)[1] for m in moe_layers))
            notes.append(f"{k:g} real routed experts per token: the router's upper bound (a fresh, near-uniform "
                         "router picks that many; --active-experts K for a trained one)")
    n_videos, patches = 0, 0
    if model.vision is not None:
        vision_trains = any(n.startswith("vision.") for n in trainable)
        n_videos, patches, note = _videos(data, model.vision, tokens, videos)
        notes.append(note + ("" if vision_trains else "; the vision tower is frozen: it keeps no activations"))
    return Workload(tokens=tokens, active_experts=k, videos=n_videos, patches_per_video=patches), notes


def _videos(data: dict[str, Any], vision: Any, tokens: int, override: Optional[int]) -> tuple[int, int, str]:
    """(videos per micro-batch, ViT patches per video, how they were found)."""
    import numpy as np

    tp, p, m = vision.temporal_patch_size, vision.patch_size, vision.merge_size

    def patches(frames, h, w):
        return np.ceil(np.asarray(frames) / tp).astype(np.int64) * (np.asarray(h) // p) * (np.asarray(w) // p)

    default_patches = int(patches(vision.input_frames, *vision.input_size))
    if override is not None:
        if override < 0:
            raise PlanError(f"--videos must be >= 0, got {override}")
        if override == 0:
            return 0, 0, "no video per micro-batch (--videos 0)"
        return override, default_patches, f"{override} videos per micro-batch (--videos), {default_patches} patches each"
    rows = _video_rows(data)
    if rows is None:
        seq = int(default_patches // (m * m)) + AUDIO_FRAMES_PER_VIDEO_CLIP
        n = max(1, tokens // seq)
        cap = data.get("max_batch_size")
        n = min(n, cap) if isinstance(cap, int) else n
        return n, default_patches, (f"{n} videos per micro-batch (no shard index readable: {default_patches} patches "
                                    f"per video from the vision encoder's input, {AUDIO_FRAMES_PER_VIDEO_CLIP} codec "
                                    f"frames per clip; --videos N to set)")
    frames, vf, size = rows
    if not len(vf):
        return 0, 0, "no video in the sources' shard index: the vision tower sees no input"
    per_video = patches(vf, size[:, 0], size[:, 1])
    seq = per_video // (m * m) + frames
    n = max(1, tokens // int(seq.min()))
    cap = data.get("max_batch_size")
    n = min(n, cap) if isinstance(cap, int) else n
    return n, int(per_video.max()), (f"{n} videos per micro-batch (the shortest video-to-music sequence in the shard "
                                     f"index fills max_tokens), {int(per_video.max())} patches each")


def _video_rows(data: dict[str, Any]):
    """Frames, video frames and sizes of the indexed rows that have video, or None if no index is readable."""
    import numpy as np

    from unimoe.data.index import open_index
    from unimoe.data.shards import ShardError

    sources = data.get("sources")
    if not isinstance(sources, dict) or not sources:
        return None
    frames, vf, size = [], [], []
    for dirs in sources.values():
        for d in [dirs] if isinstance(dirs, str) else list(dirs or []):
            if not (Path(d).is_dir()):
                return None
            try:
                index = open_index(d)
            except ShardError:
                return None
            v = np.asarray(index.column("video_frames"))
            keep = np.nonzero(v > 0)[0]
            frames.append(np.asarray(index.column("frames"))[keep])
            vf.append(v[keep])
            size.append(np.asarray(index.column("video_size"))[keep])
    return np.concatenate(frames), np.concatenate(vf), np.concatenate(size).reshape(-1, 2)


# ---------------------------------------------------------------------- the plan
def plan_inputs(recipe: StageRecipe, *, gpus: Optional[int] = None, model: Any = None, strategy: Any = None,
                activation_checkpointing: Optional[bool] = None, max_tokens: Optional[int] = None,
                active_experts: Optional[float] = None, videos: Optional[int] = None) -> tuple[PlanInputs, Any]:
    """Everything the estimate needs, and the meta-device model (for counts)."""
    from unimoe.model.transformer import meta_model

    config, source = resolve_model(recipe, model)
    try:
        meta = meta_model(config)
    except Exception as exc:  # noqa: BLE001 - a config the model cannot be built from
        raise PlanError(f"{recipe.where}: the model ({source}) cannot be built: {exc}") from exc
    stage_class, trainable = stage_trainable(recipe, meta)
    trainer = recipe.config.get("trainer") or {}
    world = world_size(trainer, gpus, recipe.where)
    layout, info = layout_from_trainer(trainer, config, world, recipe.where, strategy)
    if activation_checkpointing is not None:
        layout = _replace_layout(layout, activation_checkpointing=activation_checkpointing)
        info = {**info, "activation_checkpointing": activation_checkpointing}
    info.setdefault("activation_checkpointing", layout.activation_checkpointing)
    work, notes = workload(recipe, meta, trainable, max_tokens=max_tokens, active_experts=active_experts, videos=videos)
    return PlanInputs(config, source, stage_class, trainable, layout, info, work, notes), meta


def _replace_layout(layout: Layout, **changes: Any) -> Layout:
    import dataclasses

    return dataclasses.replace(layout, **changes)


def make_plan(inputs: PlanInputs, meta: Any, *, device_gib: float, reserve_gib: float,
              gpus_per_node: int = 8) -> dict[str, Any]:
    """The report: components, totals with and without activation checkpointing, whether it fits."""
    shape = model_shape(meta, inputs.trainable)
    layout = inputs.layout
    est = estimate(shape, layout, inputs.workload)
    other = estimate(shape, _replace_layout(layout, activation_checkpointing=not layout.activation_checkpointing),
                     inputs.workload)
    with_ac, without_ac = (est, other) if layout.activation_checkpointing else (other, est)
    device, reserve = device_gib * GiB, reserve_gib * GiB
    return {
        "stage_class": inputs.stage_class,
        "model": {"source": inputs.model_source, "total_params": shape.total, "trainable_params": shape.trainable,
                  "moe": inputs.model.moe is not None, "layers": shape.layers, "hidden_size": shape.hidden},
        "strategy": inputs.strategy,
        "world_size": layout.world_size,
        "nodes": math.ceil(layout.world_size / gpus_per_node),
        "gpus_per_node": gpus_per_node,
        "workload": {"max_tokens": inputs.workload.tokens, "active_experts": inputs.workload.active_experts,
                     "videos_per_micro_batch": inputs.workload.videos,
                     "patches_per_video": inputs.workload.patches_per_video},
        "components_gb": est.gib(),
        "activations_gb": {"with_checkpointing": round(with_ac.components["activations"] / GiB, 2),
                           "without_checkpointing": round(without_ac.components["activations"] / GiB, 2)},
        "per_device_gb": round(est.peak / GiB, 2),
        "peak_phase": est.peak_phase,
        "per_device_gb_with_checkpointing": round(with_ac.peak / GiB, 2),
        "per_device_gb_without_checkpointing": round(without_ac.peak / GiB, 2),
        "activation_checkpointing": layout.activation_checkpointing,
        "device_memory_gb": device_gib,
        "reserve_gb": reserve_gib,
        "fits": fits(est.peak, device, reserve),
        "fits_with_checkpointing": fits(with_ac.peak, device, reserve),
        "fits_without_checkpointing": fits(without_ac.peak, device, reserve),
        "assumptions": list(inputs.assumptions),
    }


def smallest_fitting_world(inputs: PlanInputs, meta: Any, *, device_gib: float, reserve_gib: float,
                           gpus_per_node: int, max_nodes: int = 512) -> Optional[int]:
    """The fewest nodes (of ``gpus_per_node``) whose plan fits with the same strategy settings; None if none does."""
    shape = model_shape(meta, inputs.trainable)
    layout = inputs.layout
    step = gpus_per_node
    if layout.expert_parallel_size > 1:
        step = math.lcm(gpus_per_node, layout.expert_parallel_size)
    for world in range(step, max_nodes * gpus_per_node + 1, step):
        trial = _replace_layout(layout, world_size=world)
        if fits(estimate(shape, trial, inputs.workload).peak, device_gib * GiB, reserve_gib * GiB):
            return math.ceil(world / gpus_per_node)
        if layout.strategy != "fsdp":
            return None  # replicated: more devices do not shrink a device's share
    return None


def parse_memory(text: str) -> float:
    """``80GB`` / ``80GiB`` / ``81559MiB`` / ``80`` -> GiB (GB and GiB both mean 2^30 bytes, as nvidia-smi's sizes)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise PlanError(f"--gpu-memory {text!r}: expected a size like 80GB, 141GiB or 81559MiB")
    value, unit = float(match.group(1)), (match.group(2) or "G").upper()
    scale = {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 1024.0}[unit[0]]
    if value <= 0:
        raise PlanError(f"--gpu-memory must be positive, got {text!r}")
    return value * scale
