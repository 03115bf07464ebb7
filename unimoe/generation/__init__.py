"""Generation: KV-cache decoding through the delay pattern, with classifier-free guidance.

| module | what |
|---|---|
| ``settings.py`` | :class:`GenerationSettings` (sampling, CFG, limits, router top-p) |
| ``sampling.py`` | guidance, special-token rules (EOS only as argmax), per-codebook temperature/top-k/top-p |
| ``decode.py`` | the decoding loop over delayed frames (cache or full recompute), routing statistics |
| ``batching.py`` | dropping finished rows, appending frames (no-cache path) |
| ``requests.py`` | :class:`GenerationRequest`, JSONL request files (training-manifest field names) |
| ``inputs.py`` | loading a request's reference voice (encoded with the codec) and video frames |
| ``generator.py`` | :class:`Generator` / :func:`generate`: requests -> :class:`GeneratedClip` in memory |
| ``outputs.py`` | WAV + JSON sidecar per clip, ``generated.jsonl`` |
| ``pipeline.py`` | :func:`load_generator` from a checkpoint, :func:`build_generator` (evaluation seam) |

User documentation: ``docs/generation.md``.
"""

from unimoe.generation.decode import ContextTooLong, DecodeOutput, decode
from unimoe.generation.generator import GeneratedClip, GenerationError, Generator, generate, inference_mode
from unimoe.generation.inputs import InputError
from unimoe.generation.outputs import write_clips
from unimoe.generation.pipeline import CheckpointGenerator, build_generator, load_generator
from unimoe.generation.requests import GenerationRequest, RequestError, read_requests
from unimoe.generation.sampling import CodebookSampling, FrameSampler, counter_uniforms, guide
from unimoe.generation.settings import GenerationSettings, SettingsError

__all__ = [
    "GenerationSettings",
    "SettingsError",
    "GenerationRequest",
    "RequestError",
    "read_requests",
    "InputError",
    "Generator",
    "GeneratedClip",
    "GenerationError",
    "generate",
    "inference_mode",
    "decode",
    "DecodeOutput",
    "ContextTooLong",
    "CodebookSampling",
    "FrameSampler",
    "counter_uniforms",
    "guide",
    "write_clips",
    "load_generator",
    "build_generator",
    "CheckpointGenerator",
]
