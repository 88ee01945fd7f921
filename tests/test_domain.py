"""Input domains: CLI strings, range files, VNN-LIB, metadata, and how they resolve to a Box."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_exact.core.box import Box
from onnx_exact.core.errors import DomainError, UnsupportedModelError, UsageError
from onnx_exact.io.domain_sources import (
    DOMAIN_KEY_PREFIX,
    InputLayout,
    domain_metadata,
    load_range_file,
    metadata_range,
    parse_input_range,
    resolve_domain,
)
from onnx_exact.io.vnnlib import parse_vnnlib_box


def image_model(input_name: str = "x", batch: str | int = "N") -> onnx.ModelProto:
    """A 1x2x2 'image' input, Flatten, Gemm(4 -> 3), Relu: 4 raw features."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [input_name], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "b"], ["pre"], transB=1),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        "image",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def with_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> onnx.ModelProto:
    onnx.helper.set_model_props(model, entries)
    return model


# ----------------------------------------------------------------------------- parse_input_range


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[0,1]", (None, 0.0, 1.0)),
        ("0,1", (None, 0.0, 1.0)),
        (" [ -0.5 , 0.5 ] ", (None, -0.5, 0.5)),
        ("x:[0,1]", ("x", 0.0, 1.0)),
        ("x:-1,1", ("x", -1.0, 1.0)),
        ("input:0:[-1e-3,2.5E2]", ("input:0", -1e-3, 250.0)),
        ("model/dense_input:0:[-3,-2]", ("model/dense_input:0", -3.0, -2.0)),
        ("onnx::Gemm_0:[0,0]", ("onnx::Gemm_0", 0.0, 0.0)),
    ],
)
def test_parse_input_range_forms(text, expected):
    assert parse_input_range(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "[0,1", "0", "[0,1,2]", "[a,b]", "[1,0]", "[0,inf]", "[nan,1]", ":[0,1]", "x:[0;1]"],
)
def test_parse_input_range_errors_name_the_argument(text):
    with pytest.raises(DomainError) as info:
        parse_input_range(text)
    message = str(info.value)
    assert "--input-range" in message and repr(text) in message
    assert "\n" not in message


def test_parse_input_range_error_shows_expected_form():
    with pytest.raises(DomainError, match=r"expected \[lo,hi\]"):
        parse_input_range("[zero,1]")


# ----------------------------------------------------------------------------- load_range_file


def test_range_file_npz_npy_json(tmp_path):
    lower, upper = np.array([0.0, -1.0, 0.1]), np.array([1.0, 1.0, 0.1])
    np.savez(tmp_path / "r.npz", lower=lower, upper=upper)
    np.save(tmp_path / "r.npy", np.stack([lower, upper]))
    (tmp_path / "r.json").write_text(json.dumps({"lower": lower.tolist(), "upper": 2.0}))
    for name in ("r.npz", "r.npy"):
        got_lower, got_upper = load_range_file(tmp_path / name)
        assert got_lower.dtype == np.float64
        np.testing.assert_array_equal(got_lower, lower)
        np.testing.assert_array_equal(got_upper, upper)
    got_lower, got_upper = load_range_file(tmp_path / "r.json")
    np.testing.assert_array_equal(got_lower, lower)
    assert got_upper.shape == () and float(got_upper) == 2.0


def test_range_file_nested_json_keeps_shape(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"lower": [[0, 0], [0, 0]], "upper": [[1, 2], [3, 4]]}))
    lower, upper = load_range_file(path)
    assert lower.shape == upper.shape == (2, 2)


@pytest.mark.parametrize(
    ("name", "write", "fragment"),
    [
        ("missing.npz", None, "cannot read"),
        ("r.txt", lambda p: p.write_text("0 1"), "unknown file type"),
        ("r.npz", lambda p: np.savez(p, low=np.zeros(2), upper=np.ones(2)), "lower"),
        ("r.npy", lambda p: np.save(p, np.zeros((3, 2))), "shape (2, ...)"),
        ("r.json", lambda p: p.write_text("{not json"), "cannot read"),
        ("r.json", lambda p: p.write_text('{"lower": 0}'), '"upper"'),
        ("r.json", lambda p: p.write_text('{"lower": [0, [1]], "upper": 1}'), "lower"),
    ],
)
def test_range_file_errors_name_the_file(tmp_path, name, write, fragment):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(DomainError) as info:
        load_range_file(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


# ----------------------------------------------------------------------------- VNN-LIB

VNNLIB_BASIC = """
; a comment with (parentheses
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const X_2 Real)
(declare-const Y_0 Real)
(assert (<= X_0 0.5))
(assert (>= X_0 -0.5))
(assert (and (<= 1e-3 X_1) (>= 2.5E1 X_1)))
(assert (<= X_2 (- 0.25)))
(assert (>= X_2 (- 1)))
(assert (<= Y_0 X_0))
(assert (or (and (>= Y_0 3.0)) (and (<= Y_0 1))))
"""


def test_vnnlib_bounds_in_every_form(tmp_path):
    path = tmp_path / "p.vnnlib"
    path.write_text(VNNLIB_BASIC)
    lower, upper, note = parse_vnnlib_box(path, 3)
    np.testing.assert_array_equal(lower, [-0.5, 1e-3, -1.0])
    np.testing.assert_array_equal(upper, [0.5, 25.0, -0.25])
    assert note == ""


def test_vnnlib_disjunction_over_inputs_takes_the_hull(tmp_path):
    path = tmp_path / "p.vnnlib"
    path.write_text(
        """(declare-const X_0 Real)(declare-const X_1 Real)
        (assert (<= X_1 4)) (assert (>= X_1 -4))
        (assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 -9) (<= X_1 1))
                    (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 2))
                    (and (>= X_0 7) (<= X_0 5))))
        (assert (<= X_0 X_1))
        """
    )
    lower, upper, note = parse_vnnlib_box(path, 2)
    # the empty third disjunct contributes nothing; the top-level X_1 bounds cut the first one
    np.testing.assert_array_equal(lower, [0.0, -4.0])
    np.testing.assert_array_equal(upper, [3.0, 2.0])
    assert "hull of 3 disjuncts" in note
    assert "1 input constraint" in note


def test_vnnlib_equality_gives_a_degenerate_feature(tmp_path):
    path = tmp_path / "p.vnnlib"
    path.write_text("(declare-const X_0 Real)(assert (= X_0 0.3))")
    lower, upper, _ = parse_vnnlib_box(path, 1)
    assert lower[0] == upper[0] == 0.3


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("(assert (<= X_0 0))(assert (>= X_0 1))(assert (<= X_1 1))(assert (>= X_1 0))", "empty"),
        ("(assert (<= X_0 1))(assert (>= X_0 0))(assert (<= X_1 1))", "X_1 has no lower bound"),
        ("(assert (<= Y_0 1))", "no bounds on the inputs"),
        ("(assert (<= X_0 1))(assert (>= X_0 0))(assert (<= X_5 1))", "X_5"),
        ("(assert (<= X_0 1)", "unbalanced"),
        ("(assert (<= X_0 1)))", "unbalanced"),
    ],
)
def test_vnnlib_errors_name_the_file(tmp_path, body, fragment):
    path = tmp_path / "bad.vnnlib"
    path.write_text(body)
    with pytest.raises(DomainError) as info:
        parse_vnnlib_box(path, 2)
    assert "--vnnlib" in str(info.value) and str(path) in str(info.value)
    assert fragment in str(info.value)


def test_vnnlib_missing_file():
    with pytest.raises(DomainError, match="nowhere.vnnlib"):
        parse_vnnlib_box("/nowhere.vnnlib", 2)


def shared_vnnlib_cases(shared_models: Path) -> list[tuple[Path, Path]]:
    manifest = shared_models / "manifest.json"
    if not manifest.exists():
        return []
    cases = []
    for entry in json.loads(manifest.read_text()):
        folder = shared_models / Path(entry["model"]).parent
        for domain in entry["domains"]:
            if domain["vnnlib"]:
                cases.append((folder / domain["vnnlib"], folder / domain["box_npz"]))
    return cases


def test_vnnlib_matches_the_shared_boxes(shared_models):
    cases = shared_vnnlib_cases(shared_models)
    if not cases:
        pytest.skip("../shared/models has no VNN-LIB properties")
    for vnnlib_path, npz_path in cases:
        expected = np.load(npz_path)
        lower, upper, _ = parse_vnnlib_box(vnnlib_path, expected["lower"].size)
        np.testing.assert_array_equal(lower, expected["lower"], err_msg=str(vnnlib_path))
        np.testing.assert_array_equal(upper, expected["upper"], err_msg=str(vnnlib_path))


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    ("dims", "n", "expected"),
    [
        (["N", 4], 4, ((4,), True, None)),
        ([None, 4], 4, ((4,), True, None)),
        ([1, 1, 1, 5], 5, ((1, 1, 5), True, 1)),
        ([1, 784, 1], 784, ((784, 1), True, 1)),
        ([4], 4, ((4,), False, None)),
        ([None], 4, ((4,), False, None)),
        ([5, 1], 5, ((5, 1), False, None)),
        ([2, 3], 3, ((3,), True, 2)),
        (["N", 3, None, 2], 12, ((3, 2, 2), True, None)),
        (None, 7, ((7,), True, None)),
    ],
)
def test_input_layout_from_declared_dims(dims, n, expected):
    declared = None if dims is None else [d if isinstance(d, int) else None for d in dims]
    layout = InputLayout.from_dims("x", declared, n)
    assert (layout.sample_shape, layout.has_batch_axis, layout.batch_size) == expected


@pytest.mark.parametrize(("dims", "n"), [([3], 4), ([None, None, None], 8), ([None, 5], 4)])
def test_input_layout_that_cannot_hold_the_features(dims, n):
    with pytest.raises(UnsupportedModelError, match="'x'"):
        InputLayout.from_dims("x", dims, n)


# ----------------------------------------------------------------------------- metadata


def test_metadata_uses_scalars_when_uniform():
    box = Box(np.zeros(4), np.full(4, 0.5), "x")
    assert domain_metadata(box) == {"onnx_exact.domain.x": '{"lower": 0.0, "upper": 0.5}'}


def test_metadata_round_trip_is_bit_exact():
    rng = np.random.default_rng(3)
    lower = rng.standard_normal(4) / 3.0
    upper = lower + rng.random(4) * 1e-7
    model = with_metadata(image_model(), domain_metadata(Box(lower, upper, "x")))
    box = resolve_domain(model, 4, "x", model_path="m.onnx")
    np.testing.assert_array_equal(box.lower, lower)
    np.testing.assert_array_equal(box.upper, upper)
    assert box.source == f"metadata:{DOMAIN_KEY_PREFIX}x"


def test_onnxsim_range_with_per_channel_broadcast():
    onnxsim_ranges = pytest.importorskip("onnxsim.ranges")
    model = image_model()
    onnxsim_ranges.set_range(
        model, "x", np.array([[[[-1.0]]]]), np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    )
    box = resolve_domain(model, 4, "x")
    np.testing.assert_array_equal(box.lower, -np.ones(4))
    np.testing.assert_array_equal(box.upper, [1.0, 2.0, 3.0, 4.0])
    assert box.source == "metadata:onnxsim.range.x"


def test_our_metadata_wins_over_onnxsim():
    model = with_metadata(
        image_model(),
        {
            "onnxsim.range.x": '{"min": -5, "max": 5}',
            "onnx_exact.domain.x": '{"lower": 0, "upper": 1}',
        },
    )
    assert resolve_domain(model, 4, "x").upper.tolist() == [1.0] * 4


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        ({"onnxsim.range.x": '{"min": null, "max": 1}'}, "null"),
        ({"onnx_exact.domain.x": "{oops"}, "not valid JSON"),
        ({"onnx_exact.domain.x": '{"lower": 0}'}, '"upper"'),
        ({"onnx_exact.domain.x": '{"lower": [0, 0, 0], "upper": 1}'}, "shape [3]"),
    ],
)
def test_bad_metadata_names_the_key(entries, fragment):
    model = with_metadata(image_model(), entries)
    with pytest.raises(DomainError) as info:
        resolve_domain(model, 4, "x", model_path="net.onnx")
    assert next(iter(entries)) in str(info.value) and "net.onnx" in str(info.value)
    assert fragment in str(info.value)


def test_metadata_for_other_inputs_is_ignored():
    model = with_metadata(image_model(), {"onnx_exact.domain.other": '{"lower":0,"upper":1}'})
    assert metadata_range(model, "x") is None


# ----------------------------------------------------------------------------- resolve_domain


def test_resolve_precedence(tmp_path):
    model = with_metadata(image_model(), {"onnx_exact.domain.x": '{"lower": -9, "upper": 9}'})
    np.savez(tmp_path / "r.npz", lower=np.full(4, -2.0), upper=np.full(4, 2.0))
    vnnlib = tmp_path / "p.vnnlib"
    vnnlib.write_text("".join(f"(assert (<= X_{i} 3))(assert (>= X_{i} -3))" for i in range(4)))

    from_range = resolve_domain(model, 4, "x", input_ranges=["x:[-1,1]"])
    assert from_range.upper.tolist() == [1.0] * 4
    assert from_range.source == "--input-range x:[-1,1]"

    from_file = resolve_domain(model, 4, "x", range_file=tmp_path / "r.npz")
    assert from_file.upper.tolist() == [2.0] * 4
    assert from_file.source.startswith("--input-range-file r.npz")

    from_vnnlib = resolve_domain(model, 4, "x", vnnlib=vnnlib)
    assert from_vnnlib.upper.tolist() == [3.0] * 4
    assert from_vnnlib.source == "vnnlib:p.vnnlib"

    from_metadata = resolve_domain(model, 4, "x")
    assert from_metadata.upper.tolist() == [9.0] * 4
    assert from_metadata.input_name == "x"


def test_range_and_file_together_is_a_usage_error(tmp_path):
    np.savez(tmp_path / "r.npz", lower=np.zeros(4), upper=np.ones(4))
    with pytest.raises(UsageError, match="--input-range-file"):
        resolve_domain(image_model(), 4, "x", input_ranges=["[0,1]"], range_file=tmp_path / "r.npz")


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"input_ranges": ["[0,1]"]}, "--input-range and --vnnlib"),
        ({"range_file": "r.npz"}, "--input-range-file and --vnnlib"),
    ],
)
def test_vnnlib_with_another_explicit_box_is_refused(tmp_path, given, named):
    """Silently preferring one explicit box over a VNN-LIB property would ignore the property."""
    np.savez(tmp_path / "r.npz", lower=np.zeros(4), upper=np.ones(4))
    vnnlib = tmp_path / "p.vnnlib"
    vnnlib.write_text("".join(f"(assert (<= X_{i} 3))(assert (>= X_{i} -3))" for i in range(4)))
    if "range_file" in given:
        given = {"range_file": tmp_path / given["range_file"]}
    with pytest.raises(UsageError, match=named):
        resolve_domain(image_model(), 4, "x", vnnlib=vnnlib, **given)


def test_bounds_that_overflow_are_refused_with_the_accepted_range():
    with pytest.raises(DomainError, match=r"outside the accepted range \[-3.4e\+38, 3.4e\+38\]"):
        resolve_domain(image_model(), 4, "x", input_ranges=["[-1e308,1e308]"])
    double = image_model()
    double.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    with pytest.raises(DomainError, match=r"\[-1e\+150, 1e\+150\]"):
        resolve_domain(double, 4, "x", input_ranges=["[-1e200,1e200]"])
    assert resolve_domain(double, 4, "x", input_ranges=["[-1e100,1e100]"]).upper[0] == 1e100


def test_range_files_that_would_exhaust_memory_or_the_stack_are_refused(tmp_path):
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 50000000000), }"
    header += " " * (117 - len(header)) + "\n"
    huge = tmp_path / "huge.npy"
    huge.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
    with pytest.raises(DomainError, match="huge.npy: its header claims shape"):
        load_range_file(huge)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("lower.npy", huge.read_bytes())
        archive.writestr("upper.npy", huge.read_bytes())
    with pytest.raises(DomainError, match="huge.npz lower: its header claims shape"):
        load_range_file(tmp_path / "huge.npz")
    deep = tmp_path / "deep.json"
    deep.write_text('{"lower": ' + "[" * 100_000 + "]" * 100_000 + ', "upper": 1}')
    with pytest.raises(DomainError, match="deep.json: nested too deeply"):
        load_range_file(deep)


def test_two_ranges_are_refused():
    with pytest.raises(UsageError, match="2 times"):
        resolve_domain(image_model(), 4, "x", input_ranges=["[0,1]", "[0,2]"])


def test_range_naming_another_input_lists_the_inputs():
    with pytest.raises(DomainError) as info:
        resolve_domain(image_model(), 4, "x", input_ranges=["image:[0,1]"])
    assert "'image'" in str(info.value) and "'x'" in str(info.value)


@pytest.mark.parametrize(
    "shape",
    [(4,), (1, 2, 2), (1, 1, 2, 2)],
)
def test_range_file_arrays_in_the_input_shape_or_flat(tmp_path, shape):
    upper = np.arange(1.0, 5.0).reshape(shape)
    np.savez(tmp_path / "r.npz", lower=np.zeros(shape), upper=upper)
    box = resolve_domain(image_model(), 4, "x", range_file=tmp_path / "r.npz")
    np.testing.assert_array_equal(box.upper, [1.0, 2.0, 3.0, 4.0])


def test_wrong_size_says_expected_and_got(tmp_path):
    np.savez(tmp_path / "r.npz", lower=np.zeros(5), upper=np.ones(5))
    with pytest.raises(DomainError) as info:
        resolve_domain(image_model(), 4, "x", range_file=tmp_path / "r.npz")
    message = str(info.value)
    assert "r.npz" in message and "shape [5]" in message and "4 values" in message


def test_nan_and_inverted_bounds_name_the_index(tmp_path):
    lower, upper = np.zeros(4), np.ones(4)
    lower[2] = np.nan
    np.savez(tmp_path / "nan.npz", lower=lower, upper=upper)
    with pytest.raises(DomainError, match=r"lower\[2\].*not finite"):
        resolve_domain(image_model(), 4, "x", range_file=tmp_path / "nan.npz")
    lower[2], upper[3] = 0.0, -1.0
    np.savez(tmp_path / "inv.npz", lower=lower, upper=upper)
    with pytest.raises(DomainError, match=r"inv.npz: lower\[3\] = 0.0 > upper\[3\] = -1.0"):
        resolve_domain(image_model(), 4, "x", range_file=tmp_path / "inv.npz")


def test_degenerate_features_are_allowed(tmp_path):
    np.savez(tmp_path / "r.npz", lower=np.array([0.0, 1, 1, 0]), upper=np.array([0.0, 1, 2, 0]))
    box = resolve_domain(image_model(), 4, "x", range_file=tmp_path / "r.npz")
    assert box.radius.tolist() == [0.0, 0.0, 0.5, 0.0]


def test_missing_domain_explains_every_way_to_give_one():
    with pytest.raises(DomainError) as info:
        resolve_domain(image_model("input:0"), 4, "input:0", model_path="net.onnx")
    message = str(info.value)
    for fragment in ("net.onnx", "--input-range 'input:0:[0,1]'", "--input-range-file", "--vnnlib"):
        assert fragment in message
    assert "onnx_exact.domain.input:0" in message
    assert "\n" not in message


def test_scalar_range_broadcasts_on_a_fixed_batch_input():
    box = resolve_domain(image_model(batch=1), 4, "x", input_ranges=["[-0.5,0.5]"])
    assert box.lower.tolist() == [-0.5] * 4 and box.size == 4


def test_resolve_on_the_shared_models(shared_models):
    acas = shared_models / "acasxu" / "ACASXU_run2a_1_1_batch_2000.onnx"
    if not acas.exists():
        pytest.skip(f"{acas} is absent")
    model = onnx.load(acas)  # IR 3: initializers are listed as graph inputs too
    box = resolve_domain(model, 5, "input", vnnlib=acas.parent / "prop_1.vnnlib")
    expected = np.load(acas.parent / "ACASXU_run2a_1_1_batch_2000.prop_1.npz")
    np.testing.assert_array_equal(box.lower, expected["lower"])
    with pytest.raises(DomainError) as info:
        resolve_domain(model, 5, "input", input_ranges=["W0:[0,1]"])
    assert "'input'" in str(info.value) and "'W0'" in str(info.value)
    assert "W0" not in str(info.value).split("inputs are")[1]

    mnist = onnx.load(shared_models / "mnistfc" / "mnist-net_256x2.onnx")
    box = resolve_domain(mnist, 784, "0", input_ranges=["0:[0,1]"])
    assert box.size == 784 and box.input_name == "0"
