"""What a first user meets: the report's wording and tables, and Polygraphy/onnxsim CLI habits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_main
from exporter_fixtures import gemm_mlp

from onnx_exact import __version__
from onnx_exact.report import SCHEMA_VERSION, reduction_percent

REPO = Path(__file__).resolve().parents[1]


def _model(path: Path, seed: int = 0) -> Path:
    """A 4-8-8-3 Gemm MLP (hidden units 0 and 1 of each layer pinned inactive / active)."""
    onnx.save(gemm_mlp((4, 8, 8, 3), seed), path)
    return path


def _identity_relu(path: Path) -> Path:
    """``y = W relu(x)`` on 3 inputs: on [-1, 1]^3 every ReLU is unstable."""
    model = gemm_mlp(params=[(np.eye(3), np.zeros(3)), (np.ones((2, 3)), np.zeros(2))])
    onnx.save(model, path)
    return path


# ----------------------------------------------------------------------------- report wording
def test_piped_tables_are_not_cut_at_80_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    model = _model(tmp_path / "m.onnx")
    assert run_main([str(model), str(tmp_path / "s.onnx"), "-r", "[-1,1]"]) == 0
    out = capsys.readouterr().out
    assert "undecided" in out and "…" not in out
    note = next(line for line in out.splitlines() if line.startswith("note: float round-off"))
    assert "verification atol" in note  # one line, not wrapped


@pytest.mark.parametrize(
    ("after", "before", "shown"),
    [
        (53, 200, "73.5%"),
        (100, 100, "0%"),
        (100_000, 100_001, "<0.1%"),
        (100_001, 100_000, "+<0.1% larger"),
        (110, 100, "+10.0% larger"),
    ],
)
def test_reduction_percentages_have_no_signed_zero(after, before, shown):
    assert reduction_percent(after, before) == shown


def test_an_all_unstable_layer_credits_no_tier_with_a_stability_proof(tmp_path, capsys):
    model = _identity_relu(tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    assert run_main(["analyze", str(model), "-r", "[-1,1]", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "stable neurons proved by: none" in out
    layer = json.loads(report.read_text())["layers"][0]
    assert layer["unstable"] == [0, 1, 2]
    assert layer["stable_proved_by"] == {}
    assert sum(layer["unstable_shown_by"].values()) == 3


def test_json_documents_carry_their_schema_and_version(tmp_path):
    model = _model(tmp_path / "m.onnx")
    documents = {
        "compress": [str(model), str(tmp_path / "s.onnx"), "-r", "[-1,1]", "--json"],
        "analyze": ["analyze", str(model), "-r", "[-1,1]", "--json"],
        "check": ["check", str(model), str(model), "-r", "[-1,1]", "--samples", "50", "--json"],
    }
    for name, args in documents.items():
        path = tmp_path / f"{name}.json"
        assert run_main([*args, str(path)]) == 0, name
        data = json.loads(path.read_text())
        assert (data["schema_version"], data["version"]) == (SCHEMA_VERSION, __version__), name


# ----------------------------------------------------------------------------- CLI habits
def test_polygraphy_tolerances_follow_one_option(tmp_path):
    model, report = _model(tmp_path / "m.onnx"), tmp_path / "r.json"
    args = [str(model), str(tmp_path / "s.onnx"), "--val-range", "x:[-1,1]", "--json", str(report)]
    assert run_main([*args, "--atol", "1e-5", "y2:1e-4", "--rtol", "1e-3", "y2:1e-2"]) == 0
    verification = json.loads(report.read_text())["verification"]
    assert verification["atol"] == {"y2": 1e-4, "": 1e-5}
    assert verification["rtol"] == {"y2": 1e-2, "": 1e-3}


def test_options_may_come_before_the_models(tmp_path):
    model, out = _model(tmp_path / "m.onnx"), tmp_path / "s.onnx"
    assert run_main(["-r", "[-1,1]", "-q", str(model), str(out)]) == 0
    assert out.exists()


@pytest.mark.parametrize("command", ["compress", "analyze", "check"])
def test_json_dash_writes_the_document_to_stdout_and_the_tables_to_stderr(
    tmp_path, capsys, command
):
    model = _model(tmp_path / "m.onnx")
    args = {
        "compress": [str(model), str(tmp_path / "s.onnx")],
        "analyze": ["analyze", str(model)],
        "check": ["check", str(model), str(model), "--samples", "50"],
    }[command]
    assert run_main([*args, "-r", "[-1,1]", "--json", "-"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)  # nothing but the JSON on stdout
    assert document["schema_version"] == SCHEMA_VERSION
    assert captured.err.strip() and not (tmp_path / "-").exists()


def test_version_anywhere(capsys):
    for args in (["--version"], ["-V"], ["analyze", "missing.onnx", "--version"]):
        assert run_main(args) == 0
        assert capsys.readouterr().out.strip() == f"onnx-exact {__version__}"


def test_top_help_shows_the_implied_compress_form_and_completion(capsys):
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "onnx-exact IN.onnx OUT.onnx" in out
    assert "--install-completion" in out and "--version" in out


HEAVY = ("onnx", "onnxruntime", "highspy")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["check", "--help"]])
def test_help_and_version_do_not_load_onnx_onnxruntime_or_highspy(args):
    """Counted in a fresh interpreter, not timed: what --help imports, not how fast it is."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['onnx-exact', *{args!r}]\n"
        "try:\n"
        "    runpy.run_module('onnx_exact', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        f"print(sorted(set({HEAVY!r}) & set(sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert proc.stderr.strip().splitlines()[-1] == "[]"
    assert "onnx-exact" in proc.stdout


def test_shell_completion_completes_commands_and_options():
    """What bash's completion function asks (``--install-completion`` installs that function)."""
    env = {**os.environ, "_ONNX_EXACT_COMPLETE": "complete_bash"}
    for words, expected in (
        ("onnx-exact ch", "check"),
        ("onnx-exact analyze m.onnx --js", "--json"),
    ):
        env.update(COMP_WORDS=words, COMP_CWORD=str(len(words.split()) - 1))
        proc = subprocess.run(
            [sys.executable, "-m", "onnx_exact"], env=env, capture_output=True, text=True, cwd=REPO
        )
        assert proc.returncode == 0 and expected in proc.stdout.split(), proc.stderr
