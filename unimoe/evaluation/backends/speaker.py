"""Speaker-embedding backends for SIM: Resemblyzer (offline) and WavLM x-vector
(transformers; the paper's SIM uses a WavLM-large speaker-verification model)."""

from __future__ import annotations

from typing import Any

import numpy as np


from ..clips import ClipSkip
from ..errors import BackendUnavailableError
from .base import SpeakerEmbedder, require, resolve_device


class ResemblyzerSpeaker(SpeakerEmbedder):
    """Resemblyzer's GE2E d-vector (256-dim, weights packaged in the wheel).

    Its own preprocessing runs first (volume normalisation and removal of long silences
    with webrtcvad), as the model was trained with it. Values are not comparable with
    WavLM-based SIM: same-speaker cosines are high (~0.85-0.95) and cross-speaker ones
    rarely drop below ~0.5.
    """

    sample_rate = 16000
    offline = True

    def __init__(self, device: str = "cpu", weights: str | None = None) -> None:
        resemblyzer = require("resemblyzer", "resemblyzer", "pip install resemblyzer")
        self._preprocess = resemblyzer.preprocess_wav
        self._encoder = resemblyzer.VoiceEncoder(device=resolve_device(device), verbose=False, weights_fpath=weights)
        self._weights = weights or "packaged pretrained.pt"

    def describe(self) -> str:
        return f"Resemblyzer GE2E d-vector ({self._weights})"

    def embed_speaker(self, wav: np.ndarray) -> np.ndarray:
        speech = self._preprocess(wav, source_sr=self.sample_rate)
        if speech.shape[0] < self.sample_rate // 10:
            raise ClipSkip("no speech left after Resemblyzer's voice-activity trimming")
        return np.asarray(self._encoder.embed_utterance(speech), dtype=np.float64)


class WavLMSpeaker(SpeakerEmbedder):
    """x-vector of a transformers ``WavLMForXVector`` (default ``microsoft/wavlm-base-plus-sv``).

    Seed-TTS eval (the paper) uses WavLM-large fine-tuned for verification with an ECAPA
    head from UniSpeech, which is not a transformers checkpoint; this is the closest
    model transformers loads. Say which one produced a SIM number.
    """

    sample_rate = 16000

    def __init__(self, model: str = "microsoft/wavlm-base-plus-sv", device: str = "auto",
                 local_files_only: bool = False) -> None:
        transformers = require("transformers", "wavlm_sv", "pip install transformers")
        self.model_name = model
        try:
            extractor = transformers.AutoFeatureExtractor.from_pretrained(model, local_files_only=local_files_only)
            network = transformers.WavLMForXVector.from_pretrained(model, local_files_only=local_files_only)
        except Exception as exc:
            raise BackendUnavailableError(f"transformers could not load WavLM model {model!r}: {exc}") from exc
        self._setup(extractor, network, device)

    @classmethod
    def from_modules(cls, feature_extractor: Any, model: Any, name: str = "custom", device: str = "cpu") -> "WavLMSpeaker":
        """Wrap an already built extractor + ``WavLMForXVector``-like model (any module whose
        output has ``.embeddings``); used for local checkpoints and tests."""
        self = cls.__new__(cls)
        self.model_name = name
        self._setup(feature_extractor, model, device)
        return self

    def _setup(self, extractor: Any, network: Any, device: str) -> None:
        import torch

        self._torch = torch
        self.device = resolve_device(device)
        self._extractor = extractor
        self._model = network.to(self.device).eval()

    def describe(self) -> str:
        return f"WavLM x-vector {self.model_name} (transformers WavLMForXVector)"

    def embed_speaker(self, wav: np.ndarray) -> np.ndarray:
        inputs = self._extractor(wav, sampling_rate=self.sample_rate, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in dict(inputs).items()}
        with self._torch.inference_mode():
            emb = self._model(**inputs).embeddings[0]
        emb = self._torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.cpu().double().numpy()
