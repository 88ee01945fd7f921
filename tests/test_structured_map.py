"""A CNN layer's structured map (its operators in turn) computes the dense layer's values.

The witness searches push points forward through :meth:`DenseLayer.apply` and gradients back
through :meth:`DenseLayer.pullback`; where the reader attached a structured map these run
through the convolutions themselves, and must equal the dense matrix's products up to float64
rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from cnn_fixtures import matlab_conv1d, pad_pool, tf2onnx_nhwc, torch_legacy

from onnx_exact.core.network import DenseLayer
from onnx_exact.core.operators import ConvOperator, DenseOperator, ReshapeOperator
from onnx_exact.core.structured_map import ElementwiseAffine, StructuredMap
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.search.witness import _value_and_gradient

FIXTURES = {"torch": torch_legacy, "nhwc": tf2onnx_nhwc, "conv1d": matlab_conv1d, "pool": pad_pool}


def _dense_value_and_gradient(net, layer, neurons, points):
    """The same quantity through the dense matrices only (the reference)."""
    h, masks = points, []
    for current in net.layers[:layer]:
        y = h @ current.weight.T + current.bias
        mask = y > 0.0 if current.relu else np.ones_like(y, dtype=bool)
        h = np.where(mask, y, 0.0)
        masks.append(mask)
    rows = net.layers[layer].weight[neurons]
    value = np.einsum("dn,dn->d", h, rows) + net.layers[layer].bias[neurons]
    gradient = rows
    for j in range(layer - 1, -1, -1):
        gradient = (gradient * masks[j]) @ net.layers[j].weight
    return value, gradient


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_conv_layers_carry_a_structured_map_that_equals_the_dense_products(name):
    net = read_model(FIXTURES[name]().model).network
    structured = [layer for layer in net.layers if layer.structured is not None]
    assert structured, "no conv layer got a structured map"
    rng = np.random.default_rng(0)
    for layer in structured:
        h = rng.standard_normal((5, layer.in_features))
        rows = rng.standard_normal((3, layer.out_features))
        dense = h @ layer.weight.T + layer.bias
        scale = np.abs(h) @ np.abs(layer.weight).T + np.abs(layer.bias) + 1.0
        assert np.all(np.abs(layer.apply(h) - dense) <= 1e-12 * scale)
        pulled = rows @ layer.weight
        assert np.all(
            np.abs(layer.pullback(rows) - pulled)
            <= 1e-12 * (np.abs(rows) @ np.abs(layer.weight) + 1.0)
        )
    # The witness gradient (through the structured maps) is the dense one.
    k = net.relu_layer_indices[-1]
    points = rng.uniform(-1.0, 1.0, (4, net.in_features))
    neurons = np.arange(4) % net.layers[k].out_features
    value, gradient = _value_and_gradient(net, k, neurons, points)
    ref_value, ref_gradient = _dense_value_and_gradient(net, k, neurons, points)
    np.testing.assert_allclose(value, ref_value, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gradient, ref_gradient, rtol=1e-10, atol=1e-10)


def test_a_map_that_disagrees_with_the_dense_matrix_is_refused():
    rng = np.random.default_rng(1)
    conv = ConvOperator(rng.standard_normal((2, 1, 3, 3)), rng.standard_normal(2), (5, 5))
    scale = ElementwiseAffine(rng.uniform(0.5, 2.0, conv.n_out), rng.standard_normal(conv.n_out))
    structured = StructuredMap([conv, scale, ReshapeOperator(conv.output_shape, (conv.n_out,))])
    weight = conv.dense() * scale.scale[:, None]
    bias = conv.bias * scale.scale + scale.bias
    assert structured.agrees_with(weight, bias)
    tampered = weight.copy()
    tampered[0, 0] += 1e-3
    assert not structured.agrees_with(tampered, bias)
    assert not structured.agrees_with(weight, bias + 1e-3)
    assert not structured.agrees_with(weight[:, :-1], bias)


def test_a_layer_without_a_structured_map_uses_its_matrix():
    rng = np.random.default_rng(2)
    weight, bias = rng.standard_normal((3, 4)), rng.standard_normal(3)
    layer = DenseLayer(weight, bias, True)
    assert layer.structured is None
    h, rows = rng.standard_normal((2, 4)), rng.standard_normal((2, 3))
    np.testing.assert_array_equal(layer.apply(h), h @ weight.T + bias)
    np.testing.assert_array_equal(layer.pullback(rows), rows @ weight)


def test_chained_operators_must_fit():
    with pytest.raises(ValueError, match="takes 3 features"):
        StructuredMap([DenseOperator(np.ones((2, 4))), DenseOperator(np.ones((5, 3)))])


@pytest.mark.parametrize("name", ["torch", "pool"])
def test_alpha_crown_through_the_structured_maps_equals_the_dense_bounds(name, monkeypatch):
    """α-CROWN carries its multipliers through a conv layer's structured map (CROWN keeps the
    dense matrix, whose live columns it trims); the bounds are the dense matrix's up to float64
    rounding."""
    from onnx_exact.bounds.crown import interval_bounds, symbolic_bounds
    from onnx_exact.bounds.relu_bab import optimised_bounds
    from onnx_exact.core.box import Box

    fixture = FIXTURES[name]()
    read = read_model(fixture.model)
    net = read.network
    box = Box(fixture.lower, fixture.upper).to_network(net.input_map)
    assert any(layer.structured is not None for layer in net.layers[:-1])

    def bounds_of(network):
        bounds = interval_bounds(network, box)
        for k in range(1, len(network.layers)):
            bounds[k], _ = symbolic_bounds(network, box, bounds, k)
        k = len(network.layers) - 1
        states = [np.zeros(layer.out_features, dtype=np.int8) for layer in network.layers]
        neurons = np.arange(network.layers[k].out_features)
        lower, upper, _ = optimised_bounds(network, box, bounds, states, k, neurons, steps=5)
        return bounds, lower, upper

    pulled = []
    original = StructuredMap.pullback

    def counted(self, rows):
        pulled.append(rows.shape[0])
        return original(self, rows)

    monkeypatch.setattr(StructuredMap, "pullback", counted)
    structured = bounds_of(net)
    assert pulled, "no bound went through a structured map"
    for layer in net.layers:
        layer.structured = None
    dense = bounds_of(net)
    for got, want in zip(structured[0], dense[0], strict=True):
        np.testing.assert_allclose(got.lower, want.lower, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got.upper, want.upper, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(structured[1], dense[1], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(structured[2], dense[2], rtol=1e-9, atol=1e-9)
