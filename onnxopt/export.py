"""Export a PyTorch ``nn.Module`` built by a factory to ONNX, checked against torch.

    export("models/zoo.py:resnet18", "resnet18.onnx", {"x": (1, 3, 112, 112)})

The factory is ``MODULE:FACTORY``: a file path (``models/zoo.py:resnet18``) or an
importable module (``mypkg.nets:build``); ``FACTORY()`` must return an ``nn.Module``
(a module instance found at that name is used as is). Each named input is one
positional argument of ``forward``, in order.

Exporters (``torch.onnx.export``):
- ``dynamo`` (default, torch's own default since 2.9): ``torch.export`` plus
  onnxscript; clean graphs, and onnxscript's optimizer folds constants and BN.
- ``torchscript`` (``dynamo=False``): the legacy tracer, for models that
  ``torch.export`` cannot capture (data-dependent control flow).

``keep_batchnorm`` leaves BatchNormalization nodes in the graph, for onnxopt's
pipeline to fold: dynamo exports unoptimized and then runs only onnxscript's
constant folding and dead-node removal (its default rewrites would fuse BN);
TorchScript exports with ``do_constant_folding=False``.

The export is checked before anything is written: torch and onnxruntime (graph
optimizations off) run the same random inputs, and every output must agree within
``atol + rtol * |torch|``; with dynamic axes a second set of sizes is checked
too. Floating inputs are standard normal; integer inputs are 1 when the name holds
"mask", else uniform in [0, 16). torch is imported only inside functions: it is the
optional extra ``onnxopt[torch]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import logging
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt.data import parse_input_shapes
from onnxopt.errors import ExportError
from onnxopt.io import staged_output, write_model
from onnxopt.runtime import run, session
from onnxopt.validate import EXACT_ATOL, EXACT_RTOL

logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclasses.dataclass(frozen=True)
class OutputCheck:
    """One output of the export against torch's, over all checked batch sizes."""

    name: str
    max_abs: float
    cosine: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class ExportReport:
    output: Path
    exporter: str
    opset: int
    inputs: dict[str, tuple[int, ...]]
    dynamic_dims: dict[str, dict[int, str]]
    checks: tuple[OutputCheck, ...]
    batchnorm_nodes: int
    nodes: int
    seconds: float
    torch_version: str

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def cosine(self) -> float:
        return min((c.cosine for c in self.checks), default=1.0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        d["max_abs"], d["cosine"] = self.max_abs, self.cosine
        return d


def parse_input_specs(items: Sequence[str] | None) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``["x=1,3,8,8", "ids=1,16:int64"]`` -> (shapes, dtypes); the dtype suffix is optional."""
    shapes_items, dtypes = [], {}
    for item in items or ():
        body, colon, dtype = item.rpartition(":")
        if colon and "=" in body and re.fullmatch(r"[a-z]+\d*", dtype):
            dtypes[body.rpartition("=")[0]] = dtype
            item = body
        shapes_items.append(item)
    return parse_input_shapes(shapes_items), dtypes


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ExportError("PyTorch is not installed; install it with: pip install 'onnxopt[torch]'") from None
    return torch


def load_factory(spec: str) -> Callable[[], Any]:
    """Resolve ``MODULE:FACTORY`` (file path or importable module) to the callable."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ExportError(
            f"'{spec}' must look like MODULE:FACTORY, e.g. models/zoo.py:resnet18 or mypkg.nets:build"
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise ExportError(f"{path}: no such file (from '{spec}')")
        name = "_onnxopt_factory_" + re.sub(r"\W", "_", str(path.resolve()))
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ExportError(f"{path}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ExportError(f"importing {path} failed: {_one_line(e)}") from e
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as e:
            raise ExportError(f"cannot import module '{module_part}' ({e}); "
                              "give a file path (dir/file.py:FACTORY) or an importable module") from None
        except Exception as e:
            raise ExportError(f"importing '{module_part}' failed: {_one_line(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ExportError(f"'{module_part}' has no attribute '{attr}'"
                              + (f"; it defines: {', '.join(public[:20])}" if public else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise ExportError(f"'{spec}' is a {type(obj).__name__}, not a factory function or nn.Module")
    return obj


def build_module(factory: str | Callable[[], Any]) -> Any:
    """Call the factory and return the ``nn.Module`` in eval mode."""
    torch = _import_torch()
    label = factory if isinstance(factory, str) else getattr(factory, "__qualname__", repr(factory))
    fn = load_factory(factory) if isinstance(factory, str) else factory
    if isinstance(fn, torch.nn.Module):
        module = fn
    else:
        try:
            module = fn()
        except Exception as e:
            raise ExportError(f"factory '{label}' raised {_one_line(e)}") from e
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"factory '{label}' returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def example_feeds(shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, Any] | None = None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs: standard normal floats; integers 1 for masks, else in [0, 16)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, shape in shapes.items():
        dtype = np.dtype((dtypes or {}).get(name, "float32"))
        if dtype.kind == "f":
            feed[name] = rng.standard_normal(tuple(shape)).astype(dtype)
        elif dtype.kind == "b":
            feed[name] = rng.random(tuple(shape)) < 0.5
        elif "mask" in name.lower():
            feed[name] = np.ones(tuple(shape), dtype)
        else:
            feed[name] = rng.integers(0, 16, tuple(shape)).astype(dtype)
    return feed


def export(
    factory: str | Callable[[], Any],
    output: str | Path,
    input_shapes: Mapping[str, Sequence[int]],
    dynamic_batch: bool = False,
    opset: int | None = None,
    keep_batchnorm: bool = False,
    *,
    dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
    input_dtypes: Mapping[str, Any] | None = None,
    output_names: Sequence[str] | None = None,
    exporter: str = "dynamo",
    atol: float = EXACT_ATOL,
    rtol: float = EXACT_RTOL,
    seed: int = 0,
) -> ExportReport:
    """Build the module, export it, check it against torch, and write it atomically.

    ``dynamic_dims`` names more dynamic axes, ``{"ids": {0: "batch", 1: "seq"}}``
    (one name = one size across inputs); ``dynamic_batch`` adds ``{0: "batch"}`` to
    every input. Raises ``ExportError`` (nothing written) when torch is missing, the
    factory is wrong, the exporter fails, or the export's outputs differ from torch's.
    """
    start = time.perf_counter()
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")
    if not input_shapes:
        raise ExportError("give each forward() input a shape: --input-shape x=1,3,224,224")
    torch = _import_torch()
    module = build_module(factory)
    label = factory if isinstance(factory, str) else type(module).__name__
    feed = example_feeds(input_shapes, input_dtypes, seed)
    names = list(feed)
    with torch.no_grad():
        ref = _torch_outputs(torch, module, feed, label)
    outputs = list(output_names) if output_names else (
        ["output"] if len(ref) == 1 else [f"output_{i}" for i in range(len(ref))])
    if len(outputs) != len(ref):
        raise ExportError(f"{len(outputs)} output names for {len(ref)} outputs of '{label}'")
    dims = _dynamic_dims(names, dynamic_dims, dynamic_batch)
    args = tuple(torch.from_numpy(feed[n]) for n in names)
    with _quiet_torch(), torch.no_grad():
        try:
            if exporter == "dynamo":
                model = _export_dynamo(torch, module, args, names, outputs, opset, dims, keep_batchnorm)
            else:
                model = _export_torchscript(torch, module, args, names, outputs, opset, dims, dynamic_batch,
                                            keep_batchnorm)
        except ExportError:
            raise
        except Exception as e:
            hint = "; try --exporter torchscript" if exporter == "dynamo" else ""
            raise ExportError(f"the {exporter} exporter cannot handle '{label}': {_export_cause(e)}{hint}") from e
    checks_feeds = [(feed, ref)]
    if dims:
        other = example_feeds(_resized(input_shapes, dims), input_dtypes, seed + 1)
        with torch.no_grad():
            checks_feeds.append((other, _torch_outputs(torch, module, other, label)))
    with staged_output(output) as staged:
        write_model(model, staged)
        checks = _check(staged, checks_feeds, outputs, atol, rtol)
        failed = [c for c in checks if not c.passed]
        if failed:
            raise ExportError(
                f"the export of '{label}' differs from torch: " + "; ".join(
                    f"output '{c.name}' max |diff| {c.max_abs:.3g}, cosine {c.cosine:.6f}" for c in failed)
                + f" (atol {atol:g}, rtol {rtol:g}); nothing was written")
    return ExportReport(
        output=Path(output), exporter=exporter, opset=_opset(model),
        inputs={n: tuple(int(d) for d in input_shapes[n]) for n in names}, dynamic_dims=dims,
        checks=tuple(checks), batchnorm_nodes=sum(n.op_type == "BatchNormalization" for n in model.graph.node),
        nodes=len(model.graph.node), seconds=time.perf_counter() - start, torch_version=str(torch.__version__),
    )


def _export_dynamo(torch: Any, module: Any, args: tuple[Any, ...], names: list[str], outputs: list[str],
                   opset: int | None, dims: dict[str, dict[int, str]], keep_batchnorm: bool) -> onnx.ModelProto:
    # Dim.DYNAMIC lets torch.export derive the ranges (a sequence axis bounded by the
    # position table) instead of failing on them; the symbols are renamed afterwards
    dynamic_shapes = tuple({a: torch.export.Dim.DYNAMIC for a in dims.get(n, {})} for n in names) if dims else None
    program = torch.onnx.export(
        module, args, dynamo=True, input_names=names, output_names=outputs, opset_version=opset,
        dynamic_shapes=dynamic_shapes, optimize=not keep_batchnorm, verbose=False,
    )
    if keep_batchnorm:
        import onnxscript.optimizer

        # only the folding and cleanup halves of the optimizer: its rewrite rules fuse BN
        onnxscript.optimizer.fold_constants(program.model)
        onnxscript.optimizer.remove_unused_nodes(program.model)
    model = program.model_proto
    _rename_dims(model, dims)
    # the dynamo exporter also declares every weight in value_info; tools that rewrite
    # weights (quantize_dynamic transposes Gemm's) then fail on the stale declaration
    weights = {t.name for t in model.graph.initializer}
    kept = [vi for vi in model.graph.value_info if vi.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model


def _export_torchscript(torch: Any, module: Any, args: tuple[Any, ...], names: list[str], outputs: list[str],
                        opset: int | None, dims: dict[str, dict[int, str]], dynamic_batch: bool,
                        keep_batchnorm: bool) -> onnx.ModelProto:
    dynamic_axes: dict[str, dict[int, str]] | None = {**dims, **(
        {n: {0: "batch"} for n in outputs} if dynamic_batch else {})} or None
    with tempfile.TemporaryDirectory(prefix="onnxopt-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module, args, str(path), dynamo=False, input_names=names, output_names=outputs,
            opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=not keep_batchnorm,
        )
        return onnx.load(str(path))  # external data, if any, is read in while tmp exists


def _torch_outputs(torch: Any, module: Any, feed: Mapping[str, np.ndarray], label: str) -> list[np.ndarray]:
    try:
        result = module(*(torch.from_numpy(a) for a in feed.values()))
    except Exception as e:
        raise ExportError(f"'{label}' fails in torch on inputs {_shapes_text(feed)}: {_one_line(e)}") from e
    flat = _flatten(torch, result)
    if not flat:
        raise ExportError(f"'{label}' returned no tensors")
    return [t.detach().cpu().numpy() for t in flat]


def _flatten(torch: Any, value: Any) -> list[Any]:
    """Tensors in the order the exporters flatten outputs: tuples, lists, dict values."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):  # transformers' ModelOutput
        value = value.to_tuple()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(torch, v)]
    return []


def _check(path: Path, runs: list[tuple[dict[str, np.ndarray], list[np.ndarray]]], outputs: list[str],
           atol: float, rtol: float) -> list[OutputCheck]:
    sess = session(path)
    worst = {n: (0.0, 1.0, True) for n in outputs}
    for feed, ref in runs:
        got = run(sess, feed)
        for name, a, b in zip(outputs, ref, got, strict=False):
            max_abs, cosine, ok = worst[name]
            b = np.asarray(b)
            if a.shape != b.shape:
                worst[name] = (float("inf"), 0.0, False)
                continue
            a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            diff = np.abs(a64 - b64)
            finite = np.isfinite(a64) & np.isfinite(b64)
            same_nonfinite = bool(np.all((a64 == b64) | np.isnan(a64) & np.isnan(b64) | finite))
            denom = float(np.linalg.norm(a64[finite]) * np.linalg.norm(b64[finite]))
            cos = float(a64[finite] @ b64[finite] / denom) if denom else float(np.array_equal(a64, b64))
            max_abs = max(max_abs, float(diff[finite].max()) if finite.any() else 0.0)
            ok = ok and same_nonfinite and bool(np.all(diff[finite] <= atol + rtol * np.abs(a64[finite])))
            worst[name] = (max_abs, min(cosine, cos), ok)
    return [OutputCheck(n, *worst[n]) for n in outputs]


def _dynamic_dims(names: list[str], dynamic_dims: Mapping[str, Mapping[int, str]] | None,
                  dynamic_batch: bool) -> dict[str, dict[int, str]]:
    unknown = sorted(set(dynamic_dims or {}) - set(names))
    if unknown:
        raise ExportError(f"dynamic dims name unknown input(s) {', '.join(unknown)}; inputs: {', '.join(names)}")
    dims = {n: ({0: "batch"} if dynamic_batch else {}) | dict((dynamic_dims or {}).get(n, {})) for n in names}
    return {n: d for n, d in dims.items() if d}


def _resized(shapes: Mapping[str, Sequence[int]], dims: Mapping[str, Mapping[int, str]]) -> dict[str, tuple[int, ...]]:
    """The same shapes with every dynamic axis changed, to prove it is dynamic."""
    sizes: dict[str, int] = {}
    out = {}
    for n, shape in shapes.items():
        new = [int(d) for d in shape]
        for axis, sym in dims.get(n, {}).items():
            new[axis] = sizes.setdefault(sym, new[axis] + 1 if new[axis] > 1 else 2)
        out[n] = tuple(new)
    return out


def _rename_dims(model: onnx.ModelProto, dims: Mapping[str, Mapping[int, str]]) -> None:
    """Give the exporter's symbols (s43) the names the user asked for (batch)."""
    rename: dict[str, str] = {}
    for vi in model.graph.input:
        for axis, name in dims.get(vi.name, {}).items():
            d = vi.type.tensor_type.shape.dim[axis]
            if d.dim_param:
                rename.setdefault(d.dim_param, name)
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _opset(model: onnx.ModelProto) -> int:
    return next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Swallow the exporters' prints, warnings and log lines; keep them for -vv."""
    buf = io.StringIO()
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(level)
        if buf.getvalue():
            logger.debug("exporter output:\n%s", buf.getvalue())


def _export_cause(e: BaseException) -> str:
    """The innermost cause's first line: the exporters wrap it in pages of advice."""
    inner = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = _ANSI.sub("", str(inner))
    if op := re.search(r"target=([\w.]+)", text):
        return f"operator {op.group(1)} is not supported"
    summary = re.search(r"## Exception summary\s+(.+)", _ANSI.sub("", str(e)))
    if summary and inner is e:
        text = summary.group(1)
    return _first_line(type(inner).__name__, text)


def _one_line(e: BaseException) -> str:
    return _first_line(type(e).__name__, str(e))


def _first_line(kind: str, text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{kind}: {lines[0][:300]}" if lines else kind


def _shapes_text(feed: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())
