"""``unimoe plan``: per-device memory of a training stage, and whether it fits.

    unimoe plan --config recipes/paper/joint.yaml --model paper [--gpus 32] [--gpu-memory 80GB] [--json]
    unimoe plan --config recipes/paper/curriculum.yaml --stage joint [--strategy YAML] [--min-nodes]

The estimate and what it assumes: :mod:`unimoe.training.plan`, :mod:`unimoe.training.memory`
(how close it is to measured peaks: ``unimoe bench plan``, docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml


def _yaml_arg(text: str | None):
    if text is None:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not valid YAML: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe plan", description="Per-device memory of a training stage: parameters, "
                                "gradients, optimizer states, activations; whether it fits the GPUs.")
    p.add_argument("--config", required=True, help="a stage recipe (LightningCLI YAML) or a curriculum file")
    p.add_argument("--stage", default=None, help="the stage of a curriculum file to plan")
    p.add_argument("--gpus", type=int, default=None, help="devices in all (default: trainer.devices x trainer.num_nodes)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="devices per node, for the node count (default 8)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one device (default 80GB; GB = GiB = 2^30 bytes)")
    p.add_argument("--reserve", default="3GB",
                   help="kept free per device for the CUDA context, communication buffers and allocator slack (default 3GB)")
    p.add_argument("--model", default=None, help="the model instead of the recipe's: a preset, a YAML file or mapping")
    p.add_argument("--strategy", default=None, help="trainer.strategy instead of the recipe's (YAML: ddp, or "
                   "'{class_path: unimoe.training.parallel.MoEParallelStrategy, init_args: {expert_parallel_size: 4}}')")
    p.add_argument("--activation-checkpointing", choices=("on", "off"), default=None,
                   help="override the recipe's activation checkpointing")
    p.add_argument("--max-tokens", type=int, default=None, help="padded tokens per micro-batch (default data.init_args.max_tokens)")
    p.add_argument("--active-experts", type=float, default=None,
                   help="real routed experts per token (default: the router's upper bound)")
    p.add_argument("--videos", type=int, default=None, help="videos per micro-batch (default: from the shard index or the vision encoder)")
    p.add_argument("--data_root", "--data-root", dest="data_root", default=None, help="resolves ${data_root} in the recipe")
    p.add_argument("--min-nodes", action="store_true", help="also find the fewest nodes on which this strategy fits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _print_report(report: dict, where: str) -> None:
    s, w = report["strategy"], report["workload"]
    print(f"{where}: {report['stage_class']}, model from {report['model']['source']}")
    print(f"  model      {report['model']['total_params'] / 1e9:.3f}B parameters, {report['model']['trainable_params'] / 1e9:.3f}B "
          f"trainable ({'MoE' if report['model']['moe'] else 'dense'}, {report['model']['layers']} layers)")
    layout = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("kind", "warning"))
    print(f"  strategy   {layout}; {report['world_size']} devices = {report['nodes']} node(s) of {report['gpus_per_node']}")
    print(f"  batch      {w['max_tokens']} tokens, {w['active_experts']:g} experts/token, {w['videos_per_micro_batch']} videos")
    print("  per device (GiB):")
    for name, value in report["components_gb"].items():
        if value:
            print(f"    {name:28s} {value:9.2f}")
    print(f"    {'activations w/o checkpointing':28s} {report['activations_gb']['without_checkpointing']:9.2f}")
    print(f"    {'activations w/ checkpointing':28s} {report['activations_gb']['with_checkpointing']:9.2f}")
    ac = "on" if report["activation_checkpointing"] else "off"
    verdict = "fits" if report["fits"] else "does NOT fit"
    print(f"  peak       {report['per_device_gb']:.2f} GiB (activation checkpointing {ac}; at {report['peak_phase']}); "
          f"{verdict} in {report['device_memory_gb']:g} GiB with {report['reserve_gb']:g} GiB kept free")
    print(f"             with checkpointing {report['per_device_gb_with_checkpointing']:.2f} GiB "
          f"({'fits' if report['fits_with_checkpointing'] else 'does not fit'}), without "
          f"{report['per_device_gb_without_checkpointing']:.2f} GiB "
          f"({'fits' if report['fits_without_checkpointing'] else 'does not fit'})")
    if "min_nodes" in report:
        found = report["min_nodes"]
        print(f"  min nodes  {found if found is not None else 'none: more devices do not shrink this strategy'}")
    if s.get("warning"):
        print(f"  warning    {s['warning']}")
    for note in report["assumptions"]:
        print(f"  assumes    {note}")


def main(argv: list[str] | None = None) -> int:
    from unimoe.training.plan import PlanError, load_stage, make_plan, parse_memory, plan_inputs, smallest_fitting_world
    from unimoe.training.recipe_vars import RecipeError

    args = build_parser().parse_args(argv)
    try:
        strategy = _yaml_arg(args.strategy)
        recipe = load_stage(args.config, args.stage, args.data_root)
        ac = None if args.activation_checkpointing is None else args.activation_checkpointing == "on"
        inputs, meta = plan_inputs(recipe, gpus=args.gpus, model=args.model, strategy=strategy, activation_checkpointing=ac,
                                   max_tokens=args.max_tokens, active_experts=args.active_experts, videos=args.videos)
        device, reserve = parse_memory(args.gpu_memory), parse_memory(args.reserve)
        report = make_plan(inputs, meta, device_gib=device, reserve_gib=reserve, gpus_per_node=args.gpus_per_node)
        report = {"config": args.config, "stage": args.stage, **report}
        if args.min_nodes:
            report["min_nodes"] = smallest_fitting_world(inputs, meta, device_gib=device, reserve_gib=reserve,
                                                         gpus_per_node=args.gpus_per_node)
    except (PlanError, RecipeError, argparse.ArgumentTypeError) as exc:
        print(f"unimoe plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, recipe.where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
