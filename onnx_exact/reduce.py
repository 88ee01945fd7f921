"""Exact compression rules applied to a Network given its stability verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .network import Network


@dataclass
class LayerReduction:
    """What happened to one layer of the *original* network.

    Index arrays hold neuron indices of the original layer.
    """

    index: int
    name: str
    size: int
    kept: np.ndarray
    removed_inactive: np.ndarray
    removed_dependent: np.ndarray  # stably active, linearly dependent on kept active neurons
    removed_other: np.ndarray  # domain-free: zero rows/columns, positively proportional duplicates
    folded: bool  # the whole (stable) layer was folded into the next affine layer


@dataclass
class Reduction:
    """The reduced network and how it maps onto the original layers.

    ``hosts[j]`` is the index of the original layer whose ONNX nodes reduced layer ``j`` is written
    into; original layers not in ``hosts`` are removed from the graph. Invariants:
    ``network.layers[j].relu == original.layers[hosts[j]].relu``, ``hosts`` strictly increasing,
    ``hosts[-1]`` is the original output layer, and the output width is unchanged.
    """

    network: Network
    hosts: list[int]
    layers: list[LayerReduction]
    constant_output: bool = False
    notes: list[str] = field(default_factory=list)
