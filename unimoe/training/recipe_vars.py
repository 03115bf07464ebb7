"""Variables in recipe YAML: ``${data_root}`` and ``${env:NAME}`` / ``${env:NAME,default}``.

Recipes name their data relative to a data root (``${data_root}/shards/tts``,
``${data_root}/codec.pt``) so the same files work on any machine. The data root comes from,
in order: ``--data_root`` on the command line, the ``UNIMOE_DATA_ROOT`` environment
variable, the curriculum file's ``data_root:`` key (relative to that file). It is made
absolute before substitution, so resolved configs (saved with every run) stand alone.
An unknown or unset variable is an error naming the file and the variable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

ENV_DATA_ROOT = "UNIMOE_DATA_ROOT"
_VAR = re.compile(r"\$\{([^}]*)\}")


class RecipeError(ValueError):
    """A recipe (curriculum or stage YAML) is invalid; the message names file and field."""


def resolve_data_root(cli_value: Optional[str] = None, recipe_value: Optional[str] = None,
                      recipe_dir: Optional[Path] = None) -> Optional[Path]:
    """``--data_root`` > ``$UNIMOE_DATA_ROOT`` > the recipe's ``data_root`` (relative to the recipe)."""
    if cli_value:
        return Path(cli_value).expanduser().resolve()
    if os.environ.get(ENV_DATA_ROOT):
        return Path(os.environ[ENV_DATA_ROOT]).expanduser().resolve()
    if recipe_value:
        path = Path(os.path.expanduser(str(recipe_value)))
        if not path.is_absolute() and recipe_dir is not None:
            path = recipe_dir / path
        return path.resolve()
    return None


def substitute(text: str, data_root: Optional[Path], where: str) -> str:
    """Replace every ``${...}`` in ``text``; ``where`` names the file for error messages."""

    def replace(match: re.Match) -> str:
        name = match.group(1).strip()
        if name == "data_root":
            if data_root is None:
                raise RecipeError(
                    f"{where} uses ${{data_root}} but no data root is set: pass --data_root DIR, set "
                    f"{ENV_DATA_ROOT}=DIR, or give data_root: in the curriculum file"
                )
            return str(data_root)
        if name.startswith("env:"):
            var, _, default = name[4:].partition(",")
            value = os.environ.get(var.strip())
            if value is None:
                if not _:
                    raise RecipeError(f"{where} uses ${{{name}}} but the environment variable {var.strip()} is not set")
                value = default.strip()
            return value
        raise RecipeError(f"{where}: unknown variable ${{{name}}}; recipes know ${{data_root}} and ${{env:NAME[,default]}}")

    return _VAR.sub(replace, text)


def pop_option(argv: list[str], name: str) -> tuple[Optional[str], list[str]]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from ``argv`` -> (value, rest)."""
    value, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            i += 2
            continue
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest
