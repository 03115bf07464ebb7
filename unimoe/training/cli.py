"""``unimoe fit|validate|test|predict``: LightningCLI with unimoe's defaults.

Defaults a user would otherwise wire by hand on every run:
- MLflow logging into ``<default_root_dir>/mlflow.db`` (no server; ``logger: false`` disables).
- ``ModelCheckpoint`` into ``<default_root_dir>/checkpoints`` with ``last.ckpt`` always kept,
  so a killed run resumes with ``--ckpt_path <dir>/checkpoints/last.ckpt``.
- A rich progress bar, and the resolved config saved next to the checkpoints and in MLflow.
- Plug-ins from installed packages are imported before parsing, so YAML may name their
  classes by short name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from unimoe.training.run_logging import RunConfigSaver, mlflow_logger_for

DEFAULT_RUN_DIR = "runs/default"
CHECKPOINT_SUBDIR = "checkpoints"


class UniMoECLI(LightningCLI):
    """LightningCLI whose trainer gets unimoe's logger, checkpoint and progress defaults."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--experiment_name", type=str, default="unimoe", help="MLflow experiment the run is logged under"
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        run_dir = Path(config.get("default_root_dir") or DEFAULT_RUN_DIR)
        kwargs.setdefault("default_root_dir", str(run_dir))
        if config.get("logger") in (None, True):
            resume = bool(self._get(self.config, "ckpt_path"))
            kwargs["logger"] = mlflow_logger_for(
                run_dir, experiment_name=self._get(self.config, "experiment_name") or "unimoe", resume=resume
            )
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            callbacks.append(ModelCheckpoint(dirpath=str(run_dir / CHECKPOINT_SUBDIR), save_last=True))
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def build_cli(args: list[str] | None = None, run: bool = True) -> UniMoECLI:
    """Construct the CLI (parsing ``args``) with every plug-in imported first."""
    import unimoe.components  # noqa: F401  in-tree registrations
    from unimoe.registry import load_all_plugins

    load_all_plugins()
    return UniMoECLI(
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def run_lightning_cli(argv: list[str]) -> int:
    build_cli(argv)
    return 0
