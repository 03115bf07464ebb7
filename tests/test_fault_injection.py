"""Fault injection on the real commands, a few kills each (the many-trial run is
``scripts/fault_injection.py``, see docs/training.md "Fault injection").

Each kill is a SIGKILL of the command's whole process group; after it no file under a
final name may be unreadable, and the re-run must finish with results equal, bit for bit,
to an uninterrupted run's.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training_helpers import tiny_data
from unimoe.fault_injection import (
    Scenario, check_files, differences, prepare, reference, run_once, run_trials, trial, write_kind,
)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("faults"), tiny_data(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def references(scenarios):
    return {}


def _reference(scenarios, references, name):
    if name not in references:
        references[name] = reference(scenarios[name])
    return references[name]


def _write_number(ref, kind: str) -> int:
    """The middle write of that kind in the reference run (1-based)."""
    numbers = [i + 1 for i, w in enumerate(ref.writes) if write_kind(w) == kind]
    assert numbers, f"the reference run made no {kind} write: {ref.writes}"
    return numbers[len(numbers) // 2]


# (command, the kind of write to kill inside, then kills of the resumed run as fractions of the duration)
PLANS = [
    ("tokenize", "shard", [0.6]),
    ("tokenize", "shard index", []),
    ("upcycle", "model folder", []),
    ("evaluate", "status/report", [0.7]),
    ("curriculum", "checkpoint", [0.5]),
    ("study", "status/report", [0.5]),
]


@pytest.mark.parametrize("command, kind, times", PLANS, ids=[f"{p[0]}-{p[1]}" for p in PLANS])
def test_killed_command_reruns_to_the_uninterrupted_result(scenarios, references, command, kind, times):
    scenario = scenarios[command]
    ref, digest = _reference(scenarios, references, command)
    plan = [("write", _write_number(ref, kind))] + [("time", t) for t in times]
    result = trial(scenario, ref, digest, random.Random(0), 0, plan=plan, log=lambda m: None)
    assert result.kills[0].killed and result.kills[0].write_kind == kind
    assert result.survived, result.problems


@pytest.mark.parametrize("written", [".final.tmp.ckpt", "final_metrics.json", "/final"])
def test_a_kill_while_the_stage_is_finalised_still_finishes_it(scenarios, references, written):
    """Killed inside the write of the final model's checkpoint (after the last last.ckpt, at
    max_steps: the re-run has nothing left to train, and Lightning skips its loop and
    on_train_end), inside final_metrics.json's, or inside the final/ model folder's: the
    re-run must still leave final/ and final_metrics.json equal to the uninterrupted run's."""
    scenario = scenarios["curriculum"]
    ref, digest = _reference(scenarios, references, "curriculum")
    numbers = [i + 1 for i, w in enumerate(ref.writes) if w.endswith(written)]
    assert len(numbers) == 1
    result = trial(scenario, ref, digest, random.Random(0), 0, plan=[("write", numbers[0])], log=lambda m: None)
    assert result.kills[0].killed and result.survived, result.problems


def test_the_checks_can_fail(scenarios, references, tmp_path):
    """A torn checkpoint is found, and a different result is reported as different."""
    ref, digest = _reference(scenarios, references, "upcycle")
    good = (scenarios["upcycle"].out / "upcycled" / "model.safetensors").read_bytes()
    torn = tmp_path / "torn"
    (torn / "final").mkdir(parents=True)
    (torn / "final" / "model.safetensors").write_bytes(good[: len(good) // 2])
    (torn / "last.ckpt").write_bytes(b"PK\x03\x04 half a zip")
    (torn / "status.json").write_text('{"step": 3')
    (torn / ".last.ckpt.tmp-1").write_bytes(b"half")  # temporaries are never read: not a problem
    problems = check_files(torn)
    assert [p.split(":")[0] for p in problems] == ["final/model.safetensors", "last.ckpt", "status.json"], problems
    other = Scenario("upcycle", scenarios["upcycle"].argv[:-2] + ["--seed", "7", "--overwrite", "true"],
                     scenarios["upcycle"].out, scenarios["upcycle"].digest)
    assert run_once(other).returncode == 0
    assert differences(other.digest(other.out), digest)  # other router init: other weights


def test_a_kill_lands_inside_the_chosen_write(scenarios, references):
    scenario = scenarios["upcycle"]
    ref, _ = _reference(scenarios, references, "upcycle")
    shutil.rmtree(scenario.out, ignore_errors=True)
    run = run_once(scenario, kill_at_write=1)
    assert run.returncode == -signal.SIGKILL and len(run.writes) == 1
    left = sorted(p.name for p in scenario.out.iterdir())
    assert left == [".upcycled.tmp-" + left[0].rsplit("-", 1)[1]]  # complete temporary folder, never renamed
    assert check_files(scenario.out) == []


def test_summary_counts_kill_points(scenarios):
    summary = run_trials({"upcycle": scenarios["upcycle"]}, trials=1, seed=5, max_kills=2, log=lambda m: None)
    row = summary["commands"]["upcycle"]
    assert row["trials"] == 1 and row["survived"] == 1
    assert row["kill_points_tried"] >= 1 and row["kill_points_survived"] == row["kills_landed"]
    assert row["failures"] == []


def test_script_help():
    script = Path(__file__).parents[1] / "scripts" / "fault_injection.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--trials" in out.stdout


@pytest.mark.slow
def test_a_kill_inside_a_sharded_checkpoint_write_resumes_bit_identical(scenarios, references):
    """2 CPU ranks under MoEParallelStrategy (FSDP2): killed while a sharded last.ckpt folder is
    swapped in, then again mid-run; the re-run resumes and its final model equals the
    uninterrupted run's bit for bit."""
    scenario = scenarios["curriculum_sharded"]
    ref, digest = _reference(scenarios, references, "curriculum_sharded")
    numbers = [i + 1 for i, w in enumerate(ref.writes) if w.endswith("checkpoints/last.ckpt")]
    result = trial(scenario, ref, digest, random.Random(0), 0, plan=[("write", numbers[len(numbers) // 2]), ("time", 0.5)],
                   log=lambda m: None)
    assert result.kills[0].killed and result.survived, result.problems
