"""The CNN reader: sequential CNNs read into the dense IR with per-neuron channel indices."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_exact.core.network import DenseLayer, InputMap, Network


def test_dense_layer_channels_are_checked_and_copied():
    layer = DenseLayer(np.eye(4), np.zeros(4), True, "relu", channels=[0, 0, 1, 1])
    assert layer.channels.dtype == np.int64
    net = Network([layer, DenseLayer(np.ones((1, 4)), np.zeros(1), False)], InputMap.identity(4))
    copy = net.copy()
    assert copy.layers[0].channels.tolist() == [0, 0, 1, 1]
    copy.layers[0].channels[0] = 7
    assert net.layers[0].channels[0] == 0
    assert copy.layers[1].channels is None
    with pytest.raises(ValueError, match="channel indices"):
        DenseLayer(np.eye(4), np.zeros(4), True, "relu", channels=[0, 1])
