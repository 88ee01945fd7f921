"""The worker mechanism: one reused pool, workers that die with their parent and skip onnx.

This module imports nothing heavy at its top: the pool's workers import it to run ``_probe``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from onnx_exact import parallel

GONE_TIMEOUT_S = 20.0


def _probe(context: dict, name: str) -> dict:
    """Runs in a worker: load the analysis modules, report what is loaded there."""
    import onnx_exact.bounds.input_split  # noqa: F401 - the modules whose functions run in workers
    import onnx_exact.equivalence.proof  # noqa: F401 - (and what they import: highspy, numpy)
    import onnx_exact.solvers.baselines  # noqa: F401
    import onnx_exact.solvers.exact_tiers  # noqa: F401
    import onnx_exact.stability.schedule  # noqa: F401

    loaded = {m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxruntime")}
    return {
        "pid": os.getpid(),
        "context": context[name],
        "loaded": sorted(loaded),
        "sigint": signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
        "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started that still run: workers, and multiprocessing's resource
    tracker (it holds the caller's stdout and stderr open while it lives)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not _gone(p)]


def test_default_jobs_are_the_usable_cores_capped():
    jobs = parallel.default_jobs()
    assert 1 <= jobs <= parallel.MAX_DEFAULT_JOBS
    if hasattr(os, "sched_getaffinity"):
        assert jobs == min(len(os.sched_getaffinity(0)), parallel.MAX_DEFAULT_JOBS)


def test_the_commands_jobs_default_to_the_usable_cores():
    from onnx_exact import cli

    cli._load_runtime()
    assert cli._options("auto", "60", None, 0, None).jobs == parallel.default_jobs()
    assert cli._options("auto", "60", 1, 0, None).jobs == 1


def test_one_pool_is_reused_and_its_workers_skip_onnx():
    """Two callers with their own contexts get the same workers; no onnx import there."""
    pool = parallel.worker_pool(2)
    try:
        assert parallel.worker_pool(2) is pool
        first = parallel.with_context(_probe, parallel.TaskContext({"a": 1}))
        second = parallel.with_context(_probe, parallel.TaskContext({"b": 2}))
        one = list(pool.map(first, ["a"] * 4))
        two = list(pool.map(second, ["b"] * 4))
        assert {r["context"] for r in one} == {1} and {r["context"] for r in two} == {2}
        pids = {r["pid"] for r in one + two}
        assert pids <= set(pool.worker_pids()) and len(pool.worker_pids()) <= 2
        assert os.getpid() not in pids
        for result in one + two:
            assert result["loaded"] == [], f"a worker imported {result['loaded']}"
            assert result["sigint"] and result["threads"] == "1"
    finally:
        parallel.shutdown_pools()
    assert parallel.worker_pool(2) is not pool  # a new run gets a new pool
    parallel.shutdown_pools()


def _start_environment() -> dict[str, str]:
    """The environment this process was started with (Linux: /proc, not later changes)."""
    raw = Path("/proc/self/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in raw if b"=" in entry)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_workers_start_with_one_blas_thread_before_any_import(monkeypatch):
    """A spawned worker re-imports the parent's main module (a user's script importing numpy)
    before its own start-up code runs, so its environment must say one BLAS thread from the
    start; the parent's environment is restored afterwards."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        started = list(parallel.worker_pool(2).map(_start_environment_of, range(2)))
    finally:
        parallel.shutdown_pools()
    for environment in started:
        assert environment["OPENBLAS_NUM_THREADS"] == "1" and environment["OMP_NUM_THREADS"] == "1"
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2" and "OMP_NUM_THREADS" not in os.environ


def _start_environment_of(_: int) -> dict[str, str]:
    return _start_environment()


def test_two_milp_calls_of_a_run_share_the_pool_and_its_workers():
    """Two layers' decision MILPs with jobs=2 run in the same workers (no pool per call)."""
    import numpy as np

    from onnx_exact.bounds.crown import interval_bounds
    from onnx_exact.core.box import Box
    from onnx_exact.core.directions import Direction
    from onnx_exact.core.network import DenseLayer, InputMap, Network
    from onnx_exact.core.verdicts import NeuronState
    from onnx_exact.solvers import exact_tiers

    rng = np.random.default_rng(3)
    sizes = [6, 12, 12, 2]
    layers = [
        DenseLayer(rng.normal(size=(b, a)), rng.normal(size=b), relu=j < 2, name=f"fc{j}")
        for j, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False))
    ]
    net = Network(layers, InputMap.identity(sizes[0]))
    box = Box(np.zeros(6), np.ones(6))
    bounds = interval_bounds(net, box)
    states = [np.full(12, NeuronState.UNDECIDED, dtype=np.int64)]  # every layer-0 ReLU encoded
    directions = [Direction(1, i, s) for i in range(12) for s in (1, -1)]
    parallel.shutdown_pools()
    try:
        seen = []
        for _ in range(2):
            results = exact_tiers.decide_directions(
                net, box, bounds, states, 1, directions, np.full(12, 1e-9),
                time.monotonic() + 60, tiers=("milp",), jobs=2,
            )  # fmt: skip
            assert all(r.method == "milp" for r in results if r.status == "proved")
            pool = parallel.worker_pool(2)
            seen.append((pool, sorted(pool.worker_pids())))
        assert seen[0][0] is seen[1][0] and seen[0][1] == seen[1][1]
        assert 1 <= len(seen[0][1]) <= 2
    finally:
        parallel.shutdown_pools()


def test_a_context_is_unpickled_once_per_worker():
    context = parallel.TaskContext([1, 2, 3])
    assert context.value() == [1, 2, 3]
    assert context.value() is context.value()  # cached by key


_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from onnx_exact import parallel
    pool = parallel.worker_pool(2)
    futures = [pool.submit(time.sleep, 120) for _ in range(2)]
    process = parallel.start_process(time.sleep, (120,))
    while len(pool.worker_pids()) < 2:
        time.sleep(0.05)
    print(*pool.worker_pids(), process.pid, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("via_thread", [False, True])
def test_kill_9_of_the_parent_ends_every_worker(via_thread):
    """SIGKILL of the main process: its pool workers and background process end too.

    Started from a thread, the kernel's parent-death signal is not armed (it would follow the
    thread): the watchdog ends them.
    """
    script = _SCRIPT
    if via_thread:
        script = script.replace("pool = parallel", "import threading\npool = parallel")
        script = script.replace(
            "futures = [pool.submit(time.sleep, 120) for _ in range(2)]\n"
            "process = parallel.start_process(time.sleep, (120,))",
            "box = []\n"
            "def start():\n"
            "    box.extend(pool.submit(time.sleep, 120) for _ in range(2))\n"
            "    box.append(parallel.start_process(time.sleep, (120,)))\n"
            "thread = threading.Thread(target=start); thread.start(); thread.join()\n"
            "process = box[-1]",
        )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 3, child.stderr.read() if child.poll() is not None else line
        assert not any(_gone(p) for p in pids)
        pids = sorted(set(pids) | set(_children(child.pid)))
        assert len(pids) == 4  # the resource tracker too
        child.kill()
        child.wait()
        assert _wait_gone(pids) == [], "workers outlived their killed parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_shutdown_with_kill_ends_busy_workers_at_once():
    """What the signal handler calls: busy workers get SIGKILL, nothing waits for them."""
    pool = parallel.worker_pool(2)
    futures = [pool.submit(time.sleep, 120) for _ in range(2)]
    process = parallel.start_process(time.sleep, (120,))
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while len(pool.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [*pool.worker_pids(), process.pid]
    parallel.shutdown_pools(kill=True)
    assert _wait_gone(pids) == []
    process.join()
    for future in futures:
        with pytest.raises(Exception):  # noqa: B017, PT011 - BrokenProcessPool
            future.result(timeout=GONE_TIMEOUT_S)
    assert parallel.worker_pool(2) is not pool
    parallel.shutdown_pools()


# --------------------------------------------------------------------------- the command's signals
_MODEL = Path(__file__).resolve().parents[1] / "models" / "mnist_2x100_l1_1e-3.onnx"

_BUSY_CLI = textwrap.dedent(
    """
    import sys, time
    from onnx_exact import parallel, pipeline

    def busy_analysis(*args, **kwargs):  # the analysis's workers are busy with long solves
        pool = parallel.worker_pool(2)
        futures = [pool.submit(time.sleep, 300) for _ in range(2)]
        while len(pool.worker_pids()) < 2:
            time.sleep(0.05)
        print(*pool.worker_pids(), flush=True)
        for future in futures:
            future.result()

    pipeline.analyze_stability = busy_analysis
    sys.argv = ["onnx-exact", *sys.argv[1:]]
    from onnx_exact.__main__ import main
    main()
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)]
)
def test_a_signal_to_a_jobs_2_run_ends_it_and_its_busy_workers(tmp_path, signum, code):
    """The command with both workers in long solves: SIGTERM/SIGINT end it with the one line
    and the documented code, its workers gone, no file left; SIGKILL leaves no worker either."""
    temp = tmp_path / "temp"
    temp.mkdir()
    command = [sys.executable, "-c", _BUSY_CLI, str(_MODEL), "out.onnx", "--jobs", "2", "-q"]
    child = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(temp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        workers = [int(p) for p in line.split()]
        assert len(workers) == 2, child.stderr.read() if child.poll() is not None else line
        workers = sorted(set(workers) | set(_children(child.pid)))  # + the resource tracker
        child.send_signal(signum)
        _, err = child.communicate(timeout=30.0)
        assert child.returncode == code, err
        if signum != signal.SIGKILL:
            name = signal.Signals(signum).name
            assert err.strip().splitlines() == [
                f"onnx-exact: interrupted ({name}); no output written"
            ]
        assert _wait_gone(workers) == [], "workers (or the resource tracker) outlived the run"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["temp"]
        # importing onnxruntime writes a '.ses' file into the temporary folder, and keeps it
        assert [p.name for p in temp.iterdir() if p.name != ".ses"] == []
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


_STUCK_IN_A_SOLVE = textwrap.dedent(
    """
    import signal, sys
    import highspy
    import numpy as np
    from onnx_exact.interrupts import end_on_signals, request_interrupt

    def on_signal(signum, frame):  # what the command's own handler does
        request_interrupt(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    end_on_signals()
    # a market split instance (Cornuejols and Dawande): 4 rows, 30 binaries, hours of branch and
    # bound; HiGHS runs it in C and calls no Python, so the signal handler cannot run
    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, size=(4, 30)).astype(float)
    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("threads", 1)
    highs.setOptionValue("time_limit", 600.0)
    inf = highspy.kHighsInf
    n = 30 + 8
    highs.addVars(n, np.zeros(n), np.r_[np.ones(30), np.full(8, inf)])
    highs.changeColsIntegrality(30, np.arange(30, dtype=np.int32),
                                np.full(30, highspy.HighsVarType.kInteger))
    highs.changeColsCost(8, np.arange(30, n, dtype=np.int32), np.ones(8))
    for i in range(4):
        cols = np.r_[np.arange(30), 30 + 2 * i, 31 + 2 * i].astype(np.int32)
        vals = np.r_[a[i], 1.0, -1.0]
        rhs = float(np.floor(a[i].sum() / 2))
        highs.addRow(rhs, rhs, cols.size, cols, vals)
    print("solving", flush=True)
    highs.run()
    print("the solve returned", highs.getModelStatus(), flush=True)
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigterm_ends_the_command_while_its_main_thread_is_inside_a_long_solve():
    """A solve that calls no Python keeps a signal handler from running until it returns (here
    a 600 s time limit); the entry point's watcher thread ends the process within about a
    second with the one line and exit code 143."""
    child = subprocess.Popen(
        [sys.executable, "-c", _STUCK_IN_A_SOLVE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in child.stdout:  # HiGHS prints its banner first
            if line.strip() == "solving":
                break
        assert child.poll() is None, child.communicate()[1]
        time.sleep(1.0)  # well inside the solve
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60.0)
        assert "returned" not in out, "the solve ended before the signal: no test"
        assert child.returncode == 143, err
        assert err.strip().splitlines() == ["onnx-exact: interrupted (SIGTERM); no output written"]
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


def test_a_run_that_fails_while_its_workers_solve_ends_them(monkeypatch, tmp_path, capsys):
    """An error in the main process (exit 2 here) must not leave workers solving on (they
    would hold the exit for a minute, or outlive it)."""
    from onnx_exact import cli, pipeline
    from onnx_exact.core.errors import UsageError

    workers: list[int] = []

    def failing_analysis(*args, **kwargs):
        pool = parallel.worker_pool(2)
        for _ in range(2):
            pool.submit(time.sleep, 300)
        while len(pool.worker_pids()) < 2:
            time.sleep(0.05)
        workers.extend(pool.worker_pids())
        raise UsageError("the analysis gave up")

    monkeypatch.setattr(pipeline, "analyze_stability", failing_analysis)
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(_MODEL), str(tmp_path / "out.onnx"), "--jobs", "2", "-q"])
    assert exit_.value.code == 2
    assert "the analysis gave up" in capsys.readouterr().err
    assert len(workers) == 2 and _wait_gone(workers) == []
