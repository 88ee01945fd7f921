"""Saving a model file: its size, where each tensor goes, staging beside the destination, commit.

A model is written under its final file names into a temporary folder beside the destination
(:func:`stage_model`), checked and verified from that path, and renamed into place only by
:meth:`StagedModel.commit`: an interrupted or failed run leaves nothing. Tensors go inline or to
one ``<name>.data`` file as the input had them (:class:`TensorPlacement`); a model over
``EXTERNAL_DATA_THRESHOLD_BYTES`` of tensors is never serialised as one protobuf, and its sizes
come from the tensors (:func:`tensor_bytes`), not from ``ByteSize()``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import external_data_helper, helper, numpy_helper

from onnx_exact.core.errors import UsageError, VerificationError
from onnx_exact.io.graph import all_tensors
from onnx_exact.io.onnx_reader import ReadResult

EXTERNAL_DATA_THRESHOLD_BYTES = int(1.8 * 1024**3)
"""Above this many tensor bytes a model is handled as large: saved with external data (protobuf
cannot serialise 2 GiB), checked and run from its path, sized without ``ByteSize()``."""

INLINE_TENSOR_BYTES = 1024
"""onnx.save's default ``size_threshold``: when the writer (not the input) chooses external data,
smaller tensors stay inline."""

_SHAPE_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
"""Element types of shape-like tensors, which onnxruntime needs inline (see TensorPlacement)."""

_FIXED_ITEMSIZE = {
    code: np.dtype(helper.tensor_dtype_to_np_dtype(code)).itemsize
    for code in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.UINT64,
        onnx.TensorProto.BOOL,
    )
}


def external_data_path(path: str | os.PathLike) -> Path:
    """The data file :func:`save_model_atomic` writes beside ``path``: ``<path>.data``.

    Public so that a run can check, before analysing, that it will not overwrite a file it reads.
    """
    path = Path(os.fspath(path))
    return path.with_name(f"{path.name}.data")


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s tensors exceed ``EXTERNAL_DATA_THRESHOLD_BYTES`` (read at call time, so
    tests can lower it): such a model is saved with external data and loaded from its path."""
    return tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes of every tensor payload in ``model`` (initializers and tensor attributes).

    Computed from dims and element type where the data is raw (no copy of a payload is made), so it
    works on a model over 2 GiB, whose ``ByteSize()`` protobuf refuses.
    """
    return sum(payload_bytes(tensor) for tensor in all_tensors(model))


def model_size_bytes(model: onnx.ModelProto) -> int:
    """The model's serialised size: exact below ``EXTERNAL_DATA_THRESHOLD_BYTES`` of tensors,
    else the tensor payload bytes (protobuf cannot size a message of 2 GiB; the graph around the
    tensors is a negligible part of such a model)."""
    payload = tensor_bytes(model)
    if payload > EXTERNAL_DATA_THRESHOLD_BYTES:
        return payload
    try:
        return model.ByteSize()
    except EncodeError:  # a huge graph with small tensors
        return payload


def payload_bytes(tensor: onnx.TensorProto) -> int:
    if external_data_helper.uses_external_data(tensor):
        for entry in tensor.external_data:
            if entry.key == "length":
                return int(entry.value)
    if tensor.HasField("raw_data"):
        if tensor.data_type in _FIXED_ITEMSIZE:
            return math.prod(tensor.dims) * _FIXED_ITEMSIZE[tensor.data_type]
        return len(tensor.raw_data)
    return tensor.ByteSize()


@dataclass(frozen=True)
class TensorPlacement:
    """Which tensors a saved model keeps inline and which go to its external data file.

    A tensor named like one of the input model's keeps the input's choice (``external`` or
    ``inline``); any other tensor is external when its payload holds at least ``threshold`` bytes
    (the input's rule: onnx.save's ``size_threshold``, inferred as the smallest payload the input
    stored externally). One exception: integer tensors under ``INLINE_TENSOR_BYTES`` (shapes,
    axes, indices) are always inline, even when the input stored them externally, because
    onnxruntime's shape inference cannot read shape data from an external file ("Cannot parse
    data from external tensors"): such an input does not load from its path, its output does.
    """

    external: frozenset[str] = frozenset()
    inline: frozenset[str] = frozenset()
    threshold: int = INLINE_TENSOR_BYTES

    def is_external(self, tensor: onnx.TensorProto) -> bool:
        name, nbytes = tensor.name, payload_bytes(tensor)
        if tensor.data_type in _SHAPE_TYPES and nbytes < INLINE_TENSOR_BYTES:
            return False
        if name in self.external:
            return True
        if name in self.inline:
            return False
        return nbytes > 0 and nbytes >= self.threshold

    @classmethod
    def like_input(cls, read: ReadResult) -> TensorPlacement | None:
        """The placement of the file ``read`` came from; None when it had no external data."""
        if not read.uses_external_data:
            return None
        external = frozenset(read.external_tensors)
        sizes = {tensor.name: payload_bytes(tensor) for tensor in all_tensors(read.model)}
        inline = frozenset(sizes) - external
        threshold = min((sizes[name] for name in external if name in sizes), default=1)
        return cls(external, inline, max(threshold, 1))


class StagedModel:
    """A model written under its final file names in a temporary folder beside its destination.

    ``path`` is the staged ``.onnx`` file: load it (onnxruntime, ``onnx.checker``) to verify exactly
    the bytes a user will get. :meth:`commit` moves the data file, then the model file, to the
    destination (``os.replace``, atomic on one file system); a block that ends without a commit
    leaves nothing.
    """

    def __init__(self, folder: Path, destination: Path, external: bool) -> None:
        self.folder = folder
        self.destination = destination
        self.path = folder / destination.name
        self.data_path = external_data_path(self.path) if external else None

    def commit(self) -> None:
        """Move the staged files to the destination (the data file first: the model names it)."""
        try:
            if self.data_path is not None:
                os.replace(self.data_path, external_data_path(self.destination))
            os.replace(self.path, self.destination)
        except OSError as exc:
            raise UsageError(
                f"{self.destination}: cannot write the model ({exc.strerror or exc}); choose a "
                "writable path"
            ) from None


@contextlib.contextmanager
def stage_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    placement: TensorPlacement | None = None,
) -> Iterator[StagedModel]:
    """Write ``model`` into a temporary folder beside ``path``; yield it to be verified, then clean up.

    Parameters
    ----------
    model : the model to save (left as it was; see :func:`write_files`).
    path : the destination file; its folder must exist.
    external_data : store tensors in ``<path>.data`` (:func:`external_data_path`). None chooses it
        when the tensors hold more than ``EXTERNAL_DATA_THRESHOLD_BYTES`` (protobuf cannot
        serialise 2 GiB); pass ``ReadResult.uses_external_data`` to keep external data external.
    placement : with external data, which tensors go to the data file; default: those of at least
        ``INLINE_TENSOR_BYTES`` (onnx.save's rule). :meth:`TensorPlacement.like_input` keeps the
        input's choice.

    The staged file must pass ``onnx.checker.check_model`` *from its path* (the one way to check a
    model over 2 GiB, and it checks the data file reference), else a
    :class:`~onnx_exact.core.errors.VerificationError`. The bytes depend only on the model
    (deterministic serialisation, no timestamps). On any failure or interrupt, and whenever the
    block ends without :meth:`StagedModel.commit`, the temporary folder is removed with its files;
    a file-system failure becomes a :class:`~onnx_exact.core.errors.UsageError` naming the path.
    """
    path = Path(os.fspath(path))
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; give a file name for the output model")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(
            f"{path}: folder '{folder}' does not exist; create it or choose another path"
        )
    if external_data is None:
        external_data = is_large(model)
    temporary: str | None = None
    try:
        try:
            temporary = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
            staged = StagedModel(Path(temporary), path, external=bool(external_data))
            if external_data:
                write_files(model, staged, placement or TensorPlacement())
            else:
                write_files(model, staged, None)
        except (OSError, ValueError, EncodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(
                f"{path}: cannot write the model ({reason}); choose a writable path"
            ) from None
        try:
            onnx.checker.check_model(str(staged.path))
        except (onnx.checker.ValidationError, ValueError) as exc:
            raise VerificationError(
                f"{path}: the written model fails onnx.checker ({str(exc).splitlines()[0]}); "
                "nothing was written"
            ) from None
        yield staged
    finally:
        # also on Ctrl-C / SIGTERM (KeyboardInterrupt): no temporary file survives
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def save_model_atomic(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    placement: TensorPlacement | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically: :func:`stage_model`, then commit.

    Parameters
    ----------
    model : the model to save (left as it was).
    path : the destination file; its folder must exist.
    external_data, placement : where the tensors go, as in :func:`stage_model`.
    """
    with stage_model(model, path, external_data=external_data, placement=placement) as staged:
        staged.commit()


def write_files(
    model: onnx.ModelProto, staged: StagedModel, placement: TensorPlacement | None
) -> None:
    """Write the staged model file, and with a ``placement`` its data file; both fsynced.

    The external tensors' payloads go to the data file in graph order (so it is as deterministic
    as the model). Their ``raw_data`` is cleared *in* ``model`` while the rest is serialised, and
    restored afterwards (from the data file; a tensor kept in typed fields such as ``float_data``
    from a copy of itself): a model over 2 GiB is never copied whole, which would double the peak
    memory.
    """
    mode = _default_file_mode()
    moved: list[_Moved] = []
    try:
        if placement is not None:
            with open(staged.data_path, "wb") as stream:
                offset = 0
                for tensor in all_tensors(model):
                    if external_data_helper.uses_external_data(tensor):
                        raise ValueError(f"tensor '{tensor.name}' still refers to external data")
                    if tensor.data_type == onnx.TensorProto.STRING or not placement.is_external(
                        tensor
                    ):
                        continue
                    entry = _Moved(tensor, offset)
                    if not tensor.HasField("raw_data"):
                        entry.typed = onnx.TensorProto()
                        entry.typed.CopyFrom(tensor)
                        array = numpy_helper.to_array(tensor)
                        for name in _TYPED_FIELDS:
                            tensor.ClearField(name)
                        tensor.raw_data = array.astype(array.dtype.newbyteorder("<")).tobytes()
                    elif tensor.HasField("data_location"):
                        entry.data_location = tensor.data_location
                    data = tensor.raw_data
                    stream.write(data)
                    entry.length = len(data)
                    moved.append(entry)
                    external_data_helper.set_external_data(
                        tensor, staged.data_path.name, offset, len(data)
                    )
                    tensor.ClearField("raw_data")
                    offset += len(data)
                    del data
                stream.flush()
                os.fsync(stream.fileno())
            if moved:
                os.chmod(staged.data_path, mode)
            else:  # every tensor stays inline: no data file
                os.remove(staged.data_path)
                staged.data_path = None
        payload = model.SerializeToString(deterministic=True)
    finally:
        _restore(moved, staged.data_path)
    with open(staged.path, "wb") as stream:
        stream.write(payload)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(staged.path, mode)


_TYPED_FIELDS = (
    "float_data",
    "int32_data",
    "int64_data",
    "double_data",
    "uint64_data",
)


@dataclass
class _Moved:
    """A tensor whose payload :func:`write_files` moved to the data file, and how to undo it."""

    tensor: onnx.TensorProto
    offset: int
    length: int = 0
    typed: onnx.TensorProto | None = None  # the tensor as it was, when its data was typed
    data_location: int | None = None  # its explicit data_location field, if it had one


def _restore(moved: list[_Moved], data_path: Path | None) -> None:
    """Undo :func:`write_files`' changes to the caller's model."""
    if not moved:
        return
    with open(data_path, "rb") as stream:
        for entry in moved:
            tensor = entry.tensor
            if entry.typed is not None:
                tensor.CopyFrom(entry.typed)
                continue
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            if entry.data_location is not None:
                tensor.data_location = entry.data_location
            stream.seek(entry.offset)
            tensor.raw_data = stream.read(entry.length)


def _default_file_mode() -> int:
    """``0o666`` minus the umask: what a plain ``open(path, "w")`` would have created."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
