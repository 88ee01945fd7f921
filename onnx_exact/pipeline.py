"""The end-to-end jobs: read → domain → stability → reduce → write → verify.

This module only wires the steps together; each step lives in its own module and is handed the
previous step's dataclass. It never touches onnx or HiGHS directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .domain import Box, domain_metadata, resolve_domain
from .errors import UsageError
from .network import Network
from .onnx_reader import ReadResult, read_model
from .onnx_writer import build_model, save_model_atomic
from .reduce import Reduction, reduce_network
from .report import RunReport, summarize_layers
from .stability import StabilityResult, analyze_stability
from .verify import compare_models

ProgressCallback = Callable[[str, int, int], None]


@dataclass
class DomainSpec:
    """How the user gave the domain (all optional; the model's metadata is the fallback)."""

    input_ranges: Sequence[str] = ()
    range_file: str | None = None
    vnnlib: str | None = None


@dataclass
class AnalysisOptions:
    method: str = "auto"
    time_limit: float | None = None
    jobs: int = 1
    seed: int = 0


@dataclass
class Analysis:
    read: ReadResult
    box: Box
    stability: StabilityResult
    report: RunReport


@dataclass
class CompressResult:
    model: onnx.ModelProto
    reduction: Reduction
    analysis: Analysis
    report: RunReport


def _resolve(read: ReadResult, domain: DomainSpec) -> Box:
    net = read.network
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

    t0 = time.perf_counter()
    box = _resolve(read, domain)
    box_net = box.to_network(read.network.input_map)
    timings["domain"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stability = analyze_stability(
        read.network,
        box_net,
        method=options.method,
        time_limit=options.time_limit,
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
        bytes_before=read.model.ByteSize(),
        timings_s=timings,
        time_limit_hit=stability.time_limit_hit,
        notes=list(stability.notes),
    )
    return Analysis(read=read, box=box, stability=stability, report=report)


def witnesses_in_raw_space(net: Network, box: Box, stability: StabilityResult) -> np.ndarray:
    """The analysis's witness inputs, mapped back to what the user feeds the model."""
    if stability.witnesses.size == 0:
        return np.zeros((0, box.size))
    raw = net.input_map.invert(stability.witnesses, box.center)
    return np.clip(raw, box.lower, box.upper)


def _summary_metadata(report: RunReport, reduction: Reduction) -> dict[str, str]:
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


def compress(
    source: str | os.PathLike | onnx.ModelProto,
    output: str | os.PathLike | None = None,
    domain: DomainSpec | None = None,
    options: AnalysisOptions | None = None,
    *,
    samples: int = 2000,
    atol: float | dict[str, float] = 1e-5,
    rtol: float | dict[str, float] = 1e-5,
    progress: ProgressCallback | None = None,
) -> CompressResult:
    """Compress ``source`` exactly on the domain, verify it, and (if it verifies) save it.

    The output file is written only after verification passed, atomically (temporary file, then
    rename): a failed run never leaves a wrong or partial model behind.
    """
    options = options or AnalysisOptions()
    if output is not None and not isinstance(source, onnx.ModelProto):
        if os.path.abspath(os.fspath(output)) == os.path.abspath(os.fspath(source)):
            raise UsageError(
                f"output path '{os.fspath(output)}' is the input model: choose another file name"
            )
        if os.path.isdir(os.fspath(output)):
            raise UsageError(f"output path '{os.fspath(output)}' is a directory: give a file name")
    analysis = analyze(source, domain, options, progress)
    read, box, stability, report = analysis.read, analysis.box, analysis.stability, analysis.report
    net = read.network

    t0 = time.perf_counter()
    reduction = reduce_network(net, stability)
    report.timings_s["reduce"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metadata = domain_metadata(box)
    metadata.update(_summary_metadata(report, reduction))
    model = build_model(read, reduction, metadata)
    report.timings_s["write"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    verification = compare_models(
        read.model,
        model,
        box,
        extra_inputs=witnesses_in_raw_space(net, box, stability),
        samples=samples,
        seed=options.seed,
        atol=atol,
        rtol=rtol,
    )
    report.timings_s["verify"] = time.perf_counter() - t0

    report.layers = summarize_layers(net, stability, reduction)
    report.params_after = reduction.network.param_count
    report.macs_after = reduction.network.mac_count
    report.bytes_after = model.ByteSize()
    report.verification = verification
    report.constant_output = reduction.constant_output
    report.notes.extend(reduction.notes)

    if output is not None and verification.passed:
        save_model_atomic(model, output, external_data=read.uses_external_data)
        report.output = os.fspath(output)
    return CompressResult(model=model, reduction=reduction, analysis=analysis, report=report)
