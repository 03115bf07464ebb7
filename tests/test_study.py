"""`unimoe study` on a tiny grid (2 arms x 2 seeds, a few steps, real subprocesses): a killed cell
resumes, identical stages are trained once and shared, and the report's numbers equal a
recomputation from the stages' own files. The full demo study is a slow test."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import mlflow.tracking
import numpy as np
import pytest
import yaml
from safetensors import safe_open

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))

from training_helpers import TINY_MODEL, tiny_data  # noqa: E402

from unimoe.study import load_study  # noqa: E402
from unimoe.training.recipe_vars import RecipeError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SEEDS = [0, 1]


def tiny_study(work: Path, kill_marker: Path, positions: Path) -> Path:
    """Arm `base`: one dense stage on tts+t2m. Arm `tuned`: the same stage, then 6 more steps on a
    balanced mix (killed once at step 3). The `base` stage is identical in both arms."""
    quiet = {"enable_progress_bar": False, "log_every_n_steps": 1}
    base = {"name": "base", "config": str(RECIPES / "demo" / "specialist.yaml"),
            "model": {"init_args": {"model": TINY_MODEL}},
            "data": {"init_args": {"max_tokens": 2048, "sources": {"tts": "${data_root}/shards/tts",
                                                                   "t2m": "${data_root}/shards/t2m"}}},
            "trainer": {**quiet, "max_steps": 4, "val_check_interval": 2, "callbacks": [
                {"class_path": "study_helpers.PositionRecorder", "init_args": {"path": str(positions)}}]}}
    tuned = {"name": "tuned", "config": str(RECIPES / "demo" / "specialist.yaml"), "init_from": "base",
             "model": {"init_args": {"model": None}},
             "data": {"init_args": {"max_tokens": 2048, "mix": "balanced", "sources": {
                 "tts": "${data_root}/shards/tts", "t2m": "${data_root}/shards/t2m"}}},
             "trainer": {**quiet, "max_steps": 6, "val_check_interval": 3, "callbacks": [
                 {"class_path": "training_helpers.KillOnce", "init_args": {"at_step": 3, "marker": str(kill_marker)}}]}}
    curriculum = work / "two_stage.yaml"
    curriculum.write_text(yaml.safe_dump({"name": "two-stage", "stages": [base, tuned]}, sort_keys=False))
    suite = work / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "tiny", "metrics": [
        {"metric": "fad", "key": "fad_mel_stats", "backend": "mel_stats"},
        {"metric": "kl", "key": "kl_mel_bands", "backend": "mel_stats"}]}))
    study = {
        "name": "tiny-study", "description": "two arms sharing their first stage", "root": str(work / "runs"),
        "seeds": SEEDS, "checkpoint_every_n_steps": 2,
        "evaluate": {"suite": str(suite), "manifest": "${data_root}/corpus/manifests/{task}.jsonl", "split": "test",
                     "limit": 2, "generation": {"max_seconds": 0.5}},
        "arms": [{"name": "base", "curriculum": str(curriculum), "until": "base"},
                 {"name": "tuned", "curriculum": str(curriculum)}],
    }
    path = work / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_study(config: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("UNIMOE_DATA_ROOT", None)
    return subprocess.run([sys.executable, "-m", "unimoe", "study", "--config", str(config), "--data_root", str(data),
                           *extra], cwd=config.parent, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    data = tiny_data(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("study")
    marker, positions = work / "killed.json", work / "positions.jsonl"
    config = tiny_study(work, marker, positions)
    first = run_study(config, data)  # base/seed0 finishes, tuned/seed0 SIGKILLs itself at step 3
    root = work / "runs"
    base_done = {p: p.stat().st_mtime_ns for p in root.glob("stages/seed0/base-*/DONE.json")}
    base_cell = (root / "cells" / "base" / "seed0" / "cell.json").stat().st_mtime_ns
    second = run_study(config, data)  # resumes tuned/seed0, then runs seed 1
    third = run_study(config, data)  # nothing left to do
    return {"data": data, "root": root, "config": config, "runs": (first, second, third), "marker": marker,
            "positions": positions, "base_done": base_done, "base_cell": base_cell}


def test_a_killed_cell_resumes_and_finished_cells_are_skipped(study_run):
    first, second, third = study_run["runs"]
    root = study_run["root"]
    assert first.returncode == -9, first.stderr[-3000:]  # the real kill
    assert json.loads(study_run["marker"].read_text())["killed_at_step"] == 3
    assert second.returncode == 0, second.stderr[-3000:]
    assert third.returncode == 0, third.stderr[-3000:]
    assert (root / "cells" / "base" / "seed0" / "cell.json").stat().st_mtime_ns == study_run["base_cell"]
    assert "cell base/seed0" not in second.stderr  # finished cell: not run again
    assert "tuned: resuming at step 2/6 from last.ckpt" in second.stderr
    [tuned0] = root.glob("stages/seed0/tuned-*")
    done = json.loads((tuned0 / "DONE.json").read_text())
    assert done["resumed_from"]["step"] == 2 and done["global_step"] == 6
    assert "cell " not in third.stderr.replace("cells", "")  # every cell finished: nothing runs
    for arm in ("base", "tuned"):
        for seed in SEEDS:
            assert (root / "cells" / arm / f"seed{seed}" / "cell.json").is_file()


def test_identical_stages_are_trained_once_per_seed_and_shared(study_run):
    root = study_run["root"]
    for seed in SEEDS:
        bases = list(root.glob(f"stages/seed{seed}/base-*"))
        assert len(bases) == 1, bases  # one folder for both arms
        for arm in ("base", "tuned"):
            cell = json.loads((root / "cells" / arm / f"seed{seed}" / "cell.json").read_text())
            assert cell["stages"]["base"] == str(bases[0])
    assert len({p.parent.name for p in root.glob("stages/seed*/base-*/DONE.json")}) == 2  # the seeds differ
    for path, mtime in study_run["base_done"].items():
        assert path.stat().st_mtime_ns == mtime  # the shared stage was not retrained by the tuned arm
    # the seed reached the fresh initialisation: the two seeds' base models differ
    weights = [safe_open(str(p / "final" / "model.safetensors"), "pt").get_tensor("blocks.0.attn.q_proj.weight")
               for p in sorted(root.glob("stages/seed*/base-*"))]
    assert not np.allclose(weights[0].numpy(), weights[1].numpy())
    # each stage trained once: one MLflow training run per (stage, seed), nested under the cell that trained it
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny-study")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    kinds = [r.data.tags.get("unimoe.kind") for r in runs]
    assert kinds.count("study") == 1 and kinds.count("study-cell") == 4
    parent = next(r for r in runs if r.data.tags.get("unimoe.kind") == "study")
    cells = {r.info.run_id: r for r in runs if r.data.tags.get("unimoe.kind") == "study-cell"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in cells.values())
    stage_runs = [r for r in runs if r.data.tags.get("unimoe.kind") is None]
    assert sorted(r.info.run_name for r in stage_runs) == ["base", "base", "tuned", "tuned"]
    assert all(r.data.tags["mlflow.parentRunId"] in cells for r in stage_runs)


def test_report_numbers_equal_a_recomputation_from_the_stage_files(study_run):
    root = study_run["root"]
    report = json.loads((root / "report.json").read_text())

    def stage_dir(seed: int, name: str) -> Path:
        [d] = root.glob(f"stages/seed{seed}/{name}-*")
        return d

    def final_metrics(seed: int, name: str) -> dict:
        return json.loads((stage_dir(seed, name) / "final_metrics.json").read_text())["metrics"]

    def check(arm: str, key: str, values: list[float]) -> None:
        got = report["arms"][arm]["metrics"][key]
        assert got["mean"] == pytest.approx(statistics.fmean(values), rel=1e-9), key
        assert got["std"] == pytest.approx(statistics.stdev(values), rel=1e-9), key
        assert got["n"] == len(values)

    for arm, last in (("base", "base"), ("tuned", "tuned")):
        for task in ("tts", "t2m"):
            check(arm, f"val_loss/{task}", [final_metrics(s, last)[f"val/loss/{task}"] for s in SEEDS])
        # domains: the mean of the domain's tasks (speech: tts; music: t2m)
        check(arm, "val_loss/music", [final_metrics(s, last)["val/loss/t2m"] for s in SEEDS])
        stages = ["base"] if arm == "base" else ["base", "tuned"]
        check(arm, "train_tokens", [sum(final_metrics(s, n)["train/tokens"] for n in stages) for s in SEEDS])
        check(arm, "train_flops", [sum(final_metrics(s, n)["train/flops"] for n in stages) for s in SEEDS])
        kl = [json.loads((stage_dir(s, last) / "eval" / "suite-test-n2-t2m" / "results.json").read_text())
              ["values"]["kl_mel_bands"] for s in SEEDS]  # (FAD needs 2 clips; the tiny corpus has 1 test clip)
        check(arm, "eval/t2m/kl_mel_bands", kl)
    md = (root / "report.md").read_text()
    mean, std = report["arms"]["tuned"]["metrics"]["val_loss/tts"]["mean"], report["arms"]["tuned"]["metrics"]["val_loss/tts"]["std"]
    assert f"{mean:.3f} ± {std:.3f}" in md
    assert (root / "plots" / "val_loss_curves.png").stat().st_size > 10_000
    assert (root / "plots" / "final_metrics.png").stat().st_size > 10_000


def test_training_tokens_and_flops_are_counted_exactly(study_run):
    """train/tokens = the positions an independent recorder saw; train/flops = 6 x non-embedding params x tokens."""
    root = study_run["root"]
    rows = [json.loads(line) for line in study_run["positions"].read_text().splitlines()]
    per_seed = [rows[i:i + 4] for i in range(0, len(rows), 4)]  # the base stage: 4 steps, once per seed
    assert [len(r) for r in per_seed] == [4, 4]
    for seed, steps in zip(SEEDS, per_seed):
        [d] = root.glob(f"stages/seed{seed}/base-*")
        metrics = json.loads((d / "final_metrics.json").read_text())["metrics"]
        tokens = sum(r["positions"] for r in steps)
        assert metrics["train/tokens"] == tokens
        with safe_open(str(d / "final" / "model.safetensors"), "pt") as f:
            non_embedding = sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys()
                                if not k.startswith(("text_embed", "audio_embed")))
        assert metrics["train/flops"] == pytest.approx(6 * non_embedding * tokens, rel=1e-9)


def test_report_only_rebuilds_the_same_numbers(study_run):
    root = study_run["root"]
    before = json.loads((root / "report.json").read_text())["arms"]
    rebuilt = run_study(study_run["config"], study_run["data"], "--report_only")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert json.loads((root / "report.json").read_text())["arms"] == before


def test_bad_study_fields_are_named(tmp_path):
    base = {"name": "x", "arms": [{"name": "a", "recipe": str(RECIPES / "joint.yaml")}]}

    def write(data) -> Path:
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    with pytest.raises(RecipeError, match=r"unknown field 'sedes' \(did you mean 'seeds'\?\)"):
        load_study(write({**base, "sedes": [0]}), data_root=str(tmp_path))
    with pytest.raises(RecipeError, match="exactly one of 'curriculum'"):
        load_study(write({"arms": [{"name": "a"}]}), data_root=str(tmp_path))
    with pytest.raises(RecipeError, match="repeats a seed"):
        load_study(write({**base, "seeds": [0, 0]}), data_root=str(tmp_path))
    with pytest.raises(RecipeError, match="two arms share a name"):
        load_study(write({"arms": base["arms"] * 2}), data_root=str(tmp_path))
    with pytest.raises(RecipeError, match="no stage 'specialist_ttx' to override.*did you mean 'specialist_tts'"):
        load_study(write({"arms": [{"name": "a", "curriculum": str(RECIPES / "demo" / "curriculum.yaml"),
                                    "stages": {"specialist_ttx": {}}}]}), data_root=str(tmp_path))
    with pytest.raises(RecipeError, match="final: tts -> 'nope' is not a stage"):
        load_study(write({"arms": [{"name": "a", "recipe": str(RECIPES / "joint.yaml"), "final": {"tts": "nope"}}]}),
                   data_root=str(tmp_path))


def test_the_shipped_study_shares_the_specialists_and_matches_steps():
    """recipes/studies/curriculum.yaml: arms 1 and 4 share the specialists; every final model's lineage
    has the curriculum's total number of steps; --scale multiplies the lengths."""
    from unimoe.training.curriculum.compose import compose_stage

    study = load_study(RECIPES / "studies" / "curriculum.yaml", data_root="/data/demo")
    assert len(study.seeds) >= 3
    cells = {c.arm.name: c for c in study.cells if c.seed == study.seeds[0]}
    spec = {s.name: s.directory(study.root) for s in cells["specialists"].stages()}
    cur = {s.name: s.directory(study.root) for s in cells["curriculum"].stages()}
    assert all(spec[n] == cur[n] for n in ("specialist_tts", "specialist_t2m", "specialist_v2m"))

    def steps(cell) -> int:
        return sum(compose_stage(cell.curriculum, s)["trainer"]["max_steps"] for s in cell.stages() if s.kind == "fit")

    total = steps(cells["curriculum"])
    assert all(steps(cells[a]) == total for a in ("dense_joint", "moe_scratch", "dense_balanced"))
    from unimoe.training.curriculum.compose import validate_stage_config

    for cell in cells.values():  # every stage parses with the real LightningCLI parser (nothing is built)
        for stage in cell.stages():
            if stage.kind == "fit":
                validate_stage_config(compose_stage(cell.curriculum, stage), stage)
    big = load_study(RECIPES / "studies" / "curriculum.yaml", data_root="/data/demo", scale=2)
    assert steps(next(c for c in big.cells if c.arm.name == "curriculum")) == pytest.approx(2 * total, abs=3)


@pytest.mark.slow
def test_the_full_demo_study(tmp_path):
    """The shipped study end to end on the demo data (UNIMOE_STUDY_DATA, default data/demo): ~40 min on 2 cores."""
    data = Path(os.environ.get("UNIMOE_STUDY_DATA", REPO / "data" / "demo"))
    if not (data / "shards" / "tts").is_dir():
        pytest.skip(f"no demo data at {data} (unimoe data demo; codec fit; tokenize)")
    proc = subprocess.run([sys.executable, "-m", "unimoe", "study", "--config", str(RECIPES / "studies" / "curriculum.yaml"),
                           "--data_root", str(data), "--root", str(tmp_path / "study")],
                          capture_output=True, text=True, timeout=5400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "study" / "report.json").read_text())
    for arm in ("specialists", "dense_joint", "moe_scratch", "curriculum", "dense_balanced"):
        metrics = report["arms"][arm]["metrics"]
        assert metrics["val_loss/speech"]["n"] == 3 and metrics["val_loss/music"]["n"] == 3
        assert np.isfinite(metrics["val_loss/speech"]["mean"])
