"""Faults during a run: signals, solver failures and time limits, interrupted writes, determinism.

The promise under test: whatever happens, the tool either writes a verified model or writes nothing
(no partial output, no temporary file), a proof is never credited to a solver that did not finish,
and the same inputs give the same bytes.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import highspy
import numpy as np
import onnx
import pytest
from exporter_fixtures import box_samples, gemm_mlp, run_onnx, save_external, torch_dynamo
from onnx import TensorProto, helper, numpy_helper
from test_bad_inputs import run_cli

from onnx_exact.core.errors import ResourceError, UsageError
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.interrupts import (
    clear_interrupt,
    interrupt_requested,
    raise_if_interrupted,
    request_interrupt,
)
from onnx_exact.io import staging
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.pipeline import AnalysisOptions, DomainSpec, analyze
from onnx_exact.resources import (
    check_memory,
    estimate_peak_memory,
    format_bytes,
    parse_memory_size,
)


def load_measure_command():
    """``measure_command`` of ``bench/measure.py`` (a benchmark helper, not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "measure.py"
    spec = importlib.util.spec_from_file_location("bench_measure", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module.measure_command


SOLVER_TIERS = {"lp", "lp+cuts", "milp", "isa", "per-neuron"}
SIGNAL_READY_TIMEOUT_S = 90.0  # interpreter start-up on a loaded 2-core machine
SIGNAL_EXIT_TIMEOUT_S = 30.0


def solver_needed_mlp() -> onnx.ModelProto:
    """A 2-2-2-1 MLP on [-1,1]^2 with a stable neuron that interval and CROWN bounds cannot prove.

    ``a = relu(x1 + x2)``, ``b = relu(x1 - x2)``; the second layer's neuron ``a + b - 2.5`` is
    stably inactive (``a + b <= 2`` on the box, attained at ``x1 = 1``), but the triangle
    relaxation and CROWN both bound ``a + b`` by 3, and no input can refute a stable neuron, so
    the solver baselines must decide it. Its partner ``a - b`` is unstable.
    """
    diagonals = np.array([[1, 1], [1, -1]])
    return gemm_mlp(
        params=[
            (diagonals, np.zeros(2)),
            (diagonals, np.array([-2.5, 0])),
            (np.array([[1, 1]]), np.zeros(1)),
        ]
    )


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --------------------------------------------------------------------------- signals
def _handlers_installed(pid: int) -> bool:
    """Whether the process catches SIGTERM yet (the CLI installs its handler in ``main``)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_sigint_and_sigterm_during_a_long_solve_write_nothing(tmp_path):
    """Ctrl-C / SIGTERM while per-neuron MILPs run: exit 130 / 143, one line, no file left."""
    model = tmp_path / "slow.onnx"
    onnx.save(gemm_mlp((20, 60, 60, 60, 10), seed=1, pinned=False), model)
    runs = {}
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        folder = tmp_path / signal.Signals(signum).name
        folder.mkdir()
        command = [sys.executable, "-m", "onnx_exact", str(model), str(folder / "out.onnx")]
        child = subprocess.Popen(
            [*command, "-r", "[0,1]", "--method", "per-neuron", "-q"],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs[signum] = (child, code, folder)
    try:
        deadline = time.monotonic() + SIGNAL_READY_TIMEOUT_S
        while not all(_handlers_installed(c.pid) for c, _, _ in runs.values()):
            assert time.monotonic() < deadline, "the CLI never installed its signal handlers"
            assert all(c.poll() is None for c, _, _ in runs.values()), "a run ended early"
            time.sleep(0.1)
        time.sleep(2.0)  # well inside the analysis: the per-neuron MILPs take minutes here
        for signum, (child, _, _) in runs.items():
            assert child.poll() is None, "the run finished before it could be interrupted"
            child.send_signal(signum)
        for signum, (child, code, folder) in runs.items():
            try:
                _, err = child.communicate(timeout=SIGNAL_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"{signal.Signals(signum).name} was ignored for {SIGNAL_EXIT_TIMEOUT_S:.0f} s "
                    "(lost inside a HiGHS callback?)"
                )
            lines = err.strip().splitlines()
            assert child.returncode == code, err
            assert "Traceback" not in err
            assert lines and "interrupted" in lines[-1] and "no output written" in lines[-1]
            assert listing(folder) == set(), "output or temporary files left behind"
    finally:
        for child, _, _ in runs.values():
            if child.poll() is None:
                child.kill()
                child.communicate()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_command_starts_up_gets_one_line_and_its_exit_code(
    tmp_path, signum, code
):
    """The signal lands while onnx, onnxruntime and highspy are still being imported.

    ``onnx_exact.__main__`` installs its handlers before importing the command line, so as soon
    as the process catches SIGTERM the signal is sent, within milliseconds, and arrives during the
    imports (hundreds of milliseconds even on a fast machine): one line, the code, no traceback.
    """
    model = tmp_path / "m.onnx"
    onnx.save(gemm_mlp((4, 5, 3), seed=0, pinned=False), model)
    child = subprocess.Popen(
        [sys.executable, "-m", "onnx_exact", str(model), str(tmp_path / "out.onnx"), "-q"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + SIGNAL_READY_TIMEOUT_S
        while not _handlers_installed(child.pid):
            assert time.monotonic() < deadline, "the entry point never installed its handlers"
            assert child.poll() is None, "the command ended before it caught signals"
            time.sleep(0.005)
        child.send_signal(signum)
        _, err = child.communicate(timeout=SIGNAL_EXIT_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "no output written" in lines[0]
    assert "while starting" in lines[0], "the signal was meant to land during the imports"
    assert not (tmp_path / "out.onnx").exists()


def test_the_package_and_its_entry_point_import_no_heavy_library_until_used():
    """What makes the start-up window above catchable: onnx & co. load only when first used."""
    probe = (
        "import sys, onnx_exact, onnx_exact.__main__\n"
        "heavy = {'onnx', 'onnxruntime', 'highspy', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert all(getattr(onnx_exact, name) for name in onnx_exact.__all__)\n"
        "assert 'onnx' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=SIGNAL_READY_TIMEOUT_S)


def test_interrupt_while_saving_removes_the_temporary_files(tmp_path, monkeypatch):
    model = gemm_mlp((4, 5, 3), seed=0, pinned=False)

    def interrupted_rename(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(staging.os, "replace", interrupted_rename)
    for external in (False, True):
        with pytest.raises(KeyboardInterrupt):
            staging.save_model_atomic(model, tmp_path / "out.onnx", external_data=external)
        assert listing(tmp_path) == set()


# --------------------------------------------------------------------------- solver faults
def _inject_into_highs(monkeypatch, fault: str) -> list[int]:
    """Make every HiGHS run end without an answer; returns a one-item list counting the runs.

    ``time-limit``: the time limit is reached at once. ``not-run``: ``run()`` fails with
    ``kError`` before solving anything (the model status stays ``kNotset``), as a solver crash or a
    rejected model would. Neither may yield a proof. (Faults that let presolve run, such as an
    iteration limit, are not used: presolve alone can legitimately prove a direction.)
    """
    original = highspy.Highs.run
    calls = [0]

    def faulty_run(self):
        calls[0] += 1
        if fault == "not-run":
            return highspy.HighsStatus.kError
        self.setOptionValue("time_limit", 1e-9)
        return original(self)

    monkeypatch.setattr(highspy.Highs, "run", faulty_run)
    return calls


@pytest.mark.parametrize("fault", ["time-limit", "not-run"])
@pytest.mark.parametrize("method", ["auto", "isa", "per-neuron"])
def test_a_failed_solve_is_never_a_proof(tmp_path, monkeypatch, method, fault):
    """A solve that did not finish proves nothing: no neuron may be credited to a solver tier."""
    model = tmp_path / "m.onnx"
    onnx.save(solver_needed_mlp(), model)
    calls = _inject_into_highs(monkeypatch, fault)
    analysis = analyze(model, DomainSpec(["[-1,1]"]), AnalysisOptions(method=method))
    if method != "auto":  # auto may settle the case without HiGHS (e.g. by input splitting)
        assert calls[0] > 0, "the solver never ran: the case does not exercise the fault"
    for layer in analysis.stability.layers:
        stable = np.isin(layer.states, (NeuronState.ACTIVE, NeuronState.INACTIVE))
        credited = {str(tier) for tier in layer.decided_by[stable]}
        assert not credited & SOLVER_TIERS, f"{layer.name}: proofs credited to {credited}"


def test_solver_time_limit_keeps_neurons_and_the_report_says_so(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    onnx.save(solver_needed_mlp(), model)
    _inject_into_highs(monkeypatch, "time-limit")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = run_cli(
        [str(model), str(out), "-r", "[-1,1]", "--method", "per-neuron", "--report", str(report)]
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    undecided = sum(len(layer["undecided"]) for layer in data["layers"])
    assert undecided > 0
    assert data["verification"]["passed"] is True
    assert "undecided" in stdout
    assert out.exists()


# --------------------------------------------------------------------------- determinism
def test_two_runs_give_byte_identical_output(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(gemm_mlp((6, 12, 12, 3), seed=3), model)
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.onnx"
        code, _, err = run_cli([str(model), str(out), "-r", "[-1,1]", "-q"])
        assert code == 0, err
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    metadata = {p.key: p.value for p in onnx.load_from_string(outputs[0]).metadata_props}
    assert not any("time" in key or "date" in key for key in metadata)


def test_external_data_model_round_trips_byte_identically(tmp_path):
    model, lower, upper = torch_dynamo()
    source = tmp_path / "dynamo.onnx"
    save_external(model, source)
    box = tmp_path / "box.npz"
    np.savez(box, lower=lower, upper=upper)
    payloads = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.onnx"
        code, _, err = run_cli([str(source), str(out), "--input-range-file", str(box), "-q"])
        assert code == 0, err
        assert (tmp_path / f"{run}.onnx.data").exists(), "external data must stay external"
        payloads.append(((tmp_path / f"{run}.onnx.data").read_bytes(), out.read_bytes()))
        compressed = read_model(out).network
        original = read_model(source).network
        x = box_samples(lower, upper, 200)
        np.testing.assert_allclose(compressed.forward(x), original.forward(x), atol=1e-5)
    assert payloads[0][0] == payloads[1][0]
    # The model files differ only in the data file name they point to.
    assert payloads[0][1].replace(b"a.onnx.data", b"b.onnx.data") == payloads[1][1]


def test_large_model_path_saves_external_data(tmp_path, monkeypatch):
    """Above the 2 GB protobuf limit the writer switches to external data (forced cheaply here)."""
    model = gemm_mlp((16, 32, 4), seed=0, pinned=False)
    monkeypatch.setattr(staging, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    out = tmp_path / "big.onnx"
    staging.save_model_atomic(model, out)
    assert listing(tmp_path) == {"big.onnx", "big.onnx.data"}
    reread = read_model(out)
    assert reread.uses_external_data
    for tensor in model.graph.initializer:
        stored = next(t for t in reread.model.graph.initializer if t.name == tensor.name)
        np.testing.assert_array_equal(numpy_helper.to_array(stored), numpy_helper.to_array(tensor))


# --------------------------------------------------------------------------- odd but valid models
def test_model_without_relu_is_merged_exactly_and_says_so(tmp_path):
    """No ReLU: nothing to prove. The affine layers are merged (exact), verified and written."""
    model = gemm_mlp((4, 5, 3), seed=0, pinned=False)
    relu = next(i for i, node in enumerate(model.graph.node) if node.op_type == "Relu")
    del model.graph.node[relu]
    model.graph.node[relu].input[0] = "y0"
    path, out = tmp_path / "linear.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    code, stdout, err = run_cli([str(path), str(out), "-r", "[0,1]"])
    assert code == 0, err
    assert "no ReLU" in stdout
    x = box_samples(np.zeros(4), np.ones(4), 100)
    np.testing.assert_allclose(run_onnx(onnx.load(out), x)[0], run_onnx(model, x)[0], atol=1e-5)


def test_shared_weights_are_cloned_not_corrupted(tmp_path):
    """One initializer feeds two layers; compressing one layer must not change the other."""
    rng = np.random.default_rng(5)
    shared = (rng.normal(size=(4, 4)) / 2).astype(np.float32)
    arrays = {
        "shared_w": shared,
        "b1": np.array([-20, 20, 0.1, -0.1], np.float32),
        "b2": np.array([0.2, -20, 20, 0.0], np.float32),
        "w3": rng.normal(size=(2, 4)).astype(np.float32),
        "b3": np.zeros(2, np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "shared_w", "b1"], ["y1"], name="fc1", transB=1),
        helper.make_node("Relu", ["y1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "shared_w", "b2"], ["y2"], name="fc2", transB=1),
        helper.make_node("Relu", ["y2"], ["h2"], name="relu2"),
        helper.make_node("Gemm", ["h2", "w3", "b3"], ["out"], name="fc3", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(value, name) for name, value in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path, out = tmp_path / "shared.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    code, _, err = run_cli([str(path), str(out), "-r", "[-1,1]", "-q"])
    assert code == 0, err
    compressed = onnx.load(out)
    assert compressed.graph.node  # still a model
    x = box_samples(-np.ones(4), np.ones(4), 500)
    np.testing.assert_allclose(run_onnx(compressed, x)[0], run_onnx(model, x)[0], atol=1e-5)
    assert read_model(out).network.param_count < read_model(path).network.param_count


def test_unsupported_activation_in_the_tail_is_left_alone(tmp_path):
    """A Sigmoid after the last affine layer is outside the analysed MLP: compress the rest."""
    model = gemm_mlp((4, 6, 3), seed=2)
    model.graph.node.append(helper.make_node("Sigmoid", ["y1"], ["prob"], name="sigmoid"))
    model.graph.output[0].name = "prob"
    path, out = tmp_path / "tail.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    code, _, err = run_cli([str(path), str(out), "-r", "[-1,1]", "-q"])
    assert code == 0, err
    assert "Sigmoid" in {node.op_type for node in onnx.load(out).graph.node}


# --------------------------------------------------------------------------- memory and signals
def test_memory_guard_refuses_with_the_estimate_and_the_fix():
    net = read_model(gemm_mlp((3072, 2048, 2048, 10), seed=0, pinned=False)).network
    estimate = estimate_peak_memory(net)
    assert check_memory(net, 2 * estimate.total) == estimate
    with pytest.raises(ResourceError) as refused:
        check_memory(net, 512 * 2**20)
    message = str(refused.value)
    assert refused.value.exit_code == 2
    assert "--max-memory 512 MiB" in message and "3072-2048-2048-10" in message
    assert format_bytes(estimate.total) in message and "raise --max-memory" in message
    assert estimate_peak_memory(net, lp=False).total < estimate.total


def test_memory_estimate_bounds_the_measured_peak(tmp_path):
    """The guard must not under-estimate (the OS would kill the run) nor refuse needlessly."""
    model = tmp_path / "m.onnx"
    onnx.save(gemm_mlp((784, 512, 512, 10), seed=0, pinned=False), model)
    usage = load_measure_command()(
        [sys.executable, "-m", "onnx_exact", str(model), str(tmp_path / "o.onnx"), "-r", "[0,1]"]
        + ["-q", "--time-limit", "60"]
    )
    assert usage.exit_code == 0, usage.stderr
    measured = usage.peak_rss_bytes
    estimated = estimate_peak_memory(read_model(model).network).total
    # Conservative, but within a factor 4: the interpreter alone is half of this run's peak, and
    # the estimate reserves a decision MILP with a full cut pool that this run does not reach.
    assert measured <= estimated <= 4 * measured, (format_bytes(measured), format_bytes(estimated))


def test_the_memory_estimate_follows_the_sizes_the_phases_allocate(monkeypatch):
    """The chunk and block sizes come from the modules that allocate them, not from copies: a
    larger witness chunk or onnxruntime sample chunk raises its phase's estimate."""
    from onnx_exact import verify
    from onnx_exact.search import witness

    net = read_model(gemm_mlp((4, 5, 3), seed=0, pinned=False)).network
    before = estimate_peak_memory(net).phases
    monkeypatch.setattr(witness, "CHUNK_VALUES", 2 * witness.CHUNK_VALUES)
    monkeypatch.setattr(verify, "CHUNK_SAMPLES", 2 * verify.CHUNK_SAMPLES)
    after = estimate_peak_memory(net).phases
    assert after["sampling"] > before["sampling"] and after["verify"] > before["verify"]
    assert after["symbolic"] == before["symbolic"] and after["lp"] == before["lp"]


def test_a_run_that_may_not_fit_in_memory_warns_first_and_still_runs(tmp_path, monkeypatch):
    """Without --max-memory, an estimate above the free memory is one stderr line before the run
    (an out-of-memory kill gives no message) and a report note; with the option, no warning."""
    from onnx_exact import resources

    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 2**20)
    model = tmp_path / "m.onnx"
    onnx.save(gemm_mlp((4, 5, 3), seed=0, pinned=False), model)
    with warnings.catch_warnings():  # "always": an earlier run in this process must not hide it
        warnings.simplefilter("always")
        code, out, err = run_cli([str(model), str(tmp_path / "o.onnx"), "-r", "[0,1]"])
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("onnx-exact: warning:")]
    assert len(warning) == 1 and "exceeds the 1 MiB available" in warning[0]
    assert "--max-memory" in warning[0] and "estimated peak memory" in out
    code, _, err = run_cli(
        [str(model), str(tmp_path / "p.onnx"), "-r", "[0,1]", "--max-memory", "64G"]
    )
    assert code == 0 and "warning" not in err, err
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: None)
    assert resources.memory_shortfall_note(read_model(model).network) is None


@pytest.mark.parametrize(
    ("text", "size"),
    [("4G", 4 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 3 * 2**29), ("1024", 1024)],
)
def test_memory_sizes_parse_in_binary_units(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["lots", "0", "-1G", "4X", ""])
def test_bad_memory_sizes_are_usage_errors(text):
    with pytest.raises(UsageError, match="--max-memory"):
        parse_memory_size(text)


def test_a_recorded_signal_is_raised_after_a_solve():
    clear_interrupt()
    raise_if_interrupted()  # nothing recorded: no effect
    request_interrupt(signal.SIGTERM)
    try:
        assert interrupt_requested() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            raise_if_interrupted()
    finally:
        clear_interrupt()
    assert interrupt_requested() is None


def test_after_a_signal_any_error_ends_the_run_as_interrupted_and_later_signals_are_ignored(
    monkeypatch, capsys
):
    """The first signal decides the end: a second one does not raise into the unwinding, and an
    error the first one caused (an interrupted C-extension import raises ImportError) exits with
    the first signal's code and its one line, not as an internal error."""
    from onnx_exact import cli

    def interrupted_import(*args, **kwargs):
        request_interrupt(signal.SIGTERM)
        cli._Interrupted.signum = signal.SIGTERM
        cli._on_signal(signal.SIGINT, None)  # a second signal: ignored, no KeyboardInterrupt
        raise ImportError("initialization failed")

    clear_interrupt()
    monkeypatch.setattr(cli, "app", interrupted_import)
    try:
        with pytest.raises(SystemExit) as ended:
            cli.main(["analyze", "model.onnx"])
        assert ended.value.code == 143
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["onnx-exact: interrupted (SIGTERM); no output written"]
    finally:
        clear_interrupt()


def test_the_heap_is_tuned_on_glibc_once_and_reported_elsewhere():
    """``retain_freed_heap`` sets glibc's thresholds (True), is idempotent, and reports False
    instead of raising where the C library has no ``mallopt``."""
    import platform

    from onnx_exact import resources

    first = resources.retain_freed_heap()
    assert resources.retain_freed_heap() == first
    if platform.libc_ver()[0] == "glibc":
        assert first and resources._allocator_tuned
