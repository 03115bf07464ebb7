"""Reconstruction-quality metrics for codec round trips, written from their definitions.

Each metric compares a ``reference`` with an ``estimate`` of the same length (trim first
with :func:`align`) and returns a tensor over the leading batch dimensions:

* :func:`si_snr` - scale-invariant SNR (dB, higher is better). Phase sensitive: a codec that
  re-synthesises phase (Griffin-Lim, vocoders) scores near or below 0 dB even when it sounds
  right, so read it together with the spectral metrics.
* :func:`log_spectral_distance` - RMS over frequency of the dB difference between power
  spectra, averaged over frames (dB, lower is better).
* :func:`spectral_convergence` - ``|| |X| - |Y| ||_F / || |X| ||_F`` (lower is better).
* :func:`mel_cepstral_distance` - ``10/ln10 * sqrt(2 * sum_d (c_d - c'_d)^2)`` over mel
  cepstra ``c_1..c_D`` (c_0, the level, excluded), averaged over frames (dB, lower is better).

Spectral metrics floor both power spectra at ``dynamic_range_db`` below the reference's
peak, so inaudible differences deep in silence do not dominate the average.
"""

from __future__ import annotations

import math

import torch
import torchaudio.functional as AF

__all__ = [
    "align",
    "si_snr",
    "log_spectral_distance",
    "spectral_convergence",
    "mel_cepstral_distance",
    "default_stft_size",
    "quality_report",
]


def align(reference: torch.Tensor, estimate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trim both signals ``[..., S]`` to the shorter length (codecs pad to whole frames)."""
    n = min(reference.shape[-1], estimate.shape[-1])
    if n == 0:
        raise ValueError("cannot compare empty signals")
    return reference[..., :n], estimate[..., :n]


def _check_pair(reference: torch.Tensor, estimate: torch.Tensor) -> None:
    if reference.shape != estimate.shape:
        raise ValueError(
            f"reference {tuple(reference.shape)} and estimate {tuple(estimate.shape)} differ in shape; "
            "trim them with unimoe.codecs.quality.align first"
        )
    if reference.shape[-1] == 0:
        raise ValueError("cannot compare empty signals")


def si_snr(reference: torch.Tensor, estimate: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale-invariant SNR in dB of ``estimate`` against ``reference`` (``[..., S]`` -> ``[...]``).

    Both are made zero-mean; the target is the projection of the estimate on the reference,
    everything else is error: ``10 log10(|s_t|^2 / |e|^2)``.
    """
    _check_pair(reference, estimate)
    ref = reference.double() - reference.double().mean(dim=-1, keepdim=True)
    est = estimate.double() - estimate.double().mean(dim=-1, keepdim=True)
    scale = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = scale * ref  # [..., S]
    noise = est - target
    ratio = (target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps)
    return (10 * torch.log10(ratio)).float()


def default_stft_size(sample_rate: int) -> tuple[int, int]:
    """``(n_fft, hop)`` for ~32 ms Hann frames with 75 % overlap at ``sample_rate``."""
    n_fft = 2 ** max(6, round(math.log2(0.032 * sample_rate)))
    return n_fft, n_fft // 4


def _power_spectrogram(wav: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """``[..., S]`` -> power ``[..., F, frames]`` with a periodic Hann window."""
    lead = wav.shape[:-1]
    flat = wav.reshape(-1, wav.shape[-1]).double()
    if flat.shape[-1] < n_fft:  # short clips: pad so at least one full frame exists
        flat = torch.nn.functional.pad(flat, (0, n_fft - flat.shape[-1]))
    window = torch.hann_window(n_fft, dtype=torch.float64, device=wav.device)
    spec = torch.stft(flat, n_fft, hop_length, window=window, center=True, return_complex=True)
    power = spec.abs().pow(2)  # [N, F, frames]
    return power.reshape(*lead, *power.shape[-2:])


def _floored_pair(
    ref_power: torch.Tensor, est_power: torch.Tensor, dynamic_range_db: float | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both spectra ``[..., F, frames]`` at the reference peak minus the range."""
    if dynamic_range_db is None:
        return ref_power + eps, est_power + eps
    peak = ref_power.flatten(-2).amax(-1)[..., None, None]  # [..., 1, 1]
    floor = (peak * 10 ** (-dynamic_range_db / 10)).clamp_min(eps)
    return torch.maximum(ref_power, floor), torch.maximum(est_power, floor)


def log_spectral_distance(
    reference: torch.Tensor,
    estimate: torch.Tensor,
    n_fft: int = 512,
    hop_length: int = 128,
    dynamic_range_db: float | None = 80.0,
    eps: float = 1e-12,
) -> torch.Tensor:
    """LSD in dB: mean over frames of ``sqrt(mean_f (10 log10 P - 10 log10 P')^2)``."""
    _check_pair(reference, estimate)
    ref_p, est_p = _floored_pair(
        _power_spectrogram(reference, n_fft, hop_length),
        _power_spectrogram(estimate, n_fft, hop_length),
        dynamic_range_db,
        eps,
    )
    diff_db = 10 * torch.log10(ref_p) - 10 * torch.log10(est_p)  # [..., F, frames]
    per_frame = diff_db.pow(2).mean(dim=-2).sqrt()  # [..., frames]
    return per_frame.mean(dim=-1).float()


def spectral_convergence(
    reference: torch.Tensor, estimate: torch.Tensor, n_fft: int = 512, hop_length: int = 128
) -> torch.Tensor:
    """``|| |X| - |Y| ||_F / || |X| ||_F`` over the whole magnitude spectrogram."""
    _check_pair(reference, estimate)
    ref_mag = _power_spectrogram(reference, n_fft, hop_length).sqrt()
    est_mag = _power_spectrogram(estimate, n_fft, hop_length).sqrt()
    num = (ref_mag - est_mag).pow(2).flatten(-2).sum(-1).sqrt()
    den = ref_mag.pow(2).flatten(-2).sum(-1).sqrt().clamp_min(1e-12)
    return (num / den).float()


def _dct_ii_ortho(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``[n, n]`` (row k = basis k), from its definition."""
    k = torch.arange(n, dtype=dtype, device=device)[:, None]
    i = torch.arange(n, dtype=dtype, device=device)[None, :]
    basis = torch.cos(math.pi / n * (i + 0.5) * k)
    scale = torch.full((n, 1), math.sqrt(2.0 / n), dtype=dtype, device=device)
    scale[0] = math.sqrt(1.0 / n)
    return basis * scale


def mel_cepstral_distance(
    reference: torch.Tensor,
    estimate: torch.Tensor,
    sample_rate: int,
    n_fft: int = 512,
    hop_length: int = 128,
    n_mels: int = 40,
    n_ceps: int = 13,
    dynamic_range_db: float | None = 80.0,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Mel-cepstral distance in dB over cepstra 1..n_ceps-1 of the log mel amplitude.

    Cepstra are the orthonormal DCT-II of ``ln sqrt(mel power)`` (HTK mel bands of the power
    spectrum, no liftering), the amplitude convention of the usual MCD formula; c_0 (overall
    level) is left out, so a pure gain change scores 0 here while LSD sees it.
    """
    _check_pair(reference, estimate)
    ref_p = _power_spectrogram(reference, n_fft, hop_length)
    est_p = _power_spectrogram(estimate, n_fft, hop_length)
    fb = AF.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate).to(ref_p)  # [F, M]
    ref_mel = (ref_p.transpose(-1, -2) @ fb).transpose(-1, -2)  # [..., M, frames]
    est_mel = (est_p.transpose(-1, -2) @ fb).transpose(-1, -2)
    ref_mel, est_mel = _floored_pair(ref_mel, est_mel, dynamic_range_db, eps)
    dct = _dct_ii_ortho(n_mels, ref_mel.dtype, ref_mel.device)[1:n_ceps]  # [D, M]
    diff = dct @ (0.5 * (torch.log(ref_mel) - torch.log(est_mel)))  # [..., D, frames] log amplitude
    per_frame = (10 / math.log(10)) * (2 * diff.pow(2).sum(dim=-2)).sqrt()
    return per_frame.mean(dim=-1).float()


def quality_report(reference: torch.Tensor, estimate: torch.Tensor, sample_rate: int) -> dict[str, float]:
    """All metrics for one mono pair (``[S]`` or ``[1, S]``), trimmed to a common length."""
    ref, est = align(reference.reshape(-1).float(), estimate.reshape(-1).float())
    n_fft, hop = default_stft_size(sample_rate)
    return {
        "si_snr_db": float(si_snr(ref, est)),
        "lsd_db": float(log_spectral_distance(ref, est, n_fft, hop)),
        "spectral_convergence": float(spectral_convergence(ref, est, n_fft, hop)),
        "mcd_db": float(mel_cepstral_distance(ref, est, sample_rate, n_fft, hop)),
    }
