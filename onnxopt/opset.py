"""Upgrade a model's default-domain opset with ``onnx.version_converter``, weights untouched.

Some rewrites need a newer opset than the model declares (per-channel
``DequantizeLinear`` needs opset 13). The converter runs on a copy of the model's
structure in which large initializers are placeholders (its adapters read attributes
and small constant inputs, never weight data), and the original initializers are
put back afterwards, so a large model costs no extra copy of its weights in the
converter. The manager calls this before importing the graph when a pass declares
``min_opset``; it logs a warning, since the output's opset differs from the input's.
"""

from __future__ import annotations

import logging

import onnx

from onnxopt.errors import PreconditionError
from onnxopt.io import opset_of

logger = logging.getLogger(__name__)

_SMALL = 1024  # bytes: initializers below this keep their data (Split sizes, axes, ...)
_PLACEHOLDER = "__onnxopt_opset_placeholder__"


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """A new model at default-domain opset ``target`` (the same model when already there).

    Raises ``PreconditionError`` naming the op when the converter has no adapter.
    """
    current = opset_of(model)
    if current >= target:
        return model
    light = _without_big_initializers(model)
    try:
        converted = onnx.version_converter.convert_version(light, target)
    except Exception as e:  # the converter raises RuntimeError/ValueError/C++ errors alike
        raise PreconditionError(
            f"cannot upgrade the model from opset {current} to {target} "
            f"({str(e).strip().splitlines()[0][:200]}); re-export it at opset >= {target}"
        ) from None
    big = {t.name: t for t in model.graph.initializer if _is_big(t)}
    for i, t in enumerate(converted.graph.initializer):
        if t.name in big:
            converted.graph.initializer[i].CopyFrom(big[t.name])
    needed = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    converted.ir_version = max(model.ir_version, needed)
    logger.warning("upgraded the model from opset %d to %d (needed by a pass)", current, target)
    return converted


def _is_big(t: onnx.TensorProto) -> bool:
    return len(t.raw_data) > _SMALL


def _copy_fields(src, dst, skip: str = "") -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _without_big_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    g = out.graph
    _copy_fields(model.graph, g, skip="initializer")
    for t in model.graph.initializer:
        if _is_big(t):
            shell = g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            shell.data_location = onnx.TensorProto.EXTERNAL
            shell.external_data.add(key="location", value=_PLACEHOLDER)
        else:
            g.initializer.append(t)
    return out
