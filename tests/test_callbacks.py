"""Callbacks: routing accumulation against a direct count, metrics/figures in a run, final checkpoint rules."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

HELPERS = Path(__file__).parent / "helpers"

from training_helpers import MemoryLogger, tiny_data  # noqa: E402

from unimoe.data.datamodule import UniMoEDataModule  # noqa: E402
from unimoe.model.config import AudioLMConfig  # noqa: E402
from unimoe.moe.config import MoEConfig  # noqa: E402
from unimoe.moe.layer import build_moe_layer  # noqa: E402
from unimoe.training.callbacks import AudioSamples, ExpertLoadMonitor, RoutingTotals, StageFinalizer  # noqa: E402
from unimoe.training.stages import JointStage, SpecialistStage  # noqa: E402

MOE = MoEConfig(num_routed_experts=4, routed_intermediate_size=32, num_null_experts=1, num_shared_experts=1,
                shared_intermediate_size=16, router={"name": "top_p", "top_p": 0.7, "jitter": 0.0})


def test_routing_totals_match_a_direct_count_of_the_router_decisions():
    torch.manual_seed(0)
    layer = build_moe_layer(32, MOE).eval()
    with torch.no_grad():
        layer.router.gate.weight.mul_(4.0)  # sharper routers: varied numbers of experts per token
    expected_tokens = torch.zeros(5)
    tasks = ["tts", "t2m", "v2m"]
    expected_by_task = torch.zeros(len(tasks), 5)
    expected_hist = torch.zeros(5)  # tokens by number of REAL experts (0..4)
    totals = None
    for step in range(3):
        x = torch.randn(2, 9, 32)
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, 6:] = False  # padding is not counted
        task_ids = torch.tensor([[0] * 9, [1] * 9])
        with torch.no_grad():
            _, info = layer(x, mask, task_ids)
            route = layer.router(x.reshape(18, 32), mask.reshape(18))  # the same decisions, recomputed
        selected = route.selected  # [T, 5]
        real = mask.reshape(18)
        expected_tokens += selected[real].sum(0)
        for t in (0, 1):
            rows = real & (task_ids.reshape(18) == t)
            expected_by_task[t] += selected[rows].sum(0)
        k = selected[real][:, :4].sum(1)
        expected_hist += torch.bincount(k, minlength=5)
        if totals is None:
            totals = RoutingTotals.empty([None, info], tasks)
        totals.add([None, info], aux=0.1 * step)
    out = totals.reduced(None)
    assert out.layers == [1]
    assert torch.equal(out.tokens[0], expected_tokens.double())
    assert torch.equal(out.hist[0], expected_hist.double())
    assert torch.equal(out.by_task[0, :2], expected_by_task[:2].double())
    labels = ["a", "b", "c", "d", "null"]
    metrics = out.metrics("moe/val", labels, detail=True, per_task=True)
    shares = expected_tokens / expected_tokens.sum()
    for e, label in enumerate(labels):
        assert metrics[f"moe/val/layer_1/share/{label}"] == pytest.approx(float(shares[e]))
    n = expected_hist.sum()
    assert metrics["moe/val/layer_1/null_frac"] == pytest.approx(float(expected_hist[0] / n))
    assert metrics["moe/val/layer_1/mean_active"] == pytest.approx(float((expected_hist * torch.arange(5)).sum() / n))
    assert metrics["moe/val/layer_1/max_load"] == pytest.approx(float(shares.max() * 5))
    tts = expected_by_task[0] / expected_by_task[0].sum()
    assert metrics["moe/val/tts/layer_1/share/c"] == pytest.approx(float(tts[2]))
    assert metrics["moe/val/tts/null_share"] == pytest.approx(float(tts[4]))
    assert metrics["moe/val/aux_loss"] == pytest.approx(0.1)  # mean over the 3 steps
    doubled = totals.reduced(lambda t: 2 * t)  # what a 2-rank all-reduce of equal ranks gives
    assert torch.equal(doubled.tokens, 2 * out.tokens)
    assert doubled.metrics("m", labels, True, False)["m/layer_1/share/a"] == pytest.approx(float(shares[0]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.getbasetemp())


def datamodule(data):
    sources = {t: str(data / "shards" / t) for t in ("tts", "t2m", "v2m")}
    return UniMoEDataModule(sources=sources, model="tiny", mix="balanced", max_tokens=2048)


def test_expert_load_monitor_logs_accumulated_metrics_and_writes_figures(data, tmp_path):
    logger = MemoryLogger()
    monitor = ExpertLoadMonitor(log_every_n_steps=2)
    stage = JointStage(model=AudioLMConfig.from_preset("tiny").replace(moe=MOE))
    trainer = L.Trainer(max_steps=4, logger=logger, enable_progress_bar=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path), num_sanity_val_steps=0, val_check_interval=4,
                        check_val_every_n_epoch=None, callbacks=[monitor], log_every_n_steps=1)
    trainer.fit(stage, datamodule(data))
    train_rows = [(step, m) for step, m in logger.rows if "moe/train/mean_active" in m]
    assert [step for step, _ in train_rows] == [1, 3]  # after 2 and 4 optimizer steps, on Lightning's step axis
    for _, m in train_rows:
        shares = [v for k, v in m.items() if k.startswith("moe/train/layer_0/share/")]
        assert len(shares) == 5 and sum(shares) == pytest.approx(1.0)
        assert 0.0 <= m["moe/train/null_frac"] <= 1.0 and "moe/train/aux_weight" in m
    val_rows = [m for _, m in logger.rows if "moe/val/mean_active" in m]
    assert len(val_rows) == 1 and "moe/val/tts/null_share" in val_rows[0]
    plots = tmp_path / "plots"
    assert (plots / "expert_load_val_step0000004.png").stat().st_size > 5000
    assert (plots / "activated_experts_val_step0000004.png").stat().st_size > 5000
    assert (plots / "expert_load_train_total_step0000004.png").is_file()
    raw = json.loads((plots / "routing_val_step0000004.json").read_text())
    assert raw["experts"] == ["e0", "e1", "e2", "e3", "null"] and set(raw["tokens_per_expert_by_task"]) <= {"tts", "t2m", "v2m"}
    total = np.array(raw["tokens_per_expert"]).sum(1)
    assert (total > 0).all()


class Boom(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise RuntimeError("boom")


def test_final_checkpoint_only_after_a_normal_end_and_never_over_a_finished_stage(data, tmp_path):
    def fit(root, callbacks):
        trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=True,
                            default_root_dir=str(root), limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[StageFinalizer(), *callbacks])
        trainer.fit(SpecialistStage(model="tiny"), UniMoEDataModule(sources={"tts": str(data / "shards" / "tts")},
                                                                    model="tiny", max_tokens=2048))

    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path / "crash", [Boom()])
    assert not (tmp_path / "crash" / "final").exists()
    fit(tmp_path / "ok", [])
    record = json.loads((tmp_path / "ok" / "final_metrics.json").read_text())
    assert record["global_step"] == 2 and "train/loss" in record["metrics"]
    final = tmp_path / "ok" / "final"  # a pickle-free model folder, nothing temporary left beside it
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in (tmp_path / "ok").iterdir() if p.name.startswith(".")]
    config = json.loads((final / "config.json").read_text())
    assert config["format"] == "unimoe-model" and config["stage"] == "specialist"
    (tmp_path / "ok" / "DONE.json").write_text("{}")
    before = (final / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="refusing to overwrite"):
        fit(tmp_path / "ok", [])
    assert (final / "model.safetensors").read_bytes() == before


def test_final_checkpoint_as_a_ckpt_file_when_asked(data, tmp_path):
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path), limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[StageFinalizer(filename="final.ckpt")])
    trainer.fit(SpecialistStage(model="tiny"), UniMoEDataModule(sources={"tts": str(data / "shards" / "tts")},
                                                                model="tiny", max_tokens=2048))
    ckpt = torch.load(tmp_path / "final.ckpt", weights_only=True)
    assert "optimizer_states" not in ckpt and ckpt["unimoe"]["stage"] == "specialist"


def test_audio_samples_need_a_codec(data, tmp_path):
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path), callbacks=[AudioSamples()], num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="AudioSamples needs the stage's codec"):
        trainer.fit(SpecialistStage(model="tiny"), UniMoEDataModule(sources={"tts": str(data / "shards" / "tts")},
                                                                    model="tiny", max_tokens=2048))
    with pytest.raises(ValueError, match="per_task"):
        AudioSamples(per_task=0)
