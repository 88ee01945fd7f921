"""Low-dimensional domains benchmark: every neuron of a few-input net over its whole envelope.

Workloads (issue 25): the nine shared ACAS Xu nets over the operational envelope
(``../shared/models/acasxu/`` net 1_1 and ``../shared/models/acasxu_nets/`` nets 1_2 … 1_9, box
``operational.npz``), the project's few-input regressors of ``models/train_lowdim.py`` over the
``[-1, 1]^n`` their metadata records (``checker2d_7x146`` and ``ring2d_7x146``: 2 inputs, 7
layers, 1,020 neurons, the shape issue 25 names as held out; ``smooth8_3x64``: 8 inputs) and
the RL controllers of ``../shared/models/rl/`` on their case boxes. For
every net the ``auto`` pipeline runs with ``--jobs`` 1 and 2 (``--jobs-list``), and the
per-neuron MILP baseline (``method="per-neuron"``, two decision MILPs per neuron) capped at
``--baseline-cap`` seconds, each in its own spawned child process (the runner of
``bench/stability.py``). Per run: wall time of ``analyze_stability``, neurons left undecided,
leaves bounded by the input-splitting branch and bound (``input_split.InputSearch.run``,
counted in the child), the time per tier and, when neurons are left open, the least share of
the box on which the input splitting proved an open neuron (how far from done it stopped).
Labels of every pair of runs are compared on the neurons both decided.

Usage::

    python bench/envelope.py                                  # all cases, writes "envelope"
    python bench/envelope.py --cases 1_2,1_3 --jobs-list 1 --out /tmp/e.md
    python bench/envelope.py --baseline-cap 0                 # without the per-neuron baseline
    python bench/envelope.py --labels-out before.npz          # also save every run's labels

The markdown goes into ``--out`` (default ``docs/benchmarks.md``) between the markers of
section ``--section`` (default ``envelope``); other sections are kept.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from measure import load_stability_bench

REPO = Path(__file__).resolve().parent.parent
SHARED_MODELS = REPO.parent / "shared" / "models"
TARGET_S = 60.0

BENCH = load_stability_bench()


def envelope_cases() -> list:
    """ACAS Xu 1_1 … 1_9 over the operational envelope, the few-input regressors of ``models/``,
    then the RL controllers' case boxes."""
    cases = []
    first = SHARED_MODELS / "acasxu" / "ACASXU_run2a_1_1_batch_2000.onnx"
    if first.exists():
        box = first.with_name("ACASXU_run2a_1_1_batch_2000.operational.npz")
        cases.append(BENCH.Case("acas_1_1", "operational", "full", first, box))
    more = SHARED_MODELS / "acasxu_nets"
    for path in sorted(more.glob("ACASXU_run2a_*_batch_2000.onnx")) if more.exists() else []:
        name = "acas_" + path.stem.split("_")[2] + "_" + path.stem.split("_")[3]
        cases.append(BENCH.Case(name, "operational", "full", path, more / "operational.npz"))
    for name in ("checker2d_7x146", "ring2d_7x146", "smooth8_3x64"):  # models/train_lowdim.py
        cases.append(BENCH.Case(name, "metadata", "full", REPO / "models" / f"{name}.onnx", None))
    rl = SHARED_MODELS / "rl"
    for path in sorted(rl.glob("*.onnx")) if rl.exists() else []:
        for box in sorted(rl.glob(f"{path.stem}.*.npz")):
            cases.append(BENCH.Case(path.stem, box.stem.split(".", 1)[1], "local", path, box))
    return cases


def _child_run(conn, case, method: str, time_limit: float, jobs: int, seed: int) -> None:
    """Like ``bench/stability.py``'s child, and counts the leaves the input splitting bounds."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # HiGHS prints its banner on the C-level stdout
    try:
        from onnx_exact.bounds import input_split
        from onnx_exact.stability import analyze_stability

        leaves = [0]
        search = input_split.InputSearch.run

        def counting(self, *args, **kwargs):
            outcome = search(self, *args, **kwargs)
            leaves[0] += outcome.leaves
            return outcome

        input_split.InputSearch.run = counting
        read, box, _ = BENCH.load_problem(case)
        net = read.network
        start = time.perf_counter()
        result = analyze_stability(
            net, box, method=method, time_limit=time_limit, jobs=jobs, seed=seed
        )
        summary = BENCH.run_summary(net, result, time.perf_counter() - start)
        shares = [layer.proved_share for layer in result.layers if layer.proved_share is not None]
        measured = np.concatenate(shares) if shares else np.empty(0)
        measured = measured[np.isfinite(measured)]
        least = float(measured.min()) if measured.size else None
        conn.send({**summary, "leaves": leaves[0], "least_proved_share": least})
    except Exception as exc:  # noqa: BLE001 - any failure is a benchmark finding, not a crash
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
        conn.send({"error": f"{type(exc).__name__}: {exc} (at {where})"})
    finally:
        conn.close()


def run(case, method: str, time_limit: float, jobs: int, seed: int) -> dict:
    """One run in a spawned child (``bench/stability.py``'s runner with the counting child)."""
    original = BENCH._child_run
    BENCH._child_run = _child_run
    try:
        return BENCH.run_method(case, method, time_limit, jobs, seed)
    finally:
        BENCH._child_run = original


def undecided(summary: dict) -> int | None:
    return None if summary.get("error") else BENCH.count_undecided(summary)


def fmt_run(summary: dict) -> str:
    if summary.get("error"):
        return f"error: {summary['error']}"
    open_count = undecided(summary)
    text = f"{summary['seconds']:.1f}"
    if summary.get("time_limit_hit") or open_count:
        text = f"≥ {summary['time_limit']:.0f}" if summary.get("time_limit_hit") else text
        least = summary.get("least_proved_share")
        shown = f", least proved on {100.0 * least:.3g} % of the box" if least is not None else ""
        text += f" ({open_count} open{shown})"
    return text


def fmt_tiers(summary: dict) -> str:
    if summary.get("error"):
        return ""
    timings = summary["timings"]
    return " · ".join(f"{k} {v:.1f}" for k, v in timings.items() if v >= 0.05)


def agreement(runs: dict[str, dict]) -> str:
    """``agree`` when every pair of finished runs gives the same label to every neuron both
    decided; otherwise the conflicting pairs and counts (a conflict is a soundness bug)."""
    finished = {name: summary for name, summary in runs.items() if not summary.get("error")}
    names = list(finished)
    conflicts = []
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            count = 0
            pairs = zip(finished[first]["states"], finished[second]["states"], strict=True)
            for a, b in pairs:
                both = (a != BENCH.UNDECIDED) & (b != BENCH.UNDECIDED)
                count += int(np.count_nonzero(both & (a != b)))
            if count:
                conflicts.append(f"CONFLICT {first}/{second}: {count}")
    if len(finished) < 2:
        return "—"
    return "; ".join(conflicts) if conflicts else f"agree ({len(finished)} runs)"


def summary_lines(results: list[tuple[str, dict]]) -> list[str]:
    """The issue 25 target per ``auto`` run (0 undecided within ``TARGET_S``) and the slowest."""
    finished = [(name, run) for name, run in results if not run.get("error")]
    met = [
        name
        for name, run in finished
        if not undecided(run) and not run["time_limit_hit"] and run["seconds"] <= TARGET_S
    ]
    lines = [f"- 0 undecided within {TARGET_S:.0f} s: {len(met)} of {len(results)} runs"]
    if finished:
        # runs stopped by the time limit all take about as long: the one left furthest from done
        # (most neurons open) is the slowest
        name, run = max(finished, key=lambda item: (undecided(item[1]), item[1]["seconds"]))
        lines.append(f"- Slowest: {name}, time {fmt_run(run)} (s); tiers {fmt_tiers(run)}")
    return lines


def markdown(
    rows: list[list[str]], header: list[str], args, started: str, load: str, summary: list[str]
) -> str:
    lines = [
        f"## {args.section}",
        "",
        "Issue 25 (few-input networks over their whole envelope): `python bench/envelope.py`; "
        "see its docstring.",
        "",
        f"### Run `{args.section}`: {started}",
        "",
        f"- Command: `python bench/envelope.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Engine: {BENCH.engine_commit()}; machine: {BENCH.machine_description()}",
        f"- Load average at the start: {load} (the machine was shared with other jobs)",
        f"- `auto` capped at {args.time_limit:.0f} s; "
        + (
            f"per-neuron capped at {args.baseline_cap:.0f} s"
            if args.baseline_cap > 0
            else "no per-neuron baseline"
        )
        + " (a capped time is a lower bound, `≥`)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + summary
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated substrings of case ids")
    parser.add_argument("--time-limit", type=float, default=300.0, help="cap of auto (s)")
    parser.add_argument("--baseline-cap", type=float, default=120.0, help="0: no baseline")
    parser.add_argument("--jobs-list", default="1,2", help="--jobs values for auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--section", default="envelope")
    parser.add_argument(
        "--labels-out",
        type=Path,
        help="also save every run's per-neuron states as .npz (key 'case|run|layer'), to compare"
        " two engine versions label by label",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    BENCH.engine_commit()  # fixed before the first case
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    wanted = [part for part in args.cases.split(",") if part]
    cases = [c for c in envelope_cases() if not wanted or any(w in c.id for w in wanted)]
    jobs_list = [int(value) for value in args.jobs_list.split(",") if value]
    header = ["net", "box", "neurons"]
    for jobs in jobs_list:
        header += [f"auto jobs {jobs} (s)", f"leaves (jobs {jobs})", f"tiers (jobs {jobs})"]
    if args.baseline_cap > 0:
        header += ["per-neuron (s)", "speed-up"]
    header += ["labels"]
    rows, results, labels = [], [], {}
    for case in cases:
        runs: dict[str, dict] = {}
        for jobs in jobs_list:
            runs[f"auto-j{jobs}"] = run(case, "auto", args.time_limit, jobs, args.seed)
        if args.baseline_cap > 0:
            runs["per-neuron"] = run(case, "per-neuron", args.baseline_cap, 1, args.seed)
        first = runs[f"auto-j{jobs_list[0]}"]
        neurons = "" if first.get("error") else str(sum(s.size for s in first["states"]))
        row = [case.model, case.box, neurons]
        for jobs in jobs_list:
            summary = runs[f"auto-j{jobs}"]
            row += [fmt_run(summary), str(summary.get("leaves", "")), fmt_tiers(summary)]
        if args.baseline_cap > 0:
            baseline = runs["per-neuron"]
            row.append(fmt_run(baseline))
            ratio = ""
            if not first.get("error") and not baseline.get("error"):
                bound = "≥ " if baseline.get("time_limit_hit") or undecided(baseline) else ""
                ratio = f"{bound}{baseline['seconds'] / max(first['seconds'], 1e-9):.1f}×"
            row.append(ratio)
        row.append(agreement(runs))
        results += [(f"{case.id} jobs {jobs}", runs[f"auto-j{jobs}"]) for jobs in jobs_list]
        for name, summary in runs.items():
            for layer, states in enumerate(summary.get("states", [])):
                labels[f"{case.id}|{name}|{layer}"] = states
        rows.append(row)
        print(" | ".join(row), flush=True)
    if args.labels_out:
        np.savez_compressed(args.labels_out, **labels)
    section = markdown(rows, header, args, started, load, summary_lines(results))
    BENCH.write_markdown(args.out, args.section, section)
    print(section)
    return 0


if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
