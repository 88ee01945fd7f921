"""The structural correspondence: ``B`` is ``A`` with units removed, nothing else changed.

A compressor that prunes (onnx-exact's channel pruning, onnxsim's ``stable_relu_prune``) writes
``B`` from ``A`` by deleting hidden units: a dead unit's row of its layer and its column of the
next. Every weight ``B`` keeps is a stored weight of ``A``, so the two read networks have the same
layers, and each row of ``B``'s layer ``k`` is *bit for bit* a row of ``A``'s layer ``k``
restricted to the columns of the units ``B`` kept in layer ``k - 1``. :func:`align` recovers that
map from the weights alone (no stability analysis, no dense product): per layer ``rows[i]``, the
unit of ``A`` that unit ``i`` of ``B`` is.

The proof it gives, by induction over the layers: suppose ``h^B_{k-1} = h^A_{k-1}[rows_{k-1}]``
for every ``x`` of the box and every unit of ``A`` outside ``rows_{k-1}`` has ``h = 0`` there.
Then ``y^A_k = W^A_k[:, rows_{k-1}] h^B_{k-1} + b^A_k``, and a row with ``W^B_k[i] =
W^A_k[rows_k[i], rows_{k-1}]`` and ``b^B_k[i] = b^A_k[rows_k[i]]`` (exact float64 equality) gives
``y^B_k[i] = y^A_k[rows_k[i]]``: the same real number, so ``h`` is equal too. The induction
carries on when every *removed* unit of ``A``'s layer ``k`` (a ReLU layer) has ``h = 0`` on the
box: a row whose kept weights are all zero and whose bias is ``<= 0`` by construction (``y = b``;
a passthrough neuron of a removed channel), every other one by a proof that it is INACTIVE
(:meth:`Alignment.targets`, proved by the stability engine's bounds and exact tiers on ``A``).
The output layer must keep every row in place. Then ``f_A = f_B`` exactly on the box: the bound
of every output direction is 0, with no canonical form, no round-off term and no MILP.

A unit ``B`` keeps may also lose its *outgoing* weights: the channel pruner removes a channel
dead in one Relu of a residual stream from that Relu's consumers only (a ``Gather`` before the
next Conv), so the unit stays but no real row of ``B``'s next layer reads it. Such columns
(zero on every real row of ``B``, not on ``A``'s) are left out of the row comparison, and the
unit is *silenced*: it must be proved INACTIVE in ``A`` like a removed one, since then it adds
0 to either network whatever its weights. A silenced column of auxiliary passthrough neurons
is traced back through their selection rows to the unit it carries.

Anything else — a permuted or rescaled unit, a folded BatchNormalization, a merged layer (a ReLU
proved the identity and removed), a different preprocessing — makes :func:`align` return None and
the proof falls back to the canonical walk (:mod:`onnx_exact.equivalence.canonical`).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.network import Network
from onnx_exact.core.sparse import SparseMatrix
from onnx_exact.core.verdicts import NeuronState, StabilityResult
from onnx_exact.equivalence.correspondence import (
    Correspondence,
    LayerMatch,
    prove_units_stable,
    quick_stability,
)
from onnx_exact.equivalence.proof import DirectionBound
from onnx_exact.equivalence.results import ProofResult

TARGETED_SHARE = 0.5
"""Fraction of the remaining time the exact tiers may spend on targets the bounds left open (the
rest stays for the canonical proof a failure falls back to)."""

HASH_BLOCK_ENTRIES = 1 << 21
"""Weight entries gathered at once while hashing rows (16 MiB of float64): bounds the memory of
:func:`align` whatever the layer's size."""


@dataclass
class LayerAlignment:
    """Layer ``layer`` of both networks: ``rows[i]`` is the unit of ``A`` that unit ``i`` of ``B``
    is; ``removed`` the units of ``A`` without a counterpart, ``zero`` those of them whose row on
    the kept inputs is 0 with bias ``<= 0`` (dead by construction)."""

    layer: int
    rows: np.ndarray
    removed: np.ndarray
    zero: np.ndarray
    silenced: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Units ``B`` keeps whose outgoing weights it dropped (see the module docstring)."""

    @property
    def targets(self) -> np.ndarray:
        """The removed and the silenced units: each needs a proof of being INACTIVE."""
        return np.concatenate([self.removed[~self.zero], self.silenced])


@dataclass
class Alignment:
    """Every layer's :class:`LayerAlignment` (see the module docstring)."""

    layers: list[LayerAlignment]
    swapped: bool = False
    """The roles are exchanged: ``A`` is ``B`` with units removed (:func:`align_pair`); the
    "full" network below is then ``B``."""

    def targets(self) -> dict[int, np.ndarray]:
        """Per layer of ``A``, the removed units that must be proved INACTIVE."""
        return {a.layer: a.targets for a in self.layers if a.targets.size}

    def unproved(self, stability: StabilityResult) -> dict[int, np.ndarray]:
        """The targets ``stability`` (of ``A``) does not prove INACTIVE."""
        out = {}
        for k, units in self.targets().items():
            dead = np.asarray(stability.layers[k].states)[units] == NeuronState.INACTIVE
            if not dead.all():
                out[k] = units[~dead]
        return out

    def removed(self, net_a: Network, which: str = "removed") -> int:
        """How many units of ``A`` (``which``: "removed", "targets" or "silenced") B lacks or
        does not read; auxiliary passthrough neurons are no units and are not counted."""
        return sum(int(net_a.layers[a.layer].real[getattr(a, which)].sum()) for a in self.layers)

    @property
    def tags(self) -> tuple[str, str]:
        """The names ("A"/"B") of the full and of the pruned network."""
        return ("B", "A") if self.swapped else ("A", "B")

    def correspondence(self, full: Network, pruned: Network) -> Correspondence:
        """The roles in :class:`Correspondence` terms: the pruned network's units and their
        counterparts are matched, the full network's removed units stable (dead); auxiliary
        neurons are no units. Layers of "A" come first."""
        tag_full, tag_pruned = self.tags
        layers_full, layers_pruned = [], []
        none = np.zeros(0, dtype=np.int64)
        for a in self.layers:
            lf, lp = full.layers[a.layer], pruned.layers[a.layer]
            if lf.relu:
                real_f = None if lf.auxiliary is None else lf.real
                real_p = None if lp.auxiliary is None else lp.real
                matched = np.sort(a.rows)
                layers_full.append(
                    LayerMatch(tag_full, a.layer, lf.name, matched, a.removed, none, real_f)
                )
                every = np.arange(lp.out_features)
                layers_pruned.append(
                    LayerMatch(tag_pruned, a.layer, lp.name, every, none, none, real_p)
                )
        ordered = (layers_pruned, layers_full) if self.swapped else (layers_full, layers_pruned)
        return Correspondence(ordered[0] + ordered[1])


def align_pair(net_a: Network, net_b: Network) -> Alignment | None:
    """:func:`align` of ``B`` to ``A``, else of ``A`` to ``B`` marked ``swapped`` (``check
    small.onnx big.onnx``: ``f_A = f_B`` is symmetric, the full network is analysed)."""
    alignment = align(net_a, net_b)
    if alignment is None:
        alignment = align(net_b, net_a)
        if alignment is not None:
            alignment.swapped = True
    return alignment


def align(net_a: Network, net_b: Network) -> Alignment | None:
    """The structural correspondence of ``B`` to ``A``, or None when ``B`` is not ``A`` with
    units removed (see the module docstring). Exact float64 comparisons only."""
    if len(net_a.layers) != len(net_b.layers) or net_a.in_features != net_b.in_features:
        return None
    map_a, map_b = net_a.input_map, net_b.input_map
    if not (np.array_equal(map_a.scale, map_b.scale) and np.array_equal(map_a.shift, map_b.shift)):
        return None
    kept = np.arange(net_a.in_features)
    layers = []
    last = len(net_a.layers) - 1
    for k, (la, lb) in enumerate(zip(net_a.layers, net_b.layers, strict=True)):
        if la.relu != lb.relu or lb.in_features != kept.size:
            return None
        rows = _match_rows(la.weight, la.bias, kept, lb.weight, lb.bias)
        if rows is None and k > 0:
            rows = _match_silenced(net_a, k, kept, lb, layers)
        if rows is None:
            return None
        removed = np.setdiff1d(np.arange(la.out_features), rows)
        if k == last and not np.array_equal(rows, np.arange(la.out_features)):
            return None  # the output coordinates must stay where they are
        # y = b on the box when the row is 0 on the kept inputs: dead (ReLU) for b <= 0,
        # identically 0 (no ReLU: the only removable linear unit) for b == 0.
        zero = np.array(
            [
                not np.any(_restricted(la.weight, [r], kept))
                and (la.bias[r] <= 0.0 if la.relu else la.bias[r] == 0.0)
                for r in removed.tolist()
            ],
            dtype=bool,
        )
        if not la.relu and not zero.all():
            return None
        layers.append(LayerAlignment(k, rows, removed, zero))
        kept = rows
    return Alignment(layers)


def _match_silenced(
    net_a: Network, k: int, kept: np.ndarray, lb, layers: list[LayerAlignment]
) -> np.ndarray | None:
    """:func:`_match_rows` of layer ``k`` without the columns ``B`` silenced (zero on every real
    row of ``B``, not on ``A``'s); their units, traced back to real ones, are recorded on
    ``layers`` as silenced. None when there are none or the rows still differ."""
    la = net_a.layers[k]
    zero_b = ~_column_nonzero(lb.weight, np.flatnonzero(lb.real), np.arange(kept.size))
    nonzero_a = _column_nonzero(la.weight, np.flatnonzero(la.real), kept)
    columns = np.flatnonzero(zero_b & nonzero_a)
    if columns.size == 0:
        return None
    units = [_carried_unit(net_a, k - 1, int(u)) for u in kept[columns]]
    if any(unit is None for unit in units):
        return None
    inner = np.setdiff1d(np.arange(kept.size), columns)
    rows = _match_rows(la.weight, la.bias, kept[inner], lb.weight, lb.bias, inner)
    if rows is not None:
        for layer, unit in units:
            found = layers[layer]
            if unit not in found.removed:  # a removed unit is a target already
                found.silenced = np.union1d(found.silenced, [unit]).astype(np.int64)
    return rows


def _column_nonzero(weight, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whether each column ``cols`` of ``weight`` has a non-zero entry on ``rows`` (a dense
    weight in blocks of rows, as :func:`_row_keys` reads it)."""
    if isinstance(weight, np.ndarray):
        found = np.zeros(cols.size, dtype=bool)
        block = max(1, HASH_BLOCK_ENTRIES // max(cols.size, 1))
        for start in range(0, rows.size, block):
            found |= np.any(weight[np.ix_(rows[start : start + block], cols)] != 0, axis=0)
        return found
    restricted = _sparse_rows(weight, cols)
    on_rows = np.isin(restricted.row_ids, rows)
    return np.bincount(restricted.indices[on_rows], minlength=cols.size) > 0


def _carried_unit(net: Network, layer: int, unit: int) -> tuple[int, int] | None:
    """``(layer, unit)`` of the real ReLU unit that neuron ``unit`` of ``layer`` is, following
    auxiliary selection rows (weight 1 on one column, bias 0: ``relu(h) = h`` for ``h >= 0``)
    down the layers; None for a neuron that is neither (a pair ``relu(±s)``, a kink)."""
    while layer >= 0:
        current = net.layers[layer]
        if not current.relu:
            return None
        if current.real[unit]:
            return layer, unit
        row = _restricted(current.weight, np.asarray([unit]), np.arange(current.in_features))
        where = np.flatnonzero(row[0])
        if where.size != 1 or row[0, where[0]] != 1.0 or current.bias[unit] != 0.0 or layer == 0:
            return None
        layer, unit = layer - 1, int(where[0])
    return None


def _restricted(weight, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``weight[rows][:, cols]`` as a dense array, for an ndarray or a
    :class:`~onnx_exact.core.sparse.SparseMatrix` weight."""
    if isinstance(weight, np.ndarray):
        return weight[np.ix_(rows, cols)]
    return weight.rows(rows)[:, cols]


def _row_keys(weight: np.ndarray, bias: np.ndarray, rows: np.ndarray, kept: np.ndarray) -> list:
    """A digest of each row ``weight[r, kept]`` with its bias (``-0.0`` read as ``0.0``), in
    blocks of rows so that no copy of the whole restricted matrix is made."""
    keys = []
    block = max(1, HASH_BLOCK_ENTRIES // max(kept.size, 1))
    for start in range(0, rows.size, block):
        chunk = rows[start : start + block]
        values = np.concatenate([_restricted(weight, chunk, kept), bias[chunk, None]], axis=1)
        values = values + 0.0
        values = np.ascontiguousarray(values)
        keys += [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in values]
    return keys


def _sparse_rows(weight, kept: np.ndarray) -> SparseMatrix:
    """``weight[:, kept]`` as a SparseMatrix over the ``kept.size`` columns: each row's stored
    (column, value) pairs, sorted and without zeros, are its canonical form."""
    if isinstance(weight, np.ndarray):
        return SparseMatrix.from_dense(weight[:, kept])
    position = np.full(weight.shape[1], -1, dtype=np.int64)
    position[kept] = np.arange(kept.size)
    cols = position[weight.indices]
    inside = cols >= 0
    shape = (weight.shape[0], kept.size)
    return SparseMatrix.from_coo(weight.row_ids[inside], cols[inside], weight.data[inside], shape)


def _sparse_row(matrix: SparseMatrix, bias: np.ndarray, r: int) -> tuple[bytes, bytes, float]:
    span = slice(matrix.indptr[r], matrix.indptr[r + 1])
    cols = matrix.indices[span].astype(np.int64)
    return cols.tobytes(), matrix.data[span].tobytes(), float(bias[r]) + 0.0


def _match_rows(
    weight_a: np.ndarray,
    bias_a: np.ndarray,
    kept: np.ndarray,
    weight_b: np.ndarray,
    bias_b: np.ndarray,
    cols_b: np.ndarray | None = None,
) -> np.ndarray | None:
    """For each row of ``B``, a distinct row of ``A`` equal to it on ``kept`` (``B``'s on
    ``cols_b``, all by default; bias too), the earliest unused first; None if some row of ``B``
    has none. Digests find the candidates, an exact comparison decides. A sparse layer (on
    either side) is compared in the sparse canonical form of :func:`_sparse_rows`: no dense row
    of a 30k-column layer is hashed."""
    identity = np.arange(weight_b.shape[1]) if cols_b is None else cols_b
    if not (isinstance(weight_a, np.ndarray) and isinstance(weight_b, np.ndarray)):
        return _match_sparse_rows(
            _sparse_rows(weight_a, kept), bias_a, _sparse_rows(weight_b, identity), bias_b
        )
    rows_a = np.arange(weight_a.shape[0])
    pool: dict[bytes, deque[int]] = {}
    for row, key in zip(rows_a.tolist(), _row_keys(weight_a, bias_a, rows_a, kept), strict=True):
        pool.setdefault(key, deque()).append(row)
    out = np.empty(weight_b.shape[0], dtype=np.int64)
    keys_b = _row_keys(weight_b, bias_b, np.arange(weight_b.shape[0]), identity)
    for i, key in enumerate(keys_b):
        candidates = pool.get(key)
        if not candidates:
            return None
        r = candidates.popleft()
        same = np.array_equal(
            _restricted(weight_a, [r], kept), _restricted(weight_b, [i], identity)
        )
        if bias_a[r] != bias_b[i] or not same:
            return None
        out[i] = r
    return out


def _match_sparse_rows(
    rows_a: SparseMatrix, bias_a: np.ndarray, rows_b: SparseMatrix, bias_b: np.ndarray
) -> np.ndarray | None:
    """:func:`_match_rows` on canonical sparse rows: the rows' (columns, values, bias) bytes are
    the dictionary keys themselves, so equal keys are equal rows."""
    pool: dict[tuple, deque[int]] = {}
    for r in range(rows_a.shape[0]):
        pool.setdefault(_sparse_row(rows_a, bias_a, r), deque()).append(r)
    out = np.empty(rows_b.shape[0], dtype=np.int64)
    for i in range(rows_b.shape[0]):
        candidates = pool.get(_sparse_row(rows_b, bias_b, i))
        if not candidates:
            return None
        out[i] = candidates.popleft()
    return out


def prove_structurally(
    full: Network,
    pruned: Network,
    box: Box,
    tol: float,
    alignment: Alignment,
    stability: StabilityResult | None,
    deadline: float,
    *,
    seed: int = 0,
    jobs: int = 1,
) -> tuple[ProofResult | None, StabilityResult]:
    """The proof of ``f_A = f_B`` from ``alignment``; None when a target stays unproved with time
    left (the canonical proof may still decide the pair), "not proved" when the time is up.

    ``full`` is the network ``alignment`` removes units from (``A``, or ``B`` when
    ``alignment.swapped``), ``pruned`` the other. ``stability`` of ``full`` (e.g. ``compress``'s
    analysis) is used as it is; without it :func:`quick_stability` bounds ``full`` up to the
    deepest target. Targets it leaves open go to :func:`prove_units_stable` with
    ``TARGETED_SHARE`` of the time left. Returns the result (a proof bounds every direction by 0:
    the functions are equal, not merely close) and ``full``'s verdicts for a caller that falls
    back to the canonical proof.
    """
    targets = alignment.targets()
    stage = time.monotonic()
    if stability is None:
        stability = quick_stability(full, box, seed, targets, deadline)
    timings = {"stability": time.monotonic() - stage}
    unproved = alignment.unproved(stability)
    targeted = sum(units.size for units in unproved.values())
    proved = 0
    if unproved and time.monotonic() < deadline:
        stage = time.monotonic()
        budget = TARGETED_SHARE * (deadline - stage) if np.isfinite(deadline) else None
        stability, proved = prove_units_stable(full, box, stability, unproved, budget, jobs=jobs)
        timings["stable-units"] = time.monotonic() - stage
        unproved = alignment.unproved(stability)
    if unproved and time.monotonic() < deadline:
        return None, stability  # a removed unit not proved dead: the canonical proof decides
    tag_full, tag_pruned = alignment.tags
    removed = alignment.removed(full)
    if unproved:
        count = sum(units.size for units in unproved.values())
        open_result = ProofResult(
            "not proved",
            tol,
            np.inf,
            directions=[
                DirectionBound(o, sign, np.inf, "", "open")
                for o in range(full.out_features)
                for sign in (1, -1)
            ],
            output_tensor=full.output_name,
            timings_s=timings,
            time_limit_hit=True,
            notes=[
                f"structural correspondence: {tag_pruned} is {tag_full} with {removed} hidden "
                f"units removed; {count} of them were not proved inactive within the time limit"
            ],
        )
        return open_result, stability
    method = "stable-units" if targets else "matched"
    correspondence = alignment.correspondence(full, pruned)
    correspondence.targeted, correspondence.proved_stable = targeted, proved
    directions = [
        DirectionBound(o, sign, 0.0, method, "proved")
        for o in range(full.out_features)
        for sign in (1, -1)
    ]
    silenced = alignment.removed(full, "silenced")
    dead = alignment.removed(full, "targets") - silenced
    result = ProofResult(
        "proved",
        tol,
        0.0,
        tiers=[method],
        directions=directions,
        free_neurons=correspondence.count("matched", tag_pruned),
        shared_neurons=correspondence.count("matched", tag_full),
        output_tensor=full.output_name,
        timings_s=timings,
        correspondence=correspondence,
        notes=[_note(removed, dead, alignment.tags, silenced)],
    )
    return result, stability


def _note(removed: int, dead: int, tags: tuple[str, str], silenced: int = 0) -> str:
    full, pruned = tags
    quiet = (
        f"; {silenced} units {pruned} keeps but no longer reads are proved inactive on the box"
        if silenced
        else ""
    )
    if not removed:
        weights = "kept weight" if silenced else "weight"
        return (
            f"structural correspondence: every {weights} of {pruned} is {full}'s{quiet}, so "
            "f_A = f_B exactly"
        )
    return (
        f"structural correspondence: {pruned} is {full} with {removed} hidden units removed "
        f"({dead} proved inactive on the box, {removed - dead} zero by construction) and every "
        f"kept weight identical{quiet}, so f_A = f_B exactly on the box"
    )
