"""Fault injection: SIGKILL real ``unimoe`` commands at random moments, run them again, and
check that nothing was lost.

The promise under test is the README's "interrupt it at any time and run the same command
again". For each command (``tokenize``, one ``curriculum`` stage, ``upcycle``, ``evaluate``)
the harness

1. runs it once uninterrupted (the reference), with every atomic write traced
   (:func:`unimoe.atomic.fault_point`: files, model folders, the shard index, sharded checkpoints): its duration and its list of writes;
2. per trial (seeded), starts it in a fresh output folder and kills its whole process group
   with SIGKILL, either at a random time or exactly inside the n-th write (temporary file
   complete, not yet renamed: inside a checkpoint, model folder, shard, index or report
   write), once or twice in a
   row (a kill of the resumed run too);
3. after every kill checks that no file under a final name is half-written or corrupt
   (checkpoints, shards and safetensors load, JSON/YAML parse, the shard index matches its
   checksums, WAV and PNG are complete, SQLite passes its integrity check): a half-written
   file is never there to be read;
4. runs the same command to the end and checks that it succeeds and that its results
   (shards, checkpoint weights, metrics) equal the reference's: bit for bit, since every one of
   these commands is deterministic (training included, see :mod:`unimoe.training.determinism`).

``python scripts/fault_injection.py --trials 20`` runs it (``--help``); the tests run a few
kills per command (``tests/test_fault_injection.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from unimoe.atomic import FAULT_KILL_ENV, FAULT_TRACE_ENV

COMMANDS = ("tokenize", "curriculum", "upcycle", "evaluate", "study")
EXTRA_COMMANDS = ("curriculum_sharded",)
"""Not run by default: the curriculum stage on 2 CPU ranks under MoEParallelStrategy (FSDP2),
whose ``last.ckpt`` is a sharded checkpoint folder (about 4x the time of ``curriculum``)."""


@dataclass
class Scenario:
    """One command to kill: its argv (after ``python -m unimoe``), the folder it writes
    (emptied before every trial) and how to reduce its results to comparable values."""

    name: str
    argv: list[str]
    out: Path
    digest: Callable[[Path], Any]
    timeout: float = 600.0


@dataclass
class KillPoint:
    kind: str  # "time" or "write"
    where: str  # e.g. "t=3.21s (after 4 writes)" or "write 7: specialist_tts/checkpoints/last.ckpt"
    write_kind: str | None = None  # checkpoint / shard / json / ... for write kills
    killed: bool = True  # False: the run finished before the kill point


@dataclass
class Trial:
    command: str
    index: int
    kills: list[KillPoint] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def survived(self) -> bool:
        return not self.problems


@dataclass
class RunResult:
    returncode: int
    seconds: float
    writes: list[str]
    stderr: str


# ---------------------------------------------------------------------- running and killing
def run_once(scenario: Scenario, *, kill_after: float | None = None, kill_at_write: int | None = None,
             env: dict[str, str] | None = None) -> RunResult:
    """Run the command in its own process group; SIGKILL the group after ``kill_after`` seconds
    or inside its ``kill_at_write``-th atomic write."""
    with tempfile.NamedTemporaryFile("w", suffix=".trace", delete=False) as fh:
        trace = Path(fh.name)
    environment = {**os.environ, **(env or {}), FAULT_TRACE_ENV: str(trace), "OMP_NUM_THREADS": "1"}
    environment.pop(FAULT_KILL_ENV, None)
    if kill_at_write is not None:
        environment[FAULT_KILL_ENV] = str(kill_at_write)
    start = time.perf_counter()
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "unimoe", *scenario.argv], env=environment,
                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        proc.wait(timeout=kill_after if kill_after is not None else scenario.timeout)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"{scenario.name}: did not finish in {scenario.timeout:.0f} s")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _reap_group(proc.pid)
    seconds = time.perf_counter() - start
    writes = trace.read_text(encoding="utf-8").splitlines() if trace.exists() else []
    trace.unlink(missing_ok=True)
    err.seek(0)
    stderr = err.read()
    err.close()
    return RunResult(proc.returncode, seconds, writes, stderr)


def _reap_group(pgid: int) -> None:
    """Make sure no process of the group outlives the kill (workers, DDP ranks)."""
    for _ in range(100):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.02)


# ---------------------------------------------------------------------- what may be on disk
def check_files(folder: Path) -> list[str]:
    """Problems with files under a final name in ``folder`` (temporaries and locks, which start
    with a dot, are never read and not checked)."""
    problems = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if path.name.endswith(("-journal", "-wal", "-shm")):
            continue
        try:
            _check_file(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            problems.append(f"{rel}: {type(exc).__name__}: {str(exc)[:200]}")
    return problems


def _check_file(path: Path) -> None:
    suffix = path.suffix
    if suffix in (".pt", ".ckpt"):
        import torch

        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if path.name == "meta.pt" and any(path.parent.glob("*.distcp")):  # a sharded checkpoint: assemble it
            from unimoe.checkpoint import open_model_file

            dict(open_model_file(path.parent).tensors)
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                fh.get_tensor(key)
    elif suffix == ".npy":
        import numpy as np

        np.load(path, allow_pickle=False)
    elif path.name == "meta.json" and path.parent.name == "index":  # the shard index: every file as recorded
        meta = json.loads(path.read_text(encoding="utf-8"))
        for name, record in meta["files"].items():
            if hashlib.sha256((path.parent / name).read_bytes()).hexdigest() != record["sha256"]:
                raise ValueError(f"index/{name}: SHA-256 differs from index/meta.json")
    elif suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif suffix == ".jsonl":
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                json.loads(line)
    elif suffix in (".yaml", ".yml"):
        import yaml

        yaml.safe_load(path.read_text(encoding="utf-8"))
    elif suffix == ".wav":
        import soundfile as sf

        info = sf.info(str(path))
        if info.frames <= 0:
            raise ValueError("no audio frames")
        sf.read(str(path))
    elif suffix == ".png":
        data = path.read_bytes()
        if not (data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")):
            raise ValueError("truncated PNG")
    elif suffix == ".db":
        _check_sqlite(path)
    elif suffix == ".txt" and path.stat().st_size == 0:
        raise ValueError("empty")


def _check_sqlite(path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # on a copy: a hot journal is rolled back there, not here
        copy = Path(tmp) / path.name
        shutil.copy2(path, copy)
        journal = path.with_name(path.name + "-journal")
        if journal.exists():
            shutil.copy2(journal, copy.with_name(copy.name + "-journal"))
        con = sqlite3.connect(copy)
        try:
            (result,) = con.execute("PRAGMA integrity_check").fetchone()
        finally:
            con.close()
        if result != "ok":
            raise ValueError(f"sqlite integrity_check: {result}")


# ---------------------------------------------------------------------- comparable results
def canonical(value: Any) -> Any:
    """Tensors -> (dtype, shape, sha256 of the bytes); containers recursively; the rest as is."""
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
        return ["tensor", str(t.dtype), list(t.shape), hashlib.sha256(raw.numpy().tobytes()).hexdigest()]
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two canonical values differ (at most a few paths)."""
    if type(a) is not type(b):
        return [f"{where or '.'}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, dict):
        out = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{where}/{k}")
        return out[:10]
    if isinstance(a, list) and not (a and a[0] == "tensor"):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")][:10]
    return [] if a == b else [f"{where or '.'}: {str(a)[:80]} vs {str(b)[:80]}"]


def _model_digest(path: Path) -> Any:
    """A model folder's (or ``.ckpt``'s) weights and metadata."""
    from unimoe.checkpoint import open_model_file

    opened = open_model_file(path)
    return canonical({"tensors": dict(opened.tensors), "metadata": opened.metadata.to_dict()})


def tokenize_digest(out: Path) -> Any:
    import torch

    files = {}
    for path in sorted(p for p in out.iterdir() if not p.name.startswith(".")):
        if path.is_dir():  # the shard index: its files byte for byte
            files[path.name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}
        elif path.suffix == ".pt":
            files[path.name] = canonical(torch.load(path, map_location="cpu", weights_only=True))
        elif path.suffix == ".json":
            files[path.name] = json.loads(path.read_text(encoding="utf-8"))
        else:
            files[path.name] = path.read_text(encoding="utf-8")
    return files


def curriculum_digest(root: Path) -> Any:
    from unimoe.training.curriculum.schema import final_model

    stage = root / "specialist_tts"
    status = json.loads((root / "curriculum.json").read_text(encoding="utf-8"))
    stages = status.get("stages", status)
    done = stages.get("specialist_tts", {}).get("status") if isinstance(stages, dict) else None
    return {"final": _model_digest(final_model(stage)),
            "final_metrics": json.loads((stage / "final_metrics.json").read_text())["metrics"],
            "done_marker": (stage / "DONE.json").is_file(), "status": done}


def upcycle_digest(out: Path) -> Any:
    return _model_digest(out / "upcycled")


VOLATILE = ("seconds", "time", "created", "mlflow", "duration", "started", "finished", "elapsed")


def _strip_volatile(value: Any) -> Any:
    """``value`` without the fields that hold wall-clock times or run ids (they differ between runs)."""
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if not any(word in k.lower() for word in VOLATILE)}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def evaluate_digest(out: Path) -> Any:
    return _strip_volatile(json.loads((out / "results.json").read_text(encoding="utf-8")))


def study_digest(root: Path) -> Any:
    """The study's report (numbers per cell and arm, wall-clock fields dropped) and every final model."""
    report = json.loads((root / "report.json").read_text(encoding="utf-8"))
    models = {str(p.parent.relative_to(root)): _model_digest(p) for p in sorted(root.glob("stages/*/*/final"))}
    return {"report": _strip_volatile({k: v for k, v in report.items() if k != "source"}), "models": models}


# ---------------------------------------------------------------------- the commands
def prepare(root: Path, data: Path | None = None) -> dict[str, Scenario]:
    """Inputs under ``root/inputs`` (``data``: an existing tiny data root, else built) and the
    scenarios writing under ``root/run``."""
    from unimoe.data.demo.tiny import build_tiny_data

    root = Path(root).resolve()
    inputs = root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    data = Path(data).resolve() if data is not None else build_tiny_data(inputs / "data")
    run = root / "run"
    scenarios = {
        "tokenize": Scenario("tokenize", [
            "tokenize", "--manifest", str(data / "corpus" / "manifests" / "tts.jsonl"), "--codec",
            str(data / "codec.pt"), "--out", str(run / "tokenize"), "--workers", "2", "--shard-size", "4", "--quiet",
        ], run / "tokenize", tokenize_digest),
        "curriculum": Scenario("curriculum", ["curriculum", "--config", str(_curriculum(inputs, data)), "--root",
                                              str(run / "curriculum")], run / "curriculum", curriculum_digest),
        "curriculum_sharded": Scenario("curriculum_sharded", [
            "curriculum", "--config", str(_curriculum(inputs, data, ranks=2)), "--root", str(run / "curriculum_sharded"),
        ], run / "curriculum_sharded", curriculum_digest),
        "upcycle": Scenario("upcycle", [
            "upcycle", "--specialists", *map(str, _specialists(inputs, data)), "--out", str(run / "upcycle" / "upcycled"),
            "--pieces", "2", "--moe.num_routed_experts", "6", "--moe.routed_intermediate_size", "64",
            "--moe.num_shared_experts", "1", "--moe.shared_intermediate_size", "32", "--overwrite", "true",
        ], run / "upcycle", upcycle_digest),
        "evaluate": Scenario("evaluate", [
            "evaluate", "--suite", str(_suite(inputs)), "--wavs", str(_generated(inputs, data)), "--manifest",
            str(data / "corpus" / "manifests" / "all.jsonl"), "--out", str(run / "evaluate"),
        ], run / "evaluate", evaluate_digest),
        "study": Scenario("study", ["study", "--config", str(_study(inputs, data, run / "study"))], run / "study",
                          study_digest),
    }
    return scenarios


def _study(inputs: Path, data: Path, root: Path) -> Path:
    """Two arms x one seed over the one-stage curriculum: the second arm shares the first's stage and
    adds a fine-tuning stage, so a kill can land in a stage, between cells or in the report."""
    stage = _curriculum(inputs, data).parent / "stage.yaml"
    cur = inputs / "study_curriculum.yaml"
    cur.write_text(textwrap.dedent(f"""\
        name: fault-injection-study
        stages:
          - {{name: specialist_tts, config: {stage.name}}}
          - {{name: tuned, config: {stage.name}, init_from: specialist_tts, model: {{init_args: {{model: null}}}},
             trainer: {{max_steps: 8}}}}
        """))
    study = inputs / "study.yaml"
    study.write_text(textwrap.dedent(f"""\
        name: fault-injection-study
        root: {root}
        seeds: [0]
        checkpoint_every_n_steps: 2
        evaluate: null
        arms:
          - {{name: one, curriculum: {cur.name}, until: specialist_tts}}
          - {{name: two, curriculum: {cur.name}}}
        """))
    return study


def _curriculum(inputs: Path, data: Path, ranks: int = 1) -> Path:
    """One 16-step specialist stage; with ``ranks`` > 1 on that many CPU ranks under
    MoEParallelStrategy (FSDP2; its checkpoints are sharded folders)."""
    suffix = "" if ranks == 1 else f"_{ranks}ranks"
    parallel = "" if ranks == 1 else textwrap.indent(textwrap.dedent(f"""\
        accelerator: cpu
        devices: {ranks}
        use_distributed_sampler: false
        strategy:
          class_path: unimoe.training.parallel.MoEParallelStrategy
          init_args: {{expert_parallel_size: 1, mixed_precision: fp32}}
        """), "  ")
    stage = inputs / f"stage{suffix}.yaml"
    stage.write_text(textwrap.dedent(f"""\
        model:
          class_path: SpecialistStage
          init_args: {{model: tiny, label: tts, codec: {{name: spectral_rvq, path: {data / 'codec.pt'}}}}}
        data:
          class_path: unimoe.data.datamodule.UniMoEDataModule
          init_args: {{sources: {{tts: {data / 'shards' / 'tts'}}}, model: tiny, max_tokens: 1024, seed: 3}}
        trainer:
          max_steps: 16
          log_every_n_steps: 2
          enable_progress_bar: false
          enable_model_summary: false
          num_sanity_val_steps: 0
          val_check_interval: 8
          check_val_every_n_epoch: null
        """) + parallel)
    cur = inputs / f"curriculum{suffix}.yaml"
    cur.write_text(textwrap.dedent(f"""\
        name: fault-injection
        launcher: {"inprocess" if ranks == 1 else "subprocess"}
        checkpoint_every_n_steps: 2
        stages:
          - {{name: specialist_tts, config: {stage.name}}}
        """))
    return cur


def _specialists(inputs: Path, data: Path) -> list[Path]:
    import torch

    from unimoe.checkpoint import CheckpointMetadata, save_model_folder
    from unimoe.model.config import AudioLMConfig
    from unimoe.model.transformer import AudioLM

    cfg = AudioLMConfig.from_preset("tiny")
    paths = []
    for seed, task in enumerate(("tts", "t2m", "v2m"), start=1):
        path = inputs / "specialists" / task
        if not path.exists():
            torch.manual_seed(seed)
            meta = CheckpointMetadata(config=cfg, codec={"name": "spectral_rvq", "path": str(data / "codec.pt")},
                                      stage="specialist", extra={"data_tasks": [task], "label": task},
                                      task_ids=[task])
            save_model_folder(path, AudioLM(cfg), meta)
        paths.append(path)
    return paths


def _suite(inputs: Path) -> Path:
    suite = inputs / "suite.yaml"
    suite.write_text(textwrap.dedent("""\
        name: fault-injection
        description: cheap offline metrics for the fault-injection harness
        metrics:
          - {metric: fad, backend: mel_stats}
          - {metric: kl, backend: mel_stats}
        """))
    return suite


def _generated(inputs: Path, data: Path) -> Path:
    """'Generated' clips: the corpus's own audio under the manifest ids (plus a little gain)."""
    import soundfile as sf

    from unimoe.jsonl import iter_json_lines, resolve_path

    out = inputs / "generated"
    manifest = data / "corpus" / "manifests" / "all.jsonl"
    if not out.exists():
        tmp = inputs / ".generated.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for _, row, _ in iter_json_lines(manifest):
            wav, sr = sf.read(str(resolve_path(row["audio"], manifest.parent)), dtype="float32")
            sf.write(str(tmp / f"{row['id']}.wav"), wav * 0.8, sr)
        tmp.rename(out)
    return out


# ---------------------------------------------------------------------- trials
MODEL_FOLDERS = ("final", "upcycled")


def write_kind(path: str) -> str:
    name = Path(path).name
    if name.endswith(".ckpt"):  # last.ckpt, and .final.tmp.ckpt (the final model before it becomes a folder)
        return "checkpoint"
    if name in MODEL_FOLDERS:
        return "model folder"
    if name == "index":
        return "shard index"
    if name.startswith("shard-") and name.endswith(".pt"):
        return "shard"
    if name.endswith((".json", ".jsonl", ".yaml", ".txt", ".md")):
        return "status/report"
    if name.endswith((".png", ".wav")):
        return "plot/audio"
    return "other"


def reference(scenario: Scenario) -> tuple[RunResult, Any]:
    shutil.rmtree(scenario.out, ignore_errors=True)
    result = run_once(scenario)
    if result.returncode != 0:
        raise RuntimeError(f"{scenario.name}: the uninterrupted run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    problems = check_files(scenario.out)
    if problems:
        raise RuntimeError(f"{scenario.name}: the uninterrupted run left unreadable files: {problems}")
    return result, scenario.digest(scenario.out)


def trial(scenario: Scenario, ref: RunResult, ref_digest: Any, rng: random.Random, index: int,
          max_kills: int = 2, log: Callable[[str], None] = print,
          plan: list[tuple[str, float]] | None = None) -> Trial:
    """Kill the command 1..``max_kills`` times in a row, then let it finish and compare.

    ``plan`` fixes the kills instead of drawing them: ``("write", n)`` kills inside the n-th
    atomic write, ``("time", f)`` after the fraction ``f`` of the reference run's duration.
    """
    shutil.rmtree(scenario.out, ignore_errors=True)
    result = Trial(scenario.name, index)
    if plan is None:
        plan = []
        for _ in range(rng.randint(1, max_kills)):
            if rng.random() < 0.5 and ref.writes:
                plan.append(("write", rng.randint(1, len(ref.writes))))
            else:
                plan.append(("time", rng.uniform(0.05, 0.95)))
    for mode, value in plan:
        if mode == "write":
            n = int(value)
            run = run_once(scenario, kill_at_write=n)
            # named from this run's own trace: a resumed run writes fewer files than the reference
            written = run.writes[n - 1] if len(run.writes) >= n else None
            point = (KillPoint("write", f"write {n}: {_short(written, scenario.out)}", write_kind(written)) if written
                     else KillPoint("write", f"write {n} (the run made only {len(run.writes)})"))
        else:
            delay = float(value) * ref.seconds
            run = run_once(scenario, kill_after=delay)
            point = KillPoint("time", f"t={delay:.2f}s (after {len(run.writes)} writes)")
        point.killed = run.returncode == -signal.SIGKILL
        if not point.killed and run.returncode != 0:
            result.problems.append(f"{point.where}: the run failed on its own ({run.returncode}): {run.stderr[-500:]}")
        result.kills.append(point)
        result.problems += [f"after the kill at {point.where}: {p}" for p in check_files(scenario.out)]
        if not point.killed:
            break  # it finished before the kill point: nothing left to interrupt
    final = run_once(scenario)
    if final.returncode != 0:
        result.problems.append(f"the re-run failed ({final.returncode}): {final.stderr[-1500:]}")
    else:
        result.problems += [f"after the re-run: {p}" for p in check_files(scenario.out)]
        try:
            diff = differences(scenario.digest(scenario.out), ref_digest)
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable result is the finding
            diff = [f"the results cannot be read: {type(exc).__name__}: {exc}"]
        if diff:
            result.problems.append(f"results differ from the uninterrupted run: {diff}")
    status = "ok" if result.survived else "FAILED: " + " | ".join(result.problems)
    log(f"{scenario.name} trial {index}: kills {[k.where + ('' if k.killed else ' (finished first)') for k in result.kills]}: {status}")
    return result


def _short(path: str, out: Path) -> str:
    try:
        return str(Path(path).relative_to(out))
    except ValueError:
        return Path(path).name


def run_trials(scenarios: dict[str, Scenario], trials: int, seed: int = 0, max_kills: int = 2,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Reference + ``trials`` trials per scenario; returns the summary (JSON-ready)."""
    summary: dict[str, Any] = {"seed": seed, "trials_per_command": trials, "commands": {}}
    for name, scenario in scenarios.items():
        ref, ref_digest = reference(scenario)
        log(f"{name}: reference run {ref.seconds:.1f} s, {len(ref.writes)} atomic writes "
            f"({dict(Counter(write_kind(w) for w in ref.writes))})")
        rng = random.Random(f"{seed}:{name}")
        results = [trial(scenario, ref, ref_digest, rng, i, max_kills, log) for i in range(trials)]
        kills = [k for t in results for k in t.kills]
        summary["commands"][name] = {
            "reference_seconds": round(ref.seconds, 2), "reference_writes": len(ref.writes),
            "trials": len(results), "survived": sum(t.survived for t in results),
            "kill_points_tried": len(kills), "kills_landed": sum(k.killed for k in kills),
            "kill_points_survived": sum(k.killed for t in results if t.survived for k in t.kills),
            "by_kind": dict(Counter(k.write_kind or "time" for k in kills if k.killed)),
            "failures": [{"trial": t.index, "kills": [k.where for k in t.kills], "problems": t.problems}
                         for t in results if not t.survived],
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10, help="trials per command (each: 1-2 kills, then a full re-run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commands", nargs="*", default=list(COMMANDS), choices=COMMANDS + EXTRA_COMMANDS,
                   help=f"default: {' '.join(COMMANDS)}; also {' '.join(EXTRA_COMMANDS)} (2 CPU ranks, sharded checkpoints)")
    p.add_argument("--max-kills", type=int, default=2, help="kills in a row per trial (the resumed run is killed too)")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--data", default=None, help="an existing tiny data root (unimoe.data.demo.tiny); default: build one")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="unimoe-faults-"))
    try:
        scenarios = prepare(work, args.data)
        summary = run_trials({c: scenarios[c] for c in args.commands}, args.trials, args.seed, args.max_kills,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0 if all(c["survived"] == c["trials"] for c in summary["commands"].values()) else 1
