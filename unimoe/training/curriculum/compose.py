"""From a curriculum stage to the config it runs with, and the checks made before any training.

:func:`compose_stage` builds a fit stage's LightningCLI config (the curriculum's
``defaults`` < the stage's ``config`` files < its inline keys, then what the curriculum owns:
run directory, checkpoint cadence, ``init_from``); every file goes through the one
composition path of :mod:`unimoe.training.recipes`. The checks (:func:`validate_stage_config`,
:func:`check_data_paths`, :func:`check_launcher`, :func:`upcycle_options`) run for every
pending stage before the first one trains.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from unimoe.training.curriculum.schema import Curriculum, Stage, checkpoint_of
from unimoe.training.recipe_vars import RecipeError
from unimoe.training.recipes import compose_file, deep_merge, plain


def compose_stage(cur: Curriculum, stage: Stage) -> dict[str, Any]:
    """The full LightningCLI config of a fit stage (defaults < config files < inline, then the curriculum's own)."""
    cfg = copy.deepcopy(cur.defaults)
    for path in stage.configs:
        cfg = deep_merge(cfg, compose_file(path, cur.data_root, keep_marks=True))
    cfg = plain(deep_merge(cfg, stage.inline))
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
        out.append({"class_path": "ModelCheckpoint",
                    "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True, "save_top_k": 0,
                                  "every_n_train_steps": every}})
    return out


def resolve_init_from(cur: Curriculum, stage: Stage) -> Any:
    spec = stage.init_from
    if isinstance(spec, str):
        return str(checkpoint_of(cur, spec))
    out = {k: v for k, v in spec.items() if k not in ("stage", "path")}
    out["path"] = str(checkpoint_of(cur, spec.get("stage") or spec["path"]))
    return out


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
        or (isinstance(nodes, int) and nodes > 1) or "ddp" in strategy or "fsdp" in strategy or "Parallel" in strategy
    if multi and cur.launcher == "inprocess":
        raise RecipeError(
            f"stage {stage.name!r} trains on several processes (devices={devices}, num_nodes={nodes}, strategy={strategy!r}); "
            "use launcher: subprocess (each stage runs as `unimoe fit`, which Lightning can relaunch per rank)"
        )


def upcycle_options(cur: Curriculum, stage: Stage) -> dict[str, Any]:
    """The keyword arguments of :func:`unimoe.training.upcycle.upcycle_checkpoints` for an upcycle stage.

    ``moe`` may name an MoE preset (``demo-moe``): the MoE the upcycled model gets is then
    written once, in :mod:`unimoe.model.config`. Expert names default to each specialist's
    label (its stage's ``label``, else its data tasks).
    """
    from unimoe.model.config import moe_config

    spec = dict(stage.upcycle)
    try:
        spec["moe"] = moe_config(spec["moe"], f"stage {stage.name!r}: upcycle.moe")
    except (TypeError, ValueError) as exc:
        raise RecipeError(str(exc)) from exc
    spec["specialists"] = [str(checkpoint_of(cur, s)) for s in spec["specialists"]]
    return spec
