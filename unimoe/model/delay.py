"""The codebook delay pattern and the codec special tokens.

A codec frame has ``C`` tokens that the model predicts all at once. Predicting codebook
``k`` of frame ``t`` in the same step as codebook 0 of frame ``t`` would force the model to
guess the finer codebooks without seeing the coarse one, so codebook ``k`` is shifted
right by ``delays[k]`` steps (MusicGen/Dia style; the paper uses ``[0, 8, 9, ..., 18]``).
At delayed step ``t`` the model then sees the coarse codebook of frame ``t - delays[k]``
already decoded.

Layout of one delayed audio *segment* (target or speaker prompt), with ``D = max(delays)``::

    frames   x = [BOS, c_0, ..., c_{T-1}, EOS]                  # [C, T + 2], undelayed
    delayed  y[k, t] = x[k, t - d_k]  if 0 <= t - d_k <= T + 1
                     = BOS            if t - d_k < 0              # before the stream starts
                     = PAD            if t - d_k > T + 1          # after it ended
                                                                  # -> [C, T + 2 + D]

``y[:, 0]`` is an all-BOS frame: the "audio BOS frame" that starts generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class CodecSpecials:
    """Special token ids of one codebook: after the ``K`` real codes, ``eos = K``,
    ``pad = K + 1``, ``bos = K + 2`` (per-codebook vocabulary ``K + 3``)."""

    cardinality: int

    def __post_init__(self) -> None:
        if self.cardinality < 1:
            raise ValueError(f"cardinality must be >= 1, got {self.cardinality}")

    @property
    def eos(self) -> int:
        return self.cardinality

    @property
    def pad(self) -> int:
        return self.cardinality + 1

    @property
    def bos(self) -> int:
        return self.cardinality + 2

    @property
    def vocab_size(self) -> int:
        return self.cardinality + 3


def check_delays(delays: Sequence[int], num_codebooks: int | None = None) -> list[int]:
    """Validate a delay list (non-negative ints, one per codebook) and return it as a list."""
    delays = [int(d) for d in delays]
    if not delays:
        raise ValueError("delays must name one delay per codebook, got an empty list")
    if any(d < 0 for d in delays):
        raise ValueError(f"delays must be >= 0, got {delays}")
    if num_codebooks is not None and len(delays) != num_codebooks:
        raise ValueError(f"delays has {len(delays)} entries but there are {num_codebooks} codebooks")
    return delays


def _source_index(length: int, delays: Sequence[int], device: torch.device) -> Tensor:
    """``t - d_k`` for every codebook and step: ``[C, length]``."""
    d = torch.as_tensor(list(delays), device=device, dtype=torch.long)
    return torch.arange(length, device=device).unsqueeze(0) - d.unsqueeze(1)


def apply_delay(codes: Tensor, delays: Sequence[int], *, bos: int, pad: int) -> Tensor:
    """Shift codebook ``k`` right by ``delays[k]``: ``[..., C, T] -> [..., C, T + max(delays)]``.

    Steps before a codebook starts hold ``bos``; steps after it ended hold ``pad``.
    """
    delays = check_delays(delays, codes.shape[-2])
    T = codes.shape[-1]
    length = T + max(delays)
    src = _source_index(length, delays, codes.device)  # [C, length]
    gathered = codes.gather(-1, src.clamp(0, max(T - 1, 0)).expand(*codes.shape[:-1], length)) if T > 0 else None
    out = torch.full((*codes.shape[:-1], length), pad, dtype=codes.dtype, device=codes.device)
    if gathered is not None:
        out = torch.where((src >= 0) & (src < T), gathered, out)
    return torch.where(src < 0, torch.full_like(out, bos), out)


def revert_delay(delayed: Tensor, delays: Sequence[int]) -> Tensor:
    """Undo :func:`apply_delay`: ``[..., C, L] -> [..., C, L - max(delays)]``,
    ``out[k, t] = delayed[k, t + delays[k]]``."""
    delays = check_delays(delays, delayed.shape[-2])
    T = delayed.shape[-1] - max(delays)
    if T < 0:
        raise ValueError(f"a delayed stream of length {delayed.shape[-1]} is shorter than the max delay {max(delays)}")
    d = torch.as_tensor(delays, device=delayed.device, dtype=torch.long)
    idx = torch.arange(T, device=delayed.device).unsqueeze(0) + d.unsqueeze(1)  # [C, T]
    return delayed.gather(-1, idx.expand(*delayed.shape[:-1], T))


def delayed_segment(codes: Tensor, delays: Sequence[int], specials: CodecSpecials) -> Tensor:
    """Codes ``[C, T]`` -> one delayed segment ``[C, T + 2 + max(delays)]`` (see module doc)."""
    C = codes.shape[0]
    bos = torch.full((C, 1), specials.bos, dtype=codes.dtype, device=codes.device)
    eos = torch.full((C, 1), specials.eos, dtype=codes.dtype, device=codes.device)
    return apply_delay(torch.cat([bos, codes, eos], dim=1), delays, bos=specials.bos, pad=specials.pad)


def segment_to_codes(delayed: Tensor, delays: Sequence[int], specials: CodecSpecials) -> Tensor:
    """Delayed segment ``[C, L]`` (starting at its BOS frame) -> codes ``[C, T]``.

    Reverts the delay, drops the leading BOS frame and cuts at the first frame in which any
    codebook holds EOS or PAD (generation may stop early or run to its step limit). Raises
    if a special token sits inside the kept frames, because such a frame cannot be decoded.
    """
    frames = revert_delay(delayed, delays)[:, 1:]  # [C, T']
    ended = (frames == specials.eos) | (frames == specials.pad)
    end = int(ended.any(0).long().argmax()) if bool(ended.any()) else frames.shape[1]
    codes = frames[:, :end]
    if bool((codes >= specials.cardinality).any()) or bool((codes < 0).any()):
        raise ValueError("delayed segment holds special tokens inside the audio frames; it cannot be decoded")
    return codes


def forced_tokens(step: Tensor, eos_frame: Tensor, delays: Sequence[int] | Tensor,
                  specials: CodecSpecials) -> tuple[Tensor, Tensor]:
    """The tokens the delay pattern dictates during generation (so the sampler may not choose them).

    ``step [B]`` (or one 0-dim step for every row): delayed index of the frame being predicted
    inside the target segment (0 is the BOS frame, so decoding predicts steps 1, 2, ...).
    ``delays``: a list or a ``[C]`` long tensor on ``step``'s device. ``eos_frame [B]``: undelayed
    frame index at which EOS was decided (``T + 1`` in the module doc; ``step - delays[k]``
    when codebook ``k`` emitted it at ``step``), or -1 while running.
    Returns ``(mask [B, C] bool, values [B, C] long)``: where ``mask`` is True the token is
    BOS (stream not started), EOS (its delayed end) or PAD (after it).
    """
    d = delays if isinstance(delays, Tensor) else torch.as_tensor(list(delays), device=step.device)
    src = step.long().reshape(-1, 1) - d.unsqueeze(0)  # [B, C] (or [1, C] for one shared step)
    eos_frame = eos_frame.long().unsqueeze(1)
    ended = eos_frame >= 0
    is_bos = src <= 0
    is_eos = ended & (src == eos_frame)
    is_pad = ended & (src > eos_frame)
    values = torch.where(is_bos, specials.bos, torch.where(is_eos, specials.eos, specials.pad))
    return is_bos | is_eos | is_pad, values
