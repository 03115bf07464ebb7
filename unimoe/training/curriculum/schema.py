"""A curriculum file: its schema (see the package docstring), parsed into :class:`Curriculum`.

Unknown keys are errors with a "did you mean"; so are references to a later or unknown
stage, duplicate stage names, missing files and bad upcycle options. The file and its
``extends`` chain are read through :mod:`unimoe.training.recipes`.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from unimoe.training.callbacks.finalize import FINAL_CHECKPOINT
from unimoe.training.recipe_vars import RecipeError, resolve_data_root
from unimoe.training.recipes import drop_anchor_keys, load_tree, read_yaml, substitute_tree

TOP_KEYS = ("name", "description", "root", "data_root", "launcher", "checkpoint_every_n_steps", "extends",
            "defaults", "stages")
FIT_KEYS = ("name", "description", "config", "init_from", "model", "data", "trainer", "seed_everything")
UPCYCLE_KEYS = ("name", "description", "upcycle")
INIT_KEYS = ("stage", "path", "include", "exclude", "remap", "strict")
LAUNCHERS = ("inprocess", "subprocess")
UPCYCLED_CHECKPOINT = "upcycled"
LEGACY_SUFFIX = ".ckpt"
"""Runs made before final models became folders hold ``final.ckpt`` / ``upcycled.ckpt``; still read."""


@dataclass
class Stage:
    """One stage of a curriculum (``kind`` is ``fit`` or ``upcycle``)."""

    name: str
    kind: str
    index: int
    description: str = ""
    configs: list[Path] = field(default_factory=list)
    inline: dict[str, Any] = field(default_factory=dict)
    init_from: Any = None
    upcycle: dict[str, Any] = field(default_factory=dict)

    def directory(self, root: Path) -> Path:
        return root / self.name

    def final_checkpoint(self, root: Path) -> Path:
        return final_model(self.directory(root), self.kind)


def final_model(stage_dir: Path, kind: str = "fit") -> Path:
    """A stage's final model folder (``final/``, ``upcycled/``), or an older run's ``.ckpt`` file."""
    folder = stage_dir / (UPCYCLED_CHECKPOINT if kind == "upcycle" else FINAL_CHECKPOINT)
    legacy = folder.with_name(folder.name + LEGACY_SUFFIX)
    return legacy if legacy.is_file() and not folder.exists() else folder


@dataclass
class Curriculum:
    name: str
    root: Path
    data_root: Optional[Path]
    launcher: str
    checkpoint_every_n_steps: int
    defaults: dict[str, Any]
    stages: list[Stage]
    source: Path
    description: str = ""

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def checkpoint_of(cur: Curriculum, ref: str) -> Path:
    """The checkpoint a reference names: an earlier stage's final checkpoint, or a path (relative to the file)."""
    if looks_like_path(ref):
        path = Path(ref).expanduser()
        if path.is_absolute():
            return path
        local = (cur.source.parent / path).resolve()
        from unimoe.pretrained.hub import looks_like_hub_id

        return path if not local.exists() and looks_like_hub_id(ref) else local  # `Qwen/Qwen2.5-3B`: a Hub id
    return cur.stage(ref).final_checkpoint(cur.root)


def _unknown(keys, known, where: str) -> None:
    for key in keys:
        if key in known or str(key).startswith("x-"):
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{where}: unknown field {key!r}{hint}; known fields: {', '.join(known)}")


def load_curriculum(
    path: str | Path, *, root: Optional[str] = None, data_root: Optional[str] = None, launcher: Optional[str] = None
) -> Curriculum:
    """Parse and check a curriculum file (see the module docstring); errors name file and field."""
    path = Path(path).resolve()
    raw, origin = load_tree(path)
    for file in set(origin.values()):
        _unknown(read_yaml(file).keys(), TOP_KEYS, str(file))
    data_dir = origin.get("data_root", path).parent
    resolved_root = resolve_data_root(data_root, raw.get("data_root"), data_dir)
    raw = drop_anchor_keys(raw)
    raw = substitute_tree({k: v for k, v in raw.items() if k != "data_root"}, resolved_root, str(path))
    stages_file = origin.get("stages", path)

    name = raw.get("name") or path.stem
    if not isinstance(name, str):
        raise RecipeError(f"{path}: field 'name' must be a string")
    launch = launcher or raw.get("launcher", "inprocess")
    if launch not in LAUNCHERS:
        raise RecipeError(f"{path}: field 'launcher' must be one of {LAUNCHERS}, got {launch!r}")
    every = raw.get("checkpoint_every_n_steps", 50)
    if not isinstance(every, int) or every < 1:
        raise RecipeError(f"{path}: field 'checkpoint_every_n_steps' must be a positive int, got {every!r}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RecipeError(f"{path}: field 'defaults' must be a mapping")
    run_root = Path(root or raw.get("root") or Path("runs") / name).expanduser().resolve()
    items = raw.get("stages")
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{path}: field 'stages' must be a non-empty list")
    stages = [_parse_stage(item, i, stages_file) for i, item in enumerate(items)]
    _check_references(stages, stages_file)
    return Curriculum(name=name, root=run_root, data_root=resolved_root, launcher=launch,
                      checkpoint_every_n_steps=every, defaults=defaults, stages=stages, source=path,
                      description=str(raw.get("description") or ""))


def _parse_stage(item: Any, index: int, source: Path) -> Stage:
    where = f"{source}: stages[{index}]"
    if not isinstance(item, dict):
        raise RecipeError(f"{where} must be a mapping with at least 'name'")
    name = item.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise RecipeError(f"{where}: field 'name' must be a plain non-empty string (a folder name), got {name!r}")
    where = f"{source}: stage {name!r}"
    if "upcycle" in item:
        _unknown(item.keys(), UPCYCLE_KEYS, where)
        spec = item["upcycle"]
        if not isinstance(spec, dict):
            raise RecipeError(f"{where}: field 'upcycle' must be a mapping of upcycle options")
        _check_upcycle_fields(spec, where)
        return Stage(name=name, kind="upcycle", index=index, description=item.get("description", ""), upcycle=spec)
    _unknown(item.keys(), FIT_KEYS, where)
    config = item.get("config")
    files = [] if config is None else ([config] if isinstance(config, str) else config)
    if isinstance(files, list):  # a list may hold lists (a YAML anchor naming several files): flattened
        files = [f for item in files for f in (item if isinstance(item, list) else [item])]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise RecipeError(f"{where}: field 'config' must be a file path or a list of file paths")
    paths = [(source.parent / f).resolve() for f in files]
    for p in paths:
        if not p.is_file():
            raise RecipeError(f"{where}: field 'config': file not found: {p}")
    inline = {k: item[k] for k in ("model", "data", "trainer", "seed_everything") if k in item}
    if not paths and "model" not in inline:
        raise RecipeError(f"{where}: give 'config' (a LightningCLI YAML) or inline 'model'/'data'/'trainer'")
    init_from = item.get("init_from")
    if isinstance(init_from, dict):
        _unknown(init_from.keys(), INIT_KEYS, f"{where}: init_from")
        if ("stage" in init_from) == ("path" in init_from):
            raise RecipeError(f"{where}: init_from needs exactly one of 'stage' or 'path'")
    elif init_from is not None and not isinstance(init_from, str):
        raise RecipeError(f"{where}: field 'init_from' must be a stage name, a path or a mapping")
    return Stage(name=name, kind="fit", index=index, description=item.get("description", ""), configs=paths,
                 inline=inline, init_from=init_from)


def _check_upcycle_fields(spec: dict[str, Any], where: str) -> None:
    from unimoe.model.config import moe_config
    from unimoe.training.upcycle import upcycle_checkpoints

    known = [p for p in inspect.signature(upcycle_checkpoints).parameters if p not in ("out", "overwrite")]
    _unknown(spec.keys(), known, f"{where}: upcycle")
    specialists = spec.get("specialists")
    if not isinstance(specialists, list) or not specialists:
        raise RecipeError(f"{where}: upcycle.specialists must be a non-empty list of stage names or checkpoint paths")
    if "moe" not in spec or not isinstance(spec["moe"], (dict, str)):
        raise RecipeError(f"{where}: upcycle.moe must be an MoE preset name (demo-moe, paper) or a mapping of "
                          f"MoEConfig fields")
    try:
        moe_config(spec["moe"], f"{where}: upcycle.moe")
    except (TypeError, ValueError) as exc:
        raise RecipeError(str(exc)) from exc


def _check_references(stages: list[Stage], source: Path) -> None:
    seen: dict[str, Stage] = {}
    for stage in stages:
        if stage.name in seen:
            raise RecipeError(f"{source}: two stages are named {stage.name!r}")
        refs = []
        if stage.kind == "upcycle":
            refs = [s for s in stage.upcycle["specialists"] if isinstance(s, str) and not looks_like_path(s)]
        elif isinstance(stage.init_from, str) and not looks_like_path(stage.init_from):
            refs = [stage.init_from]
        elif isinstance(stage.init_from, dict) and "stage" in stage.init_from:
            refs = [stage.init_from["stage"]]
        for ref in refs:
            if ref not in seen:
                later = any(s.name == ref for s in stages)
                why = "a later stage (stages run in order)" if later else "no stage of this curriculum"
                raise RecipeError(f"{source}: stage {stage.name!r} refers to {ref!r}, which is {why}")
        seen[stage.name] = stage


def looks_like_path(text: str) -> bool:
    return "/" in text or text.endswith((".ckpt", ".pt", ".pth"))
