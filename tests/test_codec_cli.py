"""``unimoe codec fit`` / ``unimoe codec roundtrip`` end to end on generated audio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from unimoe.cli import main as unimoe_main
from unimoe.commands.codec import main, parse_codec_spec

pytestmark = pytest.mark.usefixtures("single_thread")




@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Decaying harmonic notes with a little noise at 22.05 kHz, one stereo 44.1 kHz file."""
    root = tmp_path_factory.mktemp("cli_audio")
    rng = np.random.default_rng(0)
    sr = 22050
    t = np.arange(int(1.5 * sr)) / sr
    for i in range(10):
        f0 = 98 * 2 ** (i / 4)
        wav = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 8)) * np.exp(-1.5 * t) * 0.15
        sf.write(root / f"note_{i}.wav", (wav + 0.003 * rng.standard_normal(t.size)).astype(np.float32), sr)
    t44 = np.arange(int(1.2 * 44100)) / 44100  # a trained pitch, new noise and decay, other rate and layout
    note = sum(np.sin(2 * np.pi * 98 * 2**0.5 * h * t44) / h for h in range(1, 8)) * np.exp(-2 * t44) * 0.15
    note = note + 0.003 * rng.standard_normal(t44.size)
    sf.write(root / "held_out_stereo.wav", np.stack([note, 0.8 * note], 1).astype(np.float32), 44100)
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"note_{i}.wav"}) + "\n" for i in range(10)))
    return root


def test_fit_then_roundtrip_prints_metrics(clips, tmp_path, capsys):
    out = tmp_path / "codec.pt"
    argv = ["codec", "fit", "--audio", str(clips / "train.jsonl"), "--out", str(out), "--num-codebooks", "4"]
    assert unimoe_main(argv + ["--codebook-size", "64", "--no-progress"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert out.is_file() and fit["out"] == str(out)
    assert fit["codec"]["num_codebooks"] == 4 and fit["codec"]["cardinality"] == 64
    assert fit["codec"]["frame_rate"] == 50.0 and fit["fit"]["files"] == 10

    decoded = tmp_path / "decoded.wav"
    assert main(["roundtrip", "--codec", str(out), "--in", str(clips / "held_out_stereo.wav"), "--out", str(decoded)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_frames"] == -(-round(1.2 * 16000) // 320)
    assert report["bitrate_kbps"] == pytest.approx(4 * 6 * 50 / 1000)
    info = sf.info(str(decoded))
    assert info.samplerate == 16000 and info.frames == round(1.2 * 16000) and info.channels == 1
    metrics = report["metrics"]
    print("roundtrip metrics:", metrics)
    assert set(metrics) == {"si_snr_db", "lsd_db", "spectral_convergence", "mcd_db"}
    assert metrics["lsd_db"] < 9 and metrics["spectral_convergence"] < 0.6  # measured 7.1 and 0.30


def test_roundtrip_with_a_yaml_spec_of_an_untrained_neural_codec(clips, tmp_path, capsys):
    spec = "{name: encodec, bandwidth: 1.5, pretrained: false}"
    assert parse_codec_spec(spec) == {"name": "encodec", "bandwidth": 1.5, "pretrained": False}
    decoded = tmp_path / "enc.wav"
    assert main(["roundtrip", "--codec", spec, "--in", str(clips / "note_0.wav"), "--out", str(decoded)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["codec"]["sample_rate"] == 24000 and report["codec"]["num_codebooks"] == 2
    assert report["bitrate_kbps"] == pytest.approx(1.5)
    assert sf.info(str(decoded)).frames == round(1.5 * 24000)


def test_errors_are_reported_with_the_file_and_exit_code_1(clips, tmp_path, capsys):
    assert main(["roundtrip", "--codec", str(tmp_path / "absent.pt"), "--in", str(clips / "note_0.wav"), "--out", "x.wav"]) == 1
    assert "absent.pt" in capsys.readouterr().err
    spec = "{name: encodec, pretrained: false}"
    assert main(["roundtrip", "--codec", spec, "--in", str(tmp_path / "missing.wav"), "--out", str(tmp_path / "o.wav")]) == 1
    assert "missing.wav" in capsys.readouterr().err
    assert main(["roundtrip", "--codec", "no_such_codec", "--in", str(clips / "note_0.wav"), "--out", "o.wav"]) == 1
    assert "unknown codec 'no_such_codec'" in capsys.readouterr().err
    assert main(["fit", "--audio", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.pt"), "--no-progress"]) == 1
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--out", "c.pt"])  # --audio is required
