"""All built-in passes. This tuple is the registry; `onnxopt passes` prints it in this order."""

from __future__ import annotations

from onnxopt.passes.eliminate_dead_code import EliminateDeadCodePass
from onnxopt.passes.convert_fp16 import ConvertFp16Pass
from onnxopt.passes.quantize_dynamic import QuantizeDynamicPass
from onnxopt.passes.quantize_weight_only import QuantizeWeightOnlyPass
from onnxopt.passes.eliminate_identity import EliminateIdentityPass
from onnxopt.passes.eliminate_noop import EliminateNoopPass
from onnxopt.passes.fold_constants import FoldConstantsPass
from onnxopt.passes.fold_batchnorm import FoldBatchNormPass
from onnxopt.passes.fold_bias import FoldBiasPass
from onnxopt.passes.fuse_matmul_add import FuseMatMulAddPass
from onnxopt.passes.quantize_qdq import QuantizeQDQPass

ALL_PASSES = (
    EliminateIdentityPass,
    EliminateNoopPass,
    FoldConstantsPass,
    FoldBatchNormPass,
    FoldBiasPass,
    FuseMatMulAddPass,
    EliminateDeadCodePass,
    QuantizeDynamicPass,
    QuantizeWeightOnlyPass,
    ConvertFp16Pass,
    QuantizeQDQPass,
)
