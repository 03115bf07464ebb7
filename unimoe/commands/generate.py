"""``unimoe generate``: speech or music from a checkpoint, one request or a JSONL batch.

    unimoe generate --ckpt model.ckpt --task tts --text "Hello." --prompt-audio ref.wav --out out/
    unimoe generate --ckpt model.ckpt --task t2m --text "calm piano" --cfg-scale 3 --seed 7 --out out/
    unimoe generate --ckpt model.ckpt --task v2m --video clip.npz --out out/
    unimoe generate --ckpt model.ckpt --requests requests.jsonl --out out/ --top-p-router 0.5

Writes ``<id>.wav`` and ``<id>.json`` (sidecar: seed, settings, duration, real-time factor,
frames, activated experts per token, checkpoint, codec) per clip and ``generated.jsonl``.
See docs/generation.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from unimoe.generation.settings import GenerationSettings

_DEFAULTS = GenerationSettings()


def _per_codebook(kind: type):
    """argparse type: ``1.0`` or ``1.0,0.9,0.8`` (one value per codebook)."""

    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or a comma-separated list, got {text!r}")
        return values[0] if len(values) == 1 else values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="unimoe model: a model folder (unimoe export, a stage's final/, unimoe upcycle) or a .ckpt")
    p.add_argument("--out", required=True, help="output folder for WAVs, sidecars and generated.jsonl")
    one = p.add_argument_group("one request (or use --requests)")
    one.add_argument("--task", help="tts | t2m | v2m (or a plug-in task)")
    one.add_argument("--text", help="transcript (tts) or caption (t2m, optional for v2m)")
    one.add_argument("--prompt-audio", help="reference voice for cloning (tts): any sample rate, trimmed to --max-prompt-seconds")
    one.add_argument("--prompt-text", help="transcript of the reference voice (tts)")
    one.add_argument("--video", help="video frames (v2m): .npy [F, H, W, 3] or .npz with 'frames'")
    one.add_argument("--id", default="clip", help="name of the clip (default: clip)")
    p.add_argument("--requests", help="JSONL of requests (training-manifest fields: id, task, text, prompt_audio, "
                                      "prompt_text, video; paths relative to the file)")
    p.add_argument("--codec", help="codec spec overriding the checkpoint's: a registered name or JSON, e.g. "
                                   "'{\"name\": \"spectral_rvq\", \"path\": \"codec.pt\"}'")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, else fp32) | fp32 | bf16 | fp16")
    s = p.add_argument_group("sampling (defaults follow the authors' release)")
    s.add_argument("--preset", help="a named generation preset to start from (flags override it), e.g. "
                                    "uni_moe_audio_t2m: the release's text-to-music defaults (docs/generation.md)")
    s.add_argument("--seed", type=int, help=f"seed of the first request; request i uses seed + i (default {_DEFAULTS.seed})")
    s.add_argument("--temperature", type=_per_codebook(float),
                   help=f"per codebook, comma-separated or one value; 0 = greedy (default {_DEFAULTS.temperature})")
    s.add_argument("--top-k", type=_per_codebook(int), help=f"per codebook; 0 = off (default {_DEFAULTS.top_k})")
    s.add_argument("--top-p", type=_per_codebook(float), help=f"per codebook; 1 = off (default {_DEFAULTS.top_p})")
    s.add_argument("--cfg-scale", type=float,
                   help=f"guidance uncond + s * (cond - uncond); 1 = off (default {_DEFAULTS.cfg_scale})")
    s.add_argument("--eos-logit-scale", type=float,
                   help=f"multiply the EOS logit after guidance (release music: 0.6; default {_DEFAULTS.eos_logit_scale})")
    s.add_argument("--top-p-router", type=float, dest="router_top_p",
                   help="override the MoE routers' top-p (lower = fewer experts per token, faster); default: trained value")
    s.add_argument("--experts-per-token", type=float,
                   help="hold this mean number of real routed experts per token (a feedback controller on the routers' "
                        "top-p; the sidecar reports what was reached); exclusive with --top-p-router")
    s.add_argument("--max-seconds", type=float, help=f"duration cap, EOS forced there (default {_DEFAULTS.max_seconds})")
    s.add_argument("--min-seconds", type=float, help=f"no EOS before this (default {_DEFAULTS.min_seconds})")
    s.add_argument("--max-prompt-seconds", type=float,
                   help=f"trim longer reference voices (default {_DEFAULTS.max_prompt_seconds})")
    s.add_argument("--batch-size", type=int, help=f"requests decoded together (default {_DEFAULTS.batch_size})")
    s.add_argument("--no-cache", dest="use_cache", action="store_false", default=None,
                   help="recompute the full sequence every step (slow; a reference)")
    s.add_argument("--no-routing-stats", dest="routing_stats", action="store_false", default=None,
                   help="do not count activated experts per token")
    s.add_argument("--cache", choices=("static", "dynamic"),
                   help="KV cache: static (fixed shapes, default; needed by --compile) or dynamic (drops finished rows)")
    s.add_argument("--compile", action="store_true", default=None,
                   help="compile the decoding step (torch.compile; CUDA graphs on a GPU): faster steps after a "
                        "one-off compile, same tokens as eager at temperature 0")
    p.add_argument("--skip-invalid", action="store_true",
                   help="with --requests: skip requests whose inputs are unusable (listed in skipped.jsonl) instead of failing")
    return p


SETTING_ARGS = ("seed", "temperature", "top_k", "top_p", "cfg_scale", "eos_logit_scale", "router_top_p",
                "experts_per_token", "max_seconds", "min_seconds", "max_prompt_seconds", "batch_size", "use_cache", "cache",
                "compile", "routing_stats")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    single = [f"--{n.replace('_', '-')}" for n in ("task", "text", "prompt_audio", "prompt_text", "video")
              if getattr(args, n) is not None]
    if args.requests and single:
        parser.error(f"give either --requests or a single request ({', '.join(single)}), not both")
    if not args.requests and not args.task:
        parser.error("give --task (with --text / --prompt-audio / --video) or --requests")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from pathlib import Path

    from unimoe.checkpoint import CheckpointError
    from unimoe.generation import (GenerationError, GenerationRequest, InputError, RequestError, SettingsError,
                                   load_generator, read_requests, write_clips)
    from unimoe.generation.compiled import CompileError
    from unimoe.generation.decode import ContextTooLong
    from unimoe.generation.pipeline import parse_codec_spec

    try:
        settings = GenerationSettings.from_options({k: getattr(args, k) for k in SETTING_ARGS if getattr(args, k) is not None},
                                                   preset=args.preset)
        if args.requests:
            requests = read_requests(args.requests)
        else:
            requests = [GenerationRequest(id=args.id, task=args.task, text=args.text, prompt_audio=args.prompt_audio,
                                          prompt_text=args.prompt_text, video=args.video, source="command line")]
        generator = load_generator(args.ckpt, codec=parse_codec_spec(args.codec) if args.codec else None,
                                   device=args.device, dtype=args.dtype, settings=settings)
        prepared, skipped = generator.prepare(requests, skip_invalid=args.skip_invalid)
        clips = generator.generate_prepared(prepared)
        manifest = write_clips(clips, Path(args.out), skipped=skipped)
    except (CheckpointError, GenerationError, RequestError, InputError, SettingsError, ContextTooLong, CompileError) as exc:
        print(f"unimoe generate: error: {exc}", file=sys.stderr)
        return 2
    for clip in clips:
        m = clip.metadata
        experts = m.get("activated_experts_per_token")
        budget = m.get("expert_budget")
        print(f"{clip.id}\t{clip.task}\t{m['duration']:.2f} s\t{m['frames']} frames\t{m['stop_reason']}\t"
              f"RTF {m['real_time_factor']:.3f}" + (f"\texperts/token {experts:.2f}" if experts is not None else "")
              + (f" (budget {budget['target']}, batch {budget['batch_mean']})" if budget else ""))
    print(f"wrote {len(clips)} clip(s) to {manifest.parent} ({manifest.name})"
          + (f"; skipped {len(skipped)} (skipped.jsonl)" if skipped else ""), file=sys.stderr)
    return 0
