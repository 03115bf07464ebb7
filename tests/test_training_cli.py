"""`unimoe fit` through LightningCLI: MLflow store in the run dir, checkpoints, config, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

HELPERS = Path(__file__).parent / "helpers"


def _unimoe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "unimoe", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    config = work / "boring.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"class_path": "boring_stage.Boring", "init_args": {"lr": 0.05}},
                "data": {"class_path": "boring_stage.BoringData"},
                "trainer": {"max_epochs": 2, "default_root_dir": str(work / "run"), "log_every_n_steps": 1},
            }
        )
    )
    proc = _unimoe("fit", "--config", str(config), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, config


def _val_history(run_dir: Path) -> list[tuple[int, float]]:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    return [(m.step, m.value) for m in client.get_metric_history(run_id, "val/loss")]


def test_fit_writes_checkpoints_config_and_mlflow(trained):
    work, _ = trained
    run = work / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["lr"] == 0.05  # the resolved config, not a default
    history = _val_history(run)
    assert len(history) == 2  # one validation per epoch
    run_id = (run / "mlflow_run_id.txt").read_text().strip()
    assert (run / "mlartifacts" / run_id / "artifacts" / "config.yaml").is_file()
    assert not (work / "mlruns").exists()  # no stray file store in the cwd


def test_resume_continues_the_same_mlflow_run(trained):
    work, config = trained
    run = work / "run"
    before = (run / "mlflow_run_id.txt").read_text()
    proc = _unimoe(
        "fit", "--config", str(config), "--trainer.max_epochs", "3",
        "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "mlflow_run_id.txt").read_text() == before
    steps = [s for s, _ in _val_history(run)]
    assert len(steps) == 3 and steps == sorted(steps)
    assert len(list(run.glob("config.*.yaml"))) == 1  # the first config was kept, not overwritten


def test_bad_config_field_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"class_path": "boring_stage.Boring", "init_args": {"hiden": 3}}}))
    proc = _unimoe("fit", "--config", str(bad), cwd=tmp_path)
    assert proc.returncode != 0
    assert "hiden" in proc.stderr
