"""``unimoe codec``: fit the embedded ``spectral_rvq`` codec on a corpus; round-trip a file.

    unimoe codec fit --audio DIR_OR_MANIFEST [...] --out codec.pt [--sample-rate 16000 ...]
    unimoe codec roundtrip --codec SPEC --in a.wav --out b.wav

``SPEC`` is a registered name (``encodec``), a JSON/YAML mapping
(``'{name: encodec, bandwidth: 12}'``) or the path of a fitted ``spectral_rvq`` file.
Both subcommands print JSON on stdout; progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


from unimoe.codecs.spec import parse_codec_spec

__all__ = ["main", "parse_codec_spec", "roundtrip"]


def roundtrip(codec: Any, source: Path, target: Path) -> dict[str, Any]:
    """Encode ``source`` with ``codec``, decode to ``target``; metrics against the (resampled) input."""
    import torch

    from unimoe.audio import load_audio, save_audio
    from unimoe.codecs.quality import quality_report

    reference, sample_rate = load_audio(source, sample_rate=codec.sample_rate, mono=True)  # [1, S]
    codes = codec.encode_file(source)  # [C, T]
    with torch.no_grad():
        decoded = codec.decode(codes.unsqueeze(0).to(codec.device))[0].cpu()  # [1, T * hop]
    decoded = decoded[:, : reference.shape[-1]]
    save_audio(target, decoded, sample_rate)
    frames = int(codes.shape[-1])
    return {
        "input": str(source),
        "output": str(target),
        "codec": codec.describe(),
        "num_frames": frames,
        "seconds": round(reference.shape[-1] / sample_rate, 3),
        "bitrate_kbps": round(codec.num_codebooks * math.log2(codec.cardinality) * codec.frame_rate / 1000, 3),
        "metrics": {k: round(v, 4) for k, v in quality_report(reference, decoded, sample_rate).items()},
    }


def _fit(args: argparse.Namespace) -> dict[str, Any]:
    from unimoe.codecs.spectral_rvq import SpectralRVQConfig, fit_spectral_rvq

    config = SpectralRVQConfig(
        sample_rate=args.sample_rate,
        hop_length=args.hop_length,
        n_fft=args.n_fft,
        n_mels=args.n_mels,
        num_codebooks=args.num_codebooks,
        codebook_size=args.codebook_size,
    )
    codec = fit_spectral_rvq(
        args.audio,
        config,
        max_frames=args.max_frames,
        kmeans_iters=args.kmeans_iters,
        seed=args.seed,
        progress=not args.no_progress,
    )
    codec.save(args.out)
    return {"out": str(args.out), "codec": codec.describe(), "fit": codec.fit_info}


def _roundtrip(args: argparse.Namespace) -> dict[str, Any]:
    from unimoe.registry import CODECS

    codec = CODECS.build(parse_codec_spec(args.codec)).to(args.device).eval()
    return roundtrip(codec, Path(args.input), Path(args.output))


def _parser() -> argparse.ArgumentParser:
    import inspect

    from unimoe.codecs.spectral_rvq import SpectralRVQConfig, fit_spectral_rvq

    defaults = SpectralRVQConfig()
    fit_defaults = {n: p.default for n, p in inspect.signature(fit_spectral_rvq).parameters.items()}
    parser = argparse.ArgumentParser(prog="unimoe codec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser(
        "fit",
        help="fit a spectral_rvq codec on audio folders / JSONL manifests",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fit.add_argument("--audio", nargs="+", required=True, help="audio folders, JSONL manifests (\"audio\" key) or files")
    fit.add_argument("--out", type=Path, required=True, help="codec file to write (e.g. codec.pt)")
    fit.add_argument("--sample-rate", type=int, default=defaults.sample_rate)
    fit.add_argument("--hop-length", type=int, default=defaults.hop_length, help="samples per frame")
    fit.add_argument("--n-fft", type=int, default=defaults.n_fft, help="analysis window (samples)")
    fit.add_argument("--n-mels", type=int, default=defaults.n_mels)
    fit.add_argument("--num-codebooks", type=int, default=defaults.num_codebooks)
    fit.add_argument("--codebook-size", type=int, default=defaults.codebook_size)
    fit.add_argument("--max-frames", type=int, default=fit_defaults["max_frames"], help="cap on frames sampled for k-means")
    fit.add_argument("--kmeans-iters", type=int, default=fit_defaults["kmeans_iters"], help="Lloyd iterations per codebook")
    fit.add_argument("--seed", type=int, default=fit_defaults["seed"])
    fit.add_argument("--no-progress", action="store_true", help="no progress bars")
    fit.set_defaults(handler=_fit)

    rt = sub.add_parser("roundtrip", help="encode + decode one file and print quality metrics")
    rt.add_argument("--codec", required=True, help="codec name, JSON/YAML spec, or a spectral_rvq file")
    rt.add_argument("--in", dest="input", required=True, help="input audio file (any rate / channels)")
    rt.add_argument("--out", dest="output", required=True, help="decoded WAV to write")
    rt.add_argument("--device", default="cpu")
    rt.set_defaults(handler=_roundtrip)
    return parser


def main(argv: list[str] | None = None) -> int:
    from unimoe.audio import AudioFileError
    from unimoe.codecs.spectral_rvq import CodecFileError
    from unimoe.codecs.weights import CodecWeightsError
    from unimoe.registry import RegistryError

    args = _parser().parse_args(argv)
    try:
        result = args.handler(args)
    except (AudioFileError, CodecFileError, CodecWeightsError, RegistryError, ValueError) as exc:
        print(f"unimoe codec {args.command}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0
