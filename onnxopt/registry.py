"""Name -> pass class, built from the one explicit list ``onnxopt.passes.ALL_PASSES``."""

from __future__ import annotations

import difflib
import functools

from onnxopt.errors import UnknownPassError
from onnxopt.pass_base import Pass


@functools.cache
def registry() -> dict[str, type[Pass]]:
    from onnxopt.passes import ALL_PASSES  # here, so passes may import onnxopt.pass_base

    table: dict[str, type[Pass]] = {}
    for cls in ALL_PASSES:
        if cls.name in table:
            raise RuntimeError(f"duplicate pass name {cls.name!r}")
        table[cls.name] = cls
    return table


def get_pass(name: str) -> type[Pass]:
    table = registry()
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, table, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownPassError(f"unknown pass '{name}'{hint} (`onnxopt passes` lists them)")
