"""Audio embeddings for FAD and class logits for KL.

* ``aisfx`` - the aiSFX sound-effects CNN (weights ship in the ``aisfx`` wheel, offline):
  the demo suite's FAD embedding and KL classifier.
* ``mel_stats`` - a fixed signal-processing embedding (no learned weights, offline); the
  labelled fallback when ``aisfx`` is not installed.
* ``panns_cnn14`` - PANNs Cnn14 (AudioSet), the FD/KL model of AudioLDM's eval.
* ``openl3`` - OpenL3 music embeddings, the paper's FAD embedding.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendUnavailableError, EvaluationError
from . import aisfx_model
from .base import AudioClassifier, AudioEmbedder, require, resolve_device


class Aisfx(AudioEmbedder, AudioClassifier):
    """aiSFX (ISMIR 2022 sound-effects CNN, 6.2M parameters): a 512-d embedding per ~2.3 s
    block for FAD, and one dataset head's class posteriors for KL.

    Weights: the ``aisfx`` package's ``models/checkpoint.pth`` (install it with
    ``pip install --no-deps aisfx==0.1.2``; licence CC BY 4.0), or ``checkpoint``. Front
    end and model are re-implemented in :mod:`aisfx_model` (the package's own code pins
    old numpy/librosa and unpickles arbitrary objects; unimoe reads it with ``weights_only=True``).

    Args:
        head: the dataset head whose classes KL compares (default ``prosfx``, 78 classes
            of the Pro Sound Effects library; class names are not shipped).
        hop: embedding hop as a fraction of the 100-frame block (0.5 = ~1.16 s, the
            package's default).
        checkpoint: another aiSFX checkpoint file.
        device: ``auto``, ``cpu`` or ``cuda``.

    A clip's KL distribution is the mean of its blocks' softmax posteriors; ``class_logits``
    returns its log, so the scorer's softmax gives that mean back. The sound-effects
    classes are not musical genres: KL here measures how differently two clips fall into
    sound categories (instrument timbre, speech, noise), which is what the demo needs.
    """

    sample_rate = aisfx_model.SAMPLE_RATE
    offline = True
    kl_activation = "softmax"
    #: blocks per forward pass (bounds memory for long clips: ~2.5 MB of activations per block)
    batch_blocks = 16
    #: clips whose block embeddings are kept (FAD and KL embed the same clips)
    cache_size = 256

    def __init__(self, head: str = "prosfx", hop: float = 0.5, checkpoint: str | None = None,
                 device: str = "auto") -> None:
        path = Path(checkpoint).expanduser() if checkpoint else aisfx_model.packaged_checkpoint()
        weights, heads = aisfx_model.load_checkpoint(path)
        if head not in heads:
            raise EvaluationError(f"aisfx: unknown head {head!r}; the checkpoint {path} has heads {sorted(heads)}")
        if not 0 < hop <= 1:
            raise EvaluationError(f"aisfx: hop must be in (0, 1] (a fraction of the 100-frame block), got {hop}")
        net = aisfx_model.AisfxNet(heads)
        try:
            net.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise BackendUnavailableError(f"{path} does not match the aiSFX architecture: {exc}") from exc
        self.device = resolve_device(device)
        self._net = net.to(self.device).eval()
        self._mel = aisfx_model.AisfxMel().to(self.device)
        self.head, self.hop, self.checkpoint = head, hop, str(path)
        self.num_classes = heads[head][1]
        self._cache: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

    def describe(self) -> str:
        return (f"aiSFX CNN (ISMIR 2022 sound-effects model, CC BY 4.0), 512-d per 2.3 s block, hop {self.hop:g}; "
                f"KL head {self.head} ({self.num_classes} classes); librosa front end; weights {self.checkpoint}")

    def block_embeddings(self, wav: np.ndarray) -> torch.Tensor:
        """``[blocks, 512]`` float32 embeddings of a mono 44.1 kHz clip (cached per clip)."""
        x = np.ascontiguousarray(wav, dtype=np.float32)
        key = (x.shape[0], hashlib.blake2b(x.tobytes(), digest_size=16).hexdigest())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with torch.inference_mode():
            spec = self._mel(torch.from_numpy(x).to(self.device))  # [frames, 96]
            chunks = aisfx_model.blocks(spec, self.hop)  # [blocks, 100, 96]
            emb = torch.cat([self._net.embed(c) for c in chunks.split(self.batch_blocks)])  # [blocks, 512]
        self._cache[key] = emb
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

    def embed_frames(self, wav: np.ndarray) -> np.ndarray:
        return self.block_embeddings(wav).double().cpu().numpy()

    def class_logits(self, wav: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            probs = self._net.head_logits(self.block_embeddings(wav), self.head).double().softmax(dim=-1)
        return torch.log(probs.mean(dim=0).clamp_min(1e-300)).cpu().numpy()  # [C]; softmax of this = mean posterior


class MelStats(AudioEmbedder, AudioClassifier):
    """Mean and standard deviation of a 64-band log-mel spectrogram per 1 s window.

    Deterministic (16 kHz, 25 ms Hann window, 10 ms hop, 64 Slaney mel bands 0-8 kHz),
    no learned weights: it measures differences in spectral envelope and its variability,
    not musical or semantic content. FAD on it is a *spectral-statistics* distance and is
    not comparable with VGGish/openl3 FAD. As a classifier it returns log mean mel-band
    power, so its softmax is the clip's normalised mel-band energy distribution and KL
    compares spectral balance - "mel bands" are not semantic classes.
    """

    offline = True

    def __init__(self, sample_rate: int = 16000, n_mels: int = 64, window_s: float = 1.0, hop_s: float = 0.5) -> None:
        import torchaudio

        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.hop_length = sample_rate // 100
        self.window_frames = max(1, round(window_s * 100))
        self.hop_frames = max(1, round(hop_s * 100))
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=int(0.025 * sample_rate), hop_length=self.hop_length,
            n_mels=n_mels, f_min=0.0, f_max=sample_rate / 2, power=2.0, norm="slaney", mel_scale="slaney",
        )

    def describe(self) -> str:
        return (f"mean+std of {self.n_mels}-band log-mel per {self.window_frames / 100:g} s window "
                f"(signal processing, no learned weights; not comparable with VGGish/openl3/PANNs)")

    def _power(self, wav: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return self._mel(torch.as_tensor(wav, dtype=torch.float32))  # [n_mels, frames]

    def embed_frames(self, wav: np.ndarray) -> np.ndarray:
        logmel = torch.log(self._power(wav).double() + 1e-10)
        frames = logmel.shape[1]
        starts = list(range(0, max(frames - self.window_frames, 0) + 1, self.hop_frames))
        rows = []
        for s in starts:
            seg = logmel[:, s : s + self.window_frames]
            rows.append(torch.cat([seg.mean(dim=1), seg.std(dim=1, unbiased=False)]))
        return torch.stack(rows).numpy()

    def class_logits(self, wav: np.ndarray) -> np.ndarray:
        return torch.log(self._power(wav).double().mean(dim=1) + 1e-10).numpy()


def _import_panns_models() -> types.ModuleType:
    """Import ``panns_inference.models`` without running the package ``__init__``.

    panns_inference's ``__init__`` imports its ``config``, which shells out to ``wget``
    for AudioSet label names at import time; offline that fails noisily. The model
    definitions need none of it, so the package is registered as a bare namespace first.
    """
    if "panns_inference.models" in sys.modules:
        return sys.modules["panns_inference.models"]
    spec = importlib.util.find_spec("panns_inference")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            "metric backend 'panns_cnn14' needs the Python package 'panns_inference': pip install panns-inference"
        )
    if "panns_inference" not in sys.modules:
        package = types.ModuleType("panns_inference")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["panns_inference"] = package
    return importlib.import_module("panns_inference.models")


class PannsCnn14(AudioEmbedder, AudioClassifier):
    """PANNs Cnn14 (32 kHz, AudioSet 527 classes): 2048-dim clip embedding for FAD/FD and
    pre-sigmoid class logits for KL, as in AudioLDM's evaluation.

    Weights: ``checkpoint_path`` (``Cnn14_mAP=0.431.pth``, Zenodo record 3987831), by
    default where panns_inference caches it (``~/panns_data``). ``random_init=True``
    builds the architecture with random weights - for smoke tests only, and the results
    say so.
    """

    sample_rate = 32000
    DEFAULT_CHECKPOINT = Path("~/panns_data/Cnn14_mAP=0.431.pth")

    def __init__(self, checkpoint_path: str | None = None, device: str = "auto", random_init: bool = False,
                 seed: int = 0) -> None:
        models = _import_panns_models()
        self.device = resolve_device(device)
        self.random_init = random_init
        if not random_init:
            path = Path(checkpoint_path).expanduser() if checkpoint_path else self.DEFAULT_CHECKPOINT.expanduser()
            if not path.is_file():
                raise BackendUnavailableError(
                    f"PANNs Cnn14 weights not found at {path}. Download Cnn14_mAP=0.431.pth (Zenodo record "
                    f"3987831) and pass checkpoint_path, or use the offline 'mel_stats' embedding."
                )
            self.checkpoint = str(path)
        else:
            self.checkpoint = f"RANDOM WEIGHTS (seed {seed})"
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            net = models.Cnn14(sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50,
                               fmax=14000, classes_num=527)
        if not random_init:
            state = _load_panns_weights(path)
            net.load_state_dict(state.get("model", state))
        self._net = net.to(self.device).eval()

    def describe(self) -> str:
        return f"PANNs Cnn14 AudioSet ({self.checkpoint})"

    def _forward(self, wav: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(wav, dtype=torch.float32, device=self.device)[None]
        with torch.inference_mode():
            return self._net(x)["embedding"]  # [1, 2048]; dropout is off in eval mode

    def embed_frames(self, wav: np.ndarray) -> np.ndarray:
        return self._forward(wav).double().cpu().numpy()

    def class_logits(self, wav: np.ndarray) -> np.ndarray:
        emb = self._forward(wav)
        with torch.inference_mode():
            return self._net.fc_audioset(emb)[0].double().cpu().numpy()


class OpenL3(AudioEmbedder):
    """OpenL3 embeddings (the paper's FAD embedding): music content, mel256, 512-dim,
    one row per ``hop_s``. Needs the ``openl3`` package (TensorFlow) and its weights."""

    sample_rate = 48000

    def __init__(self, content_type: str = "music", input_repr: str = "mel256", embedding_size: int = 512,
                 hop_s: float = 0.5) -> None:
        openl3 = require("openl3", "openl3", "pip install openl3 (needs TensorFlow)")
        self._openl3 = openl3
        self.settings = dict(content_type=content_type, input_repr=input_repr, embedding_size=embedding_size)
        self.hop_s = hop_s
        try:
            self._model = openl3.models.load_audio_embedding_model(**self.settings)
        except Exception as exc:
            raise BackendUnavailableError(f"openl3 could not load its model {self.settings}: {exc}") from exc

    def describe(self) -> str:
        s = self.settings
        return f"OpenL3 {s['content_type']}/{s['input_repr']}/{s['embedding_size']} (hop {self.hop_s} s)"

    def embed_frames(self, wav: np.ndarray) -> np.ndarray:
        emb, _ = self._openl3.get_audio_embedding(wav, self.sample_rate, model=self._model, hop_size=self.hop_s,
                                                  verbose=False)
        return np.asarray(emb, dtype=np.float64)


def _load_panns_weights(path: Path) -> dict:
    """The PANNs checkpoint (``{"model": state_dict, ...}``) read with ``weights_only=True``
    (numpy scalars allowed, as in the training-loop counters some releases carry): a file
    that needs anything else is refused rather than unpickled."""
    try:
        with torch.serialization.safe_globals(aisfx_model.numpy_scalar_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickled global outside the allow-list
        from unimoe.checkpoint import _unpickling_reason

        raise BackendUnavailableError(f"could not load the PANNs Cnn14 weights {path} with weights_only=True "
                                      f"(tensors and plain data only): {_unpickling_reason(exc)}") from exc
    if not isinstance(state, dict):
        raise BackendUnavailableError(f"{path} is not a PANNs checkpoint: it holds a {type(state).__name__}, not a mapping")
    return state
