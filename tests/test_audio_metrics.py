"""Audio metrics while training: ``AudioSamples(metrics=...)`` scores the validation clips with
an evaluation suite, logs ``val/audio/<task>/<key>``, survives missing backends, and gives the
same numbers as ``unimoe evaluate`` (``run_suite``) on the same files."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import yaml

from training_helpers import TINY_MODEL, MemoryLogger, tiny_data
from unimoe.data.datamodule import UniMoEDataModule
from unimoe.data.dataset import ShardDataset
from unimoe.evaluation.backends.base import AudioEmbedder
from unimoe.evaluation.errors import BackendUnavailableError, EvaluationError
from unimoe.evaluation.runner import run_suite
from unimoe.evaluation.suite import load_suite
from unimoe.model.config import AudioLMConfig
from unimoe.training.callbacks import AudioSamples, StageFinalizer
from unimoe.training.callbacks import audio_metrics
from unimoe.training.stages import SpecialistStage

pytestmark = pytest.mark.usefixtures("single_thread")
TASKS = ("tts", "t2m", "v2m")
GEN = {"max_seconds": 1.0, "min_seconds": 0.6, "batch_size": 6}  # >= 0.3 s, so no clip is too short to score


class MissingEmbedder(AudioEmbedder):
    """A FAD backend whose weights are never there; counts how often it is attempted."""

    attempts = 0

    def __init__(self) -> None:
        MissingEmbedder.attempts += 1
        raise BackendUnavailableError("test embedder weights are not installed")

    def embed_frames(self, wav):  # pragma: no cover - never built
        raise AssertionError


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees a process in which no backend has been reported unavailable yet."""
    monkeypatch.setattr(audio_metrics, "_REPORTED", set())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.getbasetemp())


def fit(data: Path, root: Path, samples: AudioSamples, steps: int = 4, every: int = 2) -> MemoryLogger:
    logger = MemoryLogger()
    config = AudioLMConfig(**TINY_MODEL)
    stage = SpecialistStage(model=config, codec={"name": "spectral_rvq", "path": str(data / "codec.pt")})
    module = UniMoEDataModule(sources={t: str(data / "shards" / t) for t in TASKS}, model=config, max_tokens=2048)
    trainer = L.Trainer(max_steps=steps, val_check_interval=every, check_val_every_n_epoch=None, logger=logger,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=str(root),
                        num_sanity_val_steps=0, limit_val_batches=2, callbacks=[samples, StageFinalizer()])
    trainer.fit(stage, module)
    return logger


def logged(logger: MemoryLogger) -> list[dict]:
    return [m for _, m in logger.rows if any(k.startswith("val/audio/") for k in m)]


def test_demo_suite_scores_are_logged_per_task_and_equal_a_direct_evaluation(data, tmp_path, caplog):
    samples = AudioSamples(per_task=2, settings=GEN, metrics={"suite": "demo"})
    with caplog.at_level(logging.WARNING, logger="unimoe.training"):
        logger = fit(data, tmp_path, samples)
    rows = logged(logger)
    assert len(rows) == 2  # both validations scored
    names = set(rows[-1])
    for task, key in (("tts", "wer_whisper_base"), ("tts", "wer_pocketsphinx"), ("tts", "sim_resemblyzer"),
                      ("tts", "dnsmos_ovrl"), ("t2m", "fad_aisfx"), ("t2m", "kl_aisfx"), ("v2m", "fad_aisfx"),
                      ("v2m", "kl_aisfx")):
        assert f"val/audio/{task}/{key}" in names, (task, key)
    assert not any("clap" in n for n in names)  # CLAP has no offline backend: never a proxy number
    if importlib.util.find_spec("laion_clap") is None:
        notes = [r.getMessage() for r in caplog.records if "clap_laion" in r.getMessage()]
        assert len(notes) == 1 and "unavailable offline" in notes[0]  # reported once over two validations
    # the stage's final metrics carry the last scores
    final = json.loads((tmp_path / "final_metrics.json").read_text())["metrics"]
    for name, value in rows[-1].items():
        if name.startswith("val/audio/"):
            assert final[name] == pytest.approx(value)
    # independent check: the same files through the evaluation runner (unimoe evaluate's path)
    step_dir = tmp_path / "samples" / "step0000004"
    ref_dir = tmp_path / "samples" / "reference"
    lines = []
    for task in TASKS:
        ds = ShardDataset(data / "shards" / task, split="val")
        for i in range(2):
            row = ds.row(i)
            name = row["id"] if row["id"].startswith(task) else f"{task}-{row['id']}"
            line = {"id": name, "task": task, "audio": str(step_dir / f"{name}.wav"), "text": row["text"],
                    "reference_audio": str(ref_dir / f"{name}.wav")}
            if task == "tts":
                line["prompt_audio"] = str(ref_dir / f"{name}.prompt.wav")
            lines.append(line)
    manifest = tmp_path / "eval.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = run_suite(load_suite("demo"), manifest=manifest, out_dir=tmp_path / "eval", mlflow=False,
                       log=lambda m: None)
    direct = {f"val/audio/{name}": value for name, value in report.values().items()}
    callback = {k: v for k, v in rows[-1].items() if k.startswith("val/audio/")}
    assert callback.keys() == direct.keys()
    for name, value in direct.items():
        assert callback[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name  # Lightning logs float32
    # the full report (backends, per-clip values) sits next to the clips
    written = json.loads((step_dir / "results.json").read_text())
    assert {m["key"] for m in written["metrics"]} >= {"wer_whisper_base", "fad_aisfx", "clap_laion"}
    assert "aiSFX CNN" in next(m for m in written["metrics"] if m["key"] == "fad_aisfx")["backend_description"]


def test_a_missing_backend_is_reported_once_its_fallback_is_scored_and_training_completes(data, tmp_path, caplog):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "t", "metrics": [
        {"metric": "fad", "key": "fad_missing", "backend": "test_audio_metrics.MissingEmbedder",
         "fallback": {"backend": "mel_stats", "key": "fad_mel_stats"}},
        {"metric": "kl", "key": "kl_missing", "backend": "test_audio_metrics.MissingEmbedder"},
        {"metric": "kl", "key": "kl_mel_bands", "backend": "mel_stats"}]}))
    MissingEmbedder.attempts = 0
    samples = AudioSamples(per_task=2, tasks=["t2m", "v2m"], settings=GEN, metrics={"suite": str(suite)})
    with caplog.at_level(logging.WARNING, logger="unimoe.training"):
        logger = fit(data, tmp_path, samples, steps=6, every=2)  # three validations
        # a second stage in the same process (an in-process curriculum) does not warn again
        again = AudioSamples(per_task=2, tasks=["t2m"], settings=GEN, metrics={"suite": str(suite)})
        fit(data, tmp_path / "next", again, steps=2, every=2)
    assert (tmp_path / "final" / "config.json").is_file()  # training completed: the final model folder
    rows = logged(logger)
    assert len(rows) == 3
    for row in rows:
        assert {"val/audio/t2m/fad_mel_stats", "val/audio/v2m/kl_mel_bands"} <= set(row)
        assert not any("missing" in k for k in row)
    warnings = [r.getMessage() for r in caplog.records if "is unavailable" in r.getMessage()]
    assert len(warnings) == 2  # one per missing entry, never repeated
    assert any("fad_missing" in w and "fallback fad_mel_stats" in w for w in warnings)
    assert MissingEmbedder.attempts == 2 + 2  # built once per entry and stage, then never retried
    assert set(samples._scorer.unavailable) == set(again._scorer.unavailable) == {"fad_missing", "kl_missing"}
    report = json.loads(next((tmp_path / "next" / "samples").glob("step*/results.json")).read_text())
    assert {m["key"] for m in report["metrics"] if m["unavailable"]} == {"fad_missing", "kl_missing"}


def test_scoring_settings_are_checked_before_training(data, tmp_path):
    with pytest.raises(ValueError, match="must be a multiple"):
        AudioSamples(every_n_validations=2, metrics={"every_n_validations": 3})
    with pytest.raises(ValueError, match="keep reference=True"):
        AudioSamples(reference=False, metrics={})
    with pytest.raises(ValueError, match="every_n_validations must be >= 1"):
        AudioSamples(metrics={"every_n_validations": 0})
    with pytest.raises(EvaluationError, match="suite file not found: no_such_suite"):
        fit(data, tmp_path, AudioSamples(metrics={"suite": "no_such_suite"}))
    assert not (tmp_path / "samples").exists()  # failed at fit start, before any step
