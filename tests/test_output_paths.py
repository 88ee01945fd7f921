"""Never clobber a file: every path a run writes is checked against every path it reads.

Each clash runs the command line in-process and asserts exit 2, one stderr line naming the
written path and the path it collides with, no analysis started (the reader is never called),
and every file in the folder byte-identical afterwards (no new file either).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli
from exporter_fixtures import gemm_mlp

from onnx_exact import pipeline
from onnx_exact.core.errors import UsageError
from onnx_exact.io import save as output_paths
from onnx_exact.io.save import numpy_save_path, plan_run_paths, write_file_atomic
from onnx_exact.io.staging import external_data_path

RANGE = ("-r", "[0,1]")


def model_file(d: Path, name: str = "model.onnx", *, data: str | None = None) -> Path:
    """A small ReLU MLP saved at ``d/name``; with ``data``, its weights in that external file."""
    path = d / name
    if data is None:
        onnx.save(gemm_mlp((4, 6, 3)), path)
    else:
        onnx.save(
            gemm_mlp((4, 6, 3)),
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data,
            size_threshold=0,
        )
    return path


def contents(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a regular file's bytes, or the kind of anything else."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        key = str(path.relative_to(folder))
        found[key] = path.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
    return found


@pytest.fixture
def no_analysis(monkeypatch):
    """Fail the test if a model is read: the paths must be refused before the analysis."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was read although the paths clash")

    monkeypatch.setattr(pipeline, "read_model", refuse)


def box_file(d: Path) -> Path:
    np.savez(d / "box.npz", lower=np.zeros(4), upper=np.ones(4))
    return d / "box.npz"


def vnnlib_file(d: Path) -> Path:
    lines = [f"(declare-const X_{i} Real)" for i in range(4)]
    lines += [f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 1.0))" for i in range(4)]
    (d / "prop.vnnlib").write_text("\n".join(lines) + "\n")
    return d / "prop.vnnlib"


def fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe")
    return d / "pipe"


Case = Callable[[Path], tuple[list, tuple[str, ...]]]

CLASHES: dict[str, Case] = {
    "compress --report is the input model": lambda d: (
        [model_file(d), d / "out.onnx", *RANGE, "--report", d / "model.onnx"],
        ("model.onnx", "is the input model"),
    ),
    "compress --report is the output model": lambda d: (
        [model_file(d), d / "out.onnx", *RANGE, "--report", d / "out.onnx"],
        ("out.onnx", "is the output model"),
    ),
    "analyze --json is the input model": lambda d: (
        ["analyze", model_file(d), *RANGE, "--json", d / "model.onnx"],
        ("--json", "model.onnx", "is the input model"),
    ),
    "check --json is the reference model": lambda d: (
        ["check", model_file(d), model_file(d, "b.onnx"), *RANGE, "--json", d / "model.onnx"],
        ("--json", "model.onnx", "is the reference model"),
    ),
    "check --json is the candidate model": lambda d: (
        ["check", model_file(d), model_file(d, "b.onnx"), *RANGE, "--json", d / "b.onnx"],
        ("--json", "b.onnx", "is the candidate model"),
    ),
    "check --counterexample is the --json file": lambda d: (
        [
            "check",
            model_file(d),
            model_file(d, "b.onnx"),
            *RANGE,
            "--counterexample",
            d / "cx",
            "--json",
            d / "cx.npy",
        ],
        ("--json", "cx.npy", "is the --counterexample file"),
    ),
    "check --counterexample (np.save adds .npy) is the box file": lambda d: (
        [
            "check",
            model_file(d),
            model_file(d, "b.onnx"),
            "--input-range-file",
            (d / "box.npy", np.save(d / "box.npy", np.stack([np.zeros(4), np.ones(4)])))[0],
            "--counterexample",
            d / "box",
        ],
        ("--counterexample", "box.npy", "is the --input-range-file file"),
    ),
    "output's data file is the input's data file": lambda d: (
        [model_file(d, "big.onnx", data="small.onnx.data"), d / "small.onnx", *RANGE],
        ("data file", "small.onnx.data", "is the input model's external data"),
    ),
    "output is the input's data file": lambda d: (
        [model_file(d, data="model.onnx.data"), d / "model.onnx.data", *RANGE],
        ("output path", "model.onnx.data", "is the input model's external data"),
    ),
    "analyze --json is the input's data file": lambda d: (
        ["analyze", model_file(d, data="w.bin"), *RANGE, "--json", d / "w.bin"],
        ("--json", "w.bin", "is the input model's external data"),
    ),
    "output is the --input-range-file": lambda d: (
        [model_file(d), d / "box.npz", "--input-range-file", box_file(d)],
        ("output path", "box.npz", "is the --input-range-file file"),
    ),
    "--report is the --vnnlib file": lambda d: (
        [model_file(d), d / "out.onnx", "--vnnlib", vnnlib_file(d), "--report", d / "prop.vnnlib"],
        ("prop.vnnlib", "is the --vnnlib file"),
    ),
    "output is a symbolic link to the input": lambda d: (
        [model_file(d), (d / "link.onnx", (d / "link.onnx").symlink_to("model.onnx"))[0], *RANGE],
        ("output path", "link.onnx", "is the input model", "model.onnx"),
    ),
    "output is a hard link to the input": lambda d: (
        [model_file(d), (d / "hard.onnx", os.link(d / "model.onnx", d / "hard.onnx"))[0], *RANGE],
        ("output path", "hard.onnx", "is the input model"),
    ),
    "output is a FIFO": lambda d: (
        [model_file(d), fifo(d), *RANGE],
        ("output path", "pipe", "FIFO", "not a regular file"),
    ),
    "--json is a FIFO": lambda d: (
        ["analyze", model_file(d), *RANGE, "--json", fifo(d)],
        ("--json", "pipe", "FIFO"),
    ),
    "output is a device": lambda d: (
        [model_file(d), os.devnull, *RANGE],
        ("output path", os.devnull, "character device"),
    ),
    "output names a missing folder (trailing slash)": lambda d: (
        [model_file(d), f"{d / 'newdir'}{os.sep}", *RANGE],
        ("output path", "newdir/", "no such folder"),
    ),
    "--report in a missing folder": lambda d: (
        [model_file(d), d / "out.onnx", *RANGE, "--report", d / "nowhere" / "r.json"],
        ("r.json", "nowhere", "does not exist"),
    ),
    "--report is a directory": lambda d: (
        [model_file(d), d / "out.onnx", *RANGE, "--report", (d / "sub", (d / "sub").mkdir())[0]],
        ("sub", "is a directory"),
    ),
    "--json under a regular file": lambda d: (
        ["analyze", model_file(d), *RANGE, "--json", d / "model.onnx" / "r.json"],
        ("--json", "r.json", "is not a folder"),
    ),
}


@pytest.mark.parametrize("make", list(CLASHES.values()), ids=list(CLASHES))
def test_a_clash_is_refused_before_the_analysis_and_touches_nothing(tmp_path, no_analysis, make):
    args, needles = make(tmp_path)
    before = contents(tmp_path)
    code, _, err = run_cli(args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnx-exact: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert contents(tmp_path) == before


def test_the_output_is_refused_when_its_data_file_would_overwrite_the_inputs_weights(tmp_path):
    """Without the check the run wrote ``small.onnx.data`` over the weights ``big.onnx`` reads."""
    source = model_file(tmp_path, "big.onnx", data="small.onnx.data")
    code, _, err = run_cli([source, tmp_path / "small.onnx", *RANGE])
    assert code == 2, err
    onnx.checker.check_model(onnx.load(source))  # the input still loads with its weights
    assert not (tmp_path / "small.onnx").exists()


def test_distinct_paths_run_and_the_reports_are_written(tmp_path):
    """A compress run with external data, a box file and a report: nothing clashes."""
    source = model_file(tmp_path, data="model.onnx.data")
    box = box_file(tmp_path)
    code, _, err = run_cli(
        [source, tmp_path / "out.onnx", "--input-range-file", box, "--report", tmp_path / "r.json"]
    )
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["params_before"] > 0
    assert onnx.load(tmp_path / "out.onnx") is not None
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_json_dash_is_standard_output_not_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["analyze", model_file(tmp_path), *RANGE, "--json", "-", "-q"])
    assert code == 0, err
    assert json.loads(out)["layers"]
    assert not (tmp_path / "-").exists()


def test_plan_lists_the_input_data_files_and_reserves_the_output_data_file(tmp_path):
    source = model_file(tmp_path, data="weights.bin")
    plan = plan_run_paths(
        models=[("the input model", source)],
        domain_files=[("--vnnlib", None)],
        output_model=tmp_path / "out.onnx",
        outputs=[("--json", "-"), ("--report", None)],
    )
    assert [r.path for r in plan.reads] == [str(source), str(tmp_path / "weights.bin")]
    assert [w.path for w in plan.writes] == [
        str(tmp_path / "out.onnx"),
        str(external_data_path(tmp_path / "out.onnx")),
    ]


def test_an_in_memory_or_missing_model_reads_no_file(tmp_path):
    plan = plan_run_paths(models=[("the input model", gemm_mlp((4, 6, 3)))], output_model="o.onnx")
    assert plan.reads == () and len(plan.writes) == 2
    # a model path that is no file: the reader reports it first, nothing is checked here
    missing = plan_run_paths(
        models=[("the input model", tmp_path / "nothere.onnx")], output_model=tmp_path
    )
    assert missing.writes == ()


def test_unparsable_model_has_no_data_files(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"not a model")
    assert output_paths.external_data_files(tmp_path / "m.onnx") == []


def test_the_python_api_refuses_the_clash_too(tmp_path):
    source = model_file(tmp_path, "big.onnx", data="small.onnx.data")
    before = contents(tmp_path)
    with pytest.raises(UsageError, match="is the input model's external data"):
        pipeline.compress(source, tmp_path / "small.onnx", pipeline.DomainSpec(["[0,1]"]))
    candidate = model_file(tmp_path, "b.npy")  # np.save(".../b") writes b.npy
    before = contents(tmp_path)
    with pytest.raises(UsageError, match="--counterexample .*b.npy' is the candidate model"):
        pipeline.check(
            source, candidate, pipeline.DomainSpec(["[0,1]"]), counterexample_path=tmp_path / "b"
        )
    assert contents(tmp_path) == before


def test_numpy_save_path_is_the_file_np_save_writes(tmp_path):
    for name in ("cx", "cx.npy", "cx.onnx"):
        np.save(tmp_path / name, np.zeros(1))
        assert Path(numpy_save_path(tmp_path / name)).is_file()


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    def fail(temporary: str) -> None:
        Path(temporary).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UsageError, match="r.json"):
        write_file_atomic(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    write_file_atomic(target, lambda temporary: Path(temporary).write_text("new"))
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_model_without_external_data_is_not_parsed_twice(tmp_path, monkeypatch):
    """No ``location`` bytes, no external tensor: a scan replaces the protobuf parse."""
    inline = model_file(tmp_path)
    external = model_file(tmp_path, "ext.onnx", data="ext.bin")
    (tmp_path / "empty.onnx").write_bytes(b"")
    parsed: list[str] = []
    real_load = onnx.load

    def counting_load(path, *args, **kwargs):
        parsed.append(os.path.basename(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(output_paths.onnx, "load", counting_load)
    assert output_paths.external_data_files(inline) == []
    assert output_paths.external_data_files(tmp_path / "empty.onnx") == []
    assert output_paths.external_data_files(external) == [str(tmp_path / "ext.bin")]
    assert parsed == ["ext.onnx"]
