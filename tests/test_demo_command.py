"""`unimoe demo` chains the user-facing commands in order, resumes, and stops clearly on failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unimoe.commands import codec, curriculum, data, demo, evaluate, tokenize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Replace each command's main with a recorder that succeeds (or fails for one command)."""
    calls: list[tuple[str, list[str]]] = []
    fail = {"name": None}

    def recorder(name):
        def main(argv):
            calls.append((name, list(argv)))
            if name == "data":  # what `unimoe data demo` leaves: the corpus record naming its manifests
                corpus = Path(argv[argv.index("--out") + 1])
                corpus.mkdir(parents=True, exist_ok=True)
                (corpus / "corpus.json").write_text(json.dumps({"manifests": {
                    t: f"manifests/{t}.jsonl" for t in ("tts", "t2m", "v2m", "all")}}))
            return 3 if fail["name"] == name else 0
        return main

    for module, name in ((data, "data"), (codec, "codec"), (tokenize, "tokenize"), (curriculum, "curriculum"),
                         (evaluate, "evaluate")):
        monkeypatch.setattr(module, "main", recorder(name))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\nstages: []\n")
    return calls, fail, recipe


def test_runs_every_step_in_order_with_the_documented_layout(recorded, tmp_path):
    calls, _, recipe = recorded
    data_dir, root = tmp_path / "d", tmp_path / "r"
    assert demo.main(["--data", str(data_dir), "--root", str(root), "--recipe", str(recipe), "--eval-limit", "5"]) == 0
    names = [n for n, _ in calls]
    assert names == ["data", "codec", "tokenize", "tokenize", "tokenize", "curriculum", "evaluate"]
    assert calls[0][1][:3] == ["demo", "--out", str(data_dir / "corpus")]
    assert calls[1][1][:3] == ["fit", "--audio", str(data_dir / "corpus" / "manifests" / "all.jsonl")]
    assert [a[a.index("--out") + 1] for n, a in calls if n == "tokenize"] == [
        str(data_dir / "shards" / t) for t in ("tts", "t2m", "v2m")]
    assert calls[5][1] == ["--config", str(recipe), "--data_root", str(data_dir), "--root", str(root)]
    ev = calls[6][1]
    assert ev[ev.index("--ckpt") + 1] == str(root / "joint" / "final")
    assert ev[ev.index("--split") + 1] == "test" and ev[ev.index("--limit") + 1] == "5"


def test_an_existing_codec_is_reused_not_refitted(recorded, tmp_path):
    calls, _, recipe = recorded
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "codec.pt").write_bytes(b"fitted earlier")
    assert demo.main(["--data", str(tmp_path / "d"), "--root", str(tmp_path / "r"), "--recipe", str(recipe),
                      "--skip-eval"]) == 0
    assert [n for n, _ in calls] == ["data", "tokenize", "tokenize", "tokenize", "curriculum"]


def test_a_failing_step_stops_the_demo_and_names_it(recorded, tmp_path, capsys):
    calls, fail, recipe = recorded
    fail["name"] = "curriculum"
    assert demo.main(["--data", str(tmp_path / "d"), "--root", str(tmp_path / "r"), "--recipe", str(recipe)]) == 1
    assert [n for n, _ in calls][-1] == "curriculum"  # evaluate never ran
    err = capsys.readouterr().err
    assert "the three-stage curriculum" in err and "exit code 3" in err and "re-run" in err


def test_missing_recipe_is_reported(tmp_path, capsys):
    assert demo.main(["--data", str(tmp_path), "--recipe", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


def test_default_recipe_is_the_shipped_demo_recipe():
    assert demo.default_recipe() == REPO / "recipes" / "demo" / "curriculum.yaml"
    assert demo.default_recipe().is_file()


@pytest.mark.slow
def test_real_demo_at_small_scale(tmp_path):
    """The real chain on a quarter-size corpus with the demo recipe cut to a few steps (minutes)."""
    recipe = yaml.safe_load((REPO / "recipes" / "demo" / "curriculum.yaml").read_text())
    recipe["root"] = str(tmp_path / "runs")
    for stage in recipe["stages"]:
        if "config" in stage:
            stage["config"] = str((REPO / "recipes" / "demo" / stage["config"]).resolve())
            stage["trainer"] = {**stage.get("trainer", {}), "max_steps": 4, "val_check_interval": 4}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "unimoe", "demo", "--data", str(tmp_path / "data"), "--root",
                           str(tmp_path / "runs"), "--recipe", str(path), "--scale", "0.25", "--eval-limit", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    assert (tmp_path / "runs" / "joint" / "final" / "model.safetensors").is_file()
    results = json.loads((tmp_path / "runs" / "eval" / "joint" / "results.json").read_text())
    assert results["n_items"] == 3
    assert "unimoe demo: finished" in proc.stdout
