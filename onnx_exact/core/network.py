"""The intermediate representation every analysis works on.

A :class:`Network` is what the reader extracts from an ONNX graph, independently of the exporter
that wrote it:

    x_net = input_map(x_raw)                         (elementwise affine preprocessing, flattened)
    y_1 = W_1 x_net + b_1,       h_1 = relu(y_1)     (or h_1 = y_1 for a layer without ReLU)
    y_k = W_k h_{k-1} + b_k,     h_k = relu(y_k)
    ...
    y_L = W_L h_{L-1} + b_L                          (the output layer; may carry a ReLU too)

``x_raw`` is the model input flattened to one feature vector per sample (batch first). All arrays
are float64: the reader converts the stored float32/float16 values exactly, so the analysis runs
on precisely the numbers onnxruntime multiplies.

The tail after the last affine layer (Softmax, ArgMax, ZipMap, ...) is not part of the network:
it is left untouched in the ONNX graph, and two networks with equal ``y_L`` feed it equally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_exact.core.sparse import SparseMatrix
from onnx_exact.core.structured_map import StructuredMap


@dataclass
class InputMap:
    """Elementwise affine preprocessing ``x_net = scale * x_raw + shift`` (flattened features).

    It models Sub/Div/Mul/Add (and ai.onnx.ml ``Scaler``) nodes in front of the first layer. The
    domain is given on ``x_raw`` (what the user feeds the model); the analysis runs on ``x_net``.
    """

    scale: np.ndarray
    shift: np.ndarray

    def apply(self, x_raw: np.ndarray) -> np.ndarray:
        """Map raw inputs of shape ``(batch, n)`` to network inputs."""
        return x_raw * self.scale + self.shift

    def invert(self, x_net: np.ndarray, raw_fill: np.ndarray) -> np.ndarray:
        """Map network inputs back to raw inputs.

        Features with ``scale == 0`` carry no information; they take ``raw_fill`` (typically the
        centre of the raw box) so that the raw point stays in the domain.
        """
        out = np.array(np.broadcast_to(raw_fill, x_net.shape), dtype=np.float64)
        nz = self.scale != 0
        out[:, nz] = (x_net[:, nz] - self.shift[nz]) / self.scale[nz]
        return out

    @classmethod
    def identity(cls, n: int) -> InputMap:
        return cls(scale=np.ones(n), shift=np.zeros(n))

    @property
    def is_identity(self) -> bool:
        return bool(np.all(self.scale == 1.0) and np.all(self.shift == 0.0))


@dataclass
class DenseLayer:
    """One affine layer ``y = W h + b`` with an optional ReLU.

    Attributes
    ----------
    weight : (out, in) float64 ndarray, or a :class:`~onnx_exact.core.sparse.SparseMatrix` for a
        CNN layer too large to be dense (use :meth:`rows` for dense rows of either)
    bias : (out,) float64
    relu : whether ``h_out = max(0, y)`` (True) or ``h_out = y`` (False).
    name : a stable, human-readable name (the ReLU node's name, or the affine node's for a layer
        without ReLU); reports use it.
    channels : (out,) int64 or None
        For a layer whose neurons come from a Conv: the channel of each output neuron in the
        network's flat (NCHW, C-order) layout, ``channel = index // positions``; channel pruning
        removes a channel only when every neuron carrying its index is proved inactive. ``None``
        for a dense layer.
    auxiliary : (out,) bool or None
        Neurons that are no unit of the ONNX graph, never reported, pursued, counted or pruned:
        the kinks of a Clip layer (see ``clip``) and the *passthrough* neurons a residual CNN's
        reader adds to carry a skip connection's source across the layers of the other branch
        (:mod:`onnx_exact.io.cnn_residual`): a selection row ``relu(s_j) = s_j`` of a ReLU
        output ``s >= 0`` (ACTIVE by construction: :attr:`passthrough`), or the pair
        ``relu(±s)`` of a source that may be negative. They come after the layer's real neurons
        (kinks first); their ``channels`` entry is one past the largest real channel. A level of
        a MaxPool's max tree (:mod:`onnx_exact.io.cnn_maxpool`) is a layer of auxiliary neurons
        only (:attr:`is_auxiliary`). ``None``: no such neuron.
    clip : float or None
        ``c > 0`` when the layer is a ``Clip(0, c)`` (ReLU6: ``c = 6``) of the graph, read as
        ``clip(y, 0, c) = relu(y) - relu(y - c)``: its ``n`` real neurons are the units
        ``relu(y)``, followed by ``n`` auxiliary *kink* neurons ``relu(y - c)`` (same weight
        rows, bias ``b - c``; :attr:`kinks`), then any passthrough neurons; the next layer reads
        the Clip's output through the columns ``[I, -I]`` of units and kinks. A kink is an
        ordinary ReLU for the bounds (proved INACTIVE: the unit never reaches ``c``; ACTIVE:
        the unit is saturated at ``c``). ``None``: a Relu layer.
    """

    weight: np.ndarray
    bias: np.ndarray
    relu: bool
    name: str = ""
    channels: np.ndarray | None = None
    auxiliary: np.ndarray | None = None
    clip: float | None = None
    passthrough: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    """The input each auxiliary neuron of the trailing run of selection rows (weight 1 on one
    input, bias 0) after the kinks copies, so :meth:`apply` gathers them instead of multiplying
    (a third of a ResNet's dense entries are such rows; a MaxPool tree level carries its left
    operands so); None when the last row is no such row."""
    structured: StructuredMap | None = field(default=None, init=False, repr=False, compare=False)
    """The layer's map as the operators it was composed from, set by the reader when cheaper
    (:mod:`onnx_exact.core.structured_map`): of the whole layer, or of the rows before the
    :attr:`passthrough` ones when those end the layer (a residual branch's layer);
    :meth:`apply` and :meth:`pullback` use it instead of the matrix. None: the matrix."""

    def __post_init__(self) -> None:
        if not isinstance(self.weight, SparseMatrix):
            self.weight = np.asarray(self.weight, dtype=np.float64)
        self.bias = np.asarray(self.bias, dtype=np.float64).reshape(-1)
        if self.weight.ndim != 2 or self.weight.shape[0] != self.bias.shape[0]:
            raise ValueError(
                f"layer {self.name!r}: weight {self.weight.shape} and bias {self.bias.shape} disagree"
            )
        if self.channels is not None:
            self.channels = np.asarray(self.channels, dtype=np.int64).reshape(-1)
            if self.channels.shape[0] != self.bias.shape[0]:
                raise ValueError(
                    f"layer {self.name!r}: {self.channels.shape[0]} channel indices "
                    f"for {self.bias.shape[0]} neurons"
                )
        if self.auxiliary is not None:
            self.auxiliary = np.asarray(self.auxiliary, dtype=bool).reshape(-1)
            if self.auxiliary.shape[0] != self.bias.shape[0]:
                raise ValueError(
                    f"layer {self.name!r}: {self.auxiliary.shape[0]} auxiliary flags "
                    f"for {self.bias.shape[0]} neurons"
                )
        if self.clip is not None:
            self.clip = float(self.clip)
            units = int(self.real.sum())
            kinks = 0 if self.auxiliary is None else int(self.auxiliary[units : 2 * units].sum())
            if not (self.clip > 0 and self.relu and kinks == units):
                raise ValueError(
                    f"layer {self.name!r}: a Clip(0, {self.clip}) layer needs a ReLU and one "
                    "auxiliary kink neuron after its units per unit"
                )
        if self.auxiliary is not None:
            self.passthrough = self._selection_sources()

    def _selection_sources(self) -> np.ndarray | None:
        """The input each row of the trailing run of auxiliary selection rows after the kinks
        selects, or None if the last row is no such row."""
        first = int(self.real.sum()) + self.kinks.size
        if first == self.out_features or not self.auxiliary[first:].all():
            return None
        tail = self.weight[first:]  # one stored entry per selection row, in sparse form
        rows = tail if isinstance(tail, SparseMatrix) else SparseMatrix.from_dense(tail)
        counts = np.diff(rows.indptr)
        at = np.minimum(rows.indptr[:-1], max(rows.nnz - 1, 0))  # each row's first entry
        sources = rows.indices[at].astype(np.int64) if rows.nnz else np.zeros(counts.size, int)
        ones = rows.data[at] == 1.0 if rows.nnz else np.zeros(counts.size, dtype=bool)
        selects = (counts == 1) & ones & (self.bias[first:] == 0.0)
        run = int(np.argmin(selects[::-1])) if not selects.all() else selects.size
        return sources[selects.size - run :] if run else None

    def apply(self, h: np.ndarray) -> np.ndarray:
        """``W h + b`` for a batch ``h`` of shape ``(m, in)``, float64. Selection rows
        (:attr:`passthrough`) are copied from ``h``: exactly the value of their product (one
        term ``1 · h_j``, the others ``0 · h``), without its cost; the other rows are one
        product (whose float64 sums BLAS may order differently than for the whole matrix)."""
        if self.passthrough is None:
            if self.structured is not None:
                return self.structured.forward(h)
            return _times_transpose(h, self.weight) + self.bias
        first = self.out_features - self.passthrough.size
        y = np.empty((h.shape[0], self.out_features))
        if self.structured is not None:  # the map of the rows before the passthrough ones
            y[:, :first] = self.structured.forward(h)
        else:
            y[:, :first] = _times_transpose(h, self.weight[:first]) + self.bias[:first]
        y[:, first:] = h[:, self.passthrough]
        return y

    def pullback(self, rows: np.ndarray) -> np.ndarray:
        """``rows W`` for row vectors ``rows`` of shape ``(r, out)``: a gradient or a linear
        bound carried back through the layer's linear map."""
        if self.structured is None:
            return rows @ self.weight
        if self.passthrough is None:
            return self.structured.pullback(rows)
        first = self.out_features - self.passthrough.size
        out = self.structured.pullback(rows[:, :first])
        np.add.at(out, (slice(None), self.passthrough), rows[:, first:])
        return out

    def rows(self, neurons) -> np.ndarray:
        """Rows ``neurons`` of ``W`` as a dense float64 array, whatever form ``W`` has."""
        if isinstance(self.weight, SparseMatrix):
            return self.weight.rows(neurons)
        return self.weight[neurons]

    def row_abs_sums(self) -> np.ndarray:
        """``Σ_j |W_ij|`` per neuron (the scale of its pre-activation's round-off)."""
        if isinstance(self.weight, SparseMatrix):
            return self.weight.row_abs_sums()
        return np.abs(self.weight).sum(axis=1)

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.weight, SparseMatrix)

    @property
    def real(self) -> np.ndarray:
        """Which neurons are units of the ONNX graph (not :attr:`auxiliary`)."""
        if self.auxiliary is None:
            return np.ones(self.out_features, dtype=bool)
        return ~self.auxiliary

    @property
    def is_auxiliary(self) -> bool:
        """Whether every neuron is auxiliary: a layer of no graph activation (a level of a
        MaxPool's max tree, :mod:`onnx_exact.io.cnn_maxpool`), never reported or pruned."""
        return self.auxiliary is not None and self.out_features > 0 and bool(self.auxiliary.all())

    @property
    def kinks(self) -> np.ndarray:
        """Indices of the kink neurons ``relu(y - c)`` of a Clip layer (unit ``i``'s kink is
        ``kinks[i]``); empty for a Relu layer."""
        if self.clip is None:
            return np.zeros(0, dtype=np.int64)
        units = int(self.real.sum())
        return np.arange(units, 2 * units)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def param_count(self) -> int:
        """Entries of ``W`` (stored entries of a sparse one) and of ``b``."""
        return int(self.weight.size + self.bias.size)


#: float64 values of one layer's activations per chunk of :meth:`Network.forward_net`.
FORWARD_CHUNK_VALUES = 1 << 22


def _times_transpose(h: np.ndarray, weight: np.ndarray | SparseMatrix) -> np.ndarray:
    """``h Wᵀ`` for a batch ``h`` of shape ``(m, in)``."""
    if isinstance(weight, SparseMatrix):
        return (weight @ h.T).T
    return h @ weight.T


@dataclass
class Network:
    """A feed-forward ReLU network: input map, then affine layers; the last is the output layer."""

    layers: list[DenseLayer]
    input_map: InputMap
    input_name: str = "input"
    output_name: str = "output"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a network needs at least one affine layer")
        for prev, nxt in zip(self.layers, self.layers[1:], strict=False):
            if prev.out_features != nxt.in_features:
                raise ValueError(
                    f"layer {nxt.name!r} expects {nxt.in_features} inputs, "
                    f"layer {prev.name!r} gives {prev.out_features}"
                )

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    @property
    def out_features(self) -> int:
        return self.layers[-1].out_features

    @property
    def has_sparse_layers(self) -> bool:
        """Whether a layer keeps a sparse ``W`` (the LP/MILP encodings need dense rows)."""
        return any(layer.is_sparse for layer in self.layers)

    @property
    def relu_layer_indices(self) -> list[int]:
        """Indices (into ``layers``) of the layers that carry a ReLU, in graph order."""
        return [k for k, layer in enumerate(self.layers) if layer.relu]

    @property
    def unit_layer_indices(self) -> list[int]:
        """The ReLU layers of a graph activation (not :attr:`DenseLayer.is_auxiliary`), in graph
        order: what reports, channel verdicts and a CNN binding's ``relu_nodes`` list."""
        return [k for k in self.relu_layer_indices if not self.layers[k].is_auxiliary]

    @property
    def param_count(self) -> int:
        return sum(layer.param_count for layer in self.layers)

    @property
    def mac_count(self) -> int:
        """Multiply-accumulates per sample of the affine layers."""
        return sum(layer.weight.size for layer in self.layers)

    def preactivations(self, x_net: np.ndarray) -> list[np.ndarray]:
        """All pre-activations ``y_k`` for a batch of *network* inputs ``(batch, in)``, float64."""
        h = np.asarray(x_net, dtype=np.float64)
        if h.ndim == 1:
            h = h[None, :]
        out = []
        for layer in self.layers:
            y = layer.apply(h)
            out.append(y)
            h = np.maximum(y, 0.0) if layer.relu else y
        return out

    def forward_net(self, x_net: np.ndarray) -> np.ndarray:
        """Network output (after the output layer's ReLU, if any) for network-space inputs,
        in chunks of rows whose widest activation holds at most ``FORWARD_CHUNK_VALUES``
        float64 values (a CNN's layers have tens of thousands of neurons per sample)."""
        h = np.asarray(x_net, dtype=np.float64)
        if h.ndim == 1:
            h = h[None, :]
        widest = max([self.in_features] + [layer.out_features for layer in self.layers])
        step = max(1, FORWARD_CHUNK_VALUES // widest)
        if h.shape[0] > step:
            return np.vstack(
                [self.forward_net(h[i : i + step]) for i in range(0, h.shape[0], step)]
            )
        for layer in self.layers:
            y = layer.apply(h)
            h = np.maximum(y, 0.0) if layer.relu else y
        return h

    def forward(self, x_raw: np.ndarray) -> np.ndarray:
        """Network output for raw (flattened, un-preprocessed) inputs ``(batch, n)``, float64."""
        x_raw = np.asarray(x_raw, dtype=np.float64)
        if x_raw.ndim == 1:
            x_raw = x_raw[None, :]
        return self.forward_net(self.input_map.apply(x_raw))

    def copy(self) -> Network:
        return Network(
            layers=[
                DenseLayer(
                    layer.weight.copy(),
                    layer.bias.copy(),
                    layer.relu,
                    layer.name,
                    None if layer.channels is None else layer.channels.copy(),
                    None if layer.auxiliary is None else layer.auxiliary.copy(),
                    layer.clip,
                )
                for layer in self.layers
            ],
            input_map=InputMap(self.input_map.scale.copy(), self.input_map.shift.copy()),
            input_name=self.input_name,
            output_name=self.output_name,
            meta=dict(self.meta),
        )
