"""The end-to-end jobs: read → domain → stability → reduce → write → verify.

This module only wires the steps together; each step lives in its own module and is handed the
previous step's dataclass. It never touches onnx or HiGHS directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import ArrayLike

from onnx_exact.channels import describe_channels, prune, summary_metadata
from onnx_exact.core.box import Box
from onnx_exact.core.errors import (
    DomainError,
    MalformedModelError,
    UnsupportedModelError,
    UsageError,
    VerificationError,
)
from onnx_exact.core.network import Network
from onnx_exact.core.time_budget import time_budget
from onnx_exact.core.tolerance import DEFAULT_ATOL, DEFAULT_RTOL
from onnx_exact.core.verdicts import StabilityResult
from onnx_exact.equivalence.check import check_equivalence
from onnx_exact.equivalence.results import CheckReport
from onnx_exact.io.cnn_reader import CnnBinding
from onnx_exact.io.domain_sources import (
    InputLayout,
    domain_metadata,
    largest_bound,
    metadata_range,
    model_input_dims,
    model_input_names,
    resolve_domain,
    to_features,
    validated_box,
)
from onnx_exact.io.load import load_graph
from onnx_exact.io.onnx_reader import ReadResult, read_model
from onnx_exact.io.onnx_writer import build_model, merge_metadata
from onnx_exact.io.runtime import onnxruntime_session
from onnx_exact.io.save import numpy_save_path, plan_run_paths
from onnx_exact.io.staging import StagedModel, TensorPlacement, model_size_bytes, stage_model
from onnx_exact.progress import ProgressCallback, ProgressEvent
from onnx_exact.reduce import Reduction, reduce_network
from onnx_exact.report import RunReport, summarize_layers
from onnx_exact.resources import check_memory, memory_shortfall_note
from onnx_exact.stability import analyze_stability
from onnx_exact.verify import (
    ROUNDOFF_FACTOR,
    compare_models,
    measured_roundoff,
    model_roundoff,
    reference_model_path,
    roundoff_atol,
    written_roundoff,
)


class MemoryShortfallWarning(UserWarning):
    """The run may need more memory than the machine has free (``resources.memory_shortfall_note``).

    A warning, not an error: the estimate is conservative, and a run is refused only under an
    explicit ``--max-memory``.
    """


NO_RELU_NOTE = "the model has no ReLU: nothing to prove; its affine layers are merged exactly"


@dataclass
class DomainSpec:
    """How the user gave the domain (all optional; the model's metadata is the fallback).

    At most one source: ``input_ranges`` (``"[0,1]"``, ``"x:[0,1]"``, as ``--input-range``),
    ``range_file`` (as ``--input-range-file``), ``vnnlib``, or, from Python without files, the
    arrays ``lower`` and ``upper``: scalars, the flattened input size, or the input's per-sample
    shape (optionally with a leading batch axis of 1), e.g.
    ``DomainSpec(lower=np.zeros(784), upper=np.ones(784))``.
    """

    input_ranges: Sequence[str] = ()
    range_file: str | os.PathLike | None = None
    vnnlib: str | os.PathLike | None = None
    lower: ArrayLike | None = None
    upper: ArrayLike | None = None

    def _array_box(self, model: onnx.ModelProto, n_features: int, input_name: str) -> Box | None:
        """The box of ``lower``/``upper`` (None when they are not given), checked like a file's."""
        if self.lower is None and self.upper is None:
            return None
        if self.lower is None or self.upper is None:
            raise UsageError("DomainSpec: give both lower and upper (arrays or scalars)")
        if self.input_ranges or self.range_file or self.vnnlib:
            raise UsageError(
                "DomainSpec: lower/upper and input_ranges, range_file or vnnlib given; use one "
                "of them to define the box"
            )
        layout = InputLayout.from_dims(input_name, model_input_dims(model, input_name), n_features)
        sides = [
            to_features(np.asarray(side), layout, n_features, f"DomainSpec.{name}")
            for name, side in (("lower", self.lower), ("upper", self.upper))
        ]
        return validated_box(
            *sides,
            input_name,
            "arrays lower/upper",
            "DomainSpec lower/upper",
            max_abs=largest_bound(model, input_name),
        )


@dataclass
class AnalysisOptions:
    """How the analysis runs. ``time_limit``: seconds, None (no limit) or ``"auto"``
    (:func:`time_budget`: by the kind of network read)."""

    method: str = "auto"
    time_limit: float | str | None = None
    jobs: int = 1
    seed: int = 0
    max_memory: int | None = None  # bytes; None: no guard


@dataclass
class Analysis:
    read: ReadResult
    box: Box
    stability: StabilityResult
    report: RunReport


@dataclass
class CompressResult:
    """The written model and how it was made: ``reduction`` for an MLP; None for a CNN, whose
    dead channels are pruned in the graph itself (``report.layers[i].channels``)."""

    model: onnx.ModelProto
    reduction: Reduction | None
    analysis: Analysis
    report: RunReport


def _resolve(read: ReadResult, domain: DomainSpec) -> Box:
    net = read.network
    arrays = domain._array_box(read.model, net.in_features, net.input_name)
    if arrays is not None:
        return arrays
    return resolve_domain(
        read.model,
        net.in_features,
        net.input_name,
        input_ranges=domain.input_ranges,
        range_file=domain.range_file,
        vnnlib=domain.vnnlib,
        model_path=str(read.path) if read.path else None,
    )


def analyze(
    source: str | os.PathLike | onnx.ModelProto,
    domain: DomainSpec | None = None,
    options: AnalysisOptions | None = None,
    progress: ProgressCallback | None = None,
) -> Analysis:
    """Prove which ReLU neurons of ``source`` are stable over the domain (no model is written)."""
    domain = domain or DomainSpec()
    options = options or AnalysisOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    read = read_model(source)
    timings["read"] = time.perf_counter() - t0
    memory_notes: list[str] = []
    if options.max_memory is not None:
        check_memory(
            read.network, options.max_memory, stored_bytes_per_weight=read.input_dtype.itemsize
        )
    else:
        shortfall = memory_shortfall_note(
            read.network, stored_bytes_per_weight=read.input_dtype.itemsize
        )
        if shortfall is not None:
            warnings.warn(shortfall, MemoryShortfallWarning, stacklevel=2)
            memory_notes.append(shortfall)

    t0 = time.perf_counter()
    box = _resolve(read, domain)
    box_net = box.to_network(read.network.input_map)
    timings["domain"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    time_limit = time_budget(options.time_limit, read.network)
    stability = analyze_stability(
        read.network,
        box_net,
        method=options.method,
        time_limit=time_limit,
        jobs=options.jobs,
        seed=options.seed,
        progress=progress,
    )
    timings["stability"] = time.perf_counter() - t0
    for phase, seconds in stability.timings_s.items():
        timings[f"stability.{phase}"] = seconds

    net = read.network
    report = RunReport(
        model=str(read.path) if read.path else "<in-memory model>",
        domain_source=box.source,
        method=options.method,
        layers=summarize_layers(net, stability),
        params_before=net.param_count,
        macs_before=net.mac_count,
        bytes_before=model_size_bytes(read.model),
        timings_s=timings,
        time_limit_hit=stability.time_limit_hit,
        time_limit_s=time_limit,
        notes=memory_notes
        + list(stability.notes)
        + ([] if net.relu_layer_indices else [NO_RELU_NOTE]),
    )
    if isinstance(read.binding, CnnBinding):
        describe_channels(report, read, stability)
    return Analysis(read=read, box=box, stability=stability, report=report)


def witnesses_in_raw_space(net: Network, box: Box, stability: StabilityResult) -> np.ndarray:
    """The analysis's witness inputs, mapped back to what the user feeds the model."""
    if stability.witnesses.size == 0:
        return np.zeros((0, box.size))
    raw = net.input_map.invert(stability.witnesses, box.center)
    return np.clip(raw, box.lower, box.upper)


def _summary_metadata(report: RunReport, reduction: Reduction) -> dict[str, str]:
    """The ``onnx_exact.summary`` metadata entry: what was removed, from ``report.layers``.

    ``report.layers`` must already be summarised with ``reduction`` (their ``removed`` counts
    are 0 before that).
    """
    units = sum(layer.size for layer in report.layers)
    removed = sum(layer.removed for layer in report.layers)
    return {
        "onnx_exact.summary": (
            f"onnx-exact: {removed} of {units} ReLU units removed "
            f"({sum(len(x.stably_inactive) for x in report.layers)} stably inactive, "
            f"{sum(len(x.stably_active) for x in report.layers)} stably active, "
            f"{report.undecided_total} undecided), parameters "
            f"{report.params_before} -> {reduction.network.param_count}; exact on the box in "
            f"onnx_exact.domain.*"
        ),
    }


@contextlib.contextmanager
def _staged(
    model: onnx.ModelProto, output: str | os.PathLike | None, read: ReadResult
) -> Iterator[StagedModel]:
    """``model`` written as the file(s) the user gets, then loaded by onnxruntime from its path.

    The files sit in a temporary folder beside ``output`` (in the system's temporary folder when
    nothing is to be saved) until :meth:`StagedModel.commit`; each tensor stays where the input
    kept it (:meth:`TensorPlacement.like_input`; a model over 2 GiB gets external data). A staged
    file that ``onnx.checker`` or onnxruntime cannot load raises
    :class:`~onnx_exact.core.errors.VerificationError` (exit 1) and nothing is left behind.
    """
    placement = TensorPlacement.like_input(read)
    external = True if placement is not None else None
    with contextlib.ExitStack() as stack:
        if output is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="onnx_exact_"))
            output = Path(folder) / (read.path.name if read.path else "model.onnx")
        staged = stack.enter_context(
            stage_model(model, output, external_data=external, placement=placement)
        )
        try:
            onnxruntime_session(staged.path, read.network.in_features)
        except UnsupportedModelError as exc:
            raise VerificationError(
                f"{os.fspath(output)}: the written model does not load ({exc}); nothing was written"
            ) from None
        yield staged


def _domain_files(domain: DomainSpec | None) -> list[tuple[str, str | None]]:
    """The files the domain is read from, named by their options (for ``plan_run_paths``)."""
    domain = domain or DomainSpec()
    return [("--input-range-file", domain.range_file), ("--vnnlib", domain.vnnlib)]


def compress(
    source: str | os.PathLike | onnx.ModelProto,
    output: str | os.PathLike | None = None,
    domain: DomainSpec | None = None,
    options: AnalysisOptions | None = None,
    *,
    samples: int = 2000,
    atol: float | dict[str, float] | None = None,
    rtol: float | dict[str, float] = DEFAULT_RTOL,
    prove: bool = False,
    progress: ProgressCallback | None = None,
) -> CompressResult:
    """Compress ``source`` exactly on the domain, verify it, and (if it verifies) save it.

    With ``prove``, the compressed model is also *proved* equivalent to the original on the box
    (:func:`onnx_exact.equivalence.check.check_equivalence`, reusing this run's stability analysis); a
    replayed counterexample fails the run like a failed sampled verification.

    ``atol=None`` (the default) means 1e-5, raised to ``ROUNDOFF_FACTOR`` times the sum of the
    input model's and the compressed model's own measured float round-off where that is larger
    (:func:`model_roundoff`; two float evaluations of one exact function differ by up to the sum
    of their errors, and folding can make the compressed one's larger); the report states them.

    The output file is written only after verification passed, atomically (temporary file, then
    rename): a failed run never leaves a wrong or partial model behind.
    """
    options = options or AnalysisOptions()
    if output is not None:  # before the analysis: never clobber a file this run reads
        plan_run_paths(
            models=[("the input model", source)],
            domain_files=_domain_files(domain),
            output_model=output,
        )
    analysis = analyze(source, domain, options, progress)
    read, box, stability, report = analysis.read, analysis.box, analysis.stability, analysis.report
    net = read.network

    _stage(progress, "reduce and write")
    metadata = domain_metadata(box)
    reduction: Reduction | None = None
    t0 = time.perf_counter()
    if isinstance(read.binding, CnnBinding):  # structured: dead channels leave the graph
        model = prune(report, read).model
        metadata.update(summary_metadata(report))
        merge_metadata(model, metadata)
        report.timings_s["prune"] = time.perf_counter() - t0
    else:
        reduction = reduce_network(net, stability)
        report.timings_s["reduce"] = time.perf_counter() - t0
        report.layers = summarize_layers(net, stability, reduction)  # before the summary metadata
        t0 = time.perf_counter()
        metadata.update(_summary_metadata(report, reduction))
        model = build_model(read, reduction, metadata)
        report.timings_s["write"] = time.perf_counter() - t0

    with _staged(model, output, read) as staged:
        # everything below checks the staged file, the bytes the user gets (issue 21)
        _stage(progress, "verify")
        t0 = time.perf_counter()
        reference = reference_model_path(read) or read.model
        written_read = read_model(staged.path)
        if atol is None:
            roundoff = measured_roundoff(read, box, options.seed)
            written = {}
            if reduction is None:  # pruning deletes weights, it never rounds new ones
                written = model_roundoff(
                    written_read.model,
                    written_read.network,
                    written_read.input_dtype,
                    box,
                    options.seed,
                    path=written_read.path,
                )
            elif not reduction.constant_output:
                written = written_roundoff(written_read, reduction.network, box, options.seed)
            # two float evaluations of one exact function differ by at most the sum of their errors
            combined = {name: value + written.get(name, 0.0) for name, value in roundoff.items()}
            overflow = [name for name, value in combined.items() if not np.isfinite(value)]
            if overflow:
                raise DomainError(
                    f"{box.source}: onnxruntime's {read.input_dtype} evaluation overflows to "
                    f"Inf/NaN on output '{overflow[0]}' inside this box, so no tolerance can be "
                    "measured; give a box with smaller bounds"
                )
            atol = roundoff_atol(DEFAULT_ATOL, combined)
            for name, value in roundoff.items():
                report.notes.append(
                    f"float round-off of the input model itself on '{name}': {value:.3g}, of the "
                    f"compressed model: {written.get(name, 0.0):.3g} (onnxruntime vs exact "
                    f"float64); verification atol "
                    f"{max(DEFAULT_ATOL, ROUNDOFF_FACTOR * combined[name]):.3g}"
                )
        verification = compare_models(
            reference,
            staged.path,
            box,
            extra_inputs=witnesses_in_raw_space(net, box, stability),
            samples=samples,
            seed=options.seed,
            atol=atol,
            rtol=rtol,
        )
        report.timings_s["verify"] = time.perf_counter() - t0

        if reduction is not None:  # a CNN's counts after come from its graph (channels.prune)
            report.params_after = reduction.network.param_count
            report.macs_after = reduction.network.mac_count
            report.constant_output = reduction.constant_output
            report.notes.extend(reduction.notes)
        report.bytes_after = model_size_bytes(model)
        recorded = sum(  # each entry, with its field tag and length prefix
            prop.ByteSize() + 4
            for prop in model.metadata_props
            if prop.key.startswith("onnx_exact.")
        )
        grown = report.bytes_after - (report.bytes_before or report.bytes_after)
        if 0 < grown <= recorded:
            report.notes.append(
                f"the written file is {grown:,} bytes larger because its metadata records the "
                f"input domain and a summary ({recorded:,} bytes of onnx_exact.*, which check "
                "and later runs read back), not because of the network"
            )
        report.verification = verification

        if prove:
            _stage(progress, "prove")
            t0 = time.perf_counter()
            remaining = None
            if report.time_limit_s is not None:
                remaining = max(report.time_limit_s - report.timings_s["stability"], 1.0)
            check = check_equivalence(
                read if reference_model_path(read) else dataclasses.replace(read, path=None),
                written_read,  # the proof, too, is about the weights as written
                box,
                atol=atol,
                rtol=rtol,
                samples=0,
                seed=options.seed,
                time_limit=remaining,
                stability_a=stability,
                progress=progress,
            )
            report.proof = check.proof
            report.timings_s["prove"] = time.perf_counter() - t0

        if output is not None and report.passed:
            staged.commit()
            report.output = os.fspath(output)
    return CompressResult(model=model, reduction=reduction, analysis=analysis, report=report)


def _stage(progress: ProgressCallback | None, phase: str) -> None:
    """Tell the progress display which step follows the analysis (its time limit is over)."""
    if progress is not None:
        progress(ProgressEvent(phase))


def _model_path(model: str | os.PathLike | onnx.ModelProto) -> str | None:
    """The path messages and relative metadata refer to (None for an in-memory model)."""
    return None if isinstance(model, onnx.ModelProto) else os.fspath(model)


def _check_same_input_size(
    candidate: str | os.PathLike | onnx.ModelProto, n_features: int, reference: str
) -> None:
    """Refuse, naming both models, a candidate whose declared input cannot take the reference's
    ``n_features`` per sample: both models are compared on one box, and without this check the
    mismatch would surface in the sampled comparison as a layout error about one model only."""
    in_memory = isinstance(candidate, onnx.ModelProto)
    model = load_graph(candidate)
    names = model_input_names(model)
    if len(names) != 1:
        return  # the comparison names the inputs
    dims = model_input_dims(model, names[0])
    try:
        InputLayout.from_dims(names[0], dims, n_features)
    except UnsupportedModelError:
        shape = ["N" if d is None else d for d in dims or []]
        raise UsageError(
            f"the two models' input sizes differ: {reference} reads {n_features} features per "
            f"sample, {'the candidate model' if in_memory else os.fspath(candidate)} declares "
            f"input {names[0]!r} of shape {shape}; check compares two models on one input box"
        ) from None


def _declared_features(model: onnx.ModelProto, input_name: str, source: str) -> int:
    """Flattened per-sample size of a model input from its declared shape (batch axis dropped)."""
    dims = model_input_dims(model, input_name)
    if not dims or any(d is None for d in dims[1:]) or (len(dims) == 1 and dims[0] is None):
        raise UsageError(
            f"{source}: input {input_name!r} has no fully declared shape, so the domain size is "
            "unknown; give a model the reader accepts as the first (reference) model"
        )
    return int(np.prod(dims[1:])) if len(dims) > 1 else int(dims[0])


def check(
    reference: str | os.PathLike | onnx.ModelProto,
    candidate: str | os.PathLike | onnx.ModelProto,
    domain: DomainSpec | None = None,
    *,
    atol: float | dict[str, float] = DEFAULT_ATOL,
    rtol: float | dict[str, float] = DEFAULT_RTOL,
    samples: int = 10_000,
    seed: int = 0,
    prove: bool = True,
    time_limit: float | None = None,
    counterexample_path: str | os.PathLike | None = None,
    jobs: int = 1,
    progress: ProgressCallback | None = None,
) -> CheckReport:
    """Are two models the same on the domain? Sampled comparison, then a proof where possible.

    The domain comes from the flags, else the reference model's metadata, else the candidate's
    (a model written by ``onnx-exact`` records the box it is exact on). Either model may be a
    path or an in-memory ``ModelProto``, as for :func:`compress` and :func:`analyze`.
    """
    domain = domain or DomainSpec()
    if counterexample_path is not None:
        plan_run_paths(
            models=[("the reference model", reference), ("the candidate model", candidate)],
            domain_files=_domain_files(domain),
            outputs=[("--counterexample", numpy_save_path(counterexample_path))],
        )
    try:
        read = read_model(reference)
        model, n_features, input_name = (
            read.model,
            read.network.in_features,
            read.network.input_name,
        )
        source: ReadResult | str | os.PathLike = read
    except MalformedModelError:
        raise  # no runtime can run it either
    except UnsupportedModelError:
        # Not a ReLU network we can analyse: sampling still works, the proof will say why not.
        model = load_graph(reference)
        names = model_input_names(model)
        if len(names) != 1:
            raise
        input_name = names[0]
        n_features = _declared_features(
            model, input_name, _model_path(reference) or "the reference model"
        )
        source = reference
    try:
        box = domain._array_box(model, n_features, input_name) or resolve_domain(
            model,
            n_features,
            input_name,
            input_ranges=domain.input_ranges,
            range_file=domain.range_file,
            vnnlib=domain.vnnlib,
            model_path=_model_path(reference),
        )
    except DomainError:
        given = domain.input_ranges or domain.range_file or domain.vnnlib
        candidate_model = load_graph(candidate)
        if given or domain.lower is not None or metadata_range(candidate_model, input_name) is None:
            raise
        box = resolve_domain(
            candidate_model, n_features, input_name, model_path=_model_path(candidate)
        )
    _check_same_input_size(candidate, n_features, _model_path(reference) or "the reference model")
    return check_equivalence(
        source,
        candidate,
        box,
        atol=atol,
        rtol=rtol,
        samples=samples,
        seed=seed,
        prove=prove,
        time_limit=time_limit,
        counterexample_path=counterexample_path,
        jobs=jobs,
        progress=progress,
    )
