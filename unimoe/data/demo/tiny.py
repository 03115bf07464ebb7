"""A tiny, complete data root (corpus, fitted codec, shards) for tests and fault injection.

Layout (the data-root contract of the demo recipes): ``corpus/``, ``codec.pt``,
``shards/{tts,t2m,v2m}``: 24 speech clips of 2 voices, 6 + 5 music clips, a 4 x 16
spectral_rvq codec at 25 frames/s. About 20 s on one core; built once per folder.
"""

from __future__ import annotations

from pathlib import Path

READY = "READY"


def build_tiny_data(root: str | Path) -> Path:
    """Build the data root under ``root`` unless ``root/READY`` says it is complete."""
    root = Path(root)
    if (root / READY).exists():
        return root
    from unimoe.atomic import write_text_atomic
    from unimoe.codecs.spectral_rvq import SpectralRVQConfig, fit_spectral_rvq
    from unimoe.data.demo.build import DemoConfig, build_demo_corpus
    from unimoe.data.tokenize import tokenize_manifest

    cfg = DemoConfig(speech_clips=24, t2m_clips=6, v2m_clips=5, speakers=2, speech_max_seconds=2.5,
                     music_min_seconds=2.0, music_max_seconds=3.0, music_test_clips=0, music_val_clips=1)
    build_demo_corpus(root / "corpus", cfg, progress=False)
    codec_cfg = SpectralRVQConfig(hop_length=640, n_fft=1280, n_mels=40, num_codebooks=4, codebook_size=16)
    codec = fit_spectral_rvq([root / "corpus" / "manifests" / "all.jsonl"], codec_cfg, max_frames=3000,
                             kmeans_iters=3, progress=False)
    codec.save(root / "codec.pt")
    for task in ("tts", "t2m", "v2m"):
        tokenize_manifest(root / "corpus" / "manifests" / f"{task}.jsonl",
                          {"name": "spectral_rvq", "path": str(root / "codec.pt")}, root / "shards" / task,
                          progress=False)
    write_text_atomic(root / READY, "ok")
    return root
