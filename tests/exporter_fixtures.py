"""Small ReLU MLPs written in the exact op patterns of real exporters (see exporters.md).

Every builder returns ``(model, lower, upper)``: an in-memory ``onnx.ModelProto`` and a float64 box
over the *flattened* raw input. The weights are seeded and random, except that in each hidden layer
one unit has a strongly negative bias (stably inactive on the box) and one a strongly positive bias
(stably active), so compression always has something to do. ``ALL_BUILDERS`` maps a short name to
each builder, for the reader/writer tests, the end-to-end tests and fuzzers.

``save_external(model, path)`` writes a model the way torch's dynamo exporter does (tensors in
``<path>.data``); the ``torch_dynamo`` builder is meant to be saved with it. ``gemm_mlp`` is the
plain Gemm/Relu model for tests that need *a* small ReLU network rather than an exporter's pattern.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZES = (6, 8, 8, 3)
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


def mlp_parameters(
    sizes: Sequence[int] = SIZES, seed: int = 0, dtype=np.float32, pinned: bool = True
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded weights ``W (out, in)`` and biases per layer, hidden units 0 and 1 ``pinned``.

    Pinned, hidden unit 0 is dead and unit 1 always active: with inputs in [-1, 1] and weights of
    scale ``1/sqrt(in)``, a hidden pre-activation stays well inside ``±6``, so biases of ``∓20``
    decide the sign of units 0 and 1 on any box used here. Pinning only overwrites those biases;
    every other value is the same either way.
    """
    rng = np.random.default_rng(seed)
    layers = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        weight = rng.normal(0.0, 1.0 / np.sqrt(n_in), size=(n_out, n_in))
        bias = rng.normal(0.0, 0.1, size=n_out)
        if pinned and k < len(sizes) - 2 and n_out >= 2:
            bias[0], bias[1] = -20.0, 20.0
        layers.append((weight.astype(dtype), bias.astype(dtype)))
    return layers


def unit_box(n: int) -> tuple[np.ndarray, np.ndarray]:
    return -np.ones(n), np.ones(n)


class GraphBuilder:
    """A terse ``onnx.helper`` wrapper: constants become initializers, nodes get unique outputs."""

    def __init__(self, dtype=np.float32) -> None:
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, value, name: str | None = None, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype or self.dtype)
        name = name or self.fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def constant_node(self, value, name: str | None = None, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype or self.dtype)
        out = name or self.fresh("constant_out")
        self.nodes.append(
            helper.make_node(
                "Constant",
                [],
                [out],
                name=self.fresh("Constant"),
                value=numpy_helper.from_array(array),
            )
        )
        return out

    def node(
        self,
        op: str,
        inputs: list[str],
        name: str | None = None,
        output: str | None = None,
        n_outputs: int = 1,
        domain: str = "",
        **attrs,
    ) -> str:
        outputs = [output or self.fresh(f"{op}_out")] + [
            self.fresh(f"{op}_extra") for _ in range(n_outputs - 1)
        ]
        self.nodes.append(
            helper.make_node(
                op,
                inputs,
                outputs,
                name=name if name is not None else self.fresh(op),
                domain=domain,
                **attrs,
            )
        )
        return outputs[0]

    def model(
        self,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        opset: int = 17,
        ir_version: int | None = None,
        ml_opset: int | None = None,
        initializers_as_inputs: bool = False,
        producer: str = "onnx-exact-fixtures",
    ) -> onnx.ModelProto:
        graph_inputs = list(inputs)
        if initializers_as_inputs:
            graph_inputs += [
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                for t in self.initializers
            ]
        graph = helper.make_graph(
            self.nodes, "mlp", graph_inputs, outputs, initializer=self.initializers
        )
        opsets = [helper.make_opsetid("", opset)]
        if ml_opset is not None:
            opsets.append(helper.make_opsetid("ai.onnx.ml", ml_opset))
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        if ir_version is not None:
            model.ir_version = ir_version
        else:
            model.ir_version = min(model.ir_version, 8 if opset <= 17 else 9)
        onnx.checker.check_model(model)
        return model

    def tensor(self, name: str, shape, dtype=None) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, ONNX_TYPE[np.dtype(dtype or self.dtype)], shape)


def save_external(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Save like torch dynamo: every tensor in one ``<name>.data`` file next to the model.

    ``onnx.save_model`` moves the tensors of the proto it is given, so a copy is saved.
    """
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    onnx.save_model(
        model_copy,
        os.fspath(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=os.path.basename(os.fspath(path)) + ".data",
        size_threshold=0,
    )


# --------------------------------------------------------------------------- plain Gemm MLP
def gemm_mlp(
    sizes: Sequence[int] = SIZES,
    seed: int = 0,
    *,
    dtype=np.float32,
    pinned: bool = True,
    params: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> onnx.ModelProto:
    """A plain ``x -> Gemm -> Relu -> ... -> Gemm`` ONNX model with seeded or given weights.

    The exporter builders below reproduce real exporters' names and op patterns. Many tests
    (command line, faults, properties) only need *some* small fully connected ReLU network as an
    ONNX model; they share this one so that its layout, and the tensor names they patch, are
    defined in one place.

    Parameters
    ----------
    sizes
        Layer widths, input first: ``(4, 8, 3)`` has one hidden layer of 8 units.
    seed
        Seed of the random weights, drawn by :func:`mlp_parameters` (scale ``1/sqrt(in)``).
    dtype
        Element type of the input, the weights and the output (float32 or float64).
    pinned
        Pin hidden unit 0 stably inactive and unit 1 stably active (see :func:`mlp_parameters`);
        False keeps every bias random.
    params
        Explicit ``(weight (out, in), bias (out,))`` pairs, cast to ``dtype``, used instead of
        seeded ones; ``sizes``, ``seed`` and ``pinned`` are then unused.

    Returns
    -------
    onnx.ModelProto
        Opset 17, IR version 8, checked. Input ``x`` of shape ``["N", sizes[0]]``. Layer ``k``
        (from 0) has initializers ``w{k}`` and ``b{k}`` and a Gemm ``fc{k}`` (``transB=1``) with
        output ``y{k}``, followed on every layer but the last by a Relu ``relu{k}`` with output
        ``h{k}``. The graph output is the last layer's ``y{k}``.
    """
    if params is None:
        params = mlp_parameters(sizes, seed, dtype, pinned)
    g = GraphBuilder(dtype)
    x = "x"
    for k, (weight, bias) in enumerate(params):
        x = g.node(
            "Gemm",
            [x, g.const(weight, f"w{k}"), g.const(bias, f"b{k}")],
            name=f"fc{k}",
            output=f"y{k}",
            transB=1,
        )
        if k < len(params) - 1:
            x = g.node("Relu", [x], name=f"relu{k}", output=f"h{k}")
    n_in, n_out = np.shape(params[0][0])[1], np.shape(params[-1][0])[0]
    return g.model([g.tensor("x", ["N", n_in])], [g.tensor(x, ["N", n_out])])


# --------------------------------------------------------------------------- torch legacy
def _gemm_chain(
    g: GraphBuilder, x: str, params, output: str, prefix: str = "fc", **gemm_attrs
) -> str:
    """Gemm(transB=1) → Relu → ... → Gemm, torch-legacy naming, last output named ``output``."""
    for k, (weight, bias) in enumerate(params):
        last = k == len(params) - 1
        w = g.const(weight, f"{prefix}{k + 1}.weight")
        b = g.const(bias, f"{prefix}{k + 1}.bias")
        x = g.node(
            "Gemm",
            [x, w, b],
            name=f"/{prefix}{k + 1}/Gemm",
            output=output if last else f"/{prefix}{k + 1}/Gemm_output_0",
            alpha=1.0,
            beta=1.0,
            transB=1,
            **gemm_attrs,
        )
        if not last:
            x = g.node("Relu", [x], name=f"/relu{k + 1}/Relu", output=f"/relu{k + 1}/Relu_output_0")
    return x


def torch_legacy_gemm():
    """torch legacy, 2-D input, static batch: input named ``onnx::Gemm_0``."""
    g = GraphBuilder()
    _gemm_chain(g, "onnx::Gemm_0", mlp_parameters(seed=1), "output")
    model = g.model([g.tensor("onnx::Gemm_0", [1, 6])], [g.tensor("output", [1, 3])])
    return (model, *unit_box(6))


def torch_legacy_gemm_dynamic():
    """torch legacy with ``dynamic_axes``: named batch dim."""
    g = GraphBuilder()
    _gemm_chain(g, "input", mlp_parameters(seed=2), "output")
    model = g.model([g.tensor("input", ["batch_size", 6])], [g.tensor("output", ["batch_size", 3])])
    return (model, *unit_box(6))


def _matmul_chain(
    g: GraphBuilder, x: str, params, output: str, bias: bool = True, bias_shape=None
) -> str:
    """MatMul(x, W[i,o]) (+ Add(b)) → Relu → ..., weights pre-transposed like torch/tf2onnx."""
    for k, (weight, b) in enumerate(params):
        last = k == len(params) - 1
        w = g.const(weight.T.copy(), f"onnx::MatMul_{100 + k}")
        x = g.node("MatMul", [x, w], name=f"/fc{k + 1}/MatMul")
        if bias:
            c = g.const(b.reshape(bias_shape(b.size)) if bias_shape else b, f"fc{k + 1}.bias")
            x = g.node("Add", [c, x] if k % 2 else [x, c], name=f"/fc{k + 1}/Add")
        if last:
            g.nodes[-1].output[0] = output
            x = output
        else:
            x = g.node("Relu", [x], name=f"/relu{k + 1}/Relu")
    return x


def torch_legacy_rank1():
    """torch legacy on a 1-D input: MatMul + Add, no batch dimension (bias in both Add slots)."""
    g = GraphBuilder()
    _matmul_chain(g, "input", mlp_parameters(seed=3), "output")
    model = g.model([g.tensor("input", [6])], [g.tensor("output", [3])])
    return (model, *unit_box(6))


def torch_legacy_rank3():
    """torch legacy on ``[batch, 1, features]``: MatMul + Add keep the middle dim."""
    g = GraphBuilder()
    _matmul_chain(g, "input", mlp_parameters(seed=4), "output")
    model = g.model([g.tensor("input", ["batch", 1, 6])], [g.tensor("output", ["batch", 1, 3])])
    return (model, *unit_box(6))


def torch_legacy_bias_free():
    """torch legacy ``bias=False``: bare MatMul layers, on the box [0.1, 1]^6."""
    g = GraphBuilder()
    params = []
    for k, (weight, bias) in enumerate(mlp_parameters(seed=5)):
        if k < 2:  # positive inputs: these signs make unit 0 strictly dead and unit 1 live
            weight[0], weight[1] = -np.abs(weight[0]), np.abs(weight[1])
        params.append((weight, np.zeros_like(bias)))
    _matmul_chain(g, "input", params, "output", bias=False)
    model = g.model([g.tensor("input", ["N", 6])], [g.tensor("output", ["N", 3])])
    return (model, np.full(6, 0.1), np.ones(6))


def torch_legacy_gemm_batchnorm():
    """Gemm → BatchNormalization → Relu; BN 1 untrained with parameters deduplicated via Identity."""
    g = GraphBuilder()
    rng = np.random.default_rng(6)
    params = mlp_parameters(seed=6)
    x = "input"
    for k, (weight, bias) in enumerate(params):
        w = g.const(weight, f"fc{k + 1}.weight")
        b = g.const(bias, f"fc{k + 1}.bias")
        x = g.node("Gemm", [x, w, b], name=f"/fc{k + 1}/Gemm", alpha=1.0, beta=1.0, transB=1)
        if k == len(params) - 1:
            g.nodes[-1].output[0] = "output"
            break
        n = weight.shape[0]
        if k == 0:
            ones = g.const(np.ones(n), "bn1.weight")
            zeros = g.const(np.zeros(n), "bn1.bias")
            stats = [ones, zeros, g.node("Identity", [zeros]), g.node("Identity", [ones])]
        else:
            stats = [
                g.const(rng.uniform(0.5, 1.5, n), f"bn{k + 1}.weight"),
                g.const(rng.normal(0, 0.2, n), f"bn{k + 1}.bias"),
                g.const(rng.normal(0, 0.2, n), f"bn{k + 1}.running_mean"),
                g.const(rng.uniform(0.5, 2.0, n), f"bn{k + 1}.running_var"),
            ]
        x = g.node(
            "BatchNormalization", [x, *stats], name=f"/bn{k + 1}/BatchNormalization", epsilon=1e-5
        )
        x = g.node("Relu", [x], name=f"/relu{k + 1}/Relu")
    model = g.model([g.tensor("input", ["batch", 6])], [g.tensor("output", ["batch", 3])])
    return (model, *unit_box(6))


def _softmax_tail(op: str, seed: int):
    g = GraphBuilder()
    _gemm_chain(g, "input", mlp_parameters(seed=seed), "logits")
    g.node(op, ["logits"], name=f"/{op}", output="output", axis=1)
    model = g.model([g.tensor("input", ["batch", 6])], [g.tensor("output", ["batch", 3])])
    return (model, *unit_box(6))


def torch_softmax_tail():
    """... → Gemm → Softmax: the tail is left untouched."""
    return _softmax_tail("Softmax", 7)


def torch_logsoftmax_tail():
    """... → Gemm → LogSoftmax."""
    return _softmax_tail("LogSoftmax", 8)


def torch_flatten_dropout():
    """Flatten(axis=1) on ``[batch, 2, 3]``, and a Dropout (inference) between layers."""
    g = GraphBuilder()
    params = mlp_parameters(seed=9)
    x = g.node("Flatten", ["input"], name="/flatten/Flatten", axis=1)
    for k, (weight, bias) in enumerate(params):
        x = g.node("Gemm", [x, g.const(weight), g.const(bias)], name=f"/fc{k + 1}/Gemm", transB=1)
        if k == len(params) - 1:
            g.nodes[-1].output[0] = "output"
            break
        x = g.node("Relu", [x], name=f"/relu{k + 1}/Relu")
        if k == 0:
            ratio = g.const(0.5, "ratio")
            x = g.node("Dropout", [x, ratio], name="/dropout/Dropout", n_outputs=2)
    model = g.model([g.tensor("input", ["batch", 2, 3])], [g.tensor("output", ["batch", 3])])
    return (model, *unit_box(6))


# --------------------------------------------------------------------------- torch dynamo
def torch_dynamo():
    """dynamo: Reshape(allowzero=1) flatten, Gemm without alpha/beta attributes, a 2-input Gemm
    (``bias=False``) and node ``metadata_props``; save it with :func:`save_external`."""
    g = GraphBuilder()
    params = mlp_parameters(seed=10)
    shape = g.const(np.array([-1, 6]), "val_0", dtype=np.int64)
    x = g.node("Reshape", ["x", shape], name="node_view", output="view", allowzero=1)
    for k, (weight, bias) in enumerate(params):
        inputs = [x, g.const(weight, f"fc{k + 1}.weight")]
        if k != 1:
            inputs.append(g.const(bias, f"fc{k + 1}.bias"))
        last = k == len(params) - 1
        x = g.node(
            "Gemm",
            inputs,
            name=f"node_linear_{k}",
            output="linear_out" if last else f"linear_{k}",
            transB=1,
        )
        entry = g.nodes[-1].metadata_props.add()
        entry.key, entry.value = "pkg.torch.onnx.stack_trace", f"fc{k + 1}"
        if not last:
            x = g.node("Relu", [x], name=f"node_relu_{k}", output=f"relu_{k}")
    model = g.model([g.tensor("x", ["s77", 2, 3])], [g.tensor("linear_out", ["s77", 3])], opset=18)
    return (model, *unit_box(6))


# --------------------------------------------------------------------------- Keras / tf2onnx
def _keras_dense(g: GraphBuilder, x: str, weight, bias, name: str, add_bias: bool = True) -> str:
    w = g.const(
        weight.T.copy(), f"StatefulPartitionedCall/sequential/{name}/MatMul/ReadVariableOp:0"
    )
    x = g.node("MatMul", [x, w], name=f"StatefulPartitionedCall/sequential/{name}/MatMul")
    if add_bias:
        b = g.const(bias, f"StatefulPartitionedCall/sequential/{name}/BiasAdd/ReadVariableOp:0")
        x = g.node("Add", [x, b], name=f"StatefulPartitionedCall/sequential/{name}/BiasAdd")
    return x


def keras_tf2onnx():
    """tf2onnx: MatMul(W[i,o]) + Add, zero bias drops the Add, ``unk__N`` batch, Identity output."""
    g = GraphBuilder()
    params = mlp_parameters(seed=11)
    x = "input_1"
    for k, (weight, bias) in enumerate(params):
        x = _keras_dense(g, x, weight, bias, f"dense_{k}", add_bias=k != 1)
        if k < len(params) - 1:
            x = g.node("Relu", [x], name=f"StatefulPartitionedCall/sequential/dense_{k}/Relu")
    g.node("Identity", [x], name="Identity", output="Identity:0")
    model = g.model(
        [g.tensor("input_1", ["unk__12", 6])], [g.tensor("Identity:0", ["unk__13", 3])], opset=13
    )
    return (model, *unit_box(6))


def keras_batchnorm():
    """Keras BN after Dense becomes Mul + Add before the Relu."""
    g = GraphBuilder()
    rng = np.random.default_rng(12)
    params = mlp_parameters(seed=12)
    x = "input_1"
    for k, (weight, bias) in enumerate(params):
        x = _keras_dense(g, x, weight, bias, f"dense_{k}")
        if k < len(params) - 1:
            n = weight.shape[0]
            x = g.node("Mul", [x, g.const(rng.uniform(0.5, 1.5, n))], name=f"bn_{k}/mul")
            x = g.node("Add", [x, g.const(rng.normal(0, 0.2, n))], name=f"bn_{k}/add")
            x = g.node("Relu", [x], name=f"dense_{k}/Relu")
    g.nodes[-1].output[0] = "dense_2"
    model = g.model(
        [g.tensor("input_1", ["unk__6", 6])], [g.tensor("dense_2", ["unk__7", 3])], opset=13
    )
    return (model, *unit_box(6))


def keras_batchnorm_after_relu():
    """Dense(activation='relu') then BatchNormalization: Mul + Add between a Relu and the next MatMul."""
    g = GraphBuilder()
    rng = np.random.default_rng(13)
    params = mlp_parameters(seed=13)
    x = "input_1"
    for k, (weight, bias) in enumerate(params):
        x = _keras_dense(g, x, weight, bias, f"dense_{k}")
        if k < len(params) - 1:
            n = weight.shape[0]
            x = g.node("Relu", [x], name=f"dense_{k}/Relu")
            x = g.node("Mul", [g.const(rng.uniform(0.5, 1.5, n)), x], name=f"bn_{k}/mul")
            x = g.node("Add", [x, g.const(rng.normal(0, 0.2, n))], name=f"bn_{k}/add")
    g.nodes[-1].output[0] = "dense_2"
    model = g.model(
        [g.tensor("input_1", ["unk__6", 6])], [g.tensor("dense_2", ["unk__7", 3])], opset=13
    )
    return (model, *unit_box(6))


def keras_normalization():
    """Keras ``Normalization``: Sub(mean) + Mul(1/std), the constants also listed as graph inputs."""
    g = GraphBuilder()
    mean = g.const(np.linspace(-0.5, 0.5, 6), "normalization/sub/y:0")
    inv_std = g.const(np.linspace(0.5, 2.0, 6), "normalization/Sqrt:0")
    x = g.node("Sub", ["input_1", mean], name="normalization/sub")
    x = g.node("Mul", [x, inv_std], name="normalization/truediv")
    params = mlp_parameters(seed=14)
    for k, (weight, bias) in enumerate(params):
        x = _keras_dense(g, x, weight, bias, f"dense_{k}")
        if k < len(params) - 1:
            x = g.node("Relu", [x], name=f"dense_{k}/Relu")
    g.nodes[-1].output[0] = "dense_2"
    model = g.model(
        [g.tensor("input_1", ["unk__6", 6])],
        [g.tensor("dense_2", ["unk__7", 3])],
        opset=13,
        initializers_as_inputs=True,
    )
    return (model, *unit_box(6))


# --------------------------------------------------------------------------- skl2onnx
def _skl_layers(g: GraphBuilder, x: str, params) -> str:
    for k, (weight, bias) in enumerate(params):
        x = g.node("MatMul", [x, g.const(weight.T.copy(), f"coefficient{k}")], name=f"MatMul{k}")
        x = g.node("Add", [x, g.const(bias.reshape(1, -1), f"intercepts{k}")], name=f"Add{k}")
        if k < len(params) - 1:
            x = g.node("Relu", [x], name=f"Relu{k}")
    return x


def skl2onnx_regressor(dtype=np.float32):
    """MLPRegressor: Cast → MatMul → Add((1, n)) → Relu → ... → Reshape([-1, 1]); anonymous batch."""
    g = GraphBuilder(dtype)
    x = g.node("Cast", ["X"], name="Cast", to=ONNX_TYPE[np.dtype(dtype)])
    x = _skl_layers(g, x, mlp_parameters((6, 8, 8, 1), seed=15, dtype=dtype))
    shape = g.const(np.array([-1, 1]), "shape_tensor", dtype=np.int64)
    g.node("Reshape", [x, shape], name="Reshape", output="variable")
    model = g.model(
        [g.tensor("X", [None, 6])], [g.tensor("variable", [None, 1])], opset=15, ml_opset=1
    )
    return (model, *unit_box(6))


def skl2onnx_regressor_double():
    """skl2onnx with a double input: the whole graph is double."""
    return skl2onnx_regressor(np.float64)


def skl2onnx_classifier():
    """MLPClassifier: ... → Softmax → ArgMax (label) and ZipMap (sequence of maps, ai.onnx.ml)."""
    g = GraphBuilder()
    x = g.node("Cast", ["X"], name="Cast", to=TensorProto.FLOAT)
    x = _skl_layers(g, x, mlp_parameters(seed=16))
    probabilities = g.node("Softmax", [x], name="Softmax", output="probabilities", axis=-1)
    g.node("ArgMax", [probabilities], name="ArgMax", output="label", axis=1, keepdims=0)
    g.node(
        "ZipMap",
        [probabilities],
        name="ZipMap",
        output="output_probability",
        domain="ai.onnx.ml",
        classlabels_int64s=[0, 1, 2],
    )
    zipmap_type = helper.make_sequence_type_proto(
        helper.make_map_type_proto(
            TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, None)
        )
    )
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        helper.make_value_info("output_probability", zipmap_type),
    ]
    model = g.model([g.tensor("X", [None, 6])], outputs, opset=15, ml_opset=1)
    return (model, *unit_box(6))


def skl2onnx_scaler():
    """StandardScaler in the pipeline: ai.onnx.ml ``Scaler`` before the first layer."""
    g = GraphBuilder()
    x = g.node(
        "Scaler",
        ["X"],
        name="Scaler",
        domain="ai.onnx.ml",
        offset=np.linspace(-0.3, 0.3, 6).tolist(),
        scale=np.linspace(0.5, 1.5, 6).tolist(),
    )
    x = _skl_layers(g, x, mlp_parameters(seed=17))
    g.nodes[-1].output[0] = "variable"
    model = g.model(
        [g.tensor("X", [None, 6])], [g.tensor("variable", [None, 3])], opset=15, ml_opset=1
    )
    return (model, *unit_box(6))


# --------------------------------------------------------------------------- onnxsim, MATLAB, VNN-COMP
def onnxsim_reshape_gemm():
    """onnxsim on a rank-3 MLP with a fixed shape: Reshape → Gemm → Reshape → Relu → ..."""
    g = GraphBuilder()
    params = mlp_parameters(seed=18)
    x = "input"
    for k, (weight, bias) in enumerate(params):
        n_in, n_out = weight.shape[1], weight.shape[0]
        x = g.node(
            "Reshape", [x, g.const(np.array([1, n_in]), dtype=np.int64)], name=f"Reshape_{2 * k}"
        )
        x = g.node("Gemm", [x, g.const(weight), g.const(bias)], name=f"Gemm_{k}", transB=1)
        x = g.node(
            "Reshape",
            [x, g.const(np.array([1, 1, n_out]), dtype=np.int64)],
            name=f"Reshape_{2 * k + 1}",
        )
        if k < len(params) - 1:
            x = g.node("Relu", [x], name=f"Relu_{k}")
    g.nodes[-1].output[0] = "output"
    model = g.model([g.tensor("input", [1, 1, 6])], [g.tensor("output", [1, 1, 3])])
    return (model, *unit_box(6))


def matlab_acasxu():
    """MATLAB converter (ACAS Xu): IR 3, opset 8, initializers listed as inputs, Sub → Flatten."""
    g = GraphBuilder()
    avg = g.const(np.linspace(-0.2, 0.2, 6).reshape(1, 1, 1, 6), "input_AvgImg")
    x = g.node("Sub", ["input", avg], name="input_Sub", output="input_Sub")
    x = g.node("Flatten", [x], name="Operation_1_Flatten", output="Operation_1_Flatten", axis=1)
    params = mlp_parameters(seed=19)
    for k, (weight, bias) in enumerate(params):
        stem = f"Operation_{k + 1}" if k < len(params) - 1 else f"linear_{k + 1}"
        x = g.node(
            "MatMul",
            [x, g.const(weight.T.copy(), f"{stem}_MatMul_W")],
            name=f"{stem}_MatMul",
            output=f"{stem}_MatMul",
        )
        x = g.node(
            "Add", [x, g.const(bias, f"{stem}_Add_B")], name=f"{stem}_Add", output=f"{stem}_Add"
        )
        if k < len(params) - 1:
            x = g.node("Relu", [x], name=f"relu_{k + 1}", output=f"relu_{k + 1}")
    model = g.model(
        [g.tensor("input", [1, 1, 1, 6])],
        [g.tensor(x, [1, 3])],
        opset=8,
        ir_version=3,
        initializers_as_inputs=True,
        producer="MATLAB Deep Learning Toolbox Converter for ONNX Model Format",
    )
    return (model, *unit_box(6))


def vnncomp_left_weight(dtype=np.float32):
    """VNN-COMP / nn4sys style: ``MatMul(W, x)`` with the weight on the left and a 1-D input."""
    g = GraphBuilder(dtype)
    params = mlp_parameters(seed=20, dtype=dtype)
    x = "X"
    for k, (weight, bias) in enumerate(params):
        x = g.node("MatMul", [g.const(weight), x], name=f"MatMul_{k}")
        x = g.node("Add", [x, g.const(bias)], name=f"Add_{k}")
        if k < len(params) - 1:
            x = g.node("Relu", [x], name=f"Relu_{k}")
    g.nodes[-1].output[0] = "Y"
    model = g.model([g.tensor("X", [6])], [g.tensor("Y", [3])], opset=13)
    return (model, *unit_box(6))


def vnncomp_left_weight_double():
    """The float64 variant (such models exist in VNN-COMP)."""
    return vnncomp_left_weight(np.float64)


def never2_gemm_transb0():
    """NeVer2: ``Gemm(transB=0)`` with ``W[i,o]`` stored."""
    g = GraphBuilder()
    x = "X"
    params = mlp_parameters(seed=21)
    for k, (weight, bias) in enumerate(params):
        x = g.node("Gemm", [x, g.const(weight.T.copy()), g.const(bias)], name=f"Gemm_{k}", transB=0)
        if k < len(params) - 1:
            x = g.node("Relu", [x], name=f"Relu_{k}")
    g.nodes[-1].output[0] = "Y"
    model = g.model([g.tensor("X", [1, 6])], [g.tensor("Y", [1, 3])], opset=13)
    return (model, *unit_box(6))


def two_affine_back_to_back():
    """TLL-style: Gemm → Gemm (no ReLU between) → Relu → Gemm → Relu → Gemm."""
    g = GraphBuilder()
    params = mlp_parameters((6, 8, 8, 8, 3), seed=22)
    x = "input"
    for k, (weight, bias) in enumerate(params):
        x = g.node("Gemm", [x, g.const(weight), g.const(bias)], name=f"Gemm_{k}", transB=1)
        if 0 < k < len(params) - 1:
            x = g.node("Relu", [x], name=f"Relu_{k}")
    g.nodes[-1].output[0] = "output"
    model = g.model([g.tensor("input", ["batch", 6])], [g.tensor("output", ["batch", 3])])
    return (model, *unit_box(6))


def eran_normalized():
    """ERAN: Sub/Div by ``Constant`` nodes, Flatten, Gemm, and a Relu on the output layer."""
    g = GraphBuilder()
    mean = g.constant_node(np.full((1, 2, 3), 0.1))
    std = g.constant_node(np.linspace(0.5, 1.0, 6).reshape(1, 2, 3))
    x = g.node("Sub", ["input", mean], name="sub_mean")
    x = g.node("Div", [x, std], name="div_std")
    x = g.node("Flatten", [x], name="flatten", axis=1)
    params = mlp_parameters(seed=23)
    for k, (weight, bias) in enumerate(params):
        x = g.node("Gemm", [x, g.const(weight), g.const(bias)], name=f"dense_{k}", transB=1)
        x = g.node("Relu", [x], name=f"relu_{k}")
    g.nodes[-1].output[0] = "output"
    model = g.model([g.tensor("input", [1, 1, 2, 3])], [g.tensor("output", [1, 3])], opset=12)
    return (model, np.zeros(6), np.ones(6))


def gemm_alpha_beta():
    """Gemm with alpha/beta != 1 and C as scalar, ``(n,)`` and ``(1, n)``; one without attributes."""
    g = GraphBuilder()
    params = mlp_parameters(seed=24)
    w1, b1 = params[0]
    w2, b2 = params[1]
    w3, b3 = params[2]
    x = g.node(
        "Gemm", ["X", g.const(w1), g.const(b1 / 2.0)], name="g1", alpha=0.5, beta=2.0, transB=1
    )
    x = g.node("Relu", [x], name="r1")
    x = g.node(
        "Gemm",
        [x, g.const(w2.T.copy()), g.const(b2.reshape(1, -1))],
        name="g2",
        alpha=2.0,
        beta=0.25,
    )
    x = g.node("Relu", [x], name="r2")
    x = g.node("Gemm", [x, g.const(w3), g.const(np.float32(0.3))], name="g3", transB=1, alpha=1.5)
    g.nodes[-1].output[0] = "Y"
    model = g.model([g.tensor("X", ["n", 6])], [g.tensor("Y", ["n", 3])], opset=13)
    return (model, *unit_box(6))


def gemm_trans_a():
    """A 1-D input reshaped to a column ``[6, 1]`` and read by ``Gemm(transA=1)``."""
    g = GraphBuilder()
    params = mlp_parameters(seed=25)
    x = g.node("Reshape", ["X", g.const(np.array([6, 1]), dtype=np.int64)], name="to_column")
    (w1, b1), (w2, b2), (w3, b3) = params
    x = g.node("Gemm", [x, g.const(w1.T.copy()), g.const(b1)], name="g1", transA=1)
    x = g.node("Relu", [x], name="r1")
    x = g.node("Gemm", [x, g.const(w2), g.const(b2)], name="g2", transB=1)
    x = g.node("Relu", [x], name="r2")
    x = g.node("Gemm", [x, g.const(w3), g.const(b3)], name="g3", transB=1)
    g.nodes[-1].output[0] = "Y"
    model = g.model([g.tensor("X", [6])], [g.tensor("Y", [1, 3])], opset=13)
    return (model, *unit_box(6))


def constant_node_weights():
    """Weights from ``Constant`` nodes, biases through ``Identity`` chains, unnamed nodes."""
    g = GraphBuilder()
    x = "input"
    params = mlp_parameters(seed=26)
    for k, (weight, bias) in enumerate(params):
        w = g.constant_node(weight)
        b = g.node("Identity", [g.node("Identity", [g.const(bias)], name="")], name="")
        x = g.node("Gemm", [x, w, b], name="", transB=1)
        if k < len(params) - 1:
            x = g.node("Relu", [x], name="")
    g.nodes[-1].output[0] = "output"
    model = g.model([g.tensor("input", ["batch", 6])], [g.tensor("output", ["batch", 3])])
    return (model, *unit_box(6))


def float64_gemm():
    """A double-precision model (float64 input, weights and output)."""
    g = GraphBuilder(np.float64)
    _gemm_chain(g, "input", mlp_parameters(seed=27, dtype=np.float64), "output")
    model = g.model([g.tensor("input", ["batch", 6])], [g.tensor("output", ["batch", 3])])
    return (model, *unit_box(6))


ALL_BUILDERS: dict[str, Callable[[], tuple[onnx.ModelProto, np.ndarray, np.ndarray]]] = {
    "torch_legacy_gemm": torch_legacy_gemm,
    "torch_legacy_gemm_dynamic": torch_legacy_gemm_dynamic,
    "torch_legacy_rank1": torch_legacy_rank1,
    "torch_legacy_rank3": torch_legacy_rank3,
    "torch_legacy_bias_free": torch_legacy_bias_free,
    "torch_legacy_gemm_batchnorm": torch_legacy_gemm_batchnorm,
    "torch_softmax_tail": torch_softmax_tail,
    "torch_logsoftmax_tail": torch_logsoftmax_tail,
    "torch_flatten_dropout": torch_flatten_dropout,
    "torch_dynamo": torch_dynamo,
    "keras_tf2onnx": keras_tf2onnx,
    "keras_batchnorm": keras_batchnorm,
    "keras_batchnorm_after_relu": keras_batchnorm_after_relu,
    "keras_normalization": keras_normalization,
    "skl2onnx_regressor": skl2onnx_regressor,
    "skl2onnx_regressor_double": skl2onnx_regressor_double,
    "skl2onnx_classifier": skl2onnx_classifier,
    "skl2onnx_scaler": skl2onnx_scaler,
    "onnxsim_reshape_gemm": onnxsim_reshape_gemm,
    "matlab_acasxu": matlab_acasxu,
    "vnncomp_left_weight": vnncomp_left_weight,
    "vnncomp_left_weight_double": vnncomp_left_weight_double,
    "never2_gemm_transb0": never2_gemm_transb0,
    "two_affine_back_to_back": two_affine_back_to_back,
    "eran_normalized": eran_normalized,
    "gemm_alpha_beta": gemm_alpha_beta,
    "gemm_trans_a": gemm_trans_a,
    "constant_node_weights": constant_node_weights,
    "float64_gemm": float64_gemm,
}

#: Builders whose model should be saved with external data (torch dynamo does it for every model).
EXTERNAL_DATA_BUILDERS = ("torch_dynamo",)


# --------------------------------------------------------------------------- running models
def input_layout(model: onnx.ModelProto) -> tuple[str, np.dtype, int | None, tuple[int, ...]]:
    """The single non-constant input: name, numpy dtype, batch and per-sample shape.

    The batch entry is the static batch size, None when it is dynamic, and 0 for a rank-1 input
    (no batch dimension: one sample per run).
    """
    initializers = {t.name for t in model.graph.initializer}
    (graph_input,) = [i for i in model.graph.input if i.name not in initializers]
    tensor_type = graph_input.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    if len(dims) == 1:
        return graph_input.name, dtype, 0, (dims[0],)
    return graph_input.name, dtype, dims[0], tuple(dims[1:])


def run_onnx(model: onnx.ModelProto, x_flat: np.ndarray, outputs: list[str] | None = None) -> list:
    """Run ``model`` in onnxruntime on flattened raw inputs ``(m, n)``.

    Returns one ``(m, k)`` float array per requested tensor (graph outputs by default; other
    tensors are exposed as extra outputs), or a list for non-tensor outputs (ZipMap). Models with
    a static batch size, or none, are fed chunk by chunk.
    """
    import onnxruntime as ort

    name, dtype, batch, sample = input_layout(model)
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    declared = [o.name for o in model_copy.graph.output]
    wanted = outputs or declared
    for tensor in wanted:
        if tensor not in declared:
            model_copy.graph.output.append(
                helper.make_tensor_value_info(tensor, helper.np_dtype_to_tensor_dtype(dtype), None)
            )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model_copy.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    chunk = batch if batch is not None else len(x_flat)
    chunk = max(chunk, 1)
    parts: dict[str, list] = {t: [] for t in wanted}
    for start in range(0, len(x_flat), chunk):
        block = x_flat[start : start + chunk].astype(dtype)
        feed = block.reshape(sample) if batch == 0 else block.reshape((len(block), *sample))
        for tensor, value in zip(wanted, session.run(wanted, {name: feed}), strict=True):
            parts[tensor].append(value)
    results = []
    for tensor in wanted:
        if isinstance(parts[tensor][0], list):
            results.append([item for part in parts[tensor] for item in part])
        else:
            rows = [
                np.reshape(v, (1, -1)) if batch == 0 else np.reshape(v, (len(v), -1))
                for v in parts[tensor]
            ]
            results.append(np.concatenate(rows).astype(np.float64))
    return results


def box_samples(lower: np.ndarray, upper: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Uniform points of the box plus its two extreme corners, float64 ``(count + 2, n)``."""
    rng = np.random.default_rng(seed)
    points = lower + (upper - lower) * rng.random((count, lower.size))
    return np.vstack([points, lower, upper])
