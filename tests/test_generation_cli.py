"""``unimoe generate`` end to end on a tiny random checkpoint with a saved spectral_rvq codec, the
evaluation seam, and the errors a user sees for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from generation_helpers import HOP, SR, write_checkpoint

from unimoe.commands.generate import main
from unimoe.evaluation.runner import Generator as GeneratorProtocol
from unimoe.evaluation.runner import load_checkpoint_generator
from unimoe.generation import build_generator

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["--max-seconds", "0.08", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


def tone(path, seconds: float, sr: int) -> str:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32), sr)
    return str(path)


def test_single_request_writes_wav_and_sidecar(ckpt, tmp_path, capsys):
    prompt = tone(tmp_path / "ref.wav", 0.5, 22050)  # another sample rate, longer than the limit below
    out = tmp_path / "out"
    rc = main(["--ckpt", str(ckpt), "--task", "tts", "--text", "hello there", "--prompt-audio", prompt,
               "--prompt-text", "hi", "--max-prompt-seconds", "0.2", "--id", "greeting", "--out", str(out),
               "--temperature", "1.0,0.9,0.9,0.8", "--top-k", "8", "--cfg-scale", "2.5", *FAST])
    assert rc == 0, capsys.readouterr().err
    wav, sr = sf.read(out / "greeting.wav")
    meta = json.loads((out / "greeting.json").read_text())
    assert sr == SR and len(wav) == meta["frames"] * HOP and 1 <= meta["frames"] <= 8
    assert meta["seed"] == 3 and meta["settings"]["cfg_scale"] == 2.5 and meta["settings"]["top_k"] == 8
    assert meta["settings"]["temperature"] == [1.0, 0.9, 0.9, 0.8]
    assert meta["duration"] == pytest.approx(len(wav) / SR)
    assert meta["prompt_trimmed_from"] == pytest.approx(0.5) and meta["prompt_seconds"] == pytest.approx(0.2)
    assert meta["prompt_frames"] == 20 and meta["prompt_sample_rate"] == 22050
    assert meta["checkpoint"] == str(ckpt) and meta["codec"]["name"] == "spectral_rvq"
    assert meta["codec_description"]["num_codebooks"] == 4
    assert meta["real_time_factor"] > 0 and meta["stop_reason"] in ("eos", "max_frames")
    assert 0 <= meta["activated_experts_per_token"] <= 4 and len(meta["activated_experts_per_layer"]) == 2
    manifest = [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]
    assert manifest == [{"id": "greeting", "task": "tts", "audio": "greeting.wav", "duration": meta["duration"],
                         "text": "hello there"}]
    assert "greeting\ttts" in capsys.readouterr().out


def test_batch_requests_all_tasks(ckpt, tmp_path):
    tone(tmp_path / "ref.flac", 0.3, 16000)
    frames = (np.random.default_rng(0).random((5, 24, 24, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "clip.npz", frames=frames, fps=8.0)
    np.save(tmp_path / "clip.npy", frames)
    lines = [
        {"id": "s/1", "task": "tts", "text": "one two three", "prompt_audio": "ref.flac", "audio": "truth.wav",
         "speaker": "x", "split": "test"},
        {"id": "m1", "task": "t2m", "text": "calm piano", "seed": 42},
        {"id": "v1", "task": "v2m", "video": "clip.npz", "text": "upbeat"},
        {"id": "v2", "task": "v2m", "video": str(tmp_path / "clip.npy")},
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert main(["--ckpt", str(ckpt), "--requests", str(requests), "--out", str(out), "--batch-size", "3",
                 "--top-p-router", "0.5", *FAST]) == 0
    manifest = [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]
    assert [m["id"] for m in manifest] == ["s/1", "m1", "v1", "v2"]
    assert manifest[0]["audio"] == "s_1.wav"  # ids become safe file names
    metas = [json.loads((out / m["audio"]).with_suffix(".json").read_text()) for m in manifest]
    assert [m["seed"] for m in metas] == [3, 42, 5, 6]  # seed + index unless the request names one
    assert [m["batch_size"] for m in metas] == [3, 3, 3, 1]
    assert all(m["router_top_p"] == 0.5 for m in metas)
    assert metas[2]["video_frames"] == 5 and metas[0]["request_fields"]["audio"] == "truth.wav"
    for m in manifest:
        assert sf.info(str(out / m["audio"])).samplerate == SR


def test_expert_budget_and_cache_options(ckpt, tmp_path):
    out = tmp_path / "out"
    assert main(["--ckpt", str(ckpt), "--task", "t2m", "--text", "calm piano", "--out", str(out), "--cache", "dynamic",
                 "--experts-per-token", "1.2", "--max-seconds", "0.5", "--min-seconds", "0.5", "--device", "cpu"]) == 0
    meta = json.loads((out / "clip.json").read_text())
    assert meta["cache"] == "dynamic" and meta["compiled"] is False and meta["router_top_p"] is None
    assert meta["settings"]["experts_per_token"] == 1.2 and meta["expert_budget"]["target"] == 1.2
    assert meta["expert_budget"]["batch_mean"] == pytest.approx(meta["activated_experts_per_token"], abs=1e-3)


def test_evaluation_seam_skips_unservable_requests(ckpt, tmp_path):
    generator = build_generator(str(ckpt), device="cpu", max_seconds=0.05, temperature=0.0)
    assert isinstance(generator, GeneratorProtocol)
    assert callable(load_checkpoint_generator(ckpt, device="cpu"))  # what 'unimoe evaluate --ckpt' calls
    with pytest.raises(ValueError, match="unknown generation setting"):
        build_generator(str(ckpt), device="cpu", temprature=1.0)
    requests = tmp_path / "req.jsonl"
    requests.write_text(json.dumps({"id": "ok", "task": "t2m", "text": "drums", "audio": "ref.wav"}) + "\n"
                        + json.dumps({"id": "bad", "task": "tts", "text": "hi", "prompt_audio": "missing.wav"}) + "\n")
    manifest = generator(requests, tmp_path / "gen")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["ok"] and (manifest.parent / rows[0]["audio"]).is_file()
    skipped = [json.loads(line) for line in (tmp_path / "gen" / "skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["id"] == "bad" and "missing.wav" in skipped[0]["reason"]


def run_error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_clear_errors(ckpt, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), *FAST]
    err = run_error(["--ckpt", str(tmp_path / "nope.ckpt"), "--task", "t2m", "--text", "x", *out], capsys)
    assert "checkpoint not found" in err and "nope.ckpt" in err
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    err = run_error(["--ckpt", str(ckpt), "--task", "tts", "--text", "x", "--prompt-audio", str(tmp_path / "junk.wav"),
                     *out], capsys)
    assert "prompt_audio" in err and "junk.wav" in err
    err = run_error(["--ckpt", str(ckpt), "--task", "tts", "--text", "  ", *out], capsys)
    assert "'text'" in err and "empty" in err
    err = run_error(["--ckpt", str(ckpt), "--task", "t2m", "--text", "la " * 400, *out], capsys)
    assert "request 'clip'" in err and "max_seq_len=1024" in err  # the tiny presets hold 1024 positions
    err = run_error(["--ckpt", str(ckpt), "--task", "t2s", "--text", "x", *out], capsys)
    assert "unknown task 't2s'" in err
    err = run_error(["--ckpt", str(ckpt), "--task", "v2m", "--text", "x", *out], capsys)
    assert "'video'" in err and "v2m" in err
    (tmp_path / "clip.mp4").write_bytes(b"\x00")
    err = run_error(["--ckpt", str(ckpt), "--task", "v2m", "--video", str(tmp_path / "clip.mp4"), *out], capsys)
    assert "clip.mp4" in err and ".npy" in err
    err = run_error(["--ckpt", str(ckpt), "--task", "t2m", "--text", "x", "--prompt-audio", "a.wav", *out], capsys)
    assert "'prompt_audio'" in err and "does not use it" in err
    err = run_error(["--ckpt", str(ckpt), "--task", "t2m", "--text", "x", "--top-p", "0", *out], capsys)
    assert "top_p" in err
    err = run_error(["--ckpt", str(ckpt), "--task", "t2m", "--text", "x", "--experts-per-token", "2",
                     "--top-p-router", "0.5", *out], capsys)
    assert "experts_per_token and router_top_p" in err
    err = run_error(["--ckpt", str(ckpt), "--task", "t2m", "--text", "x", "--compile", "--cache", "dynamic", *out], capsys)
    assert "compile needs the static KV cache" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "task": "t2m", "text": "x"}) + "\n"
                   + json.dumps({"id": "a", "task": "t2m", "txt": "x"}) + "\n" + "{oops\n")
    err = run_error(["--ckpt", str(ckpt), "--requests", str(bad), *out], capsys)
    assert f"{bad}:2: field 'txt': unknown field" in err and f"{bad}:2: field 'id': duplicate" in err
    assert f"{bad}:3: not valid JSON" in err
    (tmp_path / "nc").mkdir()
    nocodec = write_checkpoint(tmp_path / "nc", codec=False)
    err = run_error(["--ckpt", str(nocodec), "--task", "t2m", "--text", "x", *out], capsys)
    assert "names no codec" in err and "--codec" in err
    err = run_error(["--ckpt", str(ckpt), "--task", "t2m", "--text", "x", "--codec", '{"name": "spectral_rvq"}', *out],
                    capsys)
    assert "cannot build the codec" in err and "--codec" in err
