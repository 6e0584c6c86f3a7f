"""The lossy driver's tasks on a real Ray cluster: a head and two worker nodes on this machine.

The cluster is started once for the module (``ray.cluster_utils.Cluster``, one CPU and 80 MB
of object store per node; the second worker offers the custom resource ``target``) and stopped
after it. The oracle for every Ray run is the same run in process: same sensitivities, same
candidates and the same bytes written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxopt.bench import Latency
from onnxopt.executors import ClusterError, Executor, ProcessPool, RayExecutor, pack
from onnxopt.lossy import compress
from onnxopt.lossy import driver as driver_mod

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install -e '.[ray]')")

ROOT = Path(__file__).resolve().parents[1]
MODEL, DATA = ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_val.npz"
NODE_MEMORY = 80 * 2**20
PRUNE = {"round_to": 1}


@dataclasses.dataclass
class _Cluster:
    address: str
    head: str  # node ids
    target: str  # the worker offering the "target" resource
    other: str


@pytest.fixture(scope="module")
def cluster() -> Iterator[_Cluster]:
    from ray.cluster_utils import Cluster

    # test-local functions (the fault injection below) travel by value to the workers
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": NODE_MEMORY})
    try:
        target = c.add_node(num_cpus=1, object_store_memory=NODE_MEMORY, resources={"target": 1})
        other = c.add_node(num_cpus=1, object_store_memory=NODE_MEMORY)
        c.wait_for_nodes()
        yield _Cluster(c.address, c.head_node.node_id, target.node_id, other.node_id)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _fixed_latency(models: Any, feeds: Any) -> dict[str, Latency]:
    """A pinned verdict (every candidate 2x faster), so the written bytes compare exactly."""
    return {k: Latency(1.0 if k == "float" else 0.5, 1, 1, 1, 1, "fake") for k in models}


def _run(tmp: Path, name: str, executor: Executor | None, **kw: Any) -> tuple[driver_mod.CompressResult, bytes]:
    out = tmp / f"{name}.onnx"
    kw.setdefault("measure", _fixed_latency)
    # round_to given: tests/conftest.py pins the measured channel multiple to 1 in this process only
    r = compress(MODEL, out, "prune:0.5", eval_data=DATA, executor=executor, pass_options=PRUNE, **kw)
    return r, out.read_bytes()


def _decisions(r: driver_mod.CompressResult) -> dict[str, Any]:
    return {"sensitivity": r.sensitivity_levels, "written": r.written, "reason": r.reason,
            "candidates": [(c.label, c.within_budget, c.budget_detail, c.assignment) for c in r.candidates],
            "layers": [s.layers for s in r.steps]}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], bytes]:
    r, written = _run(tmp_path_factory.mktemp("local"), "local", None)
    # the run this module compares against does take the per-layer path (sensitivity, allocation)
    assert len(r.sensitivity_levels) >= 3
    assert len(r.candidates) >= 3
    return _decisions(r), written


def test_ray_makes_the_same_decisions_and_writes_the_same_bytes(cluster: _Cluster, local_run, tmp_path) -> None:
    with RayExecutor(cluster.address) as ex:
        assert ex.workers == 3  # the head and both workers offer their CPU
        r, written = _run(tmp_path, "ray", ex)
    assert _decisions(r) == local_run[0]
    assert written == local_run[1]


def _dies_once(marker: str, victim: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """The first attempt of the task on ``victim`` kills its worker process (no cleanup, no exception)."""
    if args[-1] == victim:
        try:
            os.unlink(marker)  # only one attempt gets the marker
        except FileNotFoundError:
            return fn(*args)
        Path(marker + ".died").write_text(str(os.getpid()))
        os._exit(1)
    return fn(*args)


class _Killing(RayExecutor):
    """Sensitivity probes where one (layer, level) kills its worker on its first attempt."""

    def __init__(self, address: str, marker: Path, victim: Any, max_retries: int) -> None:
        super().__init__(address, max_retries=max_retries)
        self.marker, self.victim = marker, victim

    def map(self, fn: Callable[..., Any], items: Any, *args: Any, **kw: Any) -> list[Any]:
        if fn is driver_mod._probe_task:
            fn = functools.partial(_dies_once, str(self.marker), self.victim, fn)
        return super().map(fn, items, *args, **kw)


def test_a_worker_killed_mid_sweep_is_retried_and_the_result_is_the_same(cluster: _Cluster, local_run,
                                                                         tmp_path) -> None:
    layers = sorted(local_run[0]["sensitivity"])
    victim = (layers[1], 0.5)  # a task in the middle of the sweep
    marker = tmp_path / "kill"
    marker.touch()
    with _Killing(cluster.address, marker, victim, max_retries=3) as ex:
        r, written = _run(tmp_path, "killed", ex)
    died = Path(str(marker) + ".died")
    assert not marker.exists()
    assert died.exists()
    assert int(died.read_text()) != os.getpid()  # on a worker, not here
    assert _decisions(r) == local_run[0]
    assert written == local_run[1]


def test_without_retries_a_killed_worker_is_one_error_and_nothing_is_written(cluster: _Cluster, local_run,
                                                                            tmp_path) -> None:
    layers = sorted(local_run[0]["sensitivity"])
    marker = tmp_path / "kill"
    marker.touch()
    with _Killing(cluster.address, marker, (layers[0], 0.75), max_retries=0) as ex, \
            pytest.raises(ClusterError, match=r"^the Ray cluster failed .*nothing was written$") as e:
        _run(tmp_path, "lost", ex)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "lost.onnx").exists()
    assert not list(tmp_path.glob("*.onnx*"))  # no staging file left either


def test_the_pinned_latency_task_lands_on_the_node_offering_the_resource(cluster: _Cluster, tmp_path) -> None:
    from onnxopt.executors import remote_measure
    from onnxopt.machine import describe

    model = onnx.load(MODEL)
    feeds = [{"image": np.load(DATA)["image"][:8]}]
    seen: list[Any] = []
    with RayExecutor(cluster.address, measure_on="target") as ex:
        measure = remote_measure(ex, 1, 5, seen.append)
        for _ in range(3):  # three tasks: an unpinned one would land on the head now and then
            lat = measure({"float": model, "same": model}, feeds)
            assert set(lat) == {"float", "same"}
            assert all(v.median_ms > 0 for v in lat.values())
    assert [m.node for m in seen] == [cluster.target] * 3
    assert seen[0].machine["cpu"] == describe()["cpu"]  # the worker's own description (this machine)
    # the CLI names the node in the report and writes the model
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(__import__("onnxopt.cli", fromlist=["app"]).app, [
        "optimize", str(MODEL), "--quantize", "int8", "--data", str(DATA), "-o", str(out), "--repeats", "5",
        "--executor", "ray", "--ray-address", cluster.address, "--measure-on", "target", "--report", str(report)])
    assert res.exit_code == 0, res.output
    payload = json.loads(report.read_text())
    assert payload["measured_on"].startswith(f"Ray node {cluster.target[:12]} (")
    assert describe()["cpu"] in payload["measured_on"]
    assert out.exists()


def test_a_resource_no_node_offers_is_one_error(cluster: _Cluster) -> None:
    with pytest.raises(ClusterError, match="--measure-on gpu-box: no node of the Ray cluster offers"):
        RayExecutor(cluster.address, measure_on="gpu-box")


def test_a_model_goes_to_the_object_store_packed_once_and_unpacks_identically(cluster: _Cluster) -> None:
    from onnxopt.executors import model_of

    model = onnx.load(MODEL)
    packed = pack(model)
    # the weights travel as arrays beside a small protobuf; the model is unchanged by packing
    assert len(packed.proto) < model.ByteSize() / 4
    assert packed.weights
    assert model.SerializeToString() == onnx.load(MODEL).SerializeToString()
    with RayExecutor(cluster.address) as ex:
        ref = ex.put(packed)
        (back,) = ex.map(_serialized, [0], [ref])
    assert back == model.SerializeToString() == model_of(packed).SerializeToString()


def _serialized(packed: Any, _item: int) -> bytes:
    from onnxopt.executors import model_of

    return model_of(packed).SerializeToString()


def test_a_process_pool_makes_the_same_decisions(local_run, tmp_path) -> None:
    r, written = _run(tmp_path, "pool", ProcessPool(2))
    assert _decisions(r) == local_run[0]
    assert written == local_run[1]


def test_optimize_many_on_ray_matches_the_local_run(cluster: _Cluster, tmp_path, monkeypatch) -> None:
    from onnxopt import many
    from onnxopt.many import run

    src = tmp_path / "models"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
        (src / sub / "digits.onnx").write_bytes(MODEL.read_bytes())
    options = {"data": str(DATA), "calibration_data": None, "input_shapes": {}, "level": 1, "repeats": 5,
               "threads": 1, "verify_each": False, "seed": 0, "exact_tolerance": {"atol": 1e-4, "rtol": 1e-3},
               "bench": False, "force": True, "max_accuracy_drop": None, "min_cosine": 0.99,
               "pass_options": PRUNE}
    local = run(str(src / "**" / "*.onnx"), tmp_path / "local", ["prune:0.5"], options)
    # the cluster's tasks get the models as bytes: once shipped, the files leave the paths they had
    # (a node without a shared filesystem), and the outputs come back to this process
    real_shipped = many.shipped

    def ship_then_hide(job: many.Job) -> many.Job:
        out = real_shipped(job)
        Path(job.source).rename(Path(job.source).with_suffix(".away"))
        return out

    monkeypatch.setattr(many, "shipped", ship_then_hide)
    with RayExecutor(cluster.address) as ex:
        remote = run(str(src / "**" / "*.onnx"), tmp_path / "ray", ["prune:0.5"], options, ex)
    assert sorted(p.name for p in src.rglob("*")) == ["a", "b", "digits.away", "digits.away"]

    def same(row: dict[str, Any]) -> tuple[Any, ...]:
        return row["model"], row["status"], row["size_after"], row["fidelity"], row["reason"]

    assert [same(r) for r in remote.rows] == [same(r) for r in local.rows]
    assert [r["status"] for r in local.rows] == ["compressed", "compressed"]
    for sub in ("a", "b"):
        assert (tmp_path / "ray" / sub / "digits.onnx").read_bytes() == \
            (tmp_path / "local" / sub / "digits.onnx").read_bytes()


def test_no_cluster_is_one_line() -> None:
    if ray.is_initialized():
        ray.shutdown()
    one_line = r"^no Ray cluster at 127\.0\.0\.1:1: .*refused; start one with .ray start --head."
    with pytest.raises(ClusterError, match=one_line) as e:
        RayExecutor("127.0.0.1:1")
    assert "\n" not in str(e.value)



def _mark_after(directory: str, item: int) -> int:
    """Item 0 returns at once; the others write a file after 3 s, unless cancelled before."""
    import time

    if item:
        time.sleep(3)
        Path(directory, str(item)).write_text("ran")
    return item


def test_ctrl_c_cancels_the_tasks_still_running(cluster: _Cluster, tmp_path) -> None:
    import time

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt  # what Ctrl-C raises in the driver while it waits

    with RayExecutor(cluster.address) as ex:
        with pytest.raises(KeyboardInterrupt):
            ex.map(_mark_after, [0, 1, 2, 3], [str(tmp_path)], tick=interrupt)
        time.sleep(4.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # none of the slow tasks finished


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def test_a_lost_cluster_is_one_line_and_nothing_is_written(cluster: _Cluster, tmp_path, monkeypatch) -> None:
    """Its own cluster, whose head dies once the sweep is under way (the module's cluster is left alone)."""
    import time

    from ray.cluster_utils import Cluster

    from onnxopt import executors

    monkeypatch.setattr(executors, "LOST_AFTER", 4.0)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": NODE_MEMORY})
    start = time.monotonic()
    strays: list[list[int]] = []
    try:
        worker = c.add_node(num_cpus=1, object_store_memory=NODE_MEMORY)

        def kill_head(done: int, total: int) -> None:
            if done == 1:
                # the agents of both raylets outlive a killed head: remembered, to be ended below
                strays.extend(_children(n.all_processes["raylet"][0].process.pid) for n in (c.head_node, worker))
                c.head_node.kill_gcs_server()
                c.head_node.kill_raylet()

        with RayExecutor(c.address) as ex, pytest.raises(ClusterError) as e:
            compress(MODEL, tmp_path / "o.onnx", "prune:0.5", eval_data=DATA, executor=ex, tick=kill_head,
                     measure=_fixed_latency, pass_options=PRUNE)
        assert time.monotonic() - start < 50  # said before Ray's client gives up (60 s) and ends the process
    finally:
        ray.shutdown()
        c.shutdown()
        for pid in (p for group in strays for p in group):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    message = str(e.value)
    assert "\n" not in message
    assert message.endswith("nothing was written")
    assert message.startswith(("lost the Ray cluster: its head at", "the Ray cluster failed"))
    assert list(tmp_path.iterdir()) == []


def _asks_the_machine(_item: int) -> dict[str, Any]:
    from onnxopt import machine

    return machine.measured("test-pinned-key", lambda: {"x": "measured on the worker"}, version=3)


def test_tasks_use_the_drivers_machine_measurements(cluster: _Cluster, monkeypatch) -> None:
    """A per-machine choice (prune's channel multiple, ...) is the driver's on every node."""
    from onnxopt import executors, machine

    original = machine.measured
    pins = {"test-pinned-key": {"version": 3, "result": {"x": "the driver's"}}}
    monkeypatch.setattr(executors, "measurements", lambda: pins)
    with RayExecutor(cluster.address) as ex:
        assert ex.map(_asks_the_machine, [0, 1, 2]) == [{"x": "the driver's"}] * 3
    # in process: a pin of another version is not used (measured; no cache written)
    monkeypatch.setenv("ONNXOPT_NO_MEASURE_CACHE", "1")
    with executors.measured_as({"test-pinned-key": {"version": 2, "result": {"x": "old"}}}):
        assert _asks_the_machine(0) == {"x": "measured on the worker"}
    assert machine.measured is original  # restored after the task
