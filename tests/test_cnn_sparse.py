"""CNN layers too large to be dense: the sparse weight, its reader path and the analysis on it.

A layer whose dense matrix would pass ``MAX_DENSE_ENTRIES`` keeps its weight as a
:class:`~onnx_exact.core.sparse.SparseMatrix`. The matrix must equal the dense one entry for
entry, and a CNN read that way must compress exactly as the dense read does. The tests force
the sparse path on the small exporter fixtures by lowering the limit, and read one real-size
layer (a 3→32 conv on 32×32, 100 M dense entries) without it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cnn_fixtures import CLIP, RESIDUAL, VALID_BUILDERS, assert_compressed_exactly, run_onnxruntime
from cnn_fixtures import SEQUENTIAL_READ as SEQUENTIAL
from exporter_fixtures import GraphBuilder
from hypothesis import given, settings
from hypothesis import strategies as st

import onnx_exact.io.affine_chain as affine_chain
import onnx_exact.io.cnn_reader as cnn_reader
from onnx_exact import AnalysisOptions, DomainSpec, check, compress
from onnx_exact.core.operators import (
    AveragePoolOperator,
    ConvOperator,
    DenseOperator,
    MeanOperator,
    PadOperator,
    TransposeOperator,
)
from onnx_exact.core.sparse import SparseMatrix, sparse_operator, sparse_product
from onnx_exact.io.onnx_reader import read_model


def _random_sparse(rng: np.random.Generator, shape, density=0.2) -> np.ndarray:
    dense = rng.standard_normal(shape)
    dense[rng.random(shape) > density] = 0.0
    return dense


# ----------------------------------------------------------------------------- the matrix


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_out=st.integers(1, 9),
    n_in=st.integers(1, 9),
    density=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_sparse_matrix_operations_equal_the_dense_ones(seed, n_out, n_in, density):
    rng = np.random.default_rng(seed)
    dense = _random_sparse(rng, (n_out, n_in), density)
    matrix = SparseMatrix.from_dense(dense)
    x, cols, rows = (
        rng.standard_normal(n_in),
        rng.standard_normal((n_in, 3)),
        rng.standard_normal((4, n_out)),
    )
    np.testing.assert_allclose(matrix.toarray(), dense, rtol=0, atol=0)
    np.testing.assert_allclose(matrix @ x, dense @ x, atol=1e-12)
    np.testing.assert_allclose(matrix @ cols, dense @ cols, atol=1e-12)
    np.testing.assert_allclose(rows @ matrix, rows @ dense, atol=1e-12)
    np.testing.assert_allclose(rows[0] @ matrix, rows[0] @ dense, atol=1e-12)
    np.testing.assert_allclose(matrix.T.toarray(), dense.T, rtol=0, atol=0)
    np.testing.assert_allclose(abs(matrix).toarray(), np.abs(dense), rtol=0, atol=0)
    np.testing.assert_allclose(matrix.row_abs_sums(), np.abs(dense).sum(axis=1), atol=1e-12)
    np.testing.assert_array_equal(matrix.row_min(), dense.min(axis=1))
    pick = rng.random(n_out) < 0.5
    np.testing.assert_array_equal(matrix.rows(pick), dense[pick])
    np.testing.assert_array_equal(matrix[1:].toarray(), dense[1:])
    np.testing.assert_array_equal(matrix.rows(n_out - 1), dense[n_out - 1])
    scale = rng.standard_normal(n_out)
    np.testing.assert_allclose(matrix.scale_rows(scale).toarray(), dense * scale[:, None])
    other = _random_sparse(rng, (n_in, 5), 0.5)
    np.testing.assert_allclose(
        sparse_product(matrix, SparseMatrix.from_dense(other)).toarray(), dense @ other, atol=1e-12
    )


def test_from_coo_sums_duplicates_and_drops_zeros():
    matrix = SparseMatrix.from_coo([1, 0, 1, 1], [2, 0, 2, 1], [1.5, -2.0, 2.5, 0.0], (2, 3))
    np.testing.assert_array_equal(matrix.toarray(), [[-2.0, 0, 0], [0, 0, 4.0]])
    assert matrix.nnz == 2 and matrix.size == 2


@pytest.mark.parametrize(
    "op",
    [
        ConvOperator(np.arange(24.0).reshape(4, 2, 3, 1) - 7, None, (5, 4), (1, 0, 2, 1), (2, 1)),
        ConvOperator(np.ones((6, 1, 3, 3)), None, (5, 5), (1, 1, 1, 1), (1, 1), (2, 2), 3),
        ConvOperator(np.arange(12.0).reshape(2, 3, 2) - 5, None, (7,), (0, 1), (2,), (3,)),
        AveragePoolOperator((2, 5, 5), (2, 2), (0, 0, 1, 1), (2, 2), count_include_pad=True),
        AveragePoolOperator((2, 5, 5), (3, 3), (1, 1, 1, 1), (2, 2), ceil_mode=True),
        MeanOperator((3, 4, 2), (1, 2), keepdims=True),
        TransposeOperator((2, 3, 4), (1, 2, 0)),
        PadOperator((2, 3), (0, 1, 1, -1)),
        DenseOperator(np.arange(6.0).reshape(2, 3) - 2),
    ],
    ids=lambda op: type(op).__name__,
)
def test_sparse_operator_is_the_operators_matrix(op):
    np.testing.assert_allclose(sparse_operator(op).toarray(), op.dense(), rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- the reader


@pytest.fixture
def sparse_layers(monkeypatch):
    """Every layer of a CNN read in sparse form, max-tree levels too (the dense limits at 0)."""
    monkeypatch.setattr(affine_chain, "MAX_DENSE_ENTRIES", 0)
    monkeypatch.setattr(cnn_reader, "MAX_DENSE_ENTRIES", 0)


@pytest.mark.parametrize("name", [*SEQUENTIAL, *RESIDUAL, *CLIP, "torch_legacy_maxpool"])
def test_a_cnn_read_sparse_has_the_dense_matrices(name, monkeypatch):
    fixture = VALID_BUILDERS[name]()
    dense = read_model(fixture.model).network
    monkeypatch.setattr(affine_chain, "MAX_DENSE_ENTRIES", 0)
    monkeypatch.setattr(cnn_reader, "MAX_DENSE_ENTRIES", 0)
    sparse = read_model(fixture.model).network
    assert all(layer.is_sparse for layer in sparse.layers)
    for a, b in zip(dense.layers, sparse.layers, strict=True):
        np.testing.assert_allclose(b.weight.toarray(), a.weight, rtol=1e-15, atol=1e-15)
        np.testing.assert_array_equal(b.bias, a.bias)
        np.testing.assert_array_equal(b.auxiliary, a.auxiliary)
        assert (b.passthrough is None) == (a.passthrough is None)
        rows = np.random.default_rng(2).standard_normal((3, a.out_features))
        np.testing.assert_allclose(b.pullback(rows), a.pullback(rows), rtol=1e-12, atol=1e-12)
    rng = np.random.default_rng(0)
    x = fixture.lower + (fixture.upper - fixture.lower) * rng.random((16, fixture.lower.size))
    np.testing.assert_allclose(sparse.forward(x), dense.forward(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [*SEQUENTIAL, "torch_legacy_maxpool", "resnet_blocks"])
def test_a_cnn_read_sparse_loses_its_planted_dead_channels_and_verifies(name, sparse_layers):
    """As the dense read does (tests/test_cnn_compress.py): bounds, witnesses and CROWN run on
    the sparse weights, the HiGHS tiers are left out, and the written model equals the input
    model on box samples."""
    fixture = VALID_BUILDERS[name]()
    result = compress(
        fixture.model,
        None,
        DomainSpec(lower=fixture.lower, upper=fixture.upper),
        AnalysisOptions(time_limit=2),
    )
    assert_compressed_exactly(fixture, result)


@pytest.mark.parametrize("name", CLIP)
def test_a_relu6_cnn_read_sparse_compresses_as_the_dense_read(name, monkeypatch):
    """Clip(0, 6) layers carry kink rows: read sparse, the channel verdicts and removals equal
    the dense read's, and the written model verifies."""
    fixture = VALID_BUILDERS[name]()

    def channels() -> list:
        result = compress(
            fixture.model,
            None,
            DomainSpec(lower=fixture.lower, upper=fixture.upper),
            AnalysisOptions(time_limit=2, jobs=1),
        )
        assert result.report.passed
        return [(x.name, x.channels.dead, x.channels.removed) for x in result.report.layers]

    dense = channels()
    monkeypatch.setattr(affine_chain, "MAX_DENSE_ENTRIES", 0)
    monkeypatch.setattr(cnn_reader, "MAX_DENSE_ENTRIES", 0)
    assert channels() == dense


@pytest.mark.parametrize("name", ["torch_legacy_plain", "resnet_blocks", "torch_legacy_maxpool"])
def test_check_proves_a_pruned_cnn_read_sparse_structurally(name, sparse_layers):
    """The structural proof compares sparse rows in their canonical (columns, values) form."""
    fixture = VALID_BUILDERS[name]()
    box = DomainSpec(lower=fixture.lower, upper=fixture.upper)
    result = compress(fixture.model, None, box, AnalysisOptions(time_limit=2, jobs=1))
    assert result.report.macs_after < result.report.macs_before
    report = check(fixture.model, result.model, box, samples=200)
    assert report.passed and report.proof is not None and report.proof.proved
    assert any("structural correspondence" in note for note in report.proof.notes)


def test_check_of_a_rescaled_sparse_cnn_samples_and_says_why_it_is_not_proved(sparse_layers):
    """2 x the first conv and 0.5 x the second computes the same function (ReLU is positively
    homogeneous, both factors exact in binary) but is no pruned copy: without a dense canonical
    walk the proof is not attempted, said in a note; the sampled comparison passes."""
    fixture = VALID_BUILDERS["torch_legacy_plain"]()
    model = onnx.ModelProto()
    model.CopyFrom(fixture.model)
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for name, factor in [
        (convs[0].input[1], 2.0),
        (convs[0].input[2], 2.0),
        (convs[1].input[1], 0.5),
    ]:
        value = onnx.numpy_helper.to_array(inits[name]) * np.float32(factor)
        inits[name].CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), name))
    box = DomainSpec(lower=fixture.lower, upper=fixture.upper)
    report = check(fixture.model, model, box, samples=200)
    assert report.passed and report.proof is not None and not report.proof.proved
    assert any("canonical walk takes dense layers" in note for note in report.proof.notes)


def test_the_baseline_methods_refuse_a_sparse_cnn_in_one_line(sparse_layers):
    from onnx_exact.core.errors import UsageError

    fixture = VALID_BUILDERS["torch_legacy_plain"]()
    with pytest.raises(
        UsageError, match="--method per-neuron builds one MILP .* use --method auto"
    ):
        compress(
            fixture.model,
            None,
            DomainSpec(lower=fixture.lower, upper=fixture.upper),
            AnalysisOptions(time_limit=2, method="per-neuron"),
        )


def test_a_wide_conv_on_a_cifar_image_is_read_sparse_and_computes_the_model():
    """3→32 channels, 3×3, pad 1 on 32×32: a 32768 × 3072 layer (100 M dense entries, over the
    dense limit) has 884,736 stored entries; its network equals onnxruntime on samples."""
    rng = np.random.default_rng(3)
    g = GraphBuilder()
    kernel = rng.standard_normal((32, 3, 3, 3)).astype(np.float32) / 5
    h = g.node(
        "Conv", ["input", g.const(kernel), g.const(np.zeros(32))], kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )  # fmt: skip
    h = g.node("Relu", [h], name="relu")
    h = g.node("GlobalAveragePool", [h])
    h = g.node("Flatten", [h], axis=1)
    weight, bias = g.const(rng.standard_normal((4, 32))), g.const(np.zeros(4))
    g.node("Gemm", [h, weight, bias], output="output", transB=1)
    model = g.model([g.tensor("input", ["n", 3, 32, 32])], [g.tensor("output", ["n", 4])])
    onnx.checker.check_model(model)
    net = read_model(model).network
    first = net.layers[0]
    assert first.is_sparse and first.weight.shape == (32768, 3072)
    assert first.weight.nnz == 32 * 3 * 94**2  # per axis 32 positions x 3 taps, 2 in the pad
    x = rng.random((3, 3072))
    np.testing.assert_allclose(
        net.forward(x), run_onnxruntime(model, x, (3, 32, 32)), rtol=1e-4, atol=1e-4
    )
