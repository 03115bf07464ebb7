"""The aiSFX backend (the demo suite's FAD embedding and KL classifier).

References: aiSFX's own inference code (its librosa spectrogram, blocking and model
classes; run here with the weights our weights-only loader read), librosa's mel filters,
and real audio from the demo corpus synthesisers (espeak-ng speech, fluidsynth music).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from unimoe.evaluation.backends import aisfx_model
from unimoe.evaluation.clips import ClipPolicy, load_clip
from unimoe.evaluation.errors import BackendUnavailableError, EvaluationError
from unimoe.evaluation.manifest import EvalItem
from unimoe.evaluation.runner import evaluate_items
from unimoe.evaluation.suite import parse_suite
from unimoe.registry import METRICS

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("aisfx") is None,
                       reason="aisfx not installed (scripts/setup.sh: pip install --no-deps aisfx==0.1.2)"),
    pytest.mark.usefixtures("single_thread"),
]
needs_synth = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("fluidsynth")),
                                 reason="needs espeak-ng and fluidsynth (scripts/setup.sh)")


@pytest.fixture(scope="module")
def backend():
    return METRICS.build({"name": "aisfx", "device": "cpu"})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real speech and music from the demo corpus builder: 24 utterances of 4 voices and
    32 pieces of 6-8 s (t2m, so all of them are 'music'), built in a few seconds."""
    if not (shutil.which("espeak-ng") and shutil.which("fluidsynth")):
        pytest.skip("needs espeak-ng and fluidsynth")
    from unimoe.data.demo.build import DemoConfig, build_demo_corpus

    cfg = DemoConfig(speech_clips=24, t2m_clips=32, v2m_clips=0, music_test_clips=0, music_val_clips=0, speakers=4, seed=11,
                     music_min_seconds=6.0, music_max_seconds=8.0)
    report = build_demo_corpus(tmp_path_factory.mktemp("aisfx-corpus"), cfg, workers=2, progress=False)
    return {"speech": [Path(e.audio) for e in report.entries if e.task == "tts"],
            "music": [Path(e.audio) for e in report.entries if e.task == "t2m"]}


def _as_44k(path: Path, out: Path) -> Path:
    """The clip resampled to 44.1 kHz once, so both implementations read identical samples."""
    wav = load_clip(path, aisfx_model.SAMPLE_RATE, ClipPolicy())
    sf.write(str(out), wav, aisfx_model.SAMPLE_RATE, subtype="FLOAT")
    return out


# ------------------------------------------------------------------ loading the weights safely
def test_checkpoint_loads_with_weights_only_and_a_three_name_allow_list():
    weights, heads = aisfx_model.load_checkpoint(aisfx_model.packaged_checkpoint())
    assert len(weights) == 102 and all(isinstance(v, torch.Tensor) for v in weights.values())
    assert sum(v.numel() for k, v in weights.items() if not k.endswith("num_batches_tracked")) == 6_216_762
    assert heads["prosfx"] == (0, 78) and len(heads) == 9
    assert all(type(i) is int and type(c) is int for i, c in heads.values())  # numpy scalars converted
    # without the allow-list, torch's weights-only unpickler refuses the file (the trap)
    with pytest.raises(Exception, match="numpy.core.multiarray.scalar"):
        torch.load(aisfx_model.packaged_checkpoint(), map_location="cpu", weights_only=True)


class _RunsCode:
    def __reduce__(self):  # a malicious checkpoint: unpickling would call os.system
        return (os.system, ("touch " + str(self.marker),))


def test_a_checkpoint_that_would_run_code_or_is_broken_is_refused(tmp_path):
    payload = _RunsCode()
    payload.marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save(({"w": torch.zeros(1)}, {"prosfx": (0, 3)}, payload), evil)
    with pytest.raises(BackendUnavailableError, match=r"could not load the aiSFX checkpoint .*evil\.pth"):
        aisfx_model.load_checkpoint(evil)
    assert not payload.marker.exists()
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(BackendUnavailableError, match="corrupt.pth"):
        aisfx_model.load_checkpoint(corrupt)
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    with pytest.raises(BackendUnavailableError, match="expected a \\(state_dict, datasets\\) pair"):
        aisfx_model.load_checkpoint(plain)
    wrong = tmp_path / "wrong.pth"
    torch.save(({"w": torch.zeros(1)}, {"prosfx": (0, 3)}), wrong)
    with pytest.raises(BackendUnavailableError, match="does not match the aiSFX architecture"):
        METRICS.build({"name": "aisfx", "checkpoint": str(wrong)})
    with pytest.raises(BackendUnavailableError, match="not found"):
        METRICS.build({"name": "aisfx", "checkpoint": str(tmp_path / "none.pth")})


def test_missing_package_and_bad_options_are_clear_errors(monkeypatch):
    with pytest.raises(EvaluationError, match="unknown head 'musicgenres'.*prosfx"):
        METRICS.build({"name": "aisfx", "head": "musicgenres"})
    with pytest.raises(EvaluationError, match="hop must be in"):
        METRICS.build({"name": "aisfx", "hop": 0})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aisfx" else real(name, *a))
    with pytest.raises(BackendUnavailableError, match=r"pip install --no-deps aisfx==0\.1\.2"):
        METRICS.build("aisfx")


# ------------------------------------------------------------------ against aiSFX's own code
def test_mel_filters_equal_librosa_htk_unit_sum_filters():
    import librosa

    expected = librosa.filters.mel(sr=44100, n_fft=2048, n_mels=96, fmin=0.0, fmax=22050.0, htk=True, norm=1.0)
    np.testing.assert_allclose(aisfx_model.AisfxMel().fbank.T.numpy(), expected, rtol=1e-3, atol=1e-6)  # float32 edges


@pytest.mark.parametrize("frames", [60, 99, 100, 101, 149, 150, 151, 260, 347])
def test_blocks_equal_aisfx_blocking(frames):
    from aisfx.preprocessing import blocking

    spec = np.random.default_rng(frames).random((frames, 96)).astype(np.float32)
    expected = blocking(spec, block_size=100, hop_size=50, drop_partial_block=True)
    np.testing.assert_array_equal(aisfx_model.blocks(torch.from_numpy(spec), hop=0.5).numpy(), expected)


@needs_synth
def test_embeddings_and_posteriors_equal_aisfx_inference_on_speech_and_music(backend, corpus, tmp_path):
    """aiSFX's own pipeline (librosa.load + its librosa spectrogram, transposed - the package
    forgets - then its normalisation, blocking and CrossNet) on the same 44.1 kHz files."""
    try:
        import librosa
        from aisfx import inference, preprocessing
        from aisfx.models.cnn2d import CrossNet, EmbeddingNet
        from aisfx.spectrogram import spectrogram_librosa
    except ImportError as exc:  # its inference module needs tqdm / librosa
        pytest.skip(f"aisfx's own inference code cannot run here: {exc}")
    weights, heads = aisfx_model.load_checkpoint(aisfx_model.packaged_checkpoint())
    reference = CrossNet(EmbeddingNet("max", 3, 1, 64), heads, "cpu")
    reference.load_state_dict(weights)
    reference.eval()
    for name, path in (("speech", corpus["speech"][0]), ("music", corpus["music"][0])):
        clip = _as_44k(path, tmp_path / f"{name}.wav")
        spec = spectrogram_librosa.compute_spectrogram(str(clip), 44100.0, 2048, 1024, 96, 0.0, 22050.0).T
        spec = preprocessing.spectrogram_normalize(spec)
        expected = inference.model_get_embedding(spec, 0.5, True, reference, "cpu").numpy()
        wav = librosa.load(str(clip), sr=44100)[0]
        got = backend.embed_frames(wav)
        assert got.shape == expected.shape and got.shape[1] == 512
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            blocks = torch.from_numpy(preprocessing.blocking(spec, 100, 50, True)).float()
            _, logits = reference(blocks, "prosfx")  # per-block logits of the prosfx head
        mean_posterior = torch.softmax(logits.double(), dim=-1).mean(0).numpy()
        np.testing.assert_allclose(np.exp(backend.class_logits(wav)), mean_posterior, rtol=1e-3, atol=1e-6)
    assert expected.shape[0] >= 4  # the music clip spans several blocks


# ------------------------------------------------------------------ FAD and KL mean something
def _items(paths: list[Path], task: str = "t2m", refs: list[Path] | None = None) -> list[EvalItem]:
    return [EvalItem(id=f"{task}-{i}", audio=p, task=task, reference_audio=refs[i] if refs else None)
            for i, p in enumerate(paths)]


def _fad(backend_name: str, generated: list[Path], reference: list[Path]) -> float:
    suite = parse_suite({"name": "fad", "metrics": [{"metric": "fad", "backend": backend_name}]})
    (result,) = evaluate_items(suite, _items(generated), reference_set=reference, log=lambda m: None)
    return result.value


@needs_synth
@pytest.mark.parametrize("backend_name", ["aisfx", "mel_stats"])
def test_fad_separates_speech_from_music_and_is_near_zero_between_halves_of_one_set(backend_name, corpus):
    """At equal set sizes (FAD is biased upwards for small sets, so sizes must match), two
    halves of the same music are far closer than speech is to music."""
    music, speech = corpus["music"], corpus["speech"]
    half_a, half_b = music[0::2], music[1::2]  # 16 pieces each, same generator settings
    within = _fad(backend_name, half_a, half_b)
    across = _fad(backend_name, speech[:16], half_b)
    assert _fad(backend_name, half_a, half_a) == pytest.approx(0.0, abs=1e-6)
    assert within < 0.3 * across, (within, across)
    speech_halves = _fad(backend_name, speech[0::2], speech[1::2])
    assert speech_halves < 0.6 * _fad(backend_name, speech[0::2], music[:12]), speech_halves


@needs_synth
def test_kl_is_zero_for_identical_clips_and_larger_for_speech_than_for_other_music(corpus):
    music, speech = corpus["music"], corpus["speech"]
    suite = parse_suite({"name": "kl", "metrics": [{"metric": "kl", "backend": "aisfx"}]})

    def kl(generated: list[Path], references: list[Path]) -> float:
        (result,) = evaluate_items(suite, _items(generated, refs=references), log=lambda m: None)
        return result.value

    refs = music[:8]
    assert kl(refs, refs) == pytest.approx(0.0, abs=1e-4)
    other_music, speech_clips = kl(music[8:16], refs), kl(speech[:8], refs)
    assert speech_clips > 2 * other_music, (speech_clips, other_music)
