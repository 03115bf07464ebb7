"""The shared JSON Lines reader and manifest-relative path rule."""

from pathlib import Path

from unimoe.jsonl import iter_json_lines, resolve_path


def test_lines_are_numbered_blank_lines_skipped_and_bad_json_reported(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a"}\n\n   \n{"id": \n[1, 2]\n')
    rows = list(iter_json_lines(path))
    assert [(n, v) for n, v, _ in rows] == [(1, {"id": "a"}), (4, None), (5, [1, 2])]
    assert rows[0][2] is None and rows[2][2] is None
    assert rows[1][2].startswith("not valid JSON")


def test_paths_are_relative_to_the_file_that_names_them(tmp_path):
    base = tmp_path / "manifests"
    assert resolve_path("../audio/x.wav", base) == str(base / "../audio/x.wav")
    assert resolve_path("/abs/x.wav", base) == "/abs/x.wav"
    assert resolve_path("~/x.wav", base) == str(Path.home() / "x.wav")
    assert resolve_path(None, base) is None
