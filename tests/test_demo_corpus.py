"""The offline demo corpus: real, non-silent audio, valid manifests, video that follows the music."""

import colorsys
import json
import random
import shutil

import numpy as np
import pytest
import soundfile as sf

from unimoe.data.demo.build import DemoConfig, DemoCorpusError, build_demo_corpus, plan
from unimoe.data.demo.music import choose_params
from unimoe.data.demo.video import MOOD_HUES, render_frames
from unimoe.data.manifest import read_manifest
from unimoe.data.video import load_video

pytestmark = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("fluidsynth")), reason="needs espeak-ng and fluidsynth (scripts/setup.sh)"
)

TINY = dict(speech_clips=14, t2m_clips=5, v2m_clips=2, music_test_clips=2, music_val_clips=1, speakers=2, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = build_demo_corpus(out, DemoConfig(**TINY), workers=2, progress=False)
    return out, report


def rms_db(x):
    return 20 * np.log10(np.sqrt(np.mean(np.square(x))) + 1e-12)


def test_manifests_valid_and_complete(corpus):
    out, report = corpus
    all_entries = read_manifest(out / "manifests" / "all.jsonl", check_files=True)
    assert len(all_entries) == 14 + (5 + 3) + (2 + 3)
    for task, n in (("tts", 14), ("t2m", 8), ("v2m", 5)):
        entries = read_manifest(out / "manifests" / f"{task}.jsonl", check_files=True)
        assert len(entries) == n and {e.task for e in entries} == {task}
    info = json.loads((out / "corpus.json").read_text())
    assert info["status"] == "complete" and info["counts"]["tts"]["train"] + info["counts"]["tts"]["val"] + info["counts"]["tts"]["test"] == 14
    # speakers with >= 6 clips get val and test utterances (2 each, so prompts exist); music one each
    tts = [e for e in all_entries if e.task == "tts"]
    assert {e.split for e in tts} == {"train", "val", "test"}
    assert {e.split for e in all_entries if e.task == "t2m"} == {"train", "val", "test"}
    assert len({e.text for e in tts}) == len(tts)  # transcripts differ


def test_speech_is_real_and_duration_fits_text(corpus):
    out, _ = corpus
    for e in read_manifest(out / "manifests" / "tts.jsonl"):
        wav, sr = sf.read(e.audio)
        assert sr == 24000 and wav.ndim == 1
        assert rms_db(wav) > -35, f"{e.id} is (nearly) silent"
        seconds = len(wav) / sr
        assert seconds == pytest.approx(e.duration, abs=1e-3)
        # espeak-ng reads at meta.speed words per minute: the clip length must match the text
        expected = len(e.text.split()) / (e.meta["speed"] / 60.0)
        assert 0.5 * expected < seconds < 2.0 * expected + 0.5, (e.text, seconds, expected)
        assert 0.8 < seconds < 5.0
        # voice cloning prompt: same speaker, same split, another utterance
        assert e.prompt_audio and e.prompt_audio != e.audio
        assert f"/{e.speaker}/" in e.prompt_audio


def test_music_is_real_and_matches_its_parameters(corpus):
    out, _ = corpus
    for e in read_manifest(out / "manifests" / "all.jsonl"):
        if e.task == "tts":
            continue
        wav, sr = sf.read(e.audio)
        assert sr == 24000 and rms_db(wav) > -35
        m = e.meta
        composed = m["bars"] * m["beats_per_bar"] * 60.0 / m["tempo"]
        assert 4.0 <= composed <= 8.0
        assert composed < len(wav) / sr <= composed + 0.61
        # the caption states what was composed
        assert m["key"] in e.text or f"{m['mode']}-key" in e.text
        assert (str(m["tempo"]) in e.text) or (m["key"] in e.text)
        assert (out / "music" / f"{e.id}.mid").is_file()


def test_video_pairs_with_music(corpus):
    out, _ = corpus
    for e in read_manifest(out / "manifests" / "v2m.jsonl"):
        frames, fps = load_video(e.video)
        assert fps == 8.0 and frames.shape[1:] == (32, 32, 3) and frames.dtype == np.uint8
        assert abs(frames.shape[0] - e.duration * fps) <= 1
        assert np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() > 1.0  # it moves


@pytest.mark.parametrize("tempo", [64, 96, 150])
def test_video_motion_follows_tempo(tempo):
    params = choose_params(random.Random(3), mood="calm")
    params.tempo = tempo
    frames = render_frames(params, 40.0, fps=8.0).astype(np.float32)
    fg = (np.abs(frames - np.median(frames, axis=(1, 2), keepdims=True)).sum(-1) > 60).sum((1, 2))
    spectrum = np.abs(np.fft.rfft(fg - fg.mean()))
    freqs = np.fft.rfftfreq(len(fg), 1 / 8.0)
    peak = freqs[1:][np.argmax(spectrum[1:])]
    beat = tempo / 60.0
    assert min(abs(peak - beat), abs(peak - beat / params.beats_per_bar)) <= 0.03


@pytest.mark.parametrize("mood", sorted(MOOD_HUES))
def test_video_colour_follows_mood(mood):
    for seed in range(3):
        frames = render_frames(choose_params(random.Random(seed), mood=mood), 3.0).astype(np.float32) / 255
        v = frames.max(-1)
        hue = colorsys.rgb_to_hsv(*frames[v > np.quantile(v, 0.9)].mean(0))[0]
        dist = {m: min(abs(hue - h), 1 - abs(hue - h)) for m, (h, _) in MOOD_HUES.items()}
        assert min(dist, key=dist.get) == mood


def test_rerun_reuses_files_and_is_deterministic(corpus):
    out, first = corpus
    before = (out / "manifests" / "all.jsonl").read_text()
    leftover = out / "speech" / "spk000" / ".tts-spk000-00099.espeak-4242.wav"  # a killed run's temporary
    leftover.write_bytes(b"RIFF")
    again = build_demo_corpus(out, DemoConfig(**TINY), workers=2, progress=False)
    assert again.made == 0 and again.reused == 27
    assert not leftover.exists()
    assert (out / "manifests" / "all.jsonl").read_text() == before


def test_plan_depends_on_seed_only(tmp_path):
    a, _ = plan(DemoConfig(**TINY), tmp_path)
    b, _ = plan(DemoConfig(**TINY), tmp_path)
    c, _ = plan(DemoConfig(**{**TINY, "seed": 8}), tmp_path)
    assert [j.entry.text for j in a] == [j.entry.text for j in b]
    assert [j.entry.text for j in a] != [j.entry.text for j in c]


def test_other_settings_in_same_folder_refused(corpus):
    out, _ = corpus
    with pytest.raises(DemoCorpusError, match="seed"):
        build_demo_corpus(out, DemoConfig(**{**TINY, "seed": 9}), progress=False)


def test_default_size_keeps_speech_music_ratio():
    cfg = DemoConfig.scaled(1.0)
    assert cfg.speech_clips / (cfg.t2m_clips + cfg.v2m_clips) == pytest.approx(10, rel=0.15)
    big = DemoConfig.scaled(4.0)
    assert big.speech_clips == 4 * cfg.speech_clips and big.speakers == 2 * cfg.speakers


def test_music_test_split_is_added_on_top_of_an_unchanged_training_split(tmp_path):
    """The default corpus has >= 16 test pieces per music task (FAD/KL need sets) and 4 val
    pieces, while the train pieces are exactly those of a corpus without the extras."""
    _, music_jobs = plan(DemoConfig(), tmp_path)
    _, without = plan(DemoConfig(music_test_clips=0, music_val_clips=0), tmp_path)
    def by_split(jobs, split):
        return {j.entry.id: (j.entry.text, j.params.to_meta()) for j in jobs if j.entry.split == split}
    assert by_split(music_jobs, "train") == by_split(without, "train")
    assert by_split(without, "val").items() <= by_split(music_jobs, "val").items()
    for task in ("t2m", "v2m"):
        test = [j for j in music_jobs if j.entry.task == task and j.entry.split == "test"]
        assert len(test) >= 16
        assert sum(j.entry.task == task and j.entry.split == "val" for j in music_jobs) == 4
        assert len({j.entry.text for j in test}) == len(test)  # distinct pieces
    speech_jobs, _ = plan(DemoConfig(), tmp_path)
    speech_train = sum(j.entry.split == "train" for j in speech_jobs)
    music_train = sum(j.entry.split == "train" for j in music_jobs)
    assert speech_train / music_train == pytest.approx(10, rel=0.15)
    assert DemoConfig.scaled(2.0).music_test_clips == 32 and DemoConfig.scaled(0.5).music_test_clips == 16
