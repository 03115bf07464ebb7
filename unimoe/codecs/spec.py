"""Turn a ``--codec`` command-line value into a registry spec, the same way in every command.

Accepted forms:
- a fitted ``spectral_rvq`` file: ``codec.pt`` (must exist; stored as an absolute path)
- a YAML file holding a spec: ``codec.yaml``
- an inline JSON/YAML mapping: ``'{name: encodec, bandwidth: 6.0}'``
- a registered name or an import path: ``encodec``, ``my_pkg.codecs.MyCodec``
"""

from __future__ import annotations

from pathlib import Path

import yaml

from unimoe.registry import ComponentSpec


def parse_codec_spec(text: str) -> ComponentSpec:
    """A ``--codec`` value -> registry spec; a ``ValueError`` says what is wrong with it."""
    text = text.strip()
    path = Path(text).expanduser()
    if path.suffix in (".pt", ".pth"):
        if not path.is_file():
            raise ValueError(f"--codec file not found: {text}")
        return {"name": "spectral_rvq", "path": str(path.resolve())}
    if path.suffix in (".yaml", ".yml") and path.is_file():
        spec = _load_yaml(path.read_text(encoding="utf-8"), f"--codec file {text}")
    elif text.startswith("{"):
        spec = _load_yaml(text, "--codec")
    else:
        return text
    if not isinstance(spec, (str, dict)):
        raise ValueError(f"--codec must name a codec or be a mapping with 'name' or 'class_path', got {text!r}")
    return spec


def _load_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid JSON/YAML: {exc}") from exc
