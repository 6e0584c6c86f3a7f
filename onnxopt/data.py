"""Input data: the user's ``.npz`` (or a directory of them) or generated inputs.

An ``.npz`` holds one array per model input, named after it, samples on the first
axis, plus an optional ``labels`` array. A directory holds ``.npz`` files that are
each one complete feed (for inputs whose shapes vary, like sentences). Without data,
inputs are generated to fit the model (``onnxopt.synthesize``: dims probed on the
original model, values that fit the ops that read them).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxopt.errors import InputDataError, OnnxoptError
from onnxopt.synthesize import feeds_for, model_inputs, resolve_shapes
from onnxopt.synthesize import synthesize as synthesize_inputs

if TYPE_CHECKING:
    from onnxopt.runtime import ModelRef

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


@dataclasses.dataclass
class Dataset:
    """Feeds for a model, and labels aligned with the samples when the user gave them."""

    feeds: list[Feed]
    labels: np.ndarray | None = None
    generated: bool = False
    source: str = ""
    # generated inputs only: how dynamic dims were chosen, and why the original model does not
    # run on these feeds (None: it does); see ``onnxopt.synthesize``
    notes: list[str] = dataclasses.field(default_factory=list)
    unusable: str | None = None

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


def parse_input_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x=1,3,224,224", "mask=1,128"]`` -> dict; one clear error for a malformed item."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, eq, dims = item.rpartition("=")
        if not eq or not name:
            raise InputDataError(f"--input-shape '{item}' must look like NAME=1,3,224,224")
        try:
            shape = tuple(int(d) for d in re.split(r"[,x]", dims) if d.strip())
        except ValueError:
            raise InputDataError(f"--input-shape '{item}': dims must be integers") from None
        if any(d <= 0 for d in shape):
            raise InputDataError(f"--input-shape '{item}': dims must be positive sizes (a shape to "
                                 "run the model at; leave out --input-shape to let onnxopt choose)")
        shapes[name] = shape
    return shapes


def generate(
    model: onnx.ModelProto,
    count: int = 8,
    pins: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> Dataset:
    """Feeds that fit the model's use of its inputs, at the first candidate shape (nothing run).

    ``synthesize`` (what ``optimize`` uses) also probes the shape on the original model.
    """
    pins = dict(pins or {})
    shapes, notes = resolve_shapes(model, pins)
    feeds = feeds_for(model, model_inputs(model), shapes, count, seed)
    return Dataset(feeds, generated=True, source=f"generated (seed {seed})", notes=notes)


def synthesize(
    model: onnx.ModelProto,
    reference: ModelRef,
    count: int = 8,
    pins: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> Dataset:
    """Generated feeds on which ``reference`` (the original model) runs in onnxruntime.

    Dynamic dims are probed on it; when no candidate runs, the dataset says why in
    ``unusable`` (the original model's own error), and callers skip what needs real outputs.
    """
    from onnxopt.runtime import run, session

    try:
        sess = session(reference)
    except OnnxoptError as e:
        shapes, notes = resolve_shapes(model, pins)
        feeds = feeds_for(model, model_inputs(model), shapes, count, seed)
        return Dataset(feeds, generated=True, source=f"generated (seed {seed})", notes=notes,
                       unusable=f"{e} (the original model: no input can validate it here)")
    found = synthesize_inputs(model, lambda feed: run(sess, feed), pins, count=count, seed=seed)
    return Dataset(found.feeds, generated=True, source=f"generated (seed {seed})", notes=found.notes,
                   unusable=found.unusable)


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
        # numpy says 'pickled data ... allow_pickle=' of any file it cannot parse: advice for its API
        # that a command-line user cannot follow, and usually not the cause
        why = "not an .npz archive of arrays" if "allow_pickle" in str(e) else str(e).splitlines()[0]
        raise InputDataError(f"{path}: not a readable .npz file ({why}); write one with "
                             "numpy.savez(path, input_name=array, ...)") from None


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
