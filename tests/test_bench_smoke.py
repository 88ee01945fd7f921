"""Smoke test of ``bench/stability.py``: one tiny model end to end, plus its markdown bookkeeping.

The benchmark itself is not a test (its targets are measured, not asserted); this checks that the
script runs all three methods in child processes, compares their labels and onnxsim's proofs, and
writes a well-formed section into the markdown file without touching other sections.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "stability.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_stability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def tiny_mlp(path: Path) -> None:
    """4 → 6 → 5 → 2 ReLU MLP on [0,1]^4 (recorded in metadata) with stable and unstable neurons.

    Biases of ±4 against weights in [-1, 1] make some neurons provably always active / inactive
    on the unit box; the others cross zero.
    """
    rng = np.random.default_rng(7)
    w1 = rng.uniform(-1, 1, (6, 4))
    b1 = np.array([4.0, -4.0, 0.1, -0.2, -0.05, 0.3])
    w2 = rng.uniform(-1, 1, (5, 6))
    b2 = np.array([0.2, -9.0, 0.05, 9.0, -0.1])
    w3 = rng.uniform(-1, 1, (2, 5))
    b3 = np.zeros(2)
    initializers, nodes, current = [], [], "x"
    for k, (w, b) in enumerate(((w1, b1), (w2, b2), (w3, b3))):
        initializers += [
            numpy_helper.from_array(w.astype(np.float32), f"W{k}"),
            numpy_helper.from_array(b.astype(np.float32), f"B{k}"),
        ]
        out = "y" if k == 2 else f"z{k}"
        nodes.append(helper.make_node("Gemm", [current, f"W{k}", f"B{k}"], [out], transB=1))
        if k < 2:
            nodes.append(helper.make_node("Relu", [out], [f"h{k}"], name=f"relu{k}"))
            current = f"h{k}"
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"onnx_exact.domain.x": json.dumps({"lower": 0, "upper": 1})})
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_bench_runs_one_case_and_writes_its_section(tmp_path: Path) -> None:
    model = tmp_path / "tiny.onnx"
    tiny_mlp(model)
    out = tmp_path / "bench.md"
    out.write_text("# Stability benchmark\n\nhand-written intro kept\n")
    completed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model",
            str(model),
            "--baseline-cap",
            "10",
            "--time-limit",
            "10",
            "--out",
            str(out),
            "--section",
            "smoke",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    text = out.read_text()
    assert "hand-written intro kept" in text
    assert text.count("<!-- bench:smoke:start -->") == 1
    section = text.split("<!-- bench:smoke:start -->")[1].split("<!-- bench:smoke:end -->")[0]
    row = next(line for line in section.splitlines() if line.startswith("| tiny |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    headers = load_bench().HEADERS
    record = dict(zip(headers, cells, strict=True))
    assert record["neurons"] == "11"
    assert record["undecided"] == "0"
    assert record["labels"] == "agree"
    assert "⊆ ours" in record["onnxsim proofs"] and "NOT" not in record["onnxsim proofs"]
    stable = int(record["stable found (auto)"].split()[0])
    assert stable >= 3  # the ±4 and ±9 biases alone make four neurons stable
    assert "| every neuron decided (0 undecided) within 600 s, every case | met |" in section
    assert "engine at commit " in section and "load average " in section  # what the times mean


def test_markdown_sections_are_replaced_in_place(tmp_path: Path) -> None:
    bench = load_bench()
    out = tmp_path / "b.md"
    bench.write_markdown(out, "quick", "first quick\n")
    bench.write_markdown(out, "full", "the full run\n")
    bench.write_markdown(out, "quick", "second quick\n")
    text = out.read_text()
    assert text.startswith("# Stability benchmark")
    assert "first quick" not in text and "second quick" in text and "the full run" in text
    assert text.index("second quick") < text.index("the full run")


def test_label_comparison_flags_conflicts_but_not_open_neurons() -> None:
    bench = load_bench()

    def run(states: list[int]) -> dict:
        return {
            "states": [np.array(states, dtype=np.int8)],
            "decided_by": [np.array(["x"] * len(states))],
            "layer_names": ["relu0"],
        }

    agree = {m: run([0, 1, 2]) for m in bench.METHODS}
    assert bench.compare_labels(agree) == ("agree", [])
    capped = {"auto": run([0, 1, 2]), "isa": run([0, 3, 2]), "per-neuron": run([0, 1, 3])}
    verdict, details = bench.compare_labels(capped)
    assert verdict.startswith("consistent") and not details
    wrong = {"auto": run([0, 1, 2]), "isa": run([0, 1, 0]), "per-neuron": run([0, 1, 2])}
    verdict, details = bench.compare_labels(wrong)
    assert "CONFLICT auto/isa: 1" in verdict and "CONFLICT isa/per-neuron: 1" in verdict
    assert "neuron 2: auto=INACTIVE by 'x', isa=UNSTABLE by 'x'" in details[0]


def test_open_neurons_of_finished_runs_are_reported_with_autos_verdict() -> None:
    bench = load_bench()

    def run(states: list[int], time_limit_hit: bool = False) -> dict:
        return {
            "states": [np.array(states, dtype=np.int8)],
            "decided_by": [np.array(["lp"] * len(states))],
            "layer_names": ["relu0"],
            "time_limit_hit": time_limit_hit,
        }

    runs = {"auto": run([0, 1]), "isa": run([0, 3]), "per-neuron": run([3, 3], True)}
    (finding,) = bench.open_without_time_limit(runs)
    assert finding.startswith("isa left layer 0 (relu0) neuron 1 UNDECIDED")
    assert finding.endswith("auto: ACTIVE by 'lp'")


def test_the_benchmark_docs_keep_one_well_formed_section_per_run() -> None:
    """``write_markdown`` replaces a section only between its own two markers: each must appear
    once, start before end, with no other section's marker inside."""
    import re

    text = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    markers = re.findall(r"<!-- bench:([\w.-]+):(start|end) -->", text)
    assert markers and len(markers) % 2 == 0
    for (name, kind), (other, other_kind) in zip(markers[::2], markers[1::2], strict=True):
        assert (kind, other_kind, other) == ("start", "end", name), name
    names = [name for name, kind in markers if kind == "start"]
    assert len(names) == len(set(names)), names
