"""The writer: reductions built by hand are written into every exporter's graph style."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from exporter_fixtures import (
    ALL_BUILDERS,
    EXTERNAL_DATA_BUILDERS,
    GraphBuilder,
    box_samples,
    mlp_parameters,
    run_onnx,
    save_external,
)
from onnx import numpy_helper

from onnx_exact.core.errors import UsageError
from onnx_exact.core.network import DenseLayer, Network
from onnx_exact.io import staging
from onnx_exact.io.onnx_reader import ReadResult, read_model
from onnx_exact.io.onnx_writer import build_model
from onnx_exact.io.staging import save_model_atomic
from onnx_exact.reduce import Reduction

ORIGINAL_METADATA = {"author": "fixture", "onnx_exact.domain.x": "stale"}
NEW_METADATA = {"onnx_exact.domain.x": '{"lower": 0, "upper": 1}', "onnx_exact.summary": "test"}


# ----------------------------------------------------------------------------- reductions by hand
def _layers(net: Network) -> list[DenseLayer]:
    return [DenseLayer(k.weight.copy(), k.bias.copy(), k.relu, k.name) for k in net.layers]


def _reduction(net: Network, layers: list[DenseLayer], hosts: list[int], **kw) -> Reduction:
    reduced = Network(layers, net.input_map, net.input_name, net.output_name)
    return Reduction(network=reduced, hosts=hosts, layers=[], **kw)


def drop_units(net: Network, layer: int = 0, units: tuple[int, ...] = (0, 2)) -> Reduction:
    """Delete rows ``units`` of ``layer`` and the matching columns of the next layer."""
    layers = _layers(net)
    keep = np.setdiff1d(np.arange(layers[layer].out_features), units)
    old, nxt = layers[layer], layers[layer + 1]
    layers[layer] = DenseLayer(old.weight[keep], old.bias[keep], old.relu, old.name)
    layers[layer + 1] = DenseLayer(nxt.weight[:, keep], nxt.bias, nxt.relu, nxt.name)
    return _reduction(net, layers, list(range(len(layers))))


def fold_layer(net: Network, removed: int) -> Reduction:
    """Treat layer ``removed`` as affine and compose it into the next: ``W' = W₊ W``, ``b' = W₊ b + b₊``."""
    layers = _layers(net)
    low, high = layers[removed], layers[removed + 1]
    merged = DenseLayer(
        high.weight @ low.weight, high.weight @ low.bias + high.bias, high.relu, high.name
    )
    layers[removed : removed + 2] = [merged]
    hosts = [k for k in range(len(net.layers)) if k != removed]
    return _reduction(net, layers, hosts)


def constant_reduction(net: Network, value: np.ndarray) -> Reduction:
    """The constant-output form: a width-1 zero ReLU layer, then the output layer with bias ``value``."""
    host = next(k for k, layer in enumerate(net.layers[:-1]) if layer.relu)
    last = net.layers[-1]
    layers = [
        DenseLayer(np.zeros((1, net.in_features)), np.zeros(1), True, net.layers[host].name),
        DenseLayer(np.zeros((last.out_features, 1)), value, last.relu, last.name),
    ]
    return _reduction(net, layers, [host, len(net.layers) - 1], constant_output=True)


# ----------------------------------------------------------------------------- checks
def _read(name: str, tmp_path: Path) -> tuple[ReadResult, np.ndarray, np.ndarray]:
    model, lower, upper = ALL_BUILDERS[name]()
    onnx.helper.set_model_props(model, ORIGINAL_METADATA)
    model.doc_string = "fixture model"
    model.graph.doc_string = "fixture graph"
    if name in EXTERNAL_DATA_BUILDERS:
        path = tmp_path / "model.onnx"
        save_external(model, path)
        return read_model(path), lower, upper
    return read_model(model), lower, upper


def _real_inputs(model: onnx.ModelProto) -> list[bytes]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.SerializeToString() for i in model.graph.input if i.name not in initializers]


def check_written(read: ReadResult, reduction: Reduction, lower, upper) -> onnx.ModelProto:
    """Build, then check interface, opsets, metadata, op types and onnxruntime's output."""
    original_bytes = read.model.SerializeToString()
    written = build_model(read, reduction, NEW_METADATA)
    assert read.model.SerializeToString() == original_bytes, "build_model must not edit its input"
    onnx.checker.check_model(written)
    original = read.model
    assert _real_inputs(written) == _real_inputs(original)
    assert [o.SerializeToString() for o in written.graph.output] == [
        o.SerializeToString() for o in original.graph.output
    ]
    assert list(written.opset_import) == list(original.opset_import)
    assert written.ir_version == original.ir_version
    assert written.producer_name == original.producer_name
    assert written.doc_string == original.doc_string
    assert written.graph.doc_string == original.graph.doc_string
    metadata = {p.key: p.value for p in written.metadata_props}
    assert metadata == {**{p.key: p.value for p in original.metadata_props}, **NEW_METADATA}
    new_ops = {n.op_type for n in written.graph.node} - {n.op_type for n in original.graph.node}
    assert new_ops <= {"Gemm", "MatMul", "Add"}
    core_names = {original.graph.node[read.binding.layers[h].core].name for h in reduction.hosts}
    assert core_names <= {n.name for n in written.graph.node}

    x = box_samples(lower, upper, 48, seed=3)
    (got,) = run_onnx(written, x, [read.network.output_name])
    want = reduction.network.forward(x)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    run_onnx(written, x[:4])  # the whole graph, tail included, still runs
    return written


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_drop_units(name: str, tmp_path: Path) -> None:
    read, lower, upper = _read(name, tmp_path)
    reduction = drop_units(read.network)
    written = check_written(read, reduction, lower, upper)
    assert {p.key: p.value for p in written.metadata_props}["author"] == "fixture"
    assert len(written.graph.node) <= len(read.model.graph.node)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_fold_hidden_layer(name: str, tmp_path: Path) -> None:
    read, lower, upper = _read(name, tmp_path)
    written = check_written(read, fold_layer(read.network, 1), lower, upper)
    removed_relu = read.binding.layers[1].relu_node
    if removed_relu is not None:
        relu_name = read.model.graph.node[removed_relu].output[0]
        assert all(relu_name not in n.output for n in written.graph.node)


@pytest.mark.parametrize(
    "name",
    [
        "gemm_trans_a",
        "keras_normalization",
        "matlab_acasxu",
        "eran_normalized",
        "torch_flatten_dropout",
        "onnxsim_reshape_gemm",
        "skl2onnx_scaler",
        "vnncomp_left_weight",
        "torch_legacy_rank3",
    ],
)
def test_fold_first_layer(name: str, tmp_path: Path) -> None:
    read, lower, upper = _read(name, tmp_path)
    check_written(read, fold_layer(read.network, 0), lower, upper)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_constant_output(name: str, tmp_path: Path) -> None:
    read, lower, upper = _read(name, tmp_path)
    value = np.linspace(-1.0, 2.0, read.network.out_features)
    written = check_written(read, constant_reduction(read.network, value), lower, upper)
    core_names = {
        read.model.graph.node[read.binding.layers[h].core].name for h in reduction_hosts(read)
    }
    affine = [n.name for n in written.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(affine) == 2 and set(affine) == core_names


def reduction_hosts(read: ReadResult) -> list[int]:
    return constant_reduction(read.network, np.zeros(read.network.out_features)).hosts


def test_bias_free_matmul_gets_an_add(tmp_path: Path) -> None:
    read, lower, upper = _read("torch_legacy_bias_free", tmp_path)
    written = check_written(read, constant_reduction(read.network, np.ones(3)), lower, upper)
    adds = [n for n in written.graph.node if n.op_type == "Add"]
    assert len(adds) == 1 and adds[0].output[0] == "output"


def test_kept_rows_are_bit_identical(tmp_path: Path) -> None:
    """Dropping units must not re-round the surviving weights (alpha is divided back out)."""
    for name in ("torch_legacy_gemm", "gemm_alpha_beta", "keras_tf2onnx"):
        read, lower, upper = _read(name, tmp_path)
        written = check_written(read, drop_units(read.network), lower, upper)
        binding = read.binding.layers[0]
        weight_name = read.model.graph.node[binding.core].input[binding.weight_slot]
        original = numpy_helper.to_array(
            next(t for t in read.model.graph.initializer if t.name == weight_name)
        )
        new_name = next(
            n for n in written.graph.node if n.name == read.model.graph.node[binding.core].name
        ).input[binding.weight_slot]
        new = numpy_helper.to_array(
            next(t for t in written.graph.initializer if t.name == new_name)
        )
        keep = [1, 3, 4, 5, 6, 7]
        expected = original[keep] if binding.weight_layout == "oi" else original[:, keep]
        assert new.dtype == original.dtype
        np.testing.assert_array_equal(new, expected)


def test_shared_initializer_is_cloned() -> None:
    g = GraphBuilder()
    (w1, b1), (w2, _), (w3, b3) = mlp_parameters(seed=40)
    shared = g.const(b1, "shared_bias")
    x = g.node("Relu", [g.node("Gemm", ["x", g.const(w1), shared], name="fc1", transB=1)])
    x = g.node("Relu", [g.node("Gemm", [x, g.const(w2), shared], name="fc2", transB=1)])
    g.node("Gemm", [x, g.const(w3), g.const(b3)], name="fc3", output="y", transB=1)
    model = g.model([g.tensor("x", ["N", 6])], [g.tensor("y", ["N", 3])])
    read = read_model(model)
    written = check_written(read, drop_units(read.network), -np.ones(6), np.ones(6))
    fc1, fc2 = (next(n for n in written.graph.node if n.name == name) for name in ("fc1", "fc2"))
    assert fc2.input[2] == "shared_bias" and fc1.input[2] != "shared_bias"
    kept = next(t for t in written.graph.initializer if t.name == "shared_bias")
    np.testing.assert_array_equal(numpy_helper.to_array(kept), b1)


def test_stale_value_info_is_dropped(tmp_path: Path) -> None:
    model, lower, upper = ALL_BUILDERS["torch_legacy_gemm_dynamic"]()
    model = onnx.shape_inference.infer_shapes(model)
    assert any(v.name == "/fc1/Gemm_output_0" for v in model.graph.value_info)
    read = read_model(model)
    written = check_written(read, drop_units(read.network), lower, upper)
    onnx.checker.check_model(written, full_check=True)
    assert not any(v.name.startswith("/fc1/") for v in written.graph.value_info)


def test_ir3_initializers_stay_listed_as_inputs(tmp_path: Path) -> None:
    read, lower, upper = _read("matlab_acasxu", tmp_path)
    written = check_written(read, constant_reduction(read.network, np.zeros(3)), lower, upper)
    listed = {i.name for i in written.graph.input} - {"input"}
    assert listed == {t.name for t in written.graph.initializer}
    assert written.graph.input[0].name == read.model.graph.input[0].name


# ----------------------------------------------------------------------------- saving
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_save_is_deterministic(tmp_path: Path) -> None:
    read, lower, upper = _read("torch_legacy_gemm_batchnorm", tmp_path)
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    save_model_atomic(build_model(read, drop_units(read.network), NEW_METADATA), first)
    save_model_atomic(build_model(read, drop_units(read.network), NEW_METADATA), second)
    assert first.read_bytes() == second.read_bytes()
    assert _leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o666 & ~umask


def test_external_data_round_trip(tmp_path: Path) -> None:
    read, lower, upper = _read("torch_dynamo", tmp_path)
    assert read.uses_external_data
    model = build_model(read, drop_units(read.network), NEW_METADATA)
    out = tmp_path / "small.onnx"
    placement = staging.TensorPlacement.like_input(read)
    save_model_atomic(model, out, external_data=read.uses_external_data, placement=placement)
    assert (tmp_path / "small.onnx.data").stat().st_size > 0
    first = (out.read_bytes(), (tmp_path / "small.onnx.data").read_bytes())
    save_model_atomic(model, out, external_data=True, placement=placement)
    assert (out.read_bytes(), (tmp_path / "small.onnx.data").read_bytes()) == first
    assert _leftovers(tmp_path) == []
    reread = read_model(out)
    assert reread.uses_external_data
    x = box_samples(lower, upper, 16)
    (from_file,) = run_onnx(reread.model, x, [read.network.output_name])
    want = drop_units(read.network).network.forward(x)
    np.testing.assert_allclose(from_file, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reread.network.forward(x), want, rtol=1e-6, atol=1e-6)


def test_save_failures_leave_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read, _, _ = _read("torch_legacy_gemm", tmp_path)
    model = build_model(read, drop_units(read.network), {})
    with pytest.raises(UsageError, match="does not exist"):
        save_model_atomic(model, tmp_path / "missing" / "out.onnx")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        save_model_atomic(model, tmp_path / "folder.onnx")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(staging.os, "replace", failing_replace)
    for external in (False, True):
        with pytest.raises(UsageError, match="out.onnx.*No space left"):
            save_model_atomic(model, tmp_path / "out.onnx", external_data=external)
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "out.onnx").exists()
