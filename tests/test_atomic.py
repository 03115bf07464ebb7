"""Atomic writes: the target is either the old file or the complete new one, never a fragment."""

import json

import pytest

from unimoe.atomic import atomic_path, write_json_atomic, write_text_atomic


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old complete file")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target, durable=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old complete file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_json_round_trip(tmp_path):
    data = {"b": [1, 2.5, None], "a": "x"}
    path = write_json_atomic(tmp_path / "d.json", data, sort_keys=True)
    assert json.loads(path.read_text()) == data and path.read_text().endswith("\n")
