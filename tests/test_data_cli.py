"""The `unimoe data` and `unimoe tokenize` command lines: exit codes and messages."""

import json

import numpy as np
import soundfile as sf

from unimoe.cli import main as unimoe


def test_validate_reports_lines_and_exit_code(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", "task": "t2m", "audio": "a.wav", "text": "calm piano", "duration": 2.0}) + "\n")
    assert unimoe(["data", "validate", str(good)]) == 0
    assert "OK; 1 valid entries" in capsys.readouterr().out
    assert unimoe(["data", "validate", str(good), "--check-files"]) == 1
    assert f"{good}:1: field 'audio': file not found" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"id": "b", "task": "tts", "audio": "b.wav", "txt": "hi"}) + "\n")
    assert unimoe(["data", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2: field 'txt': unknown field (did you mean 'text'?)" in out
    assert f"{bad}:2: field 'text': task 'tts' needs a non-empty text" in out


def test_import_commands(tmp_path, capsys):
    folder = tmp_path / "LibriSpeech" / "dev-clean" / "7" / "8"
    folder.mkdir(parents=True)
    for i in range(2):
        sf.write(str(folder / f"7-8-000{i}.flac"), 0.1 * np.ones(16000), 16000, format="FLAC")
    (folder / "7-8.trans.txt").write_text("7-8-0000 HELLO THERE\n7-8-0001 GENERAL KENOBI\n")
    assert unimoe(["data", "import-librispeech", "--root", str(tmp_path / "LibriSpeech"), "--out", str(tmp_path / "ls.jsonl"), "--lowercase"]) == 0
    assert "wrote 2 entries" in capsys.readouterr().out
    rows = [json.loads(l) for l in (tmp_path / "ls.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["hello there", "general kenobi"] and {r["split"] for r in rows} == {"val"}

    (tmp_path / "caps.tsv").write_text("id\tcaption\nmissing\tquiet flute\n")
    assert unimoe(["data", "import-captions", "--csv", str(tmp_path / "caps.tsv"), "--audio-dir", str(folder),
                   "--out", str(tmp_path / "c.jsonl"), "--id-column", "id", "--delimiter", "tab"]) == 0
    out = capsys.readouterr().out
    assert "wrote 0 entries" in out and "skipped missing: missing audio file" in out
    assert unimoe(["data", "import-captions", "--csv", str(tmp_path / "nope.csv"), "--audio-dir", str(folder),
                   "--out", str(tmp_path / "c.jsonl")]) == 1
    assert "caption CSV not found" in capsys.readouterr().err


def test_tokenize_command_errors_are_one_line(tmp_path, capsys):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "task": "t2m", "audio": "a.wav", "text": "x", "split": "dev"}\n')
    assert unimoe(["tokenize", "--manifest", str(m), "--codec", "encodec", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "unimoe tokenize: error:" in err and f"{m}:1: field 'split'" in err
    m.write_text('{"id": "a", "task": "t2m", "audio": "a.wav", "text": "x"}\n')
    assert unimoe(["tokenize", "--manifest", str(m), "--codec", "no_such_codec", "--out", str(tmp_path / "o")]) == 1
    assert "unknown codec 'no_such_codec'" in capsys.readouterr().err
