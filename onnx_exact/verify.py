"""Sampled equivalence of two ONNX models on a box, checked with onnxruntime.

The proofs make the compressed model exactly equal to the original in real arithmetic; this module
checks the float32 artefacts that onnxruntime actually runs. Inputs, all clipped into the box:

* the box centre and its all-lower and all-upper corners;
* ``extra_inputs`` (typically the analysis's witnesses: they sit next to ReLU kinks, where a wrong
  stability decision shows first);
* Bernoulli corners: each feature at its upper bound with probability ``p`` in (0.1, 0.5, 0.9),
  else at its lower bound (vertices are where linear regions are extreme);
* uniform samples in the box.

Comparison follows Polygraphy: for a float output element with candidate value ``a`` and reference
value ``b`` the check fails only if ``|a - b| > atol`` AND ``|a - b| > rtol * |b|``. Integer, bool
and string outputs (ArgMax labels) must be equal; ZipMap outputs (sequences of maps) must have the
same keys and values within the float tolerance. Samples stream through in chunks, so memory does
not grow with the sample count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx_exact.core.box import Box
from onnx_exact.core.errors import UsageError, VerificationError
from onnx_exact.core.network import Network
from onnx_exact.core.tolerance import DEFAULT_ATOL, DEFAULT_RTOL, tolerance_for
from onnx_exact.io.onnx_reader import ReadResult
from onnx_exact.io.runtime import (
    MAX_DECLARED_BATCH,
    feed_for,
    map_rows_to_array,
    run_chunk,
    run_model,
    session_of,
)
from onnx_exact.io.staging import is_large

CHUNK_SAMPLES = MAX_DECLARED_BATCH
"""Samples per streamed chunk (a 3072-feature chunk is 12 MiB in float64); a chunk fits the largest
fixed batch a model is fed as declared."""

BERNOULLI_PROBABILITIES = (0.1, 0.5, 0.9)
"""Probabilities of a feature sitting at its upper bound in the corner samples."""

_FLOAT_TENSOR_TYPES = {"tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"}


@dataclass
class OutputComparison:
    """How one graph output of the candidate matched the reference over all inputs.

    Attributes
    ----------
    name : the output.
    max_abs_diff : ``max |a - b|`` over all elements (for labels: of the numeric values).
    max_rel_diff : ``max |a - b| / |b|`` (``inf`` where ``b == 0 != a``).
    where_abs : index of the input (in generation order) that attains ``max_abs_diff``; for
        exact outputs the first input with a mismatch.
    required_atol : the smallest atol that passes with the given rtol:
        ``max |a - b|`` over elements with ``|a - b| > rtol |b|`` (0 if none; ``inf`` for a
        mismatching exact output).
    required_rtol : the smallest rtol that passes with the given atol:
        ``max |a - b| / |b|`` over elements with ``|a - b| > atol`` (0 if none).
    passed : no element failed.
    mismatched_elements : elements that failed (exact outputs: unequal entries; float outputs:
        entries beyond both tolerances).
    """

    name: str
    max_abs_diff: float
    max_rel_diff: float
    where_abs: int
    required_atol: float
    required_rtol: float
    passed: bool
    mismatched_elements: int = 0


@dataclass
class EquivalenceReport:
    """The verdict over all outputs and all inputs tried.

    ``worst_input`` is the flattened raw input (as fed, i.e. after the cast to the input's dtype)
    where the worst output differed most: the first place to look when the check fails.
    """

    samples: int
    outputs: list[OutputComparison]
    passed: bool
    atol: float | dict[str, float]
    rtol: float | dict[str, float]
    max_abs_diff: float
    max_rel_diff: float
    worst_input: np.ndarray = field(repr=False)


# ----------------------------------------------------------------------------- inputs


def verification_inputs(
    box: Box,
    extra_inputs: np.ndarray | None,
    samples: int,
    seed: int,
    chunk: int = CHUNK_SAMPLES,
) -> Iterator[np.ndarray]:
    """Chunks of raw float64 inputs ``(m, n)`` inside ``box``, deterministic in ``seed``.

    Order: centre, all-lower, all-upper; the extra inputs (clipped into the box; rows with NaN
    dropped); ``samples // 10`` Bernoulli corners for each probability; uniform samples for the
    rest of ``samples``.
    """
    lower, upper = box.lower, box.upper
    rng = np.random.default_rng(seed)
    yield np.stack([box.center, lower, upper])
    if extra_inputs is not None:
        extra = np.atleast_2d(np.asarray(extra_inputs, dtype=np.float64))
        if extra.shape[1] != box.size:
            raise UsageError(
                f"extra_inputs have {extra.shape[1]} features per row, the box has {box.size}"
            )
        extra = extra[~np.isnan(extra).any(axis=1)]
        for start in range(0, extra.shape[0], chunk):
            yield np.clip(extra[start : start + chunk], lower, upper)
    corners_per_probability = samples // 10
    for probability in BERNOULLI_PROBABILITIES:
        for start in range(0, corners_per_probability, chunk):
            m = min(chunk, corners_per_probability - start)
            yield np.where(rng.random((m, box.size)) < probability, upper, lower)
    uniform = samples - corners_per_probability * len(BERNOULLI_PROBABILITIES)
    for start in range(0, uniform, chunk):
        m = min(chunk, uniform - start)
        yield lower + rng.random((m, box.size)) * (upper - lower)


def cast_inside(x: np.ndarray, box: Box, dtype: np.dtype) -> np.ndarray:
    """``x`` in ``dtype``, rounded toward the inside of the box where rounding left it.

    Nearest rounding can put a float32 value just past a bound that is not a float32 number;
    one ``nextafter`` step back fixes that. A degenerate feature whose single value is not
    representable keeps its nearest value (no representable point lies inside).
    """
    cast = x.astype(dtype)
    if dtype == np.float64:
        return cast
    widened = cast.astype(np.float64)
    above, below = widened > box.upper, widened < box.lower
    nudged = np.where(above, np.nextafter(cast, dtype.type(-np.inf)), cast)
    nudged = np.where(below, np.nextafter(cast, dtype.type(np.inf)), nudged)
    nudged64 = nudged.astype(np.float64)
    still_outside = (nudged64 > box.upper) | (nudged64 < box.lower)
    return np.where(still_outside, cast, nudged)


# ----------------------------------------------------------------------------- statistics


class _OutputStats:
    """Running comparison of one output over the chunks (all reductions vectorised per chunk)."""

    def __init__(self, name: str, exact: bool, atol: float, rtol: float) -> None:
        self.name, self.exact, self.atol, self.rtol = name, exact, atol, rtol
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.where = -1
        self.worst_row: np.ndarray | None = None
        self.required_atol = 0.0
        self.required_rtol = 0.0
        self.mismatched = 0

    def update(self, candidate: np.ndarray, reference: np.ndarray, offset: int, fed: np.ndarray):
        if candidate.shape != reference.shape:
            raise VerificationError(
                f"output {self.name!r}: candidate shape {list(candidate.shape[1:])} per sample, "
                f"reference {list(reference.shape[1:])}"
            )
        m = reference.shape[0]
        if self.exact:
            self._update_exact(candidate.reshape(m, -1), reference.reshape(m, -1), offset, fed)
        else:
            self._update_float(candidate.reshape(m, -1), reference.reshape(m, -1), offset, fed)

    def _update_exact(self, a: np.ndarray, b: np.ndarray, offset: int, fed: np.ndarray) -> None:
        unequal = a != b
        count = int(unequal.sum())
        if not count:
            return
        if np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            self.max_abs = max(self.max_abs, float(diff.max()))
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(unequal, diff / np.abs(b.astype(np.float64)), 0.0)
            self.max_rel = max(self.max_rel, float(rel.max()))
        else:
            self.max_abs = self.max_rel = np.inf
        if not self.mismatched:
            first = int(np.flatnonzero(unequal.any(axis=1))[0])
            self.where, self.worst_row = offset + first, fed[first].copy()
        self.mismatched += count
        self.required_atol = self.required_rtol = np.inf

    def _update_float(self, a: np.ndarray, b: np.ndarray, offset: int, fed: np.ndarray) -> None:
        a, b = a.astype(np.float64), b.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            raw = np.abs(a - b)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        diff = np.where(same, 0.0, np.nan_to_num(raw, nan=np.inf))
        magnitude = np.abs(b)
        rel = np.divide(diff, magnitude, out=np.where(diff > 0, np.inf, 0.0), where=magnitude > 0)
        beyond_rtol = diff > self.rtol * magnitude
        beyond_atol = diff > self.atol
        self.mismatched += int((beyond_rtol & beyond_atol).sum())
        if beyond_rtol.any():
            self.required_atol = max(self.required_atol, float(diff[beyond_rtol].max()))
        if beyond_atol.any():
            self.required_rtol = max(self.required_rtol, float(rel[beyond_atol].max()))
        self.max_rel = max(self.max_rel, float(rel.max(initial=0.0)))
        row_max = diff.max(axis=1, initial=0.0)
        worst = int(np.argmax(row_max))
        if self.where < 0 or row_max[worst] > self.max_abs:
            self.max_abs = float(row_max[worst])
            self.where = offset + worst
            self.worst_row = fed[worst].copy()

    def result(self) -> OutputComparison:
        return OutputComparison(
            name=self.name,
            max_abs_diff=self.max_abs,
            max_rel_diff=self.max_rel,
            where_abs=self.where,
            required_atol=self.required_atol,
            required_rtol=self.required_rtol,
            passed=self.mismatched == 0,
            mismatched_elements=self.mismatched,
        )


# ----------------------------------------------------------------------------- comparison


def compare_models(
    reference: onnx.ModelProto | str | os.PathLike,
    candidate: onnx.ModelProto | str | os.PathLike,
    box: Box,
    *,
    extra_inputs: np.ndarray | None = None,
    samples: int = 2000,
    seed: int = 0,
    atol: float | dict[str, float] = DEFAULT_ATOL,
    rtol: float | dict[str, float] = DEFAULT_RTOL,
) -> EquivalenceReport:
    """Compare every output of ``candidate`` with ``reference`` on inputs drawn from ``box``.

    Parameters
    ----------
    reference, candidate : models or paths; both must take the box's input (a single-input model
        is fed through its one input whatever its name) and have the same output names.
    box : the domain, over the flattened raw input.
    extra_inputs : raw flattened points ``(k, n)`` to try as well (clipped into the box).
    samples : random inputs: a tenth each of Bernoulli(0.1/0.5/0.9) corners, the rest uniform.
    seed : makes the inputs reproducible.
    atol, rtol : Polygraphy tolerances, a number or ``{output name: value}`` with an optional
        default under ``""`` (else ``DEFAULT_ATOL``/``DEFAULT_RTOL``: see
        :mod:`onnx_exact.core.tolerance`).

    Raises
    ------
    VerificationError
        When the outputs differ in names, per-sample shapes or map keys (no tolerance applies).
    UsageError
        When a per-output tolerance names an output the models do not have (a typo would
        otherwise leave that output at the default tolerance without a word).
    """
    reference_session = session_of(reference, box.size)
    candidate_session = session_of(candidate, box.size)
    reference_feed = feed_for(reference_session, box.size, box.input_name)
    candidate_feed = feed_for(candidate_session, box.size, box.input_name)
    reference_outputs = {o.name: o.type for o in reference_session.get_outputs()}
    candidate_outputs = {o.name for o in candidate_session.get_outputs()}
    if set(reference_outputs) != candidate_outputs:
        raise VerificationError(
            f"the models' outputs differ: reference {sorted(reference_outputs)}, candidate "
            f"{sorted(candidate_outputs)}"
        )
    for option, value in (("--atol", atol), ("--rtol", rtol)):
        known = (*reference_outputs, "", "*")
        unknown = [k for k in value if k not in known] if isinstance(value, Mapping) else []
        if unknown:
            raise UsageError(
                f"{option} {unknown[0]}:{value[unknown[0]]:g}: the model has no output "
                f"'{unknown[0]}' (its outputs: {', '.join(map(repr, reference_outputs))}); "
                "name one of them, or give a value for every output"
            )
    stats = {
        name: _OutputStats(
            name,
            exact=kind not in _FLOAT_TENSOR_TYPES and not kind.startswith("seq(map("),
            atol=tolerance_for(atol, name, DEFAULT_ATOL),
            rtol=tolerance_for(rtol, name, DEFAULT_RTOL),
        )
        for name, kind in reference_outputs.items()
    }
    offset = 0
    for chunk in verification_inputs(box, extra_inputs, samples, seed):
        fed = cast_inside(chunk, box, reference_feed.dtype)
        reference_values = run_chunk(reference_session, reference_feed, fed)
        candidate_values = run_chunk(
            candidate_session, candidate_feed, fed.astype(candidate_feed.dtype)
        )
        fed64 = fed.astype(np.float64)
        for name, output_stats in stats.items():
            reference_value, candidate_value = reference_values[name], candidate_values[name]
            if isinstance(reference_value, list):
                reference_keys, reference_value = map_rows_to_array(reference_value, name)
                candidate_keys, candidate_value = map_rows_to_array(candidate_value, name)
                if set(reference_keys) != set(candidate_keys):
                    raise VerificationError(
                        f"output {name!r}: map keys differ (reference {reference_keys}, "
                        f"candidate {candidate_keys})"
                    )
                order = [candidate_keys.index(key) for key in reference_keys]
                candidate_value = candidate_value[:, order]
            output_stats.update(candidate_value, reference_value, offset, fed64)
        offset += chunk.shape[0]
    comparisons = [output_stats.result() for output_stats in stats.values()]
    failing = [s for s in stats.values() if s.mismatched] or list(stats.values())
    worst = max(failing, key=lambda s: s.max_abs)
    return EquivalenceReport(
        samples=offset,
        outputs=comparisons,
        passed=all(c.passed for c in comparisons),
        atol=atol,
        rtol=rtol,
        max_abs_diff=max(c.max_abs_diff for c in comparisons),
        max_rel_diff=max(c.max_rel_diff for c in comparisons),
        worst_input=worst.worst_row if worst.worst_row is not None else box.center.copy(),
    )


ROUNDOFF_FACTOR = 4.0
"""Default verification atol = max(DEFAULT_ATOL, this × the input model's own measured float
round-off)."""


ROUNDOFF_SAMPLES = 512


def measured_roundoff(read: ReadResult, box: Box, seed: int) -> dict[str, float]:
    """How far onnxruntime's evaluation of the *input* model is from exact (float64) arithmetic.

    Max over box samples and vertices of ``|f_onnxruntime(x) - f_float64(x)|`` for the graph output
    that is the network's own output tensor (outputs behind a tail are not measured). Folding layers
    changes the float32 rounding, so the compressed model can differ from the original by about
    this much even though both compute the same exact function: this is the scale against which
    "equal up to float round-off" is judged and reported.
    """
    return model_roundoff(
        read.model, read.network, read.input_dtype, box, seed, path=reference_model_path(read)
    )


def reference_model_path(read: ReadResult) -> Path | None:
    """Run the input model from its file only when it is too large to serialise from memory.

    What is verified is the written output, loaded from its path; the reference is the input as
    read (external data loaded), so an input onnxruntime cannot load from its own path (an int64
    shape kept in external data) is still a valid reference.
    """
    if read.path is not None and is_large(read.model):
        return read.path
    return None


def model_roundoff(
    model: onnx.ModelProto,
    network: Network,
    input_dtype: np.dtype,
    box: Box,
    seed: int,
    *,
    path: str | os.PathLike | None = None,
) -> dict[str, float]:
    """``max |f_onnxruntime(x) - network.forward(x)|`` over box samples and vertices (see above).

    For the compressed model ``network`` is the reduced network in float64, so this includes the
    rounding of its folded weights to the model's dtype: the compressed model's own round-off,
    which can exceed the input model's (a folded product ``W2 W1`` with cancelling terms).
    With ``path`` onnxruntime runs that file (``model`` as saved) instead of the in-memory proto.
    """
    if network.output_name not in [o.name for o in model.graph.output]:
        return {}
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [
            rng.uniform(box.lower, box.upper, size=(ROUNDOFF_SAMPLES, box.size)),
            np.where(rng.random((ROUNDOFF_SAMPLES, box.size)) < 0.5, box.upper, box.lower),
        ]
    )
    x = x.astype(input_dtype).astype(np.float64)
    x = np.clip(x, box.lower, box.upper)
    got = np.asarray(run_model(path or model, x)[network.output_name], dtype=np.float64)
    exact = network.forward(x)
    return {network.output_name: float(np.max(np.abs(got.reshape(exact.shape) - exact)))}


def written_roundoff(
    written: ReadResult, reduced: Network, box: Box, seed: int
) -> dict[str, float]:
    """The written file's own float error, only as far as it is round-off.

    ``model_roundoff`` against the network read back from the file (onnxruntime's arithmetic on
    the stored weights), plus ``max |f_stored(x) - f_reduced(x)|`` in float64 (the rounding of the
    reduced weights to the stored dtype) *only if* every stored weight and bias is within two ulps
    of the reduced one. A damaged or wrongly written file thus gets no allowance for its wrong
    weights: measured against the reduced network its "round-off" would be the whole error and
    would raise the verification atol enough to pass it.
    """
    dtype = written.input_dtype
    arithmetic = model_roundoff(written.model, written.network, dtype, box, seed, path=written.path)
    coarsest = max((layer.weight_dtype for layer in written.binding.layers), key=_eps)
    if not arithmetic or not _rounded_copy(written.network, reduced, coarsest):
        return arithmetic
    x = np.clip(
        np.random.default_rng(seed).uniform(box.lower, box.upper, (ROUNDOFF_SAMPLES, box.size)),
        box.lower,
        box.upper,
    )
    rounding = float(np.max(np.abs(written.network.forward(x) - reduced.forward(x))))
    return {name: value + rounding for name, value in arithmetic.items()}


def _eps(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).eps)


def _rounded_copy(stored: Network, reduced: Network, dtype: np.dtype) -> bool:
    """Whether ``stored``'s layers are ``reduced``'s rounded to ``dtype`` (two ulps each)."""
    if len(stored.layers) != len(reduced.layers):
        return False
    eps = _eps(dtype)
    tiny = float(np.finfo(dtype).tiny)
    for a, b in zip(stored.layers, reduced.layers, strict=True):
        if a.weight.shape != b.weight.shape or a.relu != b.relu:
            return False
        for got, want in ((a.weight, b.weight), (a.bias, b.bias)):
            if np.any(np.abs(got - want) > 2 * eps * np.abs(want) + tiny):
                return False
    return True


def roundoff_atol(atol: float, roundoff: dict[str, float]) -> float | dict[str, float]:
    raised = {name: max(atol, ROUNDOFF_FACTOR * r) for name, r in roundoff.items()}
    if all(value == atol for value in raised.values()):
        return atol
    return {**raised, "": atol}
