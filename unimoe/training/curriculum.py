"""``unimoe curriculum``: specialists -> upcycle -> warmup -> joint, resumable stage by stage.

A curriculum file lists stages; each fit stage is a LightningCLI config (files + inline
overrides) run into ``<root>/<stage>/``, each upcycle stage merges earlier stages'
checkpoints. Stage N+1 starts from stage N through ``init_from`` (weights only, step 0).

State on disk (nothing else is needed to resume):

* a stage is **finished** when ``<root>/<stage>/DONE.json`` and its final checkpoint
  (``final.ckpt``; ``upcycled.ckpt`` for an upcycle stage) exist; both are written
  atomically, the marker last. Finished stages are skipped and never overwritten.
* a fit stage with ``checkpoints/last.ckpt`` but no marker was **interrupted**: it resumes
  with ``--ckpt_path last.ckpt`` (optimizer, step, MLflow run) and without ``init_from``.
* ``<root>/curriculum.json`` summarises every stage (status, steps, losses, times);
  ``<root>/mlflow.db`` holds one MLflow experiment with one run per fit stage.

Schema (unknown keys are errors with a "did you mean"; ``x-*`` keys hold YAML anchors)::

    name: unimoe-demo              # MLflow experiment
    root: runs/demo                # relative to the cwd; --root overrides
    data_root: ../data             # relative to this file; --data_root / $UNIMOE_DATA_ROOT override
    launcher: inprocess            # or subprocess (one `unimoe fit` process per stage; needed for DDP)
    checkpoint_every_n_steps: 50   # last.ckpt cadence of every fit stage
    extends: other.yaml            # optional base curriculum (deep-merged; `stages` replaced)
    defaults: {trainer: {...}}     # deep-merged under every fit stage's config
    stages:
      - name: specialist_tts
        config: specialist.yaml    # LightningCLI YAML (or a list), relative to this file
        model: {...}               # inline overrides: model / data / trainer / seed_everything
      - name: upcycle
        upcycle: {specialists: [specialist_tts, ...], pieces: 2, moe: {...}}
      - name: warmup
        config: warmup.yaml
        init_from: upcycle         # an earlier stage (its final checkpoint), a path, or
                                   # {stage|path, include, exclude, remap, strict}
"""

from __future__ import annotations

import copy
import difflib
import gc
import inspect
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from unimoe.atomic import write_text_atomic
from unimoe.training.callbacks.finalize import DONE_MARKER, FINAL_CHECKPOINT, FINAL_METRICS, write_status_json
from unimoe.training.recipe_vars import RecipeError, resolve_data_root, substitute

TOP_KEYS = ("name", "description", "root", "data_root", "launcher", "checkpoint_every_n_steps", "extends",
            "defaults", "stages")
FIT_KEYS = ("name", "description", "config", "init_from", "model", "data", "trainer", "seed_everything")
UPCYCLE_KEYS = ("name", "description", "upcycle")
INIT_KEYS = ("stage", "path", "include", "exclude", "remap", "strict")
LAUNCHERS = ("inprocess", "subprocess")
UPCYCLED_CHECKPOINT = "upcycled.ckpt"
STATUS_FILE = "curriculum.json"
STAGE_CONFIG = "stage.yaml"


# ---------------------------------------------------------------------- the schema
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
        return self.directory(root) / (UPCYCLED_CHECKPOINT if self.kind == "upcycle" else FINAL_CHECKPOINT)


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


def _unknown(keys, known, where: str) -> None:
    for key in keys:
        if key in known or str(key).startswith("x-"):
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{where}: unknown field {key!r}{hint}; known fields: {', '.join(known)}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: must be a YAML mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key (recursively); any other value (lists included) replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _substitute_tree(value: Any, data_root: Optional[Path], where: str) -> Any:
    if isinstance(value, str):
        return substitute(value, data_root, where)
    if isinstance(value, dict):
        return {k: _substitute_tree(v, data_root, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_tree(v, data_root, where) for v in value]
    return value


def _load_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Path]]:
    """The merged raw mapping and, per top-level key, the file that set it (for relative paths)."""
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: 'extends' loops back to itself")
    raw = _read_yaml(path)
    _unknown(raw.keys(), TOP_KEYS, str(path))
    origin = {k: path for k in raw}
    base_ref = raw.pop("extends", None)
    if base_ref is None:
        return raw, origin
    base_path = (path.parent / str(base_ref)).resolve()
    base, base_origin = _load_with_extends(base_path, (*seen, path))
    merged = dict(base)
    for key, value in raw.items():
        if key == "defaults" and isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = deep_merge(base[key], value)
        else:
            merged[key] = value
    return merged, {**base_origin, **origin}


def load_curriculum(
    path: str | Path, *, root: Optional[str] = None, data_root: Optional[str] = None, launcher: Optional[str] = None
) -> Curriculum:
    """Parse and check a curriculum file (see the module docstring); errors name file and field."""
    path = Path(path).resolve()
    raw, origin = _load_with_extends(path)
    data_dir = origin.get("data_root", path).parent
    resolved_root = resolve_data_root(data_root, raw.get("data_root"), data_dir)
    raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}
    raw = _substitute_tree({k: v for k, v in raw.items() if k != "data_root"}, resolved_root, str(path))
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
    from unimoe.training.upcycle import upcycle_checkpoints

    known = [p for p in inspect.signature(upcycle_checkpoints).parameters if p not in ("out", "overwrite")]
    _unknown(spec.keys(), known, f"{where}: upcycle")
    specialists = spec.get("specialists")
    if not isinstance(specialists, list) or not specialists:
        raise RecipeError(f"{where}: upcycle.specialists must be a non-empty list of stage names or checkpoint paths")
    if "moe" not in spec or not isinstance(spec["moe"], dict):
        raise RecipeError(f"{where}: upcycle.moe must be a mapping of MoEConfig fields")
    from unimoe.moe.config import MoEConfig
    import dataclasses

    fields = [f.name for f in dataclasses.fields(MoEConfig)]
    _unknown(spec["moe"].keys(), fields, f"{where}: upcycle.moe")


def _check_references(stages: list[Stage], source: Path) -> None:
    seen: dict[str, Stage] = {}
    for stage in stages:
        if stage.name in seen:
            raise RecipeError(f"{source}: two stages are named {stage.name!r}")
        refs = []
        if stage.kind == "upcycle":
            refs = [s for s in stage.upcycle["specialists"] if isinstance(s, str) and not _looks_like_path(s)]
        elif isinstance(stage.init_from, str) and not _looks_like_path(stage.init_from):
            refs = [stage.init_from]
        elif isinstance(stage.init_from, dict) and "stage" in stage.init_from:
            refs = [stage.init_from["stage"]]
        for ref in refs:
            if ref not in seen:
                later = any(s.name == ref for s in stages)
                why = "a later stage (stages run in order)" if later else "no stage of this curriculum"
                raise RecipeError(f"{source}: stage {stage.name!r} refers to {ref!r}, which is {why}")
        seen[stage.name] = stage


def _looks_like_path(text: str) -> bool:
    return "/" in text or text.endswith((".ckpt", ".pt", ".pth"))


# ---------------------------------------------------------------------- composing a fit stage
def compose_stage(cur: Curriculum, stage: Stage) -> dict[str, Any]:
    """The full LightningCLI config of a fit stage (defaults < config files < inline, then the curriculum's own)."""
    cfg = copy.deepcopy(cur.defaults)
    for path in stage.configs:
        cfg = deep_merge(cfg, _substitute_tree(_read_yaml(path), cur.data_root, str(path)))
    cfg = deep_merge(cfg, stage.inline)
    run_dir = stage.directory(cur.root)
    trainer = cfg.get("trainer") or {}
    cfg["trainer"] = trainer
    trainer["default_root_dir"] = str(run_dir)  # the curriculum owns where its stages run
    trainer["callbacks"] = _with_checkpointing(trainer.get("callbacks") or [], run_dir, cur.checkpoint_every_n_steps)
    model = cfg.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise RecipeError(f"stage {stage.name!r}: the composed config has no model.class_path (which stage module?)")
    if stage.init_from is not None:
        model.setdefault("init_args", {})
        model["init_args"]["init_from"] = resolve_init_from(cur, stage)
    return cfg


def _with_checkpointing(callbacks: list, run_dir: Path, every: int) -> list:
    """Every fit stage keeps ``checkpoints/last.ckpt`` up to date every ``every`` steps (resume point)."""
    out = []
    found = False
    for cb in callbacks:
        cb = copy.deepcopy(cb)
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            found = True
            args = cb.setdefault("init_args", {})
            args["dirpath"] = str(run_dir / "checkpoints")
            args["save_last"] = True
            args.setdefault("every_n_train_steps", every)
        out.append(cb)
    if not found:
        out.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True, "save_top_k": 0,
                                  "every_n_train_steps": every}})
    return out


def resolve_init_from(cur: Curriculum, stage: Stage) -> Any:
    spec = stage.init_from
    if isinstance(spec, str):
        return str(_checkpoint_of(cur, spec))
    out = {k: v for k, v in spec.items() if k not in ("stage", "path")}
    out["path"] = str(_checkpoint_of(cur, spec.get("stage") or spec["path"]))
    return out


def _checkpoint_of(cur: Curriculum, ref: str) -> Path:
    if _looks_like_path(ref):
        path = Path(ref)
        return path if path.is_absolute() else (cur.source.parent / path).resolve()
    return cur.stage(ref).final_checkpoint(cur.root)


# ---------------------------------------------------------------------- state
def stage_status(cur: Curriculum, stage: Stage) -> str:
    """``done`` / ``final`` (final checkpoint, marker missing) / ``resume`` / ``pending``."""
    d = stage.directory(cur.root)
    final = stage.final_checkpoint(cur.root)
    if (d / DONE_MARKER).is_file() and final.is_file():
        return "done"
    if final.is_file():
        return "final"
    if stage.kind == "fit" and (d / "checkpoints" / "last.ckpt").is_file():
        return "resume"
    return "pending"


def _checkpoint_step(path: Path) -> Optional[int]:
    from unimoe.checkpoint import CheckpointError, read_checkpoint

    try:
        ckpt = read_checkpoint(path)  # weights_only: a resume checkpoint holds tensors and plain data only
    except CheckpointError:  # unreadable counts as absent
        return None
    return int(ckpt.get("global_step", 0))


def _stage_steps(cfg: dict[str, Any]) -> Optional[int]:
    steps = (cfg.get("trainer") or {}).get("max_steps")
    return int(steps) if isinstance(steps, int) and steps > 0 else None


# ---------------------------------------------------------------------- validation
def validate_stage_config(cfg: dict[str, Any], stage: Stage) -> None:
    """Parse (never instantiate) a composed stage config with the real LightningCLI parser."""
    from unimoe.training.cli import UniMoECLI, build_cli

    class _Parsed(Exception):
        pass

    class _ParseOnly(UniMoECLI):
        def _parse_ckpt_path(self) -> None:
            pass

        def _set_seed(self) -> None:  # parsing must not touch the global RNG (nor print "Seed set")
            pass

        def before_instantiate_classes(self) -> None:
            raise _Parsed()

    try:
        build_cli(["fit", "--config", yaml.safe_dump(cfg, sort_keys=False)], cli_class=_ParseOnly,
                  parser_kwargs={"fit": {"exit_on_error": False}})
    except _Parsed:
        return
    except SystemExit as exc:
        raise RecipeError(f"stage {stage.name!r}: its LightningCLI config is invalid (see the parser message above)") from exc
    except Exception as exc:  # jsonargparse ArgumentError with exit_on_error=False
        raise RecipeError(f"stage {stage.name!r}: invalid LightningCLI config: {exc}") from exc


def check_data_paths(cur: Curriculum, stage: Stage, cfg: dict[str, Any]) -> None:
    """Every ``${data_root}/...`` path a stage names must exist (a clear error before any training)."""
    if cur.data_root is None:
        return
    prefix = str(cur.data_root)
    missing: list[str] = []

    def walk(value: Any) -> None:
        inside = isinstance(value, str) and (value == prefix or value.startswith(prefix.rstrip(os.sep) + os.sep))
        if inside and not Path(value).exists():
            missing.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(cfg)
    if missing:
        raise RecipeError(
            f"stage {stage.name!r} needs {', '.join(sorted(set(missing)))}, missing under the data root {prefix}. "
            "Prepare it (docs/training.md, 'Finding the data'): unimoe data demo --out DATA/corpus; unimoe codec fit "
            "--audio DATA/corpus/manifests/all.jsonl --out DATA/codec.pt; unimoe tokenize --manifest "
            "DATA/corpus/manifests/<task>.jsonl --codec DATA/codec.pt --out DATA/shards/<task> (tts, t2m, v2m)"
        )


def check_launcher(cur: Curriculum, stage: Stage, cfg: dict[str, Any]) -> None:
    trainer = cfg.get("trainer") or {}
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    strategy = str(trainer.get("strategy", ""))
    multi = (isinstance(devices, int) and devices > 1) or (isinstance(devices, (list, str)) and str(devices) not in ("1", "auto", "[0]")) \
        or (isinstance(nodes, int) and nodes > 1) or "ddp" in strategy or "fsdp" in strategy
    if multi and cur.launcher == "inprocess":
        raise RecipeError(
            f"stage {stage.name!r} trains on several processes (devices={devices}, num_nodes={nodes}, strategy={strategy!r}); "
            "use launcher: subprocess (each stage runs as `unimoe fit`, which Lightning can relaunch per rank)"
        )


# ---------------------------------------------------------------------- running
class CurriculumRunner:
    """Runs (or resumes) a curriculum; prints which stage runs and how far each got."""

    def __init__(self, cur: Curriculum, console=None, until: Optional[str] = None) -> None:
        from rich.console import Console

        self.cur = cur
        self.console = console or Console(stderr=True)
        self.until = until
        if until is not None and all(s.name != until for s in cur.stages):
            raise RecipeError(f"--until {until!r}: no such stage; stages: {[s.name for s in cur.stages]}")
        self.status: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ plan
    def selected(self) -> list[Stage]:
        out = []
        for stage in self.cur.stages:
            out.append(stage)
            if stage.name == self.until:
                break
        return out

    def plan(self) -> list[tuple[Stage, str, Optional[dict]]]:
        rows = []
        for stage in self.selected():
            cfg = compose_stage(self.cur, stage) if stage.kind == "fit" else None
            rows.append((stage, stage_status(self.cur, stage), cfg))
        return rows

    def print_plan(self, rows) -> None:
        from rich.table import Table

        table = Table(title=f"curriculum {self.cur.name}  ({self.cur.root})", title_justify="left")
        for col in ("#", "stage", "kind", "starts from", "steps", "status"):
            table.add_column(col)
        for stage, status, cfg in rows:
            kind = stage.kind if cfg is None else _short_class(cfg["model"]["class_path"])
            source = "-"
            if stage.kind == "upcycle":
                source = ", ".join(str(s) for s in stage.upcycle["specialists"])
            elif stage.init_from is not None:
                source = stage.init_from if isinstance(stage.init_from, str) else str(stage.init_from.get("stage") or stage.init_from.get("path"))
            steps = "-" if cfg is None else str(_stage_steps(cfg) or "epochs")
            label = {"done": "[green]done (skip)[/]", "final": "[green]finished (mark done)[/]",
                     "resume": "[yellow]interrupted: resume[/]", "pending": "pending"}[status]
            table.add_row(str(stage.index + 1), stage.name, kind, source, steps, label)
        self.console.print(table)

    # ------------------------------------------------------------------ run
    def run(self, dry_run: bool = False) -> int:
        rows = self.plan()
        self.cur.root.mkdir(parents=True, exist_ok=True)
        self.print_plan(rows)
        for stage, status, cfg in rows:
            if cfg is not None:
                check_launcher(self.cur, stage, cfg)
                if status not in ("done", "final"):
                    check_data_paths(self.cur, stage, cfg)
                    validate_stage_config(cfg, stage)
            elif status not in ("done", "final"):
                self._upcycle_options(stage)  # builds the MoEConfig: field errors before any training
        if dry_run:
            self.console.print("[bold]dry run[/]: every stage config parsed; nothing was trained")
            return 0
        total = len(rows)
        start_all = time.time()
        for stage, status, cfg in rows:
            header = f"stage {stage.index + 1}/{len(self.cur.stages)}: {stage.name}"
            if status == "done":
                self.console.print(f"[green]✓[/] {header} already finished, skipped")
                self._record(stage, "done", self._read_done(stage))
                continue
            if status == "final":
                self.console.print(f"[green]✓[/] {header}: final checkpoint present, marking it done")
                self._mark_done(stage, seconds=None, resumed_from=None)
                continue
            started = time.time()
            try:
                if stage.kind == "upcycle":
                    self.console.rule(f"{header} (upcycle)")
                    self._run_upcycle(stage)
                    resumed = None
                else:
                    resumed = self._run_fit(stage, status, cfg, header)
            except BaseException as exc:  # noqa: BLE001 - report which stage failed, then re-raise / fail
                self._record(stage, "failed", {"error": f"{type(exc).__name__}: {exc}"})
                self.console.print(f"[red]✗ {header} failed[/]: {type(exc).__name__}: {exc}")
                self.console.print("  re-run the same command to resume: finished stages are skipped, "
                                   "an interrupted stage continues from its last checkpoint")
                if isinstance(exc, KeyboardInterrupt):
                    raise
                return 1
            record = self._mark_done(stage, seconds=time.time() - started, resumed_from=resumed)
            self.console.print(f"[green]✓[/] {header} finished in {_duration(time.time() - started)}"
                               f"{_loss_text(record)}")
        self.console.rule(f"curriculum {self.cur.name}: {total} stage(s) ready in {_duration(time.time() - start_all)}")
        self.print_summary()
        return 0

    def _run_fit(self, stage: Stage, status: str, cfg: dict[str, Any], header: str) -> Optional[dict]:
        run_dir = stage.directory(self.cur.root)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / STAGE_CONFIG
        write_text_atomic(config_path, yaml.safe_dump(cfg, sort_keys=False))
        argv = ["fit", "--config", str(config_path), "--experiment_name", self.cur.name,
                "--mlflow_dir", str(self.cur.root), "--run_name", stage.name]
        resumed = None
        steps = _stage_steps(cfg)
        if status == "resume":
            last = run_dir / "checkpoints" / "last.ckpt"
            step = _checkpoint_step(last)
            resumed = {"checkpoint": str(last), "step": step}
            if stage.init_from is not None:
                argv += ["--model.init_args.init_from", "null"]
            argv += ["--ckpt_path", str(last)]
            self.console.rule(f"{header}: resuming at step {step}/{steps or '?'} from {last.name}")
        else:
            source = f" from {stage.init_from if isinstance(stage.init_from, str) else stage.init_from}" if stage.init_from else ""
            self.console.rule(f"{header}: {_short_class(cfg['model']['class_path'])}{source}, {steps or '?'} steps")
        self._record(stage, "running", {"resumed_from": resumed})
        if self.cur.launcher == "subprocess":
            proc = subprocess.run([sys.executable, "-m", "unimoe", *argv], env=os.environ.copy())
            if proc.returncode != 0:
                raise RuntimeError(f"`unimoe {' '.join(argv)}` exited with status {proc.returncode}")
        else:
            from unimoe.training.cli import run_lightning_cli

            code = run_lightning_cli(argv)
            gc.collect()
            if code != 0:
                raise RuntimeError(f"`unimoe {' '.join(argv)}` failed (status {code})")
        if not stage.final_checkpoint(self.cur.root).is_file():
            raise RuntimeError(f"training of {stage.name} ended without {FINAL_CHECKPOINT} (stopped early?)")
        return resumed

    def _upcycle_options(self, stage: Stage) -> dict[str, Any]:
        from unimoe.moe.config import MoEConfig

        spec = dict(stage.upcycle)
        try:
            spec["moe"] = MoEConfig(**spec["moe"])
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"stage {stage.name!r}: upcycle.moe: {exc}") from exc
        spec["specialists"] = [str(_checkpoint_of(self.cur, s)) for s in spec["specialists"]]
        return spec  # expert names default to each specialist's label (its stage's `label`, else its data tasks)

    def _run_upcycle(self, stage: Stage) -> None:
        from unimoe.training.upcycle import upcycle_checkpoints

        spec = self._upcycle_options(stage)
        missing = [p for p in spec["specialists"] if not Path(p).is_file()]
        if missing:
            raise RuntimeError(f"upcycle {stage.name}: specialist checkpoint(s) missing: {missing}")
        out = stage.final_checkpoint(self.cur.root)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.console.print(f"  merging {len(spec['specialists'])} specialists x {spec.get('pieces', 2)} pieces -> {out}")
        upcycle_checkpoints(out=str(out), overwrite=True, **spec)

    # ------------------------------------------------------------------ records
    def _mark_done(self, stage: Stage, seconds: Optional[float], resumed_from: Optional[dict]) -> dict[str, Any]:
        d = stage.directory(self.cur.root)
        final = stage.final_checkpoint(self.cur.root)
        from unimoe.checkpoint import open_model_file

        meta = open_model_file(final).metadata  # a finished stage must hold a readable model
        record: dict[str, Any] = {"stage": stage.name, "kind": stage.kind, "final_checkpoint": str(final),
                                  "model_stage": meta.stage, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "seconds": None if seconds is None else round(seconds, 1),
                                  "resumed_from": resumed_from}
        metrics_file = d / FINAL_METRICS
        if metrics_file.is_file():
            final_metrics = json.loads(metrics_file.read_text())
            record["global_step"] = final_metrics.get("global_step")
            record["metrics"] = {k: v for k, v in final_metrics.get("metrics", {}).items()
                                 if k in ("train/loss", "val/loss") or k.startswith("val/loss/") and k.count("/") == 2}
        write_status_json(d / DONE_MARKER, record)
        self._record(stage, "done", record)
        return record

    def _read_done(self, stage: Stage) -> dict[str, Any]:
        try:
            return json.loads((stage.directory(self.cur.root) / DONE_MARKER).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _record(self, stage: Stage, status: str, info: dict[str, Any] | None) -> None:
        self.status[stage.name] = {"status": status, **(info or {})}
        write_status_json(self.cur.root / STATUS_FILE, {
            "name": self.cur.name, "source": str(self.cur.source), "root": str(self.cur.root),
            "data_root": None if self.cur.data_root is None else str(self.cur.data_root),
            "mlflow": f"sqlite:///{self.cur.root / 'mlflow.db'}",
            "stages": [{"name": s.name, **self.status.get(s.name, {"status": "pending"})} for s in self.cur.stages],
        })

    def print_summary(self) -> None:
        from rich.table import Table

        table = Table(title="stages", title_justify="left")
        for col in ("stage", "steps", "time", "train/loss", "val/loss", "resumed"):
            table.add_column(col)
        for stage in self.selected():
            rec = self.status.get(stage.name, {})
            metrics = rec.get("metrics") or {}
            table.add_row(stage.name, str(rec.get("global_step", "-")),
                          "-" if rec.get("seconds") is None else _duration(rec["seconds"]),
                          _fmt(metrics.get("train/loss")), _fmt(metrics.get("val/loss")),
                          "-" if not rec.get("resumed_from") else f"step {rec['resumed_from'].get('step')}")
        self.console.print(table)
        self.console.print(f"MLflow: mlflow ui --backend-store-uri sqlite:///{self.cur.root / 'mlflow.db'}")


def _short_class(class_path: str) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _loss_text(record: dict[str, Any]) -> str:
    metrics = record.get("metrics") or {}
    parts = [f"{k} {v:.3f}" for k, v in metrics.items() if k in ("train/loss", "val/loss")]
    return (": " + ", ".join(parts)) if parts else ""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

