"""Running an ONNX model in onnxruntime on flattened raw inputs, whatever its input layout.

One CPU session per model with one thread (deterministic, polite on a shared machine); the box's
flattened features are reshaped to the declared input (``[batch, n]``, a fixed batch of one,
``[1, n, 1]``, no batch axis: :class:`~onnx_exact.io.domain_sources.InputLayout`), fixed batches
are padded, and every output comes back with the sample axis first (ZipMap maps as arrays).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_exact.core.errors import UnsupportedModelError, UsageError, VerificationError
from onnx_exact.io.domain_sources import InputLayout
from onnx_exact.io.staging import is_large, stage_model

_INPUT_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
}


MAX_DECLARED_BATCH = 512
"""The largest fixed batch fed as declared (short chunks padded to it). A model declaring a larger
one (10^9 rows would be 15 GiB per run) is opened with that batch axis made dynamic instead, so no
run ever holds more than a chunk of samples, whatever the declared shape."""


def onnxruntime_session(
    model: onnx.ModelProto | str | os.PathLike, n_features: int | None = None
) -> ort.InferenceSession:
    """A CPU onnxruntime session with one thread (deterministic, polite on a 2-core machine).

    A path is handed to onnxruntime directly, so the file is loaded as a user loads it (external
    data found next to it, a file over 2 GiB read from disk). A ModelProto whose tensors exceed
    ``EXTERNAL_DATA_THRESHOLD_BYTES`` cannot be serialised and is staged into a temporary folder
    with external data first.

    With ``n_features`` (the flattened features of one sample) a fixed batch axis larger than
    ``MAX_DECLARED_BATCH`` is made dynamic in a private copy (graph input and outputs; value_info
    dropped): the rows of an MLP are independent, so each row's result is the same, and nothing
    is ever allocated by the declared batch.
    """
    in_memory = isinstance(model, onnx.ModelProto)
    what = "the model" if in_memory else os.fspath(model)
    if n_features is not None:
        layout = _declared_layout(model if in_memory else _header(model), n_features)
        if layout is not None and (layout.batch_size or 0) > MAX_DECLARED_BATCH:
            if in_memory:
                private = onnx.ModelProto()
                private.CopyFrom(model)
            else:
                private = _load_with_data(model)
            return _create_session(_free_batch_axis(private, layout), what)
    return _create_session(model, what)


def _create_session(model: onnx.ModelProto | str | os.PathLike, what: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if isinstance(model, onnx.ModelProto) and is_large(model):
        with tempfile.TemporaryDirectory(prefix="onnx_exact_session_") as folder:
            with stage_model(model, Path(folder) / "model.onnx") as staged:
                return _create_session(staged.path, what)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise UnsupportedModelError(
            f"onnxruntime cannot load {what}: {str(exc).splitlines()[0]}"
        ) from None


def _header(path: str | os.PathLike) -> onnx.ModelProto | None:
    """The model file without its external data (cheap), or None if onnx cannot parse it (then
    onnxruntime reports the problem)."""
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - onnxruntime's own message is the better one
        return None


def _load_with_data(path: str | os.PathLike) -> onnx.ModelProto:
    try:
        return onnx.load(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - protobuf/onnx raise several untyped errors
        raise UnsupportedModelError(
            f"onnx cannot load {os.fspath(path)}: {str(exc).splitlines()[0]}"
        ) from None


def _declared_layout(model: onnx.ModelProto | None, n_features: int) -> InputLayout | None:
    """The layout of the model's one fed input (initializers do not count), None if not one."""
    if model is None:
        return None
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    if len(inputs) != 1 or not inputs[0].type.tensor_type.HasField("shape"):
        return None
    dims = [
        d.dim_value if d.HasField("dim_value") else None
        for d in inputs[0].type.tensor_type.shape.dim
    ]
    try:
        return InputLayout.from_dims(inputs[0].name, dims, n_features)
    except UnsupportedModelError:
        return None


def _free_batch_axis(model: onnx.ModelProto, layout: InputLayout) -> onnx.ModelProto:
    """Make the fixed batch axis of ``model`` (private, edited in place) dynamic."""
    graph = model.graph
    for value in [*(i for i in graph.input if i.name == layout.name), *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == layout.batch_size:
            dims[0].dim_param = "onnx_exact_batch"
    del graph.value_info[:]
    return model


def session_of(
    model: onnx.ModelProto | str | os.PathLike | ort.InferenceSession, n_features: int
) -> ort.InferenceSession:
    if isinstance(model, ort.InferenceSession):
        return model
    return onnxruntime_session(model, n_features)


@dataclass(frozen=True)
class Feed:
    """The one input a session is fed: its layout and dtype."""

    layout: InputLayout
    dtype: np.dtype


def feed_for(session: ort.InferenceSession, n_features: int, input_name: str | None) -> Feed:
    """Which input carries the box and how to shape it.

    The model must have exactly one input to feed (initializers do not count): the box covers
    one input, and its name may differ between exporters, so it is not required to match
    ``input_name`` (used in the message only).
    """
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(repr(node_arg.name) for node_arg in inputs)
        raise UsageError(
            f"the model has inputs {names}; only one, the box input {input_name!r}, can be "
            "sampled: the others would need values"
        )
    node_arg = inputs[0]
    if node_arg.type not in _INPUT_DTYPES:
        raise UnsupportedModelError(
            f"input {node_arg.name!r} has type {node_arg.type}; only float16/float/double "
            "inputs can be sampled from a box"
        )
    dims = [d if isinstance(d, int) else None for d in node_arg.shape]
    layout = InputLayout.from_dims(node_arg.name, dims, n_features)
    if (layout.batch_size or 0) > MAX_DECLARED_BATCH:
        raise UsageError(
            f"input {node_arg.name!r} declares a fixed batch of {layout.batch_size}: pass the "
            "model or its path (not a session) so that it is run a chunk at a time"
        )
    return Feed(layout, _INPUT_DTYPES[node_arg.type])


def run_chunk(session: ort.InferenceSession, feed: Feed, x: np.ndarray) -> dict[str, object]:
    """Outputs for the rows of ``x`` (already in the input dtype), batch axis first.

    Tensor outputs come back as arrays of shape ``(m, ...)``; sequence-of-map outputs as lists of
    ``m`` dicts. Fixed-batch inputs run in batches of that size (the last one padded by repeating
    its final row, the padding's outputs dropped); inputs without batch axis run one row at a time.
    """
    layout = feed.layout
    m = x.shape[0]
    per_run = layout.samples_per_run or m
    padded_rows = -m % per_run
    if padded_rows:
        x = np.concatenate([x, np.repeat(x[-1:], padded_rows, axis=0)])
    shape = ((per_run,) if layout.has_batch_axis else ()) + layout.sample_shape
    output_names = [node_arg.name for node_arg in session.get_outputs()]
    collected: dict[str, list] = {name: [] for name in output_names}
    for start in range(0, x.shape[0], per_run):
        values = session.run(None, {layout.name: x[start : start + per_run].reshape(shape)})
        for name, value in zip(output_names, values, strict=True):
            collected[name].append(_rows(value, per_run, layout.has_batch_axis, name))
    out: dict[str, object] = {}
    for name, parts in collected.items():
        if isinstance(parts[0], list):
            out[name] = [row for part in parts for row in part][:m]
        else:
            out[name] = np.concatenate(parts)[:m]
    return out


def _rows(value: object, rows: int, has_batch_axis: bool, name: str) -> object:
    """One run's output with a leading axis of ``rows`` samples."""
    if isinstance(value, list):
        if len(value) != rows or not all(isinstance(item, dict) for item in value):
            raise UnsupportedModelError(
                f"output {name!r} is a sequence that is not one map per sample; cannot compare it"
            )
        return value
    value = np.asarray(value)
    if not has_batch_axis:
        return value[None]
    if value.ndim >= 1 and value.shape[0] == rows:
        return value
    if value.size % rows:
        raise UnsupportedModelError(
            f"output {name!r} of shape {list(value.shape)} does not split into {rows} samples"
        )
    return value.reshape(rows, -1)


def run_model(
    model: onnx.ModelProto | str | os.PathLike | ort.InferenceSession,
    x_flat: np.ndarray,
    input_name: str | None = None,
) -> dict[str, np.ndarray]:
    """Run a model on flattened raw inputs ``(m, n)`` (or one ``(n,)``), whatever its input layout.

    Returns every output with the sample axis first. Sequence-of-map outputs (ZipMap) become
    float64 arrays ``(m, k)`` with columns in the first map's key order. Inputs are cast to the
    model's input dtype as given (no clipping: a counterexample replay wants the exact point).
    """
    x_flat = np.atleast_2d(np.asarray(x_flat, dtype=np.float64))
    session = session_of(model, x_flat.shape[1])
    feed = feed_for(session, x_flat.shape[1], input_name)
    out = {}
    for name, value in run_chunk(session, feed, x_flat.astype(feed.dtype)).items():
        out[name] = map_rows_to_array(value, name)[1] if isinstance(value, list) else value
    return out


def map_rows_to_array(rows: list[dict], name: str) -> tuple[list, np.ndarray]:
    """``(keys, values (m, k) float64)`` of a list of maps that must all have the same keys."""
    keys = list(rows[0].keys())
    key_set = set(keys)
    if any(set(row.keys()) != key_set for row in rows):
        raise VerificationError(f"output {name!r}: the maps do not all have the same keys")
    return keys, np.array([[row[key] for key in keys] for row in rows], dtype=np.float64)
