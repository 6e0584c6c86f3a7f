"""Unstructured magnitude pruning: zero the smallest weights of MatMul, Gemm and Conv.

    W[K, N] (MatMul), W[N, K] (Gemm transB), W[M, C/g, kh, kw] (Conv)  ->  same shape, zeros

``sparsity`` is the fraction of each weight set to zero, smallest magnitudes first. With
``pattern = "N:M"`` (for example ``2:4``) the zeros follow the semi-structured pattern some
accelerators run faster: in every run of M consecutive weights along the input (reduction)
axis, the N smallest are zeroed; ``sparsity`` is then N/M.

What it buys is honest to say: the shapes do not change, so onnxruntime's CPU kernels do the
same work and the model is *not* faster; the file is the same size, but compresses better
(many zeros). The report gives, per run, the zeros and the zlib-compressed size of the
weights before and after (``ctx.notes["sparsify-weights"]``). Structured pruning
(``prune-channels``) is what makes a model smaller and faster here.

Declined, counted in stats: ``skipped:non-constant`` (the weight is computed),
``skipped:shared-weight`` (another node reads it), ``skipped:small`` (fewer than
``min_elements`` values), ``skipped:pattern-axis`` (the reduction axis is not a multiple of M).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PassOptionError
from onnxopt.graph_utils import is_default_domain, iter_graphs, layer_key
from onnxopt.pass_base import Pass, PassContext, PassResult


def _reduction_axis(node: gs.Node, rank: int) -> int | None:
    """The input (reduction) axis of the node's weight, or None when the layout is not known."""
    if node.op == "MatMul" and rank == 2:
        return 0
    if node.op == "Gemm" and rank == 2:
        return 1 if int(node.attrs.get("transB", 0)) else 0
    if node.op == "Conv" and rank >= 3:
        return 1
    return None


def _zero_smallest(w: np.ndarray, sparsity: float) -> np.ndarray:
    k = int(round(w.size * sparsity))
    if k <= 0:
        return w.copy()
    flat = w.reshape(-1).copy()
    flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
    return flat.reshape(w.shape)


def _zero_n_of_m(w: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    moved = np.moveaxis(w, axis, -1)
    runs = moved.reshape(-1, m)  # M consecutive weights along the reduction axis
    out = runs.copy()
    smallest = np.argsort(np.abs(runs), axis=1, kind="stable")[:, :n]
    np.put_along_axis(out, smallest, 0, axis=1)
    return np.moveaxis(out.reshape(moved.shape), -1, axis)


def _compressed(arrays: list[np.ndarray]) -> int:
    return sum(len(zlib.compress(np.ascontiguousarray(a).tobytes(), 6)) for a in arrays)


class SparsifyWeightsPass(Pass):
    """Zero the smallest weights (unstructured or N:M); a size/compressibility change, not a speed-up."""

    name = "sparsify-weights"
    exact = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        sparsity: float = 0.5
        pattern: str = ""  # "" (unstructured) or "N:M", e.g. "2:4"
        min_elements: int = 1024
        exclude: tuple[str, ...] = ()

    def _pattern(self) -> tuple[int, int] | None:
        if not self.options.pattern:
            if not 0.0 <= self.options.sparsity < 1.0:
                raise PassOptionError(f"pass '{self.name}': sparsity must be in [0, 1), got {self.options.sparsity}")
            return None
        try:
            n, m = (int(v) for v in self.options.pattern.split(":"))
        except ValueError:
            raise PassOptionError(f"pass '{self.name}': pattern must look like N:M (2:4), got "
                                  f"'{self.options.pattern}'") from None
        if not 0 < n < m:
            raise PassOptionError(f"pass '{self.name}': pattern {n}:{m} needs 0 < N < M")
        return n, m

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        pattern = self._pattern()
        stats: Counter[str] = Counter()
        before: list[np.ndarray] = []
        after: list[np.ndarray] = []
        layers: dict[str, dict[str, int]] = {}
        for g in iter_graphs(graph):
            for node in g.nodes:
                if node.op not in ("MatMul", "Gemm", "Conv") or not is_default_domain(node):
                    continue
                if len(node.inputs) < 2 or layer_key(node) in self.options.exclude:
                    continue
                w = node.inputs[1]
                if not isinstance(w, gs.Constant):
                    stats["skipped:non-constant"] += 1
                    continue
                if len(w.outputs) > 1:
                    stats["skipped:shared-weight"] += 1
                    continue
                values = np.asarray(w.values)
                if values.size < self.options.min_elements or values.dtype.kind != "f":
                    stats["skipped:small"] += 1
                    continue
                axis = _reduction_axis(node, values.ndim)
                if pattern is None:
                    new = _zero_smallest(values, self.options.sparsity)
                elif axis is None or values.shape[axis] % pattern[1]:
                    stats["skipped:pattern-axis"] += 1
                    continue
                else:
                    new = _zero_n_of_m(values, axis, *pattern)
                before.append(values)
                after.append(new)
                w.values = new.astype(values.dtype)
                layers[layer_key(node)] = {"elements": int(values.size),
                                           "zeros": int(np.count_nonzero(new == 0))}
                stats["sparsified"] += 1
        if before:
            ctx.notes[self.name] = {
                "layers": layers,
                "zeros": sum(v["zeros"] for v in layers.values()),
                "elements": sum(v["elements"] for v in layers.values()),
                "compressed_bytes_before": _compressed(before),
                "compressed_bytes_after": _compressed(after),
            }
        return PassResult(bool(before), dict(stats))
