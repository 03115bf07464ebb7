"""``spectral_rvq``: the embedded offline codec, fitted on the user's own corpus.

No downloaded weights: standardised log-mel frames are quantised by residual k-means
codebooks fitted on the corpus (:func:`fit_spectral_rvq`), and decoded by inverting the
mel spectrogram (:class:`unimoe.codecs.spectral.LogMel`). The fitted codec is one small file
(``torch.save`` of plain tensors and numbers, loaded with ``weights_only=True``)::

    {"format": "unimoe.spectral_rvq", "version": 1,
     "config": {sample_rate, hop_length, n_fft, n_mels, f_min, f_max, num_codebooks,
                codebook_size, log_floor},
     "mean": [M], "std": [M],            # standardisation of the log-mel frames (per-band mean, one scale)
     "codebooks": [C, K, M],             # residual k-means centroids, in standardised units
     "fit": {...}}                       # provenance: files, frames, seed, seconds, distortion

Build a fitted codec with ``CODECS.build({"name": "spectral_rvq", "path": "codec.pt"})``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from tqdm import tqdm

from unimoe.atomic import atomic_path
from unimoe.audio import load_audio
from unimoe.codecs.base import AudioCodec
from unimoe.codecs.corpus import list_audio_files
from unimoe.codecs.kmeans import fit_residual_codebooks, rvq_decode, rvq_encode
from unimoe.codecs.spectral import LogMel

__all__ = ["SpectralRVQConfig", "SpectralRVQCodec", "CodecFileError", "fit_spectral_rvq", "FrameReservoir"]

FILE_FORMAT = "unimoe.spectral_rvq"
FILE_VERSION = 1


class CodecFileError(RuntimeError):
    """A fitted codec file is missing, unreadable or inconsistent; the message names it."""


@dataclass
class SpectralRVQConfig:
    """What a fitted ``spectral_rvq`` codec is: its signal front end and codebook shape.

    Defaults suit a mixed speech + music corpus: 16 kHz, 50 frames/s, 40 ms Hann frames,
    80 Slaney mel bands, 8 codebooks x 1024 (80 bits per frame, 4 kbps).
    """

    sample_rate: int = 16_000
    hop_length: int = 320
    n_fft: int = 640
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float | None = None
    num_codebooks: int = 8
    codebook_size: int = 1024
    log_floor: float = 1e-5

    def validate(self) -> "SpectralRVQConfig":
        for name in ("sample_rate", "hop_length", "n_fft", "n_mels", "num_codebooks", "codebook_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"spectral_rvq config: {name} must be a positive integer, got {value!r}")
        if self.f_max is not None and not self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"spectral_rvq config: need f_min < f_max <= sample_rate / 2, got {self.f_min}, {self.f_max}")
        if self.log_floor <= 0:
            raise ValueError(f"spectral_rvq config: log_floor must be > 0, got {self.log_floor}")
        return self


class FrameReservoir:
    """A uniform random sample of at most ``capacity`` rows from a stream of frame batches.

    Each row gets a random priority and the ``capacity`` smallest are kept (bottom-k
    sampling), so the sample is uniform over everything seen, independent of batch sizes,
    and reproducible for a given generator: fitting streams over any number of files in
    bounded memory.
    """

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.generator = generator
        self.seen = 0
        self._rows: torch.Tensor | None = None  # [n <= capacity, D]
        self._keys = torch.empty(0)  # [n]

    def add(self, rows: torch.Tensor) -> None:
        """Offer ``rows [n, D]``."""
        keys = torch.rand(rows.shape[0], generator=self.generator)
        self.seen += rows.shape[0]
        rows_all = rows if self._rows is None else torch.cat([self._rows, rows])
        keys_all = torch.cat([self._keys, keys])
        if keys_all.shape[0] > self.capacity:
            keep = keys_all.topk(self.capacity, largest=False).indices.sort().values
            rows_all, keys_all = rows_all[keep], keys_all[keep]
        self._rows, self._keys = rows_all, keys_all

    def rows(self) -> torch.Tensor:
        if self._rows is None:
            raise ValueError("no frames were added")
        return self._rows


class SpectralRVQCodec(AudioCodec):
    """Log-mel residual-VQ codec: ``wav [B, 1, S]`` <-> ``codes [B, C, ceil(S / hop)]``.

    Args:
        path: a codec file written by :func:`fit_spectral_rvq` / ``unimoe codec fit``.
        griffin_lim_iters: phase-reconstruction iterations when decoding.
        oversampling: Griffin-Lim runs at ``oversampling`` x the frame rate (must divide hop).
        nnls_iters: iterations of the non-negative mel -> linear inversion.
    """

    def __init__(
        self, path: str | None = None, griffin_lim_iters: int = 32, oversampling: int = 4, nnls_iters: int = 50
    ) -> None:
        super().__init__()
        if path is None:
            raise CodecFileError(
                "spectral_rvq needs `path` to a fitted codec file; fit one on your corpus with "
                "`unimoe codec fit --audio DIR --out codec.pt` (or unimoe.codecs.fit_spectral_rvq)"
            )
        self.path = Path(path)
        self.griffin_lim_iters, self.oversampling, self.nnls_iters = griffin_lim_iters, oversampling, nnls_iters
        self._install(*_read_codec_file(self.path))

    @classmethod
    def from_fitted(
        cls,
        config: SpectralRVQConfig,
        mean: torch.Tensor,
        std: torch.Tensor,
        codebooks: torch.Tensor,
        fit_info: dict[str, Any] | None = None,
        griffin_lim_iters: int = 32,
        oversampling: int = 4,
        nnls_iters: int = 50,
    ) -> "SpectralRVQCodec":
        """Build from fitted parts in memory (what :func:`fit_spectral_rvq` returns)."""
        codec = cls.__new__(cls)
        AudioCodec.__init__(codec)
        codec.path = None
        codec.griffin_lim_iters, codec.oversampling, codec.nnls_iters = griffin_lim_iters, oversampling, nnls_iters
        codec._install(config, mean, std, codebooks, fit_info or {})
        return codec

    def _install(
        self, config: SpectralRVQConfig, mean: torch.Tensor, std: torch.Tensor, codebooks: torch.Tensor, fit_info: dict
    ) -> None:
        self.config = config.validate()
        expected = (config.num_codebooks, config.codebook_size, config.n_mels)
        if tuple(codebooks.shape) != expected or mean.shape != (config.n_mels,) or std.shape != (config.n_mels,):
            raise ValueError(
                f"spectral_rvq parts do not match the config: codebooks {tuple(codebooks.shape)} (expected {expected}), "
                f"mean {tuple(mean.shape)}, std {tuple(std.shape)} (expected ({config.n_mels},))"
            )
        self.fit_info = dict(fit_info)
        self.sample_rate = config.sample_rate
        self.hop_length = config.hop_length
        self.num_codebooks = config.num_codebooks
        self.cardinality = config.codebook_size
        self.logmel = LogMel(
            config.sample_rate, config.hop_length, config.n_fft, config.n_mels, config.f_min, config.f_max, config.log_floor
        )
        if config.hop_length % self.oversampling:
            raise ValueError(f"oversampling {self.oversampling} must divide hop_length {config.hop_length}")
        self.register_buffer("mean", mean.float().clone())  # [M]
        self.register_buffer("std", std.float().clone())  # [M]
        self.register_buffer("codebooks", codebooks.float().clone())  # [C, K, M]

    @torch.no_grad()
    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """Standardised log-mel ``[B, T, M]`` of ``wav [B, 1, S]`` (what the codebooks quantise)."""
        return (self.logmel.analyse(wav[:, 0].float()) - self.mean) / self.std

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        wav = self.check_waveform(wav)  # [B, 1, S]
        z = self.features(wav)  # [B, T, M]
        batch, frames, dim = z.shape
        codes = rvq_encode(z.reshape(-1, dim), self.codebooks)  # [B * T, C]
        return codes.reshape(batch, frames, self.num_codebooks).transpose(1, 2).contiguous()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.check_codes(codes)  # [B, C, T]
        batch, _, frames = codes.shape
        if frames == 0:
            return torch.zeros(batch, 1, 0, device=codes.device)
        z = rvq_decode(codes.transpose(1, 2).reshape(-1, self.num_codebooks), self.codebooks)  # [B * T, M]
        log_mel = z.reshape(batch, frames, -1) * self.std + self.mean  # [B, T, M]
        wav = self.logmel.synthesise(log_mel, self.griffin_lim_iters, self.oversampling, self.nnls_iters)
        return wav.unsqueeze(1)  # [B, 1, T * hop]

    def save(self, path: str | Path) -> Path:
        """Write the codec file atomically (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "config": dataclasses.asdict(self.config),
            "mean": self.mean.cpu(),
            "std": self.std.cpu(),
            "codebooks": self.codebooks.cpu(),
            "fit": self.fit_info,
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path

    def describe(self) -> dict:
        return {**super().describe(), "n_fft": self.config.n_fft, "n_mels": self.config.n_mels}


def _read_codec_file(path: Path) -> tuple[SpectralRVQConfig, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Load and check a codec file; every problem raises ``CodecFileError`` naming it."""
    if not path.is_file():
        raise CodecFileError(f"spectral_rvq codec file not found: {path} (fit one with `unimoe codec fit`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or non-torch files raise several types
        raise CodecFileError(f"cannot read spectral_rvq codec file {path}: not a PyTorch file, or truncated ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        hint = ""
        if isinstance(payload, dict) and {"metadata", "state_dict"} <= set(payload):
            hint = f"; it looks like descript-audio-codec weights: use --codec '{{name: dac, path: {path}}}'"
        raise CodecFileError(f"{path} is not a spectral_rvq codec file (no format tag {FILE_FORMAT!r}){hint}")
    if payload.get("version") != FILE_VERSION:
        raise CodecFileError(f"{path} has spectral_rvq file version {payload.get('version')!r}; this unimoe reads {FILE_VERSION}")
    try:
        config = SpectralRVQConfig(**payload["config"]).validate()
        mean, std, books = payload["mean"], payload["std"], payload["codebooks"]
        expected = (config.num_codebooks, config.codebook_size, config.n_mels)
        if not all(isinstance(t, torch.Tensor) for t in (mean, std, books)):
            raise ValueError("mean, std and codebooks must be tensors")
        if tuple(books.shape) != expected or tuple(mean.shape) != (config.n_mels,) or tuple(std.shape) != (config.n_mels,):
            raise ValueError(
                f"shapes do not match the config: codebooks {tuple(books.shape)} (expected {expected}), "
                f"mean {tuple(mean.shape)}, std {tuple(std.shape)}"
            )
        if not all(torch.isfinite(t).all() for t in (mean, std, books)) or (std <= 0).any():
            raise ValueError("non-finite values or non-positive std")
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecFileError(f"spectral_rvq codec file {path} is inconsistent: {exc}") from exc
    return config, mean, std, books, dict(payload.get("fit") or {})


def fit_spectral_rvq(
    sources: Iterable[str | Path],
    config: SpectralRVQConfig | None = None,
    *,
    max_frames: int = 32_000,
    kmeans_iters: int = 6,
    seed: int = 0,
    progress: bool = True,
) -> SpectralRVQCodec:
    """Fit a ``spectral_rvq`` codec on audio folders / JSONL manifests / files.

    Streams over the files once (resampled to ``config.sample_rate``, mixed to mono),
    keeps a uniform sample of at most ``max_frames`` log-mel frames, centres each band and
    scales all by one deviation, and fits ``num_codebooks`` residual k-means codebooks of ``codebook_size``. Unreadable
    files raise ``AudioFileError`` naming the file. Deterministic for a given ``seed``.
    """
    config = (config or SpectralRVQConfig()).validate()
    files = list_audio_files(sources)
    start = time.perf_counter()
    logmel = LogMel(
        config.sample_rate, config.hop_length, config.n_fft, config.n_mels, config.f_min, config.f_max, config.log_floor
    )
    reservoir = FrameReservoir(max_frames, torch.Generator().manual_seed(seed))
    seconds = 0.0
    with _one_torch_thread():
        for path in tqdm(files, desc="spectral_rvq: reading audio", unit="file", disable=not progress):
            wav, _ = load_audio(path, sample_rate=config.sample_rate, mono=True)  # [1, S]
            seconds += wav.shape[-1] / config.sample_rate
            reservoir.add(logmel.analyse(wav)[0])  # [T, M]
    frames = reservoir.rows()  # [N, M]
    if frames.shape[0] < config.codebook_size:
        raise ValueError(
            f"only {frames.shape[0]} frames ({seconds:.1f} s of audio in {len(files)} files) for codebooks of "
            f"{config.codebook_size}; give more audio or a smaller codebook_size"
        )
    mean = frames.mean(0)  # [M]
    # One scale for all bands keeps k-means' distance an unweighted log-spectral distance;
    # per-band scaling would inflate near-constant (quiet, high) bands and measured worse.
    std = frames.sub(mean).pow(2).mean().sqrt().clamp_min(1e-3).expand_as(mean).clone()  # [M]
    z = (frames - mean) / std
    bar = tqdm(total=config.num_codebooks, desc="spectral_rvq: fitting codebooks", unit="codebook", disable=not progress)
    with bar:
        books = fit_residual_codebooks(
            z, config.num_codebooks, config.codebook_size, iters=kmeans_iters, seed=seed, on_codebook=lambda _: bar.update()
        )
    distortion = _stage_distortion(z, books)
    fit_info = {
        "files": len(files),
        "audio_seconds": round(seconds, 3),
        "frames_seen": reservoir.seen,
        "frames_used": int(frames.shape[0]),
        "max_frames": max_frames,
        "kmeans_iters": kmeans_iters,
        "seed": seed,
        "fit_seconds": round(time.perf_counter() - start, 3),
        "train_mse_per_stage": distortion,
    }
    return SpectralRVQCodec.from_fitted(config, mean, std, books, fit_info)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run per-file feature extraction on one intra-op thread, then restore the setting.

    Per-clip STFTs and resampling are small ops: extra OpenMP threads add no speed and, on
    a busy machine, spin-waiting makes them several times slower. The big k-means matmuls
    afterwards use every thread again.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stage_distortion(z: torch.Tensor, books: torch.Tensor) -> list[float]:
    """Mean squared error (standardised units, per dimension) after 1, 2, ..., C codebooks."""
    codes = rvq_encode(z, books)  # [N, C]
    out = []
    for c in range(1, books.shape[0] + 1):
        err = (z - rvq_decode(codes[:, :c], books[:c])).pow(2).mean()
        out.append(round(float(err), 5))
    return out
