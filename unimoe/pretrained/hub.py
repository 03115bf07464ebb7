"""Where a pretrained model's files are: a local folder, or a Hugging Face Hub id when online.

Nothing here downloads unless the reference is not a local path, looks like ``org/name`` and
``huggingface_hub`` is installed: then the local Hub cache is tried first, then the Hub.
Offline, the error says how to place the files locally instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from unimoe.checkpoint import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
             "vocab.json", "merges.txt", "special_tokens_map.json"]
"""What a causal LM needs (no pickled ``*.bin`` / ``*.pt``: unimoe reads safetensors only)."""
PLACE_LOCALLY = (
    "download the model once on a machine with internet (e.g. `hf download {ref} --include "
    "'*.json' '*.safetensors' 'tokenizer*' --local-dir /models/{name}`), copy the folder here and set init_from "
    "to that folder (docs/training.md, 'Starting from a pretrained LM')"
)


class PretrainedError(CheckpointError):
    """A pretrained model cannot be found, read or mapped onto unimoe; the message names the file or field."""


def looks_like_hub_id(ref: str) -> bool:
    return bool(HUB_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def resolve_pretrained(ref: str | Path) -> Path:
    """A local folder as is; ``org/name`` (not a local path) through the Hub cache or the Hub."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PretrainedError(f"pretrained model {path} must be a folder (config.json + *.safetensors), not a file")
        return path
    text = str(ref)
    if not looks_like_hub_id(text):
        raise PretrainedError(f"pretrained model folder not found: {path}")
    hint = PLACE_LOCALLY.format(ref=text, name=text.split("/")[-1])
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise PretrainedError(
            f"{text}: no such local folder, and huggingface_hub is not installed to fetch it from the Hugging Face Hub "
            f"(pip install huggingface_hub); or {hint}"
        ) from exc
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local cache: try the Hub
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated model...
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PretrainedError(
            f"{text}: no such local folder ({path.resolve()}), and it could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {detail}). If this machine is offline, {hint}"
        ) from exc
