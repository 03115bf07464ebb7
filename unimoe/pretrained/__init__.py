"""Start unimoe models from pretrained causal LMs (Hugging Face Qwen2 / Qwen2.5 / Llama folders).

``init_from: /models/Qwen2.5-3B`` (or the Hub id ``Qwen/Qwen2.5-3B`` when online) gives a
stage the pretrained text backbone: :func:`open_pretrained` reads ``config.json`` into the
backbone fields of :class:`~unimoe.model.config.AudioLMConfig` (:mod:`.hf_config`), maps the
safetensors weights onto unimoe's keys without copying them (:mod:`.hf_weights`) and names
the folder's tokenizer as the text tokenizer. The codec embeddings and head (and a vision
encoder) start fresh. See docs/training.md, "Starting from a pretrained LM".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from unimoe.checkpoint import FOLDER_FORMAT, CheckpointMetadata
from unimoe.model.config import AudioLMConfig
from unimoe.pretrained.hf_config import BACKBONE_FIELDS, backbone_from_hf, merge_backbone, read_hf_config
from unimoe.pretrained.hf_weights import FRESH, HFCausalLMTensors, hf_key_map, open_hf_weights
from unimoe.pretrained.hub import PretrainedError, looks_like_hub_id, resolve_pretrained

PRETRAINED_STAGE = "pretrained"
"""``CheckpointMetadata.stage`` of a pretrained LM opened as an ``init_from`` source."""

__all__ = ["BACKBONE_FIELDS", "FRESH", "PRETRAINED_STAGE", "PretrainedError", "PretrainedLM", "is_pretrained_ref",
           "merge_backbone", "open_pretrained"]


@dataclass
class PretrainedLM:
    """An opened pretrained LM: where it is, its backbone fields, and its tensors under unimoe keys."""

    ref: str
    path: Path
    model_type: str
    backbone: dict[str, Any]
    tensors: HFCausalLMTensors
    max_position_embeddings: Optional[int] = None
    info: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> CheckpointMetadata:
        """What ``init_from`` knows about this source (a config with unimoe's default audio parts)."""
        return CheckpointMetadata(config=AudioLMConfig(**self.backbone), stage=PRETRAINED_STAGE,
                                  extra={"pretrained": {"ref": self.ref, "path": str(self.path),
                                                        "model_type": self.model_type,
                                                        "max_position_embeddings": self.max_position_embeddings,
                                                        **self.info}})


def is_pretrained_ref(ref: str | Path) -> bool:
    """True for a Hugging Face model folder (config.json with a model_type, not a unimoe folder) or a Hub id."""
    path = Path(ref).expanduser()
    if not path.exists():
        return looks_like_hub_id(str(ref))
    if not path.is_dir() or not (path / "config.json").is_file():
        return False
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the model-folder reader reports it
    return isinstance(data, dict) and "model_type" in data and data.get("format") != FOLDER_FORMAT


def open_pretrained(ref: str | Path) -> PretrainedLM:
    """Resolve, read and check a pretrained causal LM (PretrainedError names the file or field)."""
    folder = resolve_pretrained(ref)
    cfg = read_hf_config(folder)
    from_hub = not Path(ref).expanduser().exists()
    backbone = backbone_from_hf(cfg, folder, str(ref) if from_hub else None)
    try:
        AudioLMConfig(**backbone)
    except ValueError as exc:
        raise PretrainedError(f"{folder / 'config.json'}: {exc}") from exc
    _check_tokenizer(backbone, folder)
    keys = hf_key_map(backbone["num_layers"], backbone["qkv_bias"], backbone["tie_text_head"])
    tensors = HFCausalLMTensors(open_hf_weights(folder), keys, folder)
    info = {k: cfg[k] for k in ("architectures", "torch_dtype", "dtype", "transformers_version") if k in cfg}
    max_pos = cfg.get("max_position_embeddings")
    return PretrainedLM(ref=str(ref), path=folder, model_type=cfg["model_type"], backbone=backbone, tensors=tensors,
                        max_position_embeddings=max_pos if isinstance(max_pos, int) else None, info=info)


def _check_tokenizer(backbone: dict[str, Any], folder: Path) -> None:
    from unimoe.model.text_tokenizer import build_text_tokenizer

    try:
        tokenizer = build_text_tokenizer(backbone["text_tokenizer"])
    except Exception as exc:  # noqa: BLE001 - missing package, unreadable file, unknown special token
        raise PretrainedError(f"{folder}: its tokenizer cannot be loaded ({type(exc).__name__}: {exc})") from exc
    if tokenizer.vocab_size > backbone["text_vocab_size"]:
        raise PretrainedError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{backbone['text_vocab_size']}: they are not from the same model"
        )
