"""A training DataLoader whose place in the epoch survives a crash resume.

Lightning saves ``state_dict()`` of every training loader that has one (its ``_Stateful``
protocol: ``state_dict`` + ``load_state_dict``) into the checkpoint, under
``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]`` (a list, one entry per
stateful loader), and on ``fit(ckpt_path=...)`` hands it back to ``load_state_dict`` before
it creates the resumed run's iterator. A loader without the methods restarts the
interrupted epoch and Lightning warns that it "is not resumable".

Four details make the resumed order exact:

* The position is the number of batches *delivered to the training loop*, counted here;
  the batch sampler runs ahead of it when worker processes prefetch.
* The real iterator starts at the first ``next()``, not at ``iter()``. ``FitLoop.setup_data``
  creates the training iterator *before* it calls ``set_epoch`` for the resumed epoch, and
  a multi-process iterator draws its first indices immediately (Lightning issue #21938:
  the first resumed epoch replays epoch 0's order). Deferring lets the restored epoch - or
  the next one, for a checkpoint written at an epoch's end - decide the order.
* The epoch is the training loop's ``current_epoch`` (given by ``loop_position``), not the
  number Lightning passes to ``set_epoch``: Lightning 2.6 passes its ``processed`` epoch
  counter, which after a resume from a checkpoint written in ``on_train_epoch_end`` runs one
  ahead of ``current_epoch`` for the rest of the run, so every later epoch would draw
  another epoch's order than the uninterrupted run. In an uninterrupted run the two agree.
* The sampler's order is a pure function of ``(seed, epoch)``, so epoch + position is the
  whole state (:meth:`TokenBudgetBatchSampler.state_dict`).

A checkpoint without this state (written before the loader was resumable) still resumes:
the interrupted epoch restarts from its first batch, as before, with a warning saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a resumable batch sampler, with Lightning's state-dict interface.

    Takes the ``DataLoader`` arguments; ``batch_sampler`` must have ``set_epoch``,
    ``state_dict(consumed)``, ``load_state_dict`` and ``started_at``
    (:class:`~unimoe.data.sampler.TokenBudgetBatchSampler`). ``loop_position``, if given,
    returns the training loop's ``(current epoch, batches of it already consumed)`` when an
    iteration starts (None outside a fit): the epoch decides the order, and an iteration that
    starts at another position - an old checkpoint without data state, or a disagreeing one -
    is logged as a warning, because the run then trains on another order than the
    interrupted one.
    """

    def __init__(self, *args: Any, loop_position: Callable[[], tuple[int, int] | None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        missing = [m for m in ("set_epoch", "state_dict", "load_state_dict", "started_at")
                   if not hasattr(self.batch_sampler, m)]
        if missing:
            raise TypeError(f"ResumableDataLoader needs a resumable batch_sampler (e.g. TokenBudgetBatchSampler); "
                            f"{type(self.batch_sampler).__name__} lacks {', '.join(missing)}")
        self.loop_position = loop_position
        self._delivered = 0  # batches the latest iteration handed out
        self._loaded = False  # a state was loaded and no iteration has started from it yet

    def __iter__(self) -> Iterator[Any]:
        return _DeferredIterator(self)

    def state_dict(self) -> dict[str, Any]:
        """The batch sampler's state at the last batch this loader delivered."""
        return {"batch_sampler": self.batch_sampler.state_dict(consumed=self._delivered)}  # type: ignore[union-attr]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``: the next iteration continues where the saved one stopped."""
        self.batch_sampler.load_state_dict(state["batch_sampler"])  # type: ignore[union-attr]
        self._delivered = 0
        self._loaded = True

    def _check_start(self, resumed: bool, loop: tuple[int, int] | None) -> None:
        """Compare where this iteration started with where the training loop says the epoch is."""
        expected = loop[1] if loop is not None else 0
        epoch, start = self.batch_sampler.started_at  # type: ignore[union-attr, misc]
        if not expected or expected == start:
            return
        total = len(self)
        if resumed:
            log.warning("training data: the training loop resumes epoch %d after %d batches but the checkpoint's "
                        "data state is at batch %d; the epoch's batch order is continued from batch %d",
                        epoch, expected, start, start)
        else:
            log.warning("training data: resuming mid-epoch (epoch %d, after %d of about %d batches) from a "
                        "checkpoint without training-data state (written before the data loader was resumable): "
                        "the epoch restarts from its first batch, so about %d already-trained batches are seen "
                        "again and as many at the epoch's end are skipped", epoch, expected, total, expected)


class _DeferredIterator(Iterator[Any]):
    """Creates the loader's real iterator at the first ``next()`` and counts delivered batches."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self._it: Iterator[Any] | None = None

    def __next__(self) -> Any:
        loader = self.loader
        first = self._it is None
        if first:
            resumed, loader._loaded = loader._loaded, False
            loader._delivered = 0
            loop = loader.loop_position() if loader.loop_position is not None else None
            if loop is not None:
                loader.batch_sampler.set_epoch(loop[0])  # type: ignore[union-attr]
            # the batch sampler's iteration (its new record) starts inside this call: at the
            # worker prefetch in DataLoader.__iter__, or at the next() below without workers
            self._it = DataLoader.__iter__(loader)
        batch = next(self._it)  # type: ignore[arg-type]
        loader._delivered += 1
        if first:
            loader._check_start(resumed, loop)
        return batch
