"""From a checkpoint file to a working generator, and the evaluation seam.

``load_generator(ckpt)`` rebuilds the model from the checkpoint's own metadata
(:mod:`unimoe.checkpoint`), builds the codec it names (``CheckpointMetadata.codec``, a
``CODECS`` spec, unless overridden) and the task builders it was trained with.
``build_generator(ckpt, **options)`` wraps that as the ``Generator`` protocol of
:mod:`unimoe.evaluation.runner`: ``generator(requests.jsonl, out_dir) -> manifest``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unimoe import devices
from unimoe.checkpoint import load_model
from unimoe.generation.generator import GenerationError, Generator
from unimoe.generation.outputs import write_clips
from unimoe.generation.requests import read_requests
from unimoe.generation.settings import GenerationSettings
from unimoe.registry import ComponentSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """:func:`unimoe.devices.resolve_device`, failing as a generation error."""
    try:
        return devices.resolve_device(device)
    except ValueError as exc:
        raise GenerationError(str(exc)) from exc


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on a GPU that supports it, else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise GenerationError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_codec_spec(text: str) -> ComponentSpec:
    """A ``--codec`` value (see :func:`unimoe.codecs.spec.parse_codec_spec`) as a generation error."""
    from unimoe.codecs.spec import parse_codec_spec as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise GenerationError(str(exc)) from exc


def build_codec(spec: ComponentSpec, source: str):
    """Build the codec of ``spec`` (every in-tree codec registered first); errors say where the spec came from."""
    from unimoe.registry import CODECS

    try:
        codec = CODECS.build(spec)
    except Exception as exc:  # RegistryError, CodecFileError, CodecWeightsError, ImportError...
        raise GenerationError(f"cannot build the codec {spec!r} ({source}): {exc}") from exc
    return codec.eval()


def load_generator(
    ckpt_path: str | Path,
    *,
    codec: ComponentSpec | None = None,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    settings: GenerationSettings | None = None,
) -> Generator:
    """Model + codec + task builders of a unimoe checkpoint, ready to :meth:`Generator.generate`."""
    ckpt_path = Path(ckpt_path)
    model, meta = load_model(ckpt_path, map_location="cpu")
    spec = codec if codec is not None else meta.codec
    if spec is None:
        raise GenerationError(f"checkpoint {ckpt_path} names no codec (its CheckpointMetadata.codec is empty); "
                              f"pass one with --codec '{{\"name\": \"spectral_rvq\", \"path\": \"codec.pt\"}}'")
    source = "--codec" if codec is not None else f"the codec recorded in {ckpt_path}"
    codec_model = build_codec(spec, source)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model.to(device=dev, dtype=dt)
    codec_model.to(dev)
    info = {
        "checkpoint": str(ckpt_path),
        "checkpoint_stage": meta.stage,
        "codec": spec,
        "codec_description": codec_model.describe(),
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
    }
    return Generator(model, codec_model, settings, builders=meta.tasks, info=info, task_ids=meta.task_table())


class CheckpointGenerator:
    """The evaluation seam: ``generator(requests.jsonl, out_dir) -> out_dir/generated.jsonl``.

    Requests whose inputs cannot be used are skipped (listed in ``skipped.jsonl``) when
    ``skip_invalid`` (the evaluation runner reports the missing ids), else they raise.
    """

    def __init__(self, generator: Generator, skip_invalid: bool = True) -> None:
        self.generator = generator
        self.skip_invalid = skip_invalid

    def __call__(self, requests: Path, out_dir: Path) -> Path:
        prepared, skipped = self.generator.prepare(read_requests(requests), skip_invalid=self.skip_invalid)
        clips = self.generator.generate_prepared(prepared)
        return write_clips(clips, out_dir, skipped=skipped)


def build_generator(ckpt_path: str, **options: Any) -> CheckpointGenerator:
    """``build_generator(ckpt, device="cpu", codec=spec, dtype="auto", skip_invalid=True, preset=None, **GenerationSettings fields)``."""
    device = options.pop("device", "auto")
    dtype = options.pop("dtype", "auto")
    codec = options.pop("codec", None)
    skip_invalid = options.pop("skip_invalid", True)
    preset = options.pop("preset", None)
    settings = GenerationSettings.from_options(options, preset=preset)
    generator = load_generator(ckpt_path, codec=codec, device=device, dtype=dtype, settings=settings)
    return CheckpointGenerator(generator, skip_invalid=skip_invalid)
