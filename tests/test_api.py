"""The Python API (README "Python API"): boxes from arrays, in-memory models, importable errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from exporter_fixtures import gemm_mlp

import onnx_exact
from onnx_exact import DomainError, DomainSpec, OnnxExactError, UsageError, analyze, check, compress

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return gemm_mlp((4, 8, 8, 3), seed=1)


def _states(report) -> list[tuple[list[int], list[int]]]:
    return [(layer.stably_active, layer.stably_inactive) for layer in report.layers]


def test_summary_metadata_counts_the_removed_units(model):
    result = compress(model, None, DomainSpec(["[-1,1]"]))
    removed = sum(layer.removed for layer in result.report.layers)
    assert removed > 0
    summary = {p.key: p.value for p in result.model.metadata_props}["onnx_exact.summary"]
    assert summary.startswith(f"onnx-exact: {removed} of 16 ReLU units removed")


def test_a_box_from_arrays_is_the_box_from_a_range(model):
    from_range = analyze(model, DomainSpec(input_ranges=["[-1,1]"])).report
    for lower, upper in [
        (-np.ones(4), np.ones(4)),  # flattened
        (-np.ones((1, 4)), np.ones((1, 4))),  # the input's shape with its batch axis
        (-1.0, 1.0),  # scalars
    ]:
        analysis = analyze(model, DomainSpec(lower=lower, upper=upper))
        np.testing.assert_array_equal(analysis.box.lower, -np.ones(4))
        np.testing.assert_array_equal(analysis.box.upper, np.ones(4))
        assert _states(analysis.report) == _states(from_range)
        assert analysis.report.domain_source == "arrays lower/upper"


def test_compress_and_check_take_model_protos_and_arrays(model):
    box = DomainSpec(lower=np.zeros(4), upper=np.ones(4))
    result = compress(model, None, box)
    assert result.report.passed
    assert result.report.params_after < result.report.params_before
    report = check(model, result.model, box, samples=200)
    assert report.passed and report.proof is not None and report.proof.proved
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(result.model)
    bias = next(t for t in perturbed.graph.initializer if t.name == "b2")
    values = onnx.numpy_helper.to_array(bias).copy()
    values[0] += 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(values, "b2"))
    assert not check(model, perturbed, box, samples=200).passed


@pytest.mark.parametrize(
    ("spec", "error", "needle"),
    [
        (DomainSpec(lower=np.zeros(4)), UsageError, "both lower and upper"),
        (DomainSpec(["[0,1]"], lower=0.0, upper=1.0), UsageError, "use one"),
        (DomainSpec(lower=np.zeros(4), upper=np.full(4, np.nan)), DomainError, "not finite"),
        (DomainSpec(lower=np.zeros(5), upper=np.ones(5)), DomainError, "shape [5]"),
        (DomainSpec(lower=np.ones(4), upper=np.zeros(4)), DomainError, "DomainSpec"),
    ],
)
def test_bad_arrays_raise_the_package_errors(model, spec, error, needle):
    with pytest.raises(error) as info:
        analyze(model, spec)
    assert isinstance(info.value, OnnxExactError)
    assert needle in str(info.value)


def test_every_error_class_is_importable_from_the_package():
    from onnx_exact.core import errors

    public = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, OnnxExactError)
    }
    assert public <= set(onnx_exact.__all__)
    for name in public:
        assert getattr(onnx_exact, name) is getattr(errors, name)


def test_the_package_ships_its_type_marker():
    assert (REPO / "onnx_exact" / "py.typed").is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\nonnx_exact = ["py.typed"]' in pyproject


def test_a_file_grown_by_the_recorded_domain_says_so():
    """A model with nothing to remove, over a box of distinct per-feature bounds: the written
    file only gains the domain record, and the report says that is why it is larger."""
    tiny = gemm_mlp((4, 3, 2), seed=3)
    lower = -np.array([123.456789, 234.56789, 345.6789, 456.789])
    result = compress(tiny, None, DomainSpec(lower=lower, upper=-lower))
    assert not any(layer.removed for layer in result.report.layers)
    report = result.report
    assert report.bytes_after > report.bytes_before
    grown = report.bytes_after - report.bytes_before
    note = next(n for n in report.notes if "records the input domain" in n)
    assert f"{grown:,} bytes larger" in note
