#!/usr/bin/env python
"""Feed the real commands one bad input of each class and print what the user sees.

    .venv/bin/python scripts/bad_inputs.py [--data TINY_DATA_ROOT] [--json out.json]

Each case runs ``python -m unimoe ...`` in a scratch folder on a tiny data root
(:mod:`unimoe.data.demo.tiny`, built when ``--data`` is not given) and records the exit code
and the message. A case passes when the command fails (exit code != 0) with a message that
names the bad file or field and no Python traceback, and leaves its inputs as they were
(every file a case hands to the command is hashed before and after). One class is skipped by
design instead of failing the run: an unreadable clip during ``tokenize`` is left out, named
with its reason in ``skipped.jsonl`` (the rest of the corpus is encoded). Prints a JSON list;
exits 1 if any case does not pass. docs/reliability.md lists the measured messages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path


def _unimoe(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("UNIMOE_DATA_ROOT", None)
    return subprocess.run([sys.executable, "-m", "unimoe", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _digest(paths: list[Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _message(output: str, names: str) -> str:
    """The line the user reads about the problem: the first naming it, else the last error line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    naming = [i for i, line in enumerate(lines) if names.lower() in line.lower()]
    if naming:  # with the line after it when the naming line only introduces it ('Parser key "lr":')
        i = naming[0]
        return " ".join(lines[i: i + 2]) if lines[i].endswith(":") and i + 1 < len(lines) else lines[i]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors[-1:] or lines[-1:] or [""])[0]


def cases(work: Path, data: Path) -> list[dict]:
    """(class, argv, must-name, inputs) of every bad-input case, built under ``work``."""
    manifest = data / "corpus" / "manifests" / "tts.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    audio_dir = manifest.parent
    out = []

    def manifest_with(name: str, row: dict) -> Path:
        path = work / f"{name}.jsonl"
        fixed = {**row}
        for key in ("audio", "prompt_audio"):
            if key in fixed and not Path(fixed[key]).is_absolute():
                fixed[key] = str((audio_dir / fixed[key]).resolve())
        path.write_text(json.dumps(fixed) + "\n")
        return path

    m = manifest_with("missing_audio", {**rows[0], "audio": str(work / "nowhere.wav")})
    out.append(("missing audio file", ["data", "validate", "--check-files", str(m)], "nowhere.wav", [m]))
    corrupt = work / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    m = manifest_with("corrupt_audio", {**rows[1], "audio": str(corrupt)})
    out.append(("corrupt audio file (skipped)", ["tokenize", "--manifest", str(m), "--codec", str(data / "codec.pt"),
                                                 "--out", str(work / "shards_corrupt"), "--quiet"], rows[1]["id"], [m, corrupt]))
    m = manifest_with("empty_text", {**rows[2], "text": ""})
    out.append(("empty text (tts)", ["data", "validate", str(m)], "text", [m]))
    out.append(("unknown plug-in name", ["tokenize", "--manifest", str(manifest), "--codec", "no_such_codec",
                                         "--out", str(work / "shards_unknown"), "--quiet"], "no_such_codec", [manifest]))
    torn = work / "torn.pt"
    good = data / "codec.pt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out.append(("corrupt codec weights", ["tokenize", "--manifest", str(manifest), "--codec", str(torn),
                                          "--out", str(work / "shards_torn"), "--quiet"], "torn.pt", [torn]))
    folder = work / "model_no_config"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    out.append(("model folder without config.json", ["generate", "--ckpt", str(folder), "--task", "t2m", "--text",
                                                     "calm piano", "--out", str(work / "gen")], "model_no_config", [folder]))
    ckpt = work / "half.ckpt"
    ckpt.write_bytes(good.read_bytes()[:1000])
    out.append(("truncated checkpoint", ["upcycle", "--specialists", str(ckpt), str(ckpt), "--out", str(work / "up"),
                                         "--moe.num_routed_experts", "4", "--moe.routed_intermediate_size", "64"],
                "half.ckpt", [ckpt]))
    bad_cur = work / "bad_curriculum.yaml"
    bad_cur.write_text(textwrap.dedent("""\
        name: bad
        checkpoint_every_n_step: 2
        stages:
          - {name: a, config: a.yaml}
        """))
    out.append(("bad config: unknown curriculum field", ["curriculum", "--config", str(bad_cur), "--root",
                                                          str(work / "runs_bad")], "checkpoint_every_n_step", [bad_cur]))
    bad_stage = work / "bad_stage.yaml"
    bad_stage.write_text(textwrap.dedent(f"""\
        model:
          class_path: SpecialistStage
          init_args: {{model: tiny, label: tts, optimizer: {{lr: fast}}}}
        data:
          class_path: unimoe.data.datamodule.UniMoEDataModule
          init_args: {{sources: {{tts: {data / 'shards' / 'tts'}}}, model: tiny}}
        trainer: {{max_steps: 1, default_root_dir: {work / 'runs_fit'}}}
        """))
    out.append(("bad config: wrong value type", ["fit", "--config", str(bad_stage)], 'Parser key "lr"', [bad_stage]))
    layout = work / "layout.yaml"
    layout.write_text(textwrap.dedent(f"""\
        model:
          class_path: JointStage
          init_args:
            model: {{preset: tiny, moe: {{num_routed_experts: 3, routed_intermediate_size: 64}}}}
        data:
          class_path: unimoe.data.datamodule.UniMoEDataModule
          init_args: {{sources: {{tts: {data / 'shards' / 'tts'}}}, model: tiny}}
        trainer:
          devices: 2
          strategy:
            class_path: unimoe.training.parallel.MoEParallelStrategy
            init_args: {{expert_parallel_size: 2}}
        """))
    out.append(("a layout that does not divide", ["plan", "--config", str(layout)], "expert", [layout]))
    return [{"class": c, "argv": a, "names": n, "inputs": i} for c, a, n, i in out]


def run(work: Path, data: Path) -> list[dict]:
    results = []
    for case in cases(work, data):
        before = _digest(case["inputs"])
        proc = _unimoe(case["argv"], cwd=work)
        output = proc.stderr + proc.stdout
        skipped = case["class"].endswith("(skipped)")
        if skipped:  # the clip is left out and named, with its reason, in skipped.jsonl
            record = Path(case["argv"][case["argv"].index("--out") + 1]) / "skipped.jsonl"
            output += record.read_text(encoding="utf-8") if record.is_file() else ""
        message = _message(output, case["names"])
        problems = []
        if (proc.returncode == 0) != skipped:
            problems.append("the command succeeded" if proc.returncode == 0 else "the command failed")
        if "Traceback (most recent call last)" in proc.stderr:
            problems.append("a traceback was printed")
        if case["names"].lower() not in output.lower():
            problems.append(f"the message does not name {case['names']!r}")
        if _digest(case["inputs"]) != before:
            problems.append("an input changed")
        results.append({"class": case["class"], "command": "unimoe " + " ".join(
            Path(a).name if os.sep in a else a for a in case["argv"]), "exit_code": proc.returncode,
            "message": message, "ok": not problems, "problems": problems})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="an existing tiny data root (unimoe.data.demo.tiny); default: build one")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    from unimoe.data.demo.tiny import build_tiny_data

    work = Path(tempfile.mkdtemp(prefix="unimoe-bad-inputs-"))
    try:
        data = Path(args.data).resolve() if args.data else build_tiny_data(work / "data")
        results = run(work, data)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
