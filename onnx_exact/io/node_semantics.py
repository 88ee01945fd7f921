"""What each node on a ReLU MLP's data path means, as ``y = W h + b`` pieces in float64.

:class:`NodeSemantics` is the part of the reader's walk (:mod:`onnx_exact.io.onnx_reader`) that
looks at one node at a time: ``Gemm`` and ``MatMul`` in every layout become ``W (out, in)`` and
``b``; a per-unit affine op (Add/Sub/Mul/Div by a constant, inference BatchNormalization, the
``ai.onnx.ml`` Scaler) becomes ``z ↦ s ∘ z + t`` over the flattened features; a pass-through
(Identity, Dropout, same-type Cast, Flatten, Reshape) is checked to keep the batch dimension first
and the C-order feature sequence unchanged. Anything else is refused with the node's name.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto

from onnx_exact.core.errors import UnsupportedModelError
from onnx_exact.io.graph import (
    FLOAT_TYPES,
    ML_DOMAIN,
    ConstantResolver,
    PathStep,
    node_attr,
    node_label,
)

#: Ops that only move or relabel values; the reader checks each keeps the batch dim and features.
PASS_THROUGH_OPS = frozenset({"Identity", "Dropout", "Cast", "Flatten", "Reshape"})
#: Binary ops with a constant operand that act elementwise and affinely on the activation.
ELEMENTWISE_AFFINE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


class NodeSemantics:
    """The per-node half of the reader's walk; :class:`onnx_exact.io.onnx_reader` drives it.

    The walk sets these attributes before calling any method: ``graph`` and ``label`` (the file,
    for messages); ``constant(name)`` (a :class:`~onnx_exact.io.graph.ConstantResolver` lookup);
    ``consumers`` (tensor name → indices of the nodes reading it); ``dtype`` (the activation's
    float type); ``has_batch``, ``batch_probe`` (batch sizes the shapes are checked with),
    ``sample_shape`` and ``width`` (the activation without its batch dimension, and its number
    of features); ``layers`` and ``path`` (what was read so far) and ``past_first_core``.
    """

    def fail(self, message: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.label}: {message}")

    def float_constant(self, index: int, name: str, what: str) -> np.ndarray:
        """A finite float constant input of node ``index`` as float64, or a clear error."""
        node = self.graph.node[index]
        value = self.constant(name)
        if value is None:
            raise self.fail(
                f"{node_label(index, node)}: {what} '{name}' is not a constant (it is a graph input "
                "or computed at run time); only constant weights can be analysed"
            )
        if value.dtype.kind != "f":
            raise self.fail(
                f"{node_label(index, node)}: {what} '{name}' has non-float type {value.dtype}"
            )
        if value.dtype != self.dtype:
            raise self.fail(
                f"{node_label(index, node)}: {what} '{name}' is {value.dtype} but the activation is "
                f"{self.dtype}: the model is invalid (mixed float types); re-export it with one type"
            )
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise self.fail(
                f"{node_label(index, node)}: {what} '{name}' contains NaN or Inf; fix the weights"
            )
        return value

    def full_shapes(self) -> list[tuple[int, ...]]:
        """The activation's full shape for each probe batch size (one shape without a batch dim)."""
        if not self.has_batch:
            return [self.sample_shape]
        return [(b, *self.sample_shape) for b in self.batch_probe]

    def set_output_shapes(self, index: int, outputs: list[tuple[int, ...]]) -> None:
        """Accept a node's output shapes (one per probe) if batch-first and feature-preserving."""
        node = self.graph.node[index]
        if self.has_batch:
            samples = {tuple(shape[1:]) for shape in outputs}
            batch_kept = all(
                len(shape) >= 1 and shape[0] == b
                for shape, b in zip(outputs, self.batch_probe, strict=True)
            )
            if not batch_kept or len(samples) != 1:
                raise self.fail(
                    f"{node_label(index, node)}: reshapes across the batch dimension "
                    f"(output shape {list(outputs[0])}); only per-sample flattening is supported"
                )
            new_sample = samples.pop()
        else:
            new_sample = tuple(outputs[0])
        if math.prod(new_sample) != self.width:
            raise self.fail(
                f"{node_label(index, node)}: changes the number of features per sample "
                f"({self.width} → {math.prod(new_sample)})"
            )
        self.sample_shape = new_sample

    def elementwise(self, scale_or_shift: np.ndarray, index: int) -> np.ndarray:
        """Broadcast a constant against the activation, without growing it, and flatten it."""
        node = self.graph.node[index]
        full = (1, *self.sample_shape) if self.has_batch else self.sample_shape
        try:
            grown = np.broadcast_shapes(full, scale_or_shift.shape)
        except ValueError:
            grown = None
        if grown != full:
            raise self.fail(
                f"{node_label(index, node)}: constant of shape {list(scale_or_shift.shape)} does not "
                f"broadcast per feature onto the activation {list(full)}"
            )
        return np.broadcast_to(scale_or_shift, full).reshape(-1).astype(np.float64)

    def data_slot(self, node: onnx.NodeProto, current: str) -> int:
        return list(node.input).index(current)

    def is_pass_through(self, index: int, current: str) -> bool:
        node = self.graph.node[index]
        return (
            node.op_type in PASS_THROUGH_OPS
            and node.domain in ("", "ai.onnx")
            and node.input[0] == current
        )

    def pass_through(self, index: int, current: str, layer: int) -> None:
        """Check a pass-through node keeps values and feature order; update the sample shape."""
        node = self.graph.node[index]
        op = node.op_type
        for extra in node.output[1:]:
            if extra and self.consumers.get(extra):
                raise self.fail(f"{node_label(index, node)}: its extra output '{extra}' is used")
        if op == "Cast":
            target = node_attr(node, "to", 0)
            if FLOAT_TYPES.get(target) != self.dtype:
                raise self.fail(
                    f"{node_label(index, node)}: casts {self.dtype} to "
                    f"{TensorProto.DataType.Name(target)}; only same-type Casts can be passed through"
                )
        elif op == "Dropout":
            if len(node.input) > 2 and node.input[2]:
                training = self.constant(node.input[2])
                if training is None or bool(np.any(training)):
                    raise self.fail(
                        f"{node_label(index, node)}: training_mode is not a constant False; export the "
                        "model in inference mode"
                    )
        elif op == "Flatten":
            axis = node_attr(node, "axis", 1)
            outputs = []
            for shape in self.full_shapes():
                cut = axis + len(shape) if axis < 0 else axis
                outputs.append((math.prod(shape[:cut]), math.prod(shape[cut:])))
            self.set_output_shapes(index, outputs)
        elif op == "Reshape":
            target = self.constant(node.input[1]) if len(node.input) > 1 else None
            if target is None:
                raise self.fail(
                    f"{node_label(index, node)}: its target shape is not a constant; only constant "
                    "reshapes can be passed through"
                )
            allow_zero = node_attr(node, "allowzero", 0)
            outputs = [
                reshape_shape(shape, [int(v) for v in target.reshape(-1)], allow_zero)
                for shape in self.full_shapes()
            ]
            if any(o is None for o in outputs):
                raise self.fail(
                    f"{node_label(index, node)}: target shape {target.tolist()} does not fit the "
                    f"activation {list(self.full_shapes()[0])}"
                )
            self.set_output_shapes(index, outputs)
            if self.past_first_core and self.sample_shape[-1:] != (self.width,):
                raise self.fail(
                    f"{node_label(index, node)}: between layers the features must stay in the last "
                    f"dimension (got sample shape {list(self.sample_shape)})"
                )
        self.path.append(PathStep(index, "pass", layer, 0, self.width))

    def is_elementwise_affine(self, index: int, current: str) -> bool:
        node = self.graph.node[index]
        if node.op_type in ELEMENTWISE_AFFINE_OPS and node.domain in ("", "ai.onnx"):
            other = [name for name in node.input if name != current]
            if len(other) != 1 or list(node.input).count(current) != 1:
                return False
            return self.constant(other[0]) is not None
        if node.op_type == "Scaler" and node.domain == ML_DOMAIN:
            return True
        return node.op_type == "BatchNormalization" and node.input[0] == current

    def elementwise_affine(self, index: int, current: str) -> tuple[np.ndarray, np.ndarray]:
        """``(s, t)`` over the flattened features such that the node computes ``s ∘ z + t``."""
        node = self.graph.node[index]
        op = node.op_type
        ones = np.ones(self.width)
        if op == "Scaler":
            scale = np.asarray(node_attr(node, "scale", [1.0]), dtype=np.float32).astype(np.float64)
            offset = np.asarray(node_attr(node, "offset", [0.0]), dtype=np.float32).astype(
                np.float64
            )
            scale_vec = self.elementwise(scale, index)
            offset_vec = self.elementwise(offset, index)
            if self.dtype != np.float32:
                raise self.fail(
                    f"{node_label(index, node)}: Scaler outputs float32 but the input is {self.dtype}"
                )
            return scale_vec, -offset_vec * scale_vec
        if op == "BatchNormalization":
            return self.batch_norm(index)
        slot = self.data_slot(node, current)
        other = node.input[1 - slot]
        value = self.elementwise(self.float_constant(index, other, "constant"), index)
        if op == "Add":
            return ones, value
        if op == "Sub":
            return (ones, -value) if slot == 0 else (-ones, value)
        if op == "Mul":
            return value, np.zeros(self.width)
        if slot != 0:
            raise self.fail(f"{node_label(index, node)}: divides a constant by the activation")
        if np.any(value == 0):
            raise self.fail(f"{node_label(index, node)}: divides by zero")
        return 1.0 / value, np.zeros(self.width)

    def batch_norm(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Inference BatchNormalization ``γ (z − μ) / √(σ² + ε) + β`` per channel (axis 1)."""
        node = self.graph.node[index]
        if node_attr(node, "training_mode", 0):
            raise self.fail(f"{node_label(index, node)}: training_mode=1; export in inference mode")
        for extra in node.output[1:]:
            if extra and self.consumers.get(extra):
                raise self.fail(
                    f"{node_label(index, node)}: its running-statistics outputs are used"
                )
        gamma, beta, mean, var = (
            self.float_constant(index, name, what)
            for name, what in zip(
                node.input[1:5], ("scale", "bias", "mean", "variance"), strict=True
            )
        )
        epsilon = float(np.float32(node_attr(node, "epsilon", 1e-5)))
        channels = self.sample_shape[0] if self.has_batch else None
        if channels is None or gamma.shape != (channels,):
            raise self.fail(
                f"{node_label(index, node)}: needs a batch dimension and one statistic per channel "
                f"(activation sample shape {list(self.sample_shape)})"
            )
        scale = gamma / np.sqrt(var + epsilon)
        shift = beta - mean * scale
        per_channel = (channels,) + (1,) * (len(self.sample_shape) - 1)
        return (
            self.elementwise(scale.reshape(per_channel), index),
            self.elementwise(shift.reshape(per_channel), index),
        )

    def gemm(self, index: int, current: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """``Y = alpha * A' B' + beta * C`` → ``W = alpha * B'ᵀ`` (out, in), ``b = beta * C``."""
        node = self.graph.node[index]
        if node.input[0] != current:
            raise self.fail(
                f"{node_label(index, node)}: the activation is the Gemm's B input; only Gemm(x, W) "
                "is supported"
            )
        alpha = float(np.float32(node_attr(node, "alpha", 1.0)))
        beta = float(np.float32(node_attr(node, "beta", 1.0)))
        trans_a = int(node_attr(node, "transA", 0))
        trans_b = int(node_attr(node, "transB", 0))
        stored = self.float_constant(index, node.input[1], "weight")
        if stored.ndim != 2:
            raise self.fail(
                f"{node_label(index, node)}: weight must be 2-D, got {list(stored.shape)}"
            )
        w_io = stored.T if trans_b else stored
        n_in, n_out = w_io.shape
        if trans_a:
            if self.has_batch or self.sample_shape != (n_in, 1) or self.layers:
                raise self.fail(
                    f"{node_label(index, node)}: transA=1 is supported only on the first layer of a "
                    f"model without batch dimension reading a column [{n_in}, 1]"
                )
            self.sample_shape = (1, n_out)
        elif self.has_batch and len(self.sample_shape) == 1 and self.sample_shape[0] == n_in:
            self.sample_shape = (n_out,)
        elif not self.has_batch and self.sample_shape == (1, n_in):
            self.sample_shape = (1, n_out)
        else:
            raise self.fail(
                f"{node_label(index, node)}: expects {n_in} features in a [batch, {n_in}] tensor, gets "
                f"sample shape {list(self.sample_shape)}"
            )
        weight = alpha * w_io.T
        bias_shape = None
        bias = np.zeros(n_out)
        if len(node.input) > 2 and node.input[2]:
            c = self.float_constant(index, node.input[2], "bias C")
            bias_shape = tuple(c.shape)
            if c.ndim > 2 or c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1):
                raise self.fail(
                    f"{node_label(index, node)}: bias C of shape {list(c.shape)} is not per unit "
                    f"(expected scalar, [{n_out}] or [1, {n_out}])"
                )
            bias = beta * np.broadcast_to(c.reshape(-1), (n_out,))
        info = {
            "style": "gemm",
            "weight_layout": "oi" if trans_b else "io",
            "core": index,
            "data_slot": 0,
            "weight_slot": 1,
            "bias_slot": 2,
            "bias_shape": bias_shape,
            "weight_dtype": self.dtype,
            "alpha": alpha,
            "beta": beta,
            "trans_a": trans_a,
            "trans_b": trans_b,
        }
        return weight, bias, info

    def matmul(self, index: int, current: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """``MatMul(x, B)`` → ``W = Bᵀ``; ``MatMul(A, x)`` on a 1-D ``x`` → ``W = A``."""
        node = self.graph.node[index]
        if list(node.input).count(current) != 1:
            raise self.fail(f"{node_label(index, node)}: multiplies the activation by itself")
        data_slot = self.data_slot(node, current)
        weight_slot = 1 - data_slot
        stored = self.float_constant(index, node.input[weight_slot], "weight")
        if stored.ndim != 2:
            raise self.fail(
                f"{node_label(index, node)}: weight must be 2-D, got {list(stored.shape)} "
                "(batched weights are not an MLP layer)"
            )
        if data_slot == 0:
            n_in, n_out = stored.shape
            weight = stored.T
            leading = self.sample_shape[:-1]
            if self.sample_shape[-1] != n_in or math.prod(leading) != 1:
                detail = (
                    f"; rank-3 inputs [batch, T, features] are supported only with T == 1 (got "
                    f"T = {math.prod(leading)}): the layer would act on each position separately"
                    if math.prod(leading) != 1
                    else ""
                )
                raise self.fail(
                    f"{node_label(index, node)}: expects {n_in} features in the last dimension, gets "
                    f"sample shape {list(self.sample_shape)}{detail}"
                )
            self.sample_shape = (*leading, n_out)
            layout = "io"
        else:
            n_out, n_in = stored.shape
            weight = stored
            if self.has_batch or self.sample_shape != (n_in,):
                raise self.fail(
                    f"{node_label(index, node)}: a weight on the left (MatMul(W, x)) needs a 1-D input "
                    f"of {n_in} features, gets sample shape {list(self.sample_shape)}"
                )
            self.sample_shape = (n_out,)
            layout = "left"
        info = {
            "style": "matmul",
            "weight_layout": layout,
            "core": index,
            "data_slot": data_slot,
            "weight_slot": weight_slot,
            "bias_slot": None,
            "bias_shape": None,
            "weight_dtype": self.dtype,
        }
        return weight, np.zeros(n_out), info


def reshape_shape(shape: tuple[int, ...], target: list[int], allow_zero: int) -> tuple | None:
    """ONNX Reshape's output shape (0 copies the input dim unless allowzero; -1 is inferred)."""
    out = []
    for position, value in enumerate(target):
        if value == 0 and not allow_zero:
            if position >= len(shape):
                return None
            out.append(shape[position])
        else:
            out.append(value)
    if out.count(-1) > 1:
        return None
    total = math.prod(shape)
    if -1 in out:
        known = math.prod(v for v in out if v != -1)
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    if math.prod(out) != total or any(v < 0 for v in out):
        return None
    return tuple(out)


class GraphWalk(NodeSemantics):
    """What both readers' walks know of the graph before they start: its constants, who reads
    each tensor, its outputs, and the tensors from which a core op (``core_ops``) is reachable.

    Both walks follow one data path and refuse fan-out with the same checks
    (:meth:`single_consumer`, :meth:`graph_input`); ``scope`` names the path in messages
    ("the MLP", "the network") and ``fan_out`` says why a join cannot be read.
    """

    scope = "the network"
    fan_out = "residual/fan-out connections cannot be analysed"

    def __init__(self, model: onnx.ModelProto, label: str, core_ops: frozenset[str]) -> None:
        self.model = model
        self.graph = model.graph
        self.label = label
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.constants = ConstantResolver(self.graph)
        self.constant = self.constants.value
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.graph.node):
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.reaches_core: set[str] = set()  # graph nodes are topologically sorted
        for node in reversed(self.graph.node):
            is_core = node.op_type in core_ops and node.domain in ("", "ai.onnx")
            if is_core or any(o in self.reaches_core for o in node.output):
                self.reaches_core.update(name for name in node.input if name)
        self.past_first_core = False

    def graph_input(self) -> onnx.ValueInfoProto:
        """The single non-constant graph input (initializers listed as inputs are constants)."""
        inputs = [i for i in self.graph.input if i.name not in self.initializers]
        if len(inputs) != 1:
            names = ", ".join(f"'{i.name}'" for i in inputs) or "none"
            raise self.fail(
                f"{len(inputs)} non-constant graph inputs ({names}); onnx-exact needs exactly one"
            )
        if not inputs[0].type.HasField("tensor_type"):
            raise self.fail(f"input '{inputs[0].name}' is not a tensor")
        return inputs[0]

    def input_dims(self, graph_input: onnx.ValueInfoProto) -> tuple:
        """The input's declared dims (an int, a symbolic name or None each); sets ``dtype`` to its
        float type, or refuses a non-float input."""
        tensor_type = graph_input.type.tensor_type
        if tensor_type.elem_type not in FLOAT_TYPES:
            raise self.fail(
                f"input '{graph_input.name}' has element type "
                f"{TensorProto.DataType.Name(tensor_type.elem_type)}; only float16/32/64 inputs "
                "can be analysed"
            )
        self.dtype = FLOAT_TYPES[tensor_type.elem_type]
        return tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )

    def single_consumer(self, tensor: str) -> int:
        """The one node that reads ``tensor`` on the path, or a clear error (fan-out)."""
        readers = self.consumers.get(tensor, [])
        if tensor in self.graph_outputs:
            raise self.fail(
                f"tensor '{tensor}' inside {self.scope} is also a graph output; hidden "
                "activations that leave the graph cannot be compressed"
            )
        if len(readers) != 1:
            names = ", ".join(node_label(i, self.graph.node[i]) for i in readers)
            raise self.fail(
                f"tensor '{tensor}' feeds {len(readers)} nodes ({names}): {self.fan_out}"
            )
        return readers[0]
