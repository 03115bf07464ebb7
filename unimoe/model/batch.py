"""The token stream the model reads: :class:`Sequence` (one example, unpadded) and :class:`Batch`.

Task builders (:mod:`unimoe.model.tasks`) produce sequences; :func:`collate` right-pads
them into a batch; the model (:mod:`unimoe.model.transformer`), the data pipeline and
generation all speak these two types. Position by position a sequence holds text token
ids, delayed codec frames or visual soft-token slots (:class:`Modality`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label value the loss ignores."""


class Modality(IntEnum):
    """What sits at a position."""

    PAD = 0
    TEXT = 1
    AUDIO = 2
    VISION = 3


class SequenceTooLong(ValueError):
    """A built sequence is longer than ``AudioLMConfig.max_seq_len`` (the data pipeline may skip it)."""


@dataclass
class Sequence:
    """One unpadded example, position by position (length ``L``).

    ``text_ids [L]`` holds token ids at TEXT positions (0 elsewhere); ``audio_codes [C, L]``
    holds delayed codec tokens at AUDIO positions (0 elsewhere); ``modality [L]`` says which
    (:class:`Modality`); ``target_mask [C, L]`` is True where the token at that position is a
    training target (predicted from the previous position). ``video [F, 3, H, W]`` feeds the
    VISION positions. ``target_start`` is the index of the target's audio BOS frame:
    ``seq[: target_start + 1]`` is the conditioning prefix generation starts from.
    """

    text_ids: Tensor
    audio_codes: Tensor
    modality: Tensor
    target_mask: Tensor
    task_id: int
    target_start: int
    video: Tensor | None = None

    def __post_init__(self) -> None:
        L = self.modality.shape[0]
        if self.modality.dim() != 1 or self.text_ids.shape != (L,):
            raise ValueError(f"Sequence.text_ids must be [L={L}], got {tuple(self.text_ids.shape)}")
        if self.audio_codes.dim() != 2 or self.audio_codes.shape[1] != L:
            raise ValueError(f"Sequence.audio_codes must be [C, L={L}], got {tuple(self.audio_codes.shape)}")
        if self.target_mask.shape != self.audio_codes.shape or self.target_mask.dtype != torch.bool:
            raise ValueError(f"Sequence.target_mask must be bool {tuple(self.audio_codes.shape)}, got "
                             f"{self.target_mask.dtype} {tuple(self.target_mask.shape)}")
        if not 0 <= self.target_start < L or self.modality[self.target_start] != Modality.AUDIO:
            raise ValueError(f"Sequence.target_start={self.target_start} must index an AUDIO position")
        if bool((self.modality == Modality.PAD).any()):
            raise ValueError("Sequence.modality has PAD positions; a Sequence is unpadded (collate pads)")
        if bool((self.target_mask & (self.modality != Modality.AUDIO)).any()):
            raise ValueError("Sequence.target_mask marks non-audio positions")
        has_vision = bool((self.modality == Modality.VISION).any())
        if has_vision != (self.video is not None):
            raise ValueError("Sequence.video must be given exactly when there are VISION positions")

    def __len__(self) -> int:
        return self.modality.shape[0]

    @property
    def num_codebooks(self) -> int:
        return self.audio_codes.shape[0]

    def prefix(self) -> "Sequence":
        """The conditioning prefix: everything up to and including the target BOS frame."""
        n = self.target_start + 1
        return Sequence(self.text_ids[:n], self.audio_codes[:, :n], self.modality[:n],
                        torch.zeros_like(self.target_mask[:, :n]), self.task_id, self.target_start, self.video)

    def labels(self) -> Tensor:
        """``[C, L]`` next-frame labels: ``labels[:, t]`` = target token at ``t + 1`` or -100."""
        lab = torch.full_like(self.audio_codes, IGNORE_INDEX)
        lab[:, :-1] = torch.where(self.target_mask[:, 1:], self.audio_codes[:, 1:], IGNORE_INDEX)
        return lab


@dataclass
class Batch:
    """Right-padded sequences. Padding: modality PAD, attention_mask False, 0 in ids, -100 in labels.

    ``labels[b, :, t]`` is what the model's output at position ``t`` must predict (already
    shifted). ``task_ids`` repeats each row's task id at every position (padding included;
    ``attention_mask`` excludes it). ``video [N, F, 3, H, W]`` stacks the videos of the rows
    that have VISION positions, in row order.
    """

    text_ids: Tensor  # [B, L] long
    audio_codes: Tensor  # [B, C, L] long
    modality: Tensor  # [B, L] long
    attention_mask: Tensor  # [B, L] bool
    position_ids: Tensor  # [B, L] long
    labels: Tensor | None  # [B, C, L] long
    task_ids: Tensor  # [B, L] long
    lengths: Tensor  # [B] long
    video: Tensor | None = None  # [N, F, 3, H, W] float
    example_ids: tuple[str, ...] | None = None  # [B] the examples' ids (training data), for error messages

    @property
    def batch_size(self) -> int:
        return self.modality.shape[0]

    @property
    def seq_len(self) -> int:
        return self.modality.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        return Batch(**{f.name: (v.pin_memory() if isinstance(v := getattr(self, f.name), Tensor) else v)
                        for f in dataclasses.fields(self)})


def collate(sequences: list[Sequence], pad_to_multiple_of: int = 1, with_labels: bool = True) -> Batch:
    """Right-pad sequences into a :class:`Batch` (length rounded up to ``pad_to_multiple_of``).

    ``with_labels=False`` leaves ``labels`` None (generation prompts: no loss to compute).
    """
    if not sequences:
        raise ValueError("collate got an empty list of sequences")
    C = sequences[0].num_codebooks
    for i, s in enumerate(sequences):
        if s.num_codebooks != C:
            raise ValueError(f"collate: sequence {i} has {s.num_codebooks} codebooks, sequence 0 has {C}")
    B = len(sequences)
    L = max(len(s) for s in sequences)
    L = pad_to_multiple_of * math.ceil(L / pad_to_multiple_of)
    text_ids = torch.zeros(B, L, dtype=torch.long)
    audio_codes = torch.zeros(B, C, L, dtype=torch.long)
    modality = torch.full((B, L), int(Modality.PAD), dtype=torch.long)
    labels = torch.full((B, C, L), IGNORE_INDEX, dtype=torch.long)
    task_ids = torch.empty(B, L, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    videos = []
    for b, s in enumerate(sequences):
        n = len(s)
        text_ids[b, :n] = s.text_ids
        audio_codes[b, :, :n] = s.audio_codes
        modality[b, :n] = s.modality
        labels[b, :, :n] = s.labels()
        task_ids[b] = s.task_id
        if s.video is not None:
            videos.append(s.video)
    video = None
    if videos:
        shapes = {tuple(v.shape) for v in videos}
        if len(shapes) > 1:
            raise ValueError(f"collate: videos in one batch must share a shape, got {sorted(shapes)}; "
                             f"resample them to the vision encoder's input size (the v2m builder does)")
        video = torch.stack(videos)
    attention_mask = modality != Modality.PAD
    position_ids = torch.arange(L).expand(B, L).clone()
    return Batch(text_ids, audio_codes, modality, attention_mask, position_ids, labels if with_labels else None,
                 task_ids, lengths, video)
