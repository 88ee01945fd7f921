"""CNN compression against onnxsim's stable_relu_prune, on the shared VNN-COMP CNNs.

Not a test: ``python bench/cnn.py [--time-limit S] [--jobs N] [--no-check] [--out F]``.
For each model of ``../shared/models/cnn/manifest.json`` (skipped when absent) it runs, each in
a child process measured from outside (``bench/measure.py``: wall time, peak RSS):

1. the command a user runs, ``onnx-exact IN OUT --vnnlib PROP --json R`` (default options but
   ``--time-limit``/``--jobs`` when given): exit code, verification, undecided neurons, the
   channel verdicts per ReLU layer; a refused model shows its one-line error;
2. ``onnx-exact check IN OUT --vnnlib PROP`` on the pair (``--no-check`` skips it): exit 0 is
   proved, 4 sampled equal but not proved;
3. ``onnxsim.stable_relu_prune.analyze`` on the same box (``box_npz``) when onnxsim is
   installed, for the indices of the units it proves (the manifest records only counts).

Units are onnxsim's: a whole conv channel (dead: every position proved inactive; always on:
every position proved active) or one neuron of a dense layer. Per layer, matched by the ReLU's
name, every unit onnxsim proves must be proved by us (by index with the live run, else by
count). Params and MACs removed are counted on the ONNX graphs before and after with
:mod:`onnx_exact.io.model_stats`, as onnxsim counts them; onnxsim's figures (params, MACs,
seconds) are the manifest's. The section ``cnn`` of ``--out`` (default ``docs/benchmarks.md``)
is replaced with the command, commit, load average and the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from measure import load_stability_bench, measure_command

from onnx_exact.io.model_stats import model_stats

REPO = Path(__file__).resolve().parent.parent
CNN = REPO.parent / "shared" / "models" / "cnn"
TARGET_S = 60.0
TARGET_MIB = 2048


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def onnxsim_units(model_path: Path, box_path: Path, input_name: str) -> dict | None:
    """``{relu: (dead indices, always-on indices)}`` from onnxsim's analysis, or None."""
    try:
        from onnxsim import stable_relu_prune
    except ImportError:
        return None
    model = onnx.load(model_path)
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    box = np.load(box_path)
    ranges = {input_name: (box["lower"].reshape(dims), box["upper"].reshape(dims))}
    report = stable_relu_prune.analyze(model, input_ranges=ranges)
    return {
        layer.relu: (set(layer.dead_units.tolist()), set(layer.on_units.tolist()))
        for layer in report.layers
        if layer.dead_units is not None
    }


def contains_onnxsim(ours: dict, manifest_layers: list[dict], live: dict | None) -> list[str]:
    """Layers where onnxsim proves a unit we do not (empty: we prove all of them).

    ``ours`` maps a ReLU name to ``(dead channels, active channels)`` of our report; with
    ``live`` (onnxsim's indices) the check is per unit, else per count.
    """
    missing = []
    for layer in manifest_layers:
        name = layer["relu"]
        dead, active = ours.get(name, (set(), set()))
        if live is not None and name in live:
            lost = (live[name][0] - dead) | (live[name][1] - active)
            if lost:
                missing.append(f"{name}: units {sorted(lost)}")
        elif len(dead) < layer["dead"] or len(active) < layer["always_on"]:
            missing.append(
                f"{name}: {len(dead)}/{len(active)} dead/on, onnxsim "
                f"{layer['dead']}/{layer['always_on']}"
            )
    return missing


def run_model(entry: dict, time_limit: float | None, jobs: int | None, check: bool) -> dict:
    """The whole job on one model of the manifest, as a table row (see the module docstring)."""
    model, vnnlib = CNN / entry["model"], CNN / entry["vnnlib"]
    theirs = entry["onnxsim_stable_relu_prune"]
    row: dict = {"model": entry["name"], "onnxsim": theirs}
    options = [] if time_limit is None else ["--time-limit", str(time_limit)]
    options += [] if jobs is None else ["--jobs", str(jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        out, report = Path(tmp) / "small.onnx", Path(tmp) / "report.json"
        command = [sys.executable, "-m", "onnx_exact", str(model), str(out), "--vnnlib",
                   str(vnnlib), "--json", str(report), *options]  # fmt: skip
        usage = measure_command(command)
        row.update(exit=usage.exit_code, wall_s=usage.wall_s, peak_mib=usage.peak_rss_bytes / 2**20)
        if usage.exit_code != 0 or not out.exists():
            lines = [line for line in usage.stderr.splitlines() if line.startswith("onnx-exact:")]
            row["error"] = lines[-1] if lines else usage.stderr.strip().splitlines()[-1:]
            return row
        doc = json.loads(report.read_text())
        before, after = model_stats(onnx.load(model)), model_stats(onnx.load(out))
        row["params"] = (before.params, before.params - after.params)
        row["macs"] = (before.macs, before.macs - after.macs)
        ours = {
            layer["name"]: (set(layer["channels"]["dead"]), set(layer["channels"]["active"]))
            for layer in doc["layers"]
            if "channels" in layer
        }
        row["dead"] = sum(len(d) for d, _ in ours.values())
        row["on"] = sum(len(a) for _, a in ours.values())
        row["removed"] = sum(
            len(x["channels"]["removed"]) for x in doc["layers"] if "channels" in x
        )
        row["undecided"] = sum(len(x["undecided"]) for x in doc["layers"])
        row["not_pursued"] = sum(len(x.get("not_pursued", ())) for x in doc["layers"])
        row["timings_s"] = {k: round(v, 1) for k, v in doc["timings_s"].items()}
        row["verification"] = doc["verification"]["passed"]
        row["max_abs"] = doc["verification"]["max_abs_diff"]
        row["stability_s"] = doc["timings_s"].get("stability", 0.0)
        started = time.perf_counter()
        live = onnxsim_units(model, CNN / entry["box_npz"], entry["input"])
        row["onnxsim_live_s"] = time.perf_counter() - started
        row["missing"] = contains_onnxsim(ours, theirs["layers"], live)
        row["containment"] = "per unit" if live is not None else "per count"
        if check:
            checked = measure_command(
                [
                    sys.executable,
                    "-m",
                    "onnx_exact",
                    "check",
                    str(model),
                    str(out),
                    "--vnnlib",
                    str(vnnlib),
                    *options,
                ]  # fmt: skip
            )
            row["check"] = (checked.exit_code, checked.wall_s)
    return row


def _cells(row: dict, check: bool) -> list[str]:
    theirs = row["onnxsim"]
    onnxsim = f"{theirs['dead']}/{theirs['always_on']}"
    base = [row["model"], str(row["exit"])]
    if "error" in row:
        blank = ["", onnxsim, "", "", f"— / {theirs['params_removed']:,}",
                 f"— / {theirs['macs_removed']:,}", "", ""]  # fmt: skip
        return (
            base
            + blank
            + ([""] if check else [])
            + [
                f"{row['wall_s']:.1f} / {theirs['seconds']:.1f}",
                f"{row['peak_mib']:.0f}",
                f"refused: {row['error']}",
            ]
        )
    missing = "yes" if not row["missing"] else "NO: " + "; ".join(row["missing"])
    cells = base + [
        f"{row['dead']}/{row['on']}",
        onnxsim,
        f"{missing} ({row['containment']})",
        str(row["removed"]),
        f"{row['params'][1]:,} / {theirs['params_removed']:,} (of {row['params'][0]:,})",
        f"{row['macs'][1]:,} / {theirs['macs_removed']:,} (of {row['macs'][0]:,})",
        f"{row['undecided']} ({row.get('not_pursued', 0)})",
        f"{'passed' if row['verification'] else 'FAILED'} ({row['max_abs']:.2g})",
    ]
    if check:
        code, seconds = row["check"]
        verdict = {0: "proved", 4: "not proved"}.get(code, f"exit {code}")
        cells.append(f"{verdict} ({seconds:.0f} s)")
    return cells + [f"{row['wall_s']:.1f} / {theirs['seconds']:.1f}", f"{row['peak_mib']:.0f}", ""]


def markdown(rows: list[dict], args, started: str, load: tuple, command: str) -> str:
    header = ["model", "exit", "stable units ours (dead/on)", "onnxsim (dead/on)",
              "⊇ onnxsim per layer", "channels removed", "params removed ours / onnxsim",
              "MACs removed ours / onnxsim", "undecided (not pursued)", "verification (max abs)"]  # fmt: skip
    if args.check:
        header.append("check IN OUT")
    header += ["time s ours / onnxsim", "peak MiB", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(row, args.check)) + " |" for row in rows]
    done = [r for r in rows if "error" not in r]
    within = sum(r["wall_s"] <= TARGET_S and r["peak_mib"] <= TARGET_MIB for r in done)
    text = (
        f"## {args.section}\n\n"
        f"`{command}` at {commit()} on {started} ({os.cpu_count()} cores, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start: the machine was shared with "
        "other jobs, wall times are upper bounds).\n\n"
        "Each model of `../shared/models/cnn/manifest.json` with its VNN-LIB box, through the "
        "command line in a child process. *Units* are onnxsim's: a conv channel (dead: every "
        "position proved inactive; on: every position proved active) or a dense neuron. "
        "*⊇ onnxsim* checks, layer by layer by ReLU name, that every unit onnxsim 0.8.1's "
        "`stable_relu_prune.analyze` proves on the same box is proved by us (per unit from a "
        "live onnxsim run, per count from the manifest without it). Params and MACs are counted "
        "on the ONNX graphs before and after (`onnx_exact.io.model_stats`, onnxsim's counting); "
        "onnxsim's removals and seconds are the manifest's. *time* is the whole command "
        "(interpreter start to exit), *peak MiB* its peak RSS; *check IN OUT* is `onnx-exact "
        "check` on the pair (proved: exit 0; not proved: exit 4, sampled equal). *undecided* counts "
        "the neurons the time limit left open; *not pursued* (in brackets) those left open on "
        "purpose, since no verdict of theirs could change the channel structure.\n\n"
        + "\n".join(lines)
        + f"\n\nTargets: exit 0 on every model ({sum(r['exit'] == 0 for r in rows)} of "
        f"{len(rows)}); within {TARGET_S:.0f} s and {TARGET_MIB} MiB: {within} of {len(done)} "
        "compressed.\n"
    )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, help="passed to onnx-exact (default: its own)")
    parser.add_argument("--jobs", type=int, help="passed to onnx-exact (default: its own)")
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--models", help="comma-separated names (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--section", default="cnn")
    args = parser.parse_args(argv)
    manifest = CNN / "manifest.json"
    if not manifest.exists():
        print(f"skipped: {manifest} is absent")
        return 0
    entries = json.loads(manifest.read_text())
    if args.models:
        entries = [e for e in entries if e["name"] in args.models.split(",")]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    rows = []
    for entry in entries:
        row = run_model(entry, args.time_limit, args.jobs, args.check)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "onnxsim"}, default=str), flush=True)
    command = "python bench/cnn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(rows, args, started, load, command.strip())
    load_stability_bench().write_markdown(args.out, args.section, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
