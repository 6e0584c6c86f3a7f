"""Inputs that fit the model, when the user gives none.

Two questions, answered from the graph and, where the graph cannot tell, by asking the
original model in onnxruntime:

**Which shape?** Static dims are kept and ``--input-shape`` pins win. A dynamic dim is
resolved, in order, by a name rule (``batch``/``N`` -> 1, ``seq``/``len``/``time`` -> 32),
then by what the graph implies (the same symbol pinned elsewhere; the input channels of a
Conv or the rows of a MatMul/Gemm weight it feeds; a static sibling spatial dim, as in
``[N, 3, 48, W]``), then by usual sizes (224, 256, 320, 128, 64, 640, 32 for spatial dims,
all multiples of 32 so stride-32 detectors line up; 32, 64, 128, 16, ... otherwise).
``synthesize`` then *probes*: it runs the original model on the first candidate shape,
and on the next ones while onnxruntime refuses, first moving every guessed dim together,
then one dim at a time, within a small budget of runs. The first shape the original model
runs on is kept; every guessed dim is named in ``Dataset.notes`` with how to pin another.

**Which values?** Each input is followed to the ops that read it (through Cast, Reshape,
Squeeze, Unsqueeze, Transpose, Identity, Concat and friends, which pass values on), and
the role it plays there is read from the op's schema: the formal input name (``indices``,
``K``, ``shape``, ``axes``, ``starts``, ``pads``, ``split``, ...) says what a value must be,
whatever the op. Indices stay inside the dim they index (Gather, GatherElements, GatherND,
Scatter*, OneHot's depth, embedding tables); TopK's ``k`` stays within its axis; divisors
of Div and Mod are non-zero; shape-like inputs get values that keep the data as it is
(a Reshape target equal to the data's shape, Expand/Tile by ones, Slice over everything,
zero pads, equal splits); boolean masks and loop conditions are true. Inputs with no such
role are random: floats standard normal, integers in [0, 10). Sequence inputs are built as
two tensors of their element type; optional inputs get their element.

When no candidate runs, ``Dataset.unusable`` holds the original model's own error on the
first candidate, and which shapes and values were guessed: validation is then skipped,
never blamed on the rewrite.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxopt.errors import InputDataError, OnnxoptError

logger = logging.getLogger(__name__)

Feed = dict[str, Any]

SPATIAL_SIZES = (224, 256, 320, 128, 64, 640, 32)
OTHER_SIZES = (32, 64, 128, 16, 8, 4, 2, 1, 256)
SEQUENCE_SIZES = (32, 16, 64, 128, 8, 256, 512)  # 512: an audio frame (Silero VAD at 16 kHz)
UNKNOWN_RANK_SHAPES: tuple[tuple[int, ...], ...] = ((2, 3), (6,), (1, 3, 32, 32), (1, 16, 8), ())
MAX_PROBES = 16  # runs of the original model while looking for a shape it accepts
PROBE_SECONDS = 60.0  # ... and at most this long (a probe that started may finish)
INT_HIGH = 10  # integers with no role: [0, INT_HIGH)

_BATCH = re.compile(r"batch|^bs$", re.IGNORECASE)
_LEADING_BATCH = re.compile(r"^[nb]$", re.IGNORECASE)  # 'N' or 'b' means batch as the first dim only
_SEQ = re.compile(r"seq|len|token|time|^t$|^s$", re.IGNORECASE)
_SPATIAL = re.compile(r"height|width|^h$|^w$|^h_|^w_|_h$|_w$|size|spatial|^x$|^y$", re.IGNORECASE)
_MASK = re.compile(r"mask", re.IGNORECASE)
# recurrent states and caches ([layers, batch, hidden], past key/values) carry the batch on a
# later axis: their dynamic dims start at 1, like a batch
_STATE = re.compile(r"state|cache|past|^h0$|^c0$|^h_0$|^c_0$", re.IGNORECASE)

# ops that hand the values of their first input on (maybe reshaped or converted)
_PASS_ON = frozenset({
    "Identity", "Cast", "CastLike", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose",
    "Expand", "Tile", "Concat", "Split", "Slice", "Gather", "Abs", "Neg", "Add", "Sub",
    "Clip", "Max", "Min", "ReduceMax", "ReduceMin", "Where",
})
_PASS_ON_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # None: rank unknown
    kind: str = "tensor"  # tensor | sequence | optional


@dataclasses.dataclass(frozen=True)
class Dim:
    """One dynamic dim of one input."""

    input: str
    axis: int
    param: str | None
    spatial: bool

    @property
    def label(self) -> str:
        return f"'{self.input}' dim {self.axis}" + (f" ('{self.param}')" if self.param else "")


@dataclasses.dataclass
class Role:
    """What the graph does with an input's values (the first role found wins)."""

    kind: str  # index | k | divisor | shape-like | positive-count | true | free
    op: str = ""
    formal: str = ""
    node: onnx.NodeProto | None = None
    path: tuple[str, ...] = ()  # tensors from the input to where the role was found


# ---------------------------------------------------------------------------------------------
# inputs and their declared types


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that must be fed (initializers with the same name excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        specs.append(_spec(vi.name, vi.type))
    return specs


def _spec(name: str, tp: onnx.TypeProto) -> InputSpec:
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        return InputSpec(name, _np_dtype(tp.tensor_type.elem_type), _shape(tp.tensor_type))
    if which == "sequence_type" and tp.sequence_type.elem_type.WhichOneof("value") == "tensor_type":
        elem = tp.sequence_type.elem_type.tensor_type
        return InputSpec(name, _np_dtype(elem.elem_type), _shape(elem), "sequence")
    if which == "optional_type":
        inner = _spec(name, tp.optional_type.elem_type)
        return dataclasses.replace(inner, kind="optional" if inner.kind == "tensor" else inner.kind)
    raise InputDataError(
        f"input '{name}' is a {which or 'value of unknown type'}; onnxopt can only generate tensors "
        "and sequences of tensors: pass --data with your own inputs"
    )


def _np_dtype(elem: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else np.dtype(np.float32)


def _shape(tt: onnx.TypeProto.Tensor) -> tuple[int | str | None, ...] | None:
    if not tt.HasField("shape"):
        return None
    # a negative dim_value (Paddle2ONNX writes -1) means dynamic, like an empty dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
                 for d in tt.shape.dim)


# ---------------------------------------------------------------------------------------------
# shapes


def check_pins(specs: Sequence[InputSpec], pins: Mapping[str, Sequence[int]]) -> None:
    names = {s.name for s in specs}
    for name, dims in pins.items():
        if name not in names:
            raise InputDataError(
                f"--input-shape names '{name}', but the model's inputs are: {', '.join(sorted(names))}"
            )
        spec = next(s for s in specs if s.name == name)
        if spec.shape is None:
            continue
        if len(dims) != len(spec.shape):
            raise InputDataError(
                f"--input-shape {name}: rank {len(dims)} but the model declares rank {len(spec.shape)}"
            )
        for i, (p, d) in enumerate(zip(dims, spec.shape, strict=True)):
            if isinstance(d, int) and p != d:
                raise InputDataError(f"--input-shape {name}: dim {i} is {p} but the model fixes it to {d}")


def dynamic_dims(specs: Sequence[InputSpec], pins: Mapping[str, Sequence[int]]) -> list[Dim]:
    dims = []
    for s in specs:
        if s.name in pins or s.shape is None:
            continue
        rank = len(s.shape)
        for axis, d in enumerate(s.shape):
            if isinstance(d, int):
                continue
            param = d if isinstance(d, str) else None
            spatial = bool(param and _SPATIAL.search(param)) or (rank >= 3 and axis >= 2 and not (
                param and (_BATCH.search(param) or _SEQ.search(param))))
            if axis == 0 and param and _LEADING_BATCH.search(param):
                spatial = False
            dims.append(Dim(s.name, axis, param, spatial))
    return dims


def _name_rule(dim: Dim) -> int | None:
    if dim.param and (_BATCH.search(dim.param) or (dim.axis == 0 and _LEADING_BATCH.search(dim.param))):
        return 1
    if dim.axis == 0 and not dim.spatial:
        return 1  # a leading dynamic dim is a batch, whatever its name
    if _STATE.search(dim.input) and not (dim.param and _SEQ.search(dim.param)):
        return 1  # an unnamed dim of a recurrent state: its batch
    return None


def _implied(model: onnx.ModelProto, spec: InputSpec, dim: Dim, uses: Mapping[str, list[Any]],
             inits: Mapping[str, onnx.TensorProto]) -> list[int]:
    """Sizes the graph implies for ``dim``: a weight it meets, a static sibling spatial dim."""
    found: list[int] = []
    rank = len(spec.shape or ())
    for node, index in uses.get(spec.name, []):
        weight = inits.get(node.input[1]) if len(node.input) > 1 and index == 0 else None
        if weight is None or not weight.dims:
            continue
        if node.op_type == "Conv" and dim.axis == 1 and len(weight.dims) >= 2:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            found.append(int(weight.dims[1]) * group)
        elif node.op_type == "MatMul" and dim.axis == rank - 1 and len(weight.dims) == 2:
            found.append(int(weight.dims[0]))
        elif node.op_type == "Gemm" and dim.axis == rank - 1 and len(weight.dims) == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            found.append(int(weight.dims[1 if trans_b else 0]))
    if dim.spatial and spec.shape is not None and rank >= 3:
        found += [d for a, d in enumerate(spec.shape) if a >= 2 and a != dim.axis and isinstance(d, int) and d > 0]
    return found


def candidates(model: onnx.ModelProto, specs: Sequence[InputSpec], pins: Mapping[str, Sequence[int]],
               uses: Mapping[str, list[tuple[onnx.NodeProto, int]]] | None = None,
               ) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Per dim group (its symbol, or input:axis): candidate sizes in order, and how the first was found."""
    uses = uses if uses is not None else _consumers(model)
    inits = {t.name: t for t in model.graph.initializer}
    fixed: dict[str, int] = {}
    for s in specs:  # a symbol pinned (or static) on one input fixes it everywhere
        if s.shape is None:
            continue
        for axis, d in enumerate(s.shape):
            if isinstance(d, str) and s.name in pins:
                fixed.setdefault(d, int(pins[s.name][axis]))
    groups: dict[str, list[int]] = {}
    how: dict[str, str] = {}
    by_name = {s.name: s for s in specs}
    for s in specs:
        if s.shape is None and s.name not in pins:
            key = f"{s.name}:*"
            groups[key], how[key] = list(range(len(UNKNOWN_RANK_SHAPES))), "no shape declared"
    for dim in dynamic_dims(specs, pins):
        key = _group(dim)
        if key in groups:
            continue
        if dim.param in fixed:
            groups[key], how[key] = [fixed[dim.param]], "pinned on another input"
            continue
        if (v := _name_rule(dim)) is not None:
            groups[key], how[key] = [v, 2, 4], "a batch dim"
            continue
        implied = _implied(model, by_name[dim.input], dim, uses, inits)
        if dim.spatial:
            usual, why = SPATIAL_SIZES, "a usual spatial size"
        elif dim.param and _SEQ.search(dim.param):
            usual, why = SEQUENCE_SIZES, "a usual sequence length"
        else:
            usual, why = OTHER_SIZES, "a usual size"
        groups[key] = list(dict.fromkeys([*implied, *usual]))
        how[key] = "implied by the graph" if implied else why
    return groups, how


def _group(dim: Dim) -> str:
    return dim.param if dim.param else f"{dim.input}:{dim.axis}"


def concrete_shapes(specs: Sequence[InputSpec], pins: Mapping[str, Sequence[int]],
                    choice: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for s in specs:
        if s.name in pins:
            shapes[s.name] = tuple(int(d) for d in pins[s.name])
            continue
        if s.shape is None:  # not even the rank is declared: candidate shapes, probed like dims
            shapes[s.name] = UNKNOWN_RANK_SHAPES[choice[f"{s.name}:*"]]
            continue
        shapes[s.name] = tuple(
            d if isinstance(d, int) else choice[_group(Dim(s.name, a, d if isinstance(d, str) else None,
                                                                      False))]
            for a, d in enumerate(s.shape)
        )
    return shapes


def resolve_shapes(model: onnx.ModelProto, pins: Mapping[str, Sequence[int]] | None = None,
                   ) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The first candidate shape of every input, without running the model, and notes."""
    pins = dict(pins or {})
    specs = model_inputs(model)
    check_pins(specs, pins)
    groups, how = candidates(model, specs, pins)
    shapes = concrete_shapes(specs, pins, {k: v[0] for k, v in groups.items()})
    return shapes, _notes(specs, pins, groups, how, {k: v[0] for k, v in groups.items()}, probed=False)


def _notes(specs: Sequence[InputSpec], pins: Mapping[str, Sequence[int]], groups: Mapping[str, list[int]],
           how: Mapping[str, str], choice: Mapping[str, int], probed: bool) -> list[str]:
    notes = []
    seen: set[str] = set()
    for dim in dynamic_dims(specs, pins):
        key = _group(dim)
        if key in seen:
            continue
        seen.add(key)
        value = choice[key]
        if value != groups[key][0]:
            notes.append(f"input {dim.label} = {value} (the first size the original model runs on)")
            continue
        notes.append(f"input {dim.label} = {value} ({how[key]}"
                     + ("; the original model runs on it)" if probed else ")"))
    for s in specs:
        if s.shape is None and s.name not in pins:
            shape = "x".join(map(str, UNKNOWN_RANK_SHAPES[choice[f"{s.name}:*"]]))
            notes.append(f"input '{s.name}' declares no shape: {shape}"
                         + (" (the original model runs on it)" if probed else " (a guess)")
                         + f"; pin its real shape with --input-shape {s.name}=...")
    if any(s.shape is not None and s.name not in pins and any(not isinstance(d, int) for d in s.shape)
           for s in specs):
        chosen = concrete_shapes(specs, pins, choice)  # a runnable example: the sizes used here
        dynamic = [s for s in specs if s.shape is not None and s.name not in pins
                   and any(not isinstance(d, int) for d in s.shape)]
        notes.append("pin other sizes by changing the dynamic ones in " + " ".join(
            f"--input-shape {s.name}=" + ",".join(map(str, chosen[s.name])) for s in dynamic)
            + " (declared: " + ", ".join(f"{s.name}[" + ",".join(str(d) if isinstance(d, int) else (d or "?")
                                                                   for d in s.shape) + "]" for s in dynamic) + ")")
    return notes


# ---------------------------------------------------------------------------------------------
# values


def _consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Tensor name -> (node, input index) of every reader, subgraphs included (outer scope)."""
    from onnxopt.graph_utils import iter_proto_graphs

    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for g in iter_proto_graphs(model.graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name:
                    uses.setdefault(name, []).append((node, i))
    return uses


def _opset(model: onnx.ModelProto, domain: str) -> int:
    for imp in model.opset_import:
        if imp.domain == domain or (domain in ("", "ai.onnx") and imp.domain in ("", "ai.onnx")):
            return imp.version
    return 1


def _formal(model: onnx.ModelProto, node: onnx.NodeProto, index: int) -> str:
    """The schema's name for input ``index`` of ``node`` ('' when onnx does not know the op)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, _opset(model, node.domain), node.domain)
    except Exception:
        return ""
    formals = schema.inputs
    if not formals:
        return ""
    if index < len(formals):
        return formals[index].name
    last = formals[-1]
    return last.name if last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic else ""


# formal input name -> role; what the value must be is decided in ``_value``
_ROLE_OF_FORMAL = {
    "indices": "index", "K": "k", "shape": "shape-like", "repeats": "shape-like", "axes": "shape-like",
    "starts": "shape-like", "ends": "shape-like", "steps": "shape-like", "pads": "shape-like",
    "sizes": "shape-like", "scales": "shape-like", "roi": "shape-like", "split": "shape-like",
    "depth": "positive-count", "M": "positive-count", "cond": "true", "condition": "true",
    "start": "shape-like", "limit": "shape-like", "delta": "shape-like", "axis": "shape-like",
    "max_output_boxes_per_class": "positive-count", "sequence_lens": "shape-like",
    "position": "shape-like",
}


def roles(model: onnx.ModelProto, uses: Mapping[str, list[tuple[onnx.NodeProto, int]]] | None = None) -> dict[str, Role]:
    """Input name -> the role its values play where they are read (``free`` when none)."""
    uses = uses if uses is not None else _consumers(model)
    out: dict[str, Role] = {}
    for spec in model_inputs(model):
        out[spec.name] = _find_role(model, spec.name, uses) or Role("free")
    return out


def _find_role(model: onnx.ModelProto, name: str, uses: Mapping[str, list[tuple[onnx.NodeProto, int]]],
               ) -> Role | None:
    frontier: list[tuple[str, tuple[str, ...]]] = [(name, (name,))]
    seen = {name}
    for _ in range(_PASS_ON_DEPTH):
        nxt = []
        for tensor, path in frontier:
            for node, index in uses.get(tensor, []):
                formal = _formal(model, node, index)
                if node.op_type in ("Div", "Mod") and formal == "B" and node.domain in ("", "ai.onnx"):
                    return Role("divisor", node.op_type, formal, node, path)
                role = _ROLE_OF_FORMAL.get(formal) if formal != "K" or node.op_type == "TopK" else None
                if role and node.domain in ("", "ai.onnx"):
                    return Role(role, node.op_type, formal, node, path)
                if node.op_type in _PASS_ON and node.domain in ("", "ai.onnx") and (
                        index == 0 or node.op_type in ("Concat", "Max", "Min", "Add", "Sub", "Where")):
                    for out_name in node.output[:1] if node.op_type != "Split" else node.output:
                        if out_name and out_name not in seen:
                            seen.add(out_name)
                            nxt.append((out_name, (*path, out_name)))
        frontier = nxt
        if not frontier:
            break
    return None


def _infer_types(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> dict[str, onnx.TypeProto]:
    """Shape inference with the inputs at ``shapes`` (weights left out: only dims are read)."""
    from onnxopt.shapes import copy_structure

    light = onnx.ModelProto()
    copy_structure(model, light)
    for vi in light.graph.input:
        if vi.name in shapes and vi.type.WhichOneof("value") == "tensor_type":
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in shapes[vi.name]:
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as e:
        logger.info("shape inference for input synthesis failed: %s", str(e).splitlines()[0])
        return {}
    types = {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
             + list(inferred.graph.output)}
    for t in model.graph.initializer:
        types.setdefault(t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    return types


def _dims_of(types: Mapping[str, onnx.TypeProto], name: str) -> list[int | None] | None:
    tp = types.get(name)
    if tp is None or tp.WhichOneof("value") != "tensor_type" or not tp.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tp.tensor_type.shape.dim]


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _const(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return onnx.numpy_helper.to_array(a.t)
    return None


def _index_bound(model: onnx.ModelProto, role: Role, types: Mapping[str, onnx.TypeProto]) -> int | None:
    """Exclusive upper bound for an index input (None: unknown, index 0 is then the safe choice)."""
    node = role.node
    assert node is not None
    if node.op_type == "OneHot":
        depth = _const(model, node.input[1]) if len(node.input) > 1 else None
        return int(np.asarray(depth).reshape(-1)[0]) if depth is not None else None
    data = _dims_of(types, node.input[0])
    if not data:
        return None
    if node.op_type == "GatherND" or node.op_type == "ScatterND":
        batch = int(_attr(node, "batch_dims", 0))
        dims = [d for d in data[batch:] if d is not None]
        return min(dims) if dims and len(dims) == len(data[batch:]) else None
    axis = int(_attr(node, "axis", 0))
    if -len(data) <= axis < len(data):
        return data[axis]
    return None


def _value(model: onnx.ModelProto, spec: InputSpec, shape: tuple[int, ...], role: Role,
           types: Mapping[str, onnx.TypeProto], rng: np.random.Generator) -> np.ndarray:
    dtype = spec.dtype
    if dtype == np.bool_:
        if role.kind == "true" or _MASK.search(spec.name):
            return np.ones(shape, np.bool_)
        return rng.random(shape) > 0.5
    if dtype.kind in "USO":
        return np.array([f"s{i}" for i in range(math.prod(shape))], dtype=object).reshape(shape)
    integer = np.issubdtype(dtype, np.integer)
    if role.kind == "index":
        high = _index_bound(model, role, types)
        if integer:
            return rng.integers(0, high, size=shape).astype(dtype) if high else np.zeros(shape, dtype)
        return np.zeros(shape, dtype)
    if role.kind == "k":
        x = _dims_of(types, role.node.input[0]) if role.node is not None else None
        axis = int(_attr(role.node, "axis", -1)) if role.node is not None else -1
        dim = x[axis] if x and -len(x) <= axis < len(x) else None
        return np.full(shape, max(1, (dim or 2) // 2), dtype)
    if role.kind == "divisor":
        if integer:
            low = 1
            return rng.integers(low, INT_HIGH, size=shape).astype(dtype)
        mag = rng.uniform(0.5, 2.0, size=shape)
        return (np.where(rng.random(shape) > 0.5, mag, -mag)).astype(dtype)
    if role.kind == "positive-count":
        return np.full(shape, 3, dtype)
    if role.kind == "true":
        return np.ones(shape, dtype)
    if role.kind == "shape-like":
        return _shape_like(model, role, shape, dtype, types)
    if _MASK.search(spec.name) and (integer or dtype.kind == "f"):
        return np.ones(shape, dtype)
    if integer:
        low = 0
        return rng.integers(low, INT_HIGH, size=shape).astype(dtype)
    if dtype.kind == "f" or dtype.kind == "c" or dtype.kind == "V":
        return rng.standard_normal(shape).astype(dtype)
    raise InputDataError(f"input '{spec.name}': cannot generate data of type {dtype}")


def _shape_like(model: onnx.ModelProto, role: Role, shape: tuple[int, ...], dtype: np.dtype,
                types: Mapping[str, onnx.TypeProto]) -> np.ndarray:
    """Values for shape, axes, starts, ... that keep the data as it is."""
    node = role.node
    assert node is not None
    n = math.prod(shape)
    data = _dims_of(types, node.input[0]) if node.input and node.input[0] else None
    known = data is not None and all(d is not None for d in data)
    f, op = role.formal, node.op_type
    if f == "shape" and op == "Reshape" and known:
        dims = list(data)  # type: ignore[arg-type]
        if n < len(dims):
            dims = [*dims[: max(n - 1, 0)], -1] if n else []
        else:
            dims = dims + [1] * (n - len(dims))
        values: list[float] = dims
    elif f == "shape" and op == "Expand":
        values = [1] * n
    elif f in ("sizes",) and known:
        values = list(data)[-n:] if n <= len(data) else [1] * n  # type: ignore[arg-type]
    elif f in ("repeats", "steps", "scales", "delta"):
        values = [1] * n
    elif f == "axes" and op == "Squeeze" and data is not None:
        ones = [a for a, d in enumerate(data) if d == 1]
        values = (ones + list(range(n)))[:n] if ones else list(range(n))
    elif f in ("axes", "axis"):
        values = list(range(n))
    elif f == "ends" and known:
        values = list(data)[:n] + [2**31 - 1] * max(0, n - len(data))  # type: ignore[arg-type]
    elif f == "ends":
        values = [2**31 - 1] * n
    elif f == "limit":
        values = [INT_HIGH] * n
    elif f == "split" and known:
        axis = int(_attr(node, "axis", 0))
        total = data[axis] if -len(data) <= axis < len(data) else None  # type: ignore[index]
        if total and n:
            base = [total // n] * n
            base[-1] += total - sum(base)
            values = base
        else:
            values = [1] * n
    elif f == "shape" and op == "ConstantOfShape":
        values = [2] * n
    elif f == "sequence_lens" and known:
        values = [data[0] if data else 1] * n  # type: ignore[index]
    else:  # starts, pads, roi, start: zeros keep everything
        values = [0] * n
    return np.asarray(values, dtype=np.float64).reshape(shape).astype(dtype)


def feeds_for(model: onnx.ModelProto, specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]],
              count: int, seed: int, input_roles: Mapping[str, Role] | None = None,
              types: Mapping[str, onnx.TypeProto] | None = None) -> list[Feed]:
    """``count`` feeds at ``shapes`` whose values fit the roles of the inputs."""
    input_roles = input_roles if input_roles is not None else roles(model)
    types = types if types is not None else _infer_types(model, shapes)
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed: Feed = {}
        for s in specs:
            role = input_roles.get(s.name, Role("free"))
            if s.kind == "sequence":
                feed[s.name] = [_value(model, s, shapes[s.name], role, types, rng) for _ in range(2)]
            else:
                feed[s.name] = _value(model, s, shapes[s.name], role, types, rng)
        feeds.append(feed)
    return feeds


# ---------------------------------------------------------------------------------------------
# probing


@dataclasses.dataclass
class Synthesis:
    feeds: list[Feed]
    shapes: dict[str, tuple[int, ...]]
    notes: list[str]
    unusable: str | None  # the original model's error on every candidate tried, or None
    probes: int = 0


def _assignments(groups: Mapping[str, list[int]], late: Collection[str] = ()) -> Iterator[dict[str, int]]:
    """Every guessed dim moved together, then one dim at a time (others at their first value).

    ``late`` groups (batch dims) stay at their first value while the others move together:
    a batch of 1 is what a user runs, and rarely why a model refuses a shape.
    """
    keys = list(groups)
    first = {k: groups[k][0] for k in keys}
    yield dict(first)
    multi = [k for k in keys if len(groups[k]) > 1]
    moving = [k for k in multi if k not in late]
    for i in itertools.count(1):
        if not any(i < len(groups[k]) for k in moving):
            break
        together = {**first, **{k: groups[k][min(i, len(groups[k]) - 1)] for k in moving}}
        yield together
    if len(multi) > 1:
        for k in multi:
            for v in groups[k][1:]:
                yield {**first, k: v}


def synthesize(model: onnx.ModelProto, run: Any, pins: Mapping[str, Sequence[int]] | None = None,
               count: int = 8, seed: int = 0, max_probes: int = MAX_PROBES,
               seconds: float = PROBE_SECONDS) -> Synthesis:
    """Feeds on which the original model runs: ``run(feed)`` raises ``OnnxoptError`` when it does not.

    ``run`` is the original model's onnxruntime session call (``onnxopt.runtime.run`` bound to a
    session), so probing costs one inference per candidate and no second model load.
    """
    pins = dict(pins or {})
    specs = model_inputs(model)
    check_pins(specs, pins)
    uses = _consumers(model)  # one walk of the graph for the dims and the values
    groups, how = candidates(model, specs, pins, uses)
    input_roles = roles(model, uses)
    first_error: str | None = None
    first_shapes: dict[str, tuple[int, ...]] | None = None
    t0 = time.perf_counter()
    probes = 0
    tried: set[tuple[tuple[str, int], ...]] = set()
    late = {k for k, why in how.items() if why == "a batch dim"}
    for choice in _assignments(groups, late):
        key = tuple(sorted(choice.items()))
        if key in tried:
            continue
        tried.add(key)
        if probes >= max_probes or (probes and time.perf_counter() - t0 > seconds):
            break
        shapes = concrete_shapes(specs, pins, choice)
        types = _infer_types(model, shapes)
        feeds = feeds_for(model, specs, shapes, 1, seed, input_roles, types)
        probes += 1
        try:
            run(feeds[0])
        except OnnxoptError as e:
            if first_error is None:
                first_error, first_shapes = str(e), shapes
            logger.info("probe %s: %s", shapes, str(e).splitlines()[0])
            continue
        more = feeds_for(model, specs, shapes, count - 1, seed + 1, input_roles, types) if count > 1 else []
        return Synthesis(feeds + more, shapes, _notes(specs, pins, groups, how, choice, probed=True),
                         None, probes)
    assert first_shapes is not None
    assert first_error is not None
    guessed = ", ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in first_shapes.items())
    roles_said = "; ".join(
        f"'{k}' as {r.kind} of {r.op}" for k, r in input_roles.items() if r.kind != "free")
    unusable = (f"the original model fails on generated inputs ({guessed}"
                + (f"; values: {roles_said}" if roles_said else "") + f"): {first_error}"
                + (f" (tried {probes} shapes)" if probes > 1 else ""))
    feeds = feeds_for(model, specs, first_shapes, count, seed, input_roles)
    return Synthesis(feeds, first_shapes, _notes(specs, pins, groups, how,
                                                  {k: v[0] for k, v in groups.items()}, probed=False),
                     unusable, probes)
