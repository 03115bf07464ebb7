"""Shared pieces of the generation tests: tiny models, a tiny fitted-format codec, a codec that
records what it is asked to decode, and a plain way to extend a prompt with frames."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from unimoe.checkpoint import CheckpointMetadata, save_model_checkpoint
from unimoe.codecs.base import AudioCodec
from unimoe.model.config import AudioLMConfig
from unimoe.model.tasks import Modality, Sequence, build_task_builder
from unimoe.model.transformer import AudioLM

SR, HOP = 8000, 80  # 100 frames per second




def tiny_model(preset: str = "tiny-moe", seed: int = 0, **overrides) -> AudioLM:
    torch.manual_seed(seed)
    return AudioLM(AudioLMConfig.from_preset(preset, **overrides)).eval()


def tiny_codec(griffin_lim_iters: int = 2):
    """A spectral_rvq codec with random (but valid) fitted parts, shaped like the tiny presets (4 x 16)."""
    from unimoe.codecs import SpectralRVQCodec, SpectralRVQConfig

    cfg = SpectralRVQConfig(sample_rate=SR, hop_length=HOP, n_fft=160, n_mels=16, num_codebooks=4, codebook_size=16)
    g = torch.Generator().manual_seed(0)
    return SpectralRVQCodec.from_fitted(cfg, torch.randn(16, generator=g) - 4, torch.rand(16, generator=g) + 0.5,
                                        torch.randn(4, 16, 16, generator=g), griffin_lim_iters=griffin_lim_iters)


class RecordingCodec(AudioCodec):
    """Decodes to silence of the right length and remembers every ``codes`` it was given."""

    sample_rate, hop_length, num_codebooks, cardinality = SR, HOP, 4, 16

    def __init__(self) -> None:
        super().__init__()
        self.decoded: list[Tensor] = []

    def encode(self, wav: Tensor) -> Tensor:
        frames = self.num_frames(wav.shape[-1])
        return torch.zeros(wav.shape[0], self.num_codebooks, frames, dtype=torch.long)

    def decode(self, codes: Tensor) -> Tensor:
        self.decoded.append(codes.clone())
        return torch.zeros(codes.shape[0], 1, codes.shape[-1] * self.hop_length)


def extend(seq: Sequence, frames: Tensor) -> Sequence:
    """``seq`` with audio frames ``[C, S]`` appended (the full sequence a no-cache decoder would see)."""
    S = frames.shape[1]
    return Sequence(
        text_ids=torch.cat([seq.text_ids, torch.zeros(S, dtype=torch.long)]),
        audio_codes=torch.cat([seq.audio_codes, frames.long().cpu()], dim=1),
        modality=torch.cat([seq.modality, torch.full((S,), int(Modality.AUDIO))]),
        target_mask=torch.zeros(seq.audio_codes.shape[0], len(seq) + S, dtype=torch.bool),
        task_id=seq.task_id, target_start=seq.target_start, video=seq.video,
    )


def prompts(model: AudioLM) -> tuple[list[Sequence], list[Sequence]]:
    """Three requests with prompts of different lengths (tts with a voice prompt, two t2m), cond and uncond."""
    cfg = model.config
    tts, t2m = build_task_builder("tts", cfg), build_task_builder("t2m", cfg)
    g = torch.Generator().manual_seed(1)
    pairs = [
        tts.cfg_prefixes(text="a fairly long sentence to say", prompt=torch.randint(0, 16, (4, 6), generator=g)),
        t2m.cfg_prefixes(text="piano"),
        t2m.cfg_prefixes(text="slow strings with a soft choir"),
    ]
    return [c for c, _ in pairs], [u for _, u in pairs]


def write_checkpoint(tmp: Path, preset: str = "tiny-moe", codec=True) -> Path:
    """A random tiny model saved as a unimoe checkpoint, naming a saved tiny codec."""
    model = tiny_model(preset)
    spec = None
    if codec:
        codec_path = tiny_codec().save(tmp / "codec.pt")
        spec = {"name": "spectral_rvq", "path": str(codec_path), "griffin_lim_iters": 2}
    return save_model_checkpoint(tmp / "model.ckpt", model, CheckpointMetadata(config=model.config, codec=spec, stage="test"))
