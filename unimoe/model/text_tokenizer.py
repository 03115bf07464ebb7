"""Text tokenizers: an offline byte-level one by default, a Hugging Face one as a plug-in.

The model only needs ids in ``[0, vocab_size)`` and, optionally, ids that mark the start
and end of a text block. The byte tokenizer needs no files, so tests and the offline demo
always work; the ``hf`` tokenizer loads a local ``tokenizer.json`` (or a folder with one,
or anything ``transformers.AutoTokenizer`` reads offline) for users who have, e.g., the
Qwen2.5-VL tokenizer on disk. Both are registered in ``TEXT_TOKENIZERS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

from unimoe.registry import TEXT_TOKENIZERS, ComponentSpec


class TextTokenizer(ABC):
    """str <-> ids. ``bos_id``/``eos_id`` may be None when the vocabulary has no such token."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode` (special ids are skipped)."""


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes as ids 0..255, then ``pad = 256``, ``bos = 257``, ``eos = 258``.

    Works for every language without a vocabulary file; sequences are ~1 id per ASCII
    character (2-3 for CJK), which is fine for transcripts and captions of ~20 s clips.
    """

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(TextTokenizer):
    """A local Hugging Face tokenizer (nothing is downloaded).

    ``path`` is a ``tokenizer.json`` file or a folder holding one (read with the
    ``tokenizers`` library), or a folder ``transformers.AutoTokenizer`` can read with
    ``local_files_only=True``, or a Hugging Face Hub id (``Qwen/Qwen2.5-3B``: the local Hub
    cache, else the Hub, when ``huggingface_hub`` is installed and online).
    ``bos_token``/``eos_token``/``pad_token`` name special tokens of that vocabulary (for
    Qwen2.5: ``eos_token="<|endoftext|>"``); unset ones fall back to the tokenizer's own (for
    a ``tokenizer.json``, those of the ``tokenizer_config.json`` beside it), and a missing pad
    falls back to eos.
    """

    def __init__(
        self,
        path: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            from unimoe.pretrained.hub import looks_like_hub_id, resolve_pretrained

            if not looks_like_hub_id(str(path)):
                raise FileNotFoundError(f"hf tokenizer: path {str(self.path)!r} does not exist")
            self.path = resolve_pretrained(str(path))
        json_file = self.path if self.path.is_file() else self.path / "tokenizer.json"
        if json_file.is_file():
            self._init_tokenizers(json_file)
        else:
            self._init_transformers()
        self.bos_id = self._token_id(bos_token, "bos_token", self._default("bos"))
        self.eos_id = self._token_id(eos_token, "eos_token", self._default("eos"))
        pad = self._token_id(pad_token, "pad_token", self._default("pad"))
        if pad is None:
            pad = self.eos_id if self.eos_id is not None else 0
        self.pad_id = pad

    # ------------------------------------------------------------------ backends
    def _init_tokenizers(self, json_file: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the 'hf' text tokenizer reads tokenizer.json with the 'tokenizers' package; "
                "install it with `pip install tokenizers`"
            ) from exc
        self._tok = Tokenizer.from_file(str(json_file))
        self._backend = "tokenizers"
        self._specials = _specials_of(json_file.parent / "tokenizer_config.json")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _init_transformers(self) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ImportError(
                f"hf tokenizer: {str(self.path)!r} has no tokenizer.json, so it needs the "
                "'transformers' package (`pip install transformers`), which is not installed"
            ) from exc
        self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self._backend = "transformers"
        self.vocab_size = len(self._tok)

    def _default(self, which: str) -> str | None:
        if self._backend == "transformers":
            return getattr(self._tok, f"{which}_token", None)
        return self._specials.get(f"{which}_token")

    def _token_id(self, token: str | None, field: str, default: str | None) -> int | None:
        name = token if token is not None else default
        if name is None:
            return None
        idx = self._tok.token_to_id(name) if self._backend == "tokenizers" else self._tok.convert_tokens_to_ids(name)
        if idx is None or (self._backend == "transformers" and idx == getattr(self._tok, "unk_token_id", None)):
            raise ValueError(f"hf tokenizer: {field}={name!r} is not in the vocabulary of {str(self.path)!r}")
        return int(idx)

    # ------------------------------------------------------------------ API
    def encode(self, text: str) -> list[int]:
        if self._backend == "tokenizers":
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _specials_of(config: Path) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` / ``pad_token`` of a ``tokenizer_config.json`` (strings or AddedToken dicts)."""
    if not config.is_file():
        return {}
    import json

    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"hf tokenizer: cannot read {config}: not valid JSON ({exc})") from exc
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        token = data.get(key) if isinstance(data, dict) else None
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token:
            out[key] = token
    return out


def build_text_tokenizer(spec: ComponentSpec | TextTokenizer) -> TextTokenizer:
    """Build a tokenizer from a registry spec (``"bytes"``, ``{"name": "hf", "path": ...}``)."""
    tok = TEXT_TOKENIZERS.build(spec)
    if not isinstance(tok, TextTokenizer):
        for attr in ("vocab_size", "pad_id", "encode", "decode"):
            if not hasattr(tok, attr):
                raise TypeError(f"text tokenizer {type(tok).__name__} lacks {attr!r}; subclass TextTokenizer")
    return tok
