"""Quality metrics against closed forms and naive reference implementations."""

from __future__ import annotations

import math

import librosa
import numpy as np
import pytest
import scipy.fft
import torch

from unimoe.codecs.quality import (
    align,
    log_spectral_distance,
    mel_cepstral_distance,
    quality_report,
    si_snr,
    spectral_convergence,
)


def _orthogonal_noise(x: torch.Tensor, snr_db: float, seed: int = 0) -> torch.Tensor:
    """Zero-mean noise orthogonal to zero-mean ``x`` with power ``|x|^2 / 10^(snr/10)``."""
    g = torch.Generator().manual_seed(seed)
    x0 = x.double() - x.double().mean()
    n = torch.randn(x.shape[-1], generator=g, dtype=torch.float64)
    n = n - n.mean()
    n = n - (n @ x0) / (x0 @ x0) * x0  # remove the component along x (keeps zero mean)
    return n * torch.sqrt((x0 @ x0) / (n @ n) / 10 ** (snr_db / 10))


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 12.5, 30.0])
def test_si_snr_closed_form_with_orthogonal_noise(snr_db):
    x = torch.sin(torch.linspace(0, 200, 8000, dtype=torch.float64)) + 0.3
    est = (x + _orthogonal_noise(x, snr_db)).float()
    assert float(si_snr(x.float(), est)) == pytest.approx(snr_db, abs=1e-3)


def test_si_snr_is_scale_and_offset_invariant():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(1))
    est = x + _orthogonal_noise(x, 7.0, seed=2).float()
    base = float(si_snr(x, est))
    assert float(si_snr(x, 0.25 * est + 0.1)) == pytest.approx(base, abs=1e-3)
    assert float(si_snr(x, -3.0 * est)) == pytest.approx(base, abs=1e-3)  # sign flips project too


def test_si_snr_batched_and_shape_errors():
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(3))
    out = si_snr(x, x)
    assert out.shape == (3,) and (out > 100).all()  # identical signals: error ~ eps
    with pytest.raises(ValueError, match="align"):
        si_snr(x, x[:, :999])
    a, b = align(x, x[:, :999])
    assert a.shape == b.shape == (3, 999)


def _white(n: int = 16000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("gain", [0.5, 2.0, 0.1])
def test_lsd_and_spectral_convergence_of_a_pure_gain(gain):
    """Scaling by g shifts every bin by 20 log10 g dB and |X - gX| / |X| = |1 - g|."""
    x = _white()
    lsd = float(log_spectral_distance(x, gain * x, dynamic_range_db=None))
    assert lsd == pytest.approx(abs(20 * math.log10(gain)), rel=1e-4)
    assert float(spectral_convergence(x, gain * x)) == pytest.approx(abs(1 - gain), rel=1e-5)
    assert float(log_spectral_distance(x, x)) == pytest.approx(0.0, abs=1e-9)


def _naive_lsd(x: np.ndarray, y: np.ndarray, n_fft: int, hop: int, range_db: float) -> float:
    """Frame-by-frame LSD with numpy: reflect-padded, centred periodic-Hann frames."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    xp = np.pad(x, n_fft // 2, mode="reflect")
    yp = np.pad(y, n_fft // 2, mode="reflect")
    frames = 1 + len(x) // hop
    px = np.array([np.abs(np.fft.rfft(xp[t * hop : t * hop + n_fft] * window)) ** 2 for t in range(frames)])
    py = np.array([np.abs(np.fft.rfft(yp[t * hop : t * hop + n_fft] * window)) ** 2 for t in range(frames)])
    floor = px.max() * 10 ** (-range_db / 10)
    dx = 10 * np.log10(np.maximum(px, floor))
    dy = 10 * np.log10(np.maximum(py, floor))
    return float(np.mean(np.sqrt(np.mean((dx - dy) ** 2, axis=1))))


def test_lsd_matches_a_naive_numpy_implementation():
    rng = np.random.default_rng(0)
    t = np.arange(12000) / 16000
    x = np.sin(2 * np.pi * 440 * t) * np.exp(-3 * t) + 0.01 * rng.standard_normal(t.size)
    y = np.convolve(x, [0.6, 0.3, 0.1], mode="same") + 0.02 * rng.standard_normal(t.size)
    expected = _naive_lsd(x, y, 512, 128, 80.0)
    got = float(log_spectral_distance(torch.from_numpy(x), torch.from_numpy(y), 512, 128, dynamic_range_db=80.0))
    assert got == pytest.approx(expected, rel=1e-6)
    assert got > 1.0  # the filter really changed the spectrum


def _naive_mcd(x: np.ndarray, y: np.ndarray, sr: int, n_fft: int, hop: int, n_mels: int, n_ceps: int) -> float:
    """MCD from librosa's STFT + HTK mel filters and scipy's orthonormal DCT."""
    px = np.abs(librosa.stft(x, n_fft=n_fft, hop_length=hop, window="hann", center=True, pad_mode="reflect")) ** 2
    py = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop, window="hann", center=True, pad_mode="reflect")) ** 2
    fb = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=sr / 2, htk=True, norm=None)
    mx, my = fb @ px, fb @ py
    floor = mx.max() * 1e-8
    lx, ly = 0.5 * np.log(np.maximum(mx, floor)), 0.5 * np.log(np.maximum(my, floor))
    cx = scipy.fft.dct(lx, type=2, norm="ortho", axis=0)[1:n_ceps]
    cy = scipy.fft.dct(ly, type=2, norm="ortho", axis=0)[1:n_ceps]
    return float(np.mean(10 / np.log(10) * np.sqrt(2 * np.sum((cx - cy) ** 2, axis=0))))


def test_mcd_matches_librosa_scipy_reference_and_ignores_gain():
    rng = np.random.default_rng(1)
    sr = 16000
    t = np.arange(16000) / sr
    x = (np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 1330 * t) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float64
    )
    y = np.convolve(x, [1.0, -0.7], mode="same") + 0.05 * rng.standard_normal(t.size)
    expected = _naive_mcd(x, y, sr, 512, 128, 40, 13)
    got = float(mel_cepstral_distance(torch.from_numpy(x), torch.from_numpy(y), sr, 512, 128, 40, 13))
    assert got == pytest.approx(expected, rel=1e-3)
    assert got > 1.0
    # c0 (level) is excluded: a pure gain change is invisible to MCD but not to LSD.
    xt = torch.from_numpy(x)
    assert float(mel_cepstral_distance(xt, 0.3 * xt, sr)) == pytest.approx(0.0, abs=1e-6)
    assert float(log_spectral_distance(xt, 0.3 * xt)) > 5.0


def test_quality_report_trims_and_orders_sensibly():
    x = _white(16000, seed=5)
    report_close = quality_report(x, torch.cat([x + 0.01 * _white(16000, seed=6), torch.zeros(320)]), 16000)
    report_far = quality_report(x, _white(16000, seed=7), 16000)
    assert set(report_close) == {"si_snr_db", "lsd_db", "spectral_convergence", "mcd_db"}
    assert report_close["si_snr_db"] > 15 > report_far["si_snr_db"]
    assert report_close["lsd_db"] < report_far["lsd_db"]
    assert report_close["spectral_convergence"] < report_far["spectral_convergence"]
