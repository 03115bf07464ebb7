"""Tokenisation to shards: content, skip reasons, codec check, kill-and-resume, atomic shards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from unimoe.codecs.base import AudioCodec
from unimoe.data.manifest import ManifestEntry, ManifestError, write_manifest
from unimoe.data.index import open_index as read_index
from unimoe.data.shards import CodecMismatchError, ShardError, codec_record, compare_codecs, load_shard
from unimoe.data.tokenize import TokenizeConfig, tokenize_manifest

SR = 16000
TESTS_DIR = Path(__file__).parent


class FrameEnergyCodec(AudioCodec):
    """A tiny real codec for tests: per-frame log energy and zero-crossing rate, quantised.

    Deterministic and input-dependent (so shards can be checked against it), with an
    optional per-call delay to make kill-mid-run tests reliable.
    """

    def __init__(self, sample_rate: int = SR, hop_length: int = 320, cardinality: int = 64, delay_s: float = 0.0,
                 gain: float = 1.0):
        super().__init__()
        self.sample_rate, self.hop_length, self.num_codebooks, self.cardinality = sample_rate, hop_length, 2, cardinality
        self.delay_s = delay_s
        self.register_buffer("gain", torch.tensor(float(gain)))  # a "weight": not in describe()

    def encode(self, wav):
        if self.delay_s:
            time.sleep(self.delay_s)
        B, _, S = wav.shape
        T = self.num_frames(S)
        x = self.gain * torch.nn.functional.pad(wav[:, 0], (0, T * self.hop_length - S)).view(B, T, self.hop_length)
        energy = (10 * torch.log10(x.pow(2).mean(-1) + 1e-10) + 100) / 100  # ~[0, 1]
        zcr = (x[..., 1:].sign() != x[..., :-1].sign()).float().mean(-1)
        q = lambda v: (v.clamp(0, 1) * (self.cardinality - 1)).round().long()
        return torch.stack([q(energy), q(zcr)], dim=1)

    def decode(self, codes):
        energy = codes[:, 0].float() / (self.cardinality - 1) * 100 - 100
        amp = torch.sqrt(10 ** (energy / 10)).repeat_interleave(self.hop_length, -1)
        return (amp * torch.randn_like(amp)).unsqueeze(1)

    def describe(self):
        return {**super().describe(), "delay_free_version": 1}


CODEC_SPEC = {"class_path": "test_tokenize.FrameEnergyCodec", "init_args": {}}


def tone(path, seconds, freq=220.0, amp=0.3, sr=SR):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    sf.write(str(path), amp * np.sin(2 * np.pi * freq * t), sr)
    return str(path)


def small_corpus(root: Path, n_speech: int = 12) -> Path:
    entries = []
    for i in range(n_speech):
        spk = f"s{i % 2}"
        entries.append(ManifestEntry(id=f"u{i}", task="tts", audio=tone(root / f"u{i}.wav", 0.6 + 0.1 * i, 150 + 40 * i),
                                     text=f"utterance {i}", speaker=spk, split="val" if i == 5 else "train"))
    for i, e in enumerate(entries):  # prompt: the next utterance of the same speaker
        e.prompt_audio = entries[(i + 2) % n_speech].audio
        e.prompt_text = entries[(i + 2) % n_speech].text
    return write_manifest(root / "m.jsonl", entries)


def read_all(out: Path) -> dict:
    """Every shard's items by id (tensors as lists), for run-to-run comparison."""
    items = {}
    for path in sorted(out.glob("shard-*.pt")):
        payload = load_shard(path, mmap=False)
        for item in payload["items"]:
            items[item["id"]] = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in item.items()}
        for s in payload["skipped"]:
            items[s["id"]] = s
    return items


def test_shard_content_matches_the_codec_and_skips_are_explained(tmp_path):
    codec = FrameEnergyCodec()
    a = tone(tmp_path / "a.wav", 1.0, 300)
    b = tone(tmp_path / "b.wav", 4.0, 500, sr=22050)  # resampled to the codec rate
    video = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "v.npy", video)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF....not audio")
    entries = [
        ManifestEntry(id="ok", task="tts", audio=a, text="hi", speaker="s", prompt_audio=b, prompt_text="prompt"),
        ManifestEntry(id="music", task="v2m", audio=b, text="a song", video=str(tmp_path / "v.npy"), split="test"),
        ManifestEntry(id="silent", task="t2m", audio=tone(tmp_path / "s.wav", 1.0, amp=0.0), text="x"),
        ManifestEntry(id="short", task="t2m", audio=tone(tmp_path / "short.wav", 0.1), text="x"),
        ManifestEntry(id="long", task="t2m", audio=tone(tmp_path / "long.wav", 6.0), text="x"),
        ManifestEntry(id="gone", task="t2m", audio=str(tmp_path / "missing.wav"), text="x"),
        ManifestEntry(id="corrupt", task="t2m", audio=str(tmp_path / "corrupt.wav"), text="x"),
        ManifestEntry(id="noprompt", task="tts", audio=a, text="hi", speaker="s"),
        ManifestEntry(id="badprompt", task="tts", audio=a, text="hi", speaker="s", prompt_audio=str(tmp_path / "missing.wav")),
        ManifestEntry(id="badvideo", task="v2m", audio=a, text="x", video=str(tmp_path / "missing.npy")),
    ]
    m = write_manifest(tmp_path / "m.jsonl", entries)
    cfg = TokenizeConfig(shard_size=4, min_seconds=0.3, max_seconds=5.0, prompt_max_seconds=2.0)
    report = tokenize_manifest(m, codec, tmp_path / "out", config=cfg, progress=False)
    assert report.shards == 3 and report.items == 2
    reasons = {s["id"]: s["reason"] for s in report.skipped}
    assert reasons == {"silent": "silent", "short": "too short", "long": "too long", "gone": "unreadable",
                       "corrupt": "unreadable", "noprompt": "missing prompt", "badprompt": "unusable prompt",
                       "badvideo": "unusable video"}
    skipped_file = [json.loads(l) for l in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert {s["id"]: s["line"] for s in skipped_file}["gone"] == 6  # manifest line numbers

    items = {i["id"]: i for p in sorted((tmp_path / "out").glob("shard-*.pt")) for i in load_shard(p)["items"]}
    ok, music = items["ok"], items["music"]
    assert torch.equal(ok["codes"].long(), codec.encode_file(a))
    wav_b, _ = sf.read(b)
    import torchaudio.functional as AF
    prompt_ref = AF.resample(torch.tensor(wav_b, dtype=torch.float32)[None], 22050, SR)[:, : 2 * SR]
    assert torch.equal(ok["prompt_codes"].long(), codec.encode(prompt_ref[None])[0])
    assert ok["prompt_codes"].shape[-1] == 100  # 2 s at 50 frames/s
    assert ok["text"] == "hi" and ok["prompt_text"] == "prompt" and ok["speaker"] == "s" and ok["line"] == 1
    assert music["codes"].shape == (2, 200) and music["split"] == "test" and music["prompt_codes"] is None
    assert torch.equal(music["video"], torch.from_numpy(video).permute(0, 3, 1, 2))

    index = read_index(tmp_path / "out")
    assert index.codec == codec_record(codec) and len(index) == 2
    assert {k: v for k, v in index.codec.items() if k != "weights_sha256"} == codec.describe()
    assert index.values("id") == ["ok", "music"] and index.values("frames") == [50, 200]
    assert index.values("prompt_frames") == [100, 0] and index.values("video_frames") == [0, 5]
    assert load_shard(tmp_path / "out" / "shard-00000.pt")["codec"] == codec_record(codec)


def test_changed_codec_or_settings_refused_on_resume(tmp_path):
    m = small_corpus(tmp_path)
    tokenize_manifest(m, FrameEnergyCodec(), tmp_path / "out", config=TokenizeConfig(shard_size=5), progress=False)
    with pytest.raises(ShardError, match="another codec"):
        tokenize_manifest(m, FrameEnergyCodec(hop_length=160), tmp_path / "out", config=TokenizeConfig(shard_size=5), progress=False)
    with pytest.raises(ShardError, match="another settings"):
        tokenize_manifest(m, FrameEnergyCodec(), tmp_path / "out", config=TokenizeConfig(shard_size=4), progress=False)
    # same describe(), other weights (e.g. a codec re-fitted on other data): still another codec
    with pytest.raises(ShardError, match="another codec"):
        tokenize_manifest(m, FrameEnergyCodec(gain=2.0), tmp_path / "out", config=TokenizeConfig(shard_size=5), progress=False)
    index = read_index(tmp_path / "out")
    compare_codecs(index.codec, FrameEnergyCodec(gain=2.0).describe(), "x")  # describe() alone cannot tell
    with pytest.raises(CodecMismatchError, match="weights_sha256"):
        compare_codecs(index.codec, codec_record(FrameEnergyCodec(gain=2.0)), "x")
    # with overwrite the shards are redone for the new codec
    report = tokenize_manifest(m, FrameEnergyCodec(hop_length=160), tmp_path / "out", config=TokenizeConfig(shard_size=5),
                               overwrite=True, progress=False)
    assert report.encoded == 3 and read_index(tmp_path / "out").codec["hop_length"] == 160


def test_bad_manifest_is_refused_with_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "task": "tts", "audio": "a.wav", "text": "x", "duration": -1}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: field 'duration'"):
        tokenize_manifest(tmp_path / "m.jsonl", FrameEnergyCodec(), tmp_path / "out", progress=False)


def _cli(manifest, out, codec_args, workers=1):
    spec = json.dumps({"class_path": "test_tokenize.FrameEnergyCodec", "init_args": codec_args})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "unimoe", "tokenize", "--manifest", str(manifest), "--codec", spec, "--out", str(out),
           "--shard-size", "2", "--workers", str(workers), "--quiet"]
    return cmd, env


def test_kill_and_resume_gives_identical_shards(tmp_path):
    m = small_corpus(tmp_path)  # 12 lines -> 6 shards of 2
    reference = tmp_path / "reference"
    tokenize_manifest(m, FrameEnergyCodec(), reference, config=TokenizeConfig(shard_size=2), progress=False)

    out = tmp_path / "killed"
    cmd, env = _cli(m, out, {"delay_s": 0.15})  # ~0.6 s per shard (target + prompt per item)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 60
    while len(list(out.glob("shard-*.pt"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("shard-*.pt"))
    assert 2 <= len(finished) < 6, "the run was not interrupted mid-way"
    assert not (out / "index").exists()
    with pytest.raises(ShardError, match="did not finish"):
        read_index(out)
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}

    cmd, env = _cli(m, out, {"delay_s": 0.15})
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{6 - len(finished)} encoded, {len(finished)} reused" in done.stdout
    for name, stamp in stamps.items():  # finished shards were not re-encoded
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp
    assert read_all(out) == read_all(reference)
    ref_index, index = read_index(reference), read_index(out)
    assert [index.row(i) for i in range(len(index))] == [ref_index.row(i) for i in range(len(ref_index))]
    assert not list(out.glob(".shard-*"))


def test_half_written_and_corrupt_shards_are_never_read(tmp_path):
    m = small_corpus(tmp_path)
    cfg = TokenizeConfig(shard_size=3)
    tokenize_manifest(m, FrameEnergyCodec(), tmp_path / "ref", config=cfg, progress=False)
    out = tmp_path / "out"
    tokenize_manifest(m, FrameEnergyCodec(), out, config=cfg, progress=False)
    good = (out / "shard-00001.pt").read_bytes()
    # a killed run's leftovers: a half-written temp file, and (disk trouble) a truncated final shard
    (out / ".shard-00002.pt.tmp-12345").write_bytes(good[: len(good) // 2])
    (out / "shard-00003.pt").write_bytes(good[: len(good) // 3])
    (out / "shard-00002.pt").unlink()
    shutil.rmtree(out / "index")
    report = tokenize_manifest(m, FrameEnergyCodec(), out, config=cfg, progress=False)
    assert report.encoded == 2 and report.reused == 2
    assert not list(out.glob(".shard-*"))
    assert read_all(out) == read_all(tmp_path / "ref")
    with pytest.raises(ShardError, match="corrupt"):
        (tmp_path / "bad.pt").write_bytes(good[:100])
        load_shard(tmp_path / "bad.pt")


def test_worker_processes_match_single_process(tmp_path):
    m = small_corpus(tmp_path)
    tokenize_manifest(m, FrameEnergyCodec(), tmp_path / "one", config=TokenizeConfig(shard_size=3), progress=False)
    sys.path.insert(0, str(TESTS_DIR))  # the spawned workers import the test codec by name
    try:
        report = tokenize_manifest(m, CODEC_SPEC, tmp_path / "two", config=TokenizeConfig(shard_size=3), workers=2, progress=False)
    finally:
        sys.path.remove(str(TESTS_DIR))
    assert report.encoded == 4
    assert read_all(tmp_path / "one") == read_all(tmp_path / "two")


def test_split_filter(tmp_path):
    m = small_corpus(tmp_path)
    report = tokenize_manifest(m, FrameEnergyCodec(), tmp_path / "val", config=TokenizeConfig(splits=("val",)), progress=False)
    assert report.items == 1 and read_index(tmp_path / "val").values("id") == ["u5"]
