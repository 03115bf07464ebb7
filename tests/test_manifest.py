"""Manifest validation: every problem is reported with its line and field."""

import json

import pytest

from unimoe.data.manifest import ManifestEntry, ManifestError, check_manifest, read_manifest, write_manifest

TASKS = ("tts", "t2m", "v2m")


def write_lines(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def good(i, **kw):
    obj = {"id": f"u{i}", "task": "tts", "audio": f"a{i}.wav", "text": "hello there", "speaker": "s1", "split": "train", "duration": 1.5}
    obj.update(kw)
    return obj


def problems_of(path, **kw):
    _, problems = check_manifest(path, tasks=TASKS, **kw)
    return {(p.line, p.field) for p in problems}, problems


def test_valid_manifest_reads_with_paths_relative_to_manifest(tmp_path):
    (tmp_path / "sub").mkdir()
    m = write_lines(tmp_path / "sub" / "m.jsonl", [good(1), "", good(2, audio="/abs/x.wav", prompt_audio="p.wav")])
    entries = read_manifest(m, tasks=TASKS)
    assert [e.id for e in entries] == ["u1", "u2"]
    assert entries[0].audio == str((tmp_path / "sub" / "a1.wav").resolve())
    assert entries[1].audio == "/abs/x.wav"
    assert entries[1].prompt_audio == str((tmp_path / "sub" / "p.wav").resolve())
    assert entries[0].duration == 1.5 and entries[0].split == "train"


@pytest.mark.parametrize(
    "line, field, fragment",
    [
        (good(1, duration=-2), "duration", "positive"),
        (good(1, duration="long"), "duration", "number"),
        (good(1, split="training"), "split", "one of train, val, test"),
        (good(1, task="ttss"), "task", "did you mean 'tts'"),
        (good(1, text=""), "text", "non-empty"),
        (good(1, task="v2m"), "video", "needs a video"),
        (good(1, speakr="x"), "speakr", "did you mean 'speaker'"),
        (good(1, id=7), "id", "must be a string"),
        ({"task": "tts", "audio": "a.wav", "text": "x"}, "id", "required"),
        (good(1, prompt_audio="a1.wav"), "prompt_audio", "target audio itself"),
        (good(1, meta=[1]), "meta", "JSON object"),
    ],
)
def test_each_bad_field_is_named_with_its_line(tmp_path, line, field, fragment):
    m = write_lines(tmp_path / "m.jsonl", [good(0), line])
    keys, problems = problems_of(m)
    assert (2, field) in keys, problems
    msg = next(str(p) for p in problems if p.field == field)
    assert fragment in msg and f"{m}:2" in msg


def test_all_problems_collected_and_error_lists_them(tmp_path):
    m = write_lines(tmp_path / "m.jsonl", [good(1), "{not json", good(2, duration=0), good(1), [1, 2]])
    with pytest.raises(ManifestError) as info:
        read_manifest(m, tasks=TASKS)
    keys = {(p.line, p.field) for p in info.value.problems}
    assert keys == {(2, None), (3, "duration"), (4, "id"), (5, None)}
    text = str(info.value)
    assert "not valid JSON" in text and "duplicate id 'u1' (first on line 1)" in text and "expected a JSON object" in text


def test_check_files_reports_missing_files(tmp_path):
    (tmp_path / "a1.wav").write_bytes(b"x")
    m = write_lines(tmp_path / "m.jsonl", [good(1), good(2, prompt_audio="a1.wav")])
    keys, _ = problems_of(m, check_files=True)
    assert keys == {(2, "audio")}


def test_write_then_read_round_trip(tmp_path):
    entries = [
        ManifestEntry(id="a", task="t2m", audio=str(tmp_path / "audio" / "a.wav"), text="a calm piano piece", duration=4.0, split="val", meta={"key": "C"}),
        ManifestEntry(id="b", task="v2m", audio="/elsewhere/b.wav", video=str(tmp_path / "v" / "b.npy"), duration=5.0),
    ]
    m = write_manifest(tmp_path / "m.jsonl", entries)
    raw = [json.loads(l) for l in m.read_text().splitlines()]
    assert raw[0]["audio"] == "audio/a.wav" and raw[1]["audio"] == "/elsewhere/b.wav"
    assert "speaker" not in raw[0]  # empty optionals are omitted
    back = read_manifest(m, tasks=TASKS)
    assert back[0].audio == str((tmp_path / "audio" / "a.wav").resolve())
    assert back[0].meta == {"key": "C"} and back[1].video == str((tmp_path / "v" / "b.npy").resolve())
