"""Input data: the user's ``.npz`` (or a directory of them) or generated inputs.

An ``.npz`` holds one array per model input, named after it, samples on the first
axis, plus an optional ``labels`` array. A directory holds ``.npz`` files that are
each one complete feed (for inputs whose shapes vary, like sentences). Generated
inputs honour each input's dtype, static dims and ``--input-shape`` pins; a dynamic
dim that cannot be guessed is an error that names it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxopt.errors import InputDataError

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # None: rank unknown


@dataclasses.dataclass
class Dataset:
    """Feeds for a model, and labels aligned with the samples when the user gave them."""

    feeds: list[Feed]
    labels: np.ndarray | None = None
    generated: bool = False
    source: str = ""

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self) -> Iterator[Feed]:
        return iter(self.feeds)

    def split(self, fraction: float) -> tuple[Dataset, Dataset]:
        """Two disjoint datasets (for calibration vs. evaluation), first gets ``fraction``."""
        k = max(1, min(len(self.feeds) - 1, round(len(self.feeds) * fraction)))
        if len(self.feeds) < 2:
            return self, self
        label_cut = None
        if self.labels is not None:
            label_cut = sum(_batch_of(f) for f in self.feeds[:k])
        return (
            Dataset(self.feeds[:k], None if label_cut is None else self.labels[:label_cut],
                    self.generated, self.source),
            Dataset(self.feeds[k:], None if label_cut is None else self.labels[label_cut:],
                    self.generated, self.source),
        )


def _batch_of(feed: Feed) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim else 1


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that must be fed (initializers with the same name excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if vi.type.WhichOneof("value") != "tensor_type":
            raise InputDataError(f"input '{vi.name}' is not a tensor; feed it with your own harness")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        shape = None
        if tt.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
            )
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


def parse_input_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x=1,3,224,224", "mask=1,128"]`` -> dict; one clear error for a malformed item."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, eq, dims = item.rpartition("=")
        if not eq or not name:
            raise InputDataError(f"--input-shape '{item}' must look like NAME=1,3,224,224")
        try:
            shapes[name] = tuple(int(d) for d in re.split(r"[,x]", dims) if d.strip())
        except ValueError:
            raise InputDataError(f"--input-shape '{item}': dims must be integers") from None
    return shapes


def _check_pins(specs: Sequence[InputSpec], pins: Mapping[str, Sequence[int]]) -> None:
    names = {s.name for s in specs}
    for name in pins:
        if name not in names:
            raise InputDataError(
                f"--input-shape names '{name}', but the model's inputs are: {', '.join(sorted(names))}"
            )


_BATCH = re.compile(r"batch|^n$|^b$|^bs$|^N$", re.IGNORECASE)
_SEQ = re.compile(r"seq|len|token|time|^t$|^s$", re.IGNORECASE)


def concrete_shape(spec: InputSpec, pins: Mapping[str, Sequence[int]], symbols: dict[str, int]) -> tuple[int, ...]:
    """Resolve one input's shape from pins, static dims and guessable symbolic dims."""
    if spec.name in pins:
        pinned = tuple(int(d) for d in pins[spec.name])
        if spec.shape is not None:
            if len(pinned) != len(spec.shape):
                raise InputDataError(
                    f"--input-shape {spec.name}: rank {len(pinned)} but the model declares rank {len(spec.shape)}"
                )
            for i, (p, d) in enumerate(zip(pinned, spec.shape)):
                if isinstance(d, int) and d > 0 and p != d:
                    raise InputDataError(
                        f"--input-shape {spec.name}: dim {i} is {p} but the model fixes it to {d}"
                    )
                if isinstance(d, str):
                    symbols.setdefault(d, p)
        return pinned
    if spec.shape is None:
        raise InputDataError(
            f"input '{spec.name}' has no declared shape; pin it with --input-shape {spec.name}=..."
        )
    dims: list[int] = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int) and d > 0:
            dims.append(d)
            continue
        if isinstance(d, str) and d in symbols:
            dims.append(symbols[d])
            continue
        label = d if isinstance(d, str) else "?"
        if axis == 0 or (isinstance(d, str) and _BATCH.search(d)):
            value = 1
        elif isinstance(d, str) and _SEQ.search(d):
            value = 32
        else:
            raise InputDataError(
                f"input '{spec.name}' dim {axis} ('{label}') is dynamic and cannot be guessed; "
                f"pin it with --input-shape {spec.name}="
                + ",".join(str(x) if isinstance(x, int) and x > 0 else "N" for x in spec.shape)
            )
        if isinstance(d, str):
            symbols[d] = value
        dims.append(value)
    return tuple(dims)


def _int_upper_bound(model: onnx.ModelProto, name: str) -> int | None:
    """Largest safe index for an integer input that feeds Gather indices (an embedding table)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            table = inits.get(node.input[0])
            if table is not None and table.dims:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                return int(table.dims[axis])
    return None


def generate(
    model: onnx.ModelProto,
    count: int = 8,
    pins: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> Dataset:
    """Random feeds honouring dtypes, static dims and pins; integer ids stay in vocabulary."""
    pins = dict(pins or {})
    specs = model_inputs(model)
    _check_pins(specs, pins)
    symbols: dict[str, int] = {}
    shapes = {s.name: concrete_shape(s, pins, symbols) for s in specs}
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed: Feed = {}
        for s in specs:
            shape = shapes[s.name]
            if np.issubdtype(s.dtype, np.floating):
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
            elif s.dtype == np.bool_:
                feed[s.name] = rng.random(shape) > 0.5
            elif np.issubdtype(s.dtype, np.integer):
                if "mask" in s.name.lower():
                    feed[s.name] = np.ones(shape, dtype=s.dtype)
                else:
                    high = _int_upper_bound(model, s.name) or 10
                    low = 0 if np.issubdtype(s.dtype, np.unsignedinteger) or high != 10 else 0
                    feed[s.name] = rng.integers(low, high, size=shape).astype(s.dtype)
            elif s.dtype.kind in "US":
                feed[s.name] = np.array(
                    [f"s{i}" for i in range(int(np.prod(shape)))], dtype=object
                ).reshape(shape)
            else:
                raise InputDataError(f"input '{s.name}': cannot generate data of type {s.dtype}")
        feeds.append(feed)
    return Dataset(feeds, generated=True, source=f"generated (seed {seed})")


def _cast(name: str, arr: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    if arr.dtype == dtype:
        return arr
    if np.can_cast(arr.dtype, dtype, casting="same_kind") or (
        arr.dtype.kind in "iub" and dtype.kind in "iub"
    ):
        return arr.astype(dtype)
    raise InputDataError(f"{where}: array '{name}' has dtype {arr.dtype}, the model input needs {dtype}")


def _open_npz(path: Path) -> Mapping[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputDataError(f"{path}: not a readable .npz file ({str(e).splitlines()[0]})") from None


def load(
    path: str | Path,
    model: onnx.ModelProto,
    batch_size: int = 16,
    limit: int | None = None,
) -> Dataset:
    """Load an ``.npz`` with samples on the first axis, or a directory of per-feed ``.npz``."""
    path = Path(path)
    specs = model_inputs(model)
    names = [s.name for s in specs]
    if not path.exists():
        raise InputDataError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise InputDataError(f"{path}: directory holds no .npz files")
        feeds, labels = [], []
        for f in files[:limit]:
            arrays = _open_npz(f)
            _require(arrays, names, f)
            feeds.append({s.name: _cast(s.name, arrays[s.name], s.dtype, str(f)) for s in specs})
            if "labels" in arrays:
                labels.append(np.atleast_1d(arrays["labels"]))
        lab = np.concatenate(labels) if labels and len(labels) == len(feeds) else None
        return Dataset(feeds, lab, source=str(path))
    arrays = _open_npz(path)
    _require(arrays, names, path)
    n = {arrays[name].shape[0] if arrays[name].ndim else 0 for name in names}
    if len(n) != 1 or 0 in n:
        raise InputDataError(
            f"{path}: arrays must share the sample count on their first axis; got "
            + ", ".join(f"{k}{arrays[k].shape}" for k in names)
        )
    total = n.pop()
    if limit:
        total = min(total, limit)
    labels = arrays.get("labels")
    if labels is not None:
        if labels.shape[0] < total:
            raise InputDataError(f"{path}: 'labels' has {labels.shape[0]} rows for {total} samples")
        labels = labels[:total]
    # how many samples one feed carries: arrays with an extra leading axis hold one complete
    # input per sample; otherwise the model's static batch, else ``batch_size`` samples
    extra_axis: dict[str, bool] = {}
    static_batch: int | None = None
    for s in specs:
        arr = arrays[s.name]
        rank = len(s.shape) if s.shape is not None else arr.ndim
        if arr.ndim not in (rank, rank + 1):
            raise InputDataError(
                f"{path}: array '{s.name}' has shape {arr.shape}; the model input has rank {rank} "
                "(samples go on the first axis)"
            )
        extra_axis[s.name] = arr.ndim == rank + 1
        if not extra_axis[s.name] and s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0:
            static_batch = s.shape[0]
    step = 1 if any(extra_axis.values()) else (static_batch or batch_size)
    usable = total - total % step if static_batch else total  # a static batch takes no partial feed
    feeds = []
    for i in range(0, usable, step):
        feeds.append({
            s.name: _cast(s.name, np.ascontiguousarray(
                arrays[s.name][i] if extra_axis[s.name] else arrays[s.name][i : i + step]
            ), s.dtype, str(path))
            for s in specs
        })
    if labels is not None:
        labels = labels[:usable]
    return Dataset(feeds, labels, source=str(path))


def _require(arrays: Mapping[str, np.ndarray], names: Sequence[str], where: Path) -> None:
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputDataError(
            f"{where}: no array for model input(s) {', '.join(missing)}; "
            f"found {', '.join(sorted(arrays)) or 'none'}"
        )
