"""``unimoe upcycle``: merge dense specialist checkpoints into one MoE checkpoint.

    unimoe upcycle --specialists tts/final t2m/final v2m/final --out upcycled \\
        --moe.num_routed_experts 6 --moe.routed_intermediate_size 256 [--pieces 2] [--router_init grouped]
    unimoe upcycle --config upcycle.yaml

Each specialist's SwiGLU FFN is split into ``pieces`` routed experts (specialist ``s``
owns experts ``s*pieces .. s*pieces+pieces-1``); attention, norms and embeddings are
averaged; the vision encoder comes from the video specialist. ``moe.routed_intermediate_size``
must equal the specialists' ``intermediate_size / pieces`` and ``moe.num_routed_experts``
must equal ``len(specialists) * pieces`` (see docs/training.md, "Upcycling"). The output is
a self-describing model folder (``model.safetensors`` + ``config.json``; a ``.ckpt`` file when
``--out`` ends in ``.ckpt``) that ``WarmupStage(init_from=...)`` reads.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from unimoe.checkpoint import CheckpointError
    from unimoe.training.upcycle import UpcycleError, upcycle_checkpoints

    parser = ArgumentParser(prog="unimoe upcycle", description=__doc__, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    parser.add_function_arguments(upcycle_checkpoints, fail_untyped=True)
    args = parser.parse_args(_lists_as_json(list(sys.argv[1:] if argv is None else argv)))
    kwargs = parser.instantiate(args).as_dict()
    kwargs.pop("config", None)
    kwargs.pop("__path__", None)
    try:
        path = upcycle_checkpoints(**kwargs)
    except (UpcycleError, CheckpointError, FileExistsError, ValueError) as exc:
        print(f"unimoe upcycle: error: {exc}", file=sys.stderr)
        return 1
    from unimoe.checkpoint import open_model_file

    meta = open_model_file(path).metadata
    print(json.dumps({"out": str(path), "experts": meta.extra.get("expert_labels"),
                      "vision_from": meta.extra["upcycle"]["vision_from"]}, indent=2))
    return 0


LIST_OPTIONS = ("--specialists", "--names", "--moe_layers")


def _lists_as_json(argv: list[str]) -> list[str]:
    """``--specialists a b c`` (shell style) -> ``--specialists ["a", "b", "c"]`` for jsonargparse."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in LIST_OPTIONS:
            values = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if len(values) == 1 and values[0].lstrip().startswith("["):
                out += [arg, values[0]]
            else:
                out += [arg, json.dumps([_number(v) if arg == "--moe_layers" else v for v in values])]
            continue
        out.append(arg)
        i += 1
    return out


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return text
