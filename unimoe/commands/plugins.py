"""``unimoe plugins``: show what every registry holds, including installed plug-ins."""

from __future__ import annotations

import argparse
import json

from unimoe.registry import ALL_REGISTRIES, RegistryError


def collect() -> dict[str, dict[str, str]]:
    """Registry -> name -> the component's import path (or why it cannot be imported)."""
    out: dict[str, dict[str, str]] = {}
    for registry in ALL_REGISTRIES:
        out[registry.name] = {}
        for name in registry.names():
            try:
                obj = registry.get(name)
            except RegistryError as exc:  # list a broken plug-in instead of hiding every other one
                out[registry.name][name] = f"<cannot import: {exc}>"
                continue
            out[registry.name][name] = f"{obj.__module__}.{obj.__qualname__}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unimoe plugins", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    table = collect()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for group, entries in table.items():
        print(f"{group} (entry-point group unimoe.{group}):")
        for name, where in entries.items():
            print(f"  {name:24s} {where}")
    return 0
