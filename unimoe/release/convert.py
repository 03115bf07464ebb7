"""``unimoe import uni-moe-audio``: the release's checkpoint folder -> a unimoe model folder.

Reads ``config.json`` (:mod:`.config`), maps the safetensors lazily (:mod:`.weights`), checks
every key and shape against the unimoe model the config describes before writing anything,
then streams the tensors into ``model.safetensors`` (one in memory at a time) and records
the release's prompt format (tasks ``tts`` / ``t2m`` laid out by :mod:`.tasks`), its codec
(DAC 16 kHz) and its generation presets in ``config.json``. The tokenizer files are copied
into ``<out>/tokenizer/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unimoe.checkpoint import CheckpointError, CheckpointMetadata, load_state_into, save_model_folder
from unimoe.pretrained.hub import PretrainedError
from unimoe.release.config import read_release_config, release_to_config
from unimoe.release.tasks import check_special_tokens
from unimoe.release.weights import ReleaseTensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json")
TOKENIZER_DIR = "tokenizer"
TASKS = {"tts": {"name": "uni_moe_audio_tts"}, "t2m": {"name": "uni_moe_audio_t2m"}}
PRESETS = {"tts": "uni_moe_audio_tts", "t2m": "uni_moe_audio_t2m"}
STAGE = "imported"


def import_release(source: str | Path, out: str | Path, *, codec: Any = None, dtype: torch.dtype | None = None,
                   max_seq_len: int = 8192, overwrite: bool = False) -> dict[str, Any]:
    """Convert the release folder ``source`` into the model folder ``out``; returns a summary.

    ``codec`` is the codec spec to record (default DAC 16 kHz, found by unimoe's DAC lookup);
    ``dtype`` casts floating tensors (default: keep the release's bf16).
    """
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.is_dir():
        raise PretrainedError(f"{source} is not a folder (expected the UniMoE-Audio release: config.json + safetensors)")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    data = read_release_config(source)
    t = data["text_config"]
    tensors = ReleaseTensors(source, num_layers=int(t.get("num_hidden_layers", 0)),
                             num_codebooks=int(data.get("codec_channels", 0)),
                             num_routed=int(t.get("mlp_dynamic_expert_num", 0)),
                             num_shared=int(t.get("mlp_fixed_expert_num", 0)))
    tokenizer_files = {f"{TOKENIZER_DIR}/{n}": source / n for n in TOKENIZER_FILES if (source / n).is_file()}
    if not tokenizer_files:
        raise PretrainedError(f"{source} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy them from the release")
    _check_tokenizer(source)
    tokenizer = {"name": "hf", "path": str((out / TOKENIZER_DIR).resolve())}
    config = release_to_config(data, source / "config.json", text_vocab_size=tensors.shape_of("text_embed.weight")[0],
                               tokenizer=tokenizer, tie_text_head="text_head.weight" not in tensors,
                               max_seq_len=max_seq_len)
    from unimoe.model.transformer import meta_model

    load_state_into(meta_model(config), tensors, tensors.source, check_only=True)  # keys and shapes, nothing read
    metadata = CheckpointMetadata(
        config=config, codec=codec if codec is not None else {"name": "dac", "variant": "16khz"}, stage=STAGE,
        tasks=dict(TASKS), task_ids=list(TASKS),
        extra={"imported_from": {"format": "uni-moe-audio", "path": str(source.resolve()),
                                 "skipped_tensors": len(tensors.skipped)},
               "generation_presets": dict(PRESETS)},
    )
    save_model_folder(out, tensors, metadata, dtype=dtype, extra_files=tokenizer_files)
    return {"out": str(out), "tensors": len(tensors), "skipped_tensors": len(tensors.skipped),
            "skipped_example": tensors.skipped[:3], "layers": config.num_layers,
            "parameters": sum(torch.Size(tensors.shape_of(k)).numel() for k in tensors),
            "tasks": {k: v["name"] for k, v in TASKS.items()}, "generation_presets": PRESETS}


def _check_tokenizer(source: Path) -> None:
    from unimoe.model.text_tokenizer import HFTokenizer

    try:
        tok = HFTokenizer(str(source))
        check_special_tokens(tok, str(source))
    except (ValueError, ImportError, OSError) as exc:
        raise PretrainedError(f"{source}: the tokenizer cannot be used: {exc}") from exc
