"""Runner, manifests, suites and bad input, through the shared scoring path.

Backends here are the cheap offline ``mel_stats`` and a registered tiny ASR that looks
transcripts up by file name - the same ``ASRBackend`` interface a real model implements.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from eval_helpers import tone_mix, write_jsonl
from unimoe.evaluation import ManifestError, run_suite
from unimoe.evaluation.backends.base import ASRBackend
from unimoe.evaluation.errors import BackendUnavailableError, EvaluationError
from unimoe.evaluation.manifest import pair_with_references, read_eval_manifest
from unimoe.evaluation.runner import load_checkpoint_generator, unavailable_label
from unimoe.evaluation.suite import load_suite, parse_suite
from unimoe.registry import METRICS

TRANSCRIPTS = {"a": "the cat sit on mat", "b": "hello world", "c": "one two three"}


class LookupASR(ASRBackend):
    """A tiny registered 'model' with the ASRBackend interface: it returns queued
    transcripts in call order, so the WER the runner reports can be checked by hand."""

    sample_rate = 16000

    def __init__(self, outputs: list[str] | None = None) -> None:
        self.outputs = list(outputs or [])
        self.calls = 0

    def describe(self) -> str:
        return "lookup ASR (test)"

    def transcribe(self, wav: np.ndarray, language: str | None = None) -> str:
        self.calls += 1
        return self.outputs.pop(0)


if "test_lookup_asr" not in METRICS._factories:  # noqa: SLF001  (module may be imported twice)
    METRICS.register("test_lookup_asr", LookupASR)


def _suite(metrics: list[dict], **extra) -> "Suite":  # noqa: F821
    return parse_suite({"name": "t", "metrics": metrics, **extra})


@pytest.fixture()
def music_dir(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    for i, chord in enumerate([[220, 277], [247, 311], [262, 330], [196, 247]]):
        tone_mix(d / f"gen{i}.wav", chord, seed=i)
        tone_mix(d / f"ref{i}.wav", [f * 1.5 for f in chord], seed=10 + i)
    return d


def test_wer_through_runner_matches_hand_count(tmp_path, music_dir):
    rows = [
        {"id": "a", "task": "tts", "audio": str(music_dir / "gen0.wav"), "text": "The cat sat on the mat."},
        {"id": "b", "task": "tts", "audio": str(music_dir / "gen1.wav"), "text": "Hello, world!"},
    ]
    manifest = write_jsonl(tmp_path / "eval.jsonl", rows)
    asr = LookupASR([TRANSCRIPTS["a"], TRANSCRIPTS["b"]])
    report = run_suite(_suite([{"metric": "wer", "backend": "test_lookup_asr"}]), manifest=manifest,
                       out_dir=tmp_path / "out", mlflow=False, backends={"wer": asr}, log=lambda m: None)
    (wer,) = report.metrics
    assert wer.value == pytest.approx((2 + 0) / (6 + 2))  # 2 edits in 6 words + 0 in 2 words
    assert wer.per_item["a"]["hypothesis"] == "the cat sit on mat"
    assert wer.details["mean_utterance_rate"] == pytest.approx((2 / 6 + 0) / 2)


def test_bad_inputs_become_skip_reports_never_nan(tmp_path, music_dir):
    sr = 16000
    sf.write(tmp_path / "silent.wav", np.zeros(sr, np.float32), sr)
    sf.write(tmp_path / "short.wav", 0.3 * np.ones(int(0.05 * sr), np.float32), sr)
    bad = np.full(sr, 0.1, np.float32)
    bad[100] = np.nan
    sf.write(tmp_path / "nan.wav", bad, sr, subtype="FLOAT")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wav")
    rows = [
        {"id": "ok", "task": "tts", "audio": str(music_dir / "gen0.wav"), "text": "hello world"},
        {"id": "missing", "task": "tts", "audio": "nope/missing.wav", "text": "hello world"},
        {"id": "silent", "task": "tts", "audio": "silent.wav", "text": "hello world"},
        {"id": "short", "task": "tts", "audio": "short.wav", "text": "hello world"},
        {"id": "nan", "task": "tts", "audio": "nan.wav", "text": "hello world"},
        {"id": "corrupt", "task": "tts", "audio": "corrupt.wav", "text": "hello world"},
        {"id": "notext", "task": "tts", "audio": str(music_dir / "gen1.wav"), "text": "?!"},
    ]
    manifest = write_jsonl(tmp_path / "eval.jsonl", rows)
    suite = _suite([{"metric": "wer", "backend": "test_lookup_asr"},
                    {"metric": "fad", "backend": "mel_stats"}])
    report = run_suite(suite, manifest=manifest, out_dir=tmp_path / "out", mlflow=False,
                       backends={"wer": LookupASR(["hello world"])}, log=lambda m: None)
    wer, fad = report.metrics
    reasons = {s["id"]: s["reason"] for s in wer.skipped}
    assert "not found" in reasons["missing"]
    assert "silent" in reasons["silent"]
    assert "too short" in reasons["short"]
    assert "NaN" in reasons["nan"]
    assert "cannot read" in reasons["corrupt"]
    assert "empty after normalisation" in reasons["notext"]
    assert wer.value == 0.0 and wer.n_scored == 1
    # FAD applies to music only: no music items here -> a reason instead of a number
    assert fad.value is None and fad.error
    text = (tmp_path / "out" / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite constant {c} in results.json"))
    md = (tmp_path / "out" / "results.md").read_text()
    values = [line.split("|")[2].strip() for line in md.splitlines() if line.startswith(("| WER", "| FAD"))]
    assert values == ["0.0000", "n/a"]  # a number or n/a, never NaN
    assert "## Skipped items" in md and "| silent | wer |" in md


def test_fad_and_kl_sets_with_mel_stats(tmp_path, music_dir):
    rows = [{"id": f"g{i}", "task": "t2m", "audio": str(music_dir / f"gen{i}.wav"), "text": "a chord",
             "reference_audio": str(music_dir / f"ref{i}.wav")} for i in range(4)]
    manifest = write_jsonl(tmp_path / "eval.jsonl", rows)
    suite = _suite([{"metric": "fad", "backend": "mel_stats"}, {"metric": "kl", "backend": "mel_stats"},
                    {"metric": "fad", "key": "fad_self", "backend": "mel_stats"}])
    report = run_suite(suite, manifest=manifest, out_dir=tmp_path / "o1", mlflow=False, log=lambda m: None)
    fad, kl, _ = report.metrics
    assert fad.value > 0 and kl.value > 0
    assert fad.details["generated_clips"] == 4 and fad.details["embedding_dim"] == 128
    assert any("rank-deficient" in w for w in fad.warnings)  # 12 frame rows < 128 dims
    # the same clips as both sets: FAD 0 and KL 0 (paired with themselves)
    same = [dict(r, reference_audio=r["audio"]) for r in rows]
    report2 = run_suite(suite, manifest=write_jsonl(tmp_path / "same.jsonl", same), out_dir=tmp_path / "o2",
                        mlflow=False, log=lambda m: None)
    assert report2.metrics[0].value == pytest.approx(0.0, abs=1e-6)
    assert report2.metrics[1].value == pytest.approx(0.0, abs=1e-4)  # eps smoothing (1e-6 per class)
    # an explicit reference set overrides the manifest's
    report3 = run_suite(suite, manifest=manifest, reference_set=music_dir, out_dir=tmp_path / "o3", mlflow=False,
                        log=lambda m: None)
    assert report3.metrics[0].details["reference_clips"] == 8


def test_fad_with_one_clip_reports_why(tmp_path, music_dir):
    rows = [{"id": "g", "task": "t2m", "audio": str(music_dir / "gen0.wav"), "reference_audio": str(music_dir / "ref0.wav")}]
    report = run_suite(_suite([{"metric": "fad", "backend": "mel_stats"}]), manifest=write_jsonl(tmp_path / "e.jsonl", rows),
                       out_dir=tmp_path / "o", mlflow=False, log=lambda m: None)
    assert report.metrics[0].value is None and "at least 2" in report.metrics[0].error


def test_reference_manifest_pairing_and_mismatches(tmp_path, music_dir):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    shutil.copy(music_dir / "gen0.wav", wavs / "u1.wav")
    shutil.copy(music_dir / "gen1.wav", wavs / "stray.wav")
    refs = write_jsonl(tmp_path / "refs" / "test.jsonl", [
        {"id": "u1", "task": "tts", "audio": "../m/ref0.wav", "text": "hi", "speaker": "spk", "lang": "en",
         "prompt_audio": "p.wav", "split": "test", "duration": 2.0},
        {"id": "u2", "task": "tts", "audio": "x.wav", "text": "there", "split": "test"},
        {"id": "u3", "task": "tts", "audio": "y.wav", "text": "train only", "split": "train"},
    ])
    pairing = pair_with_references(wavs, refs, split="test")
    (item,) = pairing.items
    assert item.audio == wavs / "u1.wav"
    assert item.reference_audio == refs.parent / "../m/ref0.wav"  # training manifest: relative to its folder
    assert item.prompt_audio == refs.parent / "p.wav" and item.speaker_reference == item.prompt_audio
    assert item.language == "en" and item.extra["duration"] == 2.0
    assert pairing.skipped == [{"id": "u2", "metric": "*", "reason": f"no generated audio {wavs}/u2.wav"}]
    assert pairing.unreferenced == ["stray.wav"]  # u3 is outside the split, stray is unknown
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(music_dir / "gen0.wav", other / "zzz.wav")
    with pytest.raises(ManifestError, match="no generated clip .* matches"):
        pair_with_references(other, refs)
    with pytest.raises(ManifestError, match="no line with split 'val'"):
        pair_with_references(wavs, refs, split="val")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": "a", "audio": "x.wav"}\n{"id": "a", "audio": "y.wav"}\n', "duplicate id 'a'"),
        ('{"id": "a", "audio": "x.wav"}\nnot json\n', r":2: not valid JSON"),
        ('{"id": "a"}\n', "missing field 'audio'"),
        ('{"audio": "x.wav"}\n', "missing required field 'id'"),
        ("\n\n", "has no entries"),
        ('["a"]\n', "must be a JSON object"),
    ],
)
def test_malformed_eval_manifests_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_eval_manifest(path)


def test_missing_manifest_and_folder(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_eval_manifest(tmp_path / "none.jsonl")
    with pytest.raises(ManifestError, match="folder not found"):
        pair_with_references(tmp_path / "nowhere", tmp_path / "none.jsonl")


def test_suite_validation_errors(tmp_path):
    with pytest.raises(EvaluationError, match="unknown key"):
        parse_suite({"name": "x", "metrics": [{"metric": "wer", "backend": "pocketsphinx"}], "metricz": []})
    with pytest.raises(EvaluationError, match="duplicate metric key"):
        parse_suite({"name": "x", "metrics": [{"metric": "fad", "backend": "mel_stats"}] * 2})
    with pytest.raises(EvaluationError, match="needs 'metric'"):
        parse_suite({"name": "x", "metrics": [{"metric": "fad"}]})
    with pytest.raises(EvaluationError, match="suite file not found"):
        load_suite(tmp_path / "nope.yaml")
    from unimoe.evaluation.scorers import SCORERS

    for name in ("speech", "music", "demo"):  # the shipped suites parse and name real components
        suite = load_suite(name)
        assert suite.name == name and suite.metrics
        for m in suite.metrics:
            assert m.metric in SCORERS and METRICS.get(m.backend_label)


def test_wrong_backend_kind_and_unknown_backend(tmp_path, music_dir):
    manifest = write_jsonl(tmp_path / "e.jsonl", [{"id": "a", "audio": str(music_dir / "gen0.wav"), "text": "x"}])
    with pytest.raises(EvaluationError, match="needs a ASRBackend"):
        run_suite(_suite([{"metric": "wer", "backend": "mel_stats"}]), manifest=manifest, out_dir=tmp_path / "o",
                  mlflow=False, log=lambda m: None)
    with pytest.raises(Exception, match="unknown metric backend 'whisperr'"):
        run_suite(_suite([{"metric": "wer", "backend": "whisperr"}]), manifest=manifest, out_dir=tmp_path / "o",
                  mlflow=False, log=lambda m: None)


def test_unavailable_backend_error_or_skip(tmp_path, music_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed (it is a dev dependency)
    manifest = write_jsonl(tmp_path / "e.jsonl", [{"id": "a", "task": "tts", "audio": str(music_dir / "gen0.wav"),
                                                   "reference_audio": str(music_dir / "gen1.wav")}])
    spec = [{"metric": "sim", "backend": "wavlm_sv"}, {"metric": "fad", "backend": "mel_stats"}]
    with pytest.raises(BackendUnavailableError, match="pip install transformers"):
        run_suite(_suite(spec), manifest=manifest, out_dir=tmp_path / "o", mlflow=False, log=lambda m: None)
    report = run_suite(_suite(spec, on_unavailable="skip"), manifest=manifest, out_dir=tmp_path / "o2", mlflow=False,
                       log=lambda m: None)
    sim = report.metrics[0]
    assert sim.value is None and "backend unavailable" in sim.error and "transformers" in sim.error


class CopyGenerator:
    """A Generator that 'generates' by copying a fixed clip: exercises checkpoint mode."""

    def __init__(self, clip: Path, serve: set[str]) -> None:
        self.clip, self.serve = clip, serve
        self.seen: list[str] = []

    def __call__(self, requests: Path, out_dir: Path) -> Path:
        rows = [json.loads(line) for line in requests.read_text().splitlines() if line.strip()]
        self.seen = [r["id"] for r in rows]
        out = []
        for r in rows:
            if r["id"] in self.serve:
                shutil.copy(self.clip, out_dir / f"{r['id']}.wav")
                out.append({"id": r["id"], "audio": f"{r['id']}.wav"})
        return write_jsonl(out_dir / "generated.jsonl", out)


def test_checkpoint_mode_through_a_generator(tmp_path, music_dir):
    requests = write_jsonl(tmp_path / "req" / "all.jsonl", [
        {"id": f"r{i}", "task": "t2m", "audio": f"../m/ref{i}.wav", "text": "a chord", "split": "test"} for i in range(3)
    ] + [{"id": "train0", "task": "t2m", "audio": "../m/ref3.wav", "text": "x", "split": "train"}])
    gen = CopyGenerator(music_dir / "ref0.wav", serve={"r0", "r1"})  # r0 reproduces its reference exactly
    report = run_suite(_suite([{"metric": "kl", "backend": "mel_stats"}]), manifest=requests, generator=gen,
                       split="test", out_dir=tmp_path / "out", mlflow=False, log=lambda m: None)
    assert gen.seen == ["r0", "r1", "r2"]  # only the requested split reached the generator
    assert report.n_items == 2 and report.skipped_before_scoring[0]["id"] == "r2"
    kl = report.metrics[0].per_item
    assert kl["r0"]["kl"] == pytest.approx(0.0, abs=1e-4) and kl["r1"]["kl"] > 1e-2


def test_checkpoint_mode_with_a_relative_manifest_and_a_limit(tmp_path, music_dir, monkeypatch):
    """Requests reach the generator with paths that exist from its own folder, limited to N lines."""
    write_jsonl(tmp_path / "data" / "manifests" / "all.jsonl", [
        {"id": f"r{i}", "task": "t2m", "audio": f"../../m/ref{i}.wav", "text": "a chord", "split": "test"}
        for i in range(3)])
    monkeypatch.chdir(tmp_path)  # the manifest is given relative to the working directory

    class CheckingGenerator(CopyGenerator):
        def __call__(self, requests: Path, out_dir: Path) -> Path:
            for row in (json.loads(line) for line in requests.read_text().splitlines()):
                assert Path(row["audio"]).is_absolute() and Path(row["audio"]).is_file(), row["audio"]
            return super().__call__(requests, out_dir)

    gen = CheckingGenerator(music_dir / "ref0.wav", serve={"r0", "r1", "r2"})
    report = run_suite(_suite([{"metric": "kl", "backend": "mel_stats"}]), manifest="data/manifests/all.jsonl",
                       generator=gen, split="test", limit=2, out_dir="out", mlflow=False, log=lambda m: None)
    assert gen.seen == ["r0", "r1"]
    assert report.n_items == 2 and not report.skipped_before_scoring
    assert report.metrics[0].per_item["r0"]["kl"] == pytest.approx(0.0, abs=1e-4)


def test_checkpoint_mode_without_generation_subsystem_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "unimoe.generation", None)  # makes the import fail
    with pytest.raises(EvaluationError, match="needs the generation subsystem"):
        load_checkpoint_generator("model.ckpt")


def test_lines_written_by_the_training_manifest_code_are_read_as_references(tmp_path, music_dir):
    manifest_mod = pytest.importorskip("unimoe.data.manifest")
    entry = manifest_mod.ManifestEntry(
        id="tts-spk001-00005", task="tts", audio="../speech/u.wav", text="Every winter, Peter ran home.",
        speaker="spk001", prompt_audio="../speech/p.wav", prompt_text="We saw forty books.", duration=2.1,
        split="test", lang="en", meta={"voice": "en-us"},
    )
    refs = write_jsonl(tmp_path / "corpus" / "manifests" / "all.jsonl", [entry.to_json()])
    wavs = tmp_path / "gen"
    wavs.mkdir()
    shutil.copy(music_dir / "gen0.wav", wavs / "tts-spk001-00005.wav")
    (item,) = pair_with_references(wavs, refs, split="test").items
    assert (item.task, item.text, item.speaker, item.language) == ("tts", entry.text, "spk001", "en")
    assert item.reference_audio == refs.parent / "../speech/u.wav"
    assert item.speaker_reference == refs.parent / "../speech/p.wav"
    assert item.extra["meta"] == {"voice": "en-us"} and item.extra["prompt_text"] == "We saw forty books."


class MissingBackend(ASRBackend):
    """A backend whose weights are never present (stands in for a missing package)."""

    def __init__(self) -> None:
        raise BackendUnavailableError("test weights are not installed")

    def transcribe(self, wav, language=None):  # pragma: no cover - never built
        raise AssertionError


def test_fallback_backend_is_scored_under_its_own_key_and_labelled(tmp_path, music_dir):
    rows = [{"id": f"g{i}", "task": "t2m", "audio": str(music_dir / f"gen{i}.wav"),
             "reference_audio": str(music_dir / f"ref{i}.wav")} for i in range(4)]
    manifest = write_jsonl(tmp_path / "e.jsonl", rows)
    missing = "test_eval_runner.MissingBackend"
    suite = _suite([{"metric": "fad", "key": "fad_fancy", "backend": missing,
                     "fallback": {"backend": "mel_stats", "key": "fad_mel_stats"}, "options": {"pooling": "clip"}}])
    report = run_suite(suite, manifest=manifest, out_dir=tmp_path / "o", mlflow=False, log=lambda m: None)
    primary, fallback = report.metrics
    assert primary.value is None and primary.unavailable == "unavailable offline"  # not an offline backend
    assert "test weights are not installed" in primary.error
    direct = run_suite(_suite([{"metric": "fad", "backend": "mel_stats", "options": {"pooling": "clip"}}]),
                       manifest=manifest, out_dir=tmp_path / "d", mlflow=False, log=lambda m: None).metrics[0]
    assert fallback.key == "fad_mel_stats" and fallback.value == pytest.approx(direct.value)
    assert fallback.details["pooling"] == "clip"  # the entry's options carry over
    assert fallback.backend_description.startswith("FALLBACK for fad_fancy") and fallback.details["fallback_for"] == "fad_fancy"
    assert report.values() == {"fad_mel_stats": fallback.value}
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| FAD (`fad_fancy`) ↓ | unavailable offline |" in md and "FALLBACK for fad_fancy" in md
    with pytest.raises(EvaluationError, match="must differ from the entry's key"):
        _suite([{"metric": "fad", "backend": missing, "fallback": {"backend": "mel_stats", "key": "fad"}}])
    with pytest.raises(EvaluationError, match="unknown key"):
        _suite([{"metric": "fad", "backend": missing, "fallback": {"backend": "mel_stats", "keys": "x"}}])


def test_per_metric_on_unavailable_overrides_the_suite(tmp_path, music_dir):
    manifest = write_jsonl(tmp_path / "e.jsonl", [{"id": "a", "task": "tts", "audio": str(music_dir / "gen0.wav"),
                                                   "text": "hello world"}])
    missing = "test_eval_runner.MissingBackend"
    strict = _suite([{"metric": "wer", "backend": missing}])
    with pytest.raises(BackendUnavailableError, match="test weights"):
        run_suite(strict, manifest=manifest, out_dir=tmp_path / "o", mlflow=False, log=lambda m: None)
    lenient = _suite([{"metric": "wer", "backend": missing, "on_unavailable": "skip"},
                      {"metric": "wer", "key": "wer2", "backend": "test_lookup_asr"}])
    report = run_suite(lenient, manifest=manifest, out_dir=tmp_path / "o2", mlflow=False, log=lambda m: None,
                       backends={"wer2": LookupASR(["hello world"])})
    assert report.metrics[0].unavailable == "unavailable offline" and report.values() == {"wer2": 0.0}
    # an offline backend (weights in a package) that cannot load is "unavailable"; a hub one "unavailable offline"
    assert unavailable_label("aisfx") == "unavailable" and unavailable_label({"name": "mel_stats"}) == "unavailable"
    assert unavailable_label({"class_path": "laion_clap", "init_args": {}}) == "unavailable offline"
    with pytest.raises(EvaluationError, match="on_unavailable must be"):
        _suite([{"metric": "wer", "backend": missing, "on_unavailable": "ignore"}])


def test_by_task_scores_each_task_on_its_own_items(tmp_path, music_dir):
    rows = [{"id": f"{task}{i}", "task": task, "audio": str(music_dir / f"gen{i}.wav"),
             "reference_audio": str(music_dir / f"ref{i}.wav")} for task, ids in (("t2m", (0, 1)), ("v2m", (2, 3)))
            for i in ids]
    manifest = write_jsonl(tmp_path / "e.jsonl", rows)
    report = run_suite(_suite([{"metric": "kl", "backend": "mel_stats"}], by_task=True), manifest=manifest,
                       out_dir=tmp_path / "o", mlflow=False, log=lambda m: None)
    t2m, v2m = report.metrics
    assert (t2m.task, v2m.task) == ("t2m", "v2m") and t2m.n_items == v2m.n_items == 2
    for result, task in ((t2m, "t2m"), (v2m, "v2m")):  # each equals a run on that task's lines only
        alone = run_suite(_suite([{"metric": "kl", "backend": "mel_stats"}]),
                          manifest=write_jsonl(tmp_path / f"{task}.jsonl", [r for r in rows if r["task"] == task]),
                          out_dir=tmp_path / task, mlflow=False, log=lambda m: None).metrics[0]
        assert result.value == pytest.approx(alone.value)
    assert set(report.values()) == {"t2m/kl", "v2m/kl"}
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| metric | task | value |" in md and "| KL ↓ | v2m |" in md
    with pytest.raises(EvaluationError, match="by_task must be"):
        _suite([{"metric": "kl", "backend": "mel_stats"}], by_task="yes")
