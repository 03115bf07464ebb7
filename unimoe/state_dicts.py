"""How two sets of named tensor shapes differ: the one comparison behind every "this file is not
this model" check (checkpoints, sharded checkpoints, codec weights); each caller words its own error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def shape_differences(
    found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]],
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, mismatched)`` keys of ``found`` against ``expected``.

    ``missing`` (in ``expected`` only) and ``unexpected`` (in ``found`` only) are sorted;
    ``mismatched`` lists the shared keys whose shapes differ, in ``expected``'s order.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    return missing, unexpected, mismatched
