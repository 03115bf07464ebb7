"""Tasks: what an example of each task needs, and how it becomes the token stream the model trains on.

A task is one registered :class:`TaskBuilder` subclass (entry points in ``unimoe.tasks``). Its
class attributes declare what the task needs (``required`` inputs, ``speaker_prompt``,
``domain``, ``text_role``...): manifests, tokenisation, generation requests, validation
summaries, evaluation and upcycling ask :func:`task_class` instead of keeping task names.
An instance, built for a model config, turns plain inputs (text or token ids, codec codes
``[C, T]`` of the target and of an optional speaker prompt, optional video frames) into an
unpadded :class:`~unimoe.model.batch.Sequence`; :func:`~unimoe.model.batch.collate` right-pads
a list of them into a ``Batch``. Generation uses the same builders for its prompts
(:meth:`TaskBuilder.prefix`), so training and inference see identical layouts, including the
unconditional (CFG) form. :class:`TaskIds` numbers a model's tasks; it is stored in checkpoints.

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

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from unimoe.model.batch import (  # noqa: F401  (Batch, collate, IGNORE_INDEX are re-exported for callers)
    IGNORE_INDEX, Batch, Modality, Sequence, SequenceTooLong, collate,
)
from unimoe.model.delay import CodecSpecials, delayed_segment
from unimoe.model.text_tokenizer import TextTokenizer, build_text_tokenizer
from unimoe.model.vision import build_vision_encoder
from unimoe.registry import TASKS, ComponentSpec, RegistryError

if TYPE_CHECKING:
    from unimoe.model.config import AudioLMConfig

# ---------------------------------------------------------------------- task ids
LEGACY_TASK_ORDER: tuple[str, ...] = ("tts", "t2m", "v2m")
"""The order unimoe numbered tasks in before checkpoints stored their ids (then the other
registered tasks by name). Only :meth:`TaskIds.legacy` uses it: the fallback for such checkpoints."""


class TaskIds(Mapping):
    """Task name -> id, in a fixed order that belongs to a model.

    Per-task losses and per-task routing tables are indexed by these ids, so they are
    assigned once and then carried: a stage starts from its ``init_from`` checkpoint's
    table (``CheckpointMetadata.task_ids``), appends the tasks its data brings that the
    table lacks (in name order) and stores the result in every checkpoint it writes.
    Installing a plug-in never renumbers anything, because nothing is derived from the
    registry at run time.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        names = list(names)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"task ids need distinct non-empty task names, got {names}")
        self._names = names
        self._index = {n: i for i, n in enumerate(names)}

    @classmethod
    def legacy(cls) -> "TaskIds":
        """The ids a checkpoint written before ids were stored was trained with (``tts=0, t2m=1, v2m=2``, others by name)."""
        return cls([*LEGACY_TASK_ORDER, *sorted(n for n in task_names() if n not in LEGACY_TASK_ORDER)])

    def extended(self, names: Iterable[str]) -> "TaskIds":
        """This table with the tasks of ``names`` it lacks appended (in name order); existing ids never move."""
        new = sorted(set(names) - set(self._names))
        return self if not new else TaskIds([*self._names, *new])

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __getitem__(self, name: str) -> int:
        if name not in self._index:
            raise KeyError(f"task {name!r} has no id in this model's task table {self._names}")
        return self._index[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def name(self, task_id: int) -> str:
        if not 0 <= task_id < len(self._names):
            raise KeyError(f"unknown task id {task_id}; this model's tasks: {dict(self._index)}")
        return self._names[task_id]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskIds) and other._names == self._names

    def __repr__(self) -> str:
        return f"TaskIds({self._names})"


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
    """A task: what its examples need (class-level declarations) and how they become sequences.

    The registered class IS the task. Its declarations are what the rest of unimoe asks
    (manifest validation, tokenisation, speaker-prompt pairing, generation requests, the
    validation summaries, evaluation, upcycling) instead of keeping lists of task names;
    :func:`task_class` returns them for a name without building anything. An instance
    (built with a model config) lays examples out (:meth:`build`, :meth:`prefix`).

    ``config`` gives codebooks, delays, vocabularies and the vision encoder; ``tokenizer``
    defaults to ``config.text_tokenizer``. ``cond_drop_prob`` is the CFG condition dropout of
    :meth:`build`; ``uncond_keep`` names conditions the unconditional form keeps (e.g.
    ``["prompt"]`` to guide TTS on text only); ``instruction`` replaces the task's text prefix;
    ``task_ids`` is the model's task table (:class:`TaskIds`; default: the legacy order, for
    standalone use) that gives this task's id.
    """

    task: ClassVar[str]
    domain: ClassVar[str | None] = None
    """``"speech"`` / ``"music"`` (or a plug-in's own): groups validation losses and picks evaluation metrics."""
    conditions: ClassVar[tuple[str, ...]]
    """Inputs that condition generation (dropped for the unconditional form)."""
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    """Further accepted inputs that travel with a condition (tts: ``prompt_text``)."""
    required: ClassVar[tuple[str, ...]] = ()
    """Inputs every example and every request must have, non-empty (tts and t2m: ``text``; v2m: ``video``)."""
    speaker_prompt: ClassVar[bool] = False
    """Training examples carry another utterance of their speaker as ``prompt``: import pairs them
    (:mod:`unimoe.data.prompts`) and tokenisation skips an example without one."""
    text_role: ClassVar[str] = "text"
    """What ``text`` is for this task, for messages (``"transcript"``, ``"caption"``)."""
    default_instruction: ClassVar[str]

    def __init__(
        self,
        config: "AudioLMConfig",
        tokenizer: "TextTokenizer | ComponentSpec | None" = None,
        cond_drop_prob: float = 0.0,
        uncond_keep: list[str] | tuple[str, ...] = (),
        instruction: str | None = None,
        task_ids: TaskIds | None = None,
    ) -> None:
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
        self.task_id = (task_ids if task_ids is not None else TaskIds.legacy())[self.task]

    # ------------------------------------------------------------------ declarations
    @classmethod
    def accepts(cls, name: str) -> bool:
        """Does this task take the builder input ``name`` (``text``, ``prompt``, ``prompt_text``, ``video``)?"""
        return name in cls.conditions or name in cls.extra_inputs

    @classmethod
    def describe_input(cls, name: str) -> str:
        """Human words for an input in messages: ``'text' (the transcript)``."""
        return {"text": f"'text' (the {cls.text_role})", "prompt": "'prompt' (speaker prompt codes)",
                "video": "'video' (frames [F, 3, H, W])"}.get(name, repr(name))

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
        for name in self.required:
            if name not in conditions:
                raise ValueError(f"{self.task}: {self.describe_input(name)} is required")
            if isinstance(conditions[name], str) and not conditions[name].strip() or (
                    isinstance(conditions[name], (list, Tensor)) and len(conditions[name]) == 0):
                raise ValueError(f"{self.task}: {self.describe_input(name)} is empty")
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


class TTSBuilder(TaskBuilder):
    """Voice cloning / TTS: transcript (+ the prompt's transcript) and a speaker prompt -> speech.

    Inputs: ``text`` (required), ``prompt`` codes ``[C, Tp]`` and ``prompt_text`` (optional).
    """

    task = "tts"
    domain = "speech"
    conditions = ("text", "prompt")
    extra_inputs = ("prompt_text",)
    required = ("text",)
    speaker_prompt = True
    text_role = "transcript"
    default_instruction = "text to speech: "

    def layout(self, conditions: dict[str, Any], keep: set[str]) -> list[Part]:
        text = self.text_ids(conditions["text"], "text")
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


class T2MBuilder(TaskBuilder):
    """Text-to-music: ``text`` (the caption) -> music."""

    task = "t2m"
    domain = "music"
    conditions = ("text",)
    required = ("text",)
    text_role = "caption"
    default_instruction = "text to music: "

    def layout(self, conditions: dict[str, Any], keep: set[str]) -> list[Part]:
        caption = self.text_ids(conditions["text"], "text")
        return [self.text_block(caption if "text" in keep else [])]


class V2MBuilder(TaskBuilder):
    """Video(+text)-to-music: ``video`` frames ``[F, 3, H, W]`` (float 0-1 or uint8) and an optional caption.

    Frames are resampled to the vision encoder's ``input_frames`` (uniformly in time) and
    resized to its ``input_size`` so videos of a batch stack.
    """

    task = "v2m"
    domain = "music"
    conditions = ("video", "text")
    required = ("video",)
    text_role = "caption"
    default_instruction = "video to music: "

    def __init__(self, config: "AudioLMConfig", *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if config.vision is None:
            raise ValueError("v2m needs a vision encoder: set AudioLMConfig.vision (e.g. 'vit')")
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
        video = self.frames(conditions["video"])
        caption = self.text_ids(conditions["text"], "text") if "text" in conditions else []
        parts = []
        if "video" in keep:
            parts.append(Part(Modality.VISION, video=video, num_tokens=self.encoder.num_tokens(video.shape[0], video.shape[2], video.shape[3])))
        parts.append(self.text_block(caption if "text" in keep else []))
        return parts


def task_names() -> list[str]:
    """Registered names that are tasks. A builder registered under another name than its ``task`` is a
    prompt format of that task (``uni_moe_audio_tts`` lays ``tts`` out as the release does), not a task."""
    names = []
    for name in TASKS.names():
        try:
            if task_class(name).task == name:
                names.append(name)
        except RegistryError:  # a broken plug-in: still listed, so using it reports its own error
            names.append(name)
    return names


def task_class(name: str) -> type[TaskBuilder]:
    """The registered task ``name``: its declarations (``required``, ``domain``...), nothing built.

    Unknown names raise :class:`~unimoe.registry.RegistryError` listing the known tasks.
    """
    cls = TASKS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, TaskBuilder)):
        raise RegistryError(f"task {name!r} resolves to {cls!r}, which is not a TaskBuilder subclass; "
                            f"tasks subclass unimoe.model.tasks.TaskBuilder and declare what they need")
    return cls


INPUT_FIELDS: dict[str, str] = {"text": "text", "prompt_audio": "prompt", "prompt_text": "prompt_text", "video": "video"}
"""Manifest / request field -> the builder input it feeds (``prompt_audio`` is encoded into ``prompt``)."""


def field_of(builder_input: str) -> str:
    """The manifest / request field that carries a builder input (``prompt`` -> ``prompt_audio``)."""
    return next((f for f, i in INPUT_FIELDS.items() if i == builder_input), builder_input)


def build_task_builder(spec: ComponentSpec, config: "AudioLMConfig", tokenizer: Any = None,
                       task_ids: TaskIds | None = None) -> TaskBuilder:
    """``build_task_builder("tts", cfg)`` or ``({"name": "tts", "cond_drop_prob": 0.1}, cfg, task_ids=ids)``."""
    context: dict[str, Any] = {"config": config}
    if tokenizer is not None:
        context["tokenizer"] = tokenizer
    if task_ids is not None:
        context["task_ids"] = task_ids
    return TASKS.build(spec, **context)
