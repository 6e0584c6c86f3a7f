"""Lossy compression: one driver for every method (quantization, pruning, factorization).

The parts, each in its own module:

- ``methods``: a lossy method as a declared thing: its pass, its per-layer knob and levels,
  how an assignment ``{layer: level}`` becomes pass options, what data it needs;
- ``budget``: the accuracy budget, judged on every output the way the task is judged;
- ``sensitivity``: each layer's error and saving at each level, as independent tasks;
- ``allocation``: the budget spent where a unit of error saves the most, verified and backed off;
- ``verdict``: the latency verdict (kept only if faster on this machine);
- ``driver``: ``compress``, which runs them in the fixed order prune, factorize, quantize.
"""

from onnxopt.lossy.budget import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1
from onnxopt.lossy.driver import Candidate, CompressResult, StepReport, compress, resolve_methods
from onnxopt.lossy.methods import QUANTIZERS, Method, factorization, pruning

__all__ = [
    "DEFAULT_MAX_ACCURACY_DROP",
    "DEFAULT_MIN_COSINE",
    "DEFAULT_MIN_TOP1",
    "QUANTIZERS",
    "Candidate",
    "CompressResult",
    "Method",
    "StepReport",
    "compress",
    "factorization",
    "pruning",
    "resolve_methods",
]
