"""All built-in passes. This tuple is the registry; `onnxopt passes` prints it in this order."""

from __future__ import annotations

from onnxopt.passes.eliminate_common_subexpressions import EliminateCommonSubexpressionsPass
from onnxopt.passes.eliminate_dead_code import EliminateDeadCodePass
from onnxopt.passes.quantize_dynamic import QuantizeDynamicPass
from onnxopt.passes.quantize_weight_only import QuantizeWeightOnlyPass
from onnxopt.passes.convert_fp16 import ConvertFp16Pass
from onnxopt.passes.eliminate_identity import EliminateIdentityPass
from onnxopt.passes.eliminate_noop import EliminateNoopPass
from onnxopt.passes.fold_constants import FoldConstantsPass
from onnxopt.passes.fold_batchnorm import FoldBatchNormPass
from onnxopt.passes.fold_bias import FoldBiasPass
from onnxopt.passes.fold_arithmetic_chains import FoldArithmeticChainsPass
from onnxopt.passes.fold_scale import FoldScalePass
from onnxopt.passes.fuse_matmul_add import FuseMatMulAddPass
from onnxopt.passes.fuse_pad import FusePadPass
from onnxopt.passes.fuse_hardswish import FuseHardSwishPass
from onnxopt.passes.fuse_gelu import FuseGeluPass
from onnxopt.passes.fuse_layernorm import FuseLayerNormPass
from onnxopt.passes.fuse_swish import FuseSwishPass
from onnxopt.passes.fold_reshape_target import FoldReshapeTargetPass
from onnxopt.passes.fuse_batched_matmul_add import FuseBatchedMatMulAddPass
from onnxopt.passes.fuse_shape_chains import FuseShapeChainsPass
from onnxopt.passes.eliminate_unread_rows import EliminateUnreadRowsPass
from onnxopt.passes.quantize_qdq import QuantizeQDQPass
from onnxopt.passes.prune_channels import PruneChannelsPass
from onnxopt.passes.factorize_lowrank import FactorizeLowRankPass
from onnxopt.passes.sparsify_weights import SparsifyWeightsPass
from onnxopt.passes.fuse_ort_attention import FuseOrtAttentionPass
from onnxopt.passes.fuse_ort_skip_layernorm import FuseOrtSkipLayernormPass
from onnxopt.passes.fuse_ort_bias_gelu import FuseOrtBiasGeluPass
from onnxopt.passes.fuse_ort_embed_layernorm import FuseOrtEmbedLayernormPass
from onnxopt.passes.fuse_ort_gemm_activation import FuseOrtGemmActivationPass

ALL_PASSES = (
    EliminateIdentityPass,
    EliminateNoopPass,
    FoldConstantsPass,
    EliminateCommonSubexpressionsPass,
    FoldBatchNormPass,
    FoldArithmeticChainsPass,
    FoldBiasPass,
    FoldScalePass,
    FuseMatMulAddPass,
    FusePadPass,
    FuseHardSwishPass,
    FuseGeluPass,
    FuseLayerNormPass,
    FuseSwishPass,
    FoldReshapeTargetPass,
    FuseBatchedMatMulAddPass,
    FuseShapeChainsPass,
    EliminateUnreadRowsPass,
    EliminateDeadCodePass,
    QuantizeDynamicPass,
    QuantizeWeightOnlyPass,
    ConvertFp16Pass,
    QuantizeQDQPass,
    PruneChannelsPass,
    FactorizeLowRankPass,
    SparsifyWeightsPass,
    FuseOrtAttentionPass,
    FuseOrtSkipLayernormPass,
    FuseOrtBiasGeluPass,
    FuseOrtEmbedLayernormPass,
    FuseOrtGemmActivationPass,
)
