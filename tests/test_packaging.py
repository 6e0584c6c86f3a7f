"""A plain `pip install .` ships every core subpackage (the editable install CI uses would not notice)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_core_subpackage_is_listed_for_setuptools() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"onnxopt." + ".".join(p.parent.relative_to(ROOT / "onnxopt").parts)
             for p in (ROOT / "onnxopt").rglob("__init__.py") if p.parent != ROOT / "onnxopt"}
    assert found, "no subpackage found: the test would pass vacuously"
    assert found <= listed, f"not installed by `pip install .`: {sorted(found - listed)}"
