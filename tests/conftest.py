"""Shared test set-up: helper modules importable by name, and an opt-in single-thread mode."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HELPERS = Path(__file__).parent / "helpers"
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))

# Whisper in float32 unless the caller forces another compute type (UNIMOE_ASR_COMPUTE_TYPE=int8
# pytest ...): int8 kernels differ by CPU, float32 is the portable reference for the WER bounds.
# Subprocesses started by tests (the CLI tests) inherit it.
os.environ.setdefault("UNIMOE_ASR_COMPUTE_TYPE", "float32")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models and small STFTs gain nothing from intra-op threads, and on a shared CPU
    the thread pool's spinning makes them several times slower; restored after the module.
    Opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
