"""A channel dead in one Relu of a residual stream only: removed from that Relu's consumers.

The stream keeps the channel (its partner Relu is alive there), but the dead Relu's output is
exactly 0 on it, so the next Conv reads the Relu through ``Gather(axis=1, kept channels)`` and
loses that input channel (:mod:`onnx_exact.io.channel_gather`).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnn_fixtures import Trace, conv_layer, pooled_head, run_onnxruntime
from conftest import run_cli
from exporter_fixtures import GraphBuilder
from onnx import numpy_helper
from test_channel_pruning import assert_same_outputs, killed

from onnx_exact import AnalysisOptions, DomainSpec, compress
from onnx_exact.core.box import Box
from onnx_exact.core.errors import UnsupportedModelError
from onnx_exact.equivalence.correspondence import quick_stability
from onnx_exact.equivalence.structural import align_pair
from onnx_exact.io.channel_pruning import prune_channels
from onnx_exact.io.cnn_reader import read_cnn
from onnx_exact.io.model_stats import model_stats

PAD = {"pads": [1, 1, 1, 1]}


def partial_stream(depthwise: bool = False):
    """``Conv → relu_a (fork) → Conv → relu_b → Conv → Add(relu_a) → relu_out → [depthwise
    Conv with a bias →] GlobalAveragePool → Flatten → Gemm`` on ``[batch, 3, 6, 6]`` over
    [-1, 1]: channel 3 of ``relu_a`` is planted dead, the branch's last Conv is not, so
    channel 3 of the stream {relu_a, relu_out} is dead in relu_a only. ``depthwise`` makes
    relu_a's consumer a depthwise Conv (4 groups, non-zero bias) instead of a plain one."""
    shape = (3, 6, 6)
    lower, upper = -np.ones(108), np.ones(108)
    trace, g = Trace(lower, upper, 4), GraphBuilder()
    h, _ = conv_layer(trace, g, "input", (6, 6), 3, 4, 3, {3: "dead"}, **PAD)
    trace.activation("relu_a")
    skip = g.node("Relu", [h], name="relu_a")
    trace.push()
    group = {"group": 4} if depthwise else {}
    h, _ = conv_layer(trace, g, skip, (6, 6), 4, 4, 3, name="consumer", **group, **PAD)
    trace.activation("relu_b")
    h = g.node("Relu", [h], name="relu_b")
    h, _ = conv_layer(trace, g, h, (6, 6), 4, 4, 3, scale=3.0, **PAD)
    trace.add()
    h = g.node("Add", [h, skip])
    trace.activation("relu_out")
    h = g.node("Relu", [h], name="relu_out")
    return pooled_head(trace, g, h, (4, 6, 6), "partial_stream", lower, upper, shape)


def weight_of(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    inits = {t.name: t for t in model.graph.initializer}
    return numpy_helper.to_array(inits[node.input[1]])


def box_samples(fixture, count: int = 64) -> np.ndarray:
    rng = np.random.default_rng(3)
    return fixture.lower + (fixture.upper - fixture.lower) * rng.random((count, fixture.lower.size))


def test_prune_channels_gathers_a_channel_dead_in_one_member_only():
    """relu_a's channel 3 leaves the consumer Conv's weight (axis 1) behind one Gather; the Add
    keeps reading relu_a whole; the outputs stay; the reader takes the Gather as a selection."""
    fixture = partial_stream()
    result = prune_channels(fixture.model, {"relu_a": [3]})
    assert result.removed == {} and result.gathered == {"relu_a": [3]}
    assert result.kept["relu_a"] == (
        "channels [3] removed from its consumers (node 'consumer' (Conv)) through a Gather; kept "
        "in the stream's tensors: not proved dead in every Relu of its residual stream (with "
        "relu_out)"
    )
    onnx.checker.check_model(result.model, full_check=True)
    assert weight_of(result.model, "consumer").shape == (4, 3, 3, 3)
    gathers = [n for n in result.model.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 1
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(inits[gathers[0].input[1]], [0, 1, 2])
    add = next(n for n in result.model.graph.node if n.op_type == "Add")
    relu_a = next(n for n in result.model.graph.node if n.name == "relu_a")
    assert relu_a.output[0] in add.input and gathers[0].input[0] == relu_a.output[0]
    assert_same_outputs(
        fixture.model, result.model, fixture.lower, fixture.upper, fixture.input_shape
    )
    x = box_samples(fixture)
    before, after = model_stats(fixture.model), model_stats(result.model)
    assert after.params == before.params - 4 * 9 and after.macs == before.macs - 36 * 4 * 9
    read = read_cnn(result.model)
    np.testing.assert_allclose(
        read.network.forward(x), read_cnn(fixture.model).network.forward(x), rtol=0, atol=1e-9
    )


def test_compress_removes_the_channel_from_the_consumer_and_check_proves_it(tmp_path):
    """End to end: the analysis proves relu_a's channel 3 dead and relu_out's not; the written
    model lost the consumer's input channel, verified (exit 0), and ``check`` proves the pair."""
    fixture = partial_stream()
    domain = DomainSpec(lower=fixture.lower, upper=fixture.upper)
    result = compress(fixture.model, None, domain, AnalysisOptions(time_limit=10, jobs=1))
    report = result.report
    by_name = {layer.name: layer.channels for layer in report.layers}
    assert 3 in by_name["relu_a"].dead and 3 not in by_name["relu_out"].dead
    assert 3 not in by_name["relu_a"].removed
    assert "removed from its consumers" in by_name["relu_a"].kept_reason
    assert weight_of(result.model, "consumer").shape[1] == 3
    assert any(n.op_type == "Gather" for n in result.model.graph.node)
    assert report.passed
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert_same_outputs(
        fixture.model, result.model, fixture.lower, fixture.upper, fixture.input_shape
    )
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(fixture.model, source)
    box = tmp_path / "box.npz"
    np.savez(box, lower=fixture.lower, upper=fixture.upper)
    code, out, err = run_cli([str(source), str(target), "--input-range-file", str(box)])
    assert code == 0, err
    code, out, err = run_cli(
        ["check", str(source), str(target), "--input-range-file", str(box), "--json", "-"]
    )
    assert code == 0, err
    assert '"proved"' in out and "no longer reads are proved inactive" in out  # structurally


def test_the_structural_proof_needs_the_silenced_channel_dead():
    """``check``'s structural correspondence leaves the Gather's dropped columns out of the row
    comparison only by making their units targets: relu_a's channel 3 (dead) is proved by the
    bounds; channel 1 (alive, dropped here on purpose) stays unproved."""
    fixture = partial_stream()
    full = read_cnn(fixture.model).network
    box = Box(fixture.lower, fixture.upper, "input", "test")
    for channel, dead in ((3, True), (1, False)):
        pruned = read_cnn(prune_channels(fixture.model, {"relu_a": [channel]}).model).network
        alignment = align_pair(full, pruned)
        silenced = alignment.layers[0].silenced
        assert not alignment.swapped and silenced.size == 36
        assert set(full.layers[0].channels[silenced].tolist()) == {channel}
        stability = quick_stability(full, box, 0, alignment.targets(), np.inf)
        assert bool(alignment.unproved(stability)) is not dead


def test_a_depthwise_consumer_loses_the_group_the_gathered_channel_feeds():
    """A depthwise consumer with a bias outputs its bias on the group of the gathered channel:
    a constant that relu_b maps on; the group goes behind the Gather, and channel 3 goes from
    relu_b too (io/channel_constants.py)."""
    fixture = partial_stream(depthwise=True)
    result = prune_channels(fixture.model, {"relu_a": [3]})
    assert result.gathered == {"relu_a": [3]} and result.removed == {"relu_b": [3]}
    assert sum(n.op_type == "Gather" for n in result.model.graph.node) == 1
    assert weight_of(result.model, "consumer").shape == (3, 1, 3, 3)
    x = box_samples(fixture)
    np.testing.assert_allclose(
        run_onnxruntime(result.model, x, fixture.input_shape),
        run_onnxruntime(fixture.model, x, fixture.input_shape),
        atol=1e-5,
    )


def test_the_reader_refuses_a_gather_that_is_no_channel_selection():
    """A Gather on another axis than the channels is refused in one line naming it."""
    pruned = prune_channels(partial_stream().model, {"relu_a": [3]}).model
    gather = next(n for n in pruned.graph.node if n.op_type == "Gather")
    next(a for a in gather.attribute if a.name == "axis").i = 2
    with pytest.raises(UnsupportedModelError, match="Gather of the activation on axis 1"):
        read_cnn(pruned)


def test_a_member_read_by_a_projection_and_a_branch_gets_a_gather_for_each(shared_models):
    """resnet_4b with channel 5 of Relu_12 killed (dead there, alive in Relu_7): Conv_13 (the
    next block's branch) and Conv_16 (its projection) each read Relu_12 through a Gather, so
    the fork stays at Relu_12's output and the reader carries it by selection rows (one per
    entry of Relu_12, not the pair relu(±s)); the outputs stay."""
    folder = shared_models / "cnn"
    if not (folder / "resnet_4b.onnx").is_file():
        pytest.skip("resnet_4b is absent")
    model = killed(onnx.load(folder / "resnet_4b.onnx"), {"Relu_12": [5]})
    box = np.load(folder / "resnet_4b.box.npz")
    result = prune_channels(model, {"Relu_12": [5]})
    assert result.gathered == {"Relu_12": [5]} and "Conv_16" in result.kept["Relu_12"]
    gathers = [n for n in result.model.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 2 and {g.input[0] for g in gathers} == {"39"}
    assert weight_of(result.model, "Conv_13").shape[1] == 31
    assert weight_of(result.model, "Conv_16").shape[1] == 31
    assert_same_outputs(model, result.model, box["lower"], box["upper"], (3, 32, 32), count=16)
    read = read_cnn(result.model)
    branch = read.network.layers[read.binding.relu_nodes.index("Relu_14")]
    assert branch.auxiliary.sum() == 32 * 8 * 8  # Relu_12's entries, carried as they are
    x = box["lower"] + (box["upper"] - box["lower"]) * np.random.default_rng(0).random((4, 3072))
    expected = np.vstack([run_onnxruntime(model, row[None], (3, 32, 32)) for row in x])
    np.testing.assert_allclose(read.network.forward(x), expected, rtol=1e-4, atol=1e-4)
