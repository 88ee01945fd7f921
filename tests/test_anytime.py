"""A run ends, and what it holds at any deadline: the time limit, the anytime order, progress.

* ``compress``/``analyze`` have a finite default ``--time-limit`` (``none`` for unlimited), stated in
  the report; undecided neurons are kept.
* Anytime: the cheap sound bounds (interval + CROWN) reach every layer before any costly tier, so
  even a tiny limit on a deep net proves at least what onnxsim's ``stable_relu_prune`` proves.
* Progress: events (layer, tier, open neurons, time left); on a non-TTY a heartbeat line on
  stderr every ``HEARTBEAT_SECONDS``.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time

import numpy as np
import onnx
import pytest
from conftest import run_cli
from exporter_fixtures import gemm_mlp

from onnx_exact import progress as progress_module
from onnx_exact.core.box import Box
from onnx_exact.core.time_budget import CNN_TIME_LIMIT, MLP_TIME_LIMIT, time_budget
from onnx_exact.core.verdicts import SOLVER_TIERS, NeuronState
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.progress import Heartbeat, ProgressEvent, describe
from onnx_exact.stability import analyze_stability, schedule

DEEP_SIZES = (10,) + (40,) * 8 + (3,)  # eight ReLU layers of 40


def deep_case(eps: float = 0.05, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A deep random MLP (seeded, no pinned units) and an eps box around a random centre."""
    model = gemm_mlp(DEEP_SIZES, seed=seed, pinned=False)
    centre = np.random.default_rng(seed).uniform(-0.5, 0.5, DEEP_SIZES[0])
    return model, centre - eps, centre + eps


# ------------------------------------------------------------------------------------ anytime
def test_a_tiny_time_limit_on_a_deep_net_still_proves_what_onnxsim_proves():
    """At a 1 ms limit the deadline passes before any per-layer tier; the first pass still gives
    every layer its interval and CROWN proofs, so every neuron onnxsim proves stable (interval +
    CROWN) is proved by us, layer by layer. Before the anytime order, layers 2-8 kept their
    interval proofs only (177 of onnxsim's proofs missing)."""
    stable_relu_prune = pytest.importorskip("onnxsim.stable_relu_prune")
    model, lower, upper = deep_case()
    read = read_model(model)
    box = Box(lower, upper, "x").to_network(read.network.input_map)
    result = analyze_stability(read.network, box, time_limit=1e-3)
    assert result.time_limit_hit
    theirs = stable_relu_prune.analyze(model, input_ranges={"x": (lower[None], upper[None])})
    ours = [result.layers[k] for k in read.network.relu_layer_indices]
    assert len(theirs.layers) == len(ours) == 8
    beyond_interval = 0
    for their_layer, our_layer in zip(theirs.layers, ours, strict=True):
        assert np.all(our_layer.states[their_layer.dead_units] == NeuronState.INACTIVE)
        assert np.all(our_layer.states[their_layer.on_units] == NeuronState.ACTIVE)
        interval = sum(their_layer.by_method.get("interval", (0, 0)))
        beyond_interval += their_layer.dead + their_layer.always_on - interval
    assert beyond_interval > 100  # the case needs CROWN in the deep layers: not a vacuous check


def test_the_cheap_pass_reaches_every_layer_before_any_costly_tier():
    """Progress events show the order: "bounds" for the last ReLU layer comes before the first
    costly tier (input splitting, α-CROWN, LP, branch and bound) of any layer."""
    model, lower, upper = deep_case(eps=0.02, seed=1)
    read = read_model(model)
    box = Box(lower, upper, "x").to_network(read.network.input_map)
    events: list[ProgressEvent] = []
    result = analyze_stability(read.network, box, progress=events.append)
    assert result.complete
    phases = [event.phase for event in events]
    last_bounds = max(i for i, phase in enumerate(phases) if phase == "bounds")
    assert events[last_bounds].done == events[last_bounds].total == 8
    costly = [i for i, phase in enumerate(phases) if phase in SOLVER_TIERS]
    assert costly and min(costly) > last_bounds
    assert all(event.layers == 8 and event.open is not None for event in events)
    assert all(event.time_left is None for event in events)  # no limit


def test_a_solver_tier_reports_its_directions_before_its_first_batch_ends():
    """A tier that may spend minutes on one batch says at once how many directions it has
    (``lp 0/N``), then counts them as batches end."""
    from test_stability import random_network

    net = random_network(np.random.default_rng(0), [20, 20, 20, 2])
    events: list[ProgressEvent] = []
    analyze_stability(net, Box(np.zeros(20), np.ones(20)), tiers=("lp",), progress=events.append)
    counts = [(event.done, event.total) for event in events if event.phase == "lp"]
    started = [i for i, (done, total) in enumerate(counts) if done == 0 and total > 0]
    finished = [i for i, (done, total) in enumerate(counts) if done == total > 0]
    assert started and finished and started[0] < finished[0]


def test_the_first_pass_is_finished_past_the_deadline(monkeypatch):
    """A deadline that passes inside the first pass does not cut it short: every layer gets its
    CROWN bounds (here the deadline has passed before the pass starts)."""
    model, lower, upper = deep_case()
    read = read_model(model)
    box = Box(lower, upper, "x").to_network(read.network.input_map)
    crowned: list[int] = []
    symbolic_bounds = schedule.symbolic_bounds

    def counting(net, box, bounds, layer, rows=None, deadline=np.inf):
        crowned.append(layer)
        assert deadline == np.inf  # a dense network's first pass ignores the deadline
        return symbolic_bounds(net, box, bounds, layer, rows, deadline)

    monkeypatch.setattr(schedule, "symbolic_bounds", counting)
    result = analyze_stability(read.network, box, time_limit=1e-9)
    assert result.time_limit_hit
    assert crowned == read.network.relu_layer_indices[1:]


# ------------------------------------------------------------------------------- time limit
@pytest.fixture
def deep_model(tmp_path):
    model, lower, upper = deep_case(eps=0.02, seed=1)
    path = tmp_path / "deep.onnx"
    onnx.save(model, path)
    box = tmp_path / "box.npz"
    np.savez(box, lower=lower, upper=upper)
    return path, box


def test_the_default_time_limit_is_finite_and_reported(deep_model, tmp_path):
    path, box = deep_model
    code, out, err = run_cli(["analyze", path, "--input-range-file", box, "--json", tmp_path / "r"])
    assert code == 0, err
    assert json.loads((tmp_path / "r").read_text())["time_limit_s"] == MLP_TIME_LIMIT == 300
    assert "time limit of the analysis: 300 s" in out
    code, out, _ = run_cli(["analyze", "--help"])
    text = " ".join(out.split())
    assert code == 0 and "--time-limit SECONDS" in text
    assert "'none' for no limit, or 'auto' (default: 300 for an MLP, 45 for a CNN" in text


def test_the_auto_time_limit_gives_a_cnn_the_shorter_budget():
    """``auto`` picks by the network read: conv channels make it a CNN (a minute's job)."""
    from cnn_fixtures import torch_legacy

    from onnx_exact.io.cnn_reader import read_cnn

    cnn = read_cnn(torch_legacy("plain").model).network
    mlp = read_model(gemm_mlp()).network
    assert time_budget("auto", cnn) == CNN_TIME_LIMIT < time_budget("auto", mlp) == MLP_TIME_LIMIT
    assert time_budget(12.5, cnn) == 12.5 and time_budget(None, mlp) is None


def test_time_limit_none_is_unlimited_and_zero_is_a_usage_error(deep_model, tmp_path):
    path, box = deep_model
    report = tmp_path / "r.json"
    args = [path, tmp_path / "small.onnx", "--input-range-file", box, "--report", report]
    code, out, err = run_cli([*args, "--time-limit", "none"])
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["time_limit_s"] is None and data["time_limit_hit"] is False
    assert "time limit of the analysis: none" in out
    for bad in ("0", "-5", "soon"):
        code, _, err = run_cli([*args, "--time-limit", bad])
        assert code == 2
        assert err.startswith("onnx-exact: error: --time-limit") and "'none'" in err, err


# --------------------------------------------------------------------------------- progress
def test_describe_names_layer_tier_open_neurons_and_time_left():
    event = ProgressEvent("milp", 12, 40, "relu3", 3, 9, open=37, elapsed=95.0, time_left=205.0)
    assert describe(event) == "layer relu3 (3/9) · milp 12/40 · 37 open · 95 s elapsed, 205 s left"
    later = describe(event, since=10.0)
    assert later.endswith("105 s elapsed, 195 s left")
    assert describe(ProgressEvent("verify"), elapsed=3.0) == "verify · 3 s elapsed"


def test_a_heartbeat_repeats_the_latest_event_while_nothing_new_arrives():
    stream = io.StringIO()
    with Heartbeat(stream, interval=0.01) as heartbeat:
        heartbeat(ProgressEvent("bab", 1, 4, "relu2", 2, 3, open=5, time_left=50.0))
        stop = time.monotonic() + 60.0  # a bound for a stalled machine, not a speed requirement
        while stream.getvalue().count("\n") < 2 and time.monotonic() < stop:
            time.sleep(0.01)
        heartbeat("proof", 2, 6)  # the (phase, done, total) form of the proof's MILP tier
        while "proof 2/6" not in stream.getvalue() and time.monotonic() < stop:
            time.sleep(0.01)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3
    assert lines[0].startswith("onnx-exact: layer relu2 (2/3) · bab 1/4 · 5 open · ")
    assert "s left" in lines[0]
    assert lines[-1].startswith("onnx-exact: proof 2/6 · ")
    count = len(lines)
    time.sleep(0.05)
    assert stream.getvalue().count("\n") == count  # nothing after the context has ended


def test_a_heartbeat_on_a_closed_stream_stops_quietly():
    """A closed stderr (the reader of a pipe went away) ends the heartbeat, without an exception
    in its thread."""
    stream = io.StringIO()
    stream.close()
    failures = []
    previous = threading.excepthook
    threading.excepthook = failures.append
    try:
        with Heartbeat(stream, interval=0.01) as heartbeat:
            heartbeat(ProgressEvent("bab"))
            heartbeat.thread.join(timeout=60.0)
            assert not heartbeat.thread.is_alive()
    finally:
        threading.excepthook = previous
    assert not failures


def test_a_non_tty_run_prints_heartbeat_lines_on_stderr(deep_model, tmp_path, monkeypatch):
    """The command line, its stderr captured (not a TTY), prints the heartbeat; the first pass is
    held until one line is out, so the test does not depend on the machine's speed."""
    monkeypatch.setattr(progress_module, "HEARTBEAT_SECONDS", 0.01)
    path, box = deep_model
    bounds_pass = schedule.bounds_pass

    def held(analysis):
        stderr = sys.stderr  # the captured stream the heartbeat writes to
        stop = time.monotonic() + 60.0
        while analysis.progress and "onnx-exact: " not in stderr.getvalue():
            assert time.monotonic() < stop, "no heartbeat line in 60 s"
            time.sleep(0.01)
        bounds_pass(analysis)

    monkeypatch.setattr(schedule, "bounds_pass", held)
    code, out, err = run_cli(["analyze", path, "--input-range-file", box])
    assert code == 0, err
    beats = [line for line in err.splitlines() if line.startswith("onnx-exact: ")]
    assert beats and all("s elapsed" in line for line in beats)
    assert any("open" in line and "s left" in line for line in beats)
    code, _, err = run_cli(["analyze", path, "--input-range-file", box, "--quiet"])
    assert code == 0 and err == ""
