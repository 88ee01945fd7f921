"""Property tests over random ReLU networks and boxes (hypothesis).

1. A neuron the analysis calls stable is never seen flipping on dense samples of the box (a full
   grid for low-dimensional inputs, plus uniform samples and all vertices).
2. Compress, then compare: the written ONNX model matches the original on fresh samples, and the
   pipeline's own verification passed.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from exporter_fixtures import gemm_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_exact.core.box import Box
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.io.runtime import run_model
from onnx_exact.pipeline import DomainSpec, compress
from onnx_exact.stability import analyze_stability


@st.composite
def networks_and_boxes(draw):
    """Small random ReLU nets (some biases pushed to force stability) and boxes, some degenerate."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n_in = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(2, 10), min_size=1, max_size=3))
    sizes = [n_in, *widths, draw(st.integers(1, 3))]
    layers = []
    for k, (a, b) in enumerate(itertools.pairwise(sizes)):
        weight = rng.normal(size=(b, a)).astype(np.float32).astype(np.float64)
        bias = (rng.normal(size=b) * draw(st.sampled_from([0.1, 1.0, 3.0]))).astype(np.float32)
        layers.append(DenseLayer(weight, bias.astype(np.float64), relu=k < len(sizes) - 2))
    net = Network(layers=layers, input_map=InputMap.identity(n_in), input_name="x")
    centre = rng.uniform(-1, 1, size=n_in)
    radius = rng.uniform(0, 1, size=n_in) * draw(st.sampled_from([0.01, 0.3, 1.0]))
    radius[rng.random(n_in) < 0.2] = 0.0  # degenerate features: lo == hi
    box = Box(centre - radius, centre + radius, "x", "hypothesis")
    return net, box


def dense_points(box: Box, rng: np.random.Generator) -> np.ndarray:
    n = box.size
    per_axis = {1: 2001, 2: 151, 3: 31}.get(n, 9)
    axes = [np.linspace(lo, hi, per_axis) for lo, hi in zip(box.lower, box.upper, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, n)
    vertices = np.array(list(itertools.product(*zip(box.lower, box.upper, strict=True))))
    uniform = rng.uniform(box.lower, box.upper, size=(20_000, n))
    return np.concatenate([grid, vertices, uniform])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=networks_and_boxes())
def test_proved_stable_neurons_never_flip_on_dense_samples(case):
    net, box = case
    result = analyze_stability(net, box, seed=0)
    points = dense_points(box, np.random.default_rng(1))
    pre = net.preactivations(points)
    for k in net.relu_layer_indices:
        states = result.layers[k].states
        assert not np.any(states == NeuronState.UNDECIDED)  # complete without a time limit
        active, inactive = states == NeuronState.ACTIVE, states == NeuronState.INACTIVE
        assert np.all(pre[k][:, active] >= 0.0)
        assert np.all(pre[k][:, inactive] <= 0.0)
        # UNSTABLE is backed by witnesses of both signs (completeness, not guessing).
        witnessed = net.preactivations(result.witnesses)[k] if len(result.witnesses) else None
        for i in np.flatnonzero(states == NeuronState.UNSTABLE):
            assert witnessed is not None
            assert witnessed[:, i].max() > 0 and witnessed[:, i].min() < 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=networks_and_boxes())
def test_compress_then_compare_on_samples(case, tmp_path_factory):
    net, box = case
    model = gemm_mlp(params=[(layer.weight, layer.bias) for layer in net.layers])
    out = model.graph.output[0].name
    folder = tmp_path_factory.mktemp("prop")
    box_file = folder / "box.npz"
    np.savez(box_file, lower=box.lower, upper=box.upper)
    result = compress(model, folder / "small.onnx", DomainSpec(range_file=str(box_file)))
    assert result.report.verification.passed
    assert result.report.params_after <= result.report.params_before
    small = onnx.load(folder / "small.onnx")
    x = dense_points(box, np.random.default_rng(2))[:5000]
    expected = run_model(model, x)[out]
    got = run_model(small, x)[out]
    # Equal up to float round-off: the tolerance the pipeline derived from the input model's own
    # measured float32 round-off (at least 1e-5).
    atol = result.report.verification.atol
    atol = atol.get(out, atol[""]) if isinstance(atol, dict) else atol
    assert atol <= max(1e-5, 1e-3 * float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=atol)
