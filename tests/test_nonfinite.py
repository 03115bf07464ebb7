"""Non-finite training: a NaN/inf loss or gradient skips the step (weights and optimizer
moments untouched, the message names the step and the batch's examples), too many stop the
run before any bad update, and no checkpoint is ever written with non-finite weights (the
previous good one stays, byte for byte)."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from training_helpers import tiny_data
from unimoe.checkpoint import CheckpointMetadata, save_model_checkpoint
from unimoe.data.datamodule import UniMoEDataModule
from unimoe.finite import NonFiniteWeightsError
from unimoe.model.config import AudioLMConfig
from unimoe.model.transformer import AudioLM
from unimoe.training.callbacks import NonFiniteGuard, NonFiniteTrainingError
from unimoe.training.stages import SpecialistStage

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = AudioLMConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.getbasetemp())


class PoisonedStage(SpecialistStage):
    """Multiplies the loss by NaN (or one gradient by inf) at chosen global steps."""

    def __init__(self, nan_loss_at=(), inf_grad_at=(), **kw) -> None:
        super().__init__(model=TINY, **kw)
        self.nan_loss_at, self.inf_grad_at = set(nan_loss_at), set(inf_grad_at)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step in self.nan_loss_at:
            loss = loss * float("nan")
        return loss

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.inf_grad_at:
            self.model.blocks[0].ffn.down_proj.grad[0, 0] = float("inf")  # the loss itself is finite


class Record(Callback):
    """Weights after every step, and the ids of every training batch (read from the batch)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.ids: dict[int, tuple[str, ...]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids[trainer.global_step] = batch.example_ids

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def _trainer(root, steps, callbacks):
    return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(root), num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)


def _data(data):
    return UniMoEDataModule(sources={"tts": str(data / "shards" / "tts")}, model="tiny", max_tokens=1024, seed=1)


def test_nan_loss_and_inf_gradient_skip_the_step_and_name_the_examples(data, tmp_path, caplog):
    stage = PoisonedStage(nan_loss_at={2}, inf_grad_at={4})
    record, guard = Record(), NonFiniteGuard(max_skips=2)
    with caplog.at_level(logging.WARNING, logger="unimoe.training"):
        _trainer(tmp_path, 6, [record, guard]).fit(stage, _data(data))
    assert [s["step"] for s in guard.skipped] == [2, 4]
    messages = [r.getMessage() for r in caplog.records if "skipped step" in r.getMessage()]
    assert len(messages) == 2
    assert "step 2 (epoch 0, batch 2): loss nan" in messages[0] and "skip 1 of at most 2" in messages[0]
    assert "gradient norm inf (model.blocks.0.ffn.down_proj)" in messages[1]
    for message, step in zip(messages, (2, 4)):
        ids = record.ids[step]
        assert ids and all(i in message for i in ids)  # every example of the batch is named
    # a skipped step leaves every weight exactly as it was; the others do train
    for step in (2, 4):
        before, after = record.weights[step], record.weights[step + 1]
        assert all(torch.equal(before[k], after[k]) for k in before), step
    assert any(not torch.equal(record.weights[1][k], record.weights[2][k]) for k in record.weights[1])
    assert all(torch.isfinite(v).all() for v in stage.model.state_dict().values())
    # AdamW's moments were not touched by the skipped steps either: 4 real updates of 6
    state = next(iter(stage.trainer.optimizers[0].state.values()))
    assert int(state["step"]) == 4


def test_too_many_non_finite_steps_stop_before_a_bad_update_and_write_nothing(data, tmp_path):
    stage = PoisonedStage(nan_loss_at={1, 3})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1)
    record = Record()
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite training at step 3 .*loss nan; .*examples: tts-.*"
                                                     r"1 step\(s\) were skipped already \(NonFiniteGuard.max_skips=1\)"):
        _trainer(tmp_path, 6, [record, NonFiniteGuard(max_skips=1), ckpt]).fit(stage, _data(data))
    assert all(torch.isfinite(v).all() for v in stage.model.state_dict().values())
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # written after step 3's predecessor, never after the bad one
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all(torch.equal(last["state_dict"]["model." + k], v) for k, v in record.weights[3].items())


def test_skip_count_survives_a_resume(data, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1)
    _trainer(tmp_path, 3, [NonFiniteGuard(max_skips=1), ckpt]).fit(PoisonedStage(nan_loss_at={1}), _data(data))
    guard = NonFiniteGuard(max_skips=1)
    with pytest.raises(NonFiniteTrainingError, match="1 step\\(s\\) were skipped already"):
        _trainer(tmp_path, 6, [guard]).fit(PoisonedStage(nan_loss_at={4}), _data(data),
                                           ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert [s["step"] for s in guard.skipped] == [1]


class BreakWeights(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                pl_module.model.blocks[1].attn.o_proj.weight[3, 1] = float("inf")


def test_a_checkpoint_with_non_finite_weights_is_never_written(data, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1)
    broken = BreakWeights(at_step=3)  # runs before ModelCheckpoint's save of step 3
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to write a checkpoint of PoisonedStage at step 3: "
                                                    r"1 weight tensor\(s\) .*model.blocks.1.attn.o_proj.weight: 0 NaN, 1 inf"):
        _trainer(tmp_path, 6, [broken, ckpt]).fit(PoisonedStage(), _data(data))
    last = tmp_path / "ck" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2  # the previous good one is still there
    assert not list((tmp_path / "ck").glob("*.tmp*"))


def test_save_model_checkpoint_refuses_non_finite_weights_and_keeps_the_old_file(tmp_path):
    model = AudioLM(TINY)
    meta = CheckpointMetadata(config=TINY, codec=None, stage="upcycle")
    path = save_model_checkpoint(tmp_path / "m.ckpt", model, meta)
    before = path.read_bytes()
    with torch.no_grad():
        model.blocks[0].ffn.gate_up_proj.fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match=rf"refusing to write {tmp_path / 'm.ckpt'}: .*gate_up_proj"):
        save_model_checkpoint(path, model, meta)
    assert path.read_bytes() == before


def test_unimoe_fit_adds_the_guard_by_default(tmp_path):
    from unimoe.training.cli import build_cli

    cli = build_cli(["--model", "SpecialistStage", "--model.model", "tiny", "--data", "unimoe.data.datamodule.UniMoEDataModule",
                     "--data.sources", '{"tts": "none"}', "--trainer.logger", "false",
                     "--trainer.default_root_dir", str(tmp_path)], run=False)
    guards = [c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert len(guards) == 1 and guards[0].max_skips == 10
    with pytest.raises(ValueError, match="max_skips must be >= 0"):
        NonFiniteGuard(max_skips=-1)
