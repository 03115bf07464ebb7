"""``encodec``: Meta's EnCodec 24 kHz as a codec tokenizer (75 frames/s, 1024-entry codebooks).

The bandwidth picks how many residual codebooks are used: 1.5/3/6/12/24 kbps ->
2/4/8/16/32 codebooks of 10 bits at 75 Hz. Weights come from a local checkpoint or the
package's own download (see :mod:`unimoe.codecs.weights`); ``pretrained=False`` builds
the same architecture untrained and seeded, with codebooks drawn from its own encoder
outputs so codes still follow the input (the package leaves untrained codebooks at zero,
waiting for a k-means init in training).
"""

from __future__ import annotations

from pathlib import Path

import torch
from encodec import EncodecModel

from unimoe.codecs.base import AudioCodec, exact_length
from unimoe.codecs.kmeans import nearest
from unimoe.codecs.weights import encodec_24khz_state_dict

__all__ = ["EncodecCodec", "ENCODEC_BANDWIDTHS", "build_encodec_24khz"]

ENCODEC_BANDWIDTHS: dict[float, int] = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}
"""kbps -> codebooks for the 24 kHz model (each codebook costs 0.75 kbps at 75 Hz)."""


def build_encodec_24khz(path: str | Path | None, pretrained: bool, seed: int = 0) -> EncodecModel:
    """The EnCodec 24 kHz network, with weights (``pretrained``) or untrained and seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # untrained init is reproducible and leaves global RNG alone
        model = EncodecModel.encodec_model_24khz(pretrained=False)
        if pretrained:
            model.load_state_dict(encodec_24khz_state_dict(path))
        else:
            _probe_init_codebooks(model)
    return model.eval()


@torch.no_grad()
def _probe_init_codebooks(model: EncodecModel) -> None:
    """Seed untrained codebooks from the untrained encoder's own outputs (residual by stage).

    EnCodec leaves untrained codebooks at zero until a k-means init on the first training
    batch, so every frame would get code 0. Random vectors do not help either: an untrained
    encoder's output is nearly constant, far from any random codeword. Codewords drawn from
    encoder outputs of a fixed probe signal (noise bursts over a sweep) make codes track the
    input, which is what pipeline tests need from an untrained codec.
    """
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(2 * model.sample_rate) / model.sample_rate
    sweep = torch.sin(2 * torch.pi * (50 + 2000 * t) * t)
    envelope = (torch.rand(t.shape[0] // 800, generator=generator).repeat_interleave(800)) ** 2
    probe = 0.3 * sweep * envelope + 0.05 * torch.randn(t.shape[0], generator=generator) * envelope
    residual = model.encoder(probe.view(1, 1, -1))[0].T.contiguous()  # [T, 128]
    for layer in model.quantizer.vq.layers:
        book = layer._codebook
        picks = torch.randint(residual.shape[0], (book.embed.shape[0],), generator=generator)
        jitter = 0.1 * residual.std(0) * torch.randn(book.embed.shape, generator=generator)
        codewords = residual[picks] + jitter  # [1024, 128]
        book.embed.copy_(codewords)
        book.embed_avg.copy_(codewords)
        book.inited.fill_(1.0)
        residual = residual - codewords[nearest(residual, codewords)[0]]


def _bandwidth_codebooks(bandwidth: float, allowed: dict[float, int], codec: str) -> int:
    try:
        return allowed[float(bandwidth)]
    except KeyError:
        options = ", ".join(f"{bw:g} ({n} codebooks)" for bw, n in allowed.items())
        raise ValueError(f"{codec}: unsupported bandwidth {bandwidth!r} kbps; choose one of {options}") from None


class EncodecCodec(AudioCodec):
    """EnCodec 24 kHz: ``wav [B, 1, S]`` <-> ``codes [B, C, ceil(S / 320)]`` with C set by bandwidth.

    Args:
        bandwidth: target kbps, one of 1.5, 3, 6, 12, 24 (-> 2, 4, 8, 16, 32 codebooks).
        path: local checkpoint (``encodec_24khz-d7cc33bc.th`` or a folder holding it); without
            it the encodec package downloads (or reads its torch-hub cache).
        pretrained: False builds the real architecture untrained (tests, offline smoke runs).
        seed: initialisation seed of the untrained model.
    """

    sample_rate = 24_000
    hop_length = 320
    cardinality = 1024

    def __init__(
        self, bandwidth: float = 6.0, path: str | None = None, pretrained: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        self.num_codebooks = _bandwidth_codebooks(bandwidth, ENCODEC_BANDWIDTHS, "encodec")
        self.bandwidth = float(bandwidth)
        self.pretrained = pretrained
        self.model = build_encodec_24khz(path, pretrained, seed)
        self.model.set_target_bandwidth(self.bandwidth)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        wav = self.check_waveform(wav)  # [B, 1, S]
        num_frames = self.num_frames(wav.shape[-1])
        wav = torch.nn.functional.pad(wav, (0, num_frames * self.hop_length - wav.shape[-1]))
        self.model.set_target_bandwidth(self.bandwidth)
        (codes, _scale), *rest = self.model.encode(wav)  # codes [B, C, T]; one segment at 24 kHz
        assert not rest, "the 24 kHz EnCodec model encodes in one segment"
        return codes[..., :num_frames].long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.check_codes(codes)  # [B, C, T]
        wav = self.model.decode([(codes, None)])  # [B, 1, T * 320]
        return exact_length(wav, codes.shape[-1] * self.hop_length)

    def describe(self) -> dict:
        return {**super().describe(), "bandwidth_kbps": self.bandwidth, "pretrained": self.pretrained}
