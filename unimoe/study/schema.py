"""A study file (arms x seeds), parsed into per-cell curricula with shared, content-addressed stages.

Schema (unknown keys are errors with a "did you mean"; ``x-*`` keys hold YAML anchors)::

    name: curriculum-study          # MLflow experiment; the report's title
    description: ...
    root: runs/study                # relative to the cwd; --root overrides
    data_root: ../../data/demo      # relative to this file; --data_root / $UNIMOE_DATA_ROOT override
    seeds: [0, 1, 2]
    scale: 1.0                      # stage lengths x scale (x --scale): see SCALED_KEYS
    checkpoint_every_n_steps: 40
    defaults: {trainer: {...}}      # deep-merged into every arm curriculum's defaults (under the stage files)
    overrides: {data: {...}}        # deep-merged into every fit stage's inline keys (over the stage files)
    evaluate:                       # offline evaluation of every final model (null: none)
      {suite: demo, manifest: "${data_root}/corpus/manifests/{task}.jsonl", split: test, limit: null,
       generation: {max_seconds: 6.0}}   # GenerationSettings fields for the final models' test clips
    arms:
      - name: specialists           # a curriculum (any `unimoe curriculum` file) ...
        curriculum: ../demo/curriculum.yaml
        until: specialist_v2m       # optional: its stages up to this one
        stages: {specialist_tts: {trainer: {max_steps: 100}}}   # per-stage inline overrides
        final: {tts: specialist_tts, t2m: specialist_t2m, v2m: specialist_v2m}  # task -> model (default: last stage)
      - name: dense_joint           # ... or one stage recipe (a one-stage curriculum) with inline overrides
        recipe: ../demo/specialist.yaml
        model: {...}  data: {...}  trainer: {...}

Every arm becomes, per seed, a :class:`~unimoe.training.curriculum.Curriculum` (the same
parser and composition as ``unimoe curriculum``); the seed sets ``seed_everything`` of every
fit stage and the fresh initialisation (``model.init_args.seed``) of stages that start from
scratch. A stage's folder is named by a hash of everything that determines it (its composed
config with the folders of the stages it starts from, or its upcycle options), so a stage that
two arms share at one seed (the specialists of arms 1 and 4) is one folder, trained once.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from unimoe.training.curriculum.compose import compose_stage
from unimoe.training.curriculum.schema import Curriculum, Stage, checkpoint_of, load_curriculum, reject_unknown
from unimoe.training.recipe_vars import RecipeError, resolve_data_root
from unimoe.training.recipes import deep_merge, drop_anchor_keys, load_tree, read_yaml, substitute_tree

TOP_KEYS = ("name", "description", "root", "data_root", "seeds", "scale", "checkpoint_every_n_steps", "defaults",
            "overrides", "evaluate", "arms", "extends")
CURRICULUM_ARM_KEYS = ("name", "description", "curriculum", "until", "stages", "final")
RECIPE_ARM_KEYS = ("name", "description", "recipe", "model", "data", "trainer", "final")
EVALUATE_KEYS = ("suite", "manifest", "split", "limit", "skip_unavailable", "generation")
SCALED_KEYS = (("trainer", "max_steps"), ("trainer", "val_check_interval"),
               ("model", "init_args", "optimizer", "warmup_steps"), ("model", "init_args", "load_balance", "steps"))
"""Lengths that ``scale`` multiplies in every fit stage's composed config (ints, at least 1)."""
STAGES_DIR = "stages"
KEY_ROOT = Path("/study-key")  # where stage keys pretend the study lives: folders never enter a key
CELLS_DIR = "cells"


@dataclass
class SharedStage(Stage):
    """A curriculum stage whose folder is fixed (content-addressed under the study root), whatever the root."""

    folder: Optional[Path] = None

    def directory(self, root: Path) -> Path:
        return self.folder if self.folder is not None else super().directory(root)


@dataclass
class Arm:
    name: str
    description: str
    spec: dict[str, Any]  # the arm's entry as written (curriculum/recipe + overrides)
    final: dict[str, str]  # task -> stage name whose final model serves it ({} = the last stage, all tasks)


@dataclass
class Cell:
    """One arm at one seed: its curriculum (stages in shared folders) and its own folder."""

    arm: Arm
    seed: int
    curriculum: Curriculum
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.arm.name}/seed{self.seed}"

    def stages(self) -> list[Stage]:
        return list(self.curriculum.stages)

    def final_stages(self) -> dict[str, Stage]:
        """Task -> the stage whose final model is evaluated for it ("*" = every task of the last stage)."""
        if not self.arm.final:
            return {"*": self.curriculum.stages[-1]}
        return {task: self.curriculum.stage(name) for task, name in self.arm.final.items()}


@dataclass
class Study:
    name: str
    description: str
    root: Path
    data_root: Optional[Path]
    seeds: list[int]
    scale: float
    checkpoint_every_n_steps: int
    defaults: dict[str, Any]
    overrides: dict[str, Any]
    evaluate: Optional[dict[str, Any]]
    arms: list[Arm]
    source: Path
    cells: list[Cell] = field(default_factory=list)

    @property
    def stages_root(self) -> Path:
        return self.root / STAGES_DIR


def load_study(path: str | Path, *, root: Optional[str] = None, data_root: Optional[str] = None,
               scale: Optional[float] = None, seeds: Optional[list[int]] = None) -> Study:
    """Parse a study file and build every cell's curriculum (errors name the file and field)."""
    path = Path(path).resolve()
    raw, origin = load_tree(path)
    for file in set(origin.values()):
        reject_unknown(read_yaml(file).keys(), TOP_KEYS, str(file))
    resolved_root = resolve_data_root(data_root, raw.get("data_root"), origin.get("data_root", path).parent)
    raw = drop_anchor_keys(raw)
    raw = substitute_tree({k: v for k, v in raw.items() if k != "data_root"}, resolved_root, str(path))
    name = raw.get("name") or path.stem
    seed_list = seeds if seeds is not None else raw.get("seeds", [0])
    if not isinstance(seed_list, list) or not seed_list or not all(isinstance(s, int) for s in seed_list):
        raise RecipeError(f"{path}: field 'seeds' must be a non-empty list of ints, got {seed_list!r}")
    if len(set(seed_list)) != len(seed_list):
        raise RecipeError(f"{path}: field 'seeds' repeats a seed: {seed_list}")
    base_scale = raw.get("scale", 1.0)
    if not isinstance(base_scale, (int, float)) or base_scale <= 0:
        raise RecipeError(f"{path}: field 'scale' must be a positive number, got {base_scale!r}")
    if scale is not None and scale <= 0:
        raise RecipeError(f"--scale must be positive, got {scale}")
    every = raw.get("checkpoint_every_n_steps", 50)
    if not isinstance(every, int) or every < 1:
        raise RecipeError(f"{path}: field 'checkpoint_every_n_steps' must be a positive int, got {every!r}")
    defaults, overrides = raw.get("defaults") or {}, raw.get("overrides") or {}
    for key, value in (("defaults", defaults), ("overrides", overrides)):
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: field {key!r} must be a mapping")
    evaluate = raw.get("evaluate")
    if evaluate is not None:
        if not isinstance(evaluate, dict) or "suite" not in evaluate or "manifest" not in evaluate:
            raise RecipeError(f"{path}: field 'evaluate' must be null or a mapping with 'suite' and 'manifest'")
        reject_unknown(evaluate.keys(), EVALUATE_KEYS, f"{path}: evaluate")
    items = raw.get("arms")
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{path}: field 'arms' must be a non-empty list")
    arms = [_parse_arm(item, i, origin.get("arms", path)) for i, item in enumerate(items)]  # paths: relative to the file naming them
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise RecipeError(f"{path}: two arms share a name: {names}")
    study = Study(name=name, description=str(raw.get("description") or ""),
                  root=Path(root or raw.get("root") or Path("runs") / name).expanduser().resolve(),
                  data_root=resolved_root, seeds=seed_list, scale=float(base_scale) * (scale or 1.0),
                  checkpoint_every_n_steps=every, defaults=defaults, overrides=overrides, evaluate=evaluate, arms=arms, source=path)
    study.cells = [build_cell(study, arm, seed) for seed in study.seeds for arm in study.arms]
    return study


def _parse_arm(item: Any, index: int, source: Path) -> Arm:
    where = f"{source}: arms[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"] \
            or "/" in item["name"] or item["name"].startswith("."):
        raise RecipeError(f"{where} must be a mapping with a plain 'name' (a folder name)")
    where = f"{source}: arm {item['name']!r}"
    if ("curriculum" in item) == ("recipe" in item):
        raise RecipeError(f"{where}: give exactly one of 'curriculum' (a curriculum file) or 'recipe' (a stage recipe)")
    reject_unknown(item.keys(), CURRICULUM_ARM_KEYS if "curriculum" in item else RECIPE_ARM_KEYS, where)
    kind = "curriculum" if "curriculum" in item else "recipe"
    file = (source.parent / str(item[kind])).resolve()
    if not file.is_file():
        raise RecipeError(f"{where}: field {kind!r}: file not found: {file}")
    final = item.get("final") or {}
    if not isinstance(final, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in final.items()):
        raise RecipeError(f"{where}: field 'final' must map task names to stage names")
    stages = item.get("stages") or {}
    if not isinstance(stages, dict):
        raise RecipeError(f"{where}: field 'stages' must map stage names to inline overrides")
    spec = {**item, kind: file}
    return Arm(name=item["name"], description=str(item.get("description") or ""), spec=spec, final=final)


def build_cell(study: Study, arm: Arm, seed: int) -> Cell:
    """The arm's curriculum at ``seed``: study defaults, overrides, seed, scale, shared stage folders."""
    where = f"{study.source}: arm {arm.name!r}"
    folder = study.root / CELLS_DIR / arm.name / f"seed{seed}"
    if "curriculum" in arm.spec:
        cur = load_curriculum(arm.spec["curriculum"], root=str(folder),
                              data_root=None if study.data_root is None else str(study.data_root))
        until = arm.spec.get("until")
        names = [s.name for s in cur.stages]
        if until is not None and until not in names:
            raise RecipeError(f"{where}: until {until!r}: no such stage; stages: {names}")
        stages = cur.stages[: names.index(until) + 1] if until is not None else cur.stages
        for name in arm.spec.get("stages") or {}:
            if name not in [s.name for s in stages]:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RecipeError(f"{where}: stages: no stage {name!r} to override{hint}; stages: {names}")
        defaults = deep_merge(cur.defaults, study.defaults)
    else:
        name = arm.name
        inline = {k: arm.spec[k] for k in ("model", "data", "trainer") if k in arm.spec}
        stages = [Stage(name=name, kind="fit", index=0, configs=[arm.spec["recipe"]], inline=inline)]
        cur = Curriculum(name=study.name, root=folder, data_root=study.data_root, launcher="inprocess",
                         checkpoint_every_n_steps=study.checkpoint_every_n_steps, defaults={}, stages=stages,
                         source=arm.spec["recipe"])
        defaults = copy.deepcopy(study.defaults)
    overrides = arm.spec.get("stages") or {}
    shared: list[Stage] = []
    cur = dataclasses.replace(cur, name=study.name, defaults=defaults, stages=shared,
                              checkpoint_every_n_steps=study.checkpoint_every_n_steps)
    probes: list[Stage] = []  # the same stages in placeholder folders: what a stage's key sees of its sources
    keyed = dataclasses.replace(cur, root=KEY_ROOT, stages=probes)
    for stage in stages:
        new = SharedStage(**{f.name: getattr(stage, f.name) for f in dataclasses.fields(Stage)})
        new.index = len(shared)
        probe = dataclasses.replace(new, folder=KEY_ROOT / "?")
        probes.append(probe)
        if stage.kind == "fit":
            inline = deep_merge(deep_merge(stage.inline, study.overrides), overrides.get(stage.name) or {})
            inline["seed_everything"] = seed
            if stage.init_from is None:  # a fresh initialisation: the seed picks it
                inline = deep_merge(inline, {"model": {"init_args": {"seed": seed}}})
            probe.inline = inline
            probe.inline = new.inline = deep_merge(inline, _scaled(compose_stage(keyed, probe), study.scale))
            key = compose_stage(keyed, probe)
            key["trainer"].pop("default_root_dir", None)
        else:
            key = {"upcycle": {**stage.upcycle,
                               "specialists": [str(checkpoint_of(keyed, s)) for s in stage.upcycle["specialists"]]}}
        digest = hashlib.sha256(json.dumps({"stage": stage.name, "kind": stage.kind, "key": key}, sort_keys=True,
                                           default=str).encode()).hexdigest()[:10]
        new.folder = study.stages_root / f"seed{seed}" / f"{stage.name}-{digest}"
        probe.folder = KEY_ROOT / new.folder.name
        shared.append(new)
    for task, name in arm.final.items():
        if name not in [s.name for s in shared]:
            raise RecipeError(f"{where}: final: {task} -> {name!r} is not a stage of this arm "
                              f"({[s.name for s in shared]})")
    return Cell(arm=arm, seed=seed, curriculum=cur, folder=folder)


def _scaled(cfg: dict[str, Any], scale: float) -> dict[str, Any]:
    """Inline overrides multiplying the stage's lengths (SCALED_KEYS) by ``scale`` (1.0: none)."""
    out: dict[str, Any] = {}
    if scale == 1.0:
        return out
    for keys in SCALED_KEYS:
        node: Any = cfg
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, int) and not isinstance(node, bool):
            target = out
            for k in keys[:-1]:
                target = target.setdefault(k, {})
            target[keys[-1]] = max(1, round(node * scale))
    return out
