"""End to end, offline: demo corpus -> fitted spectral_rvq codec -> `unimoe tokenize` -> DataModule batches."""

import shutil

import pytest
import torch

from unimoe.cli import main as unimoe
from unimoe.codecs.spectral_rvq import SpectralRVQConfig, fit_spectral_rvq
from unimoe.data.datamodule import UniMoEDataModule
from unimoe.data.demo.build import DemoConfig, build_demo_corpus
from unimoe.data.index import open_index
from unimoe.data.shards import codec_record
from unimoe.model.config import AudioLMConfig

pytestmark = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("fluidsynth")), reason="needs espeak-ng and fluidsynth (scripts/setup.sh)"
)


def test_demo_corpus_to_batches(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    build_demo_corpus(corpus, DemoConfig(speech_clips=12, t2m_clips=5, v2m_clips=5, music_test_clips=0, music_val_clips=0,
                                         speakers=2, seed=3), workers=2, progress=False)
    codec = fit_spectral_rvq([corpus / "manifests" / "all.jsonl"], SpectralRVQConfig(num_codebooks=2, codebook_size=32),
                             max_frames=3000, kmeans_iters=3, progress=False)
    codec.save(tmp_path / "codec.pt")
    sources = {}
    for task in ("tts", "t2m", "v2m"):
        sources[task] = str(tmp_path / "shards" / task)
        assert unimoe(["tokenize", "--manifest", str(corpus / "manifests" / f"{task}.jsonl"), "--codec",
                       str(tmp_path / "codec.pt"), "--out", sources[task], "--workers", "1", "--quiet"]) == 0
    assert "0 reused" in capsys.readouterr().out
    index = open_index(sources["tts"])
    assert index.codec == codec_record(codec) and len(index) == 12  # every speech clip has a prompt

    model = AudioLMConfig.from_preset("tiny", num_codebooks=2, codebook_size=32, delays=[0, 1])
    dm = UniMoEDataModule(sources=sources, model=model, mix="balanced", max_tokens=1200, codec=codec_record(codec),
                          samples_per_epoch=120)
    dm.setup("fit")
    seen = set()
    for batch in dm.train_dataloader():
        assert batch.batch_size * batch.seq_len <= 1200
        seen |= set(batch.task_ids[:, 0].tolist())
        if batch.video is not None:
            assert batch.video.shape[1:] == (4, 3, 32, 32) and batch.video.dtype == torch.float32
    ids = dm.layout.task_ids  # standalone: the data's tasks in name order
    assert ids.names == ["t2m", "tts", "v2m"] and seen == {0, 1, 2}
    val = list(dm.val_dataloader())
    assert sum(b.batch_size for b in val) == 4 + 1 + 1  # 2 val utterances per speaker, 1 piece per music task
