"""CNNs too large for dense layer matrices: scale of the whole job (time, memory), not pruning.

Not a test: ``python bench/cnn_large.py [--time-limit S] [--check] [--out F]``.
Three CNNs of common published shapes are built here with seeded random weights (``onnx.helper``,
torch-legacy op patterns), each with an L∞ box of a seeded random image, and each goes through
the command a user runs, ``onnx-exact IN OUT --input-range-file BOX --json R``, in a child process
measured from outside (``bench/measure.py``: wall time, peak RSS):

* ``mnist_maxpool``: torch's MNIST example, Conv 1→32 3×3, Conv 32→64 3×3, MaxPool 2,
  Gemm 9216→128→10 (box ε = 0.03);
* ``cifar_convbig``: ERAN's ConvBig, Conv 3→32 3×3 p1, 32→32 4×4 s2, 32→64 3×3 p1, 64→64 4×4 s2,
  Gemm 4096→512→512→10 (ε = 2/255);
* ``cifar_resnet32``: a stem Conv 3→16 and one basic block 16→16 at 32×32 (identity skip),
  AveragePool 4, Gemm 1024→10 (ε = 1/255).

Every one has layers whose dense matrices pass the reader's 2^25-entry dense limit (the column
*largest dense layer*), which the reader refused before sparse layers. The weights are random,
so few units are stable: the table measures that the job runs, within what time and memory, and
verifies, not how much a trained network loses. The section ``cnn-large`` of ``--out`` (default
``docs/benchmarks.md``) is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from cnn import TARGET_MIB, TARGET_S, commit
from measure import load_stability_bench, measure_command
from onnx import TensorProto, helper, numpy_helper

from onnx_exact.io.model_stats import model_stats
from onnx_exact.io.onnx_reader import read_model

REPO = Path(__file__).resolve().parent.parent


class _Graph:
    """Nodes and float32 initializers of one model, with seeded He-scaled random weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, name: str, c_in: int, c_out: int, k: int, s: int = 1, p: int = 0) -> str:
        w = self.rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))
        b = self.rng.standard_normal(c_out) * 0.05
        inputs = [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)]
        return self.node("Conv", inputs, name, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)

    def gemm(self, x: str, name: str, n_in: int, n_out: int) -> str:
        w = self.rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)
        b = self.rng.standard_normal(n_out) * 0.05
        inputs = [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)]
        return self.node("Gemm", inputs, name, transB=1)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def model(self, shape: tuple[int, ...], out: str, classes: int) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], ["output"], name="output"))
        graph = helper.make_graph(
            self.nodes,
            "bench",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def mnist_maxpool() -> tuple[onnx.ModelProto, tuple[int, ...], float]:
    g = _Graph(1)
    h = g.relu(g.conv("input", "conv1", 1, 32, 3), "relu1")
    h = g.relu(g.conv(h, "conv2", 32, 64, 3), "relu2")
    h = g.node("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[2, 2])
    h = g.node("Flatten", [h], "flatten", axis=1)
    h = g.relu(g.gemm(h, "fc1", 9216, 128), "relu3")
    return g.model((1, 28, 28), g.gemm(h, "fc2", 128, 10), 10), (1, 28, 28), 0.03


def cifar_convbig() -> tuple[onnx.ModelProto, tuple[int, ...], float]:
    g = _Graph(2)
    h = "input"
    convs = [(3, 32, 3, 1, 1), (32, 32, 4, 2, 1), (32, 64, 3, 1, 1), (64, 64, 4, 2, 1)]
    for i, (c_in, c_out, k, s, p) in enumerate(convs):
        h = g.relu(g.conv(h, f"conv{i}", c_in, c_out, k, s, p), f"relu{i}")
    h = g.node("Flatten", [h], "flatten", axis=1)
    h = g.relu(g.gemm(h, "fc0", 4096, 512), "relu_fc0")
    h = g.relu(g.gemm(h, "fc1", 512, 512), "relu_fc1")
    return g.model((3, 32, 32), g.gemm(h, "fc2", 512, 10), 10), (3, 32, 32), 2 / 255


def cifar_resnet32() -> tuple[onnx.ModelProto, tuple[int, ...], float]:
    g = _Graph(3)
    s = g.relu(g.conv("input", "stem", 3, 16, 3, p=1), "relu_stem")
    h = g.relu(g.conv(s, "block.conv1", 16, 16, 3, p=1), "block.relu1")
    h = g.node("Add", [g.conv(h, "block.conv2", 16, 16, 3, p=1), s], "block.add")
    h = g.relu(h, "block.relu2")
    h = g.node("AveragePool", [h], "pool", kernel_shape=[4, 4], strides=[4, 4])
    h = g.node("Flatten", [h], "flatten", axis=1)
    return g.model((3, 32, 32), g.gemm(h, "fc", 1024, 10), 10), (3, 32, 32), 1 / 255


MODELS = {"mnist_maxpool": mnist_maxpool, "cifar_convbig": cifar_convbig,
          "cifar_resnet32": cifar_resnet32}  # fmt: skip


def run_model(name: str, time_limit: float | None, check: bool) -> dict:
    model, shape, eps = MODELS[name]()
    centre = np.random.default_rng(0).uniform(0, 1, (1, *shape))
    net = read_model(model).network
    units = sum(int(net.layers[k].real.sum()) for k in net.unit_layer_indices)
    row: dict = {"model": name, "eps": eps, "neurons": units}
    row["largest_dense"] = max(x.out_features * x.in_features for x in net.layers)
    options = [] if time_limit is None else ["--time-limit", str(time_limit)]
    with tempfile.TemporaryDirectory() as tmp:
        source, box = Path(tmp) / "in.onnx", Path(tmp) / "box.npz"
        out, report = Path(tmp) / "small.onnx", Path(tmp) / "report.json"
        onnx.save(model, source)
        np.savez(box, lower=np.clip(centre - eps, 0, 1), upper=np.clip(centre + eps, 0, 1))
        command = [sys.executable, "-m", "onnx_exact", str(source), str(out),
                   "--input-range-file", str(box), "--json", str(report), *options]  # fmt: skip
        usage = measure_command(command)
        row.update(exit=usage.exit_code, wall_s=usage.wall_s, peak_mib=usage.peak_rss_bytes / 2**20)
        if usage.exit_code != 0 or not out.exists():
            lines = [line for line in usage.stderr.splitlines() if line.startswith("onnx-exact:")]
            row["error"] = lines[-1] if lines else usage.stderr.strip()[-200:]
            return row
        doc = json.loads(report.read_text())
        before, after = model_stats(model), model_stats(onnx.load(out))
        row["params"] = (before.params, before.params - after.params)
        row["macs"] = (before.macs, before.macs - after.macs)
        layers = [x for x in doc["layers"] if "channels" in x]
        row["removed"] = sum(len(x["channels"]["removed"]) for x in layers)
        row["stable"] = sum(
            len(x["stably_active"]) + len(x["stably_inactive"]) for x in doc["layers"]
        )
        row["undecided"] = sum(len(x["undecided"]) for x in doc["layers"])
        row["timings_s"] = {k: round(v, 1) for k, v in doc["timings_s"].items() if "." not in k}
        row["verification"] = doc["verification"]["passed"]
        row["max_abs"] = doc["verification"]["max_abs_diff"]
        if check:
            checked = measure_command([sys.executable, "-m", "onnx_exact", "check", str(source),
                                       str(out), "--input-range-file", str(box), *options])  # fmt: skip
            row["check"] = (checked.exit_code, checked.wall_s)
    return row


def _cells(row: dict, check: bool) -> list[str]:
    head = [
        row["model"],
        f"{row['neurons']:,}",
        f"{row['largest_dense'] / 1e6:.0f} M",
        str(row["exit"]),
    ]
    if "error" in row:
        return head + [row["error"]] + [""] * (7 + check)
    tiers = ", ".join(f"{k} {v}" for k, v in row["timings_s"].items() if v >= 0.5)
    cells = head + [
        f"{row['stable']:,}",
        f"{row['removed']}",
        f"{row['params'][1]:,} (of {row['params'][0]:,})",
        f"{row['macs'][1]:,} (of {row['macs'][0]:,})",
        f"{row['undecided']:,}",
        f"{'passed' if row['verification'] else 'FAILED'} ({row['max_abs']:.2g})",
    ]
    if check:
        code, seconds = row["check"]
        cells.append(
            f"{ {0: 'proved', 4: 'not proved'}.get(code, f'exit {code}') } ({seconds:.0f} s)"
        )
    return cells + [f"{row['wall_s']:.1f} ({tiers})", f"{row['peak_mib']:.0f}"]


def markdown(rows: list[dict], args, started: str, load: tuple, command: str) -> str:
    header = ["model", "ReLU units", "largest dense layer", "exit", "proved stable",
              "channels removed",
              "params removed", "MACs removed", "undecided", "verification (max abs)"]  # fmt: skip
    if args.check:
        header.append("check IN OUT")
    header += ["time s (phases)", "peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(row, args.check)) + " |" for row in rows]
    done = [r for r in rows if "error" not in r]
    within = sum(r["wall_s"] <= TARGET_S and r["peak_mib"] <= TARGET_MIB for r in done)
    return (
        f"## {args.section}\n\n"
        f"`{command}` at {commit()} on {started} ({os.cpu_count()} cores, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start: the machine was shared with "
        "other jobs, wall times are upper bounds).\n\n"
        "CNNs of published shapes with seeded random weights (see `bench/cnn_large.py`), each "
        "through `onnx-exact IN OUT --input-range-file BOX` with default options in a child "
        "process. *largest dense layer*: entries of the biggest layer matrix had it been dense "
        "(the reader keeps layers over 34 M entries sparse). Random weights leave few units "
        "stable: the rows measure that the whole job runs and verifies, and at what cost.\n\n"
        + "\n".join(lines)
        + f"\n\nExit 0 on {sum(r['exit'] == 0 for r in rows)} of {len(rows)}; within "
        f"{TARGET_S:.0f} s and {TARGET_MIB} MiB: {within} of {len(done)}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, help="passed to onnx-exact (default: its own)")
    parser.add_argument("--check", action="store_true", help="also run check IN OUT (minutes)")
    parser.add_argument("--models", help="comma-separated names (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--section", default="cnn-large")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else list(MODELS)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    rows = []
    for name in names:
        row = run_model(name, args.time_limit, args.check)
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    command = "python bench/cnn_large.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(rows, args, started, load, command.strip())
    load_stability_bench().write_markdown(args.out, args.section, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
