"""Model files never run code when read: safetensors model folders, weights-only ``.ckpt`` files,
one clear error per bad file (from the API and from every command that reads models), and
``unimoe export`` round trips exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from generation_helpers import tiny_model, write_checkpoint

from unimoe.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    load_model,
    open_model_file,
    plain_json,
    save_model_checkpoint,
    save_model_folder,
)
from unimoe.cli import main as unimoe
from unimoe.model.tasks import build_task_builder, collate

pytestmark = pytest.mark.usefixtures("single_thread")
HELPERS = Path(__file__).parent / "helpers"


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint does to whoever loads it unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture()
def crafted(tmp_path) -> tuple[Path, Path]:
    """A .ckpt shaped like a unimoe checkpoint whose metadata is a code-running pickle."""
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "unimoe": _Payload(marker)}, path)
    return path, marker


def _batch(model, n: int = 2):
    builder = build_task_builder("t2m", model.config)
    g = torch.Generator().manual_seed(0)
    seqs = [builder.build(torch.randint(0, 16, (4, 5 + i), generator=g), text=f"piano {i}") for i in range(n)]
    return collate(seqs)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch, logits="all").logits


# ---------------------------------------------------------------------- crafted pickles
def test_crafted_pickle_is_refused_and_its_payload_never_runs(crafted):
    path, marker = crafted
    with pytest.raises(CheckpointError, match="refusing to load .*crafted.ckpt.*could run code"):
        load_model(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        open_model_file(path)
    assert not marker.exists()


def test_commands_refuse_a_crafted_checkpoint_with_one_line(crafted, tmp_path, capsys):
    path, marker = crafted
    commands = [
        ["generate", "--ckpt", str(path), "--task", "t2m", "--text", "x", "--out", str(tmp_path / "g")],
        ["export", str(path), str(tmp_path / "e")],
        ["evaluate", "--suite", "demo", "--ckpt", str(path), "--manifest", str(tmp_path / "m.jsonl"), "--no-mlflow",
         "--out", str(tmp_path / "ev")],
        ["upcycle", "--specialists", str(path), str(path), "--out", str(tmp_path / "u"),
         "--moe.num_routed_experts", "4", "--moe.routed_intermediate_size", "64"],
    ]
    for argv in commands:
        assert unimoe(argv) != 0, argv
        err = capsys.readouterr().err
        assert "refusing to load" in err and "crafted.ckpt" in err and "Traceback" not in err, (argv, err)
    assert not marker.exists()
    assert not (tmp_path / "e").exists() and not (tmp_path / "u").exists()


def test_fit_refuses_a_crafted_init_from(crafted, tmp_path):
    path, marker = crafted
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "unimoe", "fit", "--model", "SpecialistStage", "--model.init_args.init_from", str(path),
         "--data", "boring_stage.BoringData", "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "r")],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refusing to load" in proc.stderr and "crafted.ckpt" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------- broken and foreign files
def _broken_files(tmp: Path, ckpt: Path, folder: Path) -> dict[str, Path]:
    files = {}
    data = ckpt.read_bytes()
    (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    files["truncated .ckpt"] = tmp / "truncated.ckpt"
    (tmp / "random.ckpt").write_bytes(os.urandom(4096))
    files["random bytes"] = tmp / "random.ckpt"
    torch.save({"weights": torch.zeros(2)}, tmp / "foreign.ckpt")
    files["foreign .ckpt"] = tmp / "foreign.ckpt"

    from safetensors.torch import save_file

    save_file({"embed.weight": torch.zeros(3, 2)}, str(tmp / "bare.safetensors"))
    files["bare safetensors"] = tmp / "bare.safetensors"
    foreign = tmp / "foreign_weights"
    foreign.mkdir()
    (foreign / "config.json").write_text((folder / "config.json").read_text())
    save_file({"embed.weight": torch.zeros(3, 2)}, str(foreign / "model.safetensors"))
    files["non-unimoe safetensors in a model folder"] = foreign
    truncated = tmp / "truncated_weights"
    truncated.mkdir()
    (truncated / "config.json").write_text((folder / "config.json").read_text())
    weights = (folder / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) - 100])
    files["truncated safetensors"] = truncated
    (tmp / "no_config").mkdir()
    (tmp / "no_config" / "model.safetensors").write_bytes(weights)
    files["folder without config.json"] = tmp / "no_config"
    (tmp / "bad_json").mkdir()
    (tmp / "bad_json" / "config.json").write_text('{"format": "unimoe-model", ')
    (tmp / "bad_json" / "model.safetensors").write_bytes(weights)
    files["config.json with bad JSON"] = tmp / "bad_json"
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    files["a Hugging Face folder"] = tmp / "hf"
    (tmp / "no_weights").mkdir()
    (tmp / "no_weights" / "config.json").write_text((folder / "config.json").read_text())
    files["folder without weights"] = tmp / "no_weights"
    files["missing path"] = tmp / "does_not_exist"
    return files


def test_every_broken_or_foreign_file_gets_one_error_naming_it(ckpt, tmp_path, capsys):
    folder = tmp_path / "good"
    assert unimoe(["export", str(ckpt), str(folder)]) == 0
    capsys.readouterr()
    for what, path in _broken_files(tmp_path, ckpt, folder).items():
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        assert path.name in str(info.value), (what, info.value)
        assert unimoe(["generate", "--ckpt", str(path), "--task", "t2m", "--text", "x", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and path.name in err and "Traceback" not in err, (what, err)
        assert unimoe(["export", str(path), str(tmp_path / "exported")]) == 2, what
        err = capsys.readouterr().err
        assert path.name in err and "Traceback" not in err, (what, err)
        assert not (tmp_path / "exported").exists()


def test_errors_say_what_the_file_is(ckpt, tmp_path):
    folder = save_model_folder(tmp_path / "good", *load_model(ckpt))
    files = _broken_files(tmp_path, ckpt, folder)
    expected = {
        "truncated .ckpt": "truncated", "foreign .ckpt": "not a unimoe checkpoint",
        "bare safetensors": "bare safetensors file", "non-unimoe safetensors in a model folder": "does not match",
        "truncated safetensors": "not a valid safetensors file", "folder without config.json": "no config.json",
        "config.json with bad JSON": "not valid JSON", "a Hugging Face folder": "Hugging Face model",
        "folder without weights": "no model.safetensors", "missing path": "not found",
    }
    for what, text in expected.items():
        with pytest.raises(CheckpointError, match=text):
            load_model(files[what])


# ---------------------------------------------------------------------- export
def test_export_then_generate_gives_identical_logits_and_clips(ckpt, tmp_path, capsys):
    folder = tmp_path / "exported"
    assert unimoe(["export", str(ckpt), str(folder)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(folder) and sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "unimoe-model" and config["stage"] == "test" and config["codec"]["name"] == "spectral_rvq"

    original, meta = load_model(ckpt)
    exported, exported_meta = load_model(folder)
    assert exported_meta == meta
    batch = _batch(original)
    assert torch.equal(_logits(original, batch), _logits(exported, batch))
    for (name, a), (_, b) in zip(original.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name

    outs = []
    for source in (ckpt, folder):
        out = tmp_path / f"gen-{source.name}"
        assert unimoe(["generate", "--ckpt", str(source), "--task", "t2m", "--text", "calm piano", "--out", str(out),
                       "--max-seconds", "0.08", "--device", "cpu", "--seed", "5"]) == 0
        outs.append(out)
    capsys.readouterr()
    assert (outs[0] / "clip.wav").read_bytes() == (outs[1] / "clip.wav").read_bytes()


def test_export_bf16_and_refusals(ckpt, tmp_path, capsys):
    folder = tmp_path / "half"
    assert unimoe(["export", str(ckpt), str(folder), "--dtype", "bf16"]) == 0
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    original, _ = load_model(ckpt)
    half, _ = load_model(folder)  # bf16 tensors into the fp32 model: exactly the rounded values
    for (name, a), (_, b) in zip(original.state_dict().items(), half.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name
    assert (folder / "model.safetensors").stat().st_size < 0.6 * sum(t.numel() * 4 for t in original.state_dict().values())

    assert unimoe(["export", str(ckpt), str(folder)]) == 2
    assert "exists" in capsys.readouterr().err
    assert unimoe(["export", str(ckpt), str(folder), "--overwrite"]) == 0  # replaces the model folder
    assert {f.name for f in tmp_path.iterdir()} == {"half"}  # no temporary or old folders left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert unimoe(["export", str(ckpt), str(other), "--overwrite"]) == 2  # never replaces a folder it did not write
    assert "not a unimoe model folder" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"


def test_folder_and_ckpt_readers_agree(ckpt, tmp_path):
    model, meta = load_model(ckpt)
    folder = save_model_folder(tmp_path / "m", model, meta)
    via_ckpt, via_folder = open_model_file(ckpt), open_model_file(folder)
    assert via_ckpt.metadata == via_folder.metadata and sorted(via_ckpt.tensors) == sorted(via_folder.tensors)
    assert via_folder.checkpoint is None and via_ckpt.checkpoint is not None
    assert open_model_file(folder / "model.safetensors").path == folder  # the weights file names its folder


# ---------------------------------------------------------------------- metadata is plain JSON
def test_metadata_is_plain_json_and_loads_weights_only(tmp_path):
    model = tiny_model("tiny")
    meta = CheckpointMetadata(config=model.config, codec={"name": "spectral_rvq", "path": tmp_path / "c.pt"},
                              tasks={"t2m": {"name": "t2m", "cond_drop_prob": 0.1}}, extra={"lineage": ("a", "b")})
    data = meta.to_dict()
    assert json.loads(json.dumps(data)) == data and data["codec"]["path"] == str(tmp_path / "c.pt")
    path = save_model_checkpoint(tmp_path / "m.ckpt", model, meta)
    assert torch.load(path, weights_only=True)["unimoe"] == data
    with pytest.raises(CheckpointError, match=r"extra\.obj is a object"):
        CheckpointMetadata(config=model.config, extra={"obj": object()}).to_dict()
    assert plain_json({"k": [Path("/x"), (1, 2.5, None)]}) == {"k": ["/x", [1, 2.5, None]]}
