"""The CNN fixtures and the structured operators check each other.

Every valid fixture must pass ``onnx.checker`` (full check), run in onnxruntime, and agree there
with its numpy reference built from ``core/operators.py``, at the output and at the input of every
activation; its interval bounds must hold on samples of the box and prove each planted channel.
The bad fixtures must fail where they say they do.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cnn_fixtures import VALID_BUILDERS, bad_fixtures, run_onnxruntime

SAMPLES = 48


def box_points(fixture, seed: int = 0) -> np.ndarray:
    """Uniform samples, random corners and the centre of the fixture's box."""
    rng = np.random.default_rng(seed)
    lo, hi = fixture.lower, fixture.upper
    uniform = lo + (hi - lo) * rng.random((SAMPLES, lo.size))
    corners = np.where(rng.random((SAMPLES // 2, lo.size)) < 0.5, lo, hi)
    return np.vstack([uniform, corners, ((lo + hi) / 2)[None]])


def with_activation_inputs(model: onnx.ModelProto, names) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that also outputs the input tensor of each activation node ``names``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    by_name = {node.name: node for node in copy.graph.node}
    tensors = [by_name[name].input[0] for name in names]
    copy.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    return copy, tensors


@pytest.fixture(scope="module", params=sorted(VALID_BUILDERS))
def fixture(request):
    return VALID_BUILDERS[request.param]()


def test_fixture_is_valid_onnx_and_matches_its_operator_reference(fixture):
    onnx.checker.check_model(fixture.model, full_check=True)
    x = box_points(fixture)
    expected, pre = fixture.reference(x)
    got = run_onnxruntime(fixture.model, x, fixture.input_shape)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)

    names = sorted(pre)
    probe, tensors = with_activation_inputs(fixture.model, names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = x.astype(np.float32).reshape(x.shape[0], *fixture.input_shape)
    outputs = session.run(tensors, {session.get_inputs()[0].name: feed})
    for name, value in zip(names, outputs, strict=True):
        ours = pre[name]
        assert value.reshape(x.shape[0], -1).shape == ours.shape, name
        tol = 1e-5 * max(1.0, float(np.max(np.abs(ours))))
        np.testing.assert_allclose(value.reshape(x.shape[0], -1), ours, rtol=0, atol=tol)


def test_bounds_hold_on_the_box_and_prove_the_planted_channels(fixture):
    _, pre = fixture.reference(box_points(fixture, seed=1))
    assert set(fixture.bounds) == set(pre)
    for name, (lo, hi) in fixture.bounds.items():
        assert np.all(pre[name] >= lo - 1e-9) and np.all(pre[name] <= hi + 1e-9), name
    assert any("dead" in plants.values() for plants in fixture.planted.values())
    for name, plants in fixture.planted.items():
        lo, hi = fixture.bounds[name]
        channels = _channels(fixture, name)
        lo_c, hi_c = lo.reshape(channels, -1), hi.reshape(channels, -1)
        for channel, kind in plants.items():
            if kind == "dead":
                assert hi_c[channel].max() < -0.5, (name, channel)
            elif kind == "active":
                assert lo_c[channel].min() > 0.5, (name, channel)
            else:
                assert kind == "saturated" and lo_c[channel].min() > 6.5, (name, channel)


def _channels(fixture, name: str) -> int:
    """The channel count of the activation ``name``: the second dim of its input's shape."""
    inferred = onnx.shape_inference.infer_shapes(fixture.model)
    node = next(n for n in inferred.graph.node if n.name == name)
    info = {v.name: v for v in inferred.graph.value_info}[node.input[0]]
    return info.type.tensor_type.shape.dim[1].dim_value


@pytest.mark.parametrize("name", sorted(bad_fixtures()))
def test_bad_fixtures_fail_where_they_say(name):
    bad = bad_fixtures()[name]
    session = ort.InferenceSession(
        bad.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feed = np.full((1, *[d.dim_value or 6 for d in _input_dims(bad.model)]), 0.5, np.float32)
    if bad.fails_in == "onnxruntime":
        with pytest.raises(Exception, match="group"):
            session.run(None, {"input": feed})
    else:
        assert session.run(None, {"input": feed})[0].shape == (1, 2)
    if name == "dynamic_spatial":
        dims = _input_dims(bad.model)
        assert [d.dim_param for d in dims[1:]] == ["H", "W"]
        assert session.run(None, {"input": np.zeros((2, 3, 9, 7), np.float32)})[0].shape == (2, 2)
    if name == "runtime_weight":
        conv = next(node for node in bad.model.graph.node if node.op_type == "Conv")
        initializers = {tensor.name for tensor in bad.model.graph.initializer}
        assert conv.input[1] not in initializers


def _input_dims(model: onnx.ModelProto):
    return list(model.graph.input[0].type.tensor_type.shape.dim)[1:]


MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
CNN_MODELS = sorted(MODELS_DIR.glob("mnist_cnn_l1_*.onnx"))


def test_both_mnist_cnns_are_committed():
    assert [path.name for path in CNN_MODELS] == ["mnist_cnn_l1_0.onnx", "mnist_cnn_l1_2e-3.onnx"]


@pytest.mark.parametrize("path", CNN_MODELS, ids=lambda path: path.stem)
def test_mnist_cnn_is_small_valid_and_reproduced_by_the_operators(path):
    pytest.importorskip("torch")
    sys.path.insert(0, str(MODELS_DIR))
    import train

    assert path.stat().st_size < 1_000_000
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [node.op_type for node in model.graph.node] == [
        "Conv", "Relu", "Conv", "Relu", "Flatten", "Gemm", "Relu", "Gemm",
    ]  # fmt: skip
    meta = {prop.key: prop.value for prop in model.metadata_props}
    assert json.loads(meta["onnx_exact.domain.pixels"]) == {"lower": 0.0, "upper": 1.0}
    operators = train.cnn_operators(model)
    x = np.random.default_rng(0).random((16, 784))
    h = x
    for op in operators[:-1]:
        h = np.maximum(op.forward(h), 0.0)
    expected = operators[-1].forward(h)
    got = run_onnxruntime(model, x, (1, 28, 28))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.max(np.abs(expected)))
    assert 0.85 < float(meta["onnx_exact.train.heldout_accuracy"]) <= 1.0


def test_cnn_training_is_deterministic_and_l1_shrinks_the_weights():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(MODELS_DIR))
    import train

    rng = np.random.default_rng(0)
    images = rng.random((256, 784), dtype=np.float32)
    labels = rng.integers(0, 10, 256)
    first = train.train_cnn(1e-2, images, labels, epochs=1, seed=3)
    second = train.train_cnn(1e-2, images, labels, epochs=1, seed=3)
    plain = train.train_cnn(0.0, images, labels, epochs=1, seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert float(train.cnn_l1_penalty(first)) < float(train.cnn_l1_penalty(plain))
