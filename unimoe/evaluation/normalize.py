"""Text normalisation applied to both ASR hypothesis and reference before WER/CER.

WER depends as much on normalisation as on the ASR model, so the rules are fixed and
documented (docs/evaluation.md) rather than left to each backend. They follow the basic
Whisper-style English normaliser:

1. Unicode NFKC; lower case.
2. Text inside ``[...]`` or ``(...)`` is dropped (non-speech annotations like ``[laughs]``).
3. Apostrophes are removed (``don't`` -> ``dont``) so contractions match either spelling.
4. Numbers are kept as written (no digit <-> word conversion): ``1,000`` -> ``1000`` and
   ``3.5`` stays ``3.5`` (separators between digits are not punctuation).
5. Every other punctuation or symbol character becomes a space.
6. Whitespace is collapsed. For languages written without spaces (``zh``, ``ja``, ``th``...)
   all whitespace is removed, so CER counts only characters that were spoken.
"""

from __future__ import annotations

import re
import unicodedata

NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "km", "yue"})

_BRACKETED = re.compile(r"\[[^\]]*\]|\([^)]*\)")
_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc`]")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DIGIT_POINT = "\u0000"  # placeholder that survives the punctuation pass
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str, language: str | None = "en") -> str:
    """Normalise ``text`` for error-rate scoring (rules in the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_text expects a string, got {type(text).__name__}")
    out = unicodedata.normalize("NFKC", text).lower()
    out = _BRACKETED.sub(" ", out)
    out = _APOSTROPHES.sub("", out)
    out = _DIGIT_COMMA.sub("", out)
    out = _DECIMAL.sub(_DIGIT_POINT, out)
    out = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in out)
    out = out.replace(_DIGIT_POINT, ".")
    if language is not None and language.split("-")[0].lower() in NO_SPACE_LANGUAGES:
        return _WHITESPACE.sub("", out)
    return _WHITESPACE.sub(" ", out).strip()
