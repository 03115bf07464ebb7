"""Log-mel analysis and its approximate inverse (NNLS mel -> linear, then Griffin-Lim).

The ``spectral_rvq`` codec quantises log-mel frames; this module owns the signal side:

* :meth:`LogMel.analyse` - ``wav [B, S]`` -> ``log-mel [B, T, M]`` with ``T = ceil(S / hop)``;
  frame ``t`` is centred on sample ``t * hop`` (the clip is zero-padded to ``T * hop``).
* :meth:`LogMel.synthesise` - ``log-mel [B, T, M]`` -> ``wav [B, T * hop]``.

Synthesis first undoes the mel projection with non-negative least squares (multiplicative
updates: the pseudo-inverse alone gives negative energy that Griffin-Lim turns into
noise), then interpolates the log-magnitude to ``oversampling`` times the frame rate and
runs fast Griffin-Lim (momentum 0.99) there: the extra overlap makes the phase estimate
far more consistent than Griffin-Lim at the coarse codec hop.
"""

from __future__ import annotations

import torch
import torchaudio.functional as AF
from torch import nn

__all__ = ["LogMel"]


class LogMel(nn.Module):
    """Slaney-style log-mel magnitude analysis/synthesis at one frame rate."""

    def __init__(
        self,
        sample_rate: int,
        hop_length: int,
        n_fft: int,
        n_mels: int,
        f_min: float = 0.0,
        f_max: float | None = None,
        log_floor: float = 1e-5,
    ) -> None:
        super().__init__()
        if n_fft < hop_length:
            raise ValueError(f"n_fft ({n_fft}) must be at least hop_length ({hop_length})")
        self.sample_rate, self.hop_length, self.n_fft, self.n_mels = sample_rate, hop_length, n_fft, n_mels
        self.log_floor = log_floor
        f_max = sample_rate / 2 if f_max is None else f_max
        fb = AF.melscale_fbanks(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate, norm="slaney", mel_scale="slaney")
        if (fb.sum(0) == 0).any():
            raise ValueError(
                f"n_mels={n_mels} is too many for n_fft={n_fft} at {sample_rate} Hz: some mel bands get no FFT bin"
            )
        self.register_buffer("fb", fb, persistent=False)  # [F, M]
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)  # [n_fft]

    def num_frames(self, num_samples: int) -> int:
        return -(-num_samples // self.hop_length)

    def analyse(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav [B, S]`` -> natural-log mel magnitude ``[B, T, M]``, ``T = ceil(S / hop)``."""
        frames = self.num_frames(wav.shape[-1])
        wav = nn.functional.pad(wav, (0, frames * self.hop_length - wav.shape[-1]))
        spec = torch.stft(
            wav, self.n_fft, self.hop_length, window=self.window, center=True, pad_mode="constant", return_complex=True
        )  # [B, F, T + 1]
        mel = spec.abs()[..., :frames].transpose(1, 2) @ self.fb  # [B, T, M]
        return mel.clamp_min(self.log_floor).log()

    def mel_to_linear(self, mel: torch.Tensor, iters: int = 50) -> torch.Tensor:
        """Non-negative least squares ``min |fb^T x - mel|``, ``x >= 0``: ``[B, T, M]`` -> ``[B, T, F]``.

        Lee-Seung multiplicative updates keep ``x`` non-negative without projection and need no
        step size; starting from the back-projection they converge in a few dozen steps.
        """
        fb = self.fb  # [F, M]; the mel projection is A = fb^T, x -> x @ fb
        target = mel @ fb.T  # [B, T, F] = A^T b
        x = (target / (fb @ fb.sum(0)).clamp_min(1e-8)).clamp_min(1e-8)  # A^T b / A^T A 1
        for _ in range(iters):
            x = x * target / ((x @ fb) @ fb.T).clamp_min(1e-10)
        return x

    def synthesise(
        self,
        log_mel: torch.Tensor,
        griffin_lim_iters: int = 32,
        oversampling: int = 4,
        nnls_iters: int = 50,
    ) -> torch.Tensor:
        """``log-mel [B, T, M]`` -> ``wav [B, T * hop]`` (deterministic: zero initial phase)."""
        batch, frames, _ = log_mel.shape
        linear = self.mel_to_linear(log_mel.exp(), nnls_iters)  # [B, T, F]
        linear = torch.cat([linear, linear[:, -1:]], dim=1)  # [B, T + 1, F]: the centred frame at the end
        hop = self.hop_length
        if oversampling > 1:
            if hop % oversampling:
                raise ValueError(f"oversampling {oversampling} must divide hop_length {hop}")
            log_lin = linear.clamp_min(1e-8).log().transpose(1, 2)  # [B, F, T + 1]
            log_lin = nn.functional.interpolate(log_lin, size=frames * oversampling + 1, mode="linear", align_corners=True)
            linear = log_lin.exp().transpose(1, 2)  # [B, T * o + 1, F]
            hop //= oversampling
        wav = AF.griffinlim(
            linear.transpose(1, 2),  # [B, F, frames]
            self.window,
            self.n_fft,
            hop,
            self.n_fft,
            1.0,
            griffin_lim_iters,
            0.99,
            frames * self.hop_length,
            False,
        )
        return wav.reshape(batch, frames * self.hop_length)
