"""Structured pruning of proved-dead channels in the ONNX graph (``io/channel_pruning.py``).

The fixtures plant channels dead on their box (their biases clear the interval bounds by a wide
margin), so deleting them must leave the outputs unchanged on every box input: the kept values
are computed by the same ops from the same weights. Removing a channel that is *not* dead must
change them (the comparison can fail). The keep cases say why they keep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cnn_fixtures import SEQUENTIAL, VALID_BUILDERS, run_onnxruntime
from exporter_fixtures import GraphBuilder
from onnx import numpy_helper

from onnx_exact.core.operators import ConvOperator
from onnx_exact.io.channel_pruning import prune_channels

MODELS = Path(__file__).resolve().parents[1] / "models"


def box_samples(lower: np.ndarray, upper: np.ndarray, count: int = 200, seed: int = 0):
    """Uniform points and random corners of the box."""
    rng = np.random.default_rng(seed)
    uniform = lower + (upper - lower) * rng.random((count, lower.size))
    corners = np.where(rng.random((count // 4, lower.size)) < 0.5, lower, upper)
    return np.vstack([uniform, corners])


def params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def planted(fixture, kind: str = "dead") -> dict[str, list[int]]:
    return {
        relu: [c for c, k in channels.items() if k == kind]
        for relu, channels in fixture.planted.items()
        if any(k == kind for k in channels.values())
    }


def run(model: onnx.ModelProto, x: np.ndarray, input_shape) -> np.ndarray:
    """onnxruntime's outputs, one sample per run when the model fixes the batch at 1."""
    if model.graph.input[0].type.tensor_type.shape.dim[0].dim_value != 1:
        return run_onnxruntime(model, x, input_shape)
    return np.vstack([run_onnxruntime(model, row[None], input_shape) for row in x])


def assert_same_outputs(original, pruned, lower, upper, input_shape, count=200) -> None:
    onnx.checker.check_model(pruned, full_check=True)
    x = box_samples(lower, upper, count)
    expected = run(original, x, input_shape)
    got = run(pruned, x, input_shape)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_planted_dead_channels_are_removed_and_outputs_stay(name):
    fixture = VALID_BUILDERS[name]()
    dead = planted(fixture)
    before = onnx.ModelProto()
    before.CopyFrom(fixture.model)
    result = prune_channels(fixture.model, dead)
    assert fixture.model == before  # the input model is not modified
    assert result.removed == dead and result.kept == {}
    assert params(result.model) < params(fixture.model)
    dtypes = {t.name: t.data_type for t in fixture.model.graph.initializer}
    for tensor in result.model.graph.initializer:
        assert tensor.data_type == dtypes.get(tensor.name, tensor.data_type)
    assert_same_outputs(
        fixture.model, result.model, fixture.lower, fixture.upper, fixture.input_shape
    )


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_the_pruned_model_declares_no_stale_shapes(name):
    """The dynamo exporter declares the shape of every initializer and intermediate tensor in
    ``value_info``; after pruning, every declared shape must agree with the tensors (strict
    shape inference: what TensorRT's parser and onnxsim's MAC count rely on)."""
    fixture = VALID_BUILDERS[name]()
    declared = onnx.shape_inference.infer_shapes(fixture.model)
    graph = declared.graph
    graph.value_info.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in graph.initializer
    )
    result = prune_channels(declared, planted(fixture))
    assert result.removed
    onnx.shape_inference.infer_shapes(result.model, strict_mode=True)
    assert_same_outputs(
        fixture.model, result.model, fixture.lower, fixture.upper, fixture.input_shape
    )


def first_conv_weight(model: onnx.ModelProto) -> np.ndarray:
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    return initializer(model, conv.input[1])


def test_torch_legacy_shapes_shrink_per_channel():
    """Channel 0 of relu1 goes from conv1's filters (axis 0) and bias and conv2's inputs (axis 1);
    channel 2 of relu2 from conv2's filters and the Gemm's 16 columns behind the Flatten."""
    fixture = VALID_BUILDERS["torch_legacy_plain"]()
    result = prune_channels(fixture.model, {"relu1": [0], "relu2": [2]})
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    original = [n for n in fixture.model.graph.node if n.op_type == "Conv"]
    w1, w2 = (initializer(result.model, c.input[1]) for c in convs)
    o1, o2 = (initializer(fixture.model, c.input[1]) for c in original)
    assert w1.shape == (3, 2, 3, 3) and np.array_equal(w1, o1[1:])
    assert initializer(result.model, convs[0].input[2]).shape == (3,)
    assert w2.shape == (5, 3, 3, 3) and np.array_equal(w2, np.delete(o2[:, 1:], 2, axis=0))
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    old = initializer(fixture.model, gemm.input[1])
    new = initializer(result.model, gemm.input[1])
    assert np.array_equal(new, np.delete(old, np.arange(2 * 16, 3 * 16), axis=1))


def test_tf2onnx_nhwc_columns_have_stride_c_and_the_reshape_target_follows():
    """Behind Transpose(0, 2, 3, 1) + Reshape, channel c of 6 is every 6th MatMul row; the
    Reshape target ``[-1, 96]`` becomes ``[-1, 64]``."""
    fixture = VALID_BUILDERS["tf2onnx_nhwc"]()
    result = prune_channels(fixture.model, {"Relu_1": [1, 5]})
    reshape = next(n for n in result.model.graph.node if n.op_type == "Reshape")
    assert initializer(result.model, reshape.input[1]).tolist() == [-1, 64]
    matmul = next(n for n in fixture.model.graph.node if n.op_type == "MatMul")
    old = initializer(fixture.model, matmul.input[1])
    new = initializer(result.model, matmul.input[1])
    rows = [r for r in range(96) if r % 6 not in (1, 5)]
    assert np.array_equal(new, old[rows])
    assert_same_outputs(
        fixture.model, result.model, fixture.lower, fixture.upper, fixture.input_shape
    )


def test_removing_a_channel_that_is_not_dead_changes_the_outputs():
    """The planted always-active channel is no zero: deleting it must show in the outputs."""
    fixture = VALID_BUILDERS["torch_legacy_plain"]()
    result = prune_channels(fixture.model, planted(fixture, "active"))
    assert result.removed == {"relu1": [1]}
    x = box_samples(fixture.lower, fixture.upper)
    expected = run_onnxruntime(fixture.model, x, fixture.input_shape)
    got = run_onnxruntime(result.model, x, fixture.input_shape)
    assert np.abs(got - expected).max() > 1e-3


def test_residual_stream_channels_go_only_when_dead_in_every_relu_of_the_stream():
    """relu_a feeds the skip Add that computes relu_out: channel 3, dead in both, goes from both
    (and from the Conv feeding the Add); dead in relu_a only, it keeps, saying why."""
    fixture = VALID_BUILDERS["residual_block"]()
    result = prune_channels(fixture.model, planted(fixture))
    assert result.removed == {"relu_b": [1], "relu_a": [3], "relu_out": [3]}
    assert not result.kept
    assert_same_outputs(
        fixture.model, result.model, fixture.lower, fixture.upper, fixture.input_shape
    )
    partial = prune_channels(fixture.model, {"relu_a": [3]})
    assert not partial.removed
    assert "not proved dead in every Relu of its residual stream" in partial.kept["relu_a"]


def small_cnn(
    pad_value: float | None = None,
    fan_out: bool = False,
    shared: bool = False,
    half=False,
    after: str | None = None,
):
    """``Conv(2→4, 3×3) → Relu → [Pad(1, value)] → Conv(4→3) → Relu → GlobalAveragePool →
    Flatten → Gemm`` on ``[batch, 2, 6, 6]`` over [0, 1]; channel 1 of ``relu`` is dead (bias
    −100 against weights below 0.5). ``fan_out`` also outputs the first Conv's result;
    ``shared`` makes both Convs read one bias initializer; ``half`` stores the first Conv's
    weight in float16 behind a ``Cast`` to float32 (mixed-precision exporters); ``after`` puts
    a ``Mul``/``Add``/``Div`` by a per-channel constant ``(4, 1, 1)`` after the Relu."""
    rng = np.random.default_rng(7)
    g = GraphBuilder()
    w1 = (rng.random((4, 2, 3, 3)) * 0.5).astype(np.float32)
    b1 = np.array([0.1, -100.0, 0.2, -0.3], np.float32)
    bias = g.const(b1)
    weight = g.const(w1)
    if half:
        weight = g.node("Cast", [g.const(w1, dtype=np.float16)], to=onnx.TensorProto.FLOAT)
    h1 = g.node("Conv", ["input", weight, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = g.node("Relu", [h1], name="relu")
    if after is not None:
        h = g.node(after, [h, g.const(np.array([0.5, 2.0, 1.5, 3.0]).reshape(4, 1, 1))])
    if pad_value is not None:
        pads = g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]), dtype=np.int64)
        h = g.node("Pad", [h, pads, g.const(np.float32(pad_value))], mode="constant")
    w2 = rng.normal(size=(4 if shared else 3, 4, 3, 3)).astype(np.float32)
    h = g.node(
        "Conv", [h, g.const(w2), bias if shared else g.const(np.zeros(3))], kernel_shape=[3, 3]
    )
    h = g.node("Relu", [h], name="relu2")
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    g.node("Gemm", [h, g.const(rng.normal(size=(2, w2.shape[0])))], output="output", transB=1)
    outputs = [g.tensor("output", ["batch", 2])]
    if fan_out:
        outputs.append(g.tensor(h1, ["batch", 4, 6, 6]))
    return g.model([g.tensor("input", ["batch", 2, 6, 6])], outputs)


def test_zero_pad_passes_and_a_nonzero_pad_keeps():
    lower, upper = np.zeros(72), np.ones(72)
    model = small_cnn(pad_value=0.0)
    result = prune_channels(model, {"relu": [1]})
    assert result.removed == {"relu": [1]} and not result.kept
    assert_same_outputs(model, result.model, lower, upper, (2, 6, 6))
    model = small_cnn(pad_value=1.0)
    result = prune_channels(model, {"relu": [1]})
    assert result.removed == {} and "not 0" in result.kept["relu"]
    assert result.model == model


def test_fan_out_and_shared_initializers_keep():
    result = prune_channels(small_cnn(fan_out=True), {"relu": [1]})
    assert result.removed == {} and "graph output" in result.kept["relu"]
    result = prune_channels(small_cnn(shared=True), {"relu": [1]})
    assert result.removed == {} and "shared" in result.kept["relu"]


def test_all_dead_channels_keep_one():
    model = small_cnn()
    result = prune_channels(model, {"relu": [0, 1, 2, 3]})
    assert result.removed == {"relu": [1, 2, 3]} and "channel 0 stays" in result.kept["relu"]
    onnx.checker.check_model(result.model, full_check=True)


def test_bad_names_and_channels_are_programming_errors():
    model = small_cnn()
    with pytest.raises(ValueError, match="no Relu"):
        prune_channels(model, {"nope": [0]})
    with pytest.raises(ValueError, match="out of range"):
        prune_channels(model, {"relu": [9]})


def linear_relu_model(relu_is_output: bool):
    """``Gemm → Relu → Gemm`` whose Relu is the identity on [0, 1]^3 (weights ≥ 0, bias 1)."""
    rng = np.random.default_rng(3)
    g = GraphBuilder()
    h = g.node("Gemm", ["input", g.const(rng.random((4, 3))), g.const(np.ones(4))], transB=1)
    output = "hidden" if relu_is_output else None
    h = g.node("Relu", [h], name="relu", output=output)
    g.node("Gemm", [h, g.const(rng.normal(size=(2, 4)))], output="output", transB=1)
    outputs = [g.tensor("output", ["batch", 2])]
    if relu_is_output:
        outputs.append(g.tensor("hidden", ["batch", 4]))
    return g.model([g.tensor("input", ["batch", 3])], outputs)


@pytest.mark.parametrize("relu_is_output", [False, True])
def test_linear_relu_is_removed(relu_is_output):
    model = linear_relu_model(relu_is_output)
    result = prune_channels(model, {}, linear=["relu"])
    assert result.removed_relus == ["relu"]
    assert all(n.op_type != "Relu" for n in result.model.graph.node)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, result.model, np.zeros(3), np.ones(3), (3,))


def test_mnist_cnn_first_conv_dead_channels_by_interval_bounds():
    """models/mnist_cnn_l1_2e-3.onnx: interval bounds of conv1 on [0, 1]^784 prove 8 of 16
    channels dead; deleting them leaves the logits unchanged and removes their weights."""
    model = onnx.load(MODELS / "mnist_cnn_l1_2e-3.onnx")
    conv = model.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    op = ConvOperator(
        initializer(model, conv.input[1]).astype(np.float64),
        initializer(model, conv.input[2]).astype(np.float64),
        (28, 28),
        attrs.get("pads"),
        attrs.get("strides"),
        attrs.get("dilations"),
    )
    lower, upper = np.zeros(784), np.ones(784)
    centre = op.forward(((lower + upper) / 2)[None])[0]
    radius = op.abs().linear(((upper - lower) / 2)[None])[0]
    high = (centre + radius).reshape(16, -1).max(axis=1)
    dead = np.flatnonzero(high < 0).tolist()
    assert len(dead) == 8
    relu = model.graph.node[1].name
    result = prune_channels(model, {relu: dead})
    assert result.removed == {relu: dead}
    assert first_conv_weight(result.model).shape[0] == 8
    assert params(model) - params(result.model) == 8 * (9 + 1) + 8 * 32 * 9
    assert_same_outputs(model, result.model, lower, upper, (1, 28, 28))


SHARED_CASES = {
    "oval21_base": {"Relu_1": [0, 5], "Relu_3": [3, 4, 15], "Relu_6": [7]},
    "oval21_wide": {"Relu_1": [2], "Relu_3": [0, 31]},
    "marabou_cifar10_medium": {
        "sequential_1/conv2d_2/Relu": [1, 9],
        "sequential_1/conv2d_3/Relu": [0, 17, 30],
        "sequential_1/dense_3/Relu": [5],
    },
    "resnet_4b": {"Relu_1": [4], "Relu_3": [2, 3], "Relu_7": [1], "Relu_23": [6]},
}
"""Channels killed (bias lowered by 1e6) in the shared CNNs; the residual ones must keep."""


def killed(model: onnx.ModelProto, dead: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of ``model`` where channels ``dead`` of each Relu are 0 on any [0, 1] input: the
    bias of their Conv/Gemm (or of the MatMul's Add) is lowered by 1e6."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    producer = {o: n for n in copy.graph.node for o in n.output}
    inits = {t.name: t for t in copy.graph.initializer}
    for relu, channels in dead.items():
        node = producer[node_named(copy, relu).input[0]]
        if node.op_type == "Add":  # MatMul + Add (tf2onnx) or a residual Add: lower one branch
            node = producer[node.input[0]] if node.input[1] not in inits else node
        bias_name = next(i for i in node.input[1:] if i in inits and len(inits[i].dims) == 1)
        bias = numpy_helper.to_array(inits[bias_name]).copy()
        bias[channels] -= 1e6
        inits[bias_name].CopyFrom(numpy_helper.from_array(bias, bias_name))
    return copy


@pytest.mark.parametrize("name", sorted(SHARED_CASES))
def test_shared_cnns_prune_killed_channels_exactly(shared_models, name):
    """Real exporter graphs (torch Flatten → Gemm, tf2onnx NHWC Transpose → Reshape → MatMul,
    a ResNet whose skip paths keep): pruned outputs equal the killed model's on its box."""
    folder = shared_models / "cnn"
    if not (folder / f"{name}.onnx").is_file():
        pytest.skip(f"{name} is absent")
    model = killed(onnx.load(folder / f"{name}.onnx"), SHARED_CASES[name])
    box = np.load(folder / f"{name}.box.npz")
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    result = prune_channels(model, SHARED_CASES[name])
    if name == "resnet_4b":
        assert result.removed == {"Relu_1": [4], "Relu_3": [2, 3]}
        assert set(result.kept) == {"Relu_7", "Relu_23"}
    else:
        assert result.removed == SHARED_CASES[name] and not result.kept
    assert params(result.model) < params(model)
    assert_same_outputs(model, result.model, box["lower"], box["upper"], shape, count=24)


def grouped_cnn(group: int, zero_bias: bool = False):
    """``Conv(2→4) → relu_a → Conv(4→4, group, 3×3) → relu_g → Conv 1×1 (4→3) → Relu → GAP →
    Flatten → Gemm`` on [0, 1]^(2×6×6). Dead by a −100 bias (|pre-activation| < 50 otherwise):
    relu_a channel 2; relu_g channels 0, 2 (group 4) or 2, 3 (group 2). ``zero_bias`` sets
    the grouped Conv's bias to 0 where relu_a's dead channel 2 is its input."""
    rng = np.random.default_rng(11)
    g = GraphBuilder()
    pads = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    w1 = (rng.random((4, 2, 3, 3)) * 0.5).astype(np.float32)
    h = g.node("Conv", ["input", g.const(w1), g.const([0.1, 0.2, -100, 0.3])], **pads)
    h = g.node("Relu", [h], name="relu_a")
    wg = (rng.random((4, 4 // group, 3, 3)) * 0.5).astype(np.float32)
    bg = [-100, 0.1, -100, 0.2] if group == 4 else [0.1, 0.2, -100, -100]
    if zero_bias:
        bg[2] = 0.0
    h = g.node("Conv", [h, g.const(wg), g.const(bg)], group=group, **pads)
    h = g.node("Relu", [h], name="relu_g")
    w3 = rng.normal(size=(3, 4, 1, 1)).astype(np.float32)
    h = g.node("Relu", [g.node("Conv", [h, g.const(w3)], kernel_shape=[1, 1])])
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    g.node("Gemm", [h, g.const(rng.normal(size=(2, 3)))], output="output", transB=1)
    return g.model([g.tensor("input", ["batch", 2, 6, 6])], [g.tensor("output", ["batch", 2])])


@pytest.mark.parametrize("group", [4, 2])
def test_grouped_conv_loses_whole_groups_and_their_input_channels(group):
    """A dead group's filters go with the input channels only it reads (whatever their values:
    relu_a's channel 0 is alive but unread once group 0 of the depthwise Conv is gone), and
    ``group`` shrinks; relu_a's dead channel 2 goes with them."""
    model = grouped_cnn(group)
    dead_g = [0, 2] if group == 4 else [2, 3]
    result = prune_channels(model, {"relu_a": [2], "relu_g": dead_g})
    assert result.removed == {"relu_a": [0, 2] if group == 4 else [2, 3], "relu_g": dead_g}
    assert result.kept == {}
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    weights = [initializer(result.model, c.input[1]).shape for c in convs]
    assert weights[:2] == [(2, 2, 3, 3), (2, 4 // group, 3, 3)] and weights[2] == (3, 2, 1, 1)
    group_attr = next(a.i for a in convs[1].attribute if a.name == "group")
    assert group_attr == group // 2
    assert_same_outputs(model, result.model, np.zeros(72), np.ones(72), (2, 6, 6))


def test_grouped_conv_keeps_part_of_a_group_and_its_dead_inputs():
    model = grouped_cnn(2)
    result = prune_channels(model, {"relu_a": [2], "relu_g": [3]})
    assert result.removed == {}
    assert "whole groups" in result.kept["relu_g"]
    assert "whole input groups" in result.kept["relu_a"]
    # depthwise group 2 outputs its bias -100, which relu_g maps to 0: the channel goes on both
    result = prune_channels(grouped_cnn(4), {"relu_a": [2]})
    assert result.removed == {"relu_a": [2], "relu_g": [2]} and not result.kept
    assert_same_outputs(grouped_cnn(4), result.model, np.zeros(72), np.ones(72), (2, 6, 6))


def test_a_float16_weight_behind_a_cast_is_cut_at_its_source():
    model = small_cnn(half=True)
    result = prune_channels(model, {"relu": [1]})
    assert result.removed == {"relu": [1]}
    cast = next(n for n in result.model.graph.node if n.op_type == "Cast")
    source = initializer(result.model, cast.input[0])
    assert source.dtype == np.float16 and source.shape == (3, 2, 3, 3)
    assert_same_outputs(model, result.model, np.zeros(72), np.ones(72), (2, 6, 6))


@pytest.mark.parametrize(
    "name, dead",
    [("torch_legacy_bn", {"relu2": [2]}), ("tf2onnx_nhwc", {"Relu_1": [1, 5]}),
     ("matlab_conv1d", {"relu_2": [0]})],
)  # fmt: skip
def test_value_info_of_edited_tensors_goes_and_the_rest_stays(name, dead):
    """Exporters often store every intermediate shape: an entry whose shape changed must go
    (the full check re-infers and compares), the entries before the edited layer stay."""
    fixture = VALID_BUILDERS[name]()
    model = onnx.shape_inference.infer_shapes(fixture.model)
    result = prune_channels(model, dead)
    assert result.removed == dead
    shapes = {v.name: v.type for v in model.graph.value_info}
    reinferred = onnx.shape_inference.infer_shapes(result.model)
    new_shapes = {v.name: v.type for v in reinferred.graph.value_info}
    changed = {n for n in shapes if new_shapes.get(n) != shapes[n]}
    kept = {v.name for v in result.model.graph.value_info}
    assert changed and not kept & changed
    assert kept == set(shapes) - changed
    assert_same_outputs(model, result.model, fixture.lower, fixture.upper, fixture.input_shape)


def nhwc_bias_after_transpose():
    """An older tf2onnx pattern: ``Transpose(0,3,1,2) → Conv (no bias) → Transpose(0,2,3,1) →
    Add(bias (C,)) → Relu`` in NHWC, then ``Transpose(0,3,1,2) → Conv → Relu → Flatten → Gemm
    (transB=0)``, on ``[n, 5, 5, 2]`` over [0, 1]. Channel 1 of ``relu_nhwc`` (last axis) is dead
    by a −100 bias; channel 0 of ``relu_2`` by a −100 bias too."""
    rng = np.random.default_rng(5)
    g = GraphBuilder()
    h = g.node("Transpose", ["input"], perm=[0, 3, 1, 2])
    w1 = (rng.random((3, 2, 3, 3)) * 0.5).astype(np.float32)
    h = g.node("Conv", [h, g.const(w1)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = g.node("Transpose", [h], perm=[0, 2, 3, 1])
    h = g.node("Add", [h, g.const([0.2, -100, 0.1])])
    h = g.node("Relu", [h], name="relu_nhwc")
    h = g.node("Transpose", [h], perm=[0, 3, 1, 2])
    w2 = (rng.random((2, 3, 3, 3)) * 0.5).astype(np.float32)
    h = g.node("Conv", [h, g.const(w2), g.const([-100, 0.3])], kernel_shape=[3, 3])
    h = g.node("Flatten", [g.node("Relu", [h], name="relu_2")], axis=1)
    g.node("Gemm", [h, g.const(rng.normal(size=(18, 2)))], output="output")
    return g.model([g.tensor("input", ["n", 5, 5, 2])], [g.tensor("output", ["n", 2])])


def test_a_transpose_between_conv_and_relu_moves_the_channel_axis():
    model = nhwc_bias_after_transpose()
    result = prune_channels(model, {"relu_nhwc": [1], "relu_2": [0]})
    assert result.removed == {"relu_nhwc": [1], "relu_2": [0]} and not result.kept
    add = next(n for n in result.model.graph.node if n.op_type == "Add")
    assert initializer(result.model, add.input[1]).tolist() == pytest.approx([0.2, 0.1])
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    assert initializer(result.model, gemm.input[1]).shape == (9, 2)  # transB=0: rows go
    assert_same_outputs(model, result.model, np.zeros(50), np.ones(50), (5, 5, 2))


def test_a_scale_after_the_relu_keeps_zeros_and_a_shift_makes_a_constant_the_conv_takes():
    lower, upper = np.zeros(72), np.ones(72)
    for op in ("Mul", "Div"):
        model = small_cnn(after=op)
        result = prune_channels(model, {"relu": [1]})
        assert result.removed == {"relu": [1]}
        scale = next(n for n in result.model.graph.node if n.op_type == op)
        assert initializer(result.model, scale.input[1]).ravel().tolist() == [0.5, 1.5, 3.0]
        assert_same_outputs(model, result.model, lower, upper, (2, 6, 6))
    model = small_cnn(after="Add")  # channel 1 becomes 2.0: the unpadded Conv's bias takes it
    result = prune_channels(model, {"relu": [1]})
    assert result.removed == {"relu": [1]} and not result.kept
    assert_same_outputs(model, result.model, lower, upper, (2, 6, 6))


def test_a_reshape_target_that_spells_the_channel_count_follows():
    """``Relu → Reshape([0, 4, -1]) → Flatten → Gemm``: the target becomes ``[0, 3, -1]``."""
    rng = np.random.default_rng(2)
    g = GraphBuilder()
    w1 = (rng.random((4, 2, 3, 3)) * 0.5).astype(np.float32)
    h = g.node("Conv", ["input", g.const(w1), g.const([0.1, -100, 0.2, 0.3])], kernel_shape=[3, 3])
    h = g.node("Relu", [h], name="relu")
    h = g.node("Reshape", [h, g.const(np.array([0, 4, -1]), dtype=np.int64)])
    h = g.node("Flatten", [h], axis=1)
    g.node("Gemm", [h, g.const(rng.normal(size=(2, 64)))], output="output", transB=1)
    model = g.model([g.tensor("input", ["n", 2, 6, 6])], [g.tensor("output", ["n", 2])])
    result = prune_channels(model, {"relu": [1]})
    assert result.removed == {"relu": [1]}
    reshape = next(n for n in result.model.graph.node if n.op_type == "Reshape")
    assert initializer(result.model, reshape.input[1]).tolist() == [0, 3, -1]
    assert_same_outputs(model, result.model, np.zeros(72), np.ones(72), (2, 6, 6))


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_an_opset_9_pad_reads_its_attributes(value):
    """Before opset 11, Pad's pads and value are attributes; a nameless Relu is named by its
    output tensor."""
    rng = np.random.default_rng(4)
    g = GraphBuilder()
    w1 = (rng.random((3, 1, 3, 3)) * 0.5).astype(np.float32)
    h = g.node("Conv", ["input", g.const(w1), g.const([0.1, -100, 0.2])], kernel_shape=[3, 3])
    h = g.node("Relu", [h], name="", output="relu_out")
    h = g.node("Pad", [h], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=value)
    h = g.node("Flatten", [g.node("Conv", [h, g.const(rng.normal(size=(2, 3, 3, 3)))],
                                  kernel_shape=[3, 3])], axis=1)  # fmt: skip
    weight, bias = g.const(rng.normal(size=(2, 32))), g.const(np.zeros(2))
    g.node("Gemm", [h, weight, bias], output="output", transB=1)
    model = g.model([g.tensor("input", ["n", 1, 6, 6])], [g.tensor("output", ["n", 2])], opset=9)
    result = prune_channels(model, {"relu_out": [1]})
    if value:
        assert result.removed == {} and "not 0" in result.kept["relu_out"]
        return
    assert result.removed == {"relu_out": [1]}
    assert_same_outputs(model, result.model, np.zeros(36), np.ones(36), (1, 6, 6))


@pytest.mark.parametrize("with_relu_g", [False, True])
def test_a_depthwise_conv_reading_a_dead_channel_without_bias_passes_zeros_on(with_relu_g):
    """Depthwise group 2 reads only relu_a's dead channel 2 and has bias 0: its output is 0, so
    the group goes and channel 2 of relu_g is dropped downstream as well; relu_g's own dead
    channel 2 (when asked) plans the same edits."""
    model = grouped_cnn(4, zero_bias=True)
    dead = {"relu_a": [2], "relu_g": [2]} if with_relu_g else {"relu_a": [2]}
    result = prune_channels(model, dead)
    assert result.removed == {"relu_a": [2], "relu_g": [2]} and not result.kept
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    shapes = [initializer(result.model, c.input[1]).shape for c in convs]
    assert shapes == [(3, 2, 3, 3), (3, 1, 3, 3), (3, 3, 1, 1)]
    assert next(a.i for a in convs[1].attribute if a.name == "group") == 3
    assert_same_outputs(model, result.model, np.zeros(72), np.ones(72), (2, 6, 6))


def random_cnn(seed: int):
    """A random sequential CNN on ``[n, 3, 8, 8]`` over [0, 1] and channels killed at random.

    Each block is Conv (kernel 1 or 3, random pads and stride, sometimes depthwise) → [BN] →
    Relu → [MaxPool | AveragePool | zero Pad | Dropout | Mul by a per-channel constant]; the head
    is Flatten → Gemm or (NHWC) Transpose → Reshape → MatMul → Add, then Relu → Gemm. A killed
    channel's bias (or BN shift) is −1e6, far below anything its inputs can reach; a depthwise
    block kills channels whose input channel is alive (its group goes, the input is released).
    """
    rng = np.random.default_rng(seed)
    g = GraphBuilder()
    h, channels, side, dead = "input", 3, 8, {}
    for block in range(int(rng.integers(1, 4))):
        depthwise = block > 0 and rng.random() < 0.3
        c_out = channels if depthwise else int(rng.integers(2, 6))
        k = int(rng.choice([1, 3])) if side >= 3 else 1
        pad = int(rng.integers(0, 2)) if k == 3 else 0
        stride = int(rng.choice([1, 2])) if side >= 4 else 1
        weight = rng.uniform(-0.5, 0.5, (c_out, 1 if depthwise else channels, k, k))
        killed = sorted(rng.choice(c_out, int(rng.integers(0, c_out)), replace=False).tolist())
        shift = np.where(np.isin(np.arange(c_out), killed), -1e6, rng.normal(0, 0.1, c_out))
        use_bn = rng.random() < 0.3
        bias = rng.normal(0, 0.1, c_out) if use_bn else shift
        attrs = {"kernel_shape": [k, k], "pads": [pad] * 4, "strides": [stride] * 2}
        if depthwise:
            attrs["group"] = channels
        h = g.node("Conv", [h, g.const(weight), g.const(bias)], **attrs)
        if use_bn:
            stats = [rng.uniform(0.5, 1.5, c_out), shift, rng.normal(0, 0.1, c_out)]
            stats.append(rng.uniform(0.5, 1.5, c_out))
            h = g.node("BatchNormalization", [h, *map(g.const, stats)])
        name = f"relu{block}"
        h = g.node("Relu", [h], name=name)
        if killed:
            dead[name] = killed
        side = (side + 2 * pad - k) // stride + 1
        after = rng.choice(["none", "maxpool", "avgpool", "pad", "dropout", "mul"])
        if after in ("maxpool", "avgpool") and side >= 2:
            op = "MaxPool" if after == "maxpool" else "AveragePool"
            h, side = g.node(op, [h], kernel_shape=[2, 2], strides=[2, 2]), side // 2
        elif after == "pad":
            pads = g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]), dtype=np.int64)
            h, side = g.node("Pad", [h, pads]), side + 2
        elif after == "dropout":
            h = g.node("Dropout", [h])
        elif after == "mul":
            h = g.node("Mul", [h, g.const(rng.uniform(0.5, 2.0, (c_out, 1, 1)))])
        channels = c_out
    width = channels * side * side
    hidden = int(rng.integers(2, 6))
    if rng.random() < 0.5:
        h = g.node("Flatten", [h], axis=1)
        h = g.node("Gemm", [h, g.const(rng.normal(size=(hidden, width))), g.const(np.zeros(hidden))],
                   transB=1)  # fmt: skip
    else:
        h = g.node("Transpose", [h], perm=[0, 2, 3, 1])
        h = g.node("Reshape", [h, g.const(np.array([-1, width]), dtype=np.int64)])
        h = g.node("MatMul", [h, g.const(rng.normal(size=(width, hidden)))])
        h = g.node("Add", [h, g.const(rng.normal(0, 0.1, hidden))])
    h = g.node("Relu", [h], name="relu_head")
    g.node("Gemm", [h, g.const(rng.normal(size=(2, hidden)))], output="output", transB=1)
    model = g.model([g.tensor("input", ["n", 3, 8, 8])], [g.tensor("output", ["n", 2])])
    return model, dead


@pytest.mark.parametrize("seed", range(12))
def test_random_sequential_cnns_prune_exactly(seed):
    """Whatever is removed, the outputs stay; removed channels are only those asked for (or
    released by a depthwise Conv), and every asked-for channel is either removed or kept with a
    reason."""
    model, dead = random_cnn(seed)
    result = prune_channels(model, dead)
    for name, channels in dead.items():
        removed = set(result.removed.get(name, []))
        assert set(channels) <= removed or name in result.kept
    assert_same_outputs(model, result.model, np.zeros(192), np.ones(192), (3, 8, 8), count=60)
