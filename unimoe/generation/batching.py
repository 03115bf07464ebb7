"""Batch surgery for decoding: drop finished rows, and append generated frames to prompts.

Only the no-cache path needs :func:`append_frames` (it re-runs the whole sequence every
step); both paths use :func:`select_rows` to stop computing finished requests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unimoe.model.tasks import Batch, Modality


def select_rows(batch: Batch, rows: Tensor) -> Batch:
    """Keep (and reorder) ``rows`` of a right-padded batch; the stacked video follows its rows."""
    rows = rows.to(batch.modality.device)
    video = None
    if batch.video is not None:
        has_video = (batch.modality == Modality.VISION).any(dim=1)  # [B]
        video_index = has_video.long().cumsum(0) - 1  # row -> index into batch.video
        keep = rows[has_video[rows]]
        video = batch.video[video_index[keep]] if keep.numel() else None
    return Batch(
        text_ids=batch.text_ids[rows],
        audio_codes=batch.audio_codes[rows],
        modality=batch.modality[rows],
        attention_mask=batch.attention_mask[rows],
        position_ids=batch.position_ids[rows],
        labels=None if batch.labels is None else batch.labels[rows],
        task_ids=batch.task_ids[rows],
        lengths=batch.lengths[rows],
        video=video,
    )


def append_frames(batch: Batch, frames: Tensor) -> Batch:
    """Append audio ``frames [B, C, S]`` after each row's last real position (rows keep their own length).

    The result is the right-padded batch of the full sequences, as :func:`collate` would
    build it from the prompts with the frames concatenated.
    """
    B, C, S = frames.shape
    if S == 0:
        return batch
    L = batch.seq_len
    new_len = int(batch.lengths.max()) + S
    device = batch.modality.device
    pos = batch.lengths.view(B, 1) + torch.arange(S, device=device).view(1, S)  # [B, S]

    def grow(t: Tensor, fill: int) -> Tensor:
        out = torch.full((*t.shape[:-1], max(new_len, L)), fill, dtype=t.dtype, device=device)
        out[..., :L] = t
        return out[..., :new_len]

    text_ids = grow(batch.text_ids, 0)
    modality = grow(batch.modality, int(Modality.PAD))
    modality.scatter_(1, pos, int(Modality.AUDIO))
    audio_codes = grow(batch.audio_codes, 0)
    audio_codes.scatter_(2, pos.unsqueeze(1).expand(B, C, S), frames.to(audio_codes.dtype))
    task_ids = batch.task_ids[:, :1].expand(B, new_len).clone()  # collate repeats the row's id everywhere
    return Batch(
        text_ids=text_ids,
        audio_codes=audio_codes,
        modality=modality,
        attention_mask=modality != Modality.PAD,
        position_ids=torch.arange(new_len, device=device).expand(B, new_len).clone(),
        labels=None,
        task_ids=task_ids,
        lengths=batch.lengths + S,
        video=batch.video,
    )
