"""``unimoe fit|validate|test|predict``: LightningCLI with unimoe's defaults.

Defaults a user would otherwise wire by hand on every run:
- MLflow logging into ``<default_root_dir>/mlflow.db`` (no server; ``logger: false`` disables);
  ``--mlflow_dir DIR`` puts the store (``DIR/mlflow.db`` + ``DIR/mlartifacts``) elsewhere, which
  is how every curriculum stage logs into one experiment at the curriculum root.
- ``ModelCheckpoint`` into ``<default_root_dir>/checkpoints`` with ``last.ckpt`` always kept,
  so a killed run resumes with ``--ckpt_path <dir>/checkpoints/last.ckpt``; and
  ``StageFinalizer``: ``<default_root_dir>/final.ckpt`` when training ends normally.
- A rich progress bar over the stage's optimizer steps (``StepProgressBar``), and the resolved
  config saved next to the checkpoints and in MLflow.
- Plug-ins from installed packages are imported before parsing, so YAML may name their
  classes by short name; the stage modules and callbacks are importable by short name too
  (``class_path: JointStage``, ``class_path: ExpertLoadMonitor``).
- ``${data_root}`` / ``${env:NAME}`` in ``--config`` files (``--data_root`` or
  ``$UNIMOE_DATA_ROOT``; see :mod:`unimoe.training.recipe_vars`).

Resume versus initialisation: ``--ckpt_path`` resumes the SAME stage; LightningCLI then
restores the checkpoint's saved hyper-parameters, including the module class. unimoe
refuses a ``--ckpt_path`` whose class differs from the config's model class (that would
silently train the old stage), refuses ``init_from`` together with ``--ckpt_path``, and
drops the ``init_from`` that the restored hyper-parameters bring back (the weights come
from the checkpoint; the stage does not restart at step 0).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from unimoe.training.run_logging import RunConfigSaver, mlflow_logger_for

DEFAULT_RUN_DIR = "runs/default"
CHECKPOINT_SUBDIR = "checkpoints"


class ConfigError(ValueError):
    """The command line / recipe asks for something inconsistent; the message says what to change."""


class UniMoECLI(LightningCLI):
    """LightningCLI whose trainer gets unimoe's logger, checkpoint and progress defaults."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--experiment_name", type=str, default="unimoe", help="MLflow experiment the run is logged under"
        )
        parser.add_argument(
            "--mlflow_dir", type=Optional[str], default=None,
            help="folder of the MLflow store (mlflow.db + mlartifacts); default: the run directory",
        )
        parser.add_argument("--run_name", type=Optional[str], default=None, help="MLflow run name (default: run dir name)")

    def _parse_ckpt_path(self) -> None:
        """Resume rules (see the module docstring), then Lightning's hparam restore."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        model = cfg.get("model")
        init_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        if init_args is not None and init_args.get("init_from") is not None:
            raise ConfigError(
                f"--ckpt_path {ckpt_path} and model.init_args.init_from ({_init_path(init_args.get('init_from'))}) are "
                "mutually exclusive: ckpt_path resumes this stage (weights, optimizer, step); init_from starts a new "
                "stage from another stage's weights at step 0. Drop init_from to resume "
                "(--model.init_args.init_from=null), or drop --ckpt_path to start over from init_from."
            )
        from unimoe.checkpoint import CheckpointError, read_checkpoint

        try:  # weights_only, as Lightning's own resume loads it (torch's default since 2.6)
            checkpoint = read_checkpoint(ckpt_path)
        except CheckpointError as exc:
            raise ConfigError(f"--ckpt_path: {exc}") from exc
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        saved_class = hparams.get("_class_path")
        wanted = model.get("class_path") if model is not None and hasattr(model, "get") else None
        if saved_class and wanted and wanted != saved_class and _short(wanted) != _short(saved_class):
            raise ConfigError(
                f"--ckpt_path {ckpt_path} was written by {saved_class} but the config's model is {wanted}. "
                "ckpt_path resumes the same stage (Lightning would silently rebuild the checkpoint's class); "
                f"to start a {_short(wanted)} from it use --model.init_args.init_from {ckpt_path} instead."
            )
        del checkpoint
        super()._parse_ckpt_path()
        restored = self.config[subcommand].get("model")
        if restored is not None and hasattr(restored, "get"):
            for group in ("init_args", "dict_kwargs"):
                args = restored.get(group)
                if args is not None and hasattr(args, "get") and args.get("init_from") is not None:
                    args["init_from"] = None  # resumed weights come from ckpt_path, not from init_from

    def before_instantiate_classes(self) -> None:
        """Open ``init_from`` before the module is built, so a bad file is one clear line.

        (jsonargparse would report an exception raised inside the module's ``__init__`` as
        "does not validate against any of the Union subtypes", burying the file's error.)
        """
        from unimoe.checkpoint import CheckpointError
        from unimoe.training.init_from import InitFrom, read_init_checkpoint

        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        init_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        value = init_args.get("init_from") if init_args is not None and hasattr(init_args, "get") else None
        if value is None:
            return
        try:
            read_init_checkpoint(InitFrom.coerce(value.as_dict() if hasattr(value, "as_dict") else value))
        except (CheckpointError, ValueError) as exc:
            raise ConfigError(f"model.init_args.init_from: {exc}") from exc

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        from unimoe.training.callbacks import StageFinalizer, StepProgressBar

        config = self._get(self.config_init, "trainer", default={})
        run_dir = Path(config.get("default_root_dir") or DEFAULT_RUN_DIR)
        kwargs.setdefault("default_root_dir", str(run_dir))
        if config.get("logger") in (None, True):
            resume = bool(self._get(self.config, "ckpt_path"))
            store = self._get(self.config, "mlflow_dir")
            kwargs["logger"] = mlflow_logger_for(
                run_dir,
                experiment_name=self._get(self.config, "experiment_name") or "unimoe",
                run_name=self._get(self.config, "run_name"),
                resume=resume,
                store_dir=store,
            )
        callbacks = list(config.get("callbacks") or [])
        checkpointing = config.get("enable_checkpointing", True) is not False
        if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=str(run_dir / CHECKPOINT_SUBDIR), save_last=True))
        if checkpointing and not any(isinstance(c, StageFinalizer) for c in callbacks):
            callbacks.append(StageFinalizer())
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _init_path(value: Any) -> str:
    if hasattr(value, "get"):
        return str(value.get("path"))
    return str(value)


def build_cli(
    args: list[str] | None = None, run: bool = True, cli_class: type[UniMoECLI] | None = None,
    parser_kwargs: dict[str, Any] | None = None,
) -> UniMoECLI:
    """Construct the CLI (parsing ``args``) with every plug-in imported first."""
    import unimoe.components  # noqa: F401  in-tree registrations
    import unimoe.training.callbacks  # noqa: F401  short class names in YAML
    import unimoe.training.stages  # noqa: F401
    from unimoe.registry import load_all_plugins

    load_all_plugins()
    # `unimoe fit ...` / `unimoe curriculum` hand LightningCLI their own argv (after variable
    # resolution), which Lightning would otherwise flag as "args and command line arguments".
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return (cli_class or UniMoECLI)(
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs,
        args=args,
        run=run,
    )


def prepare_argv(argv: list[str]) -> list[str]:
    """Resolve ``--data_root`` and the variables of ``--config`` files (see recipe_vars)."""
    from unimoe.training.recipe_vars import expand_config_args, pop_option, resolve_data_root

    data_root, rest = pop_option(list(argv), "--data_root")
    return expand_config_args(rest, resolve_data_root(data_root))


def run_lightning_cli(argv: list[str]) -> int:
    from unimoe.checkpoint import CheckpointError
    from unimoe.training.recipe_vars import RecipeError

    try:
        build_cli(prepare_argv(argv))
    except (ConfigError, RecipeError, CheckpointError) as exc:  # e.g. an unreadable init_from: one line
        print(f"unimoe {argv[0] if argv else 'fit'}: error: {exc}", file=sys.stderr)
        return 2
    return 0
