"""Peak memory, CPU and wall time of one command, measured from outside (Linux).

Used by ``bench/large_model.py`` and by the calibration test of
:func:`onnx_exact.resources.estimate_peak_memory` in ``tests/test_faults.py`` (which puts
``bench/`` on ``sys.path``). Not part of the package: the command line never measures itself.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChildUsage:
    """Exit code, peak resident set, CPU and wall time of one measured command."""

    exit_code: int
    peak_rss_bytes: int
    cpu_s: float
    wall_s: float
    stderr: str


# Runs the command given in argv and prints its usage as JSON. Started as a fresh interpreter
# because Linux folds the *parent's* resident size at fork time into the child's ru_maxrss: a
# command forked from a big process (pytest, a benchmark holding the model) would report the
# parent's size as its own peak. This launcher is ~10 MB, below anything it measures.
_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
stderr = child.stderr.read().decode(errors="replace")
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps({"exit_code": os.waitstatus_to_exitcode(status), "peak_rss_bytes":
    usage.ru_maxrss * 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
    "wall_s": time.perf_counter() - start, "stderr": stderr}))
"""


def measure_command(command: list[str]) -> ChildUsage:
    """Run ``command`` and measure its own peak RSS (``ru_maxrss``), CPU and wall time.

    Its stdout is discarded and its stderr returned; the exit code is the child's (a signal
    gives ``-signum``).
    """
    launcher = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *command], capture_output=True, text=True, check=True
    )
    return ChildUsage(**json.loads(launcher.stdout))


def load_stability_bench():
    """``bench/stability.py`` as a module (``bench_stability``): its case type, child runner and
    markdown writer, which the other benchmarks share (one section per run)."""
    if "bench_stability" in sys.modules:
        return sys.modules["bench_stability"]
    spec = importlib.util.spec_from_file_location(
        "bench_stability", Path(__file__).resolve().parent / "stability.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
