"""Exact compression rules applied to a Network given its stability verdicts.

Notation (``network.py``): hidden layer ``l`` computes ``y_l = W_l h_{l-1} + b_l`` and
``h_l = relu(y_l)`` (or ``h_l = y_l`` without ReLU); the last layer is the output layer. A neuron is
*linear* on the box when ``h = y`` there (proved ACTIVE, or its layer has no ReLU) and *dead* when
``h = 0`` there (proved INACTIVE under a ReLU). UNSTABLE and UNDECIDED neurons are never touched by a
domain-dependent rule: keeping a neuron is always exact.

The rules (Serra et al., NeurIPS 2021, section "Compression rules" of ``method.md``, plus the
domain-free extras of ``engine.md``), applied layer by layer and repeated until nothing changes,
because every removal can enable another (a deleted neuron can leave a zero column behind, a shrunk
layer can become foldable, ...):

1. dead neuron ``i`` of layer ``l``: delete row ``i`` of ``(W_l, b_l)`` and column ``i`` of
   ``W_{l+1}``;
2. zero incoming row ``w_i = 0``: ``h_i`` is the constant ``relu(b_i)`` (``b_i`` without ReLU) on any
   domain; add ``W_{l+1}[:, i] h_i`` to ``b_{l+1}`` and delete it;
3. zero outgoing column ``W_{l+1}[:, i] = 0``: the neuron has no effect; delete it;
4. linearly dependent linear neurons: with a basis ``B`` of the linear rows,
   ``w_i = sum_j a_ij w_j`` gives ``h_i = sum_j a_ij h_j + (b_i - sum_j a_ij b_j)`` because every
   neuron involved is linear; add ``W_{l+1}[:, i] a_i`` to the basis columns, the constant to
   ``b_{l+1}``, delete ``i``;
5. positively proportional duplicates ``(w_k, b_k) = c (w_m, b_m)``, ``c > 0``: ``relu`` is
   positively homogeneous, so ``h_k = c h_m`` on any domain (any ``c != 0`` without ReLU); add
   ``c W_{l+1}[:, k]`` to column ``m`` and delete ``k``;
6. a layer whose remaining neurons are all linear is affine on the box: fold it into the next
   layer, ``W' = W_{l+1} W_l``, ``b' = W_{l+1} b_l + b_{l+1}``, when that does not add parameters;
7. a hidden layer left without neurons (all dead, or removed by the rules above) means the output is
   constant on the box: the network becomes a zero-weight width-1 layer (at the first hidden ReLU
   layer) and an output layer whose bias is that constant;
8. a dead unit of an output layer with ReLU outputs 0: its row and bias are set to 0 (the output
   interface is fixed, so it cannot be deleted).

Rules 2, 3, 5 and 8 are exact on every input; rules 1, 4, 6 and 7 on every input of the box for which
the states hold. The only inexactness is float64 round-off: rules 4 and 5 accept a relation only when
its residual is at round-off level relative to the row norm (constants below).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_exact.core.errors import UsageError
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.verdicts import NeuronState, StabilityResult

PROPORTIONAL_RTOL = 1e-12
"""Rule 5 accepts ``(w_k, b_k) = c (w_m, b_m)`` when ``||r_k - c r_m|| <= 1e-12 ||r_k||`` with
``r = [w, b]``; the dropped residual changes ``y_k`` by at most that fraction of its scale."""

DEPENDENCE_RTOL = 1e-11
"""Rule 4: a row joins the basis when its component orthogonal to the basis chosen so far is
longer than ``1e-11 ||w_i||``; a row left out is accepted as ``w_i = sum_j a_ij w_j`` only when
the least-squares residual is at most that fraction again (round-off of an exactly dependent row
is ~``eps * sqrt(n) * cond(B)``). One threshold for both makes a nearly dependent row a basis row,
so rows that depend on it exactly are still found; a row whose relation fails the check is kept."""

FULL_RANK_EIGENVALUE = 1e-6
"""Rows whose Gram matrix has smallest eigenvalue above this are independent beyond doubt
(``sigma_min > 1e-3``, far above both ``DEPENDENCE_RTOL`` and the Gram round-off); only rows below
it go through the (exact-threshold) pivoted Gram-Schmidt sweep."""

_DOWNDATE_FLOOR = 1e-6
"""Squared residual length below which downdated lengths are recomputed (see _pivoted_basis)."""

MAX_AMPLIFICATION = 16.0
"""Rule 4 rejects a relation whose coefficients amplify round-off:
``A_i = sum_j |a_ij| ||r_j|| / ||r_i||`` must be at most 16. Removing ``h_i`` adds
``W_next[:, i] a_i`` to the basis columns of the next layer, and those weights are written back in
the model's own dtype, so their rounding error is up to ``A_i`` times that of ``W_next[:, i] h_i``
itself. With nearly dependent basis rows ``A_i`` reaches the thousands, and the float32 model
written would differ from its input by far more than the input's own round-off (``check`` with
its default tolerance would refute the pair); 16 keeps the written model's round-off within about
one order of magnitude of the input's."""

_CANDIDATE_COSINE = 1.0 - 1e-6
"""Pre-filter of rule 5 on the cosine of two rows; any pair passing the residual test has cosine
``>= 1 - 1e-24``, so this never drops a true duplicate, it only saves residual computations."""

_REMOVAL_KINDS = ("inactive", "dependent", "other")


@dataclass
class LayerReduction:
    """What happened to one layer of the *original* network.

    Index arrays hold neuron indices of the original layer. Every original neuron is in exactly one
    of ``kept``, ``removed_inactive``, ``removed_dependent``, ``removed_other`` and
    ``folded_neurons``. When the output is constant, every neuron of every hidden layer not removed
    by a rule is in ``removed_other`` and ``kept`` is empty (the width-1 layer is synthetic).
    """

    index: int
    name: str
    size: int
    kept: np.ndarray
    removed_inactive: np.ndarray
    removed_dependent: np.ndarray  # stably active, linearly dependent on kept active neurons
    removed_other: np.ndarray  # domain-free: zero rows/columns, positively proportional duplicates
    folded: bool  # the whole (stable) layer was folded into the next affine layer
    folded_neurons: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """The neurons still present when the layer was folded (empty unless ``folded``)."""


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


@dataclass
class _WorkLayer:
    """A layer being reduced, with what is known about each of its current rows.

    ``origin[i]`` is the original index (in layer ``host``) of row ``i``; ``linear[i]`` says
    ``h_i = y_i`` on the box, ``dead[i]`` says ``h_i = 0`` on the box.
    """

    weight: np.ndarray
    bias: np.ndarray
    relu: bool
    host: int
    origin: np.ndarray
    linear: np.ndarray
    dead: np.ndarray

    @classmethod
    def from_original(cls, index: int, layer: DenseLayer, states: np.ndarray) -> _WorkLayer:
        """Copy an original layer; without ReLU every neuron is linear whatever the states say."""
        states = np.asarray(states)
        if layer.relu:
            linear = states == NeuronState.ACTIVE
            dead = states == NeuronState.INACTIVE
        else:
            linear = np.ones(layer.out_features, dtype=bool)
            dead = np.zeros(layer.out_features, dtype=bool)
        return cls(
            weight=layer.weight.astype(np.float64, copy=True),
            bias=layer.bias.astype(np.float64, copy=True),
            relu=layer.relu,
            host=index,
            origin=np.arange(layer.out_features, dtype=np.int64),
            linear=linear,
            dead=dead,
        )

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])

    @property
    def param_count(self) -> int:
        return int(self.weight.size + self.bias.size)

    def keep_rows(self, keep: np.ndarray) -> None:
        self.weight = self.weight[keep]
        self.bias = self.bias[keep]
        self.origin = self.origin[keep]
        self.linear = self.linear[keep]
        self.dead = self.dead[keep]


def reduce_network(net: Network, stability: StabilityResult) -> Reduction:
    """Apply every exact compression rule to a fixpoint.

    Parameters
    ----------
    net : the original network.
    stability : verdicts aligned with ``net.layers`` (one ``LayerStability`` per layer, including
        layers without ReLU and the output layer). Only ACTIVE and INACTIVE are used as facts;
        UNSTABLE and UNDECIDED neurons are kept unless a domain-free rule removes them.

    Returns
    -------
    Reduction
        A network with the same input map, names and output width whose output equals the
        original's (up to float64 round-off) on every input of the box where the states hold, with
        at most as many parameters, and a per-layer record in original neuron indices.

    Raises
    ------
    UsageError
        If the stability result does not belong to this network (layer or neuron counts differ).
    """
    _check_alignment(net, stability)
    return _Reducer(net, stability).run()


def _check_alignment(net: Network, stability: StabilityResult) -> None:
    if len(stability.layers) != len(net.layers):
        raise UsageError(
            f"reduce_network: the stability result has {len(stability.layers)} layers but the "
            f"network has {len(net.layers)}; pass the result of analysing this very network"
        )
    for layer, verdicts in zip(net.layers, stability.layers, strict=True):
        if np.shape(verdicts.states) != (layer.out_features,):
            raise UsageError(
                f"reduce_network: layer {layer.name!r} has {layer.out_features} neurons but "
                f"{np.size(verdicts.states)} stability states; pass the result of analysing this "
                "very network"
            )


class _Reducer:
    """Holds the layers being reduced and the record of what each rule removed."""

    def __init__(self, net: Network, stability: StabilityResult) -> None:
        self.net = net
        self.layers = [
            _WorkLayer.from_original(k, layer, verdicts.states)
            for k, (layer, verdicts) in enumerate(zip(net.layers, stability.layers, strict=True))
        ]
        self.removed: dict[str, list[list[np.ndarray]]] = {
            kind: [[] for _ in net.layers] for kind in _REMOVAL_KINDS
        }
        self.folded_neurons: dict[int, np.ndarray] = {}
        self.notes: list[str] = []
        self.constant = False

    # ----------------------------------------------------------------------------- driver
    def run(self) -> Reduction:
        self._silence_dead_outputs()
        changed = True
        while changed and not self.constant:
            changed = self._sweep()
        return self._constant_reduction() if self.constant else self._reduction()

    def _sweep(self) -> bool:
        """One pass over the hidden layers, first to last; True if anything changed."""
        changed = False
        pos = 0
        while pos < len(self.layers) - 1:
            changed |= self._shrink(pos)
            if self.layers[pos].width == 0:
                self.constant = True
                return True
            if self._fold(pos):
                changed = True
                continue  # the merged layer now sits at ``pos``: reduce it too
            pos += 1
        return changed

    def _shrink(self, pos: int) -> bool:
        """Rules 1-5 on the neurons of hidden layer ``pos``; True if any neuron was removed."""
        layer, nxt = self.layers[pos], self.layers[pos + 1]
        removed = self._delete(pos, layer.dead, "inactive")
        removed += self._remove_constant_neurons(pos)
        removed += self._delete(pos, ~np.any(nxt.weight != 0, axis=0), "other")
        removed += self._remove_dependent(pos)
        removed += self._remove_duplicates(pos)
        return removed > 0

    # ----------------------------------------------------------------------------- rules
    def _delete(self, pos: int, mask: np.ndarray, kind: str) -> int:
        """Delete the neurons ``mask`` of layer ``pos`` (rows there, columns in the next layer)."""
        count = int(np.count_nonzero(mask))
        if count:
            layer, nxt = self.layers[pos], self.layers[pos + 1]
            self.removed[kind][layer.host].append(layer.origin[mask])
            layer.keep_rows(~mask)
            nxt.weight = nxt.weight[:, ~mask]
        return count

    def _remove_constant_neurons(self, pos: int) -> int:
        """Rule 2: a zero row makes ``h_i`` the constant ``relu(b_i)``; move it into ``b_{l+1}``."""
        layer, nxt = self.layers[pos], self.layers[pos + 1]
        zero_row = ~np.any(layer.weight != 0, axis=1)
        if zero_row.any():
            value = layer.bias[zero_row]
            if layer.relu:
                value = np.maximum(value, 0.0)
            nxt.bias = nxt.bias + nxt.weight[:, zero_row] @ value
        return self._delete(pos, zero_row, "other")

    def _remove_dependent(self, pos: int) -> int:
        """Rule 4: express dependent linear neurons through a basis of the linear ones."""
        layer, nxt = self.layers[pos], self.layers[pos + 1]
        linear = np.flatnonzero(layer.linear)
        if linear.size < 2:
            return 0
        basis, dependent, alpha = dependent_rows(layer.weight[linear], layer.bias[linear])
        if dependent.size == 0:
            return 0
        basis, dependent = linear[basis], linear[dependent]
        outgoing = nxt.weight[:, dependent]
        offset = layer.bias[dependent] - alpha @ layer.bias[basis]
        nxt.bias = nxt.bias + outgoing @ offset
        nxt.weight[:, basis] += outgoing @ alpha
        mask = np.zeros(layer.width, dtype=bool)
        mask[dependent] = True
        return self._delete(pos, mask, "dependent")

    def _remove_duplicates(self, pos: int) -> int:
        """Rule 5: merge each proportional duplicate ``h_k = c h_m`` into its representative."""
        layer, nxt = self.layers[pos], self.layers[pos + 1]
        if layer.width < 2:
            return 0
        rows = np.column_stack([layer.weight, layer.bias])
        representative, duplicate, factor = _proportional_rows(rows, positive_only=layer.relu)
        if duplicate.size == 0:
            return 0
        np.add.at(nxt.weight, (slice(None), representative), nxt.weight[:, duplicate] * factor)
        mask = np.zeros(layer.width, dtype=bool)
        mask[duplicate] = True
        return self._delete(pos, mask, "other")

    def _fold(self, pos: int) -> bool:
        """Rule 6: fold an all-linear hidden layer into the next one if no parameter is added."""
        layer, nxt = self.layers[pos], self.layers[pos + 1]
        if not layer.linear.all():
            return False
        merged_params = nxt.width * (layer.weight.shape[1] + 1)
        if merged_params > layer.param_count + nxt.param_count:
            return False
        self.folded_neurons[layer.host] = layer.origin
        self.notes.append(
            f"layer {self.net.layers[layer.host].name!r}: its {layer.width} remaining neurons are "
            f"linear on the box; folded into layer {self.net.layers[nxt.host].name!r}"
        )
        merged = _WorkLayer(
            weight=nxt.weight @ layer.weight,
            bias=nxt.weight @ layer.bias + nxt.bias,
            relu=nxt.relu,
            host=nxt.host,
            origin=nxt.origin,
            linear=nxt.linear,
            dead=nxt.dead,
        )
        self.layers[pos : pos + 2] = [merged]
        return True

    def _silence_dead_outputs(self) -> None:
        """Rule 8: a dead unit of an output ReLU outputs 0 for row 0 and bias 0 as well."""
        output = self.layers[-1]
        if output.relu and output.dead.any():
            output.weight[output.dead] = 0.0
            output.bias[output.dead] = 0.0
            units = np.flatnonzero(output.dead).tolist()
            self.notes.append(
                f"output layer {self.net.layers[-1].name!r}: units {units} are stably inactive; "
                "their weights and bias are set to 0"
            )

    # ----------------------------------------------------------------------------- results
    def _removed_by(self, kind: str, index: int) -> np.ndarray:
        parts = self.removed[kind][index]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def _record(self, index: int, kept: np.ndarray, folded: bool) -> LayerReduction:
        layer = self.net.layers[index]
        return LayerReduction(
            index=index,
            name=layer.name,
            size=layer.out_features,
            kept=np.sort(kept),
            removed_inactive=self._removed_by("inactive", index),
            removed_dependent=self._removed_by("dependent", index),
            removed_other=self._removed_by("other", index),
            folded=folded,
            folded_neurons=np.sort(self.folded_neurons[index])
            if folded
            else np.zeros(0, dtype=np.int64),
        )

    def _reduction(self) -> Reduction:
        kept = {work.host: work.origin for work in self.layers}
        records = [
            self._record(k, kept.get(k, np.zeros(0, dtype=np.int64)), k in self.folded_neurons)
            for k in range(len(self.net.layers))
        ]
        layers = [
            DenseLayer(work.weight, work.bias, work.relu, self.net.layers[work.host].name)
            for work in self.layers
        ]
        return Reduction(
            network=self._network(layers),
            hosts=[work.host for work in self.layers],
            layers=records,
            # only an output-only network can get here with a zero weight matrix (in any hidden
            # layer it empties that layer or the one before); its output is constant all the same
            constant_output=not all(work.weight.any() for work in self.layers),
            notes=self.notes,
        )

    def _constant_reduction(self) -> Reduction:
        """Rule 7: a hidden layer is empty, so every input gives the same output pre-activation.

        The constant is read off the current (already exact) layers at any input. The result is
        a zero-weight width-1 layer at the first original hidden ReLU layer (at the first layer,
        without ReLU, if no hidden layer has one) feeding an output layer with zero weights and
        that constant as bias: ``n_in + 1 + 2 n_out`` parameters, never more than the original,
        whose first and output layers hold at least ``n_in + 1`` and ``2 n_out``.
        """
        probe = Network(
            [DenseLayer(work.weight, work.bias, work.relu) for work in self.layers],
            InputMap.identity(self.net.in_features),
        )
        constant = probe.preactivations(np.zeros((1, self.net.in_features)))[-1][0]
        output_index = len(self.net.layers) - 1
        output = self.net.layers[output_index]
        n_in, n_out = self.net.in_features, self.net.out_features
        host = next((k for k in self.net.relu_layer_indices if k < output_index), 0)
        layers = [
            DenseLayer(
                np.zeros((1, n_in)),
                np.zeros(1),
                self.net.layers[host].relu,
                self.net.layers[host].name,
            ),
            DenseLayer(np.zeros((n_out, 1)), constant, output.relu, output.name),
        ]
        hosts = [host, output_index]

        for k in range(output_index):
            removed_by_state = np.union1d(
                self._removed_by("inactive", k), self._removed_by("dependent", k)
            )
            everything_else = np.setdiff1d(
                np.arange(self.net.layers[k].out_features), removed_by_state
            )
            self.removed["other"][k] = [everything_else]
        self.folded_neurons.clear()
        records = [self._record(k, np.zeros(0, dtype=np.int64), False) for k in range(output_index)]
        records.append(self._record(output_index, np.arange(n_out, dtype=np.int64), False))
        self.notes.append(
            "a hidden layer has no neuron left: the output is constant on the box "
            f"(pre-activation {np.array2string(constant, precision=6, threshold=8)})"
        )
        return Reduction(
            network=self._network(layers),
            hosts=hosts,
            layers=records,
            constant_output=True,
            notes=self.notes,
        )

    def _network(self, layers: list[DenseLayer]) -> Network:
        net = self.net
        return Network(
            layers=layers,
            input_map=InputMap(net.input_map.scale.copy(), net.input_map.shift.copy()),
            input_name=net.input_name,
            output_name=net.output_name,
            meta=dict(net.meta),
        )


# --------------------------------------------------------------------------------- linear algebra
def dependent_rows(
    weight: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split linear rows into a basis and rows that are exact combinations of it.

    Parameters
    ----------
    weight, bias : the rows ``w_i`` (non-zero) and biases ``b_i`` of the linear neurons.

    Returns
    -------
    basis : indices of the rows kept as a basis.
    dependent : indices of rows with ``w_i = sum_j alpha_ij w_j`` (``j`` in ``basis``) to within
        ``DEPENDENCE_RTOL ||w_i||`` and amplification at most ``MAX_AMPLIFICATION``.
    alpha : ``(len(dependent), len(basis))`` coefficients, from least squares on the basis rows.

    Rows are normalised first so that the choice does not depend on how each neuron is scaled.
    The common case, clearly independent rows, is settled without the Gram-Schmidt sweep: the
    distance of any row to the span of the others is at least ``sigma_min``, and the smallest
    eigenvalue of the Gram matrix ``U U^T`` is ``sigma_min^2`` up to ~``k eps`` (``k`` rows), so
    ``lambda_min > FULL_RANK_EIGENVALUE`` certifies that no row can pass the residual test.
    """
    row_norm = np.linalg.norm(weight, axis=1)
    unit = weight / row_norm[:, None]
    nothing = np.zeros(0, dtype=np.int64)
    if unit.shape[0] <= unit.shape[1]:
        if np.linalg.eigvalsh(unit @ unit.T)[0] > FULL_RANK_EIGENVALUE:
            return nothing, nothing, np.zeros((0, 0))
    basis = _pivoted_basis(unit, DEPENDENCE_RTOL)
    others = np.setdiff1d(np.arange(weight.shape[0]), basis)
    if others.size == 0:
        return basis, nothing, np.zeros((0, basis.size))
    alpha = np.linalg.lstsq(weight[basis].T, weight[others].T, rcond=None)[0].T
    residual = np.linalg.norm(weight[others] - alpha @ weight[basis], axis=1) / row_norm[others]
    row_size = np.hypot(row_norm, np.abs(bias))
    amplification = (np.abs(alpha) @ row_size[basis]) / row_size[others]
    accept = (residual <= DEPENDENCE_RTOL) & (amplification <= MAX_AMPLIFICATION)
    return basis, others[accept], alpha[accept]


def _pivoted_basis(unit: np.ndarray, tolerance: float) -> np.ndarray:
    """Indices of a basis of the rows' span, chosen greedily for conditioning.

    Businger-Golub pivoting in Gram-Schmidt form: repeatedly take the row whose component
    orthogonal to the current basis is longest, stop when that length is at most ``tolerance``
    (rows are unit length). As in LAPACK's ``geqp3``, the squared lengths are downdated,
    ``|r_i|^2 -= (u_i . q)^2``, which costs one matrix-vector product per step; the downdate
    carries an absolute error of a few ``eps``, so once every remaining length is below
    ``sqrt(_DOWNDATE_FLOOR)`` the residuals of the rows left are recomputed explicitly and the
    sweep continues on them, where a ``1e-11`` threshold can be resolved. Every new direction is
    orthogonalised twice against the basis so that round-off does not build up over the steps.
    """
    n_rows, n_cols = unit.shape
    directions = np.empty((min(n_rows, n_cols), n_cols))
    available = np.ones(n_rows, dtype=bool)
    squared_length = np.ones(n_rows)
    chosen: list[int] = []
    while len(chosen) < directions.shape[0]:
        candidates = np.where(available, squared_length, -1.0)
        pivot = int(np.argmax(candidates))
        if candidates[pivot] <= _DOWNDATE_FLOOR:
            break
        direction = _orthogonal_part(unit[pivot], directions[: len(chosen)])
        direction /= np.linalg.norm(direction)
        squared_length -= (unit @ direction) ** 2
        directions[len(chosen)] = direction
        available[pivot] = False
        chosen.append(pivot)

    left = np.flatnonzero(available)
    residual = _orthogonal_part(unit[left], directions[: len(chosen)])
    while len(chosen) < directions.shape[0] and left.size:
        lengths = np.linalg.norm(residual, axis=1)
        best = int(np.argmax(lengths))
        if lengths[best] <= tolerance:
            break
        direction = _orthogonal_part(residual[best] / lengths[best], directions[: len(chosen)])
        direction /= np.linalg.norm(direction)
        residual -= np.outer(residual @ direction, direction)
        directions[len(chosen)] = direction
        chosen.append(int(left[best]))
        left = np.delete(left, best)
        residual = np.delete(residual, best, axis=0)
    return np.array(chosen, dtype=np.int64)


def _orthogonal_part(vectors: np.ndarray, orthonormal: np.ndarray) -> np.ndarray:
    """``v - Q^T Q v`` for rows ``Q`` orthonormal, applied twice ("twice is enough", Kahan)."""
    for _ in range(2):
        vectors = vectors - (vectors @ orthonormal.T) @ orthonormal
    return vectors


def _proportional_rows(
    rows: np.ndarray, positive_only: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Find rows ``r_k = c r_m`` (``c > 0``, or ``c != 0`` when ``positive_only`` is False).

    Returns ``(representative, duplicate, factor)``: each duplicate ``k`` with the earliest
    representative ``m < k`` it matches within ``PROPORTIONAL_RTOL``; a representative is a row
    with no earlier match, so merges never chain (a row whose only matches are themselves
    duplicates is kept for this pass and revisited by the fixpoint loop). ``c`` is the
    least-squares factor ``<r_k, r_m> / ||r_m||^2``; rows must be non-zero.
    """
    norm = np.linalg.norm(rows, axis=1)
    unit = rows / norm[:, None]
    cosine = unit @ unit.T
    similar = cosine if positive_only else np.abs(cosine)
    later, earlier = np.nonzero(np.tril(similar >= _CANDIDATE_COSINE, k=-1))
    factor = cosine[later, earlier] * norm[later] / norm[earlier]
    residual = np.linalg.norm(rows[later] - factor[:, None] * rows[earlier], axis=1)
    match = residual <= PROPORTIONAL_RTOL * norm[later]
    later, earlier, factor = later[match], earlier[match], factor[match]
    has_earlier_match = np.zeros(rows.shape[0], dtype=bool)
    has_earlier_match[later] = True
    onto_representative = ~has_earlier_match[earlier]
    later, earlier, factor = (
        later[onto_representative],
        earlier[onto_representative],
        factor[onto_representative],
    )
    # np.nonzero lists pairs row-major, so the first pair of each duplicate has the smallest m.
    duplicate, first = np.unique(later, return_index=True)
    return earlier[first], duplicate, factor[first]
