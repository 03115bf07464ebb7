"""Finding pretrained codec weights: a local path, the package's own download, or a clear error.

Training machines are often offline. A codec asked for pretrained weights looks, in order,
at the path the user gave (a checkpoint file or a folder holding it), then at the download
the upstream package would do (which also reads its local cache). When neither works the
error says which file is needed, where to get it, where to put it and which option names it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "CodecWeightsError",
    "ENCODEC_24KHZ_FILE",
    "ENCODEC_24KHZ_URL",
    "VOCOS_ENCODEC_REPO",
    "VOCOS_WEIGHTS_FILE",
    "load_checkpoint_file",
    "encodec_24khz_state_dict",
    "vocos_encodec_state_dict",
]

ENCODEC_24KHZ_FILE = "encodec_24khz-d7cc33bc.th"
ENCODEC_24KHZ_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + ENCODEC_24KHZ_FILE
VOCOS_ENCODEC_REPO = "charactr/vocos-encodec-24khz"
VOCOS_WEIGHTS_FILE = "pytorch_model.bin"
_HASHED_NAME = re.compile(r"^[\w.]+-([0-9a-f]{8,})\.\w+$")


class CodecWeightsError(RuntimeError):
    """Pretrained codec weights are missing, unreadable or could not be downloaded."""


def _sha256_prefix(path: Path, length: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:length]


def load_checkpoint_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path``; every failure names the file.

    A file named like the upstream release (``name-<sha256 prefix>.ext``) is checked against
    that hash first, which catches truncated downloads before they become shape errors.
    """
    if not path.is_file():
        raise CodecWeightsError(f"{what} checkpoint not found: {path}")
    match = _HASHED_NAME.match(path.name)
    if match is not None:
        expected = match.group(1)
        actual = _sha256_prefix(path, len(expected))
        if actual != expected:
            raise CodecWeightsError(
                f"{what} checkpoint {path} is corrupt or incomplete: its sha256 starts with {actual}, "
                f"the file name promises {expected}. Download it again."
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CodecWeightsError(f"cannot read {what} checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CodecWeightsError(f"{what} checkpoint {path} does not hold a state dict of tensors")
    return state


def _file_in(path: Path, filename: str, what: str, hint: str) -> Path:
    """``path`` itself if it is a file, else ``path/filename``; a clear error otherwise."""
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate
        present = sorted(p.name for p in path.iterdir())[:20]
        raise CodecWeightsError(
            f"{what}: folder {path} has no {filename} (it holds: {', '.join(present) or 'nothing'}). {hint}"
        )
    raise CodecWeightsError(f"{what}: path {path} does not exist. {hint}")


def _encodec_hint() -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"Download {ENCODEC_24KHZ_URL} on a machine with internet and either pass it as the codec's "
        f"`path` (the file, or a folder holding {ENCODEC_24KHZ_FILE}; YAML: "
        f"`codec: {{name: encodec, path: /models/{ENCODEC_24KHZ_FILE}}}`; for the vocos codec: its "
        f"`encodec_path`, or the folder given as its `path`) or copy it to {hub}/ where the encodec "
        "package looks before downloading. For tests without weights use `pretrained: false` "
        "(untrained architecture)."
    )


def encodec_24khz_state_dict(
    path: str | Path | None,
    download: Callable[..., Any] | None = None,
) -> dict[str, torch.Tensor]:
    """EnCodec 24 kHz weights from ``path`` or the package's own (cached) download."""
    what = "EnCodec 24 kHz"
    if path is not None:
        return load_checkpoint_file(_file_in(Path(path), ENCODEC_24KHZ_FILE, what, _encodec_hint()), what)
    download = download or torch.hub.load_state_dict_from_url
    try:
        return download(ENCODEC_24KHZ_URL, map_location="cpu", check_hash=True)
    except Exception as exc:  # URLError, HTTPError, hash mismatch, ... : all mean "no weights"
        raise CodecWeightsError(
            f"{what} weights are not available: no local checkpoint was given and downloading "
            f"{ENCODEC_24KHZ_URL} failed ({type(exc).__name__}: {exc}). {_encodec_hint()}"
        ) from exc


def _vocos_hint() -> str:
    return (
        f"Download {VOCOS_WEIGHTS_FILE} from https://huggingface.co/{VOCOS_ENCODEC_REPO} on a machine with "
        f"internet (`hf download {VOCOS_ENCODEC_REPO} --local-dir DIR`) and pass the file or "
        f"DIR as the codec's `path` (YAML: `codec: {{name: vocos, path: DIR}}`). Vocos decodes EnCodec "
        f"tokens, so it also needs {ENCODEC_24KHZ_FILE}: put it in the same DIR or pass `encodec_path`. "
        "For tests without weights use `pretrained: false` (untrained architecture)."
    )


def vocos_encodec_state_dict(
    path: str | Path | None,
    download: Callable[..., Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Vocos (EnCodec variant) weights from ``path`` or the Hugging Face hub (cached download)."""
    what = f"Vocos ({VOCOS_ENCODEC_REPO})"
    if path is None:
        if download is None:
            from huggingface_hub import hf_hub_download as download
        try:
            path = download(repo_id=VOCOS_ENCODEC_REPO, filename=VOCOS_WEIGHTS_FILE)
        except Exception as exc:  # offline, hub error, missing cache: all mean "no weights"
            raise CodecWeightsError(
                f"{what} weights are not available: no local path was given and downloading "
                f"{VOCOS_WEIGHTS_FILE} from the Hugging Face hub failed ({type(exc).__name__}: {exc}). "
                f"{_vocos_hint()}"
            ) from exc
    return load_checkpoint_file(_file_in(Path(path), VOCOS_WEIGHTS_FILE, what, _vocos_hint()), what)
