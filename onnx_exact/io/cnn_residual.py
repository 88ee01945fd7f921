"""Residual (skip) connections of a CNN, read into the sequential dense IR exactly.

A ResNet basic block forks a ReLU output ``s`` into two paths that meet again in an ``Add``::

    s ─▶ Conv ─▶ Relu ─▶ Conv ─┐                     (the *branch*: holds ReLUs)
    └──────── [1×1 Conv, BN] ──┴─ Add ─▶ Relu ─▶ ...  (the *skip*: linear ops only, or none)

The analysis works on a sequential :class:`~onnx_exact.core.network.Network`, so the reader
carries ``s`` across the branch's ReLU layers with *auxiliary passthrough neurons*: every ReLU
layer closed on the branch gets, after its own neurons, extra neurons that carry ``s``:

* when ``s`` is a ReLU output (the fork comes right after a ReLU, through pass-through nodes
  only; every ResNet basic block), one neuron per entry whose row selects that entry of the
  layer's input (weight 1, bias 0): ``relu(s_j) = s_j`` exactly, since ``s >= 0``;
* otherwise (``s = C h + c`` is an affine map of the previous activation or of the input, and
  may be negative: a pre-activation block, a fork of the input) the first layer closed on the
  branch gets the pair ``relu(s), relu(-s)`` (rows ``±C``, biases ``±c``), and
  ``s = relu(s) - relu(-s)`` exactly; later layers carry the pair by selection rows.

At the join, the layer's map is ``W_branch h + P R h_carried``: the branch's composed ops plus
the skip's (identity, or the projection ``Conv``/BN composed into ``P``) applied to ``s``
rebuilt from the carried neurons (``R`` = identity or ``[I, -I]``), both over the same input.
Every value of the network is unchanged, so bounds, CROWN, LP/MILP encodings, witnesses and
attacks need no change. The auxiliary neurons are marked (:attr:`DenseLayer.auxiliary`); the
selection rows of a ReLU output are ACTIVE by construction, the pair's first rows are ordinary
ReLUs for the bounds, and none is ever reported, counted, pursued or pruned.

Accepted: a fork into exactly two paths that meet at one ``Add``/``Sum`` of two computed
tensors, one of them free of ReLUs (the skip), each a single chain of supported ops; a branch
without ReLU works too (then nothing is carried). Refused with one line naming the node
(:class:`UnsupportedModelError`, exit 2): a fork into three or more nodes, joins where both
paths hold ReLUs, paths that end elsewhere (``Concat``, a graph output, two different joins)
and a fork inside a branch (nested skips).
"""

from __future__ import annotations

import copy

import numpy as np

from onnx_exact.core.operators import DenseOperator, IndexOperator
from onnx_exact.core.sparse import SparseMatrix, stack_rows
from onnx_exact.io import affine_chain
from onnx_exact.io.affine_chain import AffineChain
from onnx_exact.io.graph import PathStep, node_label

#: Ops that join two computed tensors of a residual block.
JOIN_OPS = frozenset({"Add", "Sum"})


class ResidualWalk:
    """The fork-and-join part of the CNN walker (:class:`onnx_exact.io.cnn_reader._CnnWalker`).

    While a branch is walked (``in_branch``), ``carry`` holds the columns of the current
    layer's input that carry ``s`` (None until the first layer closes in the pair form),
    ``first_rows`` the pair's rows ``(±C, ±c)`` until then, and ``paired`` whether ``s`` is
    carried as ``relu(s), relu(-s)``; :meth:`carry_rows` extends each layer closed there.
    """

    in_branch = False
    carry: np.ndarray | None = None
    first_rows: tuple[np.ndarray, np.ndarray] | None = None
    paired = False

    # ------------------------------------------------------------------ the fork
    def residual(self, fork: str) -> str:
        """Read the block that forks at tensor ``fork``; return the join's output tensor."""
        readers = self.consumers.get(fork, [])
        if fork in self.graph_outputs or len(readers) != 2:
            names = ", ".join(node_label(i, self.graph.node[i]) for i in readers)
            where = " and is a graph output" if fork in self.graph_outputs else ""
            raise self.fail(
                f"tensor '{fork}' feeds {len(readers)} nodes ({names}){where}: only a fork into "
                "two paths that meet at one Add (a ResNet basic block) can be analysed"
            )
        if self.in_branch:
            raise self.fail(
                f"tensor '{fork}' forks inside the branch of another skip connection: nested "
                "residual connections are not supported"
            )
        paths = [self._follow(fork, reader) for reader in readers]
        joins = {join for _, join in paths}
        if len(joins) != 1:
            labels = ", ".join(node_label(j, self.graph.node[j]) for j in sorted(joins))
            raise self.fail(
                f"the two paths from tensor '{fork}' end at different nodes ({labels}); only "
                "a fork that joins again at one Add can be analysed"
            )
        join = joins.pop()
        with_relu = [any(self._is_relu(i) for i in nodes) for nodes, _ in paths]
        if all(with_relu):
            raise self.fail(
                f"{node_label(join, self.graph.node[join])}: both paths from tensor '{fork}' "
                "hold a Relu; only joins where one path (the skip) is linear can be analysed"
            )
        branch, skip = (paths[1], paths[0]) if with_relu[1] else (paths[0], paths[1])
        return self._read_block(fork, branch[0], skip[0], join)

    def _is_relu(self, index: int) -> bool:
        node = self.graph.node[index]
        return node.op_type == "Relu" and node.domain in ("", "ai.onnx")

    def _is_join(self, index: int) -> bool:
        node = self.graph.node[index]
        computed = [name for name in node.input if name and self.constant(name) is None]
        return node.op_type in JOIN_OPS and node.domain in ("", "ai.onnx") and len(computed) == 2

    def _follow(self, tensor: str, index: int) -> tuple[list[int], int]:
        """The nodes from ``tensor``'s reader ``index`` to the join they reach, and the join."""
        nodes: list[int] = []
        while not self._is_join(index):
            node = self.graph.node[index]
            if list(node.input).count(tensor) != 1 or not node.output:
                raise self._unsupported(index)
            nodes.append(index)
            tensor = node.output[0]
            if tensor not in self.reaches_core:
                raise self.fail(
                    f"{node_label(index, node)}: a path of a skip connection leaves the network "
                    "before it joins again; only forks that join at an Add can be analysed"
                )
            index = self.single_consumer(tensor)
        return nodes, index

    # ------------------------------------------------------------------ the block
    def _read_block(self, fork: str, branch: list[int], skip: list[int], join: int) -> str:
        """Walk the branch carrying ``s``, then the skip from ``s``; sum them at ``join``."""
        n_s = self.width
        fork_shape, fork_channel, fork_chain = self.sample_shape, self.channel, self.chain
        layers = len(self.layers)
        self.in_branch, self.at_input = True, False
        self.paired = not (self.layers and self.chain.ops == 0)  # s may be negative
        if self.paired:
            weight, offset = self.chain.matrix(), self.chain.offset
            self.first_rows = (stack_rows([weight, -weight]), np.concatenate([offset, -offset]))
            self.carry = None
        else:
            self.carry = np.arange(n_s)
        self.chain = copy.deepcopy(fork_chain)
        current = fork
        for index in branch:
            current = self._step(current, index)
        branch_chain, branch_out = self.chain, current
        branch_shape, branch_channel = self.sample_shape, self.channel
        # The skip starts from s: the fork's chain if no layer closed on the branch, else s
        # rebuilt from the carried columns of the current layer's input.
        if len(self.layers) == layers:
            self.chain = fork_chain
        else:
            self.chain = AffineChain(branch_chain.n_src)
            if self.paired and n_s * branch_chain.n_src > affine_chain.MAX_DENSE_ENTRIES:
                # s = relu(s) - relu(-s) from the carried pair, kept sparse: [I, -I]
                self.chain.src, self.chain.width, self.chain.ops = None, n_s, 1
                self.chain.offset = np.zeros(n_s)
                self.chain.sparse = SparseMatrix.from_coo(
                    np.tile(np.arange(n_s), 2),
                    self.carry,
                    np.repeat([1.0, -1.0], n_s),
                    (n_s, branch_chain.n_src),
                )
            elif self.paired:
                rebuild = np.zeros((n_s, branch_chain.n_src))
                rebuild[np.arange(n_s), self.carry[:n_s]] = 1.0
                rebuild[np.arange(n_s), self.carry[n_s:]] = -1.0
                self.chain.apply(DenseOperator(rebuild))
            else:
                self.chain.apply(IndexOperator((branch_chain.n_src,), (n_s,), self.carry))
        self.sample_shape, self.channel, self.width = fork_shape, fork_channel, n_s
        current = fork
        for index in skip:
            current = self._step(current, index)
        node = self.graph.node[join]
        if self.sample_shape != branch_shape:
            raise self.fail(
                f"{node_label(join, node)}: adds a tensor of sample shape "
                f"{list(branch_shape)} to one of {list(self.sample_shape)}; only joins of equal "
                "shapes (no broadcasting) can be analysed"
            )
        summed = AffineChain(branch_chain.n_src)
        size = branch_chain.width * branch_chain.n_src
        if size > affine_chain.MAX_DENSE_ENTRIES or branch_chain.is_sparse or self.chain.is_sparse:
            summed.sparse = stack_rows(
                [branch_chain.sparse_matrix(), self.chain.sparse_matrix()], add=True
            )
        else:
            summed.dense = branch_chain.weight() + self.chain.weight()
        summed.src = None
        summed.offset = branch_chain.offset + self.chain.offset
        summed.width, summed.ops = branch_chain.width, branch_chain.ops + self.chain.ops + 1
        self.chain = summed
        self.sample_shape, self.width = branch_shape, branch_chain.width
        self.channel = branch_channel if branch_channel is not None else self.channel
        slot = list(node.input).index(branch_out)
        self.path.append(PathStep(join, "join", len(self.layers), slot, self.width))
        self.in_branch, self.carry, self.first_rows = False, None, None
        return node.output[0]

    # ------------------------------------------------------------------ the carried rows
    def carry_rows(self, weight: np.ndarray, bias: np.ndarray, channels):
        """Extend a layer closed inside a branch by the rows that carry ``s``.

        The pair's rows ``(±C, ±c)`` on the first layer of a paired carry, else rows selecting
        the carried columns. Returns ``(weight, bias, channels, auxiliary)``; the next layer's
        chain starts from the branch part of the extended output (:meth:`branch_chain`), and
        ``carry`` moves to its end.
        """
        n_out, n_src = weight.shape
        if self.first_rows is not None:
            rows, row_bias = self.first_rows
            self.first_rows = None
        elif isinstance(weight, SparseMatrix):
            count = self.carry.size
            rows = SparseMatrix.from_coo(
                np.arange(count), self.carry, np.ones(count), (count, n_src)
            )
            row_bias = np.zeros(count)
        else:
            rows = np.zeros((self.carry.size, n_src))
            rows[np.arange(self.carry.size), self.carry] = 1.0
            row_bias = np.zeros(self.carry.size)
        n_s = rows.shape[0]
        weight = stack_rows([weight, rows])
        bias = np.concatenate([bias, row_bias])
        if channels is not None:
            sentinel = int(channels.max()) + 1 if channels.size else 0
            channels = np.concatenate([channels, np.full(n_s, sentinel, dtype=np.int64)])
        auxiliary = np.concatenate([np.zeros(n_out, bool), np.ones(n_s, bool)])
        self.carry = np.arange(n_out, n_out + n_s)
        return weight, bias, channels, auxiliary

    def branch_chain(self) -> AffineChain:
        """The chain that starts a layer inside a branch: the branch part of ``[h, s]``."""
        n_branch = int(self.carry[0])
        chain = AffineChain(n_branch + self.carry.size)
        chain.apply(IndexOperator((chain.n_src,), (n_branch,), np.arange(n_branch)))
        chain.ops = 0
        return chain
