"""`unimoe curriculum` end to end on a tiny real corpus, with a real kill and a resume; recipe errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file

HELPERS = Path(__file__).parent / "helpers"

from training_helpers import TINY_MODEL, tiny_data  # noqa: E402

from unimoe.checkpoint import load_model  # noqa: E402
from unimoe.training.curriculum import deep_merge, final_model, load_curriculum, stage_status  # noqa: E402
from unimoe.training.recipe_vars import RecipeError, substitute  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
FIT_STAGES = ["specialist_tts", "specialist_t2m", "specialist_v2m", "warmup", "joint"]
ALL_STAGES = FIT_STAGES[:3] + ["upcycle"] + FIT_STAGES[3:]


def tiny_curriculum(path: Path, root: Path, kill_marker: Path) -> Path:
    """The demo recipes' stage files with tiny sizes and a handful of steps (and a kill in joint)."""
    tiny_data_overrides = {"init_args": {"max_tokens": 2048}}  # the layout comes from the stage's model
    quiet = {"enable_progress_bar": False, "log_every_n_steps": 1}

    def specialist(task: str, steps: int) -> dict:
        return {"name": f"specialist_{task}", "config": str(RECIPES / "demo" / "specialist.yaml"),
                "model": {"init_args": {"model": TINY_MODEL}},  # experts are named after the data task
                "data": deep_merge(tiny_data_overrides, {"init_args": {"sources": {task: f"${{data_root}}/shards/{task}"}}}),
                "trainer": {**quiet, "max_steps": steps, "val_check_interval": steps}}

    samples = {"class_path": "AudioSamples", "init_args": {"per_task": 1, "settings": {"max_seconds": 1.0}}}
    monitor = {"class_path": "ExpertLoadMonitor", "init_args": {"log_every_n_steps": 2}}
    curriculum = {
        "name": "tiny-curriculum",
        "root": str(root),
        "checkpoint_every_n_steps": 2,
        "stages": [
            specialist("tts", 4), specialist("t2m", 3), specialist("v2m", 3),
            {"name": "upcycle", "upcycle": {
                "specialists": ["specialist_tts", "specialist_t2m", "specialist_v2m"], "pieces": 2,
                "moe": {"num_routed_experts": 6, "routed_intermediate_size": 64, "num_null_experts": 1,
                        "num_shared_experts": 1, "shared_intermediate_size": 32,
                        "load_balance": {"start": 0.025, "end": 0.001, "steps": 8}}}},
            {"name": "warmup", "config": str(RECIPES / "demo" / "warmup.yaml"), "init_from": "upcycle",
             "data": deep_merge(tiny_data_overrides, {"init_args": {"seed_size": 12}}),
             "trainer": {**quiet, "max_steps": 4, "val_check_interval": 4}},
            {"name": "joint", "config": "../joint.yaml", "init_from": "warmup",  # relative to this file's folder
             "data": tiny_data_overrides,
             "trainer": {**quiet, "max_steps": 8, "val_check_interval": 4, "callbacks": [
                 monitor, samples,
                 {"class_path": "training_helpers.KillOnce", "init_args": {"at_step": 5, "marker": str(kill_marker)}}]}},
        ],
    }
    path.write_text(yaml.safe_dump(curriculum, sort_keys=False))
    return path


def run_curriculum(config: Path, data: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("UNIMOE_DATA_ROOT", None)
    return subprocess.run([sys.executable, "-m", "unimoe", "curriculum", "--config", str(config), "--data_root", str(data)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory):
    data = tiny_data(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("curriculum")
    (work / "recipes").mkdir()
    root, marker = work / "runs", work / "killed.json"
    config = tiny_curriculum(work / "recipes" / "tiny.yaml", root, marker)
    (work / "joint.yaml").write_text(f"extends: {RECIPES / 'joint.yaml'}\n")  # "../joint.yaml" from recipes/

    first = run_curriculum(config, data, work)  # trains everything, then SIGKILLs itself in joint at step 5
    mtimes = {s: (root / s / ("upcycled" if s == "upcycle" else "final") / "model.safetensors").stat().st_mtime_ns
              for s in ALL_STAGES[:-1]}
    joint_run_id = (root / "joint" / "mlflow_run_id.txt").read_text()
    second = run_curriculum(config, data, work)  # skips finished stages, resumes joint from last.ckpt
    third = run_curriculum(config, data, work)  # everything finished
    return {"data": data, "root": root, "marker": marker, "runs": (first, second, third), "mtimes": mtimes,
            "joint_run_id": joint_run_id}


def test_killed_stage_resumes_and_finished_stages_are_skipped(curriculum_run):
    first, second, third = curriculum_run["runs"]
    root = curriculum_run["root"]
    assert first.returncode == -9, first.stderr[-3000:]  # the real kill
    assert json.loads(curriculum_run["marker"].read_text())["killed_at_step"] == 5
    assert second.returncode == 0, second.stderr[-3000:]
    assert third.returncode == 0, third.stderr[-3000:]
    for stage in ALL_STAGES[:-1]:  # finished before the kill: skipped, checkpoints untouched
        assert f"{stage} already finished, skipped" in second.stderr
        final = root / stage / ("upcycled" if stage == "upcycle" else "final") / "model.safetensors"
        assert final.stat().st_mtime_ns == curriculum_run["mtimes"][stage]
    assert "joint: resuming at step 4/8 from last.ckpt" in second.stderr
    done = json.loads((root / "joint" / "DONE.json").read_text())
    assert done["resumed_from"]["step"] == 4 and done["global_step"] == 8
    assert (root / "joint" / "mlflow_run_id.txt").read_text() == curriculum_run["joint_run_id"]  # same MLflow run
    assert third.stderr.count("already finished, skipped") == len(ALL_STAGES)
    status = json.loads((root / "curriculum.json").read_text())
    assert [s["status"] for s in status["stages"]] == ["done"] * len(ALL_STAGES)


def test_every_stage_leaves_a_self_describing_checkpoint(curriculum_run):
    root = curriculum_run["root"]
    expected = {"specialist_tts": "specialist", "specialist_t2m": "specialist", "specialist_v2m": "specialist",
                "upcycle": "upcycle", "warmup": "warmup", "joint": "joint"}
    for stage, kind in expected.items():
        assert (root / stage / "DONE.json").is_file()
        model, meta = load_model(root / stage / ("upcycled" if stage == "upcycle" else "final"))
        assert meta.stage == kind
        assert (meta.config.moe is None) == stage.startswith("specialist")
        codec_args = meta.codec.get("init_args", meta.codec)  # {class_path, init_args} (recipes) or {name, ...}
        assert codec_args["path"] == str(curriculum_run["data"] / "codec.pt")
    _, joint = load_model(root / "joint" / "final")
    assert joint.extra["expert_labels"] == ["tts.0", "tts.1", "t2m.0", "t2m.1", "v2m.0", "v2m.1"]
    assert joint.extra["init_from"]["stage"] == "warmup"
    assert set(joint.extra["data_tasks"]) == {"tts", "t2m", "v2m"}
    # the warmup stage changed only routers and shared experts of the upcycled model
    upcycled = load_file(str(root / "upcycle" / "upcycled" / "model.safetensors"))
    warmed = load_file(str(root / "warmup" / "final" / "model.safetensors"))
    for key, value in upcycled.items():
        same = torch.equal(value, warmed[key])
        assert same != (".ffn.router." in key or ".ffn.shared_experts." in key), key


def test_one_mlflow_experiment_with_metrics_plots_and_audio(curriculum_run):
    root = curriculum_run["root"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-curriculum")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(FIT_STAGES)  # one run per fit stage; the resume reused joint's run
    joint = runs["joint"]
    for key in ("train/loss", "val/loss", "val/loss/tts", "val/loss/t2m/cb0", "val/loss/speech", "val/loss/music",
                "train/aux_weight", "moe/train/aux_loss", "moe/val/layer_0/null_frac", "moe/val/layer_1/share/tts.0"):
        assert key in joint.data.metrics, key
    steps = [m.step for m in client.get_metric_history(joint.info.run_id, "val/loss")]
    assert 7 in steps  # Lightning logs the validation after 8 optimizer steps at step 7
    weights = {m.step: m.value for m in client.get_metric_history(joint.info.run_id, "moe/train/aux_weight")}
    assert set(weights) >= {1, 3, 5, 7} and weights[1] > weights[3] > weights[5] > weights[7]  # annealed across the resume
    assert "val/loss/tts" in runs["specialist_tts"].data.metrics and "moe/train/aux_loss" not in runs["specialist_tts"].data.metrics

    run_artifacts = root / "mlartifacts" / joint.info.run_id / "artifacts"
    plots = sorted(p.name for p in (root / "joint" / "plots").glob("*.png"))
    assert "expert_load_val_step0000008.png" in plots and "activated_experts_val_step0000008.png" in plots
    for name in plots:
        assert (run_artifacts / "plots" / name).stat().st_size > 5000
    wavs = sorted((root / "joint" / "samples" / "step0000008").glob("*.wav"))
    assert {w.name.split("-")[0] for w in wavs} == {"tts", "t2m", "v2m"}
    for wav in wavs:
        audio, rate = sf.read(wav)
        assert rate == 16000 and len(audio) > 0 and np.abs(audio).max() > 1e-4
        assert (run_artifacts / "samples" / "step0000008" / wav.name).is_file()
    assert (run_artifacts / "config.yaml").is_file()
    for stage in FIT_STAGES:  # every stage produced audio; the specialists only their own task
        assert list((root / stage / "samples").glob("step*/*.wav")), stage
    assert {w.name.split("-")[0] for w in (root / "specialist_t2m" / "samples").glob("step*/*.wav")} == {"t2m"}
    # the demo recipes score their samples with the demo suite while training (AudioSamples metrics)
    for stage, task in (("specialist_tts", "tts"), ("specialist_t2m", "t2m"), ("warmup", "v2m")):
        report = json.loads(next((root / stage / "samples").glob("step*/results.json")).read_text())
        assert task in {m["task"] for m in report["metrics"]}, stage
    assert any(k.startswith("val/audio/tts/") for k in runs["specialist_tts"].data.metrics)


# ---------------------------------------------------------------------- recipe errors
def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


def test_bad_curriculum_fields_are_named(tmp_path):
    base = {"name": "x", "stages": [{"name": "a", "config": str(RECIPES / "joint.yaml")}]}
    with pytest.raises(RecipeError, match=r"unknown field 'stagse' \(did you mean 'stages'\?\)"):
        load_curriculum(write(tmp_path / "c.yaml", {**base, "stagse": []}))
    with pytest.raises(RecipeError, match=r"stage 'a': unknown field 'init_form' \(did you mean 'init_from'\?\)"):
        load_curriculum(write(tmp_path / "c.yaml", {"stages": [{"name": "a", "config": str(RECIPES / "joint.yaml"),
                                                                 "init_form": "b"}]}))
    with pytest.raises(RecipeError, match="refers to 'b', which is a later stage"):
        load_curriculum(write(tmp_path / "c.yaml", {"stages": [
            {"name": "a", "config": str(RECIPES / "joint.yaml"), "init_from": "b"},
            {"name": "b", "config": str(RECIPES / "joint.yaml")}]}))
    with pytest.raises(RecipeError, match="two stages are named 'a'"):
        load_curriculum(write(tmp_path / "c.yaml", {"stages": [base["stages"][0], base["stages"][0]]}))
    with pytest.raises(RecipeError, match=r"upcycle.moe: unknown field 'num_routed' \(did you mean 'num_routed_experts'\?\)"):
        load_curriculum(write(tmp_path / "c.yaml", {"stages": [
            {"name": "up", "upcycle": {"specialists": ["x.ckpt"], "moe": {"num_routed": 2}}}]}))
    with pytest.raises(RecipeError, match="config': file not found"):
        load_curriculum(write(tmp_path / "c.yaml", {"stages": [{"name": "a", "config": "nope.yaml"}]}))
    with pytest.raises(RecipeError, match="launcher"):
        load_curriculum(write(tmp_path / "c.yaml", {**base, "launcher": "slurm"}))


def test_bad_stage_config_fails_before_any_training(tmp_path):
    data = tmp_path / "data"
    for sub in ("shards/tts", "shards/t2m", "shards/v2m"):
        (data / sub).mkdir(parents=True)
    (data / "codec.pt").write_text("")
    config = write(tmp_path / "c.yaml", {"name": "bad", "root": str(tmp_path / "runs"), "data_root": str(data), "stages": [
        {"name": "joint", "config": str(RECIPES / "joint.yaml"), "model": {"init_args": {"optimiser": {"lr": 1.0}}}}]})
    proc = subprocess.run([sys.executable, "-m", "unimoe", "curriculum", "--config", str(config), "--dry_run"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "optimiser" in proc.stderr and "stage 'joint'" in proc.stderr
    assert not (tmp_path / "runs" / "joint" / "checkpoints").exists()
    missing = write(tmp_path / "m.yaml", {"name": "m", "root": str(tmp_path / "runs"), "data_root": str(tmp_path / "empty"),
                                          "stages": [{"name": "joint", "config": str(RECIPES / "joint.yaml")}]})
    proc = subprocess.run([sys.executable, "-m", "unimoe", "curriculum", "--config", str(missing), "--dry_run"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "shards/tts" in proc.stderr and "unimoe tokenize" in proc.stderr


def test_recipe_variables_and_merging(tmp_path, monkeypatch):
    assert substitute("${data_root}/shards/tts", tmp_path, "f.yaml") == f"{tmp_path}/shards/tts"
    monkeypatch.setenv("UNIMOE_TEST_VAR", "abc")
    assert substitute("x-${env:UNIMOE_TEST_VAR}-${env:UNIMOE_UNSET_VAR,dflt}", None, "f.yaml") == "x-abc-dflt"
    with pytest.raises(RecipeError, match=r"f.yaml uses \$\{data_root\} but no data root is set"):
        substitute("${data_root}/x", None, "f.yaml")
    with pytest.raises(RecipeError, match=r"unknown variable \$\{dataroot\}"):
        substitute("${dataroot}/x", tmp_path, "f.yaml")
    merged = deep_merge({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3], "e": 2}, "d": None})
    assert merged == {"a": {"b": 1, "c": [3], "e": 2}, "d": None}
    # the shipped demo curriculum parses and resolves its data root from the file, the env var and the flag
    monkeypatch.delenv("UNIMOE_DATA_ROOT", raising=False)
    cur = load_curriculum(RECIPES / "curriculum.yaml")
    assert cur.data_root == (REPO / "data" / "demo").resolve() and [s.name for s in cur.stages] == ALL_STAGES
    monkeypatch.setenv("UNIMOE_DATA_ROOT", str(tmp_path))
    assert load_curriculum(RECIPES / "curriculum.yaml").data_root == tmp_path.resolve()
    assert load_curriculum(RECIPES / "curriculum.yaml", data_root="/x/y").data_root == Path("/x/y")
    paper = load_curriculum(RECIPES / "paper" / "curriculum.yaml", data_root="/data")
    assert [s.kind for s in paper.stages].count("fit") == 6


def test_final_models_are_folders_and_older_runs_ckpt_files_still_count(tmp_path):
    from generation_helpers import tiny_model

    from unimoe.checkpoint import CheckpointMetadata, save_model

    cur = load_curriculum(RECIPES / "curriculum.yaml", data_root=str(tmp_path))
    cur.root = tmp_path / "runs"
    stage = cur.stage("specialist_tts")
    d = stage.directory(cur.root)
    assert stage.final_checkpoint(cur.root) == d / "final" and stage_status(cur, stage) == "pending"
    model = tiny_model("tiny")
    save_model(d / "final.ckpt", model, CheckpointMetadata(config=model.config, stage="specialist"))  # an older run
    (d / "DONE.json").write_text("{}")
    assert stage.final_checkpoint(cur.root) == d / "final.ckpt" and stage_status(cur, stage) == "done"
    assert final_model(tmp_path / "runs" / "upcycle", "upcycle") == tmp_path / "runs" / "upcycle" / "upcycled"


def test_paper_recipes_are_valid_lightningcli_configs():
    from unimoe.training.curriculum import compose_stage, upcycle_options, validate_stage_config

    cur = load_curriculum(RECIPES / "paper" / "curriculum.yaml", data_root="/data/unimoe")
    assert cur.launcher == "subprocess"
    fits = [s for s in cur.stages if s.kind == "fit"]
    for stage in fits:
        cfg = compose_stage(cur, stage)
        validate_stage_config(cfg, stage)  # the real parser, no instantiation
        assert cfg["trainer"]["default_root_dir"] == str(cur.root / stage.name)
    up = upcycle_options(cur, cur.stage("upcycle"))
    assert up["moe"].num_routed_experts == 4 * up["pieces"] == 8 and up["moe"].routed_intermediate_size == 2752
    warmup = compose_stage(cur, cur.stage("warmup"))
    assert warmup["model"]["init_args"]["init_from"] == str(cur.root / "upcycle" / "upcycled")
    assert warmup["model"]["init_args"]["optimizer"]["lr"] == 3e-5
    assert compose_stage(cur, cur.stage("joint"))["model"]["init_args"]["optimizer"]["lr"] == 1e-5
    assert compose_stage(cur, cur.stage("specialist_t2m"))["model"]["init_args"]["optimizer"]["lr"] == 1e-4


def test_ddp_stages_through_the_subprocess_launcher_sum_routing_over_ranks(tmp_path_factory):
    """Two CPU ranks (gloo): the warmup stage's routing counts cover the whole validation set."""
    from unimoe.data.datamodule import UniMoEDataModule
    from unimoe.model.config import AudioLMConfig

    data = tiny_data(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("ddp")
    quiet = {"enable_progress_bar": False, "log_every_n_steps": 1, "num_sanity_val_steps": 0}
    tiny_data_args = {"init_args": {"max_tokens": 2048}}
    config = write(work / "ddp.yaml", {
        "name": "ddp", "root": str(work / "runs"), "launcher": "subprocess", "checkpoint_every_n_steps": 2,
        "stages": [
            {"name": "specialist", "config": str(RECIPES / "demo" / "specialist.yaml"),
             "model": {"init_args": {"label": "tts", "model": TINY_MODEL}},
             "data": deep_merge(tiny_data_args, {"init_args": {"sources": {"tts": "${data_root}/shards/tts"}}}),
             "trainer": {**quiet, "max_steps": 1, "limit_val_batches": 0, "callbacks": []}},
            {"name": "upcycle", "upcycle": {"specialists": ["specialist"], "pieces": 2, "moe": {
                "num_routed_experts": 2, "routed_intermediate_size": 64, "num_shared_experts": 1,
                "shared_intermediate_size": 32}}},
            {"name": "warmup", "config": str(RECIPES / "demo" / "warmup.yaml"), "init_from": "upcycle",
             "data": deep_merge(tiny_data_args, {"init_args": {"seed_size": 8}}),
             "trainer": {**quiet, "max_steps": 2, "val_check_interval": 2, "accelerator": "cpu", "devices": 2,
                         "strategy": "ddp", "use_distributed_sampler": False,
                         "callbacks": [{"class_path": "ExpertLoadMonitor", "init_args": {"log_every_n_steps": 1}}]}},
        ]})
    proc = run_curriculum(config, data, work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    raw = json.loads((work / "runs" / "warmup" / "plots" / "routing_val_step0000002.json").read_text())
    dm = UniMoEDataModule(sources={t: str(data / "shards" / t) for t in ("tts", "t2m", "v2m")},
                          model=AudioLMConfig(**TINY_MODEL), max_tokens=2048)
    dm.setup("validate")
    real_tokens = sum(int(batch.attention_mask.sum()) for batch in dm.val_dataloader())
    assert raw["num_tokens"] == [real_tokens, real_tokens]  # both ranks' shares, summed, once each
