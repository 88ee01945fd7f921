"""The bad-input corpus: every way a user can hand the tool something wrong, with its exact outcome.

Each case builds its inputs in ``tmp_path`` and runs :func:`onnx_exact.cli.main` in-process. The
contract checked for every case: the documented exit code, exactly one line on stderr starting with
``onnx-exact: error:`` that names the file/node/argument at fault (the expected substrings), no
Python traceback, and no new file in the folder (no partial output, no temporary file).

``python tests/test_bad_inputs.py`` prints the corpus as the markdown table of
``docs/reliability.md`` (case, exit code, message).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli
from onnx import TensorProto, helper, numpy_helper

ERROR_PREFIX = "onnx-exact: error: "
N_FEATURES = 4


# --------------------------------------------------------------------------- model builders
def mlp(
    activation: str = "Relu",
    input_type: int = TensorProto.FLOAT,
    opset: int | None = 17,
    seed: int = 0,
) -> onnx.ModelProto:
    """A 4-5-3 Gemm MLP ``x -> fc1 -> act1 -> fc2 -> out`` with seeded float32 weights."""
    rng = np.random.default_rng(seed)
    arrays = {
        "w1": rng.normal(size=(5, N_FEATURES)),
        "b1": rng.normal(size=5),
        "w2": rng.normal(size=(3, 5)),
        "b2": rng.normal(size=3),
    }
    initializers = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["y1"], name="fc1", transB=1),
        helper.make_node(activation, ["y1"], ["h1"], name="act1"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["out"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", input_type, ["N", N_FEATURES])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
        initializers,
    )
    opsets = [] if opset is None else [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def good_model(d: Path) -> Path:
    return save(mlp(), d / "model.onnx")


def with_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(value, name))
    return model


def weight_as_graph_input(d: Path) -> Path:
    model = mlp()
    kept = [t for t in model.graph.initializer if t.name != "w1"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [5, 4]))
    return save(model, d / "model.onnx")


def weight_computed_at_runtime(d: Path) -> Path:
    """fc1 reads ``Transpose(w1t)``: the weight is a node output, not a constant."""
    model = mlp()
    value = numpy_helper.to_array(model.graph.initializer[0])
    with_initializer(model, "w1", value.T.copy())
    model.graph.initializer[0].name = "w1t"
    model.graph.node.insert(0, helper.make_node("Transpose", ["w1t"], ["w1"], name="transpose_w1"))
    return save(model, d / "model.onnx")


def residual_fan_out(d: Path) -> Path:
    """``h1`` feeds fc2 and a skip Add: the hidden activation fans out."""
    model = mlp()
    model.graph.initializer.append(
        numpy_helper.from_array(np.ones((5, 3), dtype=np.float32), "skip_w")
    )
    model.graph.node[2].output[0] = "main"
    model.graph.node.extend(
        [
            helper.make_node("MatMul", ["h1", "skip_w"], ["skip"], name="skip"),
            helper.make_node("Add", ["main", "skip"], ["out"], name="residual_add"),
        ]
    )
    return save(model, d / "model.onnx")


def two_graph_inputs(d: Path) -> Path:
    model = mlp()
    model.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 3]))
    model.graph.node[2].output[0] = "logits"
    model.graph.node.append(helper.make_node("Mul", ["logits", "mask"], ["out"], name="masking"))
    return save(model, d / "model.onnx")


def no_affine_layer(d: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["out"], name="only_relu")],
        "relu_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", N_FEATURES])],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), d / "m.onnx")


def missing_external_data(d: Path) -> Path:
    path = d / "model.onnx"
    onnx.save(
        mlp(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    (d / "model.onnx.data").unlink()
    return path


def truncated(d: Path) -> Path:
    payload = mlp().SerializeToString()
    (d / "model.onnx").write_bytes(payload[: len(payload) // 2])
    return d / "model.onnx"


def corrupted(d: Path) -> Path:
    payload = bytearray(mlp().SerializeToString())
    payload[8:40] = b"\xff" * 32
    (d / "model.onnx").write_bytes(bytes(payload))
    return d / "model.onnx"


def text_file(d: Path, name: str, text: str) -> Path:
    (d / name).write_text(text)
    return d / name


def vnnlib(d: Path, lines: list[str]) -> Path:
    header = [f"(declare-const X_{i} Real)" for i in range(N_FEATURES)]
    return text_file(d, "prop.vnnlib", "\n".join(header + lines) + "\n")


def npz(d: Path, name: str, **arrays: np.ndarray) -> Path:
    np.savez(d / name, **arrays)
    return d / name


def unwritable_output(d: Path) -> Path:
    """An output path the process cannot create, also when tests run as root."""
    if os.geteuid() != 0:
        locked = d / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked / "out.onnx"
    return Path("/sys/onnx_exact_corpus_out.onnx")  # sysfs refuses new files even to root


def compress_args(model: Path, d: Path, *extra: str) -> list[str]:
    return [str(model), str(d / "out.onnx"), *extra]


RANGE = ("-r", "[0,1]")
ModelArgs = Callable[[Path], list[str]]


def model_case(build: Callable[[Path], Path], *extra: str) -> ModelArgs:
    return lambda d: compress_args(build(d), d, *(extra or RANGE))


def domain_case(*extra: str) -> ModelArgs:
    return lambda d: compress_args(good_model(d), d, *extra)


def saved(model_factory: Callable[[], onnx.ModelProto]) -> Callable[[Path], Path]:
    return lambda d: save(model_factory(), d / "model.onnx")


def opset(version: int | None) -> Callable[[], onnx.ModelProto]:
    return lambda: mlp(opset=version)


def edited(edit: Callable[[onnx.ModelProto], object]) -> Callable[[Path], Path]:
    """The good MLP after ``edit(model)`` changed it in place (``onnx.save`` does not check)."""

    def build(d: Path) -> Path:
        model = mlp()
        edit(model)
        return save(model, d / "model.onnx")

    return build


def w1_raw(payload: Callable[[bytes], bytes]) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        tensor = model.graph.initializer[0]
        tensor.raw_data = payload(tensor.raw_data)

    return edit


def w1_float_data_short(model: onnx.ModelProto) -> None:
    tensor = model.graph.initializer[0]
    values = numpy_helper.to_array(tensor).reshape(-1)[:-1]
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values.tolist())


def w1_declared_double(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].data_type = TensorProto.DOUBLE


def duplicate_w1(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((5, 4), np.float32), "w1"))


def fc2_reads_missing(model: onnx.ModelProto) -> None:
    model.graph.node[2].input[0] = "nothere"


def unproduced_output(model: onnx.ModelProto) -> None:
    model.graph.output.append(helper.make_tensor_value_info("ghost", TensorProto.FLOAT, ["N", 3]))


def output_declared_double(model: onnx.ModelProto) -> None:
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE


def ir_version_99(model: onnx.ModelProto) -> None:
    model.ir_version = 99


def huge_input_dim(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**62


def duplicate_node_name(model: onnx.ModelProto) -> None:
    model.graph.node[2].name = "fc1"


UNIT_BOX = [f"(assert (>= X_{i} 0.0))" for i in range(N_FEATURES)] + [
    f"(assert (<= X_{i} 1.0))" for i in range(N_FEATURES)
]


def npy_claiming_1e11_elements(d: Path) -> Path:
    """A .npy whose header claims shape (2, 5e10) float64 (800 GB) over 64 bytes of data."""
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 50000000000), }"
    header += " " * (117 - len(header)) + "\n"
    path = d / "box.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
    with path.open("ab") as handle:
        handle.write(bytes(64))
    return path


def vnnlib2(d: Path) -> Path:
    """A VNN-LIB 2.0 property (declared network and tensor inputs) over the unit box."""
    lines = [
        "(vnnlib-version <2.0>)",
        f"(declare-network N (declare-input X Real [{N_FEATURES}]) (declare-output Y Real [3]))",
    ] + [f"(assert (<= X[{i}] 1.0))" for i in range(N_FEATURES)]
    return text_file(d, "prop.vnnlib", "\n".join(lines) + "\n")


def wider_model(d: Path) -> Path:
    """The good MLP with 6 input features (its first weight widened to match)."""
    model = with_initializer(mlp(), "w1", np.ones((5, 6), np.float32))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 6
    return save(model, d / "wide.onnx")


# --------------------------------------------------------------------------- the corpus
CASES: list[tuple[str, ModelArgs, int, tuple[str, ...]]] = [
    # -- the model file
    (
        "model file missing",
        lambda d: compress_args(d / "missing.onnx", d, *RANGE),
        2,
        ("missing.onnx", "no such file"),
    ),
    (
        "model path is a directory",
        lambda d: compress_args(d, d / "sub", *RANGE),
        2,
        ("is a directory",),
    ),
    (
        "not ONNX (text)",
        model_case(lambda d: text_file(d, "model.onnx", "hello, I am not a model\n")),
        2,
        ("model.onnx", "not a readable ONNX model"),
    ),
    (
        "empty file",
        model_case(lambda d: text_file(d, "model.onnx", "")),
        2,
        ("model.onnx", "not an ONNX model"),
    ),
    (
        "truncated protobuf",
        model_case(truncated),
        2,
        ("model.onnx", "check the file is complete"),
    ),
    (
        "corrupt protobuf",
        model_case(corrupted),
        2,
        ("model.onnx", "not a readable ONNX model"),
    ),
    (
        "unknown opset (too new)",
        model_case(saved(opset(99))),
        2,
        ("model.onnx", "opset 99", "convert_version"),
    ),
    (
        "unsupported opset (too old)",
        model_case(saved(opset(3))),
        2,
        ("opset 3", "convert_version"),
    ),
    (
        "no default-domain opset",
        model_case(saved(opset(None))),
        2,
        ("imports no opset", "opset_version"),
    ),
    (
        "external data file missing",
        model_case(missing_external_data),
        2,
        ("model.onnx", "external data", "model.onnx.data"),
    ),
    # -- unsupported graphs
    *[
        (
            f"unsupported activation {op}",
            model_case(saved(lambda op=op: mlp(activation=op))),
            2,
            (f"node 'act1' ({op})", "only ReLU"),
        )
        for op in ("Tanh", "LeakyRelu", "Clip", "Sigmoid")
    ],
    (
        "weight is a graph input",
        model_case(weight_as_graph_input),
        2,
        ("node 'fc1' (Gemm)", "'w1'", "not a constant"),
    ),
    (
        "weight computed at run time",
        model_case(weight_computed_at_runtime),
        2,
        ("node 'fc1' (Gemm)", "'w1'", "not a constant"),
    ),
    (
        "residual fan-out",
        model_case(residual_fan_out),
        2,
        ("'h1'", "fan-out"),
    ),
    (
        "two graph inputs",
        model_case(two_graph_inputs),
        2,
        ("'x'", "'mask'", "exactly one"),
    ),
    (
        "NaN weight",
        model_case(
            saved(lambda: with_initializer(mlp(), "w1", np.full((5, 4), np.nan, np.float32)))
        ),
        2,
        ("node 'fc1' (Gemm)", "'w1'", "NaN or Inf"),
    ),
    (
        "Inf bias",
        model_case(
            saved(lambda: with_initializer(mlp(), "b2", np.array([0, np.inf, 0], np.float32)))
        ),
        2,
        ("node 'fc2' (Gemm)", "'b2'", "NaN or Inf"),
    ),
    (
        "float64 input, float32 weights",
        model_case(saved(lambda: mlp(input_type=TensorProto.DOUBLE))),
        2,
        ("node 'fc1' (Gemm)", "float32", "float64", "re-export"),
    ),
    (
        "no Gemm/MatMul at all",
        model_case(no_affine_layer),
        2,
        ("no Gemm or MatMul", "'x'"),
    ),
    # -- malformed models (onnx.save does not check them)
    (
        "initializer raw_data too short",
        model_case(edited(w1_raw(lambda raw: raw[:-4]))),
        2,
        ("model.onnx", "initializer 'w1'", "76 bytes", "need 80", "re-export"),
    ),
    (
        "initializer raw_data too long",
        model_case(edited(w1_raw(lambda raw: raw + bytes(4)))),
        2,
        ("model.onnx", "initializer 'w1'", "84 bytes", "need 80"),
    ),
    (
        "initializer float_data too short",
        model_case(edited(w1_float_data_short)),
        2,
        ("model.onnx", "initializer 'w1'", "19 entries of float_data", "need 20"),
    ),
    (
        "initializer data_type does not match its bytes",
        model_case(edited(w1_declared_double)),
        2,
        ("model.onnx", "initializer 'w1'", "DOUBLE", "need 160"),
    ),
    (
        "duplicate initializer names",
        model_case(edited(duplicate_w1)),
        2,
        ("model.onnx", "2 initializers are named 'w1'", "unique name"),
    ),
    (
        "node reads a missing tensor",
        model_case(edited(fc2_reads_missing)),
        2,
        ("model.onnx", "node 'fc2' (Gemm)", "'nothere'", "no graph input"),
    ),
    (
        "graph output declared double, computed float",
        model_case(edited(output_declared_double)),
        2,
        ("model.onnx", "onnxruntime cannot load it", "elem type differs"),
    ),
    (
        "graph output nothing produces",
        model_case(edited(unproduced_output)),
        2,
        ("model.onnx", "graph output 'ghost'", "no node"),
    ),
    (
        "IR version too new",
        model_case(edited(ir_version_99)),
        2,
        ("model.onnx", "IR version 99", "re-export"),
    ),
    (
        "input dimension of 2^62",
        model_case(edited(huge_input_dim)),
        2,
        ("model.onnx", "input 'x'", str(2**62), "largest weight has 20 entries"),
    ),
    (
        "duplicate node names",
        model_case(edited(duplicate_node_name)),
        2,
        ("model.onnx", "2 nodes are named 'fc1'", "unique name"),
    ),
    # -- the domain
    ("domain missing", domain_case(), 2, ("no input domain", "--input-range")),
    ("lower > upper", domain_case("-r", "[1,0]"), 2, ("'[1,0]'", "exceeds upper")),
    ("NaN bound", domain_case("-r", "[nan,1]"), 2, ("'[nan,1]'", "finite")),
    ("Inf bound", domain_case("-r", "[0,inf]"), 2, ("'[0,inf]'", "finite")),
    ("malformed range: brackets", domain_case("-r", "x:[0,"), 2, ("'x:[0,'", "brackets")),
    ("malformed range: not numbers", domain_case("-r", "[a,b]"), 2, ("'[a,b]'", "not a number")),
    ("malformed range: 3 numbers", domain_case("-r", "[0,1,2]"), 2, ("'[0,1,2]'", "two numbers")),
    ("range for an unknown input", domain_case("-r", "z:[0,1]"), 2, ("'z'", "x:[lo,hi]")),
    (
        "range file missing",
        lambda d: compress_args(good_model(d), d, "--input-range-file", str(d / "nobox.npz")),
        2,
        ("--input-range-file", "nobox.npz", "cannot read"),
    ),
    (
        "range file corrupt",
        lambda d: compress_args(
            good_model(d), d, "--input-range-file", str(text_file(d, "box.npz", "garbage"))
        ),
        2,
        ("--input-range-file", "box.npz", "not a .npz file"),
    ),
    (
        "range file of unknown type",
        lambda d: compress_args(
            good_model(d), d, "--input-range-file", str(text_file(d, "box.txt", "0 1"))
        ),
        2,
        ("box.txt", "unknown file type"),
    ),
    (
        "range file: wrong size",
        lambda d: compress_args(
            good_model(d),
            d,
            "--input-range-file",
            str(npz(d, "box.npz", lower=np.zeros(7), upper=np.ones(7))),
        ),
        2,
        ("box.npz", "shape [7]", "input 'x'"),
    ),
    (
        "range file: lower > upper",
        lambda d: compress_args(
            good_model(d),
            d,
            "--input-range-file",
            str(npz(d, "box.npz", lower=np.ones(4), upper=np.zeros(4))),
        ),
        2,
        ("box.npz", "lower[0]", "empty"),
    ),
    (
        "range file: NaN",
        lambda d: compress_args(
            good_model(d),
            d,
            "--input-range-file",
            str(text_file(d, "box.json", '{"lower": [0, 0, 0, 0], "upper": [1, 1, NaN, 1]}')),
        ),
        2,
        ("box.json", "upper[2]", "not finite"),
    ),
    (
        "range file: missing arrays",
        lambda d: compress_args(
            good_model(d), d, "--input-range-file", str(npz(d, "box.npz", lo=np.zeros(4)))
        ),
        2,
        ("box.npz", "missing array(s) lower, upper"),
    ),
    (
        "empty VNN-LIB box",
        lambda d: compress_args(
            good_model(d),
            d,
            "--vnnlib",
            str(
                vnnlib(
                    d,
                    ["(assert (>= X_0 1.0))", "(assert (<= X_0 0.0))"]
                    + [f"(assert (<= X_{i} 1.0))" for i in range(1, N_FEATURES)]
                    + [f"(assert (>= X_{i} 0.0))" for i in range(1, N_FEATURES)],
                )
            ),
        ),
        2,
        ("prop.vnnlib", "input box is empty", "X_0"),
    ),
    (
        "VNN-LIB without input bounds",
        lambda d: compress_args(
            good_model(d), d, "--vnnlib", str(vnnlib(d, ["(assert (<= Y_0 0.0))"]))
        ),
        2,
        ("prop.vnnlib", "no bounds on the inputs"),
    ),
    (
        "VNN-LIB file missing",
        lambda d: compress_args(good_model(d), d, "--vnnlib", str(d / "nothere.vnnlib")),
        2,
        ("--vnnlib", "nothere.vnnlib", "cannot read"),
    ),
    (
        "VNN-LIB NaN bound",
        lambda d: compress_args(
            good_model(d), d, "--vnnlib", str(vnnlib(d, [*UNIT_BOX, "(assert (<= X_0 nan))"]))
        ),
        2,
        ("prop.vnnlib", "'nan'", "not a finite number"),
    ),
    (
        "VNN-LIB 2.0 property",
        lambda d: compress_args(good_model(d), d, "--vnnlib", str(vnnlib2(d))),
        2,
        ("prop.vnnlib", "VNN-LIB 2.0", "--input-range-file"),
    ),
    (
        "--input-range with --vnnlib",
        lambda d: compress_args(good_model(d), d, *RANGE, "--vnnlib", str(vnnlib(d, UNIT_BOX))),
        2,
        ("--input-range and --vnnlib", "use one of them"),
    ),
    (
        "bounds that overflow float64",
        domain_case("-r", "[-1e308,1e308]"),
        2,
        ("'[-1e308,1e308]'", "outside the accepted range", "3.4e+38"),
    ),
    (
        "box on which the model overflows float32",
        domain_case("-r", "[-1e38,1e38]"),
        2,
        ("[-1e38,1e38]", "overflows to Inf/NaN on output 'out'", "smaller bounds"),
    ),
    (
        "range file: JSON nested 100k deep",
        lambda d: compress_args(
            good_model(d),
            d,
            "--input-range-file",
            str(text_file(d, "box.json", '{"lower": ' + "[" * 100_000 + "]" * 100_000 + "}")),
        ),
        2,
        ("box.json", "nested too deeply"),
    ),
    (
        "range file: .npy header claiming 1e11 elements",
        lambda d: compress_args(
            good_model(d), d, "--input-range-file", str(npy_claiming_1e11_elements(d))
        ),
        2,
        ("box.npy", "header claims shape (2, 50000000000)", "holds 64 bytes"),
    ),
    *[
        (
            f"check: {role} model truncated",
            lambda d, role=role: [
                "check",
                *([str(truncated(d)), str(wider_model(d))][:: 1 if role == "reference" else -1]),
                *RANGE,
            ],
            2,
            ("model.onnx", "not a readable ONNX model", "check the file is complete"),
        )
        for role in ("reference", "candidate")
    ],
    (
        "check: repeated node names in the candidate",
        lambda d: ["check", str(wider_model(d)), str(edited(duplicate_node_name)(d)), *RANGE],
        2,
        ("model.onnx", "2 nodes are named 'fc1'"),
    ),
    (
        "check: the two models' input sizes differ",
        lambda d: ["check", str(good_model(d)), str(wider_model(d)), *RANGE],
        2,
        ("input sizes differ", "model.onnx", "4 features", "wide.onnx", "['N', 6]"),
    ),
    # -- the output path and options
    (
        "output path equals the input",
        lambda d: [str(good_model(d)), str(d / "model.onnx"), *RANGE],
        2,
        ("model.onnx", "is the input model"),
    ),
    (
        "output path is a directory",
        lambda d: [str(good_model(d)), str(d), *RANGE],
        2,
        ("is a directory",),
    ),
    (
        "output folder missing",
        lambda d: [str(good_model(d)), str(d / "nowhere" / "out.onnx"), *RANGE],
        2,
        ("nowhere", "does not exist"),
    ),
    (
        "output unwritable",
        lambda d: [str(good_model(d)), str(unwritable_output(d)), *RANGE],
        2,
        ("out.onnx", "cannot write the model"),
    ),
    ("unknown --method", domain_case(*RANGE, "--method", "magic"), 2, ("--method 'magic'",)),
    ("bad --atol", domain_case(*RANGE, "--atol", "tiny"), 2, ("--atol 'tiny'",)),
    ("--atol nan", domain_case(*RANGE, "--atol", "nan"), 2, ("--atol 'nan'", "finite")),
    ("--rtol nan", domain_case(*RANGE, "--rtol", "nan"), 2, ("--rtol 'nan'", "finite")),
    ("--atol inf", domain_case(*RANGE, "--atol", "inf"), 2, ("--atol 'inf'", "finite")),
    (
        "--atol for an output the model lacks",
        domain_case(*RANGE, "--atol", "1e-5", "logits:1e-4"),
        2,
        ("--atol logits:0.0001", "no output 'logits'", "'out'"),
    ),
    ("empty --json path", domain_case(*RANGE, "--json", ""), 2, ("--json ''", "empty")),
    (
        "--max-memory 1e400",
        domain_case(*RANGE, "--max-memory", "1e400"),
        2,
        ("--max-memory '1e400'", "not a finite size"),
    ),
    ("negative --time-limit", domain_case(*RANGE, "--time-limit", "-1"), 2, ("time", "-1")),
    ("unknown option", domain_case(*RANGE, "--bogus"), 2, ("--bogus",)),
    ("output argument missing", lambda d: [str(good_model(d)), *RANGE], 2, ("'OUT'",)),
    ("negative --seed", domain_case(*RANGE, "--seed", "-1"), 2, ("--seed",)),
    # -- written paths that would clobber a read or a special file (tests/test_output_paths.py)
    (
        "--json is the input model",
        lambda d: ["analyze", str(good_model(d)), *RANGE, "--json", str(d / "model.onnx")],
        2,
        ("model.onnx", "is the input model"),
    ),
    (
        "--report is the output model",
        lambda d: [*compress_args(good_model(d), d, *RANGE), "--report", str(d / "out.onnx")],
        2,
        ("out.onnx", "is the output model"),
    ),
    (
        "output's data file is the input's data file",
        lambda d: [str(external_model(d, "out.onnx.data")), str(d / "out.onnx"), *RANGE],
        2,
        ("out.onnx.data", "is the input model's external data"),
    ),
    (
        "output is the input's data file",
        lambda d: [str(external_model(d, "w.bin")), str(d / "w.bin"), *RANGE],
        2,
        ("w.bin", "is the input model's external data"),
    ),
    (
        "output is a FIFO",
        lambda d: [str(good_model(d)), (os.mkfifo(d / "pipe"), str(d / "pipe"))[1], *RANGE],
        2,
        ("pipe", "is a FIFO"),
    ),
    (
        "output names a missing folder",
        lambda d: [str(good_model(d)), f"{d / 'newdir'}/", *RANGE],
        2,
        ("newdir/", "no such folder"),
    ),
    (
        "--report in a missing folder",
        lambda d: [*compress_args(good_model(d), d, *RANGE), "--report", str(d / "no" / "r.json")],
        2,
        ("r.json", "does not exist"),
    ),
]


def external_model(d: Path, location: str) -> Path:
    """The good MLP saved as ``d/model.onnx`` with its weights in the external file ``location``."""
    path = d / "model.onnx"
    onnx.save(mlp(), path, save_as_external_data=True, location=location, size_threshold=0)
    return path


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    ("make_args", "expected_exit", "expected"),
    [pytest.param(make, code, needles, id=name) for name, make, code, needles in CASES],
)
def test_bad_input(tmp_path, make_args, expected_exit, expected):
    args = make_args(tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = run_cli(args)
    lines = err.strip().splitlines()
    assert code == expected_exit, err
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in err
    for needle in expected:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert _snapshot(tmp_path) == before, "the run left a file behind"


def test_verbose_adds_details_but_keeps_the_exit_code(tmp_path):
    code, _, err = run_cli(
        [*compress_args(weight_as_graph_input(tmp_path), tmp_path), "-r", "[0,1]", "-v"]
    )
    assert code == 2
    assert err.startswith(ERROR_PREFIX)
    assert "Traceback" in err  # --verbose shows the details


def corpus_table(folder: Path) -> str:
    """The corpus as a markdown table (case, exit code, message), run in ``folder``."""
    rows = ["| case | exit | message |", "|---|---|---|"]
    for index, (name, make_args, _, _) in enumerate(CASES):
        case_dir = folder / f"case{index}"
        case_dir.mkdir()
        code, _, err = run_cli(make_args(case_dir))
        message = err.strip().replace(str(case_dir), "D").replace("|", "\\|")
        rows.append(f"| {name} | {code} | `{message}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        sys.stdout.write(corpus_table(Path(scratch)) + "\n")
