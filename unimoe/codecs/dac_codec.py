"""``dac``: the Descript Audio Codec as a codec tokenizer (the codec UniMoE-Audio's release uses).

Variants (the released models):

==========  ===========  ====  ==========  ===================
variant     sample rate  hop   frames/s    codebooks x size
==========  ===========  ====  ==========  ===================
``16khz``   16 000       320   50          12 x 1024
``24khz``   24 000       320   75          32 x 1024
``44khz``   44 100       512   86.13       9 x 1024
==========  ===========  ====  ==========  ===================

``n_quantizers`` keeps the first N residual codebooks (DAC is trained with quantizer
dropout, so any prefix decodes). The network is unimoe's own (:mod:`unimoe.codecs.dac_model`);
weights come from a local original ``weights.pth`` or Hugging Face folder, or the hub
(:mod:`unimoe.codecs.dac_weights`). Encoding pads the clip on the right to whole frames, as
descript-audio-codec's ``preprocess`` does; there is no loudness normalisation (that belongs
to its file-compression API, not to ``encode``, and the UniMoE-Audio release does not use it).
"""

from __future__ import annotations

from pathlib import Path
import torch
import torch.nn.functional as F

from unimoe.codecs.base import AudioCodec, exact_length
from unimoe.codecs.dac_model import DAC_VARIANTS, DacNetwork
from unimoe.codecs.dac_weights import build_dac_network, load_dac_checkpoint, locate_dac_weights, release_of, weights_hint

__all__ = ["DacCodec", "DAC_VARIANT_ALIASES"]

DAC_VARIANT_ALIASES = {"16khz": "16khz", "24khz": "24khz", "44khz": "44khz", "44.1khz": "44khz"}


def _variant_name(variant: str | None) -> str | None:
    if variant is None:
        return None
    name = DAC_VARIANT_ALIASES.get(str(variant).strip().lower())
    if name is None:
        raise ValueError(f"dac: unknown variant {variant!r}; choose one of {', '.join(DAC_VARIANT_ALIASES)}")
    return name


class DacCodec(AudioCodec):
    """DAC: ``wav [B, 1, S]`` <-> ``codes [B, n_quantizers, ceil(S / hop)]``.

    Args:
        variant: ``16khz`` (default without a path), ``24khz`` or ``44khz``. With a ``path`` the
            architecture comes from the file; a variant given as well must match it.
        path: original ``weights*.pth`` (or a folder holding one), or a Hugging Face ``DacModel``
            folder (``config.json`` + ``model.safetensors``). Without it: descript-audio-codec's
            cache file, else the hub repo ``descript/dac_<variant>`` (cache or download).
        n_quantizers: codebooks to use (default: all the model has, 12 for 16 kHz).
        pretrained: False builds the variant's architecture untrained and seeded (tests, smoke runs).
        seed: initialisation seed of the untrained model.
    """

    def __init__(
        self,
        variant: str | None = None,
        path: str | None = None,
        n_quantizers: int | None = None,
        pretrained: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        requested = _variant_name(variant)
        if pretrained:
            release = requested or "16khz"
            source = Path(path) if path is not None else locate_dac_weights(release)
            arch, state, file = load_dac_checkpoint(source, hint=weights_hint(release))
            if requested is not None and arch.sample_rate != DAC_VARIANTS[requested].sample_rate:
                raise ValueError(
                    f"dac: variant {requested} works at {DAC_VARIANTS[requested].sample_rate} Hz but {file} holds a "
                    f"{arch.sample_rate} Hz model; drop `variant` or give the matching weights"
                )
            self.network = build_dac_network(arch, state, file)
        else:
            if path is not None:
                raise ValueError("dac: `path` names weights but `pretrained: false` asks for an untrained model; drop one")
            arch = DAC_VARIANTS[requested or "16khz"]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # reproducible, and the global RNG is left alone
                self.network = DacNetwork(arch).eval()
        n_quantizers = arch.n_codebooks if n_quantizers is None else n_quantizers
        if isinstance(n_quantizers, bool) or not isinstance(n_quantizers, int) or not 1 <= n_quantizers <= arch.n_codebooks:
            raise ValueError(f"dac: n_quantizers must be an integer in [1, {arch.n_codebooks}], got {n_quantizers!r}")
        self.arch = arch
        self.variant = release_of(arch) or "custom"
        self.pretrained = pretrained
        self.sample_rate = arch.sample_rate
        self.hop_length = arch.hop_length
        self.num_codebooks = n_quantizers
        self.cardinality = arch.codebook_size

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        wav = self.check_waveform(wav)  # [B, 1, S]
        num_frames = self.num_frames(wav.shape[-1])
        wav = F.pad(wav, (0, num_frames * self.hop_length - wav.shape[-1]))  # [B, 1, T * hop]
        dtype = self.network.encoder.conv1.weight.dtype
        return self.network.encode(wav.to(dtype), self.num_codebooks)  # [B, C, T]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.check_codes(codes)  # [B, C, T]
        wav = self.network.decode(codes)  # [B, 1, T * hop - (samples lost to odd strides)]
        return exact_length(wav, codes.shape[-1] * self.hop_length)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "variant": self.variant,
            "codebooks_available": self.arch.n_codebooks,
            "pretrained": self.pretrained,
        }
