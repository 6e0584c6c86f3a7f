"""Where the lossy driver's independent tasks run: this process, a process pool, or a Ray cluster.

The driver's sensitivity probes, candidate evaluations and latency measurements are tasks:
a *top-level* function ``fn(*shared, item)`` (picklable by reference) applied to a list of
items, with ``shared`` inputs (a step's base model, the evaluation split, the reference
outputs) handed over *by reference*: ``put`` them once, pass the handle to every task.

- ``InProcess`` (the default): ``map`` in this process; handles are the objects themselves.
- ``ProcessPool``: a pool sized to the cores; the shared inputs go to each worker once
  (its initializer), only the items travel per task.
- ``RayExecutor``: tasks on a Ray cluster (the optional ``[ray]`` extra). ``put`` is one
  ``ray.put`` into the object store; a model travels as a ``PackedModel`` (the protobuf
  without its large weights, and the weights as numpy arrays, external data included), so a
  node's workers share one copy in the store and each unpacks it once (``model_of``).
  Killed workers' tasks are retried (``max_retries``); a lost cluster is one ``OnnxoptError``;
  Ctrl-C cancels the tasks.

Every executor returns results in item order, so what the driver decides and writes does not
depend on which one ran the tasks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxopt.errors import OnnxoptError
from onnxopt.machine import cores

Tick = Callable[[int, int], None]
Each = Callable[[int, Any], None]
EXECUTORS = ("local", "processes", "ray")
PACK_MIN_BYTES = 1024  # initializers at least this big travel as arrays beside the protobuf
MODEL_CACHE = 2  # unpacked models a worker keeps (the step's base and one candidate)
# a head that has not answered for this long is a lost cluster: said in one line before Ray's own
# client gives up on it (60 s) and ends the process without a word
LOST_AFTER = 15.0
POLL = 2.0


class ClusterError(OnnxoptError):
    """The Ray cluster could not be reached or was lost; nothing was written."""


# ---------------------------------------------------------------- models by reference


@dataclasses.dataclass(frozen=True)
class PackedModel:
    """A model as the object store holds it: protobuf without big weights, weights as arrays.

    Arrays are stored zero-copy by Ray (a node's workers read one shared copy); a >2 GB model,
    whose protobuf cannot be serialized whole, packs the same way.
    """

    key: str  # one per model version: what a worker's cache is keyed by
    proto: bytes
    weights: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return len(self.proto) + sum(int(a.nbytes) for a in self.weights.values())


def pack(model: onnx.ModelProto) -> PackedModel:
    """Serialize ``model`` once; its large initializers' bytes become arrays (restored after)."""
    init = model.graph.initializer
    moved = {i: t for i, t in enumerate(init) if t.HasField("raw_data") and len(t.raw_data) >= PACK_MIN_BYTES}
    weights = {str(i): np.frombuffer(t.raw_data, dtype=np.uint8) for i, t in moved.items()}
    try:
        for t in moved.values():
            t.ClearField("raw_data")
        proto = model.SerializeToString()
    finally:
        for i, t in moved.items():
            t.raw_data = weights[str(i)].tobytes()
    return PackedModel(uuid.uuid4().hex, proto, weights)


_unpacked: collections.OrderedDict[str, onnx.ModelProto] = collections.OrderedDict()


def model_of(ref: onnx.ModelProto | PackedModel) -> onnx.ModelProto:
    """The model a task was given: as is in process, else unpacked once per worker and version."""
    if isinstance(ref, onnx.ModelProto):
        return ref
    model = _unpacked.get(ref.key)
    if model is None:
        model = onnx.ModelProto()
        model.ParseFromString(ref.proto)
        for i, raw in ref.weights.items():  # keyed by the initializer's index in the graph
            model.graph.initializer[int(i)].raw_data = raw.tobytes()
        _unpacked[ref.key] = model
        while len(_unpacked) > MODEL_CACHE:
            _unpacked.popitem(last=False)
    _unpacked.move_to_end(ref.key)
    return model


# ---------------------------------------------------------------- executors


class Executor:
    """In this process: ``map`` in item order, handles are the objects themselves."""

    name = "local"
    workers = 1
    remote = False  # True: latency is measured on a cluster node, not here

    def model(self, model: onnx.ModelProto) -> onnx.ModelProto | PackedModel:
        """How a model goes into a shared input (packed once for executors that ship it)."""
        return model

    def put(self, obj: Any) -> Any:
        """A handle to ``obj`` that tasks receive resolved."""
        return obj

    def map(self, fn: Callable[..., Any], items: Sequence[Any], shared: Sequence[Any] = (),
            tick: Tick | None = None, resources: Mapping[str, float] | None = None,
            each: Each | None = None) -> list[Any]:
        """``[fn(*shared, item) for item in items]``, in item order.

        As results arrive (in any order): ``each(index, result)``, then ``tick(done, total)``.
        """
        out = []
        for i, item in enumerate(items):
            out.append(fn(*shared, item))
            _arrived(i, out[-1], i + 1, len(items), tick, each)
        return out

    def pinned(self) -> dict[str, float]:
        """The resources a latency task asks for: none unless the executor pins it (Ray's ``measure_on``)."""
        return {}

    def describe(self) -> str:
        return "in process"

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


InProcess = Executor


# ---------------------------------------------------------------- the driver's machine measurements


def measurements() -> dict[str, Any]:
    """What this machine has measured so far (``onnxopt.machine``'s cache): tasks use these values.

    Some passes choose by a per-machine micro-benchmark (prune-channels' channel multiple, ...).
    Every task runs with the driver's results, so a node with another CPU builds the same
    candidates; the driver runs each pass once before its tasks, so they are measured by then.
    """
    from onnxopt import machine

    try:
        entries = json.loads((machine.cache_dir() / f"{machine.fingerprint()}.json").read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


@contextlib.contextmanager
def measured_as(pins: Mapping[str, Any]) -> Iterator[None]:
    """``onnxopt.machine.measured`` answers from ``pins`` (the driver's results) while a task runs."""
    from onnxopt import machine

    original = machine.measured

    def measured(key: str, measure: Callable[[], dict[str, Any]], version: int = 1) -> dict[str, Any]:
        hit = pins.get(key)
        if isinstance(hit, dict) and hit.get("version") == version and isinstance(hit.get("result"), dict):
            return hit["result"]
        return original(key, measure, version)

    machine.measured = measured  # the passes call it through the module
    try:
        yield
    finally:
        machine.measured = original


_installed: tuple[Any, ...] = ()
_pins: dict[str, Any] = {}


def _install(shared: tuple[Any, ...], pins: dict[str, Any]) -> None:
    global _installed, _pins
    _installed, _pins = shared, pins


def _pool_call(fn: Callable[..., Any], item: Any) -> Any:
    with measured_as(_pins):
        return fn(*_installed, item)


class ProcessPool(Executor):
    """A pool of ``workers`` processes (default: the cores); shared inputs sent once per worker."""

    name = "processes"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or cores()

    def model(self, model: onnx.ModelProto) -> PackedModel:
        return pack(model)

    def map(self, fn: Callable[..., Any], items: Sequence[Any], shared: Sequence[Any] = (),
            tick: Tick | None = None, resources: Mapping[str, float] | None = None,
            each: Each | None = None) -> list[Any]:
        if len(items) <= 1 or self.workers == 1:  # a pool would only add its start-up
            return super().map(fn, items, shared, tick, each=each)
        # forkserver: no fork of this process's onnxruntime threads; a fresh pool per map, so a
        # worker holds one set of shared inputs at a time
        ctx = multiprocessing.get_context("forkserver")
        with concurrent.futures.ProcessPoolExecutor(
                min(self.workers, len(items)), mp_context=ctx, initializer=_install,
                initargs=(tuple(shared), measurements())) as pool:
            futures = [pool.submit(_pool_call, fn, item) for item in items]
            index = {f: i for i, f in enumerate(futures)}
            try:
                for done, f in enumerate(concurrent.futures.as_completed(futures)):
                    _arrived(index[f], f.result(), done + 1, len(futures), tick, each)
            except KeyboardInterrupt:
                for f in futures:
                    f.cancel()
                raise
            return [f.result() for f in futures]

    def describe(self) -> str:
        return f"a pool of {self.workers} processes"


def _arrived(index: int, result: Any, done: int, total: int, tick: Tick | None, each: Each | None) -> None:
    if each is not None:
        each(index, result)
    if tick is not None:
        tick(done, total)


def _ray_call(fn: Callable[..., Any], pins: Mapping[str, Any], *args: Any) -> Any:
    """What runs on a Ray worker: the task with its shared inputs resolved from the object store."""
    with measured_as(pins):
        return fn(*args)


class RayExecutor(Executor):
    """Tasks on a Ray cluster: ``address`` ``auto`` (a ``ray start`` on this machine) or ``HOST:PORT``.

    ``measure_on``: latency tasks run only on nodes offering that custom resource (one unit:
    one measurement at a time on such a node, so timings do not share its cores).
    """

    name = "ray"
    remote = True

    def __init__(self, address: str | None = "auto", measure_on: str | None = None, max_retries: int = 3,
                 cpus_per_task: float = 1.0) -> None:
        try:
            import ray
        except ImportError:
            raise OnnxoptError("--executor ray needs Ray: pip install 'onnxopt[ray]'") from None
        self.ray = ray
        self.address, self.measure_on, self.max_retries = address, measure_on, max_retries
        self.cpus_per_task = cpus_per_task
        self.owns = not ray.is_initialized()  # inside a Ray task, or a caller's session: reuse it
        if self.owns:
            try:
                _reachable(address)
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, OSError, ValueError, RuntimeError) as e:
                where = f"at {address}" if address not in (None, "auto") else "on this machine (--ray-address auto)"
                raise ClusterError(f"no Ray cluster {where}: {_first_line(e)}; start one with "
                                   "'ray start --head' or give --ray-address HOST:PORT") from None
        self.gcs = ray.get_runtime_context().gcs_address
        self.lost = False
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        if measure_on is not None and not ray.cluster_resources().get(measure_on):
            self.close()
            raise ClusterError(f"--measure-on {measure_on}: no node of the Ray cluster offers that resource "
                               f"(start the target with ray start --resources '{{\"{measure_on}\": 1}}')")
        self._remote = ray.remote(_ray_call)

    def model(self, model: onnx.ModelProto) -> PackedModel:
        return pack(model)

    def put(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def map(self, fn: Callable[..., Any], items: Sequence[Any], shared: Sequence[Any] = (),
            tick: Tick | None = None, resources: Mapping[str, float] | None = None,
            each: Each | None = None) -> list[Any]:
        ray = self.ray
        task = self._remote.options(num_cpus=self.cpus_per_task, max_retries=self.max_retries,
                                    resources=dict(resources or {}))
        refs: list[Any] = []
        try:
            pins = ray.put(measurements())  # once per map: the driver's per-machine choices
            refs = [task.remote(fn, pins, *shared, item) for item in items]
            index = {ref: i for i, ref in enumerate(refs)}
            pending, done, silent = list(refs), 0, None
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=POLL)
                if not ready:
                    silent = self._alive(silent)
                    continue
                silent = None
                done += len(ready)
                _arrived(index[ready[0]], ray.get(ready[0]) if each else None, done, len(refs), tick, each)
            return ray.get(refs)  # in item order, whatever finished first
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        except ray.exceptions.RayTaskError as e:  # the task's own error: raise it as if run here
            cause = e.cause if isinstance(e.cause, BaseException) else None
            if cause is not None and not isinstance(cause, ray.exceptions.RayError):
                raise cause from None
            raise ClusterError(f"a Ray task failed: {_first_line(e)}; nothing was written") from None
        except ray.exceptions.RayError as e:
            raise ClusterError(f"the Ray cluster failed ({type(e).__name__}: {_first_line(e)}); "
                               "nothing was written") from None

    def _alive(self, silent: float | None) -> float | None:
        """None while the head answers; else since when it has not (``ClusterError`` past ``LOST_AFTER``)."""
        try:
            _reachable(self.gcs, timeout=POLL)
            return None
        except OSError:
            now = time.monotonic()
            if silent is not None and now - silent > LOST_AFTER:
                self.lost = True
                raise ClusterError(f"lost the Ray cluster: its head at {self.gcs} has not answered for "
                                   f"{LOST_AFTER:.0f} s; nothing was written") from None
            return silent if silent is not None else now

    def pinned(self) -> dict[str, float]:
        """The resources a latency task asks for: one unit of ``measure_on``, if given."""
        return {self.measure_on: 1.0} if self.measure_on else {}

    def describe(self) -> str:
        return f"Ray at {self.address or 'a local instance'} ({self.workers} CPUs)"

    def close(self) -> None:
        if self.owns and self.ray.is_initialized() and not self.lost:  # a lost head: shutdown would wait on it
            self.ray.shutdown()


def _reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on an address nothing listens on: Ray's client would retry it for minutes."""
    if address is None:
        return
    # what ray.init resolves "auto" with (the address a 'ray start' on this machine recorded)
    from ray._private.services import canonicalize_bootstrap_address

    resolved = canonicalize_bootstrap_address(address)  # ConnectionError: no cluster recorded here
    if resolved is None:
        return
    host, _, port = resolved.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0].rstrip(".") if lines else type(e).__name__


def make(name: str = "local", ray_address: str | None = "auto", measure_on: str | None = None,
         workers: int | None = None) -> Executor:
    """The executor ``--executor NAME`` asks for (``--measure-on`` only with Ray)."""
    if measure_on is not None and name != "ray":
        raise OnnxoptError("--measure-on pins latency tasks to Ray nodes; add --executor ray")
    if name == "local":
        return InProcess()
    if name == "processes":
        return ProcessPool(workers)
    if name == "ray":
        return RayExecutor(ray_address, measure_on)
    raise OnnxoptError(f"--executor '{name}': choose one of {', '.join(EXECUTORS)}")


# ---------------------------------------------------------------- latency as a task


@dataclasses.dataclass(frozen=True)
class Measured:
    """What a latency task returns: the timings and the machine that produced them."""

    latency: dict[str, Any]  # label -> onnxopt.bench.Latency
    node: str  # the Ray node id ("" in process)
    machine: dict[str, Any]  # onnxopt.machine.describe() on that node

    def where(self) -> str:
        from onnxopt.machine import summary

        return f"Ray node {self.node[:12]} ({summary(self.machine)})" if self.node else summary(self.machine)


def latency_task(settings: tuple[int, int], feeds: Sequence[Any],
                 models: Mapping[str, onnx.ModelProto | PackedModel]) -> Measured:
    """Time ``models`` together (interleaved medians) where the task runs, and say where that is."""
    from onnxopt.bench import measure_latency
    from onnxopt.machine import describe

    threads, repeats = settings
    lat = measure_latency({k: model_of(m) for k, m in models.items()}, feeds, threads=threads, repeats=repeats)
    node = ""
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return Measured(lat, node, describe())


def remote_measure(executor: Executor, threads: int, repeats: int,
                   where: Callable[[Measured], None] | None = None) -> Callable[..., Mapping[str, Any]]:
    """A ``verdict.Measure`` that times the models in one task on ``executor`` (pinned if asked)."""

    def measure(models: Mapping[str, onnx.ModelProto], feeds: Sequence[Any]) -> Mapping[str, Any]:
        packed = {k: executor.model(m) for k, m in models.items()}
        (m,) = executor.map(latency_task, [packed], [(threads, repeats), list(feeds)], resources=executor.pinned())
        if where is not None:
            where(m)
        return m.latency

    return measure
