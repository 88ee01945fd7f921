"""Equivalence-check benchmark: ``onnx-exact check A B`` on the pairs users bring.

Every pair is two MNIST-size MLPs (784-256-256-10) and an eps box around a test image; each check
runs as a user runs it, ``python -m onnx_exact check A B --input-range-file box.npz --json ...``
in a subprocess (interpreter start, reading, sampling and proof included in its wall time).

Bases
-----
* ``mnistfc``: ``../shared/models/mnistfc/mnist-net_256x2.onnx`` (a third-party pytorch export),
  rebuilt as a plain Gemm MLP with the same float32 weights, on its VNN-COMP box
  ``prop_0_0.03``.
* ``torch``: a torch MLP trained here for two epochs on the 10,000 MNIST test images of
  ``../shared/data/mnist`` (needs torch; skipped without it), on an eps = 0.02 box around test
  image 1; its legacy (TorchScript) export is the base.

Pairs (per base)
----------------
* ``perm-rescale``: hidden units permuted and scaled by ``c`` in [0.25, 4] (next layer by 1/c);
* ``bn-onnxsim``: a model with BatchNormalization after every hidden Gemm against
  ``onnxsim.simplify`` of it;
* ``srp``: the base against ``onnxsim.stable_relu_prune.apply`` on the box;
* ``own``: the base against ``onnx-exact``'s own compressed output on the box;
* ``merged``: the base with an all-active 256-unit layer inserted after the first, against
  ``stable_relu_prune.apply(merge_active=True)`` of it (the layer folded away);
* ``torch-exports`` (torch base): the legacy and the dynamo export of one torch MLP;
* ``differ-weight``: one first-layer weight of an active unit changed by 1e-3 (must exit 1);
* ``differ-thin``: a planted unit path active only on a sliver of the box at a corner, adding
  up to 0.02 to output 0 (no sampler finds it; must exit 1 with a counterexample).
* ``cnn-own`` (base: each CNN of ``../shared/models/cnn/manifest.json`` on its VNN-LIB box): the
  model against what ``onnx-exact IN OUT --vnnlib`` wrote for it (default options; its channels
  pruned), the structural proof's case (issue 24: proved, bounded time, peak RSS well under
  2 GB). Compressing the four takes 4-8 min before the checks.

A refuted pair counts only when its saved counterexample replays in onnxruntime with
``|f_A - f_B| > atol``.

Usage::

    python bench/check.py                      # every pair, section "check" of docs/benchmarks.md
    python bench/check.py --pairs own,srp --jobs 2 --out /tmp/c.md --section try
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_exact.io.onnx_reader import read_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when the tests load it by path
from measure import measure_command  # noqa: E402  (bench/measure.py)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
CACHE = REPO / "bench" / ".cache" / "check"
ATOL = 1e-5
TARGET_S = 10.0
PAIRS = (
    "perm-rescale",
    "bn-onnxsim",
    "srp",
    "own",
    "merged",
    "torch-exports",
    "differ-weight",
    "differ-thin",
    "cnn-own",
)
REFUTED = ("differ-weight", "differ-thin")

Weights = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class Pair:
    base: str
    kind: str
    a: Path
    b: Path
    box: Path

    @property
    def expected(self) -> str:
        return "refuted" if self.kind in REFUTED else "proved"


# ----------------------------------------------------------------------------- model builders


def gemm_model(weights: Weights, *, bn: list | None = None) -> onnx.ModelProto:
    """``x [N, n] -> (Gemm [-> BatchNormalization] -> Relu)* -> Gemm`` with float32 weights."""
    nodes, inits, current = [], [], "x"
    for k, (weight, bias) in enumerate(weights):
        inits += [
            numpy_helper.from_array(np.asarray(weight, np.float32), f"W{k}"),
            numpy_helper.from_array(np.asarray(bias, np.float32), f"b{k}"),
        ]
        last = k == len(weights) - 1
        out = "y" if last else f"g{k}"
        nodes.append(helper.make_node("Gemm", [current, f"W{k}", f"b{k}"], [out], transB=1))
        if last:
            break
        if bn is not None:
            names = [f"bn{k}_{p}" for p in ("scale", "bias", "mean", "var")]
            inits += [
                numpy_helper.from_array(np.asarray(v, np.float32), n)
                for v, n in zip(bn[k], names, strict=True)
            ]
            nodes.append(helper.make_node("BatchNormalization", [out, *names], [f"n{k}"]))
            out = f"n{k}"
        nodes.append(helper.make_node("Relu", [out], [f"h{k}"]))
        current = f"h{k}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weights[0][0].shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weights[-1][0].shape[0]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def weights_of(path: Path) -> Weights:
    net = read_model(str(path)).network
    assert net.input_map.is_identity
    return [(layer.weight, layer.bias) for layer in net.layers]


def permuted_rescaled(weights: Weights, seed: int = 3) -> Weights:
    rng = np.random.default_rng(seed)
    out = [(np.array(w), np.array(b)) for w, b in weights]
    for k in range(len(out) - 1):
        w, b = out[k]
        perm = rng.permutation(w.shape[0])
        scale = rng.uniform(0.25, 4.0, w.shape[0])
        out[k] = ((w * scale[:, None])[perm], (b * scale)[perm])
        w_next, b_next = out[k + 1]
        out[k + 1] = ((w_next / scale[None, :])[:, perm], b_next)
    return out


def bn_params(weights: Weights, seed: int = 4) -> list:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.uniform(0.5, 2.0, w.shape[0]),
            rng.normal(0.0, 0.1, w.shape[0]),
            rng.normal(0.0, 0.2, w.shape[0]),
            rng.uniform(0.5, 2.0, w.shape[0]),
        )
        for w, _ in weights[:-1]
    ]


def with_active_layer(weights: Weights, box: tuple[np.ndarray, np.ndarray], seed: int = 5):
    """Insert after the first layer a 256-unit layer ``M h + c`` with ``c`` large enough that
    every unit is positive on the box (interval bounds of ``h``), and ``M`` close to identity."""
    rng = np.random.default_rng(seed)
    (w1, b1), rest = weights[0], weights[1:]
    lo, hi = box
    centre, radius = (lo + hi) / 2, (hi - lo) / 2
    h_hi = np.maximum(w1 @ centre + b1 + np.abs(w1) @ radius, 0.0)
    width = w1.shape[0]
    m = np.eye(width) + rng.normal(0.0, 0.02, (width, width))
    c = np.abs(m) @ h_hi + 0.1
    w2, b2 = rest[0]
    inverse = np.linalg.inv(m)
    return [(w1, b1), (m, c), (w2 @ inverse, b2 - w2 @ inverse @ c), *rest[1:]]


def differ_weight(weights: Weights, box) -> Weights:
    """One first-layer weight, of the unit most active at the box centre and the input with the
    largest lower bound, changed by 1e-3."""
    (w1, b1), rest = weights[0], weights[1:]
    lo, hi = box
    unit = int(np.argmax(w1 @ ((lo + hi) / 2) + b1))
    pixel = int(np.argmax(lo))
    w1 = np.array(w1)
    w1[unit, pixel] = np.float32(w1[unit, pixel] + 1e-3)
    return [(w1, b1), *rest]


def differ_thin(weights: Weights, box, seed: int = 6) -> Weights:
    """Add a unit ``u = relu(w . x - t)`` to the first layer, active only where ``w . x`` is within
    ``1e-4`` of its maximum over the box (a corner sliver), copied by a new second-layer unit
    that adds ``K u`` (at most 0.02) to output 0."""
    rng = np.random.default_rng(seed)
    (w1, b1), (w2, b2), (w3, b3) = weights
    lo, hi = box
    w = rng.normal(0.0, 0.05, w1.shape[1]).astype(np.float32).astype(np.float64)
    top = float(np.maximum(w * lo, w * hi).sum())
    delta = 1e-4 * float(np.abs(w) @ (hi - lo))
    w1 = np.vstack([w1, w])
    b1 = np.append(b1, np.float32(-(top - delta)))
    w2 = np.vstack([np.hstack([w2, np.zeros((w2.shape[0], 1))]), np.eye(1, w2.shape[1] + 1, -1)])
    w2[-1, :] = 0.0
    w2[-1, -1] = 1.0
    b2 = np.append(b2, 0.0)
    w3 = np.hstack([w3, np.zeros((w3.shape[0], 1))])
    w3[0, -1] = 0.02 / delta
    return [(w1, b1), (w2, b2), (w3, b3)]


# ----------------------------------------------------------------------------- bases


def mnist_test_images() -> tuple[np.ndarray, np.ndarray]:
    folder = SHARED / "data" / "mnist"
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 784) / 255.0
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    return images.astype(np.float32), labels.astype(np.int64)


def eps_box(image: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    lo = np.clip(image.astype(np.float64) - eps, 0.0, 1.0).astype(np.float32)
    hi = np.clip(image.astype(np.float64) + eps, 0.0, 1.0).astype(np.float32)
    return lo.astype(np.float64), hi.astype(np.float64)


def torch_base(folder: Path) -> tuple[Path, Path, tuple] | None:
    """Train the torch MLP and write its legacy and dynamo exports into ``folder`` (kept there:
    a later run reuses them)."""
    try:
        import torch
    except ImportError:
        return None
    legacy, dynamo = folder / "torch_legacy.onnx", folder / "torch_dynamo.onnx"
    images, labels = mnist_test_images()
    box = eps_box(images[1], 0.02)
    if legacy.exists() and dynamo.exists():
        return legacy, dynamo, box
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for _epoch in range(2):
        for start in range(0, len(x), 128):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                model(x[start : start + 128]), y[start : start + 128]
            )
            loss.backward()
            optimiser.step()
    model.eval()
    sample = x[:2]
    torch.onnx.export(model, (sample,), str(legacy), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})  # fmt: skip
    program = torch.onnx.export(
        model, (sample,), dynamo=True, input_names=["x"], output_names=["y"],
        dynamic_shapes=({0: torch.export.Dim("N")},),
    )  # fmt: skip
    program.save(str(dynamo))
    return legacy, dynamo, box


def build_pairs(folder: Path, kinds: list[str]) -> tuple[list[Pair], list[str]]:
    import onnxsim
    from onnxsim import stable_relu_prune

    notes: list[str] = []
    bases: dict[str, tuple[Path, tuple, Path | None]] = {}
    net = SHARED / "models" / "mnistfc"
    if net.exists():
        data = np.load(net / "mnist-net_256x2.prop_0_0.03.npz")
        box = (np.asarray(data["lower"], np.float64), np.asarray(data["upper"], np.float64))
        path = folder / "mnistfc.onnx"
        onnx.save(gemm_model(weights_of(net / "mnist-net_256x2.onnx")), path)
        bases["mnistfc"] = (path, box, None)
    else:
        notes.append("../shared/models/mnistfc is absent: the mnistfc base is skipped")
    exported = torch_base(CACHE)
    if exported is None:
        notes.append("torch is not installed: the torch base is skipped")
    else:
        bases["torch"] = (exported[0], exported[2], exported[1])
    pairs = []
    for base, (path, box, dynamo) in bases.items():
        box_path = folder / f"{base}.box.npz"
        np.savez(box_path, lower=box[0], upper=box[1])
        weights = weights_of(path)

        def save(model: onnx.ModelProto, name: str, base=base) -> Path:
            target = folder / f"{base}_{name}.onnx"
            onnx.save(model, target)
            return target

        ranges = {"x": (box[0][None, :].astype(np.float32), box[1][None, :].astype(np.float32))}
        for kind in kinds:
            if kind == "perm-rescale":
                b = save(gemm_model(permuted_rescaled(weights)), kind)
                pairs.append(Pair(base, kind, path, b, box_path))
            elif kind == "bn-onnxsim":
                a = save(gemm_model(weights, bn=bn_params(weights)), "bn")
                simplified, ok = onnxsim.simplify(onnx.load(a))
                if not ok:
                    notes.append(f"{base}: onnxsim.simplify failed its own check")
                pairs.append(Pair(base, kind, a, save(simplified, "bn_simplified"), box_path))
            elif kind == "srp":
                pruned, _ = stable_relu_prune.apply(onnx.load(path), input_ranges=ranges)
                pairs.append(Pair(base, kind, path, save(pruned, "srp"), box_path))
            elif kind == "own":
                own = folder / f"{base}_own.onnx"
                subprocess.run(
                    [sys.executable, "-m", "onnx_exact", str(path), str(own), "--input-range-file",
                     str(box_path), "--quiet"],
                    check=True,
                )  # fmt: skip
                pairs.append(Pair(base, kind, path, own, box_path))
            elif kind == "merged":
                a = save(gemm_model(with_active_layer(weights, box)), "active_layer")
                merged, report = stable_relu_prune.apply(
                    onnx.load(a), input_ranges=ranges, merge_active=True
                )
                pairs.append(Pair(base, kind, a, save(merged, "merged"), box_path))
            elif kind == "torch-exports" and dynamo is not None:
                pairs.append(Pair(base, kind, path, dynamo, box_path))
            elif kind == "differ-weight":
                b = save(gemm_model(differ_weight(weights, box)), kind)
                pairs.append(Pair(base, kind, path, b, box_path))
            elif kind == "differ-thin" and len(weights) == 3:
                b = save(gemm_model(differ_thin(weights, box)), kind)
                pairs.append(Pair(base, kind, path, b, box_path))
    if "cnn-own" in kinds:
        pairs += cnn_pairs(folder, notes)
    return pairs, notes


def cnn_pairs(folder: Path, notes: list[str]) -> list[Pair]:
    """Each shared CNN against its compressed output (``onnx-exact IN OUT --vnnlib``)."""
    cnn = SHARED / "models" / "cnn"
    if not (cnn / "manifest.json").exists():
        notes.append("../shared/models/cnn is absent: the cnn-own pairs are skipped")
        return []
    pairs = []
    for entry in json.loads((cnn / "manifest.json").read_text()):
        name, model = entry["name"], cnn / entry["model"]
        out = folder / f"{name}_own.onnx"
        done = subprocess.run(
            [sys.executable, "-m", "onnx_exact", str(model), str(out), "--vnnlib",
             str(cnn / entry["vnnlib"]), "--quiet"],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            notes.append(f"{name}: compress exited {done.returncode}: {done.stderr.strip()[-200:]}")
            continue
        pairs.append(Pair(name, "cnn-own", model, out, cnn / entry["box_npz"]))
    return pairs


# ----------------------------------------------------------------------------- running


def replay(a: Path, b: Path, x: np.ndarray) -> float:
    """Largest ``|f_A - f_B|`` onnxruntime gives at the saved counterexample."""
    outs = []
    for path in (a, b):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = x.reshape([1, *x.shape]) if x.ndim == 1 else x
        name = session.get_inputs()[0].name
        outs.append(session.run(None, {name: feed.astype(np.float32)})[0].astype(np.float64))
    return float(np.abs(outs[0] - outs[1]).max())


def run_pair(pair: Pair, folder: Path, jobs: int, time_limit: float) -> dict:
    report = folder / f"{pair.base}_{pair.kind}.json"
    cex = folder / f"{pair.base}_{pair.kind}.cex.npy"
    for stale in (report, cex):
        stale.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "onnx_exact", "check", str(pair.a), str(pair.b),
        "--input-range-file", str(pair.box), "--json", str(report), "--counterexample", str(cex),
        "--time-limit", str(time_limit), "--jobs", str(jobs), "--quiet",
    ]  # fmt: skip
    usage = measure_command(command)
    row = {"pair": pair.kind, "base": pair.base, "expected": pair.expected,
           "exit": usage.exit_code, "wall_s": usage.wall_s,
           "peak_mb": usage.peak_rss_bytes / 2**20}  # fmt: skip
    if not report.exists():
        row.update(status="error", method="", detail=usage.stderr.strip()[-300:])
        return row
    data = json.loads(report.read_text())
    proof = data.get("proof") or {}
    row.update(
        status=proof.get("status", "no proof"),
        method="+".join(proof.get("tiers", [])) or "-",
        proof_s=proof.get("time_s", float("nan")),
        bound=proof.get("bound"),
        binaries=proof.get("binaries", 0),
        sampled_passed=data["sampled"]["passed"],
        timings=data.get("timings_s", {}),
        proof_timings=proof.get("timings_s", {}),
        correspondence={
            k: v for k, v in (proof.get("correspondence") or {}).items() if k != "layers"
        },
    )
    if cex.exists():
        row["replayed"] = replay(pair.a, pair.b, np.load(cex))
    ok = (usage.exit_code == 0 and row["status"] == "proved") if pair.expected == "proved" else (
        usage.exit_code == 1 and row.get("replayed", 0.0) > ATOL
    )  # fmt: skip
    row["ok"] = ok
    return row


def markdown(
    rows: list[dict], notes: list[str], jobs: int, started: str, load: float, name: str
) -> str:
    head = (
        f"## {name}\n\n`python bench/check.py --jobs {jobs}` at {commit()} on {started} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load:.1f} at the start: the machine was shared with other jobs, wall times are upper "
        "bounds). Every check is the CLI in a "
        "subprocess (interpreter start, read, sampling with 10,000 samples, proof); "
        f"target: proved within {TARGET_S:g} s, differing pairs exit 1 with a counterexample "
        "that replays in onnxruntime.\n\n"
        "Columns: *analysis s* is the sound bounds (interval, CROWN) and sampled signs of both "
        "models (`quick_stability`; of A alone, up to its deepest removed unit, when B is A "
        "pruned), *proof s* the proof after it, *check s* the whole command; "
        "*matched/stable A/B* count hidden units of A and B (see `onnx_exact/equivalence/correspondence.py`), "
        "*targeted* the one-sided units sent to the exact tiers, *peak MB* the command's own "
        "peak RSS (`bench/measure.py`).\n\n"
        "| base | pair | expected | exit | status | method | analysis s | proof s | check s | "
        "peak MB | binaries | matched A/B | stable A/B | targeted | ok |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        c = r.get("correspondence") or {}

        def pair_of(key: str, c: dict = c) -> str:
            return "/".join(str(c.get(key, {}).get(n, "-")) for n in "AB")

        extra = f" (replayed {r['replayed']:.3g})" if "replayed" in r else ""
        lines.append(
            f"| {r['base']} | {r['pair']} | {r['expected']} | {r['exit']} | {r['status']}{extra} | "
            f"{r['method']} | {r.get('timings', {}).get('analysis', float('nan')):.2f} | "
            f"{r.get('proof_s', float('nan')):.2f} | {r['wall_s']:.1f} | {r['peak_mb']:.0f} | "
            f"{r.get('binaries', '-')} | {pair_of('matched')} | {pair_of('stable')} | "
            f"{c.get('targeted', '-')} | {'yes' if r.get('ok') else 'NO'} |"
        )
    proved = [r for r in rows if r["expected"] == "proved"]
    tail = ""
    if proved:
        slow = max(proved, key=lambda r: r["wall_s"])
        parts = {
            **slow.get("timings", {}),
            **{f"proof.{k}": v for k, v in slow.get("proof_timings", {}).items()},
        }
        biggest = ", ".join(
            f"{k} {v:.2f} s" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:4]
        )
        outside = slow["wall_s"] - sum(slow.get("timings", {}).values())
        tail += (
            f"\nSlowest proved pair: {slow['base']} {slow['pair']} ({slow['wall_s']:.1f} s: "
            f"{outside:.1f} s outside the check's phases, i.e. interpreter start, imports, "
            f"domain and JSON; then {biggest}).\n"
        )
    for note in notes:
        tail += f"\n- {note}"
    return head + "\n".join(lines) + "\n" + tail + "\n"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def write_markdown(path: Path, section_name: str, section: str) -> None:
    """Replace (or append) this run's section between its markers, keeping the rest of the file."""
    start, end = f"<!-- bench:{section_name}:start -->", f"<!-- bench:{section_name}:end -->"
    block = f"{start}\n{section}{end}\n"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", help="comma-separated pair kinds (default: all)")
    parser.add_argument("--bases", help="comma-separated bases: mnistfc, torch (default: both)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--section", default="check")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    kinds = args.pairs.split(",") if args.pairs else list(PAIRS)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        folder = Path(tmp)
        pairs, notes = build_pairs(folder, kinds)
        if args.bases:
            pairs = [p for p in pairs if p.base in args.bases.split(",")]
        rows = []
        for pair in pairs:
            row = run_pair(pair, folder, args.jobs, args.time_limit)
            rows.append(row)
            print(
                f"{row['base']:8s} {row['pair']:14s} exit {row['exit']} {row['status']:15s} "
                f"{row['method']:22s} {row['wall_s']:6.1f} s  ok={row.get('ok')}",
                flush=True,
            )
    section = markdown(rows, notes, args.jobs, started, load, args.section)
    print(section)
    if not args.no_write:
        write_markdown(args.out, args.section, section)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
