"""The written file is what is verified (issue 21): tensors stay where the input kept them, the
output is loaded from its path before it is renamed into place, models over the protobuf limit
go through paths and external data, and a huge declared batch is never allocated."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli
from exporter_fixtures import GraphBuilder, box_samples, gemm_mlp, mlp_parameters, unit_box
from onnx import external_data_helper

from onnx_exact import verify
from onnx_exact.core.box import Box
from onnx_exact.io import runtime, staging
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.pipeline import DomainSpec, compress


def dynamo_model(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """torch-dynamo style: ``Reshape(x, val_0)`` with the int64 shape inline, weights external.

    Saved like ``onnx.save(..., save_as_external_data=True, size_threshold=64)``: the 16-byte
    shape stays in the ``.onnx`` file, every weight and bias goes to ``dynamo.onnx.data``.
    """
    g = GraphBuilder()
    shape = g.const(np.array([-1, 6]), "val_0", dtype=np.int64)
    x = g.node("Reshape", ["x", shape], name="node_view", output="view", allowzero=1)
    params = mlp_parameters(seed=3)
    for k, (weight, bias) in enumerate(params):
        last = k == len(params) - 1
        x = g.node(
            "Gemm",
            [x, g.const(weight, f"fc{k + 1}.weight"), g.const(bias, f"fc{k + 1}.bias")],
            name=f"node_linear_{k}",
            output="linear_out" if last else f"linear_{k}",
            transB=1,
        )
        if not last:
            x = g.node("Relu", [x], name=f"node_relu_{k}", output=f"relu_{k}")
    model = g.model([g.tensor("x", ["s77", 2, 3])], [g.tensor("linear_out", ["s77", 3])], opset=18)
    path = folder / "dynamo.onnx"
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="dynamo.onnx.data",
        size_threshold=64,
    )
    lower, upper = unit_box(6)
    return path, lower, upper


def placement_of(path: Path) -> dict[str, bool]:
    """``{tensor name: stored externally}`` of a model file (external data not loaded)."""
    model = onnx.load(path, load_external_data=False)
    return {t.name: external_data_helper.uses_external_data(t) for t in model.graph.initializer}


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ----------------------------------------------------------------------------- dynamo round trip
def test_dynamo_output_loads_from_its_path_with_the_shape_inline(tmp_path):
    source, lower, upper = dynamo_model(tmp_path)
    before = placement_of(source)
    assert before["val_0"] is False and before["fc1.weight"] is True
    out = tmp_path / "out.onnx"
    code, _, err = run_cli([source, out, "-r", "[-1,1]", "-q"])
    assert code == 0, err
    after = placement_of(out)
    assert after["val_0"] is False, "the inline int64 shape must stay inline"
    assert any(after.values()) and (tmp_path / "out.onnx.data").exists()
    for name, external in after.items():
        if name in before:
            assert external == before[name], name
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = box_samples(lower, upper, 32)
    (got,) = session.run(None, {"x": x.reshape(-1, 2, 3).astype(np.float32)})
    want = read_model(source).network.forward(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not [p for p in listing(tmp_path) if p.endswith(".tmp")]


def test_saving_leaves_the_callers_model_unchanged(tmp_path):
    model = gemm_mlp((40, 30, 3), seed=1, pinned=False)
    tensor = model.graph.initializer[0]
    typed = onnx.helper.make_tensor(
        "typed_w", onnx.TensorProto.FLOAT, [300], np.arange(300, dtype=np.float32).tolist()
    )
    model.graph.initializer.append(typed)  # float_data, not raw_data
    before = model.SerializeToString(deterministic=True)
    assert tensor.HasField("raw_data")
    staging.save_model_atomic(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString(deterministic=True) == before
    stored = placement_of(tmp_path / "m.onnx")
    assert stored["typed_w"] and stored[tensor.name]
    reread = onnx.load(tmp_path / "m.onnx")
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(reread.graph.initializer[-1]), np.arange(300)
    )


# ----------------------------------------------------------------------------- verified on disk
def _corrupting(monkeypatch, how: str) -> None:
    """Make the writer damage the staged file after writing it (as a bad disk or bug would)."""
    write = staging.write_files

    def write_then_corrupt(model, staged, placement):
        write(model, staged, placement)
        if how == "truncate":
            data = staged.path.read_bytes()
            staged.path.write_bytes(data[: len(data) // 2])
        else:  # flip the signs of the stored weights: loads fine, computes something else
            target = staged.data_path or staged.path
            model_file = onnx.load(staged.path, load_external_data=False)
            tensor = model_file.graph.initializer[-1]
            array = -onnx.numpy_helper.to_array(tensor, base_dir=str(staged.folder)) - 1.0
            if staged.data_path is None:
                tensor.raw_data = array.astype(np.float32).tobytes()
                staged.path.write_bytes(model_file.SerializeToString())
            else:
                info = {e.key: int(e.value) for e in tensor.external_data if e.key != "location"}
                with open(target, "r+b") as stream:
                    stream.seek(info.get("offset", 0))
                    stream.write(array.astype(np.float32).tobytes())

    monkeypatch.setattr(staging, "write_files", write_then_corrupt)


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_written_file_that_is_wrong_exits_1_and_leaves_nothing(
    tmp_path, monkeypatch, how, external
):
    if external:
        source, _, _ = dynamo_model(tmp_path)
    else:
        source = tmp_path / "in.onnx"
        onnx.save(gemm_mlp((6, 8, 3), seed=2, pinned=False), source)
    before = listing(tmp_path)
    _corrupting(monkeypatch, how)
    code, _, err = run_cli([source, tmp_path / "out.onnx", "-r", "[-1,1]", "-q"])
    assert code == 1, err
    assert listing(tmp_path) == before, "nothing may be left behind"
    if how == "truncate":
        assert "written model" in err and "nothing was written" in err


# ----------------------------------------------------------------------------- over 2 GiB
def test_large_model_path_runs_from_files_with_external_data(tmp_path, monkeypatch):
    """With the threshold lowered, every model counts as over 2 GiB: no proto is serialised whole
    (no ``ByteSize``/``SerializeToString`` of the model), sessions and the checker use paths."""
    monkeypatch.setattr(staging, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    source = tmp_path / "in.onnx"
    onnx.save(gemm_mlp((6, 40, 30, 3), seed=4, pinned=False), source)
    sources: list[object] = []

    class RecordingSession(ort.InferenceSession):
        def __init__(self, model, *args, **kwargs):
            sources.append(model)
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    checked: list[object] = []
    check_model = onnx.checker.check_model

    def recording_check(model, *args, **kwargs):
        checked.append(model)
        return check_model(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", recording_check)
    out = tmp_path / "out.onnx"
    result = compress(source, out, DomainSpec(input_ranges=["[-1,1]"]), prove=True)
    assert result.report.passed and result.report.output == str(out)
    assert listing(tmp_path) == {"in.onnx", "out.onnx", "out.onnx.data"}
    assert sources and all(isinstance(s, str) for s in sources), "sessions from paths only"
    assert any(isinstance(c, str) and c.endswith("out.onnx") for c in checked)
    assert not any(c is result.model for c in checked), "the output is checked from its path"
    assert result.report.bytes_before == staging.tensor_bytes(read_model(source).model)
    assert result.report.bytes_after == staging.tensor_bytes(result.model)
    x = box_samples(-np.ones(6), np.ones(6), 64)
    np.testing.assert_allclose(
        read_model(out).network.forward(x), read_model(source).network.forward(x), atol=1e-5
    )


def test_tensor_bytes_needs_no_serialisation():
    model = gemm_mlp((6, 40, 3), seed=0, pinned=False)
    expected = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert staging.tensor_bytes(model) == expected
    assert staging.model_size_bytes(model) == model.ByteSize()


# ----------------------------------------------------------------------------- declared batch
def _fixed_batch_model(batch: int) -> onnx.ModelProto:
    model = gemm_mlp((4, 8, 3), seed=5, pinned=False)
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    return model


def _assert_batch_freed(path: Path) -> None:
    """Fail fast, before anything could pad to the declared batch (16 GB for 10^9 x 4 float32:
    without the fix a test would be killed for memory instead of failing)."""
    declared = runtime.onnxruntime_session(str(path), 4).get_inputs()[0].shape[0]
    assert not isinstance(declared, int), declared


def test_a_declared_batch_of_a_billion_is_never_allocated(tmp_path, monkeypatch):
    """Without the fix every run pads to 10^9 rows (16 GB for 4 float32 features)."""
    model = _fixed_batch_model(10**9)
    path = tmp_path / "b.onnx"
    onnx.save(model, path)
    _assert_batch_freed(path)
    rows: list[int] = []
    session_class = ort.InferenceSession

    class RecordingSession(session_class):
        def run(self, output_names, feed, *args, **kwargs):
            rows.extend(int(np.asarray(v).shape[0]) for v in feed.values())
            return super().run(output_names, feed, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    box = Box(-np.ones(4), np.ones(4), "x")
    tracemalloc.start()
    try:
        report = verify.compare_models(model, str(path), box, samples=1500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.passed and report.samples == 1503
    assert rows and max(rows) <= verify.CHUNK_SAMPLES
    assert peak < 64 * 2**20
    values = runtime.run_model(path, np.zeros((3, 4)))
    assert next(iter(values.values())).shape[0] == 3


def test_a_small_declared_batch_is_fed_as_declared():
    model = _fixed_batch_model(4)
    session = runtime.onnxruntime_session(model, 4)
    assert session.get_inputs()[0].shape[0] == 4
    out = runtime.run_model(session, np.zeros((6, 4)))
    assert next(iter(out.values())).shape[0] == 6


def test_a_session_with_a_huge_declared_batch_is_refused():
    session = runtime.onnxruntime_session(_fixed_batch_model(10**9))
    with pytest.raises(verify.UsageError, match="fixed batch of 1000000000"):
        runtime.run_model(session, np.zeros((2, 4)))


def test_compress_with_a_billion_batch_writes_the_declared_shape(tmp_path):
    path = tmp_path / "b.onnx"
    onnx.save(_fixed_batch_model(10**9), path)
    _assert_batch_freed(path)
    out = tmp_path / "out.onnx"
    result = compress(path, out, DomainSpec(input_ranges=["[-1,1]"]), prove=True)
    assert result.report.passed, result.report.notes
    written = onnx.load(out)
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 10**9
    assert os.path.getsize(out) < 10**6


def test_check_runs_the_candidate_from_its_path(tmp_path):
    """``check`` used to run both models from protos loaded by onnx (external data inlined), so
    a candidate onnxruntime cannot load from its path (its int64 shape stored externally) passed."""
    source, _, _ = dynamo_model(tmp_path)
    model = onnx.load(source)
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad, save_as_external_data=True, location="bad.onnx.data", size_threshold=0)
    assert placement_of(bad)["val_0"] is True
    code, _, err = run_cli(["check", source, bad, "-r", "[-1,1]", "--no-prove"])
    assert code == 2, err
    assert "onnxruntime cannot load" in err and "bad.onnx" in err
