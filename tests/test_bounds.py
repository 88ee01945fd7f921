"""Interval and symbolic bounds are sound (dense sampling never escapes them) and CROWN is tighter."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_exact.bounds.crown import LayerBounds, interval_bounds, relu_relaxation, symbolic_bounds
from onnx_exact.core.box import Box
from onnx_exact.core.network import DenseLayer, InputMap, Network


def random_network(rng: np.random.Generator, sizes: list[int], linear_hidden: int = -1) -> Network:
    """Random MLP; the last layer is affine, hidden layer ``linear_hidden`` has no ReLU."""
    layers = [
        DenseLayer(
            rng.normal(size=(n_out, n_in)),
            rng.normal(size=n_out),
            relu=(k < len(sizes) - 2 and k != linear_hidden),
            name=f"fc{k}",
        )
        for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False))
    ]
    return Network(layers, InputMap.identity(sizes[0]))


def random_box(rng: np.random.Generator, n: int, degenerate: bool) -> Box:
    lower = rng.uniform(-1.0, 0.5, size=n)
    upper = lower + rng.uniform(0.0, 1.5, size=n)
    if degenerate:
        upper[0] = lower[0]
    return Box(lower, upper)


def dense_points(rng: np.random.Generator, box: Box, n: int) -> np.ndarray:
    """Uniform points plus random vertices (where the extremes of piecewise-linear maps lie)."""
    uniform = box.lower + rng.random((n, box.size)) * (box.upper - box.lower)
    vertices = np.where(rng.random((n, box.size)) < 0.5, box.upper, box.lower)
    return np.concatenate([uniform, vertices])


def assert_encloses(bounds: list[LayerBounds], values: list[np.ndarray]) -> None:
    for layer_bounds, y in zip(bounds, values, strict=True):
        slack = 1e-9 * (1.0 + np.abs(y).max())
        assert np.all(y >= layer_bounds.lower - slack)
        assert np.all(y <= layer_bounds.upper + slack)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_in=st.integers(1, 4),
    hidden=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    linear_hidden=st.integers(-1, 2),
    degenerate=st.booleans(),
)
def test_interval_and_symbolic_enclose_sampled_preactivations(
    seed: int, n_in: int, hidden: list[int], linear_hidden: int, degenerate: bool
) -> None:
    rng = np.random.default_rng(seed)
    net = random_network(rng, [n_in, *hidden, 3], linear_hidden)
    box = random_box(rng, n_in, degenerate)
    values = net.preactivations(dense_points(rng, box, 2000))

    ibp = interval_bounds(net, box)
    assert_encloses(ibp, values)

    # Symbolic bounds layer by layer, each built on the symbolic bounds of the layers below.
    crown = [bounds.copy() for bounds in ibp]
    for k in range(1, len(net.layers)):
        crown[k] = symbolic_bounds(net, box, crown, k)[0]
        crown = interval_bounds(net, box, crown)
    assert_encloses(crown, values)
    for tight, loose in zip(crown, ibp, strict=True):
        assert np.all(tight.lower >= loose.lower - 1e-12 * (1 + np.abs(loose.lower)))
        assert np.all(tight.upper <= loose.upper + 1e-12 * (1 + np.abs(loose.upper)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_in=st.integers(1, 4), width=st.integers(1, 6))
def test_raw_symbolic_bounds_are_sound_and_corners_attain_them(
    seed: int, n_in: int, width: int
) -> None:
    """Without intersecting with IBP, CROWN is still sound; its vertices lie in the box."""
    rng = np.random.default_rng(seed)
    net = random_network(rng, [n_in, width, width, 2])
    box = random_box(rng, n_in, degenerate=False)
    ibp = interval_bounds(net, box)
    raw, corners = symbolic_bounds(net, box, ibp[:1], 1)
    assert_encloses([raw], [net.preactivations(dense_points(rng, box, 2000))[1]])
    assert corners.at_upper.shape == (2, width, n_in)
    points = corners[:]  # the vertices themselves
    assert np.all((points == box.lower) | (points == box.upper))
    # Layer 0 is linear in x: its linear bound is exact and attained at the vertex.
    exact, vertices = symbolic_bounds(net, box, [], 0)
    y_at_max = net.preactivations(vertices[0])[0][np.arange(width), np.arange(width)]
    y_at_min = net.preactivations(vertices[1])[0][np.arange(width), np.arange(width)]
    np.testing.assert_allclose(y_at_max, exact.upper, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y_at_min, exact.lower, rtol=1e-12, atol=1e-12)


def test_symbolic_sees_cancellation_that_interval_misses() -> None:
    """``y_1 = relu(x) - relu(x)`` is identically 0: IBP says [-1, 1], back-substitution [0, 0]."""
    net = Network(
        [
            DenseLayer(np.array([[1.0], [1.0]]), np.zeros(2), relu=True),
            DenseLayer(np.array([[1.0, -1.0]]), np.zeros(1), relu=False),
        ],
        InputMap.identity(1),
    )
    box = Box(np.array([0.0]), np.array([1.0]))
    ibp = interval_bounds(net, box)
    np.testing.assert_array_equal(ibp[1].lower, [-1.0])
    np.testing.assert_array_equal(ibp[1].upper, [1.0])
    crown, _ = symbolic_bounds(net, box, ibp, 1)
    np.testing.assert_array_equal(crown.lower, [0.0])
    np.testing.assert_array_equal(crown.upper, [0.0])


def test_symbolic_only_touches_selected_rows() -> None:
    rng = np.random.default_rng(3)
    net = random_network(rng, [3, 5, 5, 2])
    box = random_box(rng, 3, degenerate=False)
    ibp = interval_bounds(net, box)
    refined, corners = symbolic_bounds(net, box, ibp, 1, rows=np.array([1, 3]))
    others = np.array([0, 2, 4])
    np.testing.assert_array_equal(refined.lower[others], ibp[1].lower[others])
    np.testing.assert_array_equal(refined.upper[others], ibp[1].upper[others])
    assert corners[:].shape == (2, 2, 3)


def test_interval_propagates_tighter_start_bounds() -> None:
    """A refined layer-0 bound shrinks every later layer; ``relu=False`` passes negatives through."""
    net = Network(
        [
            DenseLayer(np.array([[1.0]]), np.zeros(1), relu=False),
            DenseLayer(np.array([[2.0]]), np.array([1.0]), relu=True),
            DenseLayer(np.array([[1.0]]), np.zeros(1), relu=False),
        ],
        InputMap.identity(1),
    )
    box = Box(np.array([-1.0]), np.array([1.0]))
    plain = interval_bounds(net, box)
    np.testing.assert_array_equal(plain[1].lower, [-1.0])
    np.testing.assert_array_equal(plain[2].upper, [3.0])
    refined = interval_bounds(net, box, [LayerBounds(np.array([-1.0]), np.array([0.0])), None])
    np.testing.assert_array_equal(refined[1].upper, [1.0])
    np.testing.assert_array_equal(refined[2].upper, [1.0])


def test_relaxation_lines_bound_the_relu() -> None:
    lower = np.array([-2.0, -1.0, 0.5, -3.0])
    upper = np.array([1.0, 3.0, 2.0, -0.5])
    upper_slope, upper_intercept, lower_slope = relu_relaxation(LayerBounds(lower, upper), True)
    y = np.linspace(lower, upper, 101)
    h = np.maximum(y, 0.0)
    assert np.all(h <= upper_slope * y + upper_intercept + 1e-12)
    assert np.all(h >= lower_slope * y - 1e-12)
    np.testing.assert_array_equal(lower_slope, [0.0, 1.0, 1.0, 0.0])  # adaptive: 1 iff u > -l
