"""``x.view(x.size(0), -1)`` with a dynamic batch (torch's legacy exporter: Shape → Gather →
Unsqueeze → Concat → Reshape) is folded into a constant ``[0, -1]`` target, so such CNNs and
MLPs are read, compressed and checked; targets that are not of that form stay as they are."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_exact import AnalysisOptions, DomainSpec, check, compress
from onnx_exact.io.shape_folding import fold_batch_reshapes


def _model(conv: bool, gather_index: int = 0) -> onnx.ModelProto:
    """``[Conv → Relu →] view(x.size(0), -1) → Gemm → Relu → Gemm`` with batch ``N``."""
    rng = np.random.default_rng(int(conv))
    inits, nodes = [], []
    if conv:
        kernel = rng.normal(0.0, 0.5, (3, 2, 3, 3)).astype(np.float32)
        bias = np.array([0.1, -40.0, 0.2], np.float32)  # channel 1 dead on the box
        inits += [numpy_helper.from_array(kernel, "k"), numpy_helper.from_array(bias, "kb")]
        nodes += [
            helper.make_node("Conv", ["x", "k", "kb"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["h"], name="relu_conv"),
        ]
        source, features = "h", 3 * 25
    else:
        source, features = "x", 2 * 25
    inits += [
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array(gather_index, np.int64), "index"),
        numpy_helper.from_array(rng.normal(0.0, 0.3, (8, features)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0.0, 0.3, (4, 8)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b2"),
    ]
    nodes += [
        helper.make_node("Shape", [source], ["shape"]),
        helper.make_node("Gather", ["shape", "index"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch"], ["batch1"], axes=[0]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", [source, "target"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["fc"], transB=1),
        helper.make_node("Relu", ["fc"], ["hfc"], name="relu_fc"),
        helper.make_node("Gemm", ["hfc", "w2", "b2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "view",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_the_view_target_becomes_a_constant_and_the_shape_nodes_go():
    model = _model(conv=True)
    before = onnx.ModelProto()
    before.CopyFrom(model)
    folded = fold_batch_reshapes(model)
    assert model == before  # never changed in place
    assert not {"Shape", "Gather", "Unsqueeze", "Concat"} & {n.op_type for n in folded.graph.node}
    reshape = next(n for n in folded.graph.node if n.op_type == "Reshape")
    target = next(t for t in folded.graph.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [0, -1]
    x = np.random.default_rng(0).uniform(size=(3, 2, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, x), _run(model, x))


def test_only_targets_of_constants_and_the_batch_are_folded():
    """Gathering dimension 1 (a constant 2) folds to ``[2, -1]``; once that dimension is
    symbolic too, the target is not a constant for every input and the model is returned."""
    folded = fold_batch_reshapes(_model(conv=False, gather_index=1))
    reshape = next(n for n in folded.graph.node if n.op_type == "Reshape")
    target = next(t for t in folded.graph.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [2, -1]
    symbolic = _model(conv=False, gather_index=1)
    dim = symbolic.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "C"
    assert fold_batch_reshapes(symbolic) is symbolic


@pytest.mark.parametrize("conv", [True, False])
def test_view_models_compress_and_check_for_any_batch(tmp_path, conv):
    model = _model(conv)
    lower, upper = np.zeros(50), np.ones(50)
    out = tmp_path / "small.onnx"
    domain = DomainSpec(lower=lower, upper=upper)
    result = compress(model, out, domain, AnalysisOptions(time_limit=30))
    assert result.report.passed
    written = onnx.load(out)
    if conv:
        kernel = next(numpy_helper.to_array(t) for t in written.graph.initializer if t.name == "k")
        assert kernel.shape[0] == 2, "the dead channel was not removed"
    x = np.random.default_rng(1).uniform(size=(5, 2, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_run(written, x), _run(model, x), rtol=0, atol=1e-5)
    assert check(model, written, domain).proof.status == "proved"


def test_a_shape_constant_read_only_inside_a_subgraph_is_kept():
    """The clean-up after folding drops only shape nodes nothing reads, an If/Loop body's reads
    included."""
    from onnx_exact.io.shape_folding import _drop_unread_shape_nodes

    body = helper.make_graph(
        [helper.make_node("Identity", ["outer"], ["inner"])],
        "body",
        [],
        [helper.make_tensor_value_info("inner", TensorProto.INT64, [1])],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["outer"], value=numpy_helper.from_array(np.ones(1, np.int64))
            ),
            helper.make_node(
                "Constant", [], ["unread"], value=numpy_helper.from_array(np.ones(1, np.int64))
            ),
            helper.make_node("If", ["cond"], ["picked"], then_branch=body, else_branch=body),
        ],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("picked", TensorProto.INT64, [1])],
    )
    _drop_unread_shape_nodes(graph)
    assert [n.output[0] for n in graph.node] == ["outer", "picked"]
