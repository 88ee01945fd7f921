"""Large-model benchmark: peak memory and time of ``onnx-exact`` on a synthetic 3072-2048-2048-10 MLP.

The model has CIFAR-sized inputs and two 2048-unit hidden layers (10.5 M parameters, 42 MB as
float32), seeded so every run sees the same weights. Each scenario runs the real command line in a
child process; its peak resident set comes from ``measure_command`` of ``bench/measure.py`` (the
kernel's ``ru_maxrss`` of that one child, started from a small launcher so that this script's own
memory is not counted) and the per-phase times from the JSON report. The estimate of
:func:`onnx_exact.resources.estimate_peak_memory` is printed next to the measurement.

Scenarios
---------
``local``     a box of half-width 0.001 around a random point of [0,1]^3072 (most neurons stable);
``full``      the whole box [0,1]^3072, under ``--time-limit`` (open neurons stay UNDECIDED);
``external``  the ``local`` scenario on the model saved with external data (tensors in
              ``<model>.data``, read and written back the same way).
``huge``      a real model over protobuf's 2 GiB limit: a 131840-2048-10 Gemm/Relu MLP in float64
              (like skl2onnx's double models; 270.0 M parameters, 2.01 GiB, written straight to
              external data block by block), the box of half-width 0.001 around a random point;
              end to end: read, analysis, write with external data, onnx.checker and onnxruntime
              from the written path. float64 weights reach 2 GiB with half the parameters of
              float32 ones, and the analysis holds every weight in float64 anyway (about 8 bytes
              per parameter per copy). Not in the default ``--scenarios``: peak RSS 21.4 GiB.

Usage::

    python bench/large_model.py [--workdir DIR] [--time-limit 300] [--doc docs/reliability.md]

With ``--doc`` the results replace the section between the ``large-model`` markers of that file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from measure import measure_command  # bench/measure.py: this script's folder is on sys.path
from onnx import TensorProto, helper, numpy_helper

from onnx_exact.io.onnx_reader import read_model
from onnx_exact.resources import estimate_peak_memory, format_bytes

SIZES = (3072, 2048, 2048, 10)
HUGE_SIZES = (131_840, 2048, 10)
SEED = 0
LOCAL_RADIUS = 0.001
BEGIN, END = "<!-- large-model:begin -->", "<!-- large-model:end -->"


def _mlp_model(
    sizes: tuple[int, ...], initializers: list[TensorProto], elem_type: int, name: str
) -> onnx.ModelProto:
    """The Gemm/Relu MLP over ``fc{k}.weight`` (out, in) and ``fc{k}.bias``, given as initializers
    (inline or pointing at a data file): ``Gemm(transB=1)`` per layer, ``Relu`` after each hidden
    one, input ``["batch", sizes[0]]`` and output ``["batch", sizes[-1]]`` of ``elem_type``."""
    nodes, tensor = [], "input"
    for k in range(len(sizes) - 1):
        nodes.append(
            helper.make_node(
                "Gemm",
                [tensor, f"fc{k}.weight", f"fc{k}.bias"],
                [f"fc{k}"],
                name=f"fc{k}",
                transB=1,
            )
        )
        tensor = f"fc{k}"
        if k < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [tensor], [f"relu{k}"], name=f"relu{k}"))
            tensor = f"relu{k}"
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", elem_type, ["batch", sizes[0]])],
        [helper.make_tensor_value_info(tensor, elem_type, ["batch", sizes[-1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def build_model(sizes: tuple[int, ...] = SIZES, seed: int = SEED) -> onnx.ModelProto:
    """A Gemm/Relu MLP with He-scaled normal weights and small biases (float32, seeded)."""
    rng = np.random.default_rng(seed)
    initializers = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        weight = rng.normal(0.0, np.sqrt(2.0 / n_in), size=(n_out, n_in)).astype(np.float32)
        bias = rng.normal(0.0, 0.05, size=n_out).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"fc{k}.weight"),
            numpy_helper.from_array(bias, f"fc{k}.bias"),
        ]
    return _mlp_model(sizes, initializers, TensorProto.FLOAT, "large_mlp")


def write_huge_model(folder: Path, sizes: tuple[int, ...] = HUGE_SIZES) -> Path:
    """``huge.onnx`` + ``huge.onnx.data``: a seeded float64 Gemm/Relu MLP whose weights never sit
    in one protobuf (nor all in memory at once): each tensor is drawn and written 256 rows at a
    time and the model proto only points at the data file."""
    rng = np.random.default_rng(SEED)
    data_name = "huge.onnx.data"
    initializers, offset = [], 0
    with open(folder / data_name, "wb") as stream:
        for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            for name, shape in ((f"fc{k}.weight", (n_out, n_in)), (f"fc{k}.bias", (n_out,))):
                scale = np.sqrt(2.0 / n_in) if name.endswith("weight") else 0.05
                for start in range(0, shape[0], 256):
                    block = (min(256, shape[0] - start), *shape[1:])
                    rng.normal(0.0, scale, size=block).tofile(stream)
                length = int(np.prod(shape)) * 8
                entry = TensorProto(name=name, data_type=TensorProto.DOUBLE, dims=shape)
                entry.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", offset), ("length", length)):
                    entry.external_data.add(key=key, value=str(value))
                initializers.append(entry)
                offset += length
    model = _mlp_model(sizes, initializers, TensorProto.DOUBLE, "huge_mlp")
    path = folder / "huge.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def run_cli(args: list[str]) -> dict:
    """Run ``python -m onnx_exact ARGS``; measure that child's own peak RSS, CPU and wall time."""
    usage = measure_command([sys.executable, "-m", "onnx_exact", *args])
    return {
        "exit": usage.exit_code,
        "wall_s": usage.wall_s,
        "cpu_s": usage.cpu_s,
        "peak_rss": usage.peak_rss_bytes,
        "stderr": usage.stderr.strip(),
    }


def scenario(name: str, model: Path, box: Path, workdir: Path, extra: list[str]) -> dict:
    out, report = workdir / f"{name}.out.onnx", workdir / f"{name}.json"
    result = run_cli(
        [str(model), str(out), "--input-range-file", str(box), "-q"]
        + extra
        + [
            "--report",
            str(report),
        ]
    )
    result["name"] = name
    if report.exists():
        data = json.loads(report.read_text())
        result["timings_s"] = data.get("timings_s", {})
        result["params"] = (data.get("params_before"), data.get("params_after"))
        result["verification"] = data.get("verification", {})
        result["layers"] = [
            {
                key: len(layer[key])
                for key in ("stably_active", "stably_inactive", "unstable", "undecided")
            }
            for layer in data.get("layers", [])
        ]
    result["output_bytes"] = sum(
        p.stat().st_size for p in workdir.glob(f"{name}.out.onnx*") if p.is_file()
    )
    print(json.dumps(result, indent=1, default=str), flush=True)
    return result


def engine_commit() -> str:
    """``git describe`` of the checkout the engine runs from (``?`` outside git)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return out.stdout.strip()


def markdown(
    results: list[dict], estimate_text: str, model_bytes: int, time_limit: float, load: str
) -> str:
    lines = [
        BEGIN,
        f"Synthetic {'-'.join(map(str, SIZES))} Gemm/Relu MLP (seed {SEED}, {model_bytes / 2**20:.1f} MiB "
        f"float32), `python bench/large_model.py`; `--time-limit {time_limit:g}` on every run; "
        f"engine at commit {engine_commit()}, {os.cpu_count()} cores, load average {load} at "
        "the start (peak memory depends on how far the solver tiers get in the time).",
        f"Estimated peak (`resources.estimate_peak_memory`): {estimate_text}.",
        "",
        "| scenario | exit | peak RSS | wall s | CPU s | params before → after | active / inactive / "
        "unstable / undecided (per layer) | verify max abs diff | phase times (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        layers = "; ".join(
            f"{x['stably_active']}/{x['stably_inactive']}/{x['unstable']}/{x['undecided']}"
            for x in r.get("layers", [])
        )
        phases = ", ".join(
            f"{k} {v:.1f}" for k, v in r.get("timings_s", {}).items() if "." not in k
        )
        before, after = r.get("params", (None, None))
        diff = r.get("verification", {}).get("max_abs_diff")
        lines.append(
            f"| {r['name']} | {r['exit']} | {format_bytes(r['peak_rss'])} | {r['wall_s']:.1f} | "
            f"{r['cpu_s']:.1f} | {before} → {after} | {layers} | "
            f"{'' if diff is None else f'{diff:.2g}'} | {phases} |"
        )
    lines.append(END)
    return "\n".join(lines)


def update_doc(doc: Path, section: str) -> None:
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument("--doc", type=Path, default=None)
    parser.add_argument("--scenarios", default="local,external,full")
    args = parser.parse_args()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="onnx_exact_large_"))
    workdir.mkdir(parents=True, exist_ok=True)

    model = build_model()
    model_path = workdir / "large.onnx"
    onnx.save(model, model_path)
    external_path = workdir / "large_external.onnx"
    # onnx.save appends to an existing data file: a rerun in the same workdir would grow it
    (workdir / "large_external.onnx.data").unlink(missing_ok=True)
    onnx.save(
        model,
        external_path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="large_external.onnx.data",
        size_threshold=0,
    )
    rng = np.random.default_rng(SEED)
    center = rng.random(SIZES[0])
    local = workdir / "local_box.npz"
    np.savez(
        local,
        lower=np.clip(center - LOCAL_RADIUS, 0, 1),
        upper=np.clip(center + LOCAL_RADIUS, 0, 1),
    )
    full = workdir / "full_box.npz"
    np.savez(full, lower=np.zeros(SIZES[0]), upper=np.ones(SIZES[0]))

    estimate = estimate_peak_memory(read_model(model_path).network)
    print(f"estimated peak: {estimate.describe()}", flush=True)
    limit = ["--time-limit", f"{args.time_limit:g}"]
    plans = {
        "local": (model_path, local),
        "external": (external_path, local),
        "full": (model_path, full),
    }
    if "huge" in args.scenarios.split(","):
        huge_center = np.random.default_rng(SEED).random(HUGE_SIZES[0])
        huge_box = workdir / "huge_box.npz"
        np.savez(
            huge_box,
            lower=np.clip(huge_center - LOCAL_RADIUS, 0, 1),
            upper=np.clip(huge_center + LOCAL_RADIUS, 0, 1),
        )
        plans["huge"] = (write_huge_model(workdir), huge_box)
    results = [scenario(name, *plans[name], workdir, limit) for name in args.scenarios.split(",")]
    section = markdown(
        results, estimate.describe(), model_path.stat().st_size, args.time_limit, load
    )
    print(section)
    if args.doc:
        update_doc(args.doc, section)


if __name__ == "__main__":
    main()
