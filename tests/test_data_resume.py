"""Crash resume of the training data: a resumed fit trains on exactly the batches the
uninterrupted run would have, in the same order (mid-epoch, at an epoch's end, across
epoch boundaries, with and without worker processes); old checkpoints still resume.

The reference is always an uninterrupted Trainer run of the same configuration; the ids
come from the examples read out of the shards (not from the sampler's index arithmetic).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from test_data_datamodule import MODEL, shards  # noqa: F401  (module-scoped shard fixture)
from unimoe.data.datamodule import UniMoEDataModule
from unimoe.data.resumable import ResumableDataLoader

pytestmark = pytest.mark.usefixtures("single_thread")

NOT_RESUMABLE = "dataloader is not resumable"


class IdCollate:
    """The module's collate function, plus the ids of the examples it was given."""

    def __init__(self, maker) -> None:
        self.maker = maker

    def __call__(self, examples):
        return [e.id for e in examples], self.maker(examples)

    def __getattr__(self, name):  # lengths etc. come from the real SequenceMaker
        if name == "maker":
            raise AttributeError(name)
        return getattr(self.maker, name)


class IdDataModule(UniMoEDataModule):
    def maker(self, train: bool):
        return IdCollate(super().maker(train))


class Recorder(L.LightningModule):
    """Records ``(epoch, example ids)`` of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, tuple[str, ...]]] = []

    def training_step(self, batch, batch_idx):
        ids, b = batch
        self.seen.append((self.current_epoch, tuple(ids)))
        return (self.w - b.audio_codes.float().mean()) ** 2

    def validation_step(self, batch, batch_idx):
        _, b = batch
        self.log("val", b.lengths.float().mean(), batch_size=b.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _datamodule(shards, workers: int) -> IdDataModule:  # noqa: F811
    return IdDataModule(sources=shards, model=MODEL, max_tokens=600, mix="balanced", temperature=2.0,
                        samples_per_epoch=10, seed=7, cond_drop_prob=0.0, num_workers=workers)


def _fit(shards, root: Path, workers: int, max_steps: int, ckpt_path=None,  # noqa: F811
         callbacks=()) -> tuple[list, list[str]]:
    """One fit; returns the recorded batches and the messages of the warnings it raised."""
    model = Recorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        val_check_interval=VAL_EVERY, check_val_every_n_epoch=None,  # as the recipes validate
                        default_root_dir=root, callbacks=list(callbacks),
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=_datamodule(shards, workers), ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return model.seen, [str(w.message) for w in caught]


def _every_step(root: Path) -> list[Callback]:
    """Checkpoints after every optimizer step (``step=K.ckpt``), after every validation
    (``val-step=K.ckpt``) and at every epoch's end (``end-epoch=E.ckpt``)."""
    return [ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1),
            ModelCheckpoint(dirpath=root, filename="val-{step}", monitor="val", save_top_k=-1),
            ModelCheckpoint(dirpath=root, filename="end-{epoch}", every_n_epochs=1, save_top_k=-1,
                            save_on_train_epoch_end=True)]


def _epoch_lengths(seen) -> list[int]:
    counts: dict[int, int] = {}
    for epoch, _ in seen:
        counts[epoch] = counts.get(epoch, 0) + 1
    return [counts[e] for e in sorted(counts)]


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):  # noqa: F811
    """The uninterrupted reference run (no workers), with a checkpoint after every step."""
    root = tmp_path_factory.mktemp("straight")
    seen, _ = _fit(shards, root, workers=0, max_steps=STEPS, callbacks=_every_step(root))
    return root, seen


STEPS = 17  # about 2.5 epochs
VAL_EVERY = 4  # global steps, across epoch boundaries


def test_reference_run_spans_several_reshuffled_epochs(straight):
    _, seen = straight
    lengths = _epoch_lengths(seen)
    assert len(seen) == STEPS and len(lengths) >= 3 and min(lengths[:2]) >= 5
    n = lengths[0]
    assert [ids for _, ids in seen[:n]] != [ids for _, ids in seen[n: n + lengths[1]]]  # each epoch its own order


def _resume_points(seen) -> dict[str, int]:
    n = _epoch_lengths(seen)[0]
    return {"mid-epoch-0": 2, "last-batch-of-epoch-0": n, "mid-epoch-1": n + 3}


@pytest.mark.parametrize("where", ["mid-epoch-0", "last-batch-of-epoch-0", "mid-epoch-1"])
def test_resume_continues_the_exact_batch_sequence(shards, straight, tmp_path, where):  # noqa: F811
    root, seen = straight
    k = _resume_points(seen)[where]
    ckpt = root / f"step={k}.ckpt"
    state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    epoch = seen[k - 1][0]  # the checkpoint after step k: k batches done, the last of them in this epoch
    assert state[0]["batch_sampler"]["epoch"] == epoch
    assert state[0]["batch_sampler"]["position"] == sum(1 for e, _ in seen[:k] if e == epoch)
    resumed, caught = _fit(shards, tmp_path, workers=0, max_steps=STEPS, ckpt_path=ckpt)
    assert resumed == seen[k:]  # same ids, same batches, same epochs - including the epoch boundaries after it
    assert not [m for m in caught if NOT_RESUMABLE in m]


def test_resume_from_an_epoch_end_checkpoint(shards, straight, tmp_path):  # noqa: F811
    root, seen = straight
    n = _epoch_lengths(seen)[0]
    resumed, _ = _fit(shards, tmp_path, workers=0, max_steps=STEPS, ckpt_path=root / "end-epoch=0.ckpt")
    assert resumed == seen[n:]


def test_resume_from_a_checkpoint_written_after_validation(shards, straight, tmp_path):  # noqa: F811
    root, seen = straight
    n = _epoch_lengths(seen)[0]
    k = next(k for k in range(VAL_EVERY, STEPS, VAL_EVERY) if k > n)  # a validation inside epoch 1
    assert seen[k - 1][0] == 1 and seen[k][0] == 1
    resumed, caught = _fit(shards, tmp_path, workers=0, max_steps=STEPS, ckpt_path=root / f"val-step={k}.ckpt")
    assert resumed == seen[k:]
    assert not [m for m in caught if NOT_RESUMABLE in m]


def test_resuming_twice_in_one_epoch_stays_aligned(shards, straight, tmp_path):  # noqa: F811
    root, seen = straight
    n = _epoch_lengths(seen)[0]
    first, _ = _fit(shards, tmp_path / "a", workers=0, max_steps=n + 2, ckpt_path=root / f"step={n + 1}.ckpt",
                    callbacks=[ModelCheckpoint(dirpath=tmp_path / "a", filename="{step}", every_n_train_steps=1,
                                               save_top_k=-1)])
    second, _ = _fit(shards, tmp_path / "b", workers=0, max_steps=STEPS, ckpt_path=tmp_path / "a" / f"step={n + 2}.ckpt")
    assert first + second == seen[n + 1:]


def test_worker_processes_resume_exactly(shards, straight, tmp_path):  # noqa: F811
    _, seen = straight
    n = _epoch_lengths(seen)[0]
    with_workers, _ = _fit(shards, tmp_path / "straight", workers=2, max_steps=STEPS, callbacks=_every_step(tmp_path / "straight"))
    assert with_workers == seen  # workers change nothing about the order
    for k in (n - 1, n + 3):  # one resume crosses the epoch boundary right after it, one starts mid-epoch 1
        resumed, caught = _fit(shards, tmp_path / f"r{k}", workers=2, max_steps=STEPS,
                               ckpt_path=tmp_path / "straight" / f"step={k}.ckpt")
        assert resumed == seen[k:], k
        assert not [m for m in caught if NOT_RESUMABLE in m]


def test_checkpoint_without_data_state_resumes_the_old_way(shards, straight, tmp_path, caplog):  # noqa: F811
    root, seen = straight
    n = _epoch_lengths(seen)[0]
    k = n + 2  # two batches into epoch 1
    ckpt = torch.load(root / f"step={k}.ckpt", weights_only=True)
    del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # as written before loaders were resumable
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with caplog.at_level(logging.WARNING, logger="unimoe.data.resumable"):
        resumed, _ = _fit(shards, tmp_path, workers=0, max_steps=STEPS, ckpt_path=old)
    # old behaviour: the interrupted epoch restarts from its first batch (its own order, not
    # epoch 0's) and ends after the batches Lightning still counts; later epochs are unaffected
    again = [b for b in resumed if b[0] == 1]
    assert len(again) >= _epoch_lengths(seen)[1] - 2 and again == seen[n: n + len(again)]
    later = resumed[len(again):]
    assert later and later == [b for b in seen if b[0] >= 2][: len(later)]
    assert any("without training-data state" in r.getMessage() and "restarts from its first batch" in r.getMessage()
               for r in caplog.records)


def test_loader_state_round_trip_with_workers(shards):  # noqa: F811
    """Without Lightning: the state counts delivered batches, not the ones workers prefetched."""
    dm = _datamodule(shards, workers=2)
    dm.setup("fit")
    reference = [ids for ids, _ in dm.train_dataloader()]
    loader = dm.train_dataloader()
    it = iter(loader)
    head = [next(it)[0] for _ in range(3)]
    state = loader.state_dict()
    assert state["batch_sampler"]["position"] == 3
    other = _datamodule(shards, workers=2)
    other.setup("fit")
    fresh = other.train_dataloader()
    assert isinstance(fresh, ResumableDataLoader)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state  # not iterated yet: the loaded state is what it would save
    assert head + [ids for ids, _ in fresh] == reference
