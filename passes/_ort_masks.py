"""Key-padding masks recognised by evaluating them (``fuse-ort-attention``'s helper; not a pass).

An attention mask is whatever the exporter computed from a 2-D ``mask[batch, seq]`` input
(a Cast/Sub/Mul chain, a Where of a boolean, transformers' index gymnastics): rather than
match every such subgraph, it is run in onnxruntime on made-up 0/1 masks, and accepted when
it is 0 where the mask is 1 and one value <= ``MASKED_MAX`` where it is 0, the same for every
query position and head. The fused ops then read ``Cast(mask, int32)`` and that value as
``mask_filter_value``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._ort_patterns import as_int32, cone, probe

from onnxopt.graph_utils import constant_value
from onnxopt.pass_base import PassContext

MASKED_MAX = -1000.0  # a masked logit at or below this is exp() == 0 next to any real score


class KeyPaddingMasks:
    """Key-padding masks recognised by probing, cached per tensor (one mask serves every layer)."""

    def __init__(self, graph: gs.Graph, ctx: PassContext) -> None:
        self.graph, self.ctx = graph, ctx
        self.probed: dict[str, tuple[gs.Tensor, float] | str] = {}
        self.casts: dict[str, gs.Tensor] = {}

    def recognise(self, mask: gs.Tensor) -> tuple[gs.Tensor, float] | str:
        """(the 2-D mask input, the masked value) or a decline reason."""
        if mask.name not in self.probed:
            self.probed[mask.name] = self._probe(mask)
        return self.probed[mask.name]

    def _probe(self, mask: gs.Tensor) -> tuple[gs.Tensor, float] | str:
        if constant_value(mask) is not None:
            return "mask-constant"
        found = cone(mask)
        if found is None:
            return "mask-not-key-padding"
        inputs = found[1]
        two_d = [t for t in inputs if t.shape is not None and len(t.shape) == 2]
        if not two_d or len(inputs) > 2:
            return "mask-not-key-padding"
        # the mask input, then a same-shaped input the mask reads only for its shape (input_ids)
        rng = np.random.default_rng(self.ctx.seed)
        for source in two_d:
            others = [t for t in inputs if t is not source]
            if any(t.shape != source.shape for t in others):
                continue
            b = source.shape[0] if isinstance(source.shape[0], int) else 2
            s = source.shape[1] if isinstance(source.shape[1], int) else 5
            keeps = [rng.random((b, s)) < 0.6 for _ in range(2)]
            for keep in keeps:  # every row keeps a token; some token is masked
                keep[:, 0] = True
                keep[-1, -1] = s == 1
            feeds = [{source.name: keep.astype(source.dtype or np.int64),
                      **{t.name: np.zeros((b, s), t.dtype or np.int64) for t in others}} for keep in keeps]
            values = probe(self.graph, mask, feeds, self.ctx.opset)
            if values is None:
                continue
            fill = _key_padding_fill(values, keeps)
            if fill is not None:
                return source, fill
        return "mask-not-key-padding"

    def index(self, source: gs.Tensor) -> gs.Tensor:
        """``source`` as the int32 mask the contrib ops read (one Cast for all layers)."""
        return as_int32(self.graph, source, self.ctx, self.casts)


def _key_padding_fill(values: list[np.ndarray], keeps: list[np.ndarray]) -> float | None:
    """The masked value when every probe is 0 where kept and one value <= MASKED_MAX elsewhere."""
    fills: set[float] = set()
    for value, keep in zip(values, keeps, strict=True):
        if value.ndim != 4 or value.dtype != np.float32 or value.shape[1] != 1:
            return None
        expected = keep[:, None, None, :]
        try:
            value, expected = np.broadcast_arrays(value, expected)
        except ValueError:
            return None
        if np.any(value[expected] != 0) or not np.all(value[~expected] <= MASKED_MAX):
            return None
        fills.update(np.unique(value[~expected]).tolist())
    if len(fills) != 1:
        return None
    fill = fills.pop()
    return float(np.finfo(np.float32).min) if np.isinf(fill) else fill
