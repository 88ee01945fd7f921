"""Adversarial checks of issue 21 ("Trust") on models and paths other than the issue's own.

A model whose nodes *after* the last layer do not type-check (the walk of the MLP never looks at
them) is one onnxruntime refuses to load. It must be refused up front as an input error naming
the input (exit 2, one line), by ``analyze`` as by ``compress``; it used to be analysed, then
``compress`` failed with exit 1 saying the *written* model does not load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli
from exporter_fixtures import GraphBuilder, mlp_parameters, torch_softmax_tail
from onnx import TensorProto

ERROR = "onnx-exact: error: "


def matmul_bias_of_wrong_length() -> onnx.ModelProto:
    """``MatMul -> Add`` layers; the last bias has 5 entries for 4 outputs (no broadcast)."""
    g = GraphBuilder()
    x = "inp"
    params = mlp_parameters((7, 9, 4), seed=11)
    for k, (weight, bias) in enumerate(params):
        x = g.node("MatMul", [x, g.const(weight.T.copy(), f"lin{k}.w")], name=f"MM{k}")
        if k == len(params) - 1:
            bias = np.zeros(5, np.float32)
        x = g.node("Add", [x, g.const(bias, f"lin{k}.b")], name=f"AD{k}")
        if k == 0:
            x = g.node("Relu", [x], name="RL")
    return g.model([g.tensor("inp", [1, 7])], [g.tensor(x, [1, 4])])


def softmax_axis_out_of_range() -> onnx.ModelProto:
    model = torch_softmax_tail()[0]
    (axis,) = [a for a in model.graph.node[-1].attribute if a.name == "axis"]
    axis.i = 5
    return model


def output_declared_double() -> onnx.ModelProto:
    model = torch_softmax_tail()[0]
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    return model


BROKEN_TAILS = {
    "bias of the wrong length": (matmul_bias_of_wrong_length, "node name: AD1"),
    "softmax axis out of range": (softmax_axis_out_of_range, "'axis' must be in"),
    "output declared double": (output_declared_double, "elem type"),
}


@pytest.mark.parametrize("command", ["compress", "analyze"])
@pytest.mark.parametrize("case", sorted(BROKEN_TAILS))
def test_a_model_onnxruntime_cannot_load_is_an_input_error(tmp_path: Path, case: str, command):
    build, needle = BROKEN_TAILS[case]
    path = tmp_path / "m.onnx"
    onnx.save(build(), path)
    before = sorted(tmp_path.iterdir())
    args = [path, tmp_path / "o.onnx"] if command == "compress" else ["analyze", path]
    code, _, err = run_cli([*args, "-r", "[-1,1]", "--jobs", "1", "--time-limit", "10", "-q"])
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(ERROR), err
    assert str(path) in lines[0] and "onnxruntime cannot load it" in lines[0] and needle in lines[0]
    assert "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == before


def test_a_declared_output_shape_that_differs_is_still_accepted(tmp_path: Path):
    """onnxruntime only warns about a declared output shape that differs from the inferred one,
    so the inference check sets declared shapes aside: such a model still compresses."""
    model = torch_softmax_tail()[0]
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code, _, err = run_cli([path, tmp_path / "o.onnx", "-r", "[-1,1]", "--jobs", "1", "-q"])
    assert code == 0, err
    assert (tmp_path / "o.onnx").is_file()


@pytest.mark.parametrize("command", ["compress", "check"])
def test_a_tolerance_for_an_output_the_model_lacks_is_refused(tmp_path: Path, command: str):
    """Polygraphy's ``--atol 1e-5 NAME:1e-4`` with a NAME the model does not have (a typo, or the
    exporter renamed the output) silently left that output at the default tolerance."""
    model, _, _ = torch_softmax_tail()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    args = [path, tmp_path / "o.onnx"] if command == "compress" else ["check", path, path]
    code, _, err = run_cli([*args, "-r", "[-1,1]", "--jobs", "1", "--atol", "1e-5", "logit:1e-4"])
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(ERROR), err
    assert "--atol logit:0.0001" in lines[0] and "'output'" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_an_empty_output_path_is_a_usage_error(tmp_path: Path, monkeypatch):
    """``onnx-exact IN ''`` (an unset shell variable) was an internal error (exit 3): the data
    file's name was derived from a path with no name."""
    model, _, _ = torch_softmax_tail()
    onnx.save(model, tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["m.onnx", "", "-r", "[-1,1]", "--jobs", "1"])
    assert code == 2, err
    assert err.strip() == "onnx-exact: error: output path '' is empty: give a file name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_dash_as_the_output_model_is_a_usage_error(tmp_path: Path, monkeypatch):
    """``onnx-exact IN -`` wrote a file named '-': a model (maybe with a data file) is not
    written to standard output, so the dash is refused before the analysis."""
    model, _, _ = torch_softmax_tail()
    onnx.save(model, tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["m.onnx", "-", "-r", "[-1,1]", "--jobs", "1"])
    assert code == 2, err
    assert err.strip().startswith("onnx-exact: error: output path '-'"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def command_on_a_saved_model(tmp_path: Path, monkeypatch, command: str) -> list[str]:
    """``command``'s arguments on a Softmax-tail model saved as ``m.onnx`` in the working folder."""
    model, _, _ = torch_softmax_tail()
    onnx.save(model, tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    return {
        "compress": ["m.onnx", "o.onnx"],
        "analyze": ["analyze", "m.onnx"],
        "check": ["check", "m.onnx", "m.onnx"],
    }[command]


@pytest.mark.parametrize("command", ["compress", "analyze", "check"])
def test_report_is_an_alias_of_json_on_every_command(tmp_path: Path, monkeypatch, command: str):
    """One flag name for the JSON report on every command, ``--report`` kept as its alias."""
    code, _, err = run_cli(
        [
            *command_on_a_saved_model(tmp_path, monkeypatch, command),
            "-r",
            "[-1,1]",
            "--jobs",
            "1",
            "--report",
            "r.json",
        ]
    )
    assert code == 0, err
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["schema_version"] == 1


@pytest.mark.parametrize("command", ["compress", "analyze", "check"])
def test_an_empty_json_path_is_a_usage_error(tmp_path: Path, monkeypatch, command: str):
    """``--json "$REPORT"`` with REPORT unset wrote no report and exited 0."""
    code, _, err = run_cli(
        [
            *command_on_a_saved_model(tmp_path, monkeypatch, command),
            "-r",
            "[-1,1]",
            "--jobs",
            "1",
            "--json",
            "",
        ]
    )
    assert code == 2, err
    assert err.strip() == (
        "onnx-exact: error: --json '' is empty: give a file name, or - for standard output"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_an_error_quoting_a_newline_is_still_one_line(tmp_path: Path):
    """A file name with a newline in it (possible on POSIX) split the error over two lines."""
    code, _, err = run_cli([tmp_path / "no\nsuch.onnx", tmp_path / "o.onnx", "-r", "[0,1]"])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(ERROR) and "no\\nsuch.onnx" in err
