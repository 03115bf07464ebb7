"""``unimoe fit|validate|test|predict``: LightningCLI with unimoe's defaults.

Defaults a user would otherwise wire by hand on every run:
- MLflow logging into ``<default_root_dir>/mlflow.db`` (no server; ``logger: false`` disables);
  ``--mlflow_dir DIR`` puts the store (``DIR/mlflow.db`` + ``DIR/mlartifacts``) elsewhere, which
  is how every curriculum stage logs into one experiment at the curriculum root.
- ``ModelCheckpoint`` into ``<default_root_dir>/checkpoints`` with ``last.ckpt`` always kept,
  so a killed run resumes with ``--ckpt_path <dir>/checkpoints/last.ckpt``; and
  ``StageFinalizer``: the model folder ``<default_root_dir>/final/`` when training ends normally; and
  ``NonFiniteGuard``: a step with a NaN/inf loss or gradient is skipped (10 at most, then stop).
- Checkpoints written next to their target and renamed (``AtomicCheckpointIO``): a kill or a full
  disk never truncates ``last.ckpt``.
- ``fit`` locks its run directory (:mod:`unimoe.locks`): a second run on it refuses, naming the first.
- A rich progress bar over the stage's optimizer steps (``StepProgressBar``), and the resolved
  config saved next to the checkpoints and in MLflow.
- Stages, data modules and callbacks (in-tree and from installed plug-ins, all declared as
  entry points) are imported before parsing, so YAML names them by short class name
  (``class_path: JointStage``, ``class_path: UniMoEDataModule``, ``class_path: ExpertLoadMonitor``).
- ``--config`` files are composed first (``extends``, ``${data_root}`` / ``${env:NAME}``,
  ``--data_root`` or ``$UNIMOE_DATA_ROOT``; see :mod:`unimoe.training.recipes`), exactly as
  ``unimoe curriculum`` composes its stage files.

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
from lightning.pytorch.plugins.io import CheckpointIO

from unimoe.locks import FolderInUseError, FolderLock
from unimoe.training.checkpoint_io import AtomicCheckpointIO
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
        parser.add_argument("--mlflow_parent_run", type=Optional[str], default=None,
                            help="MLflow run id to nest this run under (a study cell's run)")

    def _parse_ckpt_path(self) -> None:
        """Resume rules (see the module docstring), then Lightning's hparam restore."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        ckpt_path = cfg.get("ckpt_path")
        from unimoe.sharded_checkpoint import ShardedCheckpointError, checkpoint_exists, is_sharded_checkpoint, read_header

        if not ckpt_path or not checkpoint_exists(ckpt_path):
            return
        sharded = is_sharded_checkpoint(ckpt_path)
        model = cfg.get("model")
        init_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        if init_args is not None and init_args.get("init_from") is not None:
            raise ConfigError(
                f"--ckpt_path {ckpt_path} and model.init_args.init_from ({_init_path(init_args.get('init_from'))}) are "
                "mutually exclusive: ckpt_path resumes this stage (weights, optimizer, step); init_from starts a new "
                "stage from another stage's weights at step 0. Drop init_from to resume "
                "(--model.init_args.init_from=null), or drop --ckpt_path to start over from init_from."
            )
        if sharded and not _is_model_parallel(cfg.get("trainer")):
            raise ConfigError(
                f"--ckpt_path {ckpt_path} is a sharded checkpoint (a folder written by MoEParallelStrategy); resume it "
                "with trainer.strategy unimoe.training.parallel.MoEParallelStrategy (any world size or "
                "expert_parallel_size, 1 device included). For its weights alone use init_from, or `unimoe "
                "checkpoint consolidate` it into one file."
            )
        from unimoe.checkpoint import CheckpointError, read_checkpoint

        try:  # weights_only, as Lightning's own resume loads it (torch's default since 2.6); a folder: meta.pt only
            checkpoint = read_header(ckpt_path) if sharded else read_checkpoint(ckpt_path)
        except (CheckpointError, ShardedCheckpointError) as exc:
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
        if sharded:
            self._restore_hparams(hparams)  # LightningCLI's own restore reads single files only
        else:
            super()._parse_ckpt_path()
        restored = self.config[subcommand].get("model")
        if restored is not None and hasattr(restored, "get"):
            for group in ("init_args", "dict_kwargs"):
                args = restored.get(group)
                if args is not None and hasattr(args, "get") and args.get("init_from") is not None:
                    args["init_from"] = None  # resumed weights come from ckpt_path, not from init_from

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.run_lock: FolderLock | None = None
        try:
            super().__init__(*args, **kwargs)
        finally:  # the subcommand has run (or failed): the run folder is free again
            if self.run_lock is not None:
                self.run_lock.release()

    def _restore_hparams(self, hparams: dict[str, Any]) -> None:
        """What ``LightningCLI._parse_ckpt_path`` does with a file's hyper-parameters, for a sharded folder."""
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        subcommand = self.config.subcommand
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

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

    def after_fit(self) -> None:
        """A fit resumed from a checkpoint of the finished training trains nothing and gets no
        ``on_train_end``: the StageFinalizer validates and writes ``final.ckpt`` here."""
        from unimoe.training.callbacks import StageFinalizer

        for callback in self.trainer.callbacks:
            if isinstance(callback, StageFinalizer):
                callback.finish_resumed(self.trainer, self.model, self.datamodule)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        from unimoe.training.callbacks import NonFiniteGuard, StageFinalizer, StepProgressBar, TrainingBudget

        config = self._get(self.config_init, "trainer", default={})
        run_dir = Path(config.get("default_root_dir") or DEFAULT_RUN_DIR)
        if self.config.get("subcommand") == "fit":  # before the logger or any callback touches the folder
            self.run_lock = FolderLock(run_dir).acquire()
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
                parent_run_id=self._get(self.config, "mlflow_parent_run"),
            )
        callbacks = list(config.get("callbacks") or [])
        checkpointing = config.get("enable_checkpointing", True) is not False
        if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=str(run_dir / CHECKPOINT_SUBDIR), save_last=True))
        if checkpointing and not any(isinstance(c, StageFinalizer) for c in callbacks):
            callbacks.append(StageFinalizer())
        if not any(isinstance(c, TrainingBudget) for c in callbacks):  # train/tokens, train/flops in every stage
            callbacks.append(TrainingBudget())
        if not any(isinstance(c, NonFiniteGuard) for c in callbacks):
            callbacks.append(NonFiniteGuard())
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        kwargs["callbacks"] = callbacks
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())  # checkpoints written next to the target, then renamed
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def _is_model_parallel(trainer_cfg: Any) -> bool:
    """Whether the config's ``trainer.strategy`` is a ModelParallelStrategy (which reads sharded folders)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = trainer_cfg.get("strategy") if trainer_cfg is not None and hasattr(trainer_cfg, "get") else None
    if isinstance(strategy, ModelParallelStrategy):
        return True
    class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
    if not class_path:
        return False
    import importlib

    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return "Parallel" in str(class_path)
    return isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)


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
    """Construct the CLI (parsing ``args``); stages, data modules, callbacks and strategies are imported first.

    LightningCLI resolves a short ``class_path`` (``JointStage``) among imported subclasses,
    so every class declared in the ``unimoe.stages`` / ``unimoe.data_modules`` /
    ``unimoe.callbacks`` / ``unimoe.strategies`` entry points (in-tree and plug-ins alike) is imported before parsing.
    Other components (routers, codecs...) are resolved by the registry when they are built.
    """
    from unimoe.registry import load_lightning_classes

    load_lightning_classes()
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
        # UniMoEDataModule shards batches across ranks itself (it refuses Lightning's distributed sampler)
        trainer_defaults={"use_distributed_sampler": False},
        parser_kwargs=parser_kwargs,
        args=args,
        run=run,
    )


def prepare_argv(argv: list[str]) -> list[str]:
    """Compose every ``--config`` file (``extends``, variables; :mod:`unimoe.training.recipes`)."""
    from unimoe.training.recipes import compose_argv

    return compose_argv(argv)


def run_lightning_cli(argv: list[str]) -> int:
    from unimoe.checkpoint import CheckpointError
    from unimoe.training.recipe_vars import RecipeError

    try:
        build_cli(prepare_argv(argv))
    except (ConfigError, RecipeError, CheckpointError, FolderInUseError) as exc:  # one line, no traceback
        print(f"unimoe {argv[0] if argv else 'fit'}: error: {exc}", file=sys.stderr)
        return 2
    return 0
