"""``onnx-exact check``: are two ONNX models the same on a box? Sampled, then proved.

Sampling (:func:`onnx_exact.verify.compare_models`) runs both models in onnxruntime on the box
centre, its corners, Bernoulli corners, uniform samples and the kink-adjacent witnesses of the
stability analysis. It cannot see a difference confined to a thin region of the box; the proof
(:func:`onnx_exact.equivalence.prover.prove_equivalence`) can, on the networks the reader extracts.
Here the two are wired to the models: the proof's tolerance is ``atol`` of the output it bounds, its
candidate counterexamples are replayed in onnxruntime, a sampled failure the proof shows to be
float round-off is judged again, and a counterexample is saved in the model's input shape.
"""

from __future__ import annotations

import os
import time

import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.errors import OnnxExactError, UsageError
from onnx_exact.core.network import Network
from onnx_exact.core.tolerance import DEFAULT_ATOL, DEFAULT_RTOL, tolerance_for
from onnx_exact.core.verdicts import StabilityResult
from onnx_exact.equivalence.correspondence import quick_stability
from onnx_exact.equivalence.proof import Counterexample
from onnx_exact.equivalence.prover import ProgressCallback, Replay, prove_equivalence
from onnx_exact.equivalence.results import CheckReport, ProofResult
from onnx_exact.equivalence.structural import align_pair
from onnx_exact.io.domain_sources import InputLayout, model_input_dims
from onnx_exact.io.graph import output_names
from onnx_exact.io.onnx_reader import ModelSource, ReadResult, read_model
from onnx_exact.io.runtime import run_model
from onnx_exact.io.save import numpy_save_path, write_file_atomic
from onnx_exact.verify import (
    ROUNDOFF_FACTOR,
    EquivalenceReport,
    compare_models,
    model_roundoff,
)


def _read(source: ModelSource) -> tuple[ReadResult | None, str, str]:
    """``(read result or None, label, why the proof cannot use it)``."""
    if isinstance(source, ReadResult):
        label = str(source.path) if source.path else "<in-memory model>"
        return source, label, ""
    label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<in-memory model>"
    try:
        return read_model(source), label, ""
    except OnnxExactError as err:
        if isinstance(err, UsageError):
            raise
        return None, label, str(err)


def _raw_witnesses(net: Network, box: Box, stability: StabilityResult) -> np.ndarray:
    """The analysis's kink-adjacent witnesses, mapped back to raw inputs inside the box."""
    if stability.witnesses.size == 0:
        return np.zeros((0, box.size))
    raw = net.input_map.invert(stability.witnesses, box.center)
    return np.clip(raw, box.lower, box.upper)


def _runnable(read: ReadResult) -> ModelSource:
    """What onnxruntime runs: the file a model was read from (loaded as a user loads it, so a
    file onnxruntime cannot load fails), else the in-memory model."""
    return read.path if read.path is not None else read.model


def _onnx_replay(
    model_a: ModelSource,
    model_b: ModelSource,
    outputs: list[str],
    tols: list[float],
    same_tensor: bool,
) -> Replay:
    """Replay a raw input in onnxruntime (see :data:`Replay`). ``same_tensor``: ``outputs`` is
    the networks' end tensor alone, so a coordinate of the proof is a coordinate of it."""

    def replay(x_raw: np.ndarray, coordinate: int) -> tuple[float, bool, str]:
        values_a = run_model(model_a, x_raw)
        values_b = run_model(model_b, x_raw)
        largest, exceeds, at_coordinate = 0.0, False, None
        for name, tol in zip(outputs, tols, strict=True):
            a, b = np.asarray(values_a[name]), np.asarray(values_b[name])
            if not (np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number)):
                continue
            gaps = np.abs(a.astype(np.float64) - b.astype(np.float64)).ravel()
            largest = max(largest, float(gaps.max(initial=0.0)))
            exceeds = exceeds or bool((gaps > tol).any())
            if same_tensor and coordinate < gaps.size:
                at_coordinate = float(gaps[coordinate])
        if at_coordinate is not None:
            return at_coordinate, exceeds, f"onnxruntime at the same coordinate of {outputs[0]!r}"
        names = ", ".join(repr(name) for name in outputs)
        return (
            largest,
            exceeds,
            f"onnxruntime, largest on the graph outputs {names} (after the tail)",
        )

    return replay


def check_equivalence(
    a: ModelSource,
    b: ModelSource,
    box: Box,
    *,
    atol: float | dict[str, float] = DEFAULT_ATOL,
    rtol: float | dict[str, float] = DEFAULT_RTOL,
    samples: int = 10_000,
    seed: int = 0,
    prove: bool = True,
    time_limit: float | None = None,
    counterexample_path: str | os.PathLike | None = None,
    stability_a: StabilityResult | None = None,
    jobs: int = 1,
    progress: ProgressCallback | None = None,
) -> CheckReport:
    """Compare two models on a box: onnxruntime samples, then (if possible) a proof.

    Parameters
    ----------
    a, b : paths, ModelProtos or :class:`ReadResult`; ``a`` is the reference.
    box : raw-input box (``onnx_exact.io.domain_sources.resolve_domain``).
    atol, rtol : Polygraphy tolerances for the samples (a number or ``{output: value}`` with a
        default under ``""``); the proof's absolute tolerance is ``atol`` of the proved output.
    samples, seed : random inputs of the sampled check (plus centre, corners and witnesses).
    prove : run the proof when both models are ReLU networks the reader accepts.
    time_limit : seconds for the stability analyses and the proof together (what sampling took is
        deducted); on expiry the proof is "not proved", never "equivalent".
    counterexample_path : where to ``np.save`` a counterexample (the model's per-sample input
        shape, its input dtype) when the proof finds one.
    stability_a : a stability analysis of ``a`` over ``box`` to reuse (``compress`` has one).
    jobs : worker processes of the proof (targeted stability analyses, per-direction MILPs).
    progress : optional ``progress(phase, done, total)`` callback of the proof.

    Raises
    ------
    VerificationError
        The models' output names or per-sample shapes differ (no tolerance applies).
    """
    timings: dict[str, float] = {}
    started = stage = time.monotonic()
    deadline = np.inf if time_limit is None else started + time_limit
    read_a, label_a, why_a = _read(a)
    read_b, label_b, why_b = _read(b)
    model_a = _runnable(read_a) if read_a is not None else a
    model_b = _runnable(read_b) if read_b is not None else b
    timings["read"] = time.monotonic() - stage

    stage = time.monotonic()
    readable = read_a is not None and read_b is not None
    stabilities: list[StabilityResult | None] = [stability_a, None]
    witnesses = [np.zeros((0, box.size))]
    alignment = None
    if readable:
        sizes = (read_a.network.in_features, read_b.network.in_features)
        if sizes == (box.size, box.size):
            # B being A with units removed needs only A's verdicts on those units (structural),
            # and the inputs that attain their bounds are the witnesses worth sampling.
            alignment = align_pair(read_a.network, read_b.network)
        targets = None if alignment is None else alignment.targets()
        indices = [0, 1] if alignment is None else [1 if alignment.swapped else 0]
        pruned = None if alignment is None else 1 - indices[0]
        if pruned is not None and not isinstance((a, b)[pruned], ReadResult):
            # The pruned network is not needed while the full one is analysed: it is read again
            # from its loaded proto afterwards, so the peak holds one dense network and the
            # analysis, not two (resnet_4b's are 600 MB each).
            (read_a, read_b)[pruned].network = None
        for index in indices:
            net = (read_a, read_b)[index].network
            if net.in_features != box.size:
                break
            if stabilities[index] is None:
                stabilities[index] = quick_stability(net, box, seed, targets, deadline)
            witnesses.append(_raw_witnesses(net, box, stabilities[index]))
        for read in (read_a, read_b):
            if read.network is None:
                read.network = read_model(read.model).network
    timings["analysis"] = time.monotonic() - stage

    stage = time.monotonic()
    extra = np.concatenate(witnesses)
    sampled = compare_models(
        model_a, model_b, box, extra_inputs=extra, samples=samples, seed=seed, atol=atol, rtol=rtol
    )
    timings["sampling"] = time.monotonic() - stage

    proof = None
    if prove:
        stage = time.monotonic()
        remaining = None if time_limit is None else max(time_limit - (stage - started), 1e-3)
        proof = _prove_models(
            read_a, read_b, why_a or why_b, box, atol, sampled, extra, stabilities, remaining,
            seed, jobs, progress,
        )  # fmt: skip
        timings["proof"] = time.monotonic() - stage
        if proof.proved and not sampled.passed:
            _judge_roundoff(sampled, proof, read_a, read_b, box, seed)
    report = CheckReport(label_a, label_b, box, sampled, proof, timings_s=timings)
    if proof is not None and proof.counterexample is not None and counterexample_path is not None:
        _save_counterexample(read_a, proof.counterexample, counterexample_path)
        report.counterexample_path = numpy_save_path(counterexample_path)
    return report


def _prove_models(
    read_a: ReadResult | None,
    read_b: ReadResult | None,
    why_not: str,
    box: Box,
    atol: float | dict[str, float],
    sampled: EquivalenceReport,
    extra: np.ndarray,
    stabilities: list[StabilityResult | None],
    time_limit: float | None,
    seed: int,
    jobs: int,
    progress: ProgressCallback | None,
) -> ProofResult:
    """The proof on two read models: tolerance, replay in onnxruntime, notes about tails."""
    if read_a is None or read_b is None:
        return ProofResult("not applicable", tolerance_for(atol, ""), np.inf, notes=[why_not])
    net_a, net_b = read_a.network, read_b.network
    end_a, end_b = read_a.binding.output_tensor, read_b.binding.output_tensor
    graph_outputs = output_names(read_a.model)
    tol = tolerance_for(atol, end_a)
    notes = []
    same_tensor = end_a in graph_outputs and end_b in output_names(read_b.model)
    if same_tensor:
        replay_outputs, replay_tols = [end_a], [tol]
    else:
        notes.append(
            f"the proof bounds the networks' end tensors ({end_a!r}, {end_b!r}); the tails after "
            "them are not part of it"
        )
        replay_outputs = [o.name for o in sampled.outputs]
        replay_tols = [tolerance_for(atol, name) for name in replay_outputs]
    replay = _onnx_replay(
        _runnable(read_a), _runnable(read_b), replay_outputs, replay_tols, same_tensor
    )
    starts = np.concatenate([np.atleast_2d(sampled.worst_input).astype(np.float64), extra])
    result = prove_equivalence(
        net_a,
        net_b,
        box,
        tol,
        time_limit,
        stability_a=stabilities[0],
        stability_b=stabilities[1],
        start_points=starts,
        replay=replay,
        input_dtype=read_a.input_dtype,
        seed=seed,
        jobs=jobs,
        progress=progress,
    )
    result.output_tensor = end_a
    result.notes = notes + result.notes
    return result


def _judge_roundoff(
    sampled: EquivalenceReport,
    proof: ProofResult,
    read_a: ReadResult,
    read_b: ReadResult,
    box: Box,
    seed: int,
) -> None:
    """Re-judge a failed sampled comparison that the proof shows to be float round-off.

    The proof bounds the *exact* difference of the stored weights by ``proof.bound <= tol`` on
    the whole box, so whatever onnxruntime shows beyond that on the proved output is float
    evaluation error: ``|a - b| <= |a - f_A| + |f_A - f_B| + |f_B - b|``. Two exports of one
    function (folded BN, rescaled units, compress's own output) evaluated in float32 differ by
    up to the sum of their errors, which exceeds the default ``atol`` (``DEFAULT_ATOL``) once the hidden
    values reach ~10. As ``compress`` judges its own output (:func:`onnx_exact.pipeline.
    model_roundoff`), that output's atol is raised to ``ROUNDOFF_FACTOR * (r_A + r_B)``, with
    ``r`` each model's measured ``max |f_onnxruntime - f_float64|``, and the samples are judged
    again (``required_atol`` is the smallest atol that passes at the given rtol); a note says so.
    Nothing changes unless the proof covers every failing output (no tail, one end tensor) and
    every failure fits the allowance: a larger sampled difference still fails the check.
    """

    end = proof.output_tensor
    failing = [out for out in sampled.outputs if not out.passed]
    if read_b.binding.output_tensor != end or any(out.name != end for out in failing):
        return
    graph_b = output_names(read_b.model)
    if end not in output_names(read_a.model) or end not in graph_b:
        return
    errors = [
        model_roundoff(read.model, read.network, read.input_dtype, box, seed, path=read.path)
        for read in (read_a, read_b)
    ]
    if any(end not in error for error in errors):
        return
    roundoff = errors[0][end] + errors[1][end]
    atol = max(tolerance_for(sampled.atol, end), ROUNDOFF_FACTOR * roundoff)
    if not (np.isfinite(atol) and all(out.required_atol <= atol for out in failing)):
        return
    for out in failing:
        out.passed, out.mismatched_elements = True, 0
    default = tolerance_for(sampled.atol, "")
    given = sampled.atol if isinstance(sampled.atol, dict) else {"": default}
    sampled.atol = {**given, end: atol}
    sampled.passed = all(out.passed for out in sampled.outputs)
    proof.notes.append(
        f"sampled differences on {end!r} up to {max(o.max_abs_diff for o in failing):.3g} are "
        f"float round-off: onnxruntime vs exact float64 is up to {errors[0][end]:.3g} (A) and "
        f"{errors[1][end]:.3g} (B) and the exact difference is at most {proof.bound:.3g}; "
        f"samples judged at atol {atol:.3g} ({ROUNDOFF_FACTOR:g} x the round-off, as compress "
        "judges its output)"
    )


def _save_counterexample(
    read: ReadResult, example: Counterexample, path: str | os.PathLike
) -> None:
    """``np.save`` the input in the model's per-sample shape and input dtype."""
    name = read.binding.input_name
    layout = InputLayout.from_dims(name, model_input_dims(read.model, name), example.input.shape[0])
    array = example.input.astype(read.input_dtype).reshape(layout.sample_shape)

    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            np.save(handle, array)

    try:
        write_file_atomic(numpy_save_path(path), write)
    except OSError as exc:
        raise UsageError(f"--counterexample {os.fspath(path)}: cannot write it ({exc})") from None
