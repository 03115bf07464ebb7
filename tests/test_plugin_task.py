"""A plug-in task works end to end without core edits, and installing it moves no existing task id.

``plugins/unimoe-example-task`` (task ``t2a``, text-to-sound) is pip-installed into a temporary
directory. A checkpoint is trained BEFORE the plug-in is visible; then a FRESH interpreter with
the plug-in on its path validates and tokenises a ``t2a`` manifest, continues training from
that checkpoint on ``t2m`` + ``t2a`` data, and generates a ``t2a`` clip from the result,
reporting what each step saw.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training_helpers import tiny_data

from unimoe.checkpoint import METADATA_KEY, read_checkpoint
from unimoe.data.datamodule import UniMoEDataModule
from unimoe.training.stages import SpecialistStage

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugins" / "unimoe-example-task"

CHILD = r'''
import json, sys
from pathlib import Path
import lightning as L
from unimoe.checkpoint import read_checkpoint, read_metadata
from unimoe.data.datamodule import UniMoEDataModule
from unimoe.data.manifest import ManifestError, read_manifest, write_manifest
from unimoe.data.tokenize import tokenize_manifest
from unimoe.evaluation.manifest import task_family
from unimoe.generation import GenerationRequest, load_generator
from unimoe.generation.inputs import InputError
from unimoe.training.stages import SpecialistStage

data, work = Path(sys.argv[1]), Path(sys.argv[2])
before, legacy = work / "before.ckpt", work / "legacy.ckpt"
codec = {"name": "spectral_rvq", "path": str(data / "codec.pt")}
out = {}

# data: a t2a manifest (the corpus' music clips described as sounds), validated from the task's declarations
entries = read_manifest(data / "corpus" / "manifests" / "t2m.jsonl")
for e in entries:
    e.id, e.task = "sfx-" + e.id, "t2a"
write_manifest(work / "t2a.jsonl", entries)
bad = work / "bad.jsonl"
bad.write_text(json.dumps({"id": "x", "task": "t2a", "audio": entries[0].audio}) + "\n")
try:
    read_manifest(bad)
except ManifestError as exc:
    out["manifest_error"] = str(exc.problems[0])
tokenize_manifest(work / "t2a.jsonl", codec, work / "shards" / "t2a", progress=False)

# ids of checkpoints written before the plug-in was installed
out["before_ids"] = read_metadata(read_checkpoint(before)).task_table().names
out["legacy_ids"] = read_metadata(read_checkpoint(legacy)).task_table().names

# training: continue the old checkpoint on t2m + the plug-in task
stage = SpecialistStage(init_from=str(before))
dm = UniMoEDataModule(sources={"t2m": str(data / "shards" / "t2m"), "t2a": str(work / "shards" / "t2a")},
                      max_tokens=2048, mix="balanced")
trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, default_root_dir=str(work / "run"), num_sanity_val_steps=0,
                    val_check_interval=3, check_val_every_n_epoch=None)
trainer.fit(stage, dm)
out["metrics"] = sorted(k for k in trainer.callback_metrics if "loss" in k)
trainer.save_checkpoint(work / "after.ckpt", weights_only=True)
meta = read_metadata(read_checkpoint(work / "after.ckpt"))
out["after_ids"], out["after_tasks"] = meta.task_ids, sorted(meta.tasks)

# generation and evaluation
gen = load_generator(work / "after.ckpt", device="cpu", dtype="fp32")
gen.settings.max_seconds = 0.5
clip = gen.generate([GenerationRequest(id="rain", task="t2a", text="rain on a tin roof", seed=3)])[0]
out["clip"] = {"task": clip.task, "codebooks": int(clip.codes.shape[0]), "frames": int(clip.codes.shape[1]),
               "samples": int(clip.wav.shape[-1])}
try:
    gen.generate([GenerationRequest(id="silent", task="t2a")])
except InputError as exc:
    out["request_error"] = str(exc)
out["family"] = task_family("t2a")
print("RESULT " + json.dumps(out))
'''


def test_a_plugin_task_trains_generates_and_keeps_existing_ids(tmp_path_factory):
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available in this interpreter, so the plug-in cannot be installed")
    data = tiny_data(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("plugin_task")

    # a checkpoint trained before the plug-in exists: its data has tts and t2m
    stage = SpecialistStage(model="tiny", codec={"name": "spectral_rvq", "path": str(data / "codec.pt")})
    dm = UniMoEDataModule(sources={t: str(data / "shards" / t) for t in ("tts", "t2m")}, max_tokens=2048)
    import lightning as L

    L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(work / "before"), num_sanity_val_steps=0,
              limit_val_batches=0).fit(stage, dm)
    stage.trainer.save_checkpoint(work / "before.ckpt", weights_only=True)
    before = read_checkpoint(work / "before.ckpt")
    ids_before = before[METADATA_KEY]["task_ids"]
    assert ids_before == ["t2m", "tts"]  # the data's tasks, numbered when the model first met them
    del before[METADATA_KEY]["task_ids"]  # ... and the same checkpoint as an older unimoe wrote it
    torch.save(before, work / "legacy.ckpt")

    site = tmp_path_factory.mktemp("site")
    src = work / "src"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input",
                          "--disable-pip-version-check", "--target", str(site), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(data), str(work)], capture_output=True, text=True,
                           timeout=600, env=env, cwd=work)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    result = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("RESULT "))[7:])

    assert "field 'text': task 't2a' needs a non-empty text (description)" in result["manifest_error"]
    assert result["before_ids"] == ids_before  # installing the plug-in renumbered nothing
    assert result["legacy_ids"] == ["tts", "t2m", "v2m", "t2a"]  # old checkpoints: the old order, plug-ins after
    assert result["after_ids"] == ids_before + ["t2a"]  # the new task gets the next id; the others keep theirs
    assert {"t2a", "t2m", "tts"} <= set(result["after_tasks"])
    assert {"train/loss/t2a", "val/loss/t2a", "val/loss/sound", "val/loss/music"} <= set(result["metrics"])
    assert result["clip"]["task"] == "t2a" and result["clip"]["codebooks"] == 4 and result["clip"]["frames"] >= 1
    assert "needs a non-empty description" in result["request_error"]
    assert result["family"] == "sound"
