"""From a request to the task builder's inputs: read and encode the reference voice, read video.

All file I/O of generation's inputs happens here, before any decoding, so a bad request
fails fast with a message naming the request, its source line and the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unimoe.audio import AudioFileError, load_audio
from unimoe.data.video import VideoFileError, load_video
from unimoe.generation.requests import GenerationRequest
from unimoe.model.tasks import INPUT_FIELDS, Sequence, TaskBuilder

log = logging.getLogger("unimoe.generation")

VIDEO_SUFFIXES = (".npy", ".npz")

# request field -> task-builder input it feeds (the manifest's fields, plus the in-memory forms)
_INPUT_OF = {**INPUT_FIELDS, "prompt_codes": "prompt", "video_frames": "video"}


class InputError(ValueError):
    """A request's inputs are missing, unreadable or do not fit the task."""


@dataclass
class PreparedRequest:
    """A request with its conditioning loaded and its prompts built (``builder.cfg_prefixes(**inputs)``)."""

    request: GenerationRequest
    inputs: dict[str, Any]
    seed: int
    cond: Sequence
    """The conditional prompt (``builder.prefix(cond=True)``), ending in the target's BOS frame."""
    uncond: Sequence
    """The unconditional (CFG) prompt."""
    info: dict[str, Any] = field(default_factory=dict)
    """What was done to the inputs (prompt seconds, trimming, video frames) for the sidecar."""


def _where(request: GenerationRequest) -> str:
    return f"request {request.id!r} ({request.source})"


def prepare_request(
    request: GenerationRequest,
    builder: TaskBuilder,
    *,
    codec=None,
    seed: int,
    max_prompt_seconds: float,
) -> PreparedRequest:
    """Check a request against its task builder and load its audio prompt / video."""
    where = _where(request)
    accepted = set(builder.conditions) | set(builder.extra_inputs)
    for name, target in _INPUT_OF.items():
        if getattr(request, name) is not None and target not in accepted:
            raise InputError(f"{where}: field '{name}': task {request.task!r} does not use it "
                             f"(it takes {', '.join(sorted(accepted))})")
    inputs: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if request.text is not None and request.text.strip():
        inputs["text"] = request.text
    elif "text" in builder.required and request.text is not None:
        raise InputError(f"{where}: field 'text': is empty")
    elif "text" in builder.required:
        raise InputError(f"{where}: field 'text': task {request.task!r} needs a non-empty {builder.text_role}")
    if request.prompt_text is not None:
        inputs["prompt_text"] = request.prompt_text
    if request.prompt_codes is not None:
        inputs["prompt"] = request.prompt_codes
        info["prompt_frames"] = int(request.prompt_codes.shape[-1])
    elif request.prompt_audio is not None:
        inputs["prompt"], info = _encode_prompt(request, codec, max_prompt_seconds)
    if request.video_frames is not None:
        inputs["video"] = request.video_frames
    elif request.video is not None:
        inputs["video"] = _read_video(request)
    if "video" in builder.required and "video" not in inputs:
        raise InputError(f"{where}: field 'video': task {request.task!r} needs video frames "
                         f"(.npy [F, H, W, 3] or .npz with 'frames')")
    if "video" in inputs:
        info["video_frames"] = int(inputs["video"].shape[0])
    try:
        cond, uncond = builder.cfg_prefixes(**inputs)
    except (ValueError, TypeError) as exc:  # SequenceTooLong, codes of the wrong codec, bad token ids
        raise InputError(f"{where}: {exc}") from exc
    cfg = builder.config
    longest = max(len(cond), len(uncond))
    if cfg.max_seq_len - longest - 1 - max(cfg.delays) < 1:  # prompt + 1 frame + EOS + delay tail must fit
        raise InputError(f"{where}: the prompt takes {longest} of max_seq_len={cfg.max_seq_len} positions and "
                         f"leaves no room for audio (shorten the text or the reference voice)")
    return PreparedRequest(request=request, inputs=inputs, seed=seed, cond=cond, uncond=uncond, info=info)


def _encode_prompt(request: GenerationRequest, codec, max_seconds: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Reference voice -> codes ``[C, Tp]``: any sample rate, mixed to mono, trimmed to ``max_seconds``."""
    where = _where(request)
    if codec is None:
        raise InputError(f"{where}: field 'prompt_audio': encoding a reference voice needs a codec "
                         f"(pass one, or give prompt_codes)")
    try:
        wav, sr = load_audio(request.prompt_audio, mono=True)  # [1, S] at the file's rate
    except AudioFileError as exc:
        raise InputError(f"{where}: field 'prompt_audio': {exc}") from exc
    seconds = wav.shape[-1] / sr
    info: dict[str, Any] = {"prompt_seconds": round(seconds, 3), "prompt_sample_rate": sr}
    if seconds > max_seconds:
        keep = int(max_seconds * sr)
        wav = wav[:, :keep]
        info.update(prompt_trimmed_from=round(seconds, 3), prompt_seconds=round(keep / sr, 3))
        log.warning("%s: prompt audio %s is %.2f s; using its first %.2f s (max_prompt_seconds)",
                    where, request.prompt_audio, seconds, max_seconds)
    if wav.shape[-1] * codec.sample_rate < codec.hop_length * sr:
        raise InputError(f"{where}: field 'prompt_audio': {request.prompt_audio} is {seconds:.4f} s, shorter "
                         f"than one codec frame ({codec.hop_length / codec.sample_rate:.4f} s)")
    try:
        codes = codec.encode_audio(wav, sr)  # [C, Tp]
    except ValueError as exc:
        raise InputError(f"{where}: field 'prompt_audio': cannot encode {request.prompt_audio}: {exc}") from exc
    info["prompt_frames"] = int(codes.shape[-1])
    return codes, info


def _read_video(request: GenerationRequest) -> torch.Tensor:
    """Pre-extracted frames (.npy / .npz, as the data pipeline stores them) -> ``[F, 3, H, W]`` uint8."""
    where = _where(request)
    suffix = Path(request.video).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise InputError(f"{where}: field 'video': {request.video} is a {suffix or 'suffix-less'} file; generation reads "
                         f"pre-extracted frames: .npy [F, H, W, 3] (uint8 or float 0-1) or .npz with a 'frames' "
                         f"array (decode videos to frames with your own tools, see docs/data.md)")
    try:
        frames, _ = load_video(request.video)  # [F, H, W, 3] uint8
    except VideoFileError as exc:
        raise InputError(f"{where}: field 'video': {exc}") from exc
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
