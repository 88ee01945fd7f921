"""CNN compression end to end: the ONNX-level counts, the channel step, the written model.

``model_stats`` is checked against counts made by hand from each fixture's layer shapes (the
numbers onnxsim 0.8.1 would report: Conv = output elements x kernel elements x input channels per
group, Gemm/MatMul = rows x cols, float constants as parameters, integer shape tensors not).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnn_fixtures import SEQUENTIAL_READ as SEQUENTIAL
from cnn_fixtures import VALID_BUILDERS, assert_compressed_exactly
from conftest import run_cli
from exporter_fixtures import ALL_BUILDERS, gemm_mlp

from onnx_exact import AnalysisOptions, DomainSpec, compress
from onnx_exact.channels import channel_summaries, pruning_request
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.verdicts import LayerStability, NeuronState, StabilityResult
from onnx_exact.io.model_stats import model_stats, relu_layer_stats
from onnx_exact.report import RunReport, make_console, render, summarize_layers

# (params, macs) by hand, layer by layer (see each builder in cnn_fixtures.py)
TORCH_PLAIN = {
    # conv 2->4 3x3 pad 1 on 8x8: 72 + 4 params, 64 positions x 72 MACs
    "relu1": (76, 64 * 72),
    # conv 4->6 3x3 pad 1 stride 2 on 8x8 -> 4x4: 216 + 6 params, 16 x 216 MACs
    "relu2": (222, 16 * 216),
    # Flatten (0) + Gemm 96 -> 10
    "relu_fc": (970, 960),
}
TORCH_PLAIN_OUTPUT = (33, 30)  # Gemm 10 -> 3
HAND_TOTALS = {
    "torch_legacy_plain": (1301, 9054),
    "torch_legacy_bn": (1301 + 16, 9054),  # BN: scale, bias, mean, var of 4 channels
    # AveragePool 2x2 -> 4x4, so conv2 gives 2x2 (4 x 216 MACs) and the Gemm takes 24 inputs
    "torch_legacy_avgpool": (76 + 222 + 250 + 33, 64 * 72 + 4 * 216 + 240 + 30),
    # tf2onnx: the Transposes and the int64 Reshape shape count nothing; same layers as torch
    "tf2onnx_nhwc": (1301, 9054),
    # Sub(mean) 32; conv1d 2->4 k5 pad 2 on 16: 40 + 4, 16 x 40; conv1d 4->3 k3 stride 2
    # dilation 2 pad 1 -> 7 positions: 36 + 3, 7 x 36; MatMul 21 -> 2 + Add 2
    "matlab_conv1d": (32 + 44 + 39 + 44, 640 + 252 + 42),
    # expand 1x1 3->6 on 6x6: 18 + 6, 36 x 18; depthwise 3x3 (6 groups): 54 + 6, 36 x 54;
    # project 1x1 6->4: 24 + 4, 36 x 24; the two float Clip bounds (Constant nodes); Gemm 4 -> 3
    "mobilenet_block": (24 + 60 + 28 + 2 + 15, 36 * 18 + 36 * 54 + 36 * 24 + 12),
}


@pytest.mark.parametrize("name", sorted(HAND_TOTALS))
def test_model_stats_counts_cnn_params_and_macs_like_onnxsim(name):
    stats = model_stats(VALID_BUILDERS[name]().model)
    assert (stats.params, stats.macs) == HAND_TOTALS[name]
    assert stats.unknown == []
    assert sum(row.params for row in stats.nodes) == stats.params


def test_model_stats_of_an_mlp_matches_the_network_counts():
    model = gemm_mlp()
    stats = model_stats(model)
    sizes = (6, 8, 8, 3)
    weights = sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))
    assert stats.macs == weights
    assert stats.params == weights + sum(sizes[1:])
    gemms = [row for row in stats.nodes if row.op_type == "Gemm"]
    assert [row.macs for row in gemms] == [48, 64, 24]


@pytest.mark.parametrize("name", ["skl2onnx_scaler", "torch_legacy_rank3", "vnncomp_left_weight"])
def test_model_stats_of_exporter_mlps_count_every_weight_once(name):
    """Rank-3 inputs, left weights (W @ x) and an ai.onnx.ml Scaler (no shape inference) in
    front: one row per sample, so MACs equal the weights of the three layers."""
    model, _, _ = ALL_BUILDERS[name]()
    stats = model_stats(model)
    assert stats.macs == 48 + 64 + 24
    assert stats.unknown == []


def test_model_stats_counts_per_sample_whatever_the_declared_batch():
    fixture = VALID_BUILDERS["torch_legacy_plain"]()
    fixed = onnx.ModelProto()
    fixed.CopyFrom(fixture.model)
    batch = fixed.graph.input[0].type.tensor_type.shape.dim[0]
    batch.Clear()
    batch.dim_value = 1
    assert (model_stats(fixed).params, model_stats(fixed).macs) == HAND_TOTALS["torch_legacy_plain"]


def test_relu_layer_stats_splits_the_graph_at_each_relu():
    model = VALID_BUILDERS["torch_legacy_plain"]().model
    layers, tail = relu_layer_stats(model, ["relu1", "relu2", "relu_fc"])
    assert {c.name: (c.params, c.macs) for c in layers} == TORCH_PLAIN
    assert (tail.params, tail.macs) == TORCH_PLAIN_OUTPUT
    # a ReLU that is not asked for (removed by pruning) joins the next layer
    layers, _ = relu_layer_stats(model, ["relu1", "relu_fc"])
    merged = np.add(TORCH_PLAIN["relu2"], TORCH_PLAIN["relu_fc"])
    assert [(c.name, c.params, c.macs) for c in layers] == [
        ("relu1", *TORCH_PLAIN["relu1"]),
        ("relu_fc", *merged),
    ]


def test_relu_layer_stats_name_a_relu6_layer_by_its_clip():
    """A Clip(0, c) layer owns its Conv like a Relu layer does (not the next Relu's layer)."""
    model = VALID_BUILDERS["clip_legacy"]().model
    stats = model_stats(model)
    layers, tail = relu_layer_stats(model, ["clip1", "clip2"], stats)
    by_node = {row.name: row for row in stats.nodes}
    assert [(c.name, c.macs) for c in layers] == [
        ("clip1", by_node["conv1"].macs),
        ("clip2", by_node["conv2"].macs),
    ]
    assert tail.macs == by_node["Gemm_13"].macs > 0


def _stability(net: Network, states: list[list[int]]) -> StabilityResult:
    layers = []
    for k, layer in enumerate(net.layers):
        s = np.asarray(states[k], dtype=np.int64) if layer.relu else np.ones(layer.out_features)
        n = layer.out_features
        tiers = np.where(s == NeuronState.UNDECIDED, "", "interval").astype(object)
        layers.append(LayerStability(k, layer.name, s, tiers, -np.ones(n), np.ones(n)))
    return StabilityResult(layers, np.zeros((0, net.in_features)))


def _conv_like_network() -> Network:
    """A 3-channel "conv" layer (2 positions each), a dense ReLU layer of 3, a ReLU output."""
    rng = np.random.default_rng(0)
    layers = [
        DenseLayer(rng.normal(size=(6, 4)), np.zeros(6), True, "conv_relu", [0, 0, 1, 1, 2, 2]),
        DenseLayer(rng.normal(size=(3, 6)), np.zeros(3), True, "fc_relu"),
        DenseLayer(rng.normal(size=(2, 3)), np.zeros(2), True, "out_relu"),
    ]
    return Network(layers, InputMap.identity(4))


def test_channel_verdicts_need_every_position_and_leave_the_output_layer_alone():
    A, N, U, D = (NeuronState.ACTIVE, NeuronState.INACTIVE, NeuronState.UNSTABLE,
                  NeuronState.UNDECIDED)  # fmt: skip
    net = _conv_like_network()
    stability = _stability(net, [[N, N, A, A, N, U], [N, A, D], [N, N]])
    summaries = channel_summaries(net, stability)
    conv, dense, output = summaries
    assert (conv.count, conv.conv, conv.positions) == (3, True, 2)
    # channel 2 is dead at one position only: mixed, never pruned
    assert (conv.dead, conv.active, conv.mixed) == ([0], [1], 1)
    assert (dense.conv, dense.positions, dense.dead, dense.active, dense.mixed) == (
        False, 1, [0], [1], 1)  # fmt: skip
    assert output.dead == [0, 1]
    report = RunReport("m", "box", "auto", summarize_layers(net, stability), 0, 0)
    for layer, summary in zip(report.layers, summaries, strict=True):
        layer.channels = summary
    dead, linear = pruning_request(net, report)
    assert dead == {"conv_relu": [0], "fc_relu": [0]} and linear == []

    stability = _stability(net, [[A] * 6, [A, A, A], [A, A]])
    report = RunReport("m", "box", "auto", summarize_layers(net, stability), 0, 0)
    for layer, summary in zip(report.layers, channel_summaries(net, stability), strict=True):
        layer.channels = summary
    assert pruning_request(net, report) == ({}, ["conv_relu", "fc_relu"])


def test_the_report_shows_channels_and_per_layer_costs_in_json_and_table():
    A, N = NeuronState.ACTIVE, NeuronState.INACTIVE
    net = _conv_like_network()
    stability = _stability(net, [[N, N, A, A, N, A], [N, A, A], [A, A]])
    report = RunReport("m", "box", "auto", summarize_layers(net, stability), 100, 400)
    for layer, summary in zip(report.layers, channel_summaries(net, stability), strict=True):
        layer.channels = summary
    report.layers[0].params_before, report.layers[0].macs_before = 30, 120
    report.layers[0].params_after, report.layers[0].macs_after = 20, 80
    report.layers[0].channels.removed = [0]
    report.params_after, report.macs_after = 90, 360
    doc = report.to_json()
    first = doc["layers"][0]
    assert first["channels"]["dead"] == [0] and first["channels"]["removed"] == [0]
    assert (first["params_before"], first["macs_after"]) == (30, 80)
    console = make_console()
    with console.capture() as captured:
        render(report, console)
    text = captured.get()
    assert "Channels" in text and "120 -> 80" in text and "conv x2" in text


# ----------------------------------------------------------------------------- end to end

MNIST_CNN = Path(__file__).resolve().parents[1] / "models" / "mnist_cnn_l1_2e-3.onnx"


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_exporter_cnns_lose_their_planted_dead_channels_and_verify(name):
    """Each exporter pattern through ``onnx_exact.compress``: verified on the written file,
    every planted dead channel removed (its neurons are dead at every position by interval
    bounds, which the analysis proves before any time limit), the written graph's MACs lower,
    and its outputs equal to the input model's on box samples."""
    fixture = VALID_BUILDERS[name]()
    result = compress(
        fixture.model,
        None,
        DomainSpec(lower=fixture.lower, upper=fixture.upper),
        AnalysisOptions(time_limit=2),
    )
    assert result.reduction is None
    assert_compressed_exactly(fixture, result)
    after = model_stats(result.model)
    assert (after.params, after.macs) == (result.report.params_after, result.report.macs_after)


def test_the_command_line_compresses_the_bundled_mnist_cnn(tmp_path):
    """``onnx-exact models/mnist_cnn_l1_2e-3.onnx out.onnx`` (box from the metadata): exit 0,
    the written file verified, the channels and MACs removed shown. A short time limit keeps
    the interval and CROWN proofs of every layer, which settle the dead first-conv channels."""
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    code, stdout, stderr = run_cli(
        [MNIST_CNN, out, "--time-limit", "5", "--jobs", "1", "--json", report]
    )
    assert code == 0, stderr
    assert "Channels" in stdout and "MACs" in stdout and "verification PASSED" in stdout
    doc = json.loads(report.read_text())
    first = doc["layers"][0]
    assert first["channels"]["conv"] and len(first["channels"]["removed"]) >= 8
    assert first["macs_after"] < first["macs_before"]
    assert doc["macs_after"] < doc["macs_before"] and doc["params_after"] < doc["params_before"]
    written = onnx.load(out)
    summary = {p.key: p.value for p in written.metadata_props}["onnx_exact.summary"]
    assert "ReLU channels removed" in summary
    assert (model_stats(written).macs, model_stats(written).params) == (
        doc["macs_after"],
        doc["params_after"],
    )


def test_check_proves_a_compressed_cnn_equal_to_its_input(tmp_path):
    """``check IN OUT`` on a CNN pair: sampled always, then proved (exit 0) by the walk over
    the dense networks (the removed channels are the input's proved-dead units)."""
    fixture = VALID_BUILDERS["tf2onnx_nhwc"]()
    source = tmp_path / "in.onnx"
    onnx.save(fixture.model, source)
    box = tmp_path / "box.npz"
    np.savez(box, lower=fixture.lower, upper=fixture.upper)
    out = tmp_path / "out.onnx"
    code, _, stderr = run_cli([source, out, "--input-range-file", box, "--time-limit", "2"])
    assert code == 0, stderr
    code, stdout, stderr = run_cli(["check", source, out, "--time-limit", "60", "--json", "-"])
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["proof"]["status"] == "proved"


def _load_cnn_bench():
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))  # bench/cnn.py imports its sibling measure.py
    spec = importlib.util.spec_from_file_location("bench_cnn", bench / "cnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cnn_bench_checks_onnxsim_units_per_layer_and_shows_refusals():
    bench = _load_cnn_bench()
    manifest = [{"relu": "Relu_1", "dead": 1, "always_on": 0},
                {"relu": "Relu_3", "dead": 0, "always_on": 2}]  # fmt: skip
    ours = {"Relu_1": ({4, 5}, set()), "Relu_3": (set(), {0, 1, 2})}
    assert bench.contains_onnxsim(ours, manifest, None) == []
    live = {"Relu_1": ({4}, set()), "Relu_3": (set(), {1, 7})}
    assert bench.contains_onnxsim(ours, manifest, live) == ["Relu_3: units [7]"]
    assert bench.contains_onnxsim({"Relu_1": ({4}, set())}, manifest, None) == [
        "Relu_3: 0/0 dead/on, onnxsim 0/2"
    ]
    theirs = {"dead": 43, "always_on": 30, "params_removed": 22020, "macs_removed": 30618,
              "seconds": 155.49}  # fmt: skip
    refused = {"model": "resnet_4b", "onnxsim": theirs, "exit": 2, "wall_s": 3.0,
               "peak_mib": 150.0, "error": "onnx-exact: error: node 'Add_5': not supported yet"}  # fmt: skip
    args = type("Args", (), {"check": True, "section": "cnn"})()
    text = bench.markdown([refused], args, "now", (1.0, 1.0, 1.0), "python bench/cnn.py")
    row = next(line for line in text.splitlines() if line.startswith("| resnet_4b"))
    assert "refused: onnx-exact: error: node 'Add_5'" in row
    assert row.count("|") == text.splitlines()[text.splitlines().index(row) - 2].count("|")


def test_analyze_shows_a_cnns_channel_verdicts_and_its_graphs_counts(tmp_path):
    """``analyze`` on a CNN: channel verdicts per layer and the ONNX graph's params and MACs
    (model_stats), not the dense IR's (whose conv matrices are far larger)."""
    fixture = VALID_BUILDERS["matlab_conv1d"]()
    source, box = tmp_path / "in.onnx", tmp_path / "box.npz"
    onnx.save(fixture.model, source)
    np.savez(box, lower=fixture.lower, upper=fixture.upper)
    code, stdout, stderr = run_cli(
        ["analyze", source, "--input-range-file", box, "--time-limit", "2", "--json", "-"]
    )
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert (doc["params_before"], doc["macs_before"]) == HAND_TOTALS["matlab_conv1d"]
    relu_2 = next(layer for layer in doc["layers"] if layer["name"] == "relu_2")
    assert 0 in relu_2["channels"]["dead"] and 1 in relu_2["channels"]["active"]
    assert "Channels" in stderr


def test_compress_with_prove_proves_a_pruned_cnn():
    """``compress --prove`` on a CNN: the written (pruned) graph is proved equal on the box,
    reusing the run's stability analysis of the input model."""
    fixture = VALID_BUILDERS["torch_legacy_plain"]()
    result = compress(
        fixture.model,
        None,
        DomainSpec(lower=fixture.lower, upper=fixture.upper),
        AnalysisOptions(time_limit=2),
        prove=True,
    )
    assert result.report.passed and result.report.proof.status == "proved"
    assert result.report.to_json()["proof"]["status"] == "proved"
