"""CLAP backends for the CLAP score (cosine of caption and audio embeddings).

No CLAP model ships offline here; both backends load weights from a local file/folder or
the hub. The paper reports CLAP 0.29 on MusicCaps (LAION-CLAP music checkpoint)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


from ..errors import BackendUnavailableError
from .base import TextAudioEmbedder, require, resolve_device


class LaionClap(TextAudioEmbedder):
    """LAION-CLAP (``laion_clap`` package). For music use ``amodel="HTSAT-base"`` with
    ``checkpoint=music_audioset_epoch_15_esc_90.14.pt``; without ``checkpoint`` the package
    downloads its default general-audio weights."""

    sample_rate = 48000

    def __init__(self, checkpoint: str | None = None, amodel: str = "HTSAT-base", enable_fusion: bool = False,
                 device: str = "auto") -> None:
        laion_clap = require("laion_clap", "laion_clap", "pip install laion-clap")
        self.checkpoint, self.amodel = checkpoint, amodel
        try:
            self._model = laion_clap.CLAP_Module(enable_fusion=enable_fusion, amodel=amodel,
                                                 device=resolve_device(device))
            self._model.load_ckpt(ckpt=checkpoint) if checkpoint else self._model.load_ckpt()
        except Exception as exc:
            raise BackendUnavailableError(f"LAION-CLAP could not load checkpoint {checkpoint!r}: {exc}") from exc

    def describe(self) -> str:
        return f"LAION-CLAP {self.amodel} ({self.checkpoint or 'package default checkpoint'})"

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self._model.get_text_embedding(list(texts), use_tensor=False), dtype=np.float64)

    def embed_audio(self, wav: np.ndarray) -> np.ndarray:
        # LAION-CLAP was trained on int16-quantised audio; quantise the same way.
        x = (np.clip(wav, -1, 1) * 32767.0).astype(np.int16).astype(np.float32) / 32767.0
        emb = self._model.get_audio_embedding_from_data(x=x[None, :], use_tensor=False)
        return np.asarray(emb[0], dtype=np.float64)


class TransformersClap(TextAudioEmbedder):
    """CLAP through transformers ``ClapModel`` (default ``laion/larger_clap_music``)."""

    sample_rate = 48000

    def __init__(self, model: str = "laion/larger_clap_music", device: str = "auto",
                 local_files_only: bool = False) -> None:
        transformers = require("transformers", "clap_hf", "pip install transformers")
        self.model_name = model
        try:
            processor = transformers.ClapProcessor.from_pretrained(model, local_files_only=local_files_only)
            network = transformers.ClapModel.from_pretrained(model, local_files_only=local_files_only)
        except Exception as exc:
            raise BackendUnavailableError(f"transformers could not load CLAP model {model!r}: {exc}") from exc
        self._setup(processor, network, device)

    @classmethod
    def from_modules(cls, processor: Any, model: Any, name: str = "custom", device: str = "cpu") -> "TransformersClap":
        """Wrap an already built processor + ``ClapModel``-like model (``get_text_features``,
        ``get_audio_features``); used for local checkpoints and tests."""
        self = cls.__new__(cls)
        self.model_name = name
        self._setup(processor, model, device)
        return self

    def _setup(self, processor: Any, network: Any, device: str) -> None:
        import torch

        self._torch = torch
        self.device = resolve_device(device)
        self._processor = processor
        self._model = network.to(self.device).eval()

    def describe(self) -> str:
        return f"CLAP {self.model_name} (transformers ClapModel)"

    def _to_device(self, inputs: Any) -> dict[str, Any]:
        return {k: v.to(self.device) for k, v in dict(inputs).items()}

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        inputs = self._processor(text=list(texts), return_tensors="pt", padding=True)
        with self._torch.inference_mode():
            return self._model.get_text_features(**self._to_device(inputs)).double().cpu().numpy()

    def embed_audio(self, wav: np.ndarray) -> np.ndarray:
        try:  # transformers renamed ``audios`` to ``audio``; accept both generations
            inputs = self._processor(audio=[wav], sampling_rate=self.sample_rate, return_tensors="pt")
        except TypeError:
            inputs = self._processor(audios=[wav], sampling_rate=self.sample_rate, return_tensors="pt")
        with self._torch.inference_mode():
            return self._model.get_audio_features(**self._to_device(inputs))[0].double().cpu().numpy()
