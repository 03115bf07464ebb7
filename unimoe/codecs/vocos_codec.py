"""``vocos``: EnCodec tokens decoded by Vocos (``charactr/vocos-encodec-24khz``).

Tokens are exactly EnCodec's (encoding goes through :class:`EncodecCodec`), so a model
trained on ``encodec`` codes can be decoded by either. Vocos replaces EnCodec's decoder
with a ConvNeXt backbone + inverse-STFT head that sounds better at low bandwidth. Vocos
supports 1.5/3/6/12 kbps (2/4/8/16 codebooks); the bandwidth also selects its AdaLN
embedding.

``Vocos.from_pretrained`` and ``EncodecFeatures`` always download, so the network is built
here from its parts (same hyper-parameters as the released config) and weights are loaded
from a local path or the hub cache (see :mod:`unimoe.codecs.weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from encodec import EncodecModel
from torch import nn
from vocos import Vocos
from vocos.feature_extractors import EncodecFeatures
from vocos.heads import ISTFTHead
from vocos.models import VocosBackbone

from unimoe.codecs.base import AudioCodec, exact_length
from unimoe.codecs.encodec_codec import EncodecCodec, _bandwidth_codebooks
from unimoe.codecs.weights import ENCODEC_24KHZ_FILE, vocos_encodec_state_dict

__all__ = ["VocosCodec", "VOCOS_BANDWIDTHS", "build_vocos_encodec"]

VOCOS_BANDWIDTHS: dict[float, int] = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16}
"""kbps -> codebooks; the list order is Vocos' ``bandwidth_id``."""


class _SharedEncodecFeatures(EncodecFeatures):
    """Vocos' EnCodec feature extractor around an EnCodec model we already hold.

    The upstream constructor downloads EnCodec; this one takes the model, so offline and
    untrained builds work and the codebook table is the tokenizer's own.
    """

    def __init__(self, encodec: EncodecModel, bandwidths: list[float]) -> None:
        nn.Module.__init__(self)  # skip EncodecFeatures.__init__, which downloads
        self.encodec = encodec
        for param in self.encodec.parameters():
            param.requires_grad = False
        self.bandwidths = bandwidths
        self.num_q = encodec.quantizer.get_num_quantizers_for_bandwidth(encodec.frame_rate, bandwidth=max(bandwidths))
        books = [vq.codebook for vq in encodec.quantizer.vq.layers[: self.num_q]]  # num_q x [1024, 128]
        self.codebook_weights = nn.Parameter(torch.cat(books, dim=0).clone(), requires_grad=False)  # [num_q*1024, 128]


def build_vocos_encodec(encodec: EncodecModel, path: str | Path | None, pretrained: bool, seed: int = 0) -> Vocos:
    """Vocos with the released EnCodec-variant architecture, loaded or untrained (seeded)."""
    bandwidths = list(VOCOS_BANDWIDTHS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = _SharedEncodecFeatures(encodec, bandwidths)
        backbone = VocosBackbone(
            input_channels=128, dim=384, intermediate_dim=1152, num_layers=8, adanorm_num_embeddings=len(bandwidths)
        )
        head = ISTFTHead(dim=384, n_fft=1280, hop_length=320, padding="same")
        vocos = Vocos(features, backbone, head)
    if pretrained:
        state = dict(vocos_encodec_state_dict(path))
        # The release leaves EnCodec's own weights out of its file; they come from the tokenizer.
        state.update({f"feature_extractor.encodec.{k}": v for k, v in encodec.state_dict().items()})
        try:
            vocos.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"Vocos weights at {path or 'the hub cache'} do not match the EnCodec variant: {exc}") from exc
    return vocos.eval()


class VocosCodec(AudioCodec):
    """EnCodec 24 kHz tokens, Vocos decoder: ``wav [B, 1, S]`` <-> ``codes [B, C, ceil(S / 320)]``.

    Args:
        bandwidth: kbps, one of 1.5, 3, 6, 12 (-> 2, 4, 8, 16 codebooks).
        path: Vocos weights: ``pytorch_model.bin`` or a folder holding it (a snapshot of
            ``charactr/vocos-encodec-24khz``); without it the hub download (or cache) is used.
        encodec_path: EnCodec weights for the encoder side; defaults to ``path``'s folder
            when it holds ``encodec_24khz-d7cc33bc.th``, else EnCodec's own download/cache.
        pretrained: False builds both networks untrained (tests, offline smoke runs).
        seed: initialisation seed of the untrained networks.
    """

    sample_rate = 24_000
    hop_length = 320
    cardinality = 1024

    def __init__(
        self,
        bandwidth: float = 6.0,
        path: str | None = None,
        encodec_path: str | None = None,
        pretrained: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_codebooks = _bandwidth_codebooks(bandwidth, VOCOS_BANDWIDTHS, "vocos")
        self.bandwidth = float(bandwidth)
        self.bandwidth_id = list(VOCOS_BANDWIDTHS).index(self.bandwidth)
        self.pretrained = pretrained
        if encodec_path is None and path is not None and (Path(path) / ENCODEC_24KHZ_FILE).is_file():
            encodec_path = str(Path(path) / ENCODEC_24KHZ_FILE)
        self.tokenizer = EncodecCodec(bandwidth, path=encodec_path, pretrained=pretrained, seed=seed)
        self.vocos = build_vocos_encodec(self.tokenizer.model, path, pretrained, seed)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(wav)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.check_codes(codes)  # [B, C, T]
        features = self.vocos.codes_to_features(codes.transpose(0, 1))  # [B, 128, T]
        bandwidth_id = torch.tensor([self.bandwidth_id], device=codes.device)
        wav = self.vocos.decode(features, bandwidth_id=bandwidth_id)  # [B, T * 320]
        return exact_length(wav.unsqueeze(1), codes.shape[-1] * self.hop_length)

    def describe(self) -> dict:
        return {**super().describe(), "bandwidth_kbps": self.bandwidth, "pretrained": self.pretrained}
