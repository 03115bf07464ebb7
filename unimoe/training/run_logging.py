"""MLflow as the default logger, with a local store inside the run directory.

MLflow >= 3.7 refuses a plain ``file:./mlruns`` store, and Lightning's default MLflow
logger would create one, so every run gets ``sqlite:///<run dir>/mlflow.db`` plus an
explicit artifact folder. No server is needed; ``mlflow ui --backend-store-uri
sqlite:///<run dir>/mlflow.db`` browses it. The run id is remembered in the run directory
so a resumed stage keeps logging into the same MLflow run. A curriculum passes its root as
the store directory, so all its stages are runs of one experiment in one store.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from unimoe.atomic import atomic_path, write_text_atomic

RUN_ID_FILE = "mlflow_run_id.txt"


class ResumableMLFlowLogger(MLFlowLogger):
    """MLFlowLogger that can log hyper-parameters again into a resumed run.

    MLflow params are immutable, but a resumed stage logs its hparams a second time (and
    ``init_from`` is dropped on resume). Params already recorded with the same value are
    skipped; a changed value is kept as the tag ``resumed.<key>`` instead of failing.
    """

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from mlflow.entities import Param

        flat = _flatten_dict(_convert_params(params))
        existing = self.experiment.get_run(self.run_id).data.params
        new = [Param(key=k, value=str(v)[:250]) for k, v in flat.items() if k not in existing]
        for k, v in flat.items():
            if k in existing and existing[k] != str(v)[:250]:
                self.experiment.set_tag(self.run_id, f"resumed.{k}", str(v)[:5000])
        for idx in range(0, len(new), 100):
            self.experiment.log_batch(run_id=self.run_id, params=new[idx: idx + 100])


def tracking_uri_for(run_dir: str | Path) -> str:
    """The sqlite MLflow store of a run directory (absolute; created so that a kill cannot break it)."""
    from unimoe.mlflow_store import sqlite_tracking_uri

    return sqlite_tracking_uri(run_dir)


def mlflow_logger_for(
    run_dir: str | Path,
    experiment_name: str = "unimoe",
    run_name: str | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    store_dir: str | Path | None = None,
    parent_run_id: str | None = None,
) -> MLFlowLogger:
    """An MLFlowLogger for ``run_dir``; with ``resume`` it reopens the run recorded there.

    The store (``mlflow.db`` + ``mlartifacts/``) lives in ``store_dir`` when given (the
    curriculum root, shared by all its stages), else in ``run_dir``. The run id is always
    remembered in ``run_dir``. ``parent_run_id`` nests a new run under that run (a study
    cell's run); a resumed run keeps the parent it was created with.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    store = Path(store_dir).resolve() if store_dir is not None else run_dir
    store.mkdir(parents=True, exist_ok=True)
    run_id = None
    id_file = run_dir / RUN_ID_FILE
    if resume and id_file.exists():
        run_id = id_file.read_text().strip() or None
    logger = ResumableMLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name or run_dir.name,
        tracking_uri=tracking_uri or tracking_uri_for(store),
        artifact_location=(store / "mlartifacts").as_uri(),
        run_id=run_id,
        tags={"mlflow.parentRunId": parent_run_id} if parent_run_id and run_id is None else None,
    )
    return logger


@rank_zero_only
def remember_run_id(logger: MLFlowLogger, run_dir: str | Path) -> None:
    write_text_atomic(Path(run_dir) / RUN_ID_FILE, logger.run_id)  # a kill never leaves an empty id


class RunConfigSaver(SaveConfigCallback):
    """Save the fully resolved config into the run directory and as an MLflow artifact.

    Lightning's own callback writes to ``trainer.log_dir``, which is None for MLflow's
    sqlite store. An existing ``config.yaml`` (a resumed run) is kept as
    ``config.<timestamp>.yaml`` rather than overwritten, so no history is lost.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / self.config_filename
        if path.exists():
            shutil.move(str(path), str(path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")))
        with atomic_path(path) as tmp:  # a kill never leaves a torn config.yaml
            self.parser.save(self.config, str(tmp), skip_none=False, overwrite=True, multifile=False)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                remember_run_id(logger, run_dir)
                logger.experiment.log_artifact(logger.run_id, str(path))
