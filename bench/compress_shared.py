"""Compress the shared third-party models on their boxes and record what the tool achieves.

Not a test: ``python bench/compress_shared.py [--time-limit S] [--jobs N] [--out docs/compression.md]``.
For each model and box listed in ``../shared/models/manifest.json`` (models without a box get
none), it runs the whole compress job in this process (read → stability → reduce → write → verify,
plus the proof of equivalence unless ``--no-prove``) and onnxsim's ``stable_relu_prune.analyze``
on the same box, and writes the whole of ``--out``: the command, the engine's commit, the load
average at the start, and a table of neurons, stable proved (ours / onnxsim's), undecided,
parameters before → after, verification (max abs diff), proof verdict, and wall times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnx_exact.pipeline import AnalysisOptions, DomainSpec, compress

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"


def onnxsim_proofs(model_path: Path, box_path: Path, input_name: str) -> str:
    """How many neurons onnxsim's interval + CROWN pass proves stable (or why it refused)."""
    from onnxsim import stable_relu_prune

    model = onnx.load(model_path)
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    box = np.load(box_path)
    ranges = {input_name: (box["lower"].reshape(dims), box["upper"].reshape(dims))}
    try:
        report = stable_relu_prune.analyze(model, input_ranges=ranges)
    except Exception as err:  # noqa: BLE001 - a refusal is a result worth recording
        return f"refused ({type(err).__name__})"
    return str(sum(layer.dead + layer.always_on for layer in report.layers))


def engine_commit() -> str:
    """``git describe``-style short commit of the checkout the engine runs from (``?`` outside git)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return out.stdout.strip()


def run_case(model_rel: str, box_path: Path, time_limit: float, prove: bool, jobs: int) -> dict:
    model_path = SHARED / model_rel
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = compress(
            model_path,
            Path(tmp) / "small.onnx",
            DomainSpec(range_file=str(box_path)),
            AnalysisOptions(time_limit=time_limit, jobs=jobs),
            prove=prove,
        )
        wall = time.perf_counter() - started
    report = result.report
    layers = report.layers
    proved = sum(len(x.stably_active) + len(x.stably_inactive) for x in layers)
    proof = report.proof
    return {
        "model": Path(model_rel).stem,
        "box": box_path.stem.removeprefix(Path(model_rel).stem + "."),
        "neurons": sum(x.size for x in layers),
        "proved": proved,
        "onnxsim": onnxsim_proofs(model_path, box_path, result.analysis.read.network.input_name),
        "undecided": report.undecided_total,
        "params": f"{report.params_before:,} → {report.params_after:,}",
        "removed": f"{100 * (1 - report.params_after / report.params_before):.1f}%",
        "verification": (
            f"{'passed' if report.verification.passed else 'FAILED'}, "
            f"max abs {report.verification.max_abs_diff:.2g}"
        ),
        "proof": "—" if proof is None else f"{proof.status} (ε {proof.bound:.2g})",
        "stability_s": report.timings_s.get("stability", 0.0),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=600.0)
    parser.add_argument("--no-prove", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes per job")
    parser.add_argument("--cases", default="", help="only cases whose model/box contains this")
    parser.add_argument("--out", default=str(ROOT / "docs" / "compression.md"))
    args = parser.parse_args()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    manifest = json.loads((SHARED / "manifest.json").read_text())
    rows = []
    for entry in manifest:
        folder = (SHARED / entry["model"]).parent
        for domain in entry["domains"]:
            label = f"{entry['model']}:{domain['name']}"
            if args.cases and args.cases not in label:
                continue
            row = run_case(
                entry["model"],
                folder / domain["box_npz"],
                args.time_limit,
                not args.no_prove,
                args.jobs,
            )
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    header = (
        "| model | box | ReLU neurons | stable proved (ours) | onnxsim proves | undecided | "
        "parameters | removed | verification | proof | stability (s) | whole job (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['box']} | {r['neurons']} | {r['proved']} | {r['onnxsim']} | "
        f"{r['undecided']} | {r['params']} | {r['removed']} | {r['verification']} | {r['proof']} | "
        f"{r['stability_s']:.2f} | {r['wall_s']:.2f} |\n"
        for r in rows
    )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python bench/compress_shared.py " + " ".join(sys.argv[1:])
    text = (
        "# Compressing the shared third-party models\n\n"
        "What `onnx-exact IN OUT --prove` achieves on every box of "
        "`../shared/models/manifest.json` (regenerate with `bench/compress_shared.py`; "
        "`bench/README.md` says how). Each row is one whole job: read, stability analysis, "
        "reduction, write, sampled verification in onnxruntime and the proof of equivalence. "
        "*stable proved (ours)* counts the neurons proved always active or always inactive, "
        "*onnxsim proves* those `onnxsim.stable_relu_prune.analyze` (interval + CROWN) proves "
        "on the same box; *undecided* neurons were kept when the time limit ran out; *proof* is "
        "`--prove`'s verdict with its bound ε on max |f_in - f_out| (proved: ε within the "
        "tolerance); the times are wall seconds of the stability analysis and of the whole job.\n\n"
        f"- Command: `{command}`\n"
        f"- Engine at commit {engine_commit()}; finished {stamp}; {os.cpu_count()} cores, "
        f"load average {load} (1/5/15 min) at the start\n\n" + header + body
    )
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
