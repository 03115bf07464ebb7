"""Task sequences: how one example becomes the token stream the model trains on.

A task builder (registered in ``TASKS``) turns plain inputs (text or token ids, codec codes
``[C, T]`` of the target and of an optional speaker prompt, optional video frames) into an
unpadded :class:`Sequence`; :func:`collate` right-pads a list of them into a :class:`Batch`.
Generation uses the same builders for its prompts (:meth:`TaskBuilder.prefix`), so training
and inference see identical layouts, including the unconditional (CFG) form.

Layouts (``[...]`` = one block of positions; audio blocks are delayed segments, see
:mod:`unimoe.model.delay`)::

    tts   [TEXT: bos "text to speech: " prompt_text text eos] [AUDIO: prompt segment] [AUDIO: target segment]
    t2m   [TEXT: bos "text to music: " caption eos]                                  [AUDIO: target segment]
    v2m   [VISION: soft tokens] [TEXT: bos "video to music: " caption eos]           [AUDIO: target segment]

The loss covers only the target segment's real codes and EOS (never text, vision, the
prompt, the BOS/PAD fill of the delay pattern, or padding). With probability
``cond_drop_prob`` a training example drops its conditions (text, prompt, video) and keeps
only the task instruction: exactly the ``prefix(cond=False)`` row generation uses for CFG.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from unimoe.model.delay import CodecSpecials, delayed_segment
from unimoe.registry import TASKS, ComponentSpec

if TYPE_CHECKING:
    from unimoe.model.config import AudioLMConfig
    from unimoe.model.text_tokenizer import TextTokenizer

IGNORE_INDEX = -100
"""Label value the loss ignores."""


class Modality(IntEnum):
    """What sits at a position."""

    PAD = 0
    TEXT = 1
    AUDIO = 2
    VISION = 3


BUILTIN_TASKS: tuple[str, ...] = ("tts", "t2m", "v2m")


class _TaskIds(Mapping):
    """Stable task name -> id: ``tts=0, t2m=1, v2m=2``, then plug-in tasks in name order."""

    def _names(self) -> list[str]:
        extra = sorted(n for n in TASKS.names() if n not in BUILTIN_TASKS)
        return [*BUILTIN_TASKS, *extra]

    def __getitem__(self, name: str) -> int:
        names = self._names()
        if name not in names:
            raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(names)}")
        return names.index(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def name(self, task_id: int) -> str:
        names = self._names()
        if not 0 <= task_id < len(names):
            raise KeyError(f"unknown task id {task_id}; known: {dict(zip(names, range(len(names))))}")
        return names[task_id]


TASK_IDS = _TaskIds()


class SequenceTooLong(ValueError):
    """A built sequence is longer than ``AudioLMConfig.max_seq_len`` (the data pipeline may skip it)."""


# ---------------------------------------------------------------------- Sequence / Batch
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


# ---------------------------------------------------------------------- builders
@dataclass
class Part:
    """One conditioning block a builder's :meth:`TaskBuilder.layout` returns."""

    modality: Modality
    text: list[int] | None = None  # TEXT
    codes: Tensor | None = None  # AUDIO: delayed [C, n]
    video: Tensor | None = None  # VISION: frames
    num_tokens: int = 0  # VISION


TextInput = Union[str, list, Tensor]


class TaskBuilder:
    """Base of task builders; subclasses say which conditions exist and how they are laid out.

    ``config`` gives codebooks, delays, vocabularies and the vision encoder; ``tokenizer``
    defaults to ``config.text_tokenizer``. ``cond_drop_prob`` is the CFG condition dropout of
    :meth:`build`; ``uncond_keep`` names conditions the unconditional form keeps (e.g.
    ``["prompt"]`` to guide TTS on text only); ``instruction`` replaces the task's text prefix.
    """

    task: ClassVar[str]
    conditions: ClassVar[tuple[str, ...]]
    """Inputs that condition generation (dropped for the unconditional form)."""
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    """Further accepted inputs that travel with a condition (tts: ``prompt_text``)."""
    default_instruction: ClassVar[str]

    def __init__(
        self,
        config: "AudioLMConfig",
        tokenizer: "TextTokenizer | ComponentSpec | None" = None,
        cond_drop_prob: float = 0.0,
        uncond_keep: list[str] | tuple[str, ...] = (),
        instruction: str | None = None,
    ) -> None:
        from unimoe.model.text_tokenizer import build_text_tokenizer

        self.config = config
        self.tokenizer = build_text_tokenizer(tokenizer if tokenizer is not None else config.text_tokenizer)
        vocab = config.resolved_text_vocab_size()
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"{self.task}: tokenizer has {self.tokenizer.vocab_size} ids but "
                             f"AudioLMConfig.text_vocab_size is {vocab}")
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"{self.task}: cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        unknown = [c for c in uncond_keep if c not in self.conditions]
        if unknown:
            raise ValueError(f"{self.task}: uncond_keep has unknown conditions {unknown}; this task has {list(self.conditions)}")
        self.text_vocab_size = vocab
        self.cond_drop_prob = cond_drop_prob
        self.uncond_keep = tuple(uncond_keep)
        self.instruction = self.default_instruction if instruction is None else instruction
        self.specials = CodecSpecials(config.codebook_size)
        self.task_id = TASK_IDS[self.task]

    # ------------------------------------------------------------------ public API
    def build(self, target: Tensor, *, drop_condition: bool | None = None, rng: random.Random | None = None,
              **conditions: Any) -> Sequence:
        """A training sequence for ``target`` codes ``[C, T]`` under ``conditions``.

        ``drop_condition`` forces (True) or forbids (False) the CFG drop; None draws it with
        probability ``cond_drop_prob`` from ``rng`` (default: the ``random`` module).
        """
        target = self.codes(target, "target")
        if drop_condition is None:
            drop_condition = self.cond_drop_prob > 0 and (rng or random).random() < self.cond_drop_prob
        parts = self._parts(conditions, cond=not drop_condition)
        return self._assemble(parts, delayed_segment(target, self.config.delays, self.specials), full_target=True)

    def prefix(self, *, cond: bool = True, **conditions: Any) -> Sequence:
        """The generation prompt: conditioning + the target's audio BOS frame (``cond=False``: CFG row)."""
        bos = torch.full((self.config.num_codebooks, 1), self.specials.bos, dtype=torch.long)
        return self._assemble(self._parts(conditions, cond=cond), bos, full_target=False)

    def cfg_prefixes(self, **conditions: Any) -> tuple[Sequence, Sequence]:
        """``(cond, uncond)`` prompts of one request for classifier-free guidance."""
        return self.prefix(cond=True, **conditions), self.prefix(cond=False, **conditions)

    # ------------------------------------------------------------------ subclass hook
    def layout(self, conditions: dict[str, Any], keep: set[str]) -> list[Part]:
        """The conditioning blocks, given the non-None ``conditions`` and the names to ``keep``.

        Validate inputs with :meth:`codes` / :meth:`text_ids`, make blocks with
        :meth:`text_block`, :meth:`audio_block` or ``Part(Modality.VISION, video=, num_tokens=)``.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for layouts
    def audio_block(self, codes: Tensor) -> Part:
        """A conditioning audio block: the delayed segment of ``codes [C, T]`` (no targets)."""
        return Part(Modality.AUDIO, codes=delayed_segment(codes, self.config.delays, self.specials))

    def _parts(self, conditions: dict[str, Any], cond: bool) -> list[Part]:
        accepted = set(self.conditions) | set(self.extra_inputs)
        unknown = sorted(set(conditions) - accepted)
        if unknown:
            raise TypeError(f"{self.task}: unexpected input(s) {unknown}; accepted: {sorted(accepted)}")
        conditions = {k: v for k, v in conditions.items() if v is not None}
        keep = set(self.conditions) if cond else set(self.uncond_keep)
        return self.layout(conditions, keep)

    def codes(self, codes: Any, field: str) -> Tensor:
        """Validate codec codes ``[C, T>=1]`` in ``[0, K)``; errors name ``field``."""
        C, K = self.config.num_codebooks, self.config.codebook_size
        if not isinstance(codes, Tensor):
            raise TypeError(f"{self.task}: {field!r} must be a tensor [C={C}, T] of codes, got {type(codes).__name__}")
        if codes.dim() != 2 or codes.shape[0] != C or codes.shape[1] < 1:
            raise ValueError(f"{self.task}: {field!r} must be codes [C={C}, T>=1], got shape {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"{self.task}: {field!r} must be an integer tensor, got {codes.dtype}")
        codes = codes.long().cpu()
        if bool(((codes < 0) | (codes >= K)).any()):
            raise ValueError(f"{self.task}: {field!r} has codes outside [0, {K}) (min {int(codes.min())}, max {int(codes.max())})")
        return codes

    def text_ids(self, text: TextInput, field: str) -> list[int]:
        """A str (tokenized) or token ids (checked against the text vocabulary) -> ids."""
        if isinstance(text, str):
            return self.tokenizer.encode(text)
        if isinstance(text, Tensor):
            text = text.tolist()
        if not isinstance(text, list) or not all(isinstance(i, int) for i in text):
            raise TypeError(f"{self.task}: {field!r} must be a str or a list of token ids, got {type(text).__name__}")
        vocab = self.text_vocab_size
        bad = [i for i in text if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{self.task}: {field!r} has token ids outside [0, {vocab}): {bad[:5]}")
        return list(text)

    def text_block(self, *contents: list[int]) -> Part:
        """``[bos] + instruction + contents + [eos]`` (bos/eos when the tokenizer has them)."""
        tok = self.tokenizer
        ids = [tok.bos_id] if tok.bos_id is not None else []
        ids += tok.encode(self.instruction) if self.instruction else []
        for c in contents:
            ids += c
        ids += [tok.eos_id] if tok.eos_id is not None else []
        if not ids:
            raise ValueError(f"{self.task}: empty text block (no instruction, no bos/eos, no text)")
        return Part(Modality.TEXT, text=ids)

    def _assemble(self, parts: list[Part], target: Tensor, full_target: bool) -> Sequence:
        C = self.config.num_codebooks
        text, codes, modality, mask = [], [], [], []
        video = None
        for part in parts:
            if part.modality == Modality.TEXT:
                n = len(part.text)
                text.append(torch.tensor(part.text, dtype=torch.long))
                codes.append(torch.zeros(C, n, dtype=torch.long))
            elif part.modality == Modality.AUDIO:
                n = part.codes.shape[1]
                text.append(torch.zeros(n, dtype=torch.long))
                codes.append(part.codes)
            else:
                n = part.num_tokens
                text.append(torch.zeros(n, dtype=torch.long))
                codes.append(torch.zeros(C, n, dtype=torch.long))
                video = part.video
            modality.append(torch.full((n,), int(part.modality), dtype=torch.long))
            mask.append(torch.zeros(C, n, dtype=torch.bool))
        target_start = sum(m.shape[0] for m in modality)
        n = target.shape[1]
        text.append(torch.zeros(n, dtype=torch.long))
        codes.append(target)
        modality.append(torch.full((n,), int(Modality.AUDIO), dtype=torch.long))
        # Targets: real codes and EOS. BOS/PAD are fixed by the delay pattern (generation forces them).
        tmask = (target < self.specials.cardinality) | (target == self.specials.eos)
        mask.append(tmask if full_target else torch.zeros_like(tmask))
        seq = Sequence(torch.cat(text), torch.cat(codes, 1), torch.cat(modality), torch.cat(mask, 1),
                       self.task_id, target_start, video)
        if len(seq) > self.config.max_seq_len:
            raise SequenceTooLong(f"{self.task}: sequence of {len(seq)} positions exceeds "
                                  f"AudioLMConfig.max_seq_len={self.config.max_seq_len}")
        return seq


@TASKS.register("tts")
class TTSBuilder(TaskBuilder):
    """Voice cloning / TTS: transcript (+ the prompt's transcript) and a speaker prompt -> speech.

    Inputs: ``text`` (required), ``prompt`` codes ``[C, Tp]`` and ``prompt_text`` (optional).
    """

    task = "tts"
    conditions = ("text", "prompt")
    extra_inputs = ("prompt_text",)
    default_instruction = "text to speech: "

    def layout(self, conditions: dict[str, Any], keep: set[str]) -> list[Part]:
        if "text" not in conditions:
            raise ValueError("tts: 'text' (the transcript) is required")
        text = self.text_ids(conditions["text"], "text")
        if not text:
            raise ValueError("tts: 'text' is empty")
        prompt = self.codes(conditions["prompt"], "prompt") if "prompt" in conditions else None
        if "text" in keep:
            spoken = self.text_ids(conditions["prompt_text"], "prompt_text") if "prompt_text" in conditions else []
            sep = self.tokenizer.encode(" ") if spoken and isinstance(conditions["text"], str) else []
            parts = [self.text_block(spoken, sep, text)]
        else:
            parts = [self.text_block()]
        if prompt is not None and "prompt" in keep:
            parts.append(self.audio_block(prompt))
        return parts


@TASKS.register("t2m")
class T2MBuilder(TaskBuilder):
    """Text-to-music: ``text`` (the caption) -> music."""

    task = "t2m"
    conditions = ("text",)
    default_instruction = "text to music: "

    def layout(self, conditions: dict[str, Any], keep: set[str]) -> list[Part]:
        if "text" not in conditions:
            raise ValueError("t2m: 'text' (the caption) is required")
        caption = self.text_ids(conditions["text"], "text")
        if not caption:
            raise ValueError("t2m: 'text' is empty")
        return [self.text_block(caption if "text" in keep else [])]


@TASKS.register("v2m")
class V2MBuilder(TaskBuilder):
    """Video(+text)-to-music: ``video`` frames ``[F, 3, H, W]`` (float 0-1 or uint8) and an optional caption.

    Frames are resampled to the vision encoder's ``input_frames`` (uniformly in time) and
    resized to its ``input_size`` so videos of a batch stack.
    """

    task = "v2m"
    conditions = ("video", "text")
    default_instruction = "video to music: "

    def __init__(self, config: "AudioLMConfig", *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if config.vision is None:
            raise ValueError("v2m needs a vision encoder: set AudioLMConfig.vision (e.g. 'vit')")
        from unimoe.model.vision import build_vision_encoder

        with torch.device("meta"):  # shapes only: the token count needs no weights
            self.encoder = build_vision_encoder(config.vision, hidden_size=config.hidden_size)

    def frames(self, video: Any) -> Tensor:
        """Validate and resample ``video`` to the encoder's input: float ``[F', 3, H', W']`` in [0, 1]."""
        if not isinstance(video, Tensor) or video.dim() != 4 or video.shape[1] != 3 or video.shape[0] < 1:
            shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
            raise ValueError(f"v2m: 'video' must be frames [F, 3, H, W], got {shape}")
        video = video.float().cpu() / 255.0 if video.dtype == torch.uint8 else video.float().cpu()
        if not bool(torch.isfinite(video).all()):
            raise ValueError("v2m: 'video' has NaN or infinite values")
        n = self.encoder.input_frames
        if n is not None and video.shape[0] != n:
            video = video[torch.linspace(0, video.shape[0] - 1, n).round().long()]
        if self.encoder.input_size is not None and tuple(video.shape[-2:]) != tuple(self.encoder.input_size):
            video = F.interpolate(video, size=self.encoder.input_size, mode="bilinear", align_corners=False, antialias=True)
        return video.clamp(0.0, 1.0)

    def layout(self, conditions: dict[str, Any], keep: set[str]) -> list[Part]:
        if "video" not in conditions:
            raise ValueError("v2m: 'video' frames are required")
        video = self.frames(conditions["video"])
        caption = self.text_ids(conditions["text"], "text") if "text" in conditions else []
        parts = []
        if "video" in keep:
            parts.append(Part(Modality.VISION, video=video, num_tokens=self.encoder.num_tokens(video.shape[0], video.shape[2], video.shape[3])))
        parts.append(self.text_block(caption if "text" in keep else []))
        return parts


def build_task_builder(spec: ComponentSpec, config: "AudioLMConfig", tokenizer: Any = None) -> TaskBuilder:
    """``build_task_builder("tts", cfg)`` or ``({"name": "tts", "cond_drop_prob": 0.1}, cfg)``."""
    context: dict[str, Any] = {"config": config}
    if tokenizer is not None:
        context["tokenizer"] = tokenizer
    return TASKS.build(spec, **context)
