"""Model checkpoints that know how to rebuild themselves.

Every checkpoint unimoe writes (a Lightning ``.ckpt`` of any stage, or the output of
``unimoe upcycle``) carries, next to ``state_dict``, a ``"unimoe"`` entry with the model
config, the codec spec the tokens came from and the stage that wrote it. Generation,
evaluation and the next curriculum stage rebuild the model from that entry alone, so they
never depend on Lightning's saved hyper-parameters (which also restore the *class*, the
trap described in LIGHTNING_NOTES).

State-dict keys of the language model are prefixed ``model.`` (the attribute every stage
module keeps its :class:`~unimoe.model.transformer.AudioLM` under).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from unimoe.atomic import atomic_path
from unimoe.model.config import AudioLMConfig
from unimoe.moe.config import MoEConfig
from unimoe.registry import ComponentSpec

METADATA_KEY = "unimoe"
MODEL_PREFIX = "model."
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or was not written by unimoe."""


def config_to_dict(config: AudioLMConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> AudioLMConfig:
    """Inverse of :func:`config_to_dict`, rebuilding the nested MoEConfig."""
    data = dict(data)
    if data.get("moe") is not None and not isinstance(data["moe"], MoEConfig):
        data["moe"] = MoEConfig(**data["moe"])
    known = {f.name for f in dataclasses.fields(AudioLMConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"checkpoint model config has fields this unimoe does not know: {unknown}")
    return AudioLMConfig(**data)


@dataclass
class CheckpointMetadata:
    """What a checkpoint says about itself."""

    config: AudioLMConfig
    codec: Optional[ComponentSpec] = None
    stage: str = "unknown"
    tasks: dict[str, ComponentSpec] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "config": config_to_dict(self.config),
            "codec": self.codec,
            "stage": self.stage,
            "tasks": dict(self.tasks),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CheckpointMetadata":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"unsupported unimoe checkpoint format_version {version!r} (expected {FORMAT_VERSION})")
        return cls(
            config=config_from_dict(data["config"]),
            codec=data.get("codec"),
            stage=data.get("stage", "unknown"),
            tasks=dict(data.get("tasks") or {}),
            extra=dict(data.get("extra") or {}),
        )


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file with an error that names it when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(str(path), map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def read_metadata(checkpoint: dict[str, Any], path: str | Path = "<checkpoint>") -> CheckpointMetadata:
    if METADATA_KEY not in checkpoint:
        raise CheckpointError(
            f"{path} is not a unimoe checkpoint (no {METADATA_KEY!r} entry); "
            f"it must come from a unimoe training stage or 'unimoe upcycle'"
        )
    return CheckpointMetadata.from_dict(checkpoint[METADATA_KEY])


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The AudioLM's own state dict (``model.`` prefix stripped)."""
    state = checkpoint.get("state_dict", {})
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def save_model_checkpoint(path: str | Path, model: torch.nn.Module, metadata: CheckpointMetadata) -> Path:
    """Write a standalone model checkpoint (same layout as a stage's Lightning checkpoint)."""
    from unimoe.finite import check_finite_weights

    path = Path(path)
    check_finite_weights(model.state_dict(), str(path))  # a NaN checkpoint never replaces a good one
    payload = {
        "state_dict": {MODEL_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()},
        METADATA_KEY: metadata.to_dict(),
    }
    with atomic_path(path) as tmp:  # never a half-written checkpoint under the final name
        torch.save(payload, str(tmp))
    return path


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the AudioLM of a unimoe checkpoint -> ``(model, metadata)`` (model in eval mode)."""
    from unimoe.model.transformer import AudioLM

    checkpoint = read_checkpoint(path, map_location=map_location)
    metadata = read_metadata(checkpoint, path)
    model = AudioLM(metadata.config)
    state = model_state_dict(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match its own model config: "
            f"missing {sorted(missing)[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    return model.eval(), metadata
