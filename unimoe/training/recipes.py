"""The one composition path of recipe files: ``extends``, merging, variables.

Every YAML a user writes for training (a stage recipe for ``unimoe fit --config``, a
curriculum for ``unimoe curriculum``, the stage files a curriculum names) is read here and
only here, so composition works the same everywhere:

* ``extends: base.yaml`` (or a list, applied in order) makes the named files the base of
  this one; paths are relative to the file that names them. The file's own keys are then
  merged on top: mappings key by key (recursively), everything else (lists included)
  replaces. A recipe therefore states only what differs from its base.
* top-level keys starting with ``x-`` hold YAML anchors for reuse inside one file and are
  dropped after merging;
* ``${data_root}`` and ``${env:NAME[,default]}`` are substituted (:mod:`unimoe.training.recipe_vars`).

The result is one plain mapping handed to LightningCLI as a single config, in which every
component is spelled ``{class_path: <registered or class name>, init_args: {...}}``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import yaml

from unimoe.training.recipe_vars import RecipeError, pop_option, resolve_data_root, substitute

EXTENDS = "extends"


class Replace(dict):
    """A mapping tagged ``!replace`` in a recipe: it replaces the base's mapping instead of merging into it."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus the ``!replace`` tag (nothing else: recipes never construct objects)."""


_RecipeLoader.add_constructor("!replace", lambda loader, node: Replace(loader.construct_mapping(node, deep=True)))


def read_yaml(path: Path) -> dict[str, Any]:
    """One YAML mapping from ``path``; errors name the file."""
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: must be a YAML mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key (recursively); any other value (lists, ``!replace`` mappings) replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and not isinstance(value, Replace) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Path]]:
    """The file with its ``extends`` chain merged in, and per top-level key the file that set it last.

    Nothing is substituted yet (a curriculum finds its data root inside the tree).
    """
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise RecipeError(f"{path}: 'extends' loops back to itself ({chain})")
    raw = read_yaml(path)
    refs = raw.pop(EXTENDS, None)
    refs = [] if refs is None else [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise RecipeError(f"{path}: field 'extends' must be a file path or a list of file paths")
    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for ref in refs:
        base_path = (path.parent / ref).resolve()
        if not base_path.is_file():
            raise RecipeError(f"{path}: field 'extends': file not found: {base_path}")
        base, base_origin = load_tree(base_path, (*_seen, path))
        merged = deep_merge(merged, base)
        origin.update(base_origin)
    merged = deep_merge(merged, raw)
    origin.update({key: path for key in raw})
    return merged, origin


def drop_anchor_keys(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if not str(k).startswith("x-")}


def plain(value: Any) -> Any:
    """A composed tree with its ``!replace`` marks dropped (plain dicts and lists, as YAML dumps them)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def substitute_tree(value: Any, data_root: Optional[Path], where: str) -> Any:
    """``${...}`` variables in every string of a tree (marks such as ``!replace`` kept)."""
    if isinstance(value, str):
        return substitute(value, data_root, where)
    if isinstance(value, Replace):
        return Replace({k: substitute_tree(v, data_root, where) for k, v in value.items()})
    if isinstance(value, dict):
        return {k: substitute_tree(v, data_root, where) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_tree(v, data_root, where) for v in value]
    return value


def compose_file(path: str | Path, data_root: Optional[Path], keep_marks: bool = False) -> dict[str, Any]:
    """A stage recipe as the single mapping LightningCLI gets: ``extends`` merged, anchors dropped, variables resolved.

    ``keep_marks`` keeps ``!replace`` marks for a caller that merges more files on top (a
    curriculum stage's ``config`` list); it calls :func:`plain` at the end.
    """
    tree, _ = load_tree(path)
    tree = substitute_tree(drop_anchor_keys(tree), data_root, str(path))
    return tree if keep_marks else plain(tree)


def compose_argv(argv: list[str]) -> list[str]:
    """``unimoe fit`` arguments with ``--data_root`` consumed and every ``--config FILE`` composed.

    Each ``--config FILE`` (or ``--config=FILE``) becomes the composed YAML text, so
    LightningCLI sees the same configuration ``unimoe curriculum`` would build from that file.
    A ``--config`` value that is not a file (YAML text) is passed through.
    """
    value, rest = pop_option(list(argv), "--data_root")
    data_root = resolve_data_root(value)
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--config", "-c") and i + 1 < len(rest):
            out += [arg, _composed(rest[i + 1], data_root)]
            i += 2
            continue
        out.append("--config=" + _composed(arg.split("=", 1)[1], data_root) if arg.startswith("--config=") else arg)
        i += 1
    return out


def _composed(value: str, data_root: Optional[Path]) -> str:
    path = Path(value)
    if not path.is_file():
        return value
    return yaml.safe_dump(compose_file(path, data_root), sort_keys=False)
