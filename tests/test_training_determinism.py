"""Training randomness is a pure function of (seed, epoch, example draw / batch): a run that
is interrupted and resumed, or one with another number of DataLoader workers, computes the
same losses and ends with the same weights, bit for bit, as an uninterrupted run.

The randomness covered: the CFG condition drop of every training example (drawn in the
collate function, i.e. inside the worker processes), the routers' input jitter (drawn in
the forward pass), and the samplers' shuffles. ``cond_drop_prob`` is 0.5 here so that a
wrong draw shows up in the very first resumed batches. The reference is always the
uninterrupted run; a run with another data seed must differ (the comparison can fail).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from training_helpers import tiny_data
from unimoe.data.datamodule import UniMoEDataModule
from unimoe.data.sequences import draw_rng
from unimoe.model.config import AudioLMConfig
from unimoe.moe.config import MoEConfig
from unimoe.training.stages import JointStage

pytestmark = pytest.mark.usefixtures("single_thread")

MODEL = AudioLMConfig.from_preset("tiny").replace(moe=MoEConfig(
    num_routed_experts=4, routed_intermediate_size=32, num_null_experts=1, num_shared_experts=1,
    shared_intermediate_size=32, router={"name": "top_p", "top_p": 0.7, "jitter": 0.05}))
STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.getbasetemp())


@dataclass
class Run:
    losses: dict[int, float]
    """Training loss by global step."""
    weights: dict[str, torch.Tensor]
    epochs: set[int]


class Losses(Callback):
    """The training loss of every optimizer step, by global step."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}
        self.epochs: set[int] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step - 1] = float(outputs["loss"])
        self.epochs.add(trainer.current_epoch)


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated crash")


def _fit(data, root, *, workers=0, seed=3, crash_at=None, ckpt_path=None):
    sources = {t: str(data / "shards" / t) for t in ("tts", "t2m", "v2m")}
    dm = UniMoEDataModule(sources=sources, model="tiny", mix="balanced", max_tokens=1024, samples_per_epoch=12,
                          cond_drop_prob=0.5, seed=seed, num_workers=workers)
    module = JointStage(model=MODEL, seed=0)
    losses = Losses()
    callbacks = [losses, ModelCheckpoint(dirpath=root / "ck", save_last=True, every_n_train_steps=1)]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = L.Trainer(max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root), num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False, callbacks=callbacks)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return Run(losses.by_step, {k: v.detach().clone() for k, v in module.model.state_dict().items()}, losses.epochs)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    return _fit(data, tmp_path_factory.mktemp("straight"))


def _assert_same(run: Run, reference: Run) -> None:
    assert run.losses == {s: reference.losses[s] for s in run.losses}  # exact floats
    assert run.weights.keys() == reference.weights.keys()
    for key in run.weights:
        assert torch.equal(run.weights[key], reference.weights[key]), key


def test_reference_run_spans_several_epochs(straight):
    assert sorted(straight.losses) == list(range(STEPS)) and len(straight.epochs) >= 2


@pytest.mark.parametrize("crash_at", [2, 6])  # after 2 / 6 steps; the last checkpoint is one step earlier
def test_killed_and_resumed_run_is_bit_identical(data, straight, tmp_path, crash_at):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(data, tmp_path, crash_at=crash_at)
    last = tmp_path / "ck" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == crash_at - 1
    resumed = _fit(data, tmp_path / "resumed", ckpt_path=str(last))
    assert min(resumed.losses) == crash_at - 1
    _assert_same(resumed, straight)


def test_worker_processes_change_nothing(data, straight, tmp_path):
    _assert_same(_fit(data, tmp_path, workers=2), straight)


def test_another_data_seed_trains_differently(data, straight, tmp_path):
    """The control: the comparison above can fail."""
    other = _fit(data, tmp_path, seed=4)
    assert other.losses != straight.losses
    assert any(not torch.equal(other.weights[k], straight.weights[k]) for k in other.weights)


def test_condition_drop_is_a_pure_function_of_seed_epoch_and_draw():
    draws = [draw_rng(0, epoch, d, index).random() for epoch in range(3) for d in range(200) for index in (d % 7,)]
    again = [draw_rng(0, epoch, d, index).random() for epoch in range(3) for d in range(200) for index in (d % 7,)]
    assert draws == again
    rate = sum(x < 0.1 for x in draws) / len(draws)
    assert 0.07 < rate < 0.13  # 600 draws of Bernoulli(0.1): mean 0.1, sd 0.012
    assert draw_rng(1, 0, 0, 0).random() != draw_rng(0, 0, 0, 0).random()
    random.seed(123)  # the process's own streams play no part
    assert draw_rng(0, 2, 5, 5).random() == draws[2 * 200 + 5]
