"""Lightning checkpoints written like every other unimoe file: next to the target, then renamed.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction whose temporary file is
made by ``tempfile.mkstemp()`` in the *system* temporary folder and then ``shutil.move``d onto
the target. When that folder is on another filesystem than the run (a tmpfs ``/tmp``, a
network or scratch disk for the runs), the move is a copy written straight over the target:
a kill or a full disk during the copy leaves a truncated ``last.ckpt`` where the good one
was, and a full ``/tmp`` fails every checkpoint although the run's disk has room.
:class:`AtomicCheckpointIO` (added by ``unimoe fit``) writes the temporary file in the target's
folder, fsyncs it and renames it (:func:`unimoe.atomic.atomic_path`), and reports a filesystem
failure as :class:`~unimoe.atomic.OutputWriteError` naming the checkpoint, the previous one
intact. Remote paths (``s3://`` ...) keep Lightning's implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unimoe.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are write-next-to-then-rename (see module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(Path(path), durable=True) as tmp:
            torch.save(checkpoint, tmp)
