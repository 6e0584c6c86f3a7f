"""Load and save ONNX models: clear errors on bad input, metadata round trip, atomic writes.

``gs.import_onnx`` / ``gs.export_onnx`` happen only here. The export copies back
what onnx-graphsurgeon drops (metadata, doc strings, model version, domain,
opset imports of custom domains) and records provenance in ``metadata_props``.

Writing is atomic: the model (and its external-data file, for models over the
protobuf limit) is written into a temporary directory next to the destination,
checked, and then moved into place with ``os.replace``. An interrupted or failed
run leaves the old output or none, never a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, EncodeError
from onnx_graphsurgeon.logger import G_LOGGER

from onnxopt.errors import ModelLoadError, ModelSaveError, PreconditionError
from onnxopt.graph_utils import iter_graphs, iter_proto_graphs, tensor_nbytes

logger = logging.getLogger(__name__)
# graphsurgeon prints its warnings ([W] ...) on stdout, past --quiet; what matters reaches the
# user as onnxopt's own one-line errors and notes
G_LOGGER.severity = G_LOGGER.ERROR

# protobuf refuses to serialize messages of 2 GiB or more; stay well below it
PROTOBUF_LIMIT = 2**31 - 2**24


def load_model(path: str | os.PathLike[str], load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ``.onnx`` file (with its external data) or raise ``ModelLoadError`` in one line."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror})") from None
    if size == 0:
        raise ModelLoadError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        detail = f"not a valid ONNX protobuf (truncated or not ONNX): {_first_line(e)}"
        raise ModelLoadError(_torch_hint(path) or f"{path}: {detail}") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(_torch_hint(path) or f"{path}: not an ONNX model (no graph found)")
    check_versions(model, str(path))
    if load_external_data:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (FileNotFoundError, onnx.checker.ValidationError, OSError, ValueError) as e:
            missing = _missing_external(model, path.parent)
            detail = f"missing external-data file '{missing}'" if missing else _first_line(e)
            raise ModelLoadError(f"{path}: {detail}") from None
    return model


def check_model_file(path: str | os.PathLike[str]) -> None:
    """Run ``onnx.checker`` on the file (by path: works past 2 GB, loads no weights twice)."""
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelLoadError(
            f"{path}: not a valid ONNX model (onnx.checker): {_first_line(e)}"
        ) from None


def check_versions(model: onnx.ModelProto, where: str = "model") -> None:
    """Refuse IR versions and default-domain opsets newer than the installed onnx knows."""
    if model.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"{where}: IR version {model.ir_version} is newer than this onnx "
            f"({onnx.__version__}) supports (IR {onnx.IR_VERSION}); upgrade onnx"
        )
    newest = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > newest:
            raise ModelLoadError(
                f"{where}: opset {imp.version} is newer than this onnx ({onnx.__version__}) "
                f"supports (opset {newest}); upgrade onnx"
            )


def _torch_hint(path: Path) -> str | None:
    """The error for a PyTorch checkpoint (by suffix, or torch.save's zip layout) given as a model."""
    torch_zip = False
    with contextlib.suppress(OSError, zipfile.BadZipFile):
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                torch_zip = any(n.endswith("/data.pkl") for n in z.namelist())
    if not torch_zip and path.suffix.lower() not in (".pt", ".pth", ".ckpt"):
        return None
    return (f"{path}: this is a PyTorch file; convert it with "
            "`onnxopt export MODULE:FACTORY -o model.onnx --input-shape ...`")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def _missing_external(model: onnx.ModelProto, base: Path) -> str | None:
    for t in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(t):
            info = onnx.external_data_helper.ExternalDataInfo(t)
            if not (base / info.location).exists():
                return str(info.location)
    return None


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a model into graphsurgeon (weights are shared, not copied).

    Optional-typed values are refused: graphsurgeon imports them but cannot export them.
    """
    _refuse_optional_types(model)
    stashed = _stash_binary_attributes(model)
    try:
        graph = gs.import_onnx(model)
    finally:  # the caller's proto is left as it was
        for attr, raw in stashed:
            attr.s = raw
    _restore_overridable_inputs(graph, model)
    return graph


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# A binary STRING attribute (a tokenizer's serialized model: legal ONNX) is one graphsurgeon
# decodes as text and fails on. It goes through the rewriter as a placeholder naming its
# bytes' hash, and every export puts the bytes back. The bytes are kept here, per process.
_BINARY_TAG = b"onnxopt:binary-attribute:"
_BINARY: dict[bytes, bytes] = {}


def _string_attributes(model: onnx.ModelProto) -> Iterator[onnx.AttributeProto]:
    for g in iter_proto_graphs(model.graph):
        for node in g.node:
            yield from (a for a in node.attribute if a.type == onnx.AttributeProto.STRING)


def _stash_binary_attributes(model: onnx.ModelProto) -> list[tuple[onnx.AttributeProto, bytes]]:
    """Swap each binary STRING attribute for its placeholder; returns what to swap back."""
    stashed = []
    for attr in _string_attributes(model):
        if not _utf8(attr.s):
            tag = _BINARY_TAG + hashlib.sha256(attr.s).hexdigest().encode()
            _BINARY[tag] = attr.s
            stashed.append((attr, attr.s))
            attr.s = tag
    return stashed


def restore_binary_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Put the bytes of binary STRING attributes back in place of their placeholders."""
    if _BINARY:
        for attr in _string_attributes(model):
            if attr.s.startswith(_BINARY_TAG):
                attr.s = _BINARY[attr.s]
    return model


def export_plain(graph: gs.Graph) -> onnx.ModelProto:
    """A graph as a model onnxruntime reads (IR 8 at most), without a source to copy from: the
    passes' and the capture's intermediate models."""
    model = restore_binary_attributes(gs.export_onnx(graph, do_type_check=False))
    model.ir_version = min(model.ir_version, 8)
    return model


def _overridable_names(model: onnx.ModelProto) -> set[str]:
    """Graph inputs that also have an initializer: a default value callers may override."""
    inits = {t.name for t in model.graph.initializer}
    return {vi.name for vi in model.graph.input if vi.name in inits}


def _restore_overridable_inputs(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Keep initializer-backed graph inputs as inputs (graphsurgeon turns them into constants).

    They become Variables, so no pass treats them as constant; ``to_model`` puts their
    default values back as initializers.
    """
    names = _overridable_names(model)
    if not names:
        return
    tensors = graph.tensors()
    by_name: dict[str, gs.Tensor] = {t.name: t for t in graph.inputs}
    for name in names:
        old = tensors.get(name)
        var = gs.Variable(name, dtype=old.dtype if old is not None else None,
                          shape=list(old.shape) if old is not None and old.shape is not None else None)
        if old is not None:
            for node in list(old.outputs):
                for i, t in enumerate(node.inputs):
                    if t is old:
                        node.inputs[i] = var
        by_name[name] = var
    declared = {vi.name: vi for vi in model.graph.input}
    for name in names:  # declared type wins over the initializer's
        tt = declared[name].type.tensor_type
        if tt.elem_type:
            by_name[name].dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if tt.HasField("shape"):
            by_name[name].shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                   for d in tt.shape.dim]
    graph.inputs = [by_name[vi.name] for vi in model.graph.input if vi.name in by_name]


def _refuse_optional_types(model: onnx.ModelProto) -> None:
    from onnxopt.graph_utils import iter_proto_graphs

    for g in iter_proto_graphs(model.graph):
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.type.WhichOneof("value") == "optional_type":
                raise PreconditionError(
                    f"value '{vi.name}' (graph '{g.name}') has an optional type; onnxopt cannot "
                    "rewrite models with optional values yet (onnx-graphsurgeon cannot export them)"
                )


def to_model(
    graph: gs.Graph, source: onnx.ModelProto, provenance: dict[str, str] | None = None
) -> onnx.ModelProto:
    """Export ``graph`` and restore what graphsurgeon drops, copied from ``source``."""
    kept_imports = {imp.domain: imp.version for imp in source.opset_import}
    opset = graph.opset
    # the default domain at the graph's opset, unless neither the source nor any node uses it
    # (an ai.onnx.ml-only model from skl2onnx stays without one)
    if {"", "ai.onnx"} & set(kept_imports) or any(
            n.domain in ("", "ai.onnx", None) for g in iter_graphs(graph) for n in g.nodes):
        kept_imports[""] = opset
    kept_imports.pop("ai.onnx", None)
    for imp in graph.import_domains or []:
        kept_imports.setdefault(imp.domain, imp.version)
    imports = [onnx.helper.make_opsetid(d, v) for d, v in kept_imports.items()]
    model = _export(graph, imports)
    model.ir_version = source.ir_version
    model.producer_name = source.producer_name
    model.producer_version = source.producer_version
    model.domain = source.domain
    model.model_version = source.model_version
    model.doc_string = source.doc_string
    model.graph.doc_string = source.graph.doc_string
    del model.metadata_props[:]
    meta = {p.key: p.value for p in source.metadata_props}
    meta.update(provenance or {})
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    if source.training_info:
        model.training_info.extend(source.training_info)
    # graph I/O exactly as declared: graphsurgeon rebuilds the value infos and loses, e.g.,
    # the element shape of a sequence-typed output
    declared = {vi.name: vi for vi in [*source.graph.input, *source.graph.output]}
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in declared and vi != declared[vi.name]:
            vi.CopyFrom(declared[vi.name])
    inputs = {vi.name for vi in model.graph.input}
    present = {t.name for t in model.graph.initializer}
    for t in source.graph.initializer:  # default values of overridable inputs
        if t.name in inputs and t.name not in present:
            model.graph.initializer.append(t)
    _hoist_subgraph_constants(model)
    return model


def _hoist_subgraph_constants(model: onnx.ModelProto) -> int:
    """One copy of a weight that graphsurgeon wrote into several subgraphs; returns how many moved.

    gs exports a constant that only subgraphs read into *each* subgraph that reads it: weights a
    model keeps once in its main graph for both branches of an If were written twice (Silero VAD
    half: 1.22 -> 1.74 MB with no pass run). Equal copies (same name, same bytes) found in two or
    more subgraphs, or again in the main graph, become one main-graph initializer that the
    subgraphs read from outer scope.
    """
    if model.ir_version < 4:  # initializers must also be graph inputs there: leave as written
        return 0
    main = model.graph
    taken = {t.name for t in main.initializer} | {i.name for i in main.input} | {
        o for n in main.node for o in n.output}
    copies: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for g in iter_proto_graphs(main):
        if g is not main:
            for t in g.initializer:
                copies.setdefault(t.name, []).append((g, t))
    main_inits = {t.name: t for t in main.initializer}
    moved = 0
    for name, found in copies.items():
        in_main = main_inits.get(name)
        if len(found) < 2 and in_main is None:
            continue
        if name in taken and in_main is None:
            continue  # the name means another value in the main graph
        first = found[0][1].SerializeToString()
        if any(t.SerializeToString() != first for _, t in found[1:]) or (
                in_main is not None and in_main.SerializeToString() != first):
            continue
        if in_main is None:
            main.initializer.append(found[0][1])
        for g, t in found:
            g.initializer.remove(t)
        moved += 1
    return moved


_BIG = 2**20  # bytes: weights this large are exported without gs's transient second copy


def _export(graph: gs.Graph, imports: list[onnx.OperatorSetIdProto]) -> onnx.ModelProto:
    """``gs.export_onnx``, holding one copy of the weights instead of two at the peak.

    gs copies every initializer into a GraphProto, then ``make_model`` copies that into
    the ModelProto (3x a model's weights with the source's). Big unchanged weights are
    exported as data-less shells and their bytes copied in afterwards, one at a time.
    Shelling also keeps gs from renaming the source's TensorProto in place.
    """
    swapped: list[tuple[gs.Constant, Any]] = []
    for t in graph.tensors().values():
        values = getattr(t, "_values", None)
        if (isinstance(t, gs.Constant) and isinstance(values, gs.ir.tensor.LazyValues)
                and values.tensor.HasField("raw_data") and values.nbytes >= _BIG
                and values.tensor.data_location == onnx.TensorProto.DEFAULT):
            src = values.tensor
            shell = onnx.TensorProto(name=src.name, data_type=src.data_type, dims=src.dims,
                                     doc_string=src.doc_string)
            swapped.append((t, values))
            t._values = gs.ir.tensor.LazyValues(shell)
    try:
        model = gs.export_onnx(graph, do_type_check=False, opset_imports=imports)
    finally:
        for t, values in swapped:
            t._values = values
    restore_binary_attributes(model)
    if swapped:  # subgraphs too: gs writes a constant only they read into each of them
        data = {t.name: values.tensor for t, values in swapped}
        for g in iter_proto_graphs(model.graph):
            for init in g.initializer:
                if init.name in data:
                    init.raw_data = data[init.name].raw_data
    return model


def over_protobuf_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too large to serialize as one protobuf.

    The weights are sized from their dims first: past 2 GiB, ``ByteSize()`` serializes
    the model to find out (17 s and +3 GiB on a 2.25 GiB model) and then raises.
    """
    helper = onnx.external_data_helper
    weights = sum(tensor_nbytes(t) for t in helper._get_all_tensors(model)
                  if not helper.uses_external_data(t))
    if weights >= PROTOBUF_LIMIT:
        return True
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT
    except EncodeError:
        return True


@contextlib.contextmanager
def staged_output(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; ``commit()`` by leaving the block.

    On an exception (including KeyboardInterrupt) the temporary directory is removed and
    ``destination`` is untouched. Files written next to the yielded path (external data)
    are moved along with it.
    """
    destination = Path(destination)
    parent = destination.parent if str(destination.parent) else Path(".")
    if not parent.exists():
        raise ModelSaveError(f"{destination}: directory '{parent}' does not exist")
    if destination.is_dir():
        raise ModelSaveError(f"{destination}: is a directory")
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=parent))
    except OSError as e:
        raise ModelSaveError(f"{destination}: cannot write to '{parent}' ({e.strerror})") from None
    try:
        yield tmpdir / destination.name
        _commit(tmpdir, parent, destination.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _commit(tmpdir: Path, parent: Path, name: str) -> None:
    """Move the staged files into ``parent``, model file last; on failure put the old ones back.

    A model and its external-data file cannot be replaced in one atomic step, so each file
    that gets replaced is first hard-linked into ``tmpdir`` (free on the same filesystem):
    if a later move fails (full disk, interrupt), the earlier ones are rolled back.
    """
    # model file last, so a reader never sees a model without its data
    staged = sorted(tmpdir.iterdir(), key=lambda p: p.name == name)
    backups: list[tuple[Path, Path]] = []
    created: list[Path] = []
    try:
        for f in staged:
            target = parent / f.name
            if target.exists():
                backup = tmpdir / f".old-{f.name}"
                try:
                    os.link(target, backup)
                    backups.append((backup, target))
                except OSError:
                    logger.debug("no hard links in %s: %s cannot be rolled back", parent, target)
            else:
                created.append(target)
            os.replace(f, target)
    except BaseException as e:
        for target in created:
            with contextlib.suppress(OSError):
                target.unlink()
        for backup, target in backups:
            with contextlib.suppress(OSError):
                os.replace(backup, target)
        if isinstance(e, OSError):
            raise ModelSaveError(
                f"{parent / name}: cannot move the output into place ({e.strerror or e}); "
                "the previous files were kept"
            ) from None
        raise


def write_model(
    model: onnx.ModelProto, path: Path, external_data: bool | None = None,
    restore_data: bool = True,
) -> None:
    """Write ``model`` to ``path`` (a staging path), with external data when it is large.

    With external data the tensors are moved out of the proto into ``<name>.data``; they
    are read back afterwards unless ``restore_data`` is False (a caller that drops the
    proto after writing saves reading the whole data file again).
    """
    if external_data is None:
        external_data = over_protobuf_limit(model) or _has_external(model)
    try:
        if external_data:
            _save_external(model, path, path.name + ".data")
            if restore_data:
                onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        else:
            onnx.save_model(model, str(path))
    except OSError as e:
        raise ModelSaveError(f"{path.name}: write failed ({e.strerror or e})") from None
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ModelSaveError(f"{path.name}: written model fails onnx.checker: {_first_line(e)}") from None


def _save_external(
    model: onnx.ModelProto, path: Path, location: str, threshold: int = 1024
) -> None:
    """Move every initializer of ``threshold`` bytes or more into ``location`` beside ``path``.

    Not ``onnx.save_model(save_as_external_data=True)``: it refuses to write when a file
    named ``location`` exists in the *working directory* (rerunning onnxopt where an
    earlier output lies), and reads every tensor's bytes out of the proto twice.
    Offsets are 4 KiB-aligned so onnxruntime can map the weights.
    """
    offset = 0
    with open(path.parent / location, "wb") as f:
        for t in onnx.external_data_helper._get_initializer_tensors(model):
            if not t.HasField("raw_data") or tensor_nbytes(t) < threshold:
                continue
            data = t.raw_data
            pad = -offset % 4096
            f.write(b"\0" * pad)
            offset += pad
            f.write(data)
            onnx.external_data_helper.set_external_data(
                t, location, offset=offset, length=len(data))
            t.ClearField("raw_data")
            offset += len(data)
            del data
    onnx.save_model(model, str(path))


def _has_external(model: onnx.ModelProto) -> bool:
    return any(
        onnx.external_data_helper.uses_external_data(t)
        for t in onnx.external_data_helper._get_all_tensors(model)
    )


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], external_data: bool | None = None
) -> None:
    """Save atomically: stage beside ``path``, check, then rename into place."""
    with staged_output(path) as staged:
        write_model(model, staged, external_data)
