"""The structured linear operators of ``core/operators.py`` against onnxruntime and their algebra.

onnxruntime's CPU Conv and AveragePool kernels are float32 only, so the reference runs on float32
inputs and weights (exact in float64) and agrees with the float64 operator to float32 round-off.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_exact.core import operators
from onnx_exact.core.operators import (
    AveragePoolOperator,
    ConvOperator,
    DenseOperator,
    IndexOperator,
    PadOperator,
    ReshapeOperator,
    TransposeOperator,
    resolve_auto_pad,
)

RNG_SEED = 7


def run_node(op_type, x, initializers=(), inputs=None, opset=19, **attrs) -> np.ndarray:
    """onnxruntime's output of one ``op_type`` node on a batch ``x`` (initializers by name)."""
    dtype = TensorProto.DOUBLE if x.dtype == np.float64 else TensorProto.FLOAT
    names = inputs if inputs is not None else ["x", *(name for name, _ in initializers)]
    graph = helper.make_graph(
        [helper.make_node(op_type, names, ["y"], **attrs)],
        "g",
        [helper.make_tensor_value_info("x", dtype, list(x.shape))],
        [helper.make_tensor_value_info("y", dtype, None)],
        [numpy_helper.from_array(value, name) for name, value in initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def f32(rng, *shape) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


# (C_in, C_out, spatial, kernel, pads, strides, dilations, groups, bias)
CONV_CASES = {
    "plain_3x3_pad1": (3, 4, (5, 5), (3, 3), (1, 1, 1, 1), (1, 1), (1, 1), 1, True),
    "asym_pads_stride2": (3, 5, (7, 6), (3, 3), (0, 1, 2, 0), (2, 2), (1, 1), 1, True),
    "dilation2_stride21": (2, 3, (8, 7), (3, 2), (1, 0, 2, 1), (2, 1), (2, 2), 1, False),
    "groups2": (4, 6, (6, 6), (3, 3), (1, 1, 0, 0), (1, 2), (1, 1), 2, True),
    "depthwise": (4, 4, (5, 6), (3, 3), (1, 1, 1, 1), (1, 1), (1, 1), 4, True),
    "depthwise_x2_stride2": (3, 6, (7, 7), (3, 3), (1, 1, 1, 1), (2, 2), (1, 1), 3, True),
    "conv1d": (2, 3, (11,), (3,), (2, 1), (2,), (2,), 1, True),
    "conv1d_groups": (4, 2, (9,), (2,), (0, 1), (1,), (3,), 2, False),
    "conv3d": (2, 2, (3, 4, 4), (2, 2, 2), (0, 1, 1, 1, 0, 0), (1, 2, 1), (1, 1, 1), 1, True),
    "kernel_1x1": (5, 3, (4, 4), (1, 1), (0, 0, 0, 0), (1, 1), (1, 1), 1, True),
}


def make_conv(case, rng):
    c_in, c_out, spatial, kernel, pads, strides, dilations, groups, has_bias = CONV_CASES[case]
    weight = f32(rng, c_out, c_in // groups, *kernel) / np.float32(np.sqrt(c_in * 4))
    bias = f32(rng, c_out) if has_bias else None
    op = ConvOperator(weight, bias, spatial, pads, strides, dilations, groups)
    return op, weight, bias


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_forward_equals_onnxruntime(case):
    rng = np.random.default_rng(RNG_SEED)
    op, weight, bias = make_conv(case, rng)
    c_in, _, spatial, kernel, pads, strides, dilations, groups, _ = CONV_CASES[case]
    x = f32(rng, 3, c_in, *spatial)
    inits = [("w", weight)] + ([("b", bias)] if bias is not None else [])
    expected = run_node(
        "Conv",
        x,
        inits,
        kernel_shape=list(kernel),
        pads=list(pads),
        strides=list(strides),
        dilations=list(dilations),
        group=groups,
    )
    assert op.output_shape == expected.shape[1:]
    got = op.forward(x.reshape(3, -1).astype(np.float64))
    np.testing.assert_allclose(got, expected.reshape(3, -1), rtol=0, atol=2e-5)


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_dense_adjoint_and_abs(case):
    rng = np.random.default_rng(RNG_SEED + 1)
    op, _, _ = make_conv(case, rng)
    matrix = op.dense()
    assert matrix.shape == (op.n_out, op.n_in)
    x = rng.normal(size=(4, op.n_in))
    np.testing.assert_allclose(op.forward(x), x @ matrix.T + op.bias, rtol=1e-12, atol=1e-12)
    # The adjoint of every output row is the matrix's row: transpose is exactly linear's adjoint.
    np.testing.assert_allclose(op.transpose(np.eye(op.n_out)), matrix, rtol=0, atol=1e-15)
    y = rng.normal(size=(4, op.n_out))
    lhs = np.sum(op.linear(x) * y, axis=1)
    rhs = np.sum(x * op.transpose(y), axis=1)
    scale = np.sum(np.abs(matrix) @ np.abs(x).T * np.abs(y).T, axis=0)
    assert np.all(np.abs(lhs - rhs) <= 1e-9 * scale)
    np.testing.assert_array_equal(op.abs().dense(), np.abs(matrix))
    assert not np.any(op.abs().bias)


def channel_columns(shape, channels) -> np.ndarray:
    """Flat indices of the given channels of a ``(C, *S)`` tensor (C order)."""
    per = math.prod(shape[1:])
    return (np.asarray(channels)[:, None] * per + np.arange(per)).reshape(-1)


@pytest.mark.parametrize(
    ("case", "inputs", "outputs"),
    [
        ("plain_3x3_pad1", None, [0, 2, 3]),
        ("plain_3x3_pad1", [1, 2], None),
        ("asym_pads_stride2", [0, 2], [1, 4]),
        ("groups2", [0, 3], None),  # one input channel of each group
        ("groups2", None, [1, 2, 3, 4]),  # two output channels of each group
        ("depthwise", [0, 2, 3], [0, 2, 3]),  # whole depthwise channels go
        ("depthwise_x2_stride2", [1], [2, 3]),  # one group of input 1 and its two outputs
        ("conv1d", [1], [0, 2]),
    ],
)
def test_conv_select_equals_sliced_dense(case, inputs, outputs):
    op, _, _ = make_conv(case, np.random.default_rng(RNG_SEED + 2))
    small = op.select(inputs=inputs, outputs=outputs)
    rows = np.arange(op.n_out) if outputs is None else channel_columns(op.output_shape, outputs)
    cols = np.arange(op.n_in) if inputs is None else channel_columns(op.input_shape, inputs)
    np.testing.assert_array_equal(small.dense(), op.dense()[np.ix_(rows, cols)])
    np.testing.assert_array_equal(small.bias, op.bias[rows])
    if inputs is None:
        np.testing.assert_array_equal(op.select_outputs(outputs).dense(), small.dense())
    if outputs is None:
        np.testing.assert_array_equal(op.select_inputs(inputs).dense(), small.dense())


@pytest.mark.parametrize(
    ("case", "inputs", "outputs"),
    [
        ("groups2", [0, 1, 2], None),  # 2 inputs left in group 0, 1 in group 1
        ("groups2", None, [0, 1, 3]),
        ("depthwise", [0, 1], None),  # channels 2 and 3 would keep outputs without inputs
        ("depthwise", None, [0]),  # channels 1-3 would keep unused inputs
    ],
)
def test_conv_select_refuses_unequal_groups(case, inputs, outputs):
    op, _, _ = make_conv(case, np.random.default_rng(RNG_SEED))
    with pytest.raises(ValueError, match="select"):
        op.select(inputs=inputs, outputs=outputs)


def test_conv_rejects_groups_that_do_not_divide_and_kernels_that_do_not_fit():
    with pytest.raises(ValueError, match="group"):
        ConvOperator(np.ones((5, 1, 3, 3)), None, (6, 6), groups=2)
    with pytest.raises(ValueError, match="kernel spans"):
        ConvOperator(np.ones((2, 1, 5, 5)), None, (3, 3), dilations=(1, 1))


def test_macs_and_params_match_hand_counts():
    plain = ConvOperator(np.ones((4, 3, 3, 3)), np.ones(4), (5, 5), pads=(1, 1, 1, 1))
    assert plain.output_shape == (4, 5, 5)
    assert plain.macs == 25 * 4 * 3 * 9 and plain.params == 4 * 3 * 9 + 4
    grouped = ConvOperator(np.ones((6, 2, 3, 3)), None, (6, 6), groups=2)
    assert grouped.output_shape == (6, 4, 4)
    assert grouped.macs == 16 * 6 * 2 * 9 and grouped.params == 6 * 2 * 9
    depthwise = ConvOperator(
        np.ones((8, 1, 3, 3)), np.ones(8), (8, 8), (1, 1, 1, 1), (2, 2), None, 8
    )
    assert depthwise.output_shape == (8, 4, 4) and depthwise.macs == 16 * 8 * 9
    conv1d = ConvOperator(np.ones((3, 2, 5)), None, (20,), strides=(3,))
    assert conv1d.output_shape == (3, 6) and conv1d.macs == 6 * 3 * 2 * 5
    dense = DenseOperator(np.ones((10, 20)), np.zeros(10))
    assert dense.macs == 200 and dense.params == 210
    assert DenseOperator(np.ones((10, 20))).params == 200
    assert AveragePoolOperator((3, 4, 4), (2, 2), strides=(2, 2)).macs == 0


def test_dense_operator_algebra_and_select():
    rng = np.random.default_rng(RNG_SEED)
    weight, bias = rng.normal(size=(5, 7)), rng.normal(size=5)
    op = DenseOperator(weight, bias)
    x = rng.normal(size=(3, 7))
    np.testing.assert_allclose(op.forward(x), x @ weight.T + bias, rtol=1e-14)
    l = rng.normal(size=(2, 5))  # noqa: E741
    np.testing.assert_allclose(op.transpose(l), l @ weight, rtol=1e-14)
    np.testing.assert_array_equal(op.abs().dense(), np.abs(weight))
    np.testing.assert_array_equal(op.select_outputs([4, 1]).dense(), weight[[1, 4]])
    np.testing.assert_array_equal(op.select_outputs([4, 1]).bias, bias[[1, 4]])
    mask = np.array([True, False, True, True, False, False, True])
    np.testing.assert_array_equal(op.select_inputs(mask).dense(), weight[:, mask])
    with pytest.raises(ValueError, match=r"\(m, 7\)"):
        op.forward(np.ones((2, 6)))


# (C, spatial, kernel, pads, strides, count_include_pad, ceil_mode, dilations)
POOL_CASES = {
    "k2s2": (3, (6, 6), (2, 2), (0, 0, 0, 0), (2, 2), 0, 0, None),
    "k3_pad1_exclude": (2, (5, 5), (3, 3), (1, 1, 1, 1), (1, 1), 0, 0, None),
    "k3_pad1_include": (2, (5, 5), (3, 3), (1, 1, 1, 1), (1, 1), 1, 0, None),
    "asym_pads_stride2": (2, (7, 6), (3, 2), (0, 1, 2, 0), (2, 2), 0, 0, None),
    "pool1d_include": (3, (10,), (4,), (1, 2), (3,), 1, 0, None),
    "ceil_exclude": (2, (7, 8), (3, 3), (0, 0, 0, 0), (2, 3), 0, 1, None),
    "ceil_include_pads": (2, (6, 7), (3, 2), (1, 0, 1, 1), (2, 2), 1, 1, None),
    "ceil_1d_last_window_dropped": (1, (5,), (2,), (1, 1), (2,), 1, 1, None),
    "dilation2": (2, (7, 7), (2, 3), (1, 1, 0, 1), (1, 2), 0, 0, (2, 2)),
}


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_average_pool_equals_onnxruntime_and_is_consistent(case):
    channels, spatial, kernel, pads, strides, include, ceil, dilations = POOL_CASES[case]
    rng = np.random.default_rng(RNG_SEED)
    x = f32(rng, 2, channels, *spatial)
    attrs = {"dilations": list(dilations)} if dilations else {}
    expected = run_node(
        "AveragePool", x, kernel_shape=list(kernel), pads=list(pads), strides=list(strides),
        count_include_pad=include, ceil_mode=ceil, **attrs,
    )  # fmt: skip
    op = AveragePoolOperator(
        (channels, *spatial), kernel, pads, strides, dilations, bool(include), bool(ceil)
    )
    assert op.output_shape == expected.shape[1:]
    got = op.forward(x.reshape(2, -1).astype(np.float64))
    np.testing.assert_allclose(got, expected.reshape(2, -1), rtol=0, atol=1e-6)
    matrix = op.dense()
    np.testing.assert_allclose(op.transpose(np.eye(op.n_out)), matrix, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(op.abs().dense(), np.abs(matrix))
    kept = op.select_channels([channels - 1])
    rows = channel_columns(op.output_shape, [channels - 1])
    cols = channel_columns(op.input_shape, [channels - 1])
    np.testing.assert_array_equal(kept.dense(), matrix[np.ix_(rows, cols)])


def test_global_average_pool_equals_onnxruntime():
    rng = np.random.default_rng(RNG_SEED)
    x = f32(rng, 2, 4, 3, 5)
    expected = run_node("GlobalAveragePool", x)
    op = AveragePoolOperator.global_pool((4, 3, 5))
    assert op.output_shape == (4, 1, 1)
    np.testing.assert_allclose(op.forward(x.reshape(2, -1)), expected.reshape(2, -1), atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "pads", "value"),
    [
        ((2, 4, 5), (0, 1, 0, 0, 2, 1), 0.0),
        ((2, 4, 5), (1, 0, 2, 0, 1, 0), 0.5),  # the channel axis too
        ((3, 6), (0, -1, 0, 2), -1.25),  # negative pads crop
        ((2, 5), (0, 2, 1, -3), 0.0),
    ],
)
def test_pad_equals_onnxruntime(shape, pads, value):
    rng = np.random.default_rng(RNG_SEED)
    x = rng.normal(size=(3, *shape))
    rank = len(shape)
    onnx_pads = np.array([0, *pads[:rank], 0, *pads[rank:]], dtype=np.int64)
    expected = run_node(
        "Pad",
        x,
        [("p", onnx_pads), ("v", np.array(value))],
        inputs=["x", "p", "v"],
        mode="constant",
    )
    op = PadOperator(shape, pads, value)
    assert op.output_shape == expected.shape[1:]
    np.testing.assert_array_equal(op.forward(x.reshape(3, -1)), expected.reshape(3, -1))
    matrix = op.dense()
    np.testing.assert_array_equal(op.transpose(np.eye(op.n_out)), matrix)
    np.testing.assert_array_equal(op.abs().forward(x.reshape(3, -1)), x.reshape(3, -1) @ matrix.T)


def test_transpose_and_reshape_are_flat_permutations():
    rng = np.random.default_rng(RNG_SEED)
    x = rng.normal(size=(2, 4, 5, 3))  # NHWC samples
    op = TransposeOperator((4, 5, 3), (2, 0, 1))  # model perm (0, 3, 1, 2): NHWC -> NCHW
    assert op.output_shape == (3, 4, 5)
    expected = x.transpose(0, 3, 1, 2).reshape(2, -1)
    np.testing.assert_array_equal(op.forward(x.reshape(2, -1)), expected)
    y = rng.normal(size=(2, op.n_out))
    np.testing.assert_array_equal(
        op.transpose(y), y.reshape(2, 3, 4, 5).transpose(0, 2, 3, 1).reshape(2, -1)
    )
    flat = ReshapeOperator((3, 4, 5), (60,))
    np.testing.assert_array_equal(flat.forward(expected), expected)
    np.testing.assert_array_equal(flat.dense(), np.eye(60))
    with pytest.raises(ValueError):
        ReshapeOperator((3, 4), (13,))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize(
    ("spatial", "kernel", "strides", "dilations"),
    [((7, 8), (3, 2), (2, 2), (1, 1)), ((6, 5), (3, 3), (1, 2), (1, 1)), ((9,), (4,), (3,), (1,))],
)
def test_auto_pad_resolves_like_onnxruntime(auto_pad, spatial, kernel, strides, dilations):
    rng = np.random.default_rng(RNG_SEED)
    weight = f32(rng, 3, 2, *kernel)
    x = f32(rng, 2, 2, *spatial)
    expected = run_node(
        "Conv", x, [("w", weight)], auto_pad=auto_pad, kernel_shape=list(kernel),
        strides=list(strides), dilations=list(dilations),
    )  # fmt: skip
    pads = resolve_auto_pad(auto_pad, spatial, kernel, strides, dilations)
    op = ConvOperator(weight, None, spatial, pads, strides, dilations)
    assert op.output_shape == expected.shape[1:]
    np.testing.assert_allclose(op.forward(x.reshape(2, -1)), expected.reshape(2, -1), atol=2e-5)
    if auto_pad != "VALID":
        assert op.output_shape[1:] == tuple(
            -(-s // t) for s, t in zip(spatial, strides, strict=True)
        )
    ones = (1,) * 2 * len(spatial)
    assert resolve_auto_pad("NOTSET", spatial, kernel, strides, dilations, ones) == ones
    with pytest.raises(ValueError, match="auto_pad"):
        resolve_auto_pad("SAME", spatial, kernel, strides, dilations)


@pytest.mark.parametrize("case", ["plain_3x3_pad1", "depthwise", "conv1d_groups"])
def test_scale_outputs_folds_a_per_channel_affine_map(case):
    rng = np.random.default_rng(RNG_SEED)
    op, _, _ = make_conv(case, rng)
    channels = op.output_shape[0]
    scale, shift = rng.normal(size=channels), rng.normal(size=channels)
    folded = op.scale_outputs(scale, shift)
    per = op.n_out // channels
    np.testing.assert_allclose(folded.dense(), np.repeat(scale, per)[:, None] * op.dense())
    np.testing.assert_allclose(folded.bias, np.repeat(scale, per) * op.bias + np.repeat(shift, per))
    dense = DenseOperator(rng.normal(size=(4, 3)))
    scaled = dense.scale_outputs(scale[:1].repeat(4), shift[:1].repeat(4))
    np.testing.assert_allclose(scaled.dense(), scale[0] * dense.dense())
    np.testing.assert_allclose(scaled.bias, np.full(4, shift[0]))


SHARED_CNNS = ("oval21_base", "oval21_wide", "marabou_cifar10_medium", "resnet_4b")


@pytest.mark.parametrize("name", SHARED_CNNS)
def test_every_conv_of_the_shared_cnns_matches_onnxruntime(shared_models, name):
    """The exporters' real Conv attributes (torch, tf2onnx) and layer sizes, node by node."""
    path = shared_models / "cnn" / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path.name} is absent")
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    infos = list(model.graph.value_info) + list(model.graph.input)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in infos}
    rng = np.random.default_rng(RNG_SEED)
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert convs
    for node in convs:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = weights[node.input[1]]
        bias = weights[node.input[2]] if len(node.input) > 2 else None
        spatial = shapes[node.input[0]][2:]
        pads = resolve_auto_pad(
            attrs.get("auto_pad", b"NOTSET").decode(), spatial, kernel.shape[2:],
            attrs.get("strides", [1] * len(spatial)), attrs.get("dilations", [1] * len(spatial)),
            attrs.get("pads"),
        )  # fmt: skip
        op = ConvOperator(
            kernel, bias, spatial, pads, attrs.get("strides"), attrs.get("dilations"),
            attrs.get("group", 1),
        )  # fmt: skip
        x = rng.random((2, *op.input_shape), dtype=np.float32)
        inits = [("w", kernel)] + ([("b", bias)] if bias is not None else [])
        expected = run_node("Conv", x, inits, opset=13, **attrs)
        assert op.output_shape == expected.shape[1:], node.name
        scale = float(np.max(np.abs(expected))) + 1.0
        got = op.forward(x.reshape(2, -1).astype(np.float64))
        np.testing.assert_allclose(got, expected.reshape(2, -1), rtol=0, atol=1e-5 * scale)
        y = rng.normal(size=(3, op.n_out))
        lhs = np.sum(op.linear(x.reshape(2, -1)[:1].astype(np.float64)) * y, axis=1)
        rhs = np.sum(x.reshape(2, -1)[:1].astype(np.float64) * op.transpose(y), axis=1)
        assert np.allclose(lhs, rhs, rtol=1e-9, atol=1e-9 * np.abs(lhs).max()), node.name


def test_conv_in_blocks_of_samples_equals_one_block(monkeypatch):
    op, _, _ = make_conv("groups2", np.random.default_rng(RNG_SEED))
    x = np.random.default_rng(1).normal(size=(7, op.n_in))
    whole = op.forward(x)
    monkeypatch.setattr(operators, "IM2COL_ELEMENTS", 1)  # one sample per block
    np.testing.assert_array_equal(op.forward(x), whole)


def test_index_operator_refuses_an_input_feeding_two_outputs():
    with pytest.raises(ValueError, match="distinct"):
        IndexOperator((3,), (3,), np.array([0, 0, 2]))
    with pytest.raises(ValueError, match="distinct"):
        IndexOperator((3,), (2,), np.array([0, 3]))
