"""Stability benchmark: the tiered ``auto`` pipeline against the paper's ISA and per-neuron MILPs.

For every (model, box) case the three methods of :func:`onnx_exact.stability.analyze_stability` run
in the same benchmark invocation, each in its own freshly *spawned* child process (HiGHS hangs in
forked children after a multi-threaded solve, and a child gives a clean peak-memory reading). The
baselines are capped (``--baseline-cap``); a capped run proves nothing about the neurons it left
open, so its time is reported as a lower bound (``≥ 600 s``), exactly as the paper reported its
timeouts, and every speed-up over it is a lower bound too.

Checks made on every case
-------------------------
* **Labels.** For each pair of methods, every neuron that both decided (ACTIVE, INACTIVE or
  UNSTABLE) must carry the same label: a disagreement means one method is unsound or reports a
  witness wrongly, and is listed in the findings. When neither run left a neuron UNDECIDED the
  label arrays must be equal.
* **onnxsim.** ``onnxsim.stable_relu_prune.analyze`` (interval + CROWN) proves a subset of the stable
  neurons with sound bounds; our ``auto`` labels must contain its proofs neuron by neuron (its ReLU
  layers are matched to ours in graph order). onnxsim refuses some graphs; the reason is recorded.
* **Peak memory.** ``VmHWM`` (``/proc/self/status``) of the child process at the end of the run (the
  whole process: Python, numpy, onnx and HiGHS, model reading included), maximised with
  ``RUSAGE_CHILDREN`` for solver worker processes when ``--jobs > 1``; see :func:`_peak_rss_mb`.

Workloads
---------
* ``zoo``: the paper's MNIST architectures from ``models/zoo.py`` on the full box [0,1]^784 (the
  domain recorded in their metadata). The MatMul exports hold the same weights as the Gemm ones and
  are not repeated. Models missing from ``models/.cache`` are trained first (needs torch).
* ``shared``: every model and ``.npz`` box of ``../shared/models/manifest.json``.
* ``--model PATH``: any model, on the domain recorded in its ``metadata_props``.

A box is *full* when it is the model's whole input domain (zoo [0,1]^784, mnistfc and CIFAR pixels,
ACAS Xu operational envelope) and *local* otherwise (eps-balls, VNN-LIB properties, RL cases).

Usage::

    python bench/stability.py --quick                   # < 5 minutes, committed zoo + small cases
    python bench/stability.py --baseline-cap 600        # everything (hours: the baselines are slow)
    python bench/stability.py --cases 2x100 --baseline-cap 60 --out /tmp/b.md --section try

The markdown goes into ``--out`` (default ``docs/benchmarks.md``) between the markers of the run's
section (``quick``, ``full`` or ``--section NAME``); other sections of the file are kept.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import importlib
import importlib.util
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import types
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from onnx_exact.core.verdicts import NeuronState

REPO = Path(__file__).resolve().parent.parent
SHARED_MODELS = REPO.parent / "shared" / "models"
METHODS = ("auto", "isa", "per-neuron")
DEFAULT_CAP_S = 600.0
QUICK_BASELINE_CAP_S = 8.0
QUICK_AUTO_CAP_S = 120.0
KILL_GRACE_S = 60.0
"""A child still running this long after its own time limit is killed and recorded as such."""

QUICK_ZOO = (
    "mnist_2x100_l1_0",
    "mnist_2x100_l1_3e-4",
    "mnist_2x100_l1_1e-3",
    "mnist_2x200_l1_3e-4",
    "mnist_3x100_l1_3e-4",
)
QUICK_SHARED = (
    "cartpole:case_safe_14",
    "dubinsrejoin:case_safe_0",
    "mnist-net_256x2:prop_0_0.03",
    "cifar10_2x400_l1_pruned:pixels",
)
FULL_DOMAINS = ("pixels", "operational")
"""Names of manifest domains that cover the model's whole input domain (the rest are local)."""

PAPER_TIMES = {
    "2x100": "ISA 3.4 s; per-neuron ≈ 250 s",
    "2x200": "ISA 7 s",
    "2x400": "ISA 15 s (≤ 300 s); per-neuron 4,000–9,000 s",
    "2x800": "ISA 38–1,300 s",
    "5x100": "ISA 1,000–4,000 s, 1–3 of 5 runs timed out",
    "cifar10-2x400": "ISA 45–65 s; per-neuron ≥ 10,800 s (original 2×400, before their pruning)",
}
"""The paper's published times (Gurobi 9.1, i7-4790) for the same architecture, from method.md."""

TIME_TARGETS_S = {"2x100": 1.0, "2x200": 1.0, "2x400": 1.0, "2x800": 5.0, "5x100": 5.0}
"""Time targets for ``auto`` on the full [0,1] box, per zoo architecture."""

CASE_TARGET_S = 600.0
ZOO_SPEEDUP_TARGET = 100.0
LOCAL_SPEEDUP_TARGET = 20.0
MEMORY_TARGET_MB = 1024.0
MEMORY_TARGET_CASE = "cifar10_2x400_l1_pruned:pixels"
UNSTABLE, ACTIVE, INACTIVE, UNDECIDED = (int(state) for state in NeuronState)


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark workload: a model and a box over its flattened raw input.

    ``box_npz`` is an ``.npz`` with ``lower``/``upper``; ``None`` means the domain recorded in the
    model's metadata (zoo models and ``--model``). ``arch`` keys :data:`PAPER_TIMES` and
    :data:`TIME_TARGETS_S`.
    """

    model: str
    box: str
    kind: str  # "zoo-full", "full", "local" or "user"
    model_path: Path | None
    box_npz: Path | None = None
    arch: str = ""

    @property
    def id(self) -> str:
        return f"{self.model}:{self.box}"


def zoo_cases(quick: bool) -> list[Case]:
    """Zoo models on their metadata box [0,1]^784; ``quick`` uses committed models only.

    ``model_path`` is left empty here: :func:`locate_zoo_models` resolves (and if needed trains)
    only the models of the cases that survive ``--cases``.
    """
    zoo = import_zoo()
    return [
        Case(member.name, "[0,1]^784", "zoo-full", None, None, member.arch)
        for member in zoo.all_models()
        if member.exporter == "gemm" and (not quick or member.name in QUICK_ZOO)
    ]


def import_zoo():
    """``models/zoo.py`` (a script directory, not a package)."""
    if str(REPO / "models") not in sys.path:
        sys.path.insert(0, str(REPO / "models"))
    return importlib.import_module("zoo")


def locate_zoo_models(cases: list[Case], build: bool) -> tuple[list[Case], list[str]]:
    """Fill in the zoo cases' model paths, training missing models when ``build`` is true.

    Returns the runnable cases and the ids skipped because their model is missing and not built.
    """
    zoo = import_zoo()
    located, skipped = [], []
    for case in cases:
        if case.kind != "zoo-full":
            located.append(case)
            continue
        try:
            located.append(replace(case, model_path=zoo.model_path(case.model, build=build)))
        except FileNotFoundError:
            skipped.append(case.id)
    return located, skipped


def shared_cases(quick: bool) -> list[Case]:
    """Every model/box pair of ``../shared/models/manifest.json`` (none if the folder is absent)."""
    manifest = SHARED_MODELS / "manifest.json"
    if not manifest.exists():
        return []
    cases = []
    for entry in json.loads(manifest.read_text()):
        model_path = SHARED_MODELS / entry["model"]
        model = model_path.stem
        for domain in entry["domains"]:
            case = Case(
                model=model,
                box=domain["name"],
                kind="full" if domain["name"] in FULL_DOMAINS else "local",
                model_path=model_path,
                box_npz=model_path.parent / domain["box_npz"],
                arch="cifar10-2x400" if model.startswith("cifar10_2x400") else "",
            )
            if not quick or case.id in QUICK_SHARED:
                cases.append(case)
    return cases


def select_cases(args: argparse.Namespace) -> tuple[list[Case], list[str]]:
    """The cases to run and the ids of zoo cases skipped for a missing model."""
    if args.model:
        cases = [Case(Path(p).stem, "metadata", "user", Path(p).resolve()) for p in args.model]
    else:
        cases = zoo_cases(args.quick) + shared_cases(args.quick)
    if args.cases:
        patterns = [
            text if any(c in text for c in "*?[") else f"*{text}*" for text in args.cases.split(",")
        ]
        cases = [case for case in cases if any(fnmatch.fnmatch(case.id, p) for p in patterns)]
    return locate_zoo_models(cases, build=not (args.quick or args.no_build))


# ----------------------------------------------------------------------------- child runs


def load_problem(case: Case):
    """The network, its network-space box and the raw box (read in the child, not pickled)."""
    from onnx_exact.core.box import Box
    from onnx_exact.io.domain_sources import resolve_domain
    from onnx_exact.io.onnx_reader import read_model

    read = read_model(case.model_path)
    net = read.network
    if case.box_npz is None:
        raw = resolve_domain(
            read.model, net.in_features, net.input_name, model_path=str(case.model_path)
        )
    else:
        with np.load(case.box_npz) as arrays:
            raw = Box(
                np.asarray(arrays["lower"], np.float64).reshape(-1),
                np.asarray(arrays["upper"], np.float64).reshape(-1),
                net.input_name,
                case.box_npz.name,
            )
    return read, raw.to_network(net.input_map), raw


def _peak_rss_mb() -> float:
    """Peak resident set size of this process (and of any finished solver workers), in MiB.

    ``VmHWM`` of ``/proc/self/status`` is the high-water mark of this process image alone.
    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not: Linux keeps it across fork and execve, so a spawned
    child would report at least the parent's size at spawn time. Workers' ``ru_maxrss`` carries
    this process's size at their spawn, which is below this process's own peak, so the maximum of
    the two is the largest single-process peak.
    """
    status = Path("/proc/self/status")
    own_kib = 0
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                own_kib = int(line.split()[1])
    if not own_kib:
        own_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own_kib, workers_kib) / 1024.0


def run_summary(net, result, seconds: float) -> dict:
    """The picklable summary a child sends back: labels, deciding tiers, timings, peak memory."""
    relu = net.relu_layer_indices
    return {
        "seconds": seconds,
        "states": [np.asarray(result.layers[k].states, np.int8) for k in relu],
        "decided_by": [np.asarray(result.layers[k].decided_by, str) for k in relu],
        "layer_names": [net.layers[k].name for k in relu],
        "timings": dict(result.timings_s),
        "time_limit_hit": bool(result.time_limit_hit),
        "notes": list(result.notes),
        "peak_mb": _peak_rss_mb(),
        "error": "",
    }


def _child_run(conn, case: Case, method: str, time_limit: float, jobs: int, seed: int) -> None:
    """Run one method on one case and send a picklable summary back through ``conn``."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # HiGHS prints its banner on the C-level stdout
    try:
        from onnx_exact.stability import analyze_stability

        read, box, _ = load_problem(case)
        net = read.network
        start = time.perf_counter()
        result = analyze_stability(
            net, box, method=method, time_limit=time_limit, jobs=jobs, seed=seed
        )
        conn.send(run_summary(net, result, time.perf_counter() - start))
    except Exception as exc:  # noqa: BLE001 - any failure is a benchmark finding, not a crash
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
        conn.send({"error": f"{type(exc).__name__}: {exc} (at {where})"})
    finally:
        conn.close()


def run_method(case: Case, method: str, time_limit: float, jobs: int, seed: int) -> dict:
    """One method in a spawned child; killed ``KILL_GRACE_S`` after its own time limit."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    # Not daemonic: with --jobs > 1 the child starts worker processes of its own, which a
    # daemonic process may not; it is joined or killed below on every path.
    child = context.Process(target=_child_run, args=(sender, case, method, time_limit, jobs, seed))
    start = time.perf_counter()
    child.start()
    sender.close()
    hard_limit = time_limit + max(KILL_GRACE_S, 0.25 * time_limit)
    summary = None
    if receiver.poll(hard_limit):
        try:
            summary = receiver.recv()
        except EOFError:
            summary = None
    child.join(timeout=10)
    if child.is_alive():
        child.kill()
        child.join()
    wall = time.perf_counter() - start
    if summary is None:
        why = (
            f"killed after {wall:.0f} s (time limit {time_limit:.0f} s not honoured)"
            if wall >= hard_limit
            else f"child died with exit code {child.exitcode}"
        )
        summary = {"error": why, "killed": wall >= hard_limit}
    summary["method"] = method
    summary["time_limit"] = time_limit
    return summary


# ----------------------------------------------------------------------------- comparisons


def count_undecided(run: dict) -> int:
    """Neurons a finished run left UNDECIDED (over all ReLU layers)."""
    return sum(int(np.sum(states == UNDECIDED)) for states in run["states"])


def verdict(run: dict, layer: int, neuron: int) -> str:
    """``"ACTIVE by 'lp'"``: one neuron's label in a run and the tier that decided it."""
    state = NeuronState(run["states"][layer][neuron]).name
    return f"{state} by {str(run['decided_by'][layer][neuron])!r}"


def compare_labels(runs: dict[str, dict]) -> tuple[str, list[str]]:
    """Pairwise label comparison; returns a short verdict and detailed disagreements.

    Two runs *conflict* on a neuron when both decided it (state != UNDECIDED) with different labels.
    """
    verdicts, details = [], []
    for i, first in enumerate(METHODS):
        for second in METHODS[i + 1 :]:
            a, b = runs[first], runs[second]
            if a.get("error") or b.get("error"):
                continue
            conflicts = 0
            for layer, (sa, sb) in enumerate(zip(a["states"], b["states"], strict=True)):
                both = (sa != UNDECIDED) & (sb != UNDECIDED)
                bad = np.flatnonzero(both & (sa != sb))
                conflicts += bad.size
                for neuron in bad[:10]:
                    details.append(
                        f"layer {layer} ({a['layer_names'][layer]}) neuron {neuron}: "
                        f"{first}={verdict(a, layer, neuron)}, {second}={verdict(b, layer, neuron)}"
                    )
            if conflicts:
                verdicts.append(f"CONFLICT {first}/{second}: {conflicts}")
    if verdicts:
        return "; ".join(verdicts), details
    finished = [m for m in METHODS if not runs[m].get("error")]
    if len(finished) < 2:
        return "—", details
    open_counts = {m: count_undecided(runs[m]) for m in finished}
    if len(finished) < len(METHODS):
        return f"consistent ({len(finished)} of 3 ran)", details
    if any(open_counts.values()):
        opened = ", ".join(f"{m} {n} open" for m, n in open_counts.items() if n)
        return f"consistent ({opened})", details
    return "agree", details


def onnxsim_input_range(read, raw_box) -> dict:
    """``{input: (lo, hi)}`` shaped like one sample of the declared input (batch axis of 1)."""
    from onnx_exact.io.domain_sources import InputLayout, model_input_dims

    name = read.network.input_name
    layout = InputLayout.from_dims(
        name, model_input_dims(read.model, name), read.network.in_features
    )
    shape = ((1,) if layout.has_batch_axis else ()) + tuple(layout.sample_shape)
    return {name: (raw_box.lower.reshape(shape), raw_box.upper.reshape(shape))}


def open_without_time_limit(runs: dict[str, dict]) -> list[str]:
    """Neurons a run left UNDECIDED although it finished before its cap, with auto's verdict.

    Such a neuron is within a proof margin of zero for that method (or the method gave up): worth
    a look when another method decided it.
    """
    findings = []
    auto = runs["auto"]
    for method in METHODS:
        run = runs[method]
        if run.get("error") or run["time_limit_hit"]:
            continue
        for layer, states in enumerate(run["states"]):
            for neuron in np.flatnonzero(states == UNDECIDED)[:10]:
                autos = ""
                if method != "auto" and not auto.get("error"):
                    autos = f"; auto: {verdict(auto, layer, neuron)}"
                findings.append(
                    f"{method} left layer {layer} ({run['layer_names'][layer]}) neuron {neuron} "
                    f"UNDECIDED without hitting its time limit{autos}"
                )
    return findings


def import_stable_relu_prune():
    """``onnxsim.stable_relu_prune`` without running ``onnxsim/__init__.py``.

    The package's ``__init__`` imports torch (about 12 s here) for features the pass does not use;
    the pass itself needs only numpy, onnx and its sibling modules. Registering a bare package
    object with the right ``__path__`` lets the relative imports resolve (about 1 s). If onnxsim is
    already imported, that module is used as is.
    """
    if "onnxsim" not in sys.modules:
        spec = importlib.util.find_spec("onnxsim")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("onnxsim is not installed (pip install onnxsim==0.8.1)")
        package = types.ModuleType("onnxsim")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["onnxsim"] = package
    return importlib.import_module("onnxsim.stable_relu_prune")


def compare_onnxsim(case: Case, auto: dict) -> tuple[str, int | None, list[str]]:
    """onnxsim's proofs and whether ``auto`` contains them: (cell text, proofs, findings)."""
    if auto.get("error"):
        return "—", None, []
    try:
        stable_relu_prune = import_stable_relu_prune()
        read, _, raw = load_problem(case)
        report = stable_relu_prune.analyze(
            read.model, input_ranges=onnxsim_input_range(read, raw), methods=("interval", "crown")
        )
    except Exception as exc:  # noqa: BLE001 - onnxsim refusing a graph is a result
        return f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}", None, []
    layers = [layer for layer in report.layers if layer.units]
    if len(layers) != len(auto["states"]):
        return f"refused: {len(layers)} ReLU layers vs our {len(auto['states'])}", None, []
    proofs, findings = 0, []
    for k, (theirs, ours) in enumerate(zip(layers, auto["states"], strict=True)):
        if theirs.units != ours.size:
            return f"refused: layer {k} has {theirs.units} units vs our {ours.size}", None, []
        proofs += int(theirs.dead + theirs.always_on)
        for kind, indices, state in (
            ("dead", theirs.dead_units, INACTIVE),
            ("always-on", theirs.on_units, ACTIVE),
        ):
            missed = indices[ours[indices] != state]
            for neuron in missed[:10]:
                findings.append(
                    f"layer {k} neuron {neuron}: onnxsim proves {kind}, auto says "
                    f"{NeuronState(ours[neuron]).name}"
                )
    ours_total = sum(int(np.isin(s, (ACTIVE, INACTIVE)).sum()) for s in auto["states"])
    verdict = "⊆ ours" if not findings else f"NOT ⊆ ours ({len(findings)}+ missed)"
    return f"{proofs} ({verdict}; ours {ours_total})", proofs, findings


# ----------------------------------------------------------------------------- results


@dataclass
class CaseResult:
    case: Case
    runs: dict[str, dict]
    labels: str = ""
    label_details: list[str] = field(default_factory=list)
    onnxsim: str = ""
    onnxsim_proofs: int | None = None
    onnxsim_findings: list[str] = field(default_factory=list)

    @property
    def auto(self) -> dict:
        return self.runs["auto"]

    def neurons(self) -> int:
        return sum(s.size for s in self.auto.get("states", []))

    def count(self, *states: int) -> int:
        return sum(int(np.isin(s, states).sum()) for s in self.auto.get("states", []))

    def auto_ok(self) -> bool:
        """Auto finished within its limit and decided every neuron."""
        return (
            not self.auto.get("error")
            and not self.auto["time_limit_hit"]
            and not self.count(UNDECIDED)
        )

    def baseline_time(self, method: str) -> tuple[float, bool] | None:
        """(seconds, is_lower_bound) of a baseline, or None if it failed.

        A run that hit its cap would have needed at least the cap: its time is a lower bound. So
        would a run killed for overrunning its cap (it had not finished at the cap either).
        """
        run = self.runs[method]
        if run.get("killed"):
            return run["time_limit"], True
        if run.get("error"):
            return None
        capped = run["time_limit_hit"]
        return (max(run["seconds"], run["time_limit"]) if capped else run["seconds"]), capped

    def ratio(self, method: str) -> tuple[float, bool] | None:
        """Baseline time / auto time, and whether it is a lower bound (the baseline was capped)."""
        baseline = self.baseline_time(method)
        if baseline is None or self.auto.get("error"):
            return None
        return baseline[0] / max(self.auto["seconds"], 1e-3), baseline[1]


def fmt_seconds(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}" if value < 1000 else f"{value:,.0f}"


def fmt_run_time(run: dict) -> str:
    if run.get("killed"):
        return f"≥ {fmt_seconds(run['time_limit'])} (killed)"
    if run.get("error"):
        return "error"
    undecided = count_undecided(run)
    if run["time_limit_hit"]:
        return f"≥ {fmt_seconds(run['time_limit'])} ({undecided} open)"
    text = fmt_seconds(run["seconds"])
    return f"{text} ({undecided} open)" if undecided else text


def fmt_ratio(value: tuple[float, bool] | None) -> str:
    if value is None:
        return "—"
    ratio, lower = value
    return ("≥ " if lower else "") + (f"{ratio:.1f}×" if ratio < 10 else f"{ratio:,.0f}×")


TIER_ABBREVIATIONS = {
    "witness": "w",
    "interval": "i",
    "symbolic": "s",
    "ascent": "a",
    "tighten": "t",
    "alpha-crown": "ac",
    "probe": "pr",
    "lp": "lp",
    "cuts": "c",
    "attack": "pgd",
    "crown-bab": "cb",
    "bab": "b",
    "milp": "m",
}


def fmt_tiers(run: dict) -> str:
    if run.get("error"):
        return "—"
    parts = [
        f"{TIER_ABBREVIATIONS.get(tier, tier)} {seconds:.2f}"
        for tier, seconds in run["timings"].items()
        if seconds >= 0.005
    ]
    return " · ".join(parts)


def table_row(result: CaseResult) -> list[str]:
    auto = result.auto
    if auto.get("error"):
        found = undecided = "—"
    else:
        active, inactive = result.count(ACTIVE), result.count(INACTIVE)
        found = f"{active + inactive} ({active} act / {inactive} inact)"
        undecided = str(result.count(UNDECIDED))
    peak = "—" if auto.get("error") else f"{auto['peak_mb']:.0f}"
    return [
        result.case.model,
        result.case.box,
        result.case.kind,
        str(result.neurons()) if not auto.get("error") else "—",
        found,
        undecided,
        fmt_tiers(auto),
        fmt_run_time(auto),
        fmt_run_time(result.runs["isa"]),
        fmt_run_time(result.runs["per-neuron"]),
        fmt_ratio(result.ratio("isa")),
        fmt_ratio(result.ratio("per-neuron")),
        result.labels,
        result.onnxsim,
        peak,
        PAPER_TIMES.get(result.case.arch, ""),
    ]


HEADERS = [
    "model",
    "box",
    "kind",
    "neurons",
    "stable found (auto)",
    "undecided",
    "auto time per tier (s)",
    "auto (s)",
    "isa (s)",
    "per-neuron (s)",
    "isa / auto",
    "per-neuron / auto",
    "labels",
    "onnxsim proofs",
    "auto peak MiB",
    "paper (same architecture)",
]


CONSOLE_COLUMNS = (0, 1, 3, 4, 5, 7, 8, 9, 11, 12, 13)
"""Columns of :data:`HEADERS` echoed on the console after each case (the markdown has all)."""


def median_ratio(results: list[CaseResult], kinds: tuple[str, ...], method: str) -> str:
    """Median of baseline/auto over the cases of ``kinds``; a lower bound if any was capped.

    The median is monotone in each value, so the median of lower bounds bounds the true median.
    """
    ratios = [r.ratio(method) for r in results if r.case.kind in kinds]
    ratios = [value for value in ratios if value is not None]
    if not ratios:
        return "not measured"
    median = statistics.median(value for value, _ in ratios)
    lower = any(is_lower for _, is_lower in ratios)
    return f"{'≥ ' if lower else ''}{median:,.1f}× over {len(ratios)} cases"


def median_value(results: list[CaseResult], kinds: tuple[str, ...], method: str) -> float | None:
    ratios = [r.ratio(method) for r in results if r.case.kind in kinds]
    ratios = [value for value, _ in (v for v in ratios if v is not None)]
    return statistics.median(ratios) if ratios else None


def targets(results: list[CaseResult]) -> list[tuple[str, str, str]]:
    """(target, status, evidence) for each of the project's targets that this run measured.

    A speed-up median that includes capped baselines is a lower bound: it can show a target met,
    but below the target it is only inconclusive.
    """

    def status(ok: bool | None) -> str:
        return "not measured" if ok is None else "met" if ok else "**not met**"

    rows = []
    failing = [
        r.case.id
        for r in results
        if not r.auto_ok() or r.auto.get("seconds", np.inf) > CASE_TARGET_S
    ]
    rows.append(
        (
            "every neuron decided (0 undecided) within 600 s, every case",
            status(not failing if results else None),
            "fails: " + ", ".join(failing) if failing else f"{len(results)} cases",
        )
    )
    timed = [r for r in results if r.case.kind == "zoo-full" and r.case.arch in TIME_TARGETS_S]
    slow = [
        f"{r.case.model} {fmt_run_time(r.auto)} s (target {TIME_TARGETS_S[r.case.arch]:.0f} s)"
        for r in timed
        if r.auto.get("error") or r.auto["seconds"] > TIME_TARGETS_S[r.case.arch] or not r.auto_ok()
    ]
    rows.append(
        (
            "full [0,1] box: ≤ 1 s for 2×100…2×400, ≤ 5 s for 2×800 and 5×100",
            status(not slow if timed else None),
            "; ".join(slow) if slow else f"{len(timed)} models",
        )
    )
    for kinds, target, label in (
        (("zoo-full",), ZOO_SPEEDUP_TARGET, "full-box zoo: median per-neuron / auto ≥ 100×"),
        (("local",), LOCAL_SPEEDUP_TARGET, "local boxes: median per-neuron / auto ≥ 20×"),
    ):
        value = median_value(results, kinds, "per-neuron")
        capped = any(
            (ratio := r.ratio("per-neuron")) is not None and ratio[1]
            for r in results
            if r.case.kind in kinds
        )
        if value is not None and value < target and capped:
            verdict = "inconclusive (baseline capped: raise --baseline-cap)"
        else:
            verdict = status(None if value is None else value >= target)
        rows.append((label, verdict, median_ratio(results, kinds, "per-neuron")))
    compared = [r for r in results if r.onnxsim_proofs is not None]
    missed = [r.case.id for r in compared if r.onnxsim_findings]
    rows.append(
        (
            "at least onnxsim's proofs (⊇, neuron by neuron) in every case",
            status(not missed if compared else None),
            ("misses in: " + ", ".join(missed))
            if missed
            else f"{len(compared)} cases compared, {len(results) - len(compared)} refused",
        )
    )
    memory = [r for r in results if r.case.id == MEMORY_TARGET_CASE and not r.auto.get("error")]
    rows.append(
        (
            "peak memory of the CIFAR-sized net (auto, whole child process) < 1 GB",
            status(memory[0].auto["peak_mb"] < MEMORY_TARGET_MB if memory else None),
            f"{memory[0].auto['peak_mb']:.0f} MiB" if memory else "",
        )
    )
    conflicts = [r.case.id for r in results if r.labels.startswith("CONFLICT")]
    rows.append(
        (
            "labels of auto, isa and per-neuron agree wherever both decided",
            status(not conflicts if results else None),
            "conflicts: " + ", ".join(conflicts) if conflicts else f"{len(results)} cases",
        )
    )
    return rows


# ----------------------------------------------------------------------------- markdown


def machine_description() -> str:
    import highspy
    import onnxruntime

    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        from importlib.metadata import version

        highs_version = version("highspy")
    except Exception:  # noqa: BLE001 - metadata missing only in odd installs
        highs_version = getattr(highspy, "__version__", "?")
    return (
        f"{os.cpu_count()} cores (nproc), {cpu}; Python {platform.python_version()}, "
        f"numpy {np.__version__}, highspy {highs_version}, onnxruntime {onnxruntime.__version__}"
    )


@functools.cache
def engine_commit() -> str:
    """``git describe`` of the checkout when the run started (``-dirty``: uncommitted changes).

    Cached from the first call, which :func:`main` makes before the first case, so edits made
    while a long run is going do not relabel it.
    """
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


@functools.cache
def start_load() -> str:
    """The load average (1/5/15 min) when the run started: other work on the machine slows the
    timings, never the labels. Cached from :func:`main`'s first call, like the commit."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def markdown_section(
    results: list[CaseResult],
    args: argparse.Namespace,
    elapsed: float,
    progress: str = "",
    skipped: list[str] | None = None,
) -> str:
    """This run's markdown: header, one row per case, medians, targets and findings.

    ``progress`` marks a section written while the run is still going (it is rewritten after
    every case, so an interrupted run leaves its finished cases behind).
    """

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [
        f"### Run `{args.section}`: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- Command: `python bench/stability.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Machine: {machine_description()}; engine at commit {engine_commit()}; load "
        f"average {start_load()} at the start",
        f"- Caps: auto {args.time_limit:.0f} s per case, baselines (isa, per-neuron) "
        f"{args.baseline_cap:.0f} s per case; `--jobs {args.jobs}`, seed {args.seed}; "
        f"{len(results)} cases in {elapsed / 60:.1f} min. {progress}".rstrip(),
    ]
    if skipped:
        lines.append(f"- Not run (zoo model not built, `--no-build`): {', '.join(skipped)}")
    lines += [
        "",
        row(HEADERS),
        row(["---"] * len(HEADERS)),
    ]
    lines += [row(table_row(result)) for result in results]
    lines += [
        "",
        "Medians of baseline time / auto time (a `≥` median includes capped baselines and is a "
        "lower bound):",
        "",
        "| cases | isa / auto | per-neuron / auto |",
        "|---|---|---|",
    ]
    for label, kinds in (("full-box zoo", ("zoo-full",)), ("local boxes", ("local",))):
        lines.append(
            f"| {label} | {median_ratio(results, kinds, 'isa')} "
            f"| {median_ratio(results, kinds, 'per-neuron')} |"
        )
    lines += ["", "Targets:", "", "| target | status | evidence |", "|---|---|---|"]
    lines += [row(list(target)) for target in targets(results)]
    findings = []
    for result in results:
        for method in METHODS:
            run = result.runs[method]
            if run.get("error"):
                findings.append(f"{result.case.id}: {method} failed: {run['error']}")
        findings += [f"{result.case.id}: labels: {d}" for d in result.label_details]
        findings += [f"{result.case.id}: {d}" for d in open_without_time_limit(result.runs)]
        findings += [f"{result.case.id}: onnxsim: {d}" for d in result.onnxsim_findings]
        if not result.auto.get("error"):
            findings += [f"{result.case.id}: auto note: {note}" for note in result.auto["notes"]]
    lines += ["", "Findings (errors, label conflicts, onnxsim proofs we miss, engine notes):", ""]
    lines += [f"- {finding}" for finding in findings] or ["- none"]
    return "\n".join(lines) + "\n"


DOC_HEADER = """# Stability benchmark

Produced by `python bench/stability.py` (see `bench/README.md` for what it measures and how). Each
section below is one run; re-running a mode replaces its section only.

Columns: *stable found* and *undecided* are `auto`'s verdicts over all ReLU neurons; *auto time per
tier* splits `auto`'s wall time into w(itness), i(nterval), s(ymbolic), a(scent), t(ighten), ac (α-CROWN), lp,
c(uts), pr (the probe: one short attack round before CROWN branch and bound), cb (CROWN branch and bound), pgd (multi-start PGD attack), b (LP branch and bound), m(ilp), and any other tier under its own name (e.g. split); a
baseline time `≥ T (n open)` hit its cap T with n neurons still undecided, `≥ T (killed)` overran
its cap and was killed, and its ratio to auto is then a lower bound; *labels*
compares the three methods neuron by neuron wherever both decided; *onnxsim proofs* counts the
neurons `onnxsim.stable_relu_prune.analyze` (interval + CROWN, margin 1e-5) proves stable and checks
that `auto` proves every one of them; *auto peak MiB* is the peak RSS (`VmHWM`) of the child process
that ran `auto` (Python + libraries + model included); the paper's times are Gurobi 9.1 on an
i7-4790 (Serra et al. 2021), for the same architecture but not the same weights.
"""


def write_markdown(path: Path, section_name: str, section: str) -> None:
    """Replace (or append) this run's section between its markers, keeping the rest of the file."""
    start, end = f"<!-- bench:{section_name}:start -->", f"<!-- bench:{section_name}:end -->"
    block = f"{start}\n{section}{end}\n"
    text = path.read_text() if path.exists() else DOC_HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="committed zoo models and small shared cases (< 5 min)"
    )
    parser.add_argument(
        "--cases",
        help="only cases whose id 'model:box' matches one of these comma-separated globs or substrings",
    )
    parser.add_argument("--model", action="append", help="benchmark this model on its metadata box")
    parser.add_argument(
        "--baseline-cap",
        type=float,
        help=f"seconds per baseline run (default {DEFAULT_CAP_S:.0f}; "
        f"{QUICK_BASELINE_CAP_S:.0f} with --quick)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        help=f"seconds for auto per case (default {DEFAULT_CAP_S:.0f}; "
        f"{QUICK_AUTO_CAP_S:.0f} with --quick)",
    )
    parser.add_argument(
        "--no-build",
        action="store_true",
        help="skip zoo models missing from models/.cache instead of training them",
    )
    parser.add_argument("--jobs", type=int, default=1, help="solver worker processes per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--section", help="section name in --out (default: quick or full)")
    parser.add_argument(
        "--labels-out",
        type=Path,
        help="also save every method's per-neuron states as .npz (key 'case|method|layer'), to"
        " compare two engine versions label by label",
    )
    args = parser.parse_args(argv)
    if args.baseline_cap is None:
        args.baseline_cap = QUICK_BASELINE_CAP_S if args.quick else DEFAULT_CAP_S
    if args.time_limit is None:
        args.time_limit = QUICK_AUTO_CAP_S if args.quick else DEFAULT_CAP_S
    if args.section is None:
        args.section = "quick" if args.quick else "full"
    for name in ("baseline_cap", "time_limit"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def run_case(case: Case, args: argparse.Namespace) -> CaseResult:
    runs = {
        method: run_method(
            case,
            method,
            args.time_limit if method == "auto" else args.baseline_cap,
            args.jobs,
            args.seed,
        )
        for method in METHODS
    }
    result = CaseResult(case, runs)
    result.labels, result.label_details = compare_labels(runs)
    result.onnxsim, result.onnxsim_proofs, result.onnxsim_findings = compare_onnxsim(
        case, runs["auto"]
    )
    return result


def save_labels(path: Path, results: list[CaseResult]) -> None:
    """Every run's per-neuron states (int8, NeuronState values) in one ``.npz``."""
    arrays = {
        f"{result.case.id}|{method}|{layer}": states
        for result in results
        for method, run in result.runs.items()
        for layer, states in enumerate(run.get("states", []))
    }
    np.savez_compressed(path, **arrays)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    engine_commit()
    start_load()
    console = Console(width=None if sys.stdout.isatty() else 200)
    cases, skipped = select_cases(args)
    if skipped:
        console.print(f"skipped (model not built, --no-build): {', '.join(skipped)}")
    if not cases:
        console.print("[red]no case matches[/red] (check --cases / --model)")
        return 2
    console.print(
        f"{len(cases)} cases; auto cap {args.time_limit:.0f} s, baseline cap "
        f"{args.baseline_cap:.0f} s → section '{args.section}' of {args.out}"
    )
    started = time.perf_counter()
    results = []
    for number, case in enumerate(cases, 1):
        console.print(f"[{number}/{len(cases)}] {case.id} …")
        result = run_case(case, args)
        results.append(result)
        table = Table(*(HEADERS[i] for i in CONSOLE_COLUMNS))
        cells = table_row(result)
        table.add_row(*(cells[i] for i in CONSOLE_COLUMNS))
        console.print(table)
        elapsed = time.perf_counter() - started
        progress = "" if number == len(cases) else f"**partial: {number} of {len(cases)} cases**"
        write_markdown(
            args.out, args.section, markdown_section(results, args, elapsed, progress, skipped)
        )
    if args.labels_out:
        save_labels(args.labels_out, results)
    summary = Table("target", "status", "evidence", title="targets")
    for target in targets(results):
        summary.add_row(*(cell.replace("**", "") for cell in target))
    console.print(summary)
    console.print(f"wrote section '{args.section}' of {args.out} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
