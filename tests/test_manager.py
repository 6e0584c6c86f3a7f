from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt import optimize
from onnxopt.errors import (
    MissingRequirementError,
    PassFailedError,
    PassOptionError,
    UnknownPassError,
)
from onnxopt.manager import PassManager, parse_pass_spec
from onnxopt.pass_base import Pass, PassContext, PassResult, Requirement
from onnxopt.testing import assert_equivalent, make_model, op_histogram, vi


def _identity_chain(n: int = 3) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["t0"])]
    nodes += [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    nodes.append(helper.make_node("Neg", [f"t{n}"], ["y"]))
    return make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])])


class _CountingPass(Pass):
    """Removes one Identity per run (to exercise the fixpoint)."""

    name = "counting"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        for node in graph.nodes:
            if node.op == "Identity":
                src, dst = node.inputs[0], node.outputs[0]
                for user in list(dst.outputs):
                    user.inputs[[i for i, t in enumerate(user.inputs) if t is dst][0]] = src
                node.outputs.clear()
                graph.cleanup()
                return PassResult(True, {"removed": 1})
        return PassResult(False)


class _BreakingPass(Pass):
    """Produces an invalid graph: a node with an unknown attribute."""

    name = "breaking"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        graph.nodes[0].attrs["bogus_attribute"] = 3
        return PassResult(True, {"broke": 1})


class _RaisingPass(Pass):
    """Raises."""

    name = "raising"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise ZeroDivisionError("boom")


class _NeedsCalibration(Pass):
    """Needs calibration data."""

    name = "needs-calibration"
    exact = False
    requires = frozenset({Requirement.CALIBRATION_DATA})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise AssertionError("must not run without calibration data")


def test_preset_runs_to_fixpoint_and_explicit_passes_once() -> None:
    model = _identity_chain(3)
    out, report = PassManager(preset=[_CountingPass()], max_iterations=10).run(model)
    assert op_histogram(out) == {"Neg": 1, "Relu": 1}
    assert report.stats("counting") == {"removed": 3}
    # three changing runs, then one that finds nothing
    assert [r.changed for r in report.records] == [True, True, True, False]
    out2, report2 = PassManager(explicit=[_CountingPass()]).run(model)
    assert op_histogram(out2)["Identity"] == 2
    assert len(report2.records) == 1
    assert_equivalent(model, out)


def test_caller_model_is_not_mutated_and_metadata_survives() -> None:
    model = _identity_chain(2)
    model.metadata_props.add(key="author", value="me")
    model.doc_string = "doc"
    model.model_version = 7
    before = model.SerializeToString()
    out, _ = optimize(model, level=0)
    assert model.SerializeToString() == before
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["author"] == "me"
    assert meta["onnxopt.pipeline"] == "eliminate-identity,eliminate-dead-code"
    assert out.doc_string == "doc" and out.model_version == 7
    assert op_histogram(out) == {"Neg": 1, "Relu": 1}


def test_report_counts_nodes_and_params_per_pass() -> None:
    model = make_model(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Add", ["a", "b"], ["y"])],
        [vi("x", [2, 3])], [vi("y", [2, 3])],
        {"b": np.ones((2, 3), np.float32), "unused": np.zeros((5, 5), np.float32)},
    )
    out, report = optimize(model, level=0)
    first = report.records[0]
    assert (first.name, first.nodes_before, first.nodes_after) == ("eliminate-identity", 2, 1)
    assert (first.params_before, first.params_after) == (6, 6)
    summary = {row["name"]: row for row in report.summary()}
    assert summary["eliminate-identity"]["nodes_removed"] == 1
    # graphsurgeon never imports an initializer nothing reads: it is gone from the output
    assert [t.name for t in out.graph.initializer] == ["b"]


def test_verify_each_blames_the_pass_that_broke_the_graph() -> None:
    with pytest.raises(PassFailedError, match="pass 'breaking' produced an invalid graph"):
        PassManager(explicit=[_BreakingPass()], verify_each=True).run(_identity_chain())


def test_pass_exception_becomes_pass_failed_error_with_cause() -> None:
    with pytest.raises(PassFailedError, match="pass 'raising' failed: ZeroDivisionError") as info:
        PassManager(explicit=[_RaisingPass()]).run(_identity_chain())
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_requirements_are_checked_before_any_pass_runs() -> None:
    with pytest.raises(MissingRequirementError, match="--calibration-data"):
        PassManager(explicit=[_RaisingPass(), _NeedsCalibration()]).run(_identity_chain())


def test_parse_pass_spec_options_and_errors() -> None:
    @dataclasses.dataclass(frozen=True)
    class Opts:
        ratio: float = 0.25
        min_channels: int = 8
        per_channel: bool = True
        exclude: tuple[str, ...] = ()

    class P(Pass):
        """Test pass."""

        name = "p"
        Options = Opts

        def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
            return PassResult(False)

    opts = P.parse_options([("ratio", "0.5"), ("min-channels", "16"), ("per_channel", "false"),
                            ("exclude", "conv1;conv2")])
    assert opts == Opts(0.5, 16, False, ("conv1", "conv2"))
    with pytest.raises(PassOptionError, match="valid options: ratio: float, min_channels: int"):
        P.parse_options([("ratoi", "1")])
    with pytest.raises(PassOptionError, match="expects int, got 'many'"):
        P.parse_options([("min_channels", "many")])
    with pytest.raises(UnknownPassError, match="did you mean 'eliminate-identity'"):
        parse_pass_spec("eliminate-identiy")
    with pytest.raises(PassOptionError, match="must be key=value"):
        parse_pass_spec("eliminate-identity:oops")


def test_skip_counters_count_each_node_once_over_fixpoint_iterations() -> None:
    # 12 batched (rank-3) MatMul+Add that fuse-matmul-add declines, and a chain of Identity
    # that keeps the fixpoint going for several iterations: the decline is one per node
    x = ["i2"]
    nodes = [helper.make_node("Identity", ["x"], ["i0"]), helper.make_node("Identity", ["i0"], ["i1"]),
             helper.make_node("Identity", ["i1"], ["i2"])]
    inits = {}
    for i in range(12):
        inits[f"w{i}"] = np.ones((4, 4), np.float32)
        inits[f"b{i}"] = np.ones(4, np.float32)
        nodes += [helper.make_node("MatMul", [x[-1], f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x.append(f"a{i}")
    nodes.append(helper.make_node("Relu", [x[-1]], ["y"]))
    model = make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4])], inits)
    counting = _CountingPass()
    _, report = PassManager(preset=[counting, parse_pass_spec("fuse-matmul-add")],
                            max_iterations=10).run(model)
    assert len([r for r in report.records if r.name == "fuse-matmul-add"]) >= 2
    assert report.stats("fuse-matmul-add") == {"skipped:rank": 12}
    row = next(r for r in report.summary() if r["name"] == "fuse-matmul-add")
    assert row["stats"] == {"skipped:rank": 12}
