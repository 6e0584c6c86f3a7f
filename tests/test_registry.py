from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from onnxopt.manager import PRESETS
from onnxopt.passes import ALL_PASSES
from onnxopt.registry import registry


def test_every_pass_is_named_after_its_module_and_documented() -> None:
    for cls in ALL_PASSES:
        module = Path(inspect.getfile(cls)).stem
        assert cls.name == module.replace("_", "-"), cls
        doc = (cls.__doc__ or "").strip().splitlines()
        assert doc and doc[0].endswith("."), f"{cls.name}: one-sentence class docstring"
        assert inspect.getmodule(cls).__doc__, f"{cls.name}: module docstring with the rewrite"
        assert isinstance(cls.exact, bool)
        cls.Options()  # defaults constructible
        assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(cls.Options))


def test_presets_hold_only_registered_exact_passes() -> None:
    table = registry()
    for names in PRESETS.values():
        for name in names:
            assert name in table, name
            assert table[name].exact, f"lossy pass {name} in a preset"


def test_every_pass_module_is_registered() -> None:
    modules = {p.stem for p in Path(inspect.getfile(ALL_PASSES[0])).parent.glob("*.py")}
    modules = {m for m in modules if not m.startswith("_")}
    assert modules == {cls.name.replace("-", "_") for cls in ALL_PASSES}
