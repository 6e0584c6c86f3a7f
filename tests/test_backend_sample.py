"""onnx backend node tests through level 1: a fixed sample here, the full suite when slow.

The harness lives beside the benchmarks (``bench/backend_suite.py``). The sample spreads
over op types and leans on the cases level 1 rewrites (expanded functions with Identity,
CastLike, constant subgraphs, shape computations). The classification itself is tested
with passes that crash, refuse and miscompute. A second sample runs in no-data mode (the
tool as users run it): cases whose inputs must be chosen with care (indices, divisors,
``k``, target shapes, float16).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxopt.errors import PreconditionError, ValidationError
from onnxopt.pass_base import Pass, PassContext, PassResult

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import backend_suite as bs  # noqa: E402

# module of onnx.backend.test.case.node -> case names (importing only these is fast)
SAMPLE: dict[str, list[str]] = {
    "add": ["test_add", "test_add_bcast"],
    "attention": ["test_attention_4d_fp16_expanded"],
    "batch_normalization": ["test_batchnorm_epsilon", "test_batchnorm_example"],
    "blackmanwindow": ["test_blackmanwindow_expanded"],
    "castlike": ["test_castlike_FLOAT_to_FLOAT16_expanded", "test_castlike_FLOAT_to_DOUBLE"],
    "center_crop_pad": ["test_center_crop_pad_crop_and_pad_expanded"],
    "clip": ["test_clip"],
    "concat": ["test_concat_1d_axis_0"],
    "constant": ["test_constant"],
    "constantofshape": ["test_constantofshape_float_ones"],
    "conv": ["test_basic_conv_with_padding", "test_conv_with_strides_padding"],
    "convtranspose": ["test_convtranspose"],
    "cumsum": ["test_cumsum_2d_axis_0"],
    "dropout": ["test_dropout_default", "test_dropout_default_mask"],
    "dynamicquantizelinear": ["test_dynamicquantizelinear_expanded"],
    "elu": ["test_elu_default_expanded_ver18"],
    "expand": ["test_expand_dim_changed"],
    "flatten": ["test_flatten_axis0"],
    "gather": ["test_gather_0"],
    "gelu": ["test_gelu_default_1_expanded"],
    "gemm": ["test_gemm_default_no_bias", "test_gemm_all_attributes"],
    "groupnormalization": ["test_group_normalization_example_expanded"],
    "identity": ["test_identity", "test_identity_sequence", "test_identity_opt"],
    "if_": ["test_if", "test_if_seq", "test_if_opt"],
    "layernormalization": ["test_layer_normalization_2d_axis0_expanded"],
    "loop": ["test_loop11", "test_loop13_seq"],
    "lstm": ["test_lstm_defaults"],
    "matmul": ["test_matmul_2d", "test_matmul_4d"],
    "matmulinteger": ["test_matmulinteger"],
    "negativeloglikelihoodloss": ["test_nllloss_NC_expanded"],
    "pad": ["test_constant_pad"],
    "pow": ["test_pow"],
    "prelu": ["test_prelu_broadcast_expanded"],
    "reducel2": ["test_reduce_l2_default_axes_keepdims_example_expanded"],
    "reducemean": ["test_reduce_mean_default_axes_keepdims_example"],
    "relu": ["test_relu"],
    "reshape": ["test_reshape_reordered_all_dims", "test_reshape_negative_dim"],
    "resize": ["test_resize_upsample_scales_nearest"],
    "rmsnormalization": ["test_rms_normalization_2d_axis0_expanded"],
    "rotaryembedding": ["test_rotary_embedding_expanded"],
    "scan": ["test_scan9_sum", "test_scan_sum"],
    "sequence_map": ["test_sequence_map_identity_1_sequence_1_tensor_expanded",
                     "test_sequence_map_add_1_sequence_1_tensor_expanded"],
    "shape": ["test_shape", "test_shape_clip_end"],
    "sigmoid": ["test_sigmoid"],
    "size": ["test_size"],
    "slice": ["test_slice"],
    "softmax": ["test_softmax_axis_0"],
    "softmax_cross_entropy_loss": ["test_sce_NCd1_mean_weight_negative_ii_log_prob_expanded"],
    "split": ["test_split_equal_parts_1d_opset18"],
    "squeeze": ["test_squeeze"],
    "swish": ["test_swish_expanded"],
    "tile": ["test_tile"],
    "topk": ["test_top_k"],
    "transpose": ["test_transpose_default"],
    "unsqueeze": ["test_unsqueeze_axis_0"],
    "where": ["test_where_example"],
}
SAMPLE_NAMES = [n for names in SAMPLE.values() for n in names]


@pytest.fixture(scope="module")
def sample_cases() -> list:
    cases = bs.load_cases(list(SAMPLE), SAMPLE_NAMES)
    assert sorted(c.name for c in cases) == sorted(SAMPLE_NAMES)
    return cases


@pytest.fixture(scope="module")
def sample_results(sample_cases: list) -> dict[str, bs.CaseResult]:
    return {r.name: r for r in bs.run_suite(sample_cases, processes=1)}


def test_sample_has_no_crash_or_wrong(sample_results: dict[str, bs.CaseResult]) -> None:
    bugs = [f"{r.outcome} {r.name}: {r.reason}" for r in sample_results.values()
            if r.outcome in bs.BUGS]
    assert bugs == []


def test_sample_is_judged_and_exercises_the_passes(
    sample_results: dict[str, bs.CaseResult],
) -> None:
    counts = bs.counts(list(sample_results.values()))
    assert sum(counts.values()) == len(SAMPLE_NAMES)
    assert counts[bs.ORT_UNSUPPORTED] + counts[bs.ORT_MISMATCH] == 0
    assert counts[bs.CHANGED] >= 15
    assert counts[bs.PRESERVED] >= 20
    # what the expanded functions give level 1 to do
    assert "eliminate-identity" in sample_results["test_rms_normalization_2d_axis0_expanded"].reason
    assert "fold-constants" in sample_results["test_shape"].reason


def test_optional_types_are_refused_not_crashed(
    sample_results: dict[str, bs.CaseResult],
) -> None:
    for name in ("test_identity_opt", "test_if_opt"):
        result = sample_results[name]
        assert result.outcome == bs.REFUSED
        assert result.reason.startswith(PreconditionError.__name__)
        assert "optional type" in result.reason


# ---- the classification itself ----

class _RaisingPass(Pass):
    """Raise a plain exception (a bug)."""

    name = "test-raising"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise KeyError("boom")


class _RefusingPass(Pass):
    """Raise a user-facing error."""

    name = "test-refusing"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise PreconditionError("cannot handle this graph")


class _NegatingPass(Pass):
    """Negate every graph output by inserting Neg, once (wrong on purpose)."""

    name = "test-negating"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if any(out.inputs[0].op == "Neg" for out in graph.outputs):
            return PassResult(changed=False)  # the preset runs to a fixpoint
        for i, out in enumerate(list(graph.outputs)):
            inner = gs.Variable(ctx.names.fresh("pre_neg"), dtype=out.dtype, shape=out.shape)
            producer = out.inputs[0]
            producer.outputs[producer.outputs.index(out)] = inner
            graph.nodes.append(gs.Node("Neg", inputs=[inner], outputs=[graph.outputs[i]]))
        graph.toposort()
        return PassResult(changed=True, stats={"negated": len(graph.outputs)})


def _one(cases: Sequence, name: str):
    return next(c for c in cases if c.name == name)


def test_classification_of_pass_failures(sample_cases: list) -> None:
    case = _one(sample_cases, "test_add")
    crash = bs.run_case(case, [_RaisingPass()])
    assert crash.outcome == bs.CRASH
    assert "test-raising" in crash.reason
    assert "KeyError" in crash.reason
    refused = bs.run_case(case, [_RefusingPass()])
    assert refused.outcome == bs.REFUSED
    assert refused.reason == "PreconditionError: cannot handle this graph"
    wrong = bs.run_case(case, ["eliminate-identity", _NegatingPass()])
    assert wrong.outcome == bs.WRONG
    assert wrong.reason.startswith("output 0: values differ")
    assert wrong.reason.endswith("(first wrong with: test-negating)")
    assert bs.run_case(case, []).outcome == bs.PRESERVED


def test_ort_failures_are_not_blamed_on_onnxopt(sample_cases: list) -> None:
    case = _one(sample_cases, "test_relu")
    bad = type(case)(**{**vars(case), "data_sets": [
        (ins, [np.asarray(outs[0]) + 1.0]) for ins, outs in case.data_sets
    ]})
    result = bs.run_case(bad, [_RaisingPass()])
    assert result.outcome == bs.ORT_MISMATCH
    assert result.reason.startswith("output 0: values differ")


def test_mismatch_rules() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert bs.mismatch([a], [a.copy()], 1e-3, 1e-7) is None
    assert bs.mismatch([a], [a + 1e-5 * a], 1e-3, 1e-7) is None
    assert bs.mismatch([a], [a.reshape(3, 2)], 1e-3, 1e-7) == (
        "output 0: shape (3, 2), expected (2, 3)")
    assert bs.mismatch([a], [a.astype(np.float64)], 1e-3, 1e-7) == (
        "output 0: dtype float64, expected float32")
    assert bs.mismatch([a], [a + 1], 1e-3, 1e-7).startswith("output 0: values differ")
    assert bs.mismatch([a], [], 1e-3, 1e-7) == "0 outputs, expected 1"
    assert bs.mismatch([[a, a]], [[a, a]], 1e-3, 1e-7) is None
    assert bs.mismatch([[a, a]], [[a]], 1e-3, 1e-7) == "output 0: sequence length 1, expected 2"
    assert bs.mismatch([None], [None], 1e-3, 1e-7) is None
    assert bs.mismatch([None], [a], 1e-3, 1e-7) == "output 0: expected NoneType, got ndarray"
    nan = np.array([np.nan, 1.0], dtype=np.float32)
    assert bs.mismatch([nan], [nan.copy()], 1e-3, 1e-7) is None
    s = np.array(["a", "b"], dtype=object)
    assert bs.mismatch([s], [s.copy()], 1e-3, 1e-7) is None
    assert bs.mismatch([s], [np.array(["a", "c"], dtype=object)], 1e-3, 1e-7) == (
        "output 0: strings differ")


# ---- no-data mode: optimize_file on the model file alone ----

# cases whose generated inputs must respect the graph: indices within the indexed dim
# (Gather, GatherElements, OneHot), non-zero divisors (Mod), TopK's k within its axis,
# Reshape targets that fit the input, and float16 outputs compared at float16 precision
NO_DATA_SAMPLE: dict[str, list[str]] = {
    "castlike": ["test_castlike_FLOAT_to_FLOAT16"],
    "gather": ["test_gather_0"],
    "gatherelements": ["test_gather_elements_0"],
    "mod": ["test_mod_mixed_sign_int32", "test_mod_mixed_sign_int64"],
    "onehot": ["test_onehot_with_axis", "test_onehot_without_axis"],
    "reshape": ["test_reshape_negative_dim", "test_reshape_reordered_all_dims"],
    "topk": ["test_top_k"],
}
NO_DATA_NAMES = [n for names in NO_DATA_SAMPLE.values() for n in names]


def test_no_data_mode_sample() -> None:
    cases = bs.load_cases(list(NO_DATA_SAMPLE), NO_DATA_NAMES)
    assert sorted(c.name for c in cases) == sorted(NO_DATA_NAMES)
    results = bs.run_suite(cases, processes=1, mode=bs.NO_DATA)
    # written (preserved or changed) and right on the case's own inputs and expected outputs
    not_written = [f"{r.outcome} {r.name}: {r.reason}" for r in results
                   if r.outcome not in bs.WRITTEN]
    assert not_written == []
    assert all(r.validation for r in results)


def test_no_data_mode_classifies_like_data_mode(sample_cases: list) -> None:
    cases = [_one(sample_cases, n) for n in ("test_shape", "test_relu", "test_identity_opt")]
    results = {r.name: r for r in bs.run_suite(cases, processes=1, mode=bs.NO_DATA)}
    assert results["test_shape"].outcome == bs.CHANGED
    assert "fold-constants" in results["test_shape"].reason
    assert results["test_relu"].outcome == bs.PRESERVED
    for r in (results["test_shape"], results["test_relu"]):
        assert r.validation == bs.VALIDATED or r.validation.startswith(bs.SKIPPED)
    # optional values: refused in both modes, before any input is generated
    assert results["test_identity_opt"].outcome == bs.REFUSED
    assert "optional type" in results["test_identity_opt"].reason
    split = bs.validation_counts(list(results.values()))
    assert sum(split[bs.PRESERVED].values()) == 1
    assert sum(split[bs.CHANGED].values()) == 1
    with pytest.raises(ValueError, match="modes are data, no-data"):
        bs.run_case(cases[0], mode="no-such-mode")


def test_no_data_classification(sample_cases: list, monkeypatch: pytest.MonkeyPatch) -> None:
    case = _one(sample_cases, "test_relu")
    real = bs.optimize_file

    def raising(*args, **kwargs):
        raise KeyError("boom")

    def refusing(*args, **kwargs):
        raise ValidationError("validation failed after a, b:\n  y: 3 of 12 differ\n"
                              "  nothing was written; rerun with ...")

    def negating(src, dst, **kwargs):
        result = real(src, dst, **kwargs)
        model = onnx.load_model(dst)
        model.graph.node[0].op_type = "Neg"
        onnx.save_model(model, dst)
        return result

    def skipping(src, dst, **kwargs):
        result = real(src, dst, **kwargs)
        result.validation_skipped = "the original model fails on generated inputs"
        return result

    outcomes = {}
    for fake in (raising, refusing, negating, skipping):
        monkeypatch.setattr(bs, "optimize_file", fake)
        outcomes[fake.__name__] = bs.run_case(case, mode=bs.NO_DATA)
    assert outcomes["raising"].outcome == bs.CRASH
    assert outcomes["raising"].reason.startswith("KeyError: 'boom' [at test_backend_sample.py:")
    assert outcomes["refusing"].outcome == bs.REFUSED
    assert outcomes["refusing"].reason == "ValidationError: validation failed: y: 3 of 12 differ"
    assert outcomes["negating"].outcome == bs.WRONG
    assert outcomes["negating"].reason.startswith("output 0: values differ")
    assert outcomes["skipping"].outcome == bs.PRESERVED
    assert outcomes["skipping"].validation == (
        f"{bs.SKIPPED}: the original model fails on generated inputs")


@pytest.mark.slow
def test_full_backend_suite_has_no_crash_or_wrong() -> None:
    results = bs.run_suite(bs.load_cases(), processes=2)
    counts = bs.counts(results)
    assert len(results) > 1500
    assert counts[bs.PRESERVED] + counts[bs.CHANGED] > 1000
    bugs = [f"{r.outcome} {r.name}: {r.reason}" for r in results if r.outcome in bs.BUGS]
    assert bugs == []


@pytest.mark.slow
def test_full_backend_suite_no_data_mode() -> None:
    # the bar: >= 99% of the cases onnxruntime runs are written with no data at all
    results = bs.run_suite(bs.load_cases(), processes=2, mode=bs.NO_DATA)
    counts = bs.counts(results)
    bugs = [f"{r.outcome} {r.name}: {r.reason}" for r in results if r.outcome in bs.BUGS]
    assert bugs == []
    runnable = len(results) - counts[bs.ORT_UNSUPPORTED] - counts[bs.ORT_MISMATCH]
    written = counts[bs.PRESERVED] + counts[bs.CHANGED]
    refused = [f"{r.name}: {r.reason}" for r in results if r.outcome == bs.REFUSED]
    assert written >= 0.99 * runnable, refused
