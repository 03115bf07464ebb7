"""``unimoe evaluate`` end to end on a small folder of espeak-ng WAVs + a reference
manifest in the training format: JSON, Markdown and MLflow metrics are written and agree."""

from __future__ import annotations

import json

import pytest

from eval_helpers import SENTENCES, espeak, tone_mix, write_jsonl
from unimoe.cli import main as unimoe_main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A reference 'test split' (training-manifest fields) and a folder of generated clips."""
    root = tmp_path_factory.mktemp("cli")
    refs, gen = root / "corpus", root / "generated"
    espeak(refs / "speech" / "m3_prompt.wav", "This is my natural speaking voice, recorded as a prompt.", "en+m3")
    espeak(refs / "speech" / "u1.wav", SENTENCES["s1"], "en+m3")
    espeak(refs / "speech" / "u2.wav", SENTENCES["s3"], "en+m3")
    espeak(gen / "u1.wav", SENTENCES["s1"], "en+m3")  # right words, right voice
    espeak(gen / "u2.wav", SENTENCES["s3"], "en+f3")  # right words, other voice
    for i in range(3):
        tone_mix(refs / "music" / f"t{i}.wav", [220.0 * (1 + i / 4), 330.0], seed=i)
        tone_mix(gen / f"t{i}.wav", [220.0 * (1 + i / 4), 330.0], seed=i)  # reproduces its reference
    rows = [
        {"id": "u1", "task": "tts", "audio": "../speech/u1.wav", "text": SENTENCES["s1"], "speaker": "m3",
         "prompt_audio": "../speech/m3_prompt.wav", "split": "test", "duration": 2.6},
        {"id": "u2", "task": "tts", "audio": "../speech/u2.wav", "text": SENTENCES["s3"], "speaker": "m3",
         "prompt_audio": "../speech/m3_prompt.wav", "split": "test"},
        {"id": "u9", "task": "tts", "audio": "../speech/u1.wav", "text": "not generated", "speaker": "m3",
         "split": "test"},
        {"id": "tr", "task": "tts", "audio": "../speech/u1.wav", "text": "train line", "split": "train"},
    ] + [{"id": f"t{i}", "task": "t2m", "audio": f"../music/t{i}.wav", "text": "a slow chord progression",
          "split": "test"} for i in range(3)]
    # paths relative to the manifest's folder, as the training manifest writes them
    manifest = write_jsonl(refs / "manifests" / "all.jsonl", rows)
    return {"manifest": manifest, "wavs": gen, "root": root}


def test_cli_demo_suite_writes_json_markdown_and_mlflow(corpus, capsys):
    out = corpus["root"] / "out"
    rc = unimoe_main(["evaluate", "--suite", "demo", "--wavs", str(corpus["wavs"]), "--manifest",
                      str(corpus["manifest"]), "--split", "test", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    values = data["values"]  # the demo suite scores per task: "<task>/<key>"
    by_key = {m["key"]: m for m in data["metrics"]}

    # item accounting: 5 test items with audio, u9 has none, the train line is ignored
    assert data["n_items"] == 5
    assert data["skipped_before_scoring"] == [
        {"id": "u9", "metric": "*", "reason": f"no generated audio {corpus['wavs']}/u9.wav"}]
    # Whisper-base gets espeak speech (nearly) right; speech metrics see only the 2 tts items.
    # Bounds, not values (kernels differ by CPU; see test_eval_backends.py): measured WER 0.06
    # (1 word of 17) in float32 and int8; reversed speech or noise gives 1.0. SIM is a ranking
    # (same voice 0.88-0.93 vs other voice 0.59-0.67); DNSMOS only its 1-5 scale.
    assert values["tts/wer_whisper_base"] <= 0.25 and by_key["wer_whisper_base"]["n_scored"] == 2
    assert by_key["wer_whisper_base"]["task"] == "tts"
    assert 0.0 <= values["tts/wer_pocketsphinx"] <= 2.0
    # SIM: u1 has the prompt's voice, u2 another voice
    sim = by_key["sim_resemblyzer"]["per_item"]
    assert sim["u1"]["sim_resemblyzer"] > sim["u2"]["sim_resemblyzer"] + 0.1
    assert 1.0 <= values["tts/dnsmos_ovrl"] <= 5.0
    # music on the aiSFX CNN: the generated clips reproduce their references exactly
    assert values["t2m/fad_aisfx"] == pytest.approx(0.0, abs=1e-6)
    assert values["t2m/kl_aisfx"] == pytest.approx(0.0, abs=1e-4)  # <= log(1 + 78 eps), the smoothing
    assert by_key["fad_aisfx"]["n_scored"] == 3 and "fad_mel_stats" not in by_key  # no fallback needed
    # CLAP keeps its real backend, which has no weights offline: reported, never a proxy
    clap = by_key["clap_laion"]
    assert clap["value"] is None and clap["unavailable"] == "unavailable offline" and "t2m/clap_laion" not in values

    # the backend that produced each number is named in JSON and Markdown
    assert "Whisper base" in by_key["wer_whisper_base"]["backend_description"]
    md = (out / "results.md").read_text()
    for needle in ("| WER (`wer_whisper_base`) ↓ | tts |", "pocketsphinx", "Resemblyzer", "DNSMOS", "aiSFX CNN",
                   "| CLAP (`clap_laion`) ↑ | t2m | unavailable offline |", "| u9 | * |"):
        assert needle in md, needle
    assert md.strip() in printed  # the table is also printed

    # MLflow (sqlite under the output folder) holds the same values and the artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("unimoe-eval").experiment_id])
    assert run.info.run_id == data["outputs"]["mlflow_run_id"]
    for key, value in values.items():
        assert run.data.metrics[key] == pytest.approx(value)
    assert run.data.params["backend.sim_resemblyzer"].startswith("resemblyzer: Resemblyzer")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "results.md"} <= artifacts


def test_cli_reports_bad_input_as_an_error_exit(corpus, tmp_path, capsys):
    rc = unimoe_main(["evaluate", "--suite", "demo", "--wavs", str(tmp_path), "--manifest", str(corpus["manifest"]),
                      "--out", str(tmp_path / "o"), "--no-mlflow"])
    assert rc == 2
    assert "no generated clip" in capsys.readouterr().err
    rc = unimoe_main(["evaluate", "--suite", "nosuch", "--manifest", str(corpus["manifest"])])
    assert rc == 2 and "suite file not found" in capsys.readouterr().err
    suite = tmp_path / "typo.yaml"
    suite.write_text("name: typo\nmetrics:\n  - {metric: fad, backend: mel_statz}\n")
    rc = unimoe_main(["evaluate", "--suite", str(suite), "--wavs", str(corpus["wavs"]), "--manifest",
                      str(corpus["manifest"]), "--out", str(tmp_path / "o2"), "--no-mlflow"])
    assert rc == 2 and "unknown metric backend 'mel_statz'" in capsys.readouterr().err
