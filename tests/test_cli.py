"""The command line end to end: exit codes, one-line errors, no partial outputs, JSON reports."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_main
from exporter_fixtures import gemm_mlp
from onnx import numpy_helper


def _mlp(path: Path, seed: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """A 4-8-8-3 Gemm MLP with a few forced-dead and forced-active neurons on [0,1]^4."""
    rng = np.random.default_rng(seed)
    params = [
        (rng.normal(size=(n_out, n_in)), rng.normal(size=n_out))
        for n_in, n_out in itertools.pairwise((4, 8, 8, 3))
    ]
    first_bias = params[0][1]
    first_bias[:2] = -10.0  # stably inactive on [0,1]^4 (|w| sums stay below 10 with this seed)
    first_bias[2:4] = 10.0  # stably active
    model = gemm_mlp(params=params)
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)
    return path


def test_compress_bare_form_writes_verified_model_and_report(tmp_path, capsys):
    model = _mlp(tmp_path / "m.onnx")
    out = tmp_path / "small.onnx"
    report = tmp_path / "r.json"
    code = run_main([str(model), str(out), "--input-range", "x:[0,1]", "--report", str(report)])
    assert code == 0, capsys.readouterr()
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] is True
    assert data["params_after"] < data["params_before"]
    assert len(data["layers"]) == 2
    first = data["layers"][0]
    assert {0, 1} <= set(first["stably_inactive"])
    assert {2, 3} <= set(first["stably_active"])
    assert first["undecided"] == []
    small = onnx.load(out)
    onnx.checker.check_model(small)
    keys = {p.key for p in small.metadata_props}
    assert "onnx_exact.domain.x" in keys
    # The output records its domain, so it can be re-analysed without flags.
    assert run_main(["analyze", str(out), "--json", str(tmp_path / "a.json"), "-q"]) == 0


def test_domain_from_metadata_needs_no_flags(tmp_path):
    meta = {"onnx_exact.domain.x": json.dumps({"lower": 0.0, "upper": 1.0})}
    model = _mlp(tmp_path / "m.onnx", metadata=meta)
    assert run_main([str(model), str(tmp_path / "o.onnx"), "-q"]) == 0
    assert (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("make_args", "needle"),
    [
        (lambda d, m: [str(d / "missing.onnx"), str(d / "o.onnx"), "-r", "[0,1]"], "missing.onnx"),
        (lambda d, m: [str(m), str(d / "o.onnx")], "domain"),
        (lambda d, m: [str(m), str(d / "o.onnx"), "-r", "[1,0]"], "lower"),
        (lambda d, m: [str(m), str(d / "o.onnx"), "-r", "x:[0,"], "--input-range"),
        (lambda d, m: [str(m), str(m), "-r", "[0,1]"], "input model"),
        (lambda d, m: [str(m), str(d), "-r", "[0,1]"], "directory"),
        (lambda d, m: [str(m), str(d / "o.onnx"), "-r", "[0,1]", "--method", "x"], "--method"),
    ],
)
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, make_args, needle):
    model = _mlp(tmp_path / "m.onnx")
    before = set(tmp_path.iterdir())
    code = run_main(make_args(tmp_path, model))
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert set(tmp_path.iterdir()) == before


def test_console_script_runs_as_a_subprocess(tmp_path):
    model = _mlp(tmp_path / "m.onnx")
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_exact", str(model), str(tmp_path / "o.onnx"), "-r", "[0,1]"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verification PASSED" in proc.stdout
    summary = " ".join(proc.stdout.split())  # rich wraps long lines
    tolerance = summary.split("(atol ", 1)[1].split(")", 1)[0]
    assert "{" not in tolerance and ", rtol 1e-05" in tolerance  # per-output, not a dict repr


def test_command_line_runs_without_click_installed(tmp_path):
    """typer >= 0.26 vendors click and does not install it: a fresh install has no ``click``.

    The command line used to ``import click`` for its exception classes, which only worked
    where something else had installed click. Blocking the import reproduces the fresh machine:
    a usage error must still be one line with exit 2, and the main job must still run.
    """
    import typer

    if typer.BadParameter.__module__.startswith("click"):
        pytest.skip("this typer depends on click itself")
    model = _mlp(tmp_path / "m.onnx")
    block_click = "import sys; sys.modules['click'] = None; from onnx_exact.__main__ import main; "
    bad = subprocess.run(
        [sys.executable, "-c", block_click + "main()", "--no-such-option"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "onnx-exact: error: No such option: --no-such-option (see onnx-exact --help)"
    ]
    good = subprocess.run(
        [sys.executable, "-c", block_click + "main()", str(model), str(tmp_path / "o.onnx")]
        + ["-r", "[0,1]", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "o.onnx").exists()


def test_tolerances_read_per_output_with_the_default_only_where_used():
    from onnx_exact.core.tolerance import format_tolerance

    assert format_tolerance(1e-05, ["y"]) == "1e-05"
    assert format_tolerance({"y": 7.519e-05, "": 1e-05}, ["y"]) == "y 7.52e-05"
    both = format_tolerance({"y": 7.519e-05, "": 1e-05}, ["y", "z"])
    assert both == "y 7.52e-05, others 1e-05"


def test_check_proves_compressed_output_and_flags_a_perturbed_weight(tmp_path, capsys):
    model = _mlp(tmp_path / "m.onnx")
    small = tmp_path / "small.onnx"
    assert run_main([str(model), str(small), "-r", "[0,1]", "--prove", "-q"]) == 0
    report = tmp_path / "check.json"
    assert (
        run_main(["check", str(model), str(small), "--json", str(report), "--samples", "500"]) == 0
    )
    data = json.loads(report.read_text())
    assert data["proof"]["status"] == "proved"

    broken = onnx.load(model)
    for init in broken.graph.initializer:
        if init.name == "w2":  # the output layer's weights
            w2 = numpy_helper.to_array(init).copy()
            w2[0, 4] += 0.5
            init.CopyFrom(numpy_helper.from_array(w2, "w2"))
    bad = tmp_path / "bad.onnx"
    onnx.save(broken, bad)
    cex = tmp_path / "cex.npy"
    code = run_main(["check", str(model), str(bad), "-r", "[0,1]", "--counterexample", str(cex)])
    assert code == 1
    assert "FAILED" in capsys.readouterr().out
    assert cex.exists() and np.load(cex).shape == (4,)


def _proof_unfinished(run_job, report=lambda result: result):
    """Wrap a pipeline job so that its proof reports "not proved" (a time limit that expired)."""

    def job(*args, **kwargs):
        result = run_job(*args, **kwargs)
        proof = report(result).proof
        if proof is not None:
            proof.status, proof.time_limit_hit = "not proved", True
        return result

    return job


def test_check_exits_4_not_0_when_sampled_equal_but_not_proved(tmp_path, capsys, monkeypatch):
    import onnx_exact.cli as cli

    model = _mlp(tmp_path / "m.onnx")
    twin = tmp_path / "twin.onnx"
    twin.write_bytes(model.read_bytes())
    monkeypatch.setattr(cli, "check", _proof_unfinished(cli.check))
    report = tmp_path / "check.json"
    args = ["check", str(model), str(twin), "-r", "[0,1]", "--samples", "200"]
    assert run_main([*args, "--json", str(report)]) == 4
    out = capsys.readouterr().out
    assert "NOT PROVED (sampled equal)" in out
    assert f"PASSED | {model} vs {twin}" not in out
    data = json.loads(report.read_text())
    assert (data["passed"], data["verdict"], data["exit_code"]) == (False, "not proved", 4)
    # without the proof, exit 0 keeps its sampled meaning
    assert run_main([*args, "--no-prove"]) == 0


def test_compress_prove_exits_4_when_the_proof_does_not_finish(tmp_path, capsys, monkeypatch):
    import onnx_exact.cli as cli

    model = _mlp(tmp_path / "m.onnx")
    out = tmp_path / "small.onnx"
    monkeypatch.setattr(
        cli, "compress", _proof_unfinished(cli.compress, lambda result: result.report)
    )
    assert run_main([str(model), str(out), "-r", "[0,1]", "--prove"]) == 4
    printed = capsys.readouterr().out
    assert "NOT PROVED" in printed and out.exists()  # exact by construction, verified on samples
