"""Memory: a run's peak estimated before the work starts, the ``--max-memory`` guard, the allocator.

A run must either finish or say up front that it cannot: an out-of-memory kill by the operating
system leaves no message and, worse, may look like a hang. :func:`estimate_peak_memory` predicts the
peak resident set from the layer sizes alone, before any array is allocated, and
:func:`check_memory` turns an estimate above the user's limit (``--max-memory``) into a
:class:`~onnx_exact.core.errors.ResourceError` that names the limit, the estimate, the dominant
phase and the fix.

The estimate follows the phases of :func:`onnx_exact.pipeline.compress`; they run one after the
other, so the peak is what stays resident during the whole run plus the largest phase::

    peak = interpreter + resident + max(sampling, symbolic, lp, verify)

with ``P`` parameters, ``n_0`` inputs, ``n_k`` units in layer ``k`` and ``s`` = stored bytes per
weight (4 for float32):

* ``resident``: the loaded model and its edited copy (``2 s P``), the float64 network and the
  reduced one (``16 P``);
* ``sampling``: the witness inputs (``m n_0`` doubles for ``m`` samples, the analysis's sample
  budget, twice: samples and their corners) and one forward-pass chunk of activations (the witness tier's chunk of float64
  values, three live copies);
* ``symbolic``: for the widest layer, the bound vertices (``2 n_k n_0`` doubles) and one block of
  back-substitution coefficients (``2 B max_j n_j`` doubles, four live copies, ``B`` rows a block);
* ``lp``: the triangle relaxation of the layers below the last hidden layer, ``nnz`` matrix
  entries at ``LP_BYTES_PER_NONZERO`` (HiGHS keeps the model, its row- and column-wise copies, a
  scaled copy and the factorisation or interior-point workspace; the cut tier adds dense rows),
  plus what runs beside it: the CROWN branch and bound (its node store and one batch, both
  capped) and the decision MILP of that layer, its model at ``LP_BYTES_PER_NONZERO`` per entry
  again and a full cut pool (``exact_tiers.MILP_CUT_POOL`` cuts, each as long as the MILP has
  columns: ``n_0`` inputs and three per neuron below the layer) at ``MILP_BYTES_PER_CUT_ENTRY``.
  The two are summed, not maxed: in measured runs that reached the MILP tier the peak exceeded
  the larger by about the branch and bound's store (freed heap the MILP's allocations did not
  reuse);
* ``verify``: two onnxruntime sessions (each holds the weights once more, pre-packed: ``2 s P``)
  and a chunk of samples.

The sizes the phases allocate (chunks, blocks, caps) are read from the modules that allocate
them; the bytes per entry of HiGHS are calibrated here: the LP constant on the synthetic
3072-2048-2048-10 model of ``bench/large_model.py``, the MILP one on the ℓ1-free MNIST zoo nets
and mnistfc (``docs/reliability.md`` lists estimates against measured peak RSS).

Allocator
---------
The bound and attack tiers build many short-lived arrays of one to a few MiB per numpy
operation. glibc serves them from fresh ``mmap`` pages or trims them off the heap top once freed,
so every such temporary pays its page faults again, which for arrays of this size costs several
times the arithmetic done on them. :func:`retain_freed_heap` raises glibc's thresholds so that
freed blocks are reused.
"""

from __future__ import annotations

import ctypes
import math
import re
from dataclasses import dataclass, field

import numpy as np

from onnx_exact.bounds import crown, relu_bab
from onnx_exact.core.errors import ResourceError, UsageError
from onnx_exact.core.network import Network
from onnx_exact.search import witness
from onnx_exact.solvers.exact_tiers import MILP_CUT_POOL

#: Resident size of the interpreter with numpy, onnx, onnxruntime, highspy, typer and rich loaded.
INTERPRETER_BYTES = 90 * 2**20
#: HiGHS memory per constraint-matrix entry of the LP tiers (model, row- and column-wise copies,
#: scaled copy, factorisation or interior-point workspace, and the ideal-cut rows added to it),
#: measured on the 3072-2048-2048-10 benchmark with the LP and cut tiers running for 300 s.
LP_BYTES_PER_NONZERO = 160
#: What the CROWN branch and bound adds while the LP relaxation is alive: its open-node store and
#: one batch's working memory.
CROWN_BAB_BYTES = relu_bab.STORE_BYTES + relu_bab.BATCH_BYTES
#: HiGHS memory per entry of a full cut pool of a decision MILP (the pool, its rows in the LP, the
#: search tree that grows meanwhile): the smallest value for which the estimate bounds the whole
#: runs measured with the MILP tier (``docs/reliability.md``, "Memory guard").
MILP_BYTES_PER_CUT_ENTRY = 56

_DOUBLE = 8
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak resident memory of a compress run, in bytes, with its parts.

    Attributes
    ----------
    resident : bytes held for the whole run (interpreter, models, float64 networks).
    phases : bytes each phase adds on top of ``resident`` while it runs.
    """

    resident: int
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        """The phase that sets the peak."""
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def total(self) -> int:
        """``resident + max(phases)``: phases run one after the other, never together."""
        return self.resident + max(self.phases.values(), default=0)

    def describe(self) -> str:
        """One line: the total, then the resident part and each phase, largest phase first."""
        parts = ", ".join(
            f"{name} {format_bytes(size)}"
            for name, size in sorted(self.phases.items(), key=lambda item: -item[1])
        )
        return f"{format_bytes(self.total)} (resident {format_bytes(self.resident)}; {parts})"


def estimate_peak_memory(
    net: Network, *, stored_bytes_per_weight: int = 4, lp: bool = True
) -> MemoryEstimate:
    """Predict the peak resident memory of compressing ``net`` (see the module docstring).

    Parameters
    ----------
    net : the network the reader extracted.
    stored_bytes_per_weight : bytes per parameter in the ONNX file (4 for float32, 8 for float64,
        2 for float16).
    lp : whether the solver tiers may run (``False`` for an analysis limited to bounds).

    Returns
    -------
    The estimate; :attr:`MemoryEstimate.total` is the number to compare with a limit.
    """
    # Imported here, not above: the analysis imports this module (for its allocator), so a
    # module-level import of it would be circular, and verify loads onnx, which the analysis's
    # worker processes must not load.
    from onnx_exact.stability.policy import SAMPLE_MACS, SAMPLE_MAX, SAMPLE_MIN
    from onnx_exact.verify import CHUNK_SAMPLES

    lp = lp and not net.has_sparse_layers  # no HiGHS tier runs on a sparse layer
    params = net.param_count
    widths = [net.in_features] + [layer.out_features for layer in net.layers]
    resident = INTERPRETER_BYTES + 2 * stored_bytes_per_weight * params + 2 * _DOUBLE * params

    samples = int(min(max(SAMPLE_MACS / max(net.mac_count, 1), SAMPLE_MIN), SAMPLE_MAX))
    sampling = _DOUBLE * (2 * samples * net.in_features + 3 * witness.CHUNK_VALUES)

    hidden = [k for k in net.relu_layer_indices if k < len(net.layers) - 1] or [0]
    widest = max(widths[k + 1] for k in hidden)
    block = min(crown.row_block(max(widths)), widest)
    # the vertices (one byte per coordinate), then the block's working arrays
    symbolic = 2 * widest * net.in_features + _DOUBLE * 4 * 2 * block * max(widths)

    phases = {"sampling": sampling, "symbolic": symbolic}
    if lp:
        # The deepest LP (for the last hidden layer) encodes every layer below it: their weight
        # matrices plus the triangle rows (about six more entries per unstable unit).
        deepest = hidden[-1]
        # (count_nonzero: HiGHS gets no zero entries, and a CNN's materialised conv matrices are
        # mostly zeros)
        nonzeros = sum(_nonzeros(net.layers[j].weight) + 6 * widths[j + 1] for j in range(deepest))
        columns = net.in_features + 3 * sum(widths[1 : deepest + 1])
        model = LP_BYTES_PER_NONZERO * nonzeros  # held twice: the relaxation and the MILP
        cut_pool = MILP_BYTES_PER_CUT_ENTRY * MILP_CUT_POOL * columns
        phases["lp"] = 2 * model + CROWN_BAB_BYTES + cut_pool

    chunk = CHUNK_SAMPLES * (2 * net.in_features + 2 * sum(widths[1:]))
    phases["verify"] = 2 * 2 * stored_bytes_per_weight * params + stored_bytes_per_weight * chunk
    return MemoryEstimate(resident=int(resident), phases={k: int(v) for k, v in phases.items()})


def _nonzeros(weight) -> int:
    """Nonzero entries of a layer's ndarray or :class:`~onnx_exact.core.sparse.SparseMatrix`."""
    return (
        weight.count_nonzero()
        if hasattr(weight, "count_nonzero")
        else int(np.count_nonzero(weight))
    )


def check_memory(
    net: Network,
    limit_bytes: int,
    *,
    stored_bytes_per_weight: int = 4,
    lp: bool = True,
    source: str = "--max-memory",
) -> MemoryEstimate:
    """Refuse a run whose estimated peak exceeds ``limit_bytes``; return the estimate otherwise.

    Raises
    ------
    ResourceError
        The estimate is above the limit; the message gives both numbers, the phase that sets the
        peak and what to do (raise the limit, analyse a smaller model, or cap the time instead).
    """
    estimate = estimate_peak_memory(net, stored_bytes_per_weight=stored_bytes_per_weight, lp=lp)
    if estimate.total > limit_bytes:
        widths = "-".join(str(w) for w in [net.in_features, *(x.out_features for x in net.layers)])
        raise ResourceError(
            f"{source} {format_bytes(limit_bytes)}: the {widths} network needs an estimated "
            f"{estimate.describe()}, mostly in {estimate.peak_phase}; raise {source} to at least "
            f"{format_bytes(_round_up(estimate.total))} or run on a machine with more memory"
        )
    return estimate


def memory_shortfall_note(net: Network, *, stored_bytes_per_weight: int = 4) -> str | None:
    """A warning when the estimated peak exceeds the memory this process may still use, else None.

    For runs without ``--max-memory``: they are not refused (the estimate is conservative), but an
    out-of-memory kill would come without a message, so the user hears about the risk first.
    None where the available memory cannot be read (non-Linux).
    """
    available = available_memory_bytes()
    if available is None:
        return None
    estimate = estimate_peak_memory(net, stored_bytes_per_weight=stored_bytes_per_weight)
    if estimate.total <= available:
        return None
    return (
        f"estimated peak memory {format_bytes(estimate.total)} (mostly {estimate.peak_phase}) "
        f"exceeds the {format_bytes(available)} available: the operating system may stop the "
        "run; pass --max-memory to refuse such runs up front, or cap the work with --time-limit"
    )


def parse_memory_size(text: str, source: str = "--max-memory") -> int:
    """Bytes from a size such as ``4G``, ``512MiB``, ``2.5GB`` or ``1073741824`` (binary units).

    Raises
    ------
    UsageError
        The text is not a positive size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise UsageError(f"{source} {text!r}: expected a size such as 512M, 4G or 4GiB")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not value >= 1:
        raise UsageError(f"{source} {text!r}: the limit must be at least one byte")
    return int(value)


def available_memory_bytes() -> int | None:
    """Memory this process may still use: the cgroup limit or ``MemAvailable``, whichever is lower.

    Returns None where neither can be read (non-Linux); callers then skip the automatic guard.
    """
    candidates = []
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(limit_file, encoding="ascii") as stream:
                limit = stream.read().strip()
            with open(usage_file, encoding="ascii") as stream:
                usage = int(stream.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            candidates.append(max(int(limit) - usage, 0))
        break
    return min(candidates) if candidates else None


def format_bytes(size: float) -> str:
    """``1536 -> '1.5 KiB'``: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.3g} {unit}"
        size /= 1024
    return f"{size:.3g} TiB"


def _round_up(size: int) -> int:
    """``size`` rounded up to two significant binary digits of MiB, for a limit to suggest."""
    mib = math.ceil(size / 2**20)
    step = 2 ** max(int(math.log2(mib)) - 3, 0)
    return math.ceil(mib / step) * step * 2**20


# --------------------------------------------------------------------------- allocator
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
#: Blocks up to this size come from the heap, not from their own ``mmap`` (glibc's default
#: starts at 128 KiB and adapts only up to 32 MiB, after a block of that size was freed).
HEAP_BLOCK_BYTES = 64 * 2**20
#: Free memory the heap keeps at its top instead of returning it to the system.
HEAP_RETAIN_BYTES = 512 * 2**20
_allocator_tuned: bool | None = None  # None: not tried yet in this process


def retain_freed_heap() -> bool:
    """Make glibc reuse freed blocks instead of returning them to the system (once per process).

    Why: see "Allocator" in the module docstring. The cost is that up to
    :data:`HEAP_RETAIN_BYTES` of freed memory stays resident until the process exits; the peak
    is not raised, since the retained blocks are what the next temporaries reuse. A no-op (False)
    where the C library has no ``mallopt`` (musl, macOS, Windows). The outcome is kept, so later
    calls cost nothing.
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        try:  # the symbols already loaded into this process, libc among them
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError, TypeError):
            _allocator_tuned = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)) and bool(
                mallopt(_M_TRIM_THRESHOLD, HEAP_RETAIN_BYTES)
            )
    return _allocator_tuned
