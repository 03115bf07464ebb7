"""PaSST, the paper's classifier for KL (and Inception Score) on music."""

from __future__ import annotations

import numpy as np


from ..errors import BackendUnavailableError
from .base import AudioClassifier, require, resolve_device


class PaSST(AudioClassifier):
    """PaSST-S (AudioSet 527 classes, 32 kHz) through ``hear21passt``; softmax over its
    logits gives the class distributions that KL compares. ``hear21passt`` fetches its
    checkpoint into the torch hub cache on first use, so run once online (or copy the
    cache) before evaluating offline."""

    sample_rate = 32000

    def __init__(self, device: str = "auto") -> None:
        base = require("hear21passt.base", "passt", "pip install hear21passt")
        import torch

        self._torch = torch
        self.device = resolve_device(device)
        try:
            self._model = base.get_basic_model(mode="logits").to(self.device).eval()
        except Exception as exc:
            raise BackendUnavailableError(f"hear21passt could not load PaSST weights: {exc}") from exc

    def describe(self) -> str:
        return "PaSST-S AudioSet (hear21passt, logits)"

    def class_logits(self, wav: np.ndarray) -> np.ndarray:
        x = self._torch.as_tensor(wav, dtype=self._torch.float32, device=self.device)[None]
        with self._torch.inference_mode():
            return self._model(x)[0].double().cpu().numpy()
