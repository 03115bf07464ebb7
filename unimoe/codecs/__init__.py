"""Codec tokenizers: waveform <-> parallel streams of discrete tokens.

The built-in codecs (entry points in ``unimoe.codecs``, resolved by :data:`unimoe.registry.CODECS`):

* ``encodec``      - Meta's EnCodec 24 kHz (pretrained weights from a local path or download)
* ``vocos``        - EnCodec tokens decoded by Vocos (same weight rules)
* ``dac``          - Descript Audio Codec 16 / 24 / 44.1 kHz (original or Hugging Face weights, local or hub)
* ``spectral_rvq`` - the embedded offline codec fitted on your corpus (no downloads)

Build one with ``CODECS.build({"name": "encodec", "bandwidth": 6.0})``; see ``docs/codecs.md``.
"""

from unimoe.codecs.base import AudioCodec
from unimoe.codecs.dac_codec import DacCodec
from unimoe.codecs.encodec_codec import ENCODEC_BANDWIDTHS, EncodecCodec
from unimoe.codecs.spectral_rvq import CodecFileError, SpectralRVQCodec, SpectralRVQConfig, fit_spectral_rvq
from unimoe.codecs.vocos_codec import VOCOS_BANDWIDTHS, VocosCodec
from unimoe.codecs.weights import CodecWeightsError

__all__ = [
    "AudioCodec",
    "EncodecCodec",
    "VocosCodec",
    "DacCodec",
    "SpectralRVQCodec",
    "SpectralRVQConfig",
    "fit_spectral_rvq",
    "CodecWeightsError",
    "CodecFileError",
    "ENCODEC_BANDWIDTHS",
    "VOCOS_BANDWIDTHS",
]
