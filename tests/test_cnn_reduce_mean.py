"""ReduceMean over spatial axes in CNNs (torch dynamo's adaptive average pool to 1, a
``mean(dim=(2, 3))``, Keras' global average pooling after NHWC): read as a linear op, pruned
through, and refused in one line where it mixes channels or the batch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli
from onnx import TensorProto, helper, numpy_helper

from onnx_exact import AnalysisOptions, DomainSpec, check, compress
from onnx_exact.core.operators import MeanOperator

DEAD = 2  # the conv channel planted dead on the box (a large negative bias)


def _model(
    opset: int, keepdims: int, nhwc: bool = False, axes=None, features: int = 4
) -> onnx.ModelProto:
    """``Conv(3→4, 3x3, pad 1) → Relu → [Transpose NHWC] → ReduceMean → [Flatten] → Gemm``."""
    rng = np.random.default_rng(opset + keepdims + nhwc)
    kernel = rng.normal(0.0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, 4).astype(np.float32)
    bias[DEAD] = -50.0
    gemm = rng.normal(0.0, 0.5, (5, features)).astype(np.float32)
    inits = [
        numpy_helper.from_array(kernel, "k"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(gemm, "w"),
        numpy_helper.from_array(np.zeros(5, np.float32), "c"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "k", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
    ]
    current = "relu"
    if nhwc:
        nodes.append(helper.make_node("Transpose", [current], ["nhwc"], perm=[0, 2, 3, 1]))
        current = "nhwc"
    axes = axes if axes is not None else ([1, 2] if nhwc else [2, 3])
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
        nodes.append(helper.make_node("ReduceMean", [current, "axes"], ["mean"], keepdims=keepdims))
    else:
        nodes.append(
            helper.make_node("ReduceMean", [current], ["mean"], axes=axes, keepdims=keepdims)
        )
    current = "mean"
    if keepdims:
        nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1))
        current = "flat"
    nodes.append(helper.make_node("Gemm", [current, "w", "c"], ["y"], transB=1))
    graph = helper.make_graph(
        nodes,
        "reduce_mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": row[None]})[0] for row in x])


def test_mean_operator_is_the_mean_and_its_adjoint():
    rng = np.random.default_rng(0)
    op = MeanOperator((3, 4, 5), (1, 2), keepdims=False)
    x = rng.normal(size=(2, 60))
    np.testing.assert_allclose(op.forward(x), x.reshape(2, 3, 4, 5).mean(axis=(2, 3)))
    dense = op.dense()
    rows = rng.normal(size=(2, 3))
    np.testing.assert_allclose(op.transpose(rows), rows @ dense)
    assert op.output_shape == (3,) and MeanOperator((3, 4, 5), (1,), True).output_shape == (3, 1, 5)
    np.testing.assert_array_equal(op.first_sources(), [0, 20, 40])


@pytest.mark.parametrize(
    "opset, keepdims, nhwc", [(13, 0, False), (13, 1, False), (18, 1, False), (18, 0, True)]
)
def test_a_spatial_mean_is_read_pruned_through_and_checked(tmp_path, opset, keepdims, nhwc):
    model = _model(opset, keepdims, nhwc)
    lower, upper = np.zeros(108), np.ones(108)
    out = tmp_path / "small.onnx"
    result = compress(
        model, out, DomainSpec(lower=lower, upper=upper), AnalysisOptions(time_limit=30)
    )
    assert result.report.passed
    written = onnx.load(out)
    kernel = next(numpy_helper.to_array(t) for t in written.graph.initializer if t.name == "k")
    assert kernel.shape[0] == 3, "the dead channel was not removed through the ReduceMean"
    onnx.shape_inference.infer_shapes(written, strict_mode=True)
    x = np.random.default_rng(1).uniform(lower, upper, (200, 108)).reshape(200, 1, 3, 6, 6)
    x = x.astype(np.float32)
    np.testing.assert_allclose(_run(written, x[:, 0]), _run(model, x[:, 0]), rtol=0, atol=1e-5)
    assert check(model, written, DomainSpec(lower=lower, upper=upper)).proof.status == "proved"


def test_a_mean_over_the_channels_is_refused_in_one_line(tmp_path):
    path = tmp_path / "channels.onnx"
    onnx.save(_model(13, 1, axes=[1, 2], features=6), path)
    code, out, err = run_cli(["analyze", str(path), "--input-range", "[0,1]"])
    assert code == 2
    assert err.count("\n") == 1 and "ReduceMean" in err and "channel axis" in err
