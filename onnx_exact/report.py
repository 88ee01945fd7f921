"""What a run established, as a typed summary, JSON and rich tables.

The JSON shape is a contract other tools rely on (README "Machine-readable output"):
``{"layers": [{"name", "size", "stably_active", "stably_inactive", "unstable", "undecided", ...}],
"params_before", "params_after", "verification": {"samples", "max_abs_diff", "max_rel_diff",
"passed"}, "timings_s": {phase: seconds}}`` — one entry per ReLU layer in graph order, with indices
into that layer's neurons of the *input* model. Every JSON document the command line writes (the
run report, ``analyze``'s, ``check``'s) starts with ``schema_version`` (:data:`SCHEMA_VERSION`,
raised when a key changes meaning or disappears; new keys do not raise it) and ``version`` (the
onnx-exact release that wrote it).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from onnx_exact.core.network import Network
from onnx_exact.core.tolerance import format_tolerance
from onnx_exact.core.verdicts import NeuronState, StabilityResult
from onnx_exact.equivalence.render import proof_verdict
from onnx_exact.equivalence.results import ProofResult
from onnx_exact.reduce import Reduction
from onnx_exact.verify import EquivalenceReport
from onnx_exact.version import __version__


@dataclass
class ChannelSummary:
    """Channel-level verdicts of one ReLU layer of a CNN, and what structured pruning did.

    A channel is all positions of one conv output channel (one neuron in a dense layer, where
    ``conv`` is False and ``positions`` 1): ``dead`` when every neuron of it is proved inactive,
    ``active`` when every one is proved active, else counted in ``mixed``. ``removed`` are the
    channels the written model no longer has, ``kept_reason`` why proved-dead channels stayed
    (the graph around the ReLU does not allow removing them exactly), ``relu_removed`` whether
    the ReLU itself went (the identity on the box). Indices are the input model's.

    For a ``Clip(0, c)`` layer (``clip`` = c) ``active`` are the channels proved *linear* at
    every position (the Clip is the identity there: ``relu_removed`` when all are), and
    ``saturated`` those proved at ``c`` at every position (a constant channel), ``folded`` the
    saturated ones removed (also in ``removed``: ``c`` went into the consumers' biases); a dead
    channel outputs 0 as through a Relu.
    """

    count: int
    conv: bool
    positions: int
    dead: list[int]
    active: list[int]
    mixed: int
    removed: list[int] = field(default_factory=list)
    kept_reason: str = ""
    relu_removed: bool = False
    clip: float | None = None
    saturated: list[int] = field(default_factory=list)
    folded: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "conv": self.conv,
            "positions": self.positions,
            "dead": self.dead,
            "active": self.active,
            "mixed": self.mixed,
            "removed": self.removed,
            "kept_reason": self.kept_reason,
            "relu_removed": self.relu_removed,
            **(
                {"clip": self.clip, "saturated": self.saturated, "folded": self.folded}
                if self.clip is not None
                else {}
            ),
        }


@dataclass
class LayerSummary:
    """Stability verdicts and the reduction of one ReLU layer of the input model.

    ``decided_by`` counts, per tier, the neurons it settled either way; ``stable_proved_by``
    only those it proved stably active or inactive, ``unstable_shown_by`` only those whose
    second sign it witnessed (an unstable neuron is credited to the tier that found the later
    of its two witnesses). A layer whose neurons all ended unstable has an empty
    ``stable_proved_by``.
    """

    name: str
    size: int
    stably_active: list[int]
    stably_inactive: list[int]
    unstable: list[int]
    undecided: list[int]  # open at the time limit or within the margin
    # aligned with ``undecided``: share of the box on which input splitting proved the neuron's
    # open directions (None where no input search pursued them)
    undecided_proved_share: list[float | None] = field(default_factory=list)
    removed: int = 0
    folded: bool = False
    decided_by: dict[str, int] = field(default_factory=dict)
    stable_proved_by: dict[str, int] = field(default_factory=dict)
    unstable_shown_by: dict[str, int] = field(default_factory=dict)
    channels: ChannelSummary | None = None  # CNN layers only
    params_before: int | None = None  # CNN: the graph's nodes feeding this ReLU (model_stats)
    params_after: int | None = None  # None after a removed ReLU (its nodes join the next layer)
    macs_before: int | None = None
    macs_after: int | None = None
    # CNNs: open on purpose, no open direction of theirs could change the channel structure
    not_pursued: list[int] = field(default_factory=list)
    # Clip(0, c) layers (c = clip): units proved at c (kink active), proved linear (unit active,
    # kink inactive); stably_active/stably_inactive keep their ReLU meaning (y >= 0, y <= 0)
    clip: float | None = None
    stably_saturated: list[int] = field(default_factory=list)
    stably_linear: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "size": self.size,
            "stably_active": self.stably_active,
            "stably_inactive": self.stably_inactive,
            "unstable": self.unstable,
            "undecided": self.undecided,
            "removed": self.removed,
            "folded": self.folded,
            "decided_by": self.decided_by,
            "stable_proved_by": self.stable_proved_by,
            "unstable_shown_by": self.unstable_shown_by,
        }
        if self.channels is not None:
            out["not_pursued"] = self.not_pursued
            out["channels"] = self.channels.to_json()
            for key in ("params_before", "params_after", "macs_before", "macs_after"):
                out[key] = getattr(self, key)
        if any(share is not None for share in self.undecided_proved_share):
            out["undecided_proved_share"] = self.undecided_proved_share
        if self.clip is not None:
            out["clip"] = self.clip
            out["stably_saturated"] = self.stably_saturated
            out["stably_linear"] = self.stably_linear
        return out


@dataclass
class RunReport:
    """Everything a compress or analyze run reports (verification/params_after only for compress)."""

    model: str
    domain_source: str
    method: str
    layers: list[LayerSummary]
    params_before: int
    macs_before: int
    params_after: int | None = None
    macs_after: int | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    verification: EquivalenceReport | None = None
    proof: ProofResult | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    time_limit_hit: bool = False
    time_limit_s: float | None = None  # the analysis's time limit; None: no limit
    constant_output: bool = False
    notes: list[str] = field(default_factory=list)
    output: str | None = None

    @property
    def passed(self) -> bool:
        """Sampled verification passed and no proof found a counterexample."""
        sampled_ok = self.verification is None or self.verification.passed
        return sampled_ok and (self.proof is None or self.proof.status != "counterexample")

    @property
    def undecided_total(self) -> int:
        return sum(len(layer.undecided) for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **json_header(),
            "model": self.model,
            "domain": self.domain_source,
            "method": self.method,
            "layers": [layer.to_json() for layer in self.layers],
            "params_before": self.params_before,
            "macs_before": self.macs_before,
            "timings_s": {k: round(v, 6) for k, v in self.timings_s.items()},
            "time_limit_hit": self.time_limit_hit,
            "time_limit_s": self.time_limit_s,
            "notes": self.notes,
        }
        if self.params_after is not None:
            out["params_after"] = self.params_after
            out["macs_after"] = self.macs_after
            out["constant_output"] = self.constant_output
            out["output"] = self.output
        if self.bytes_before is not None:
            out["bytes_before"] = self.bytes_before
        if self.bytes_after is not None:
            out["bytes_after"] = self.bytes_after
        if self.verification is not None:
            v = self.verification
            out["verification"] = {
                "samples": v.samples,
                "max_abs_diff": v.max_abs_diff,
                "max_rel_diff": v.max_rel_diff,
                "passed": v.passed,
                "atol": v.atol,
                "rtol": v.rtol,
                "outputs": [
                    {
                        "name": o.name,
                        "max_abs_diff": o.max_abs_diff,
                        "max_rel_diff": o.max_rel_diff,
                        "required_atol": o.required_atol,
                        "passed": o.passed,
                    }
                    for o in v.outputs
                ],
            }
        if self.proof is not None:
            out["proof"] = self.proof.to_json()
        return out

    def write_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to the file ``path`` (the CLI wraps this in an atomic rename)."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, indent=2, default=_json_default)
            handle.write("\n")


SCHEMA_VERSION = 1
"""The version of the JSON documents' layout (see the module docstring)."""


def json_header() -> dict[str, Any]:
    """The keys every JSON document starts with: ``schema_version`` and ``version``."""
    return {"schema_version": SCHEMA_VERSION, "version": __version__}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summarize_layers(
    net: Network, stability: StabilityResult, reduction: Reduction | None = None
) -> list[LayerSummary]:
    """One :class:`LayerSummary` per ReLU layer of ``net`` (graph order, input-model indices);
    a layer of auxiliary neurons only (a MaxPool's max tree) is no unit of the graph: none."""
    summaries = []
    for k in net.unit_layer_indices:
        ls = stability.layers[k]
        real = net.layers[k].real  # auxiliary neurons (residual CNNs) come last, never counted
        states = ls.states[real]

        def idx(state: NeuronState, states: np.ndarray = states) -> list[int]:
            return [int(i) for i in np.flatnonzero(states == state)]

        tiers = ls.decided_by[real].astype(str)
        decided = Counter(t for t in tiers if t)
        stable = (states == NeuronState.ACTIVE) | (states == NeuronState.INACTIVE)
        proved = Counter(t for t in tiers[stable] if t)
        shown = Counter(t for t in tiers[states == NeuronState.UNSTABLE] if t)
        mask = ls.not_pursued
        skipped = set() if mask is None else {int(i) for i in np.flatnonzero(mask[real])}
        summary = LayerSummary(
            name=ls.name or net.layers[k].name,
            size=int(states.shape[0]),
            stably_active=idx(NeuronState.ACTIVE),
            stably_inactive=idx(NeuronState.INACTIVE),
            unstable=idx(NeuronState.UNSTABLE),
            undecided=[i for i in idx(NeuronState.UNDECIDED) if i not in skipped],
            not_pursued=sorted(skipped),
            decided_by=dict(sorted(decided.items())),
            stable_proved_by=dict(sorted(proved.items())),
            unstable_shown_by=dict(sorted(shown.items())),
        )
        if ls.proved_share is not None:
            shares = ls.proved_share[real][summary.undecided]
            summary.undecided_proved_share = [
                float(share) if np.isfinite(share) else None for share in shares
            ]
        kinks = net.layers[k].kinks
        if kinks.size:  # Clip(0, c): the kink relu(y - c) of unit i is neuron kinks[i]
            summary.clip = net.layers[k].clip
            kink_states = ls.states[kinks]
            summary.stably_saturated = idx(NeuronState.ACTIVE, kink_states)
            linear = (states == NeuronState.ACTIVE) & (kink_states == NeuronState.INACTIVE)
            summary.stably_linear = [int(i) for i in np.flatnonzero(linear)]
        if reduction is not None:
            lr = reduction.layers[k]
            summary.removed = int(lr.size - len(lr.kept)) if not lr.folded else int(lr.size)
            summary.folded = bool(lr.folded)
        summaries.append(summary)
    return summaries


def reduction_percent(after: int, before: int) -> str:
    """The reduction from ``before`` to ``after`` in percent, never a signed zero.

    A change that rounds to 0.0% is shown as ``<0.1%``; growth (a file a few bytes larger
    after its metadata was added) as ``+x.x% larger``, not as a negative reduction.
    """
    if before == 0:
        return ""
    if after == before:
        return "0%"
    change = 100.0 * abs(before - after) / before
    text = f"{change:.1f}%" if change >= 0.05 else "<0.1%"
    return text if after < before else f"+{text} larger"


PIPED_WIDTH = 10_000
"""Console width when standard output is not a terminal: tables and notes are never wrapped or
cut (rich's default of 80 columns truncated headers to ``undecid…`` in logs)."""


def make_console(quiet: bool = False, stderr: bool = False) -> Console:
    """The console the command line prints its report to.

    On a terminal rich fits the output to the window; piped or redirected (no terminal, no
    ``COLUMNS``), lines are as long as their content (:data:`PIPED_WIDTH`).
    """
    console = Console(stderr=stderr, quiet=quiet, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


def render(report: RunReport, console: Console) -> None:
    """Print the per-layer table, the before/after totals and the verification verdict."""
    table = Table(title=f"ReLU stability over {report.domain_source}", title_justify="left")
    for col in ("layer", "units", "active", "inactive", "unstable", "undecided"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    compress = report.params_after is not None
    if compress:
        table.add_column("removed", justify="right")
        table.add_column("folded", justify="center")
    for layer in report.layers:
        row = [
            layer.name,
            str(layer.size),
            str(len(layer.stably_active)),
            str(len(layer.stably_inactive)),
            str(len(layer.unstable)),
            str(len(layer.undecided)),
        ]
        if compress:
            row += [str(layer.removed), "yes" if layer.folded else ""]
        table.add_row(*row)
    console.print(table)
    if any(layer.channels is not None for layer in report.layers):
        console.print(_channel_table(report))
    proved: Counter[str] = Counter()
    shown: Counter[str] = Counter()
    for layer in report.layers:
        proved.update(layer.stable_proved_by)
        shown.update(layer.unstable_shown_by)
    if report.layers:
        console.print(f"stable neurons proved by: {_tally(proved)}")
        console.print(f"unstable neurons (both signs witnessed) found by: {_tally(shown)}")

    if compress:
        totals = Table(title="Before / after", title_justify="left")
        totals.add_column("")
        totals.add_column("before", justify="right")
        totals.add_column("after", justify="right")
        totals.add_column("reduction", justify="right")
        units_before = sum(layer.size for layer in report.layers)
        units_after = units_before - sum(layer.removed for layer in report.layers)
        totals.add_row(
            "ReLU units",
            str(units_before),
            str(units_after),
            reduction_percent(units_after, units_before),
        )
        totals.add_row(
            "parameters",
            f"{report.params_before:,}",
            f"{report.params_after:,}",
            reduction_percent(report.params_after or 0, report.params_before),
        )
        totals.add_row(
            "MACs / sample",
            f"{report.macs_before:,}",
            f"{report.macs_after:,}",
            reduction_percent(report.macs_after or 0, report.macs_before),
        )
        if report.bytes_before is not None and report.bytes_after is not None:
            totals.add_row(
                "file size (bytes)",
                f"{report.bytes_before:,}",
                f"{report.bytes_after:,}",
                reduction_percent(report.bytes_after, report.bytes_before),
            )
        console.print(totals)

    if report.undecided_total:
        console.print(
            f"[yellow]{report.undecided_total} neurons undecided"
            f"{' (time limit hit)' if report.time_limit_hit else ''}: kept, the output stays exact.[/]"
        )
    not_pursued = sum(len(layer.not_pursued) for layer in report.layers)
    if not_pursued:
        console.print(
            f"{not_pursued} neurons not pursued: no verdict of theirs could change the channel "
            "structure (a channel goes only when every position is proved inactive, a ReLU only "
            "when every neuron is proved active); kept, the output stays exact."
        )
    for note in report.notes:
        console.print(f"note: {note}")
    limit = "none" if report.time_limit_s is None else f"{report.time_limit_s:g} s"
    console.print(
        f"time limit of the analysis: {limit}"
        + (" (reached: open neurons were kept)" if report.time_limit_hit else "")
    )
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in report.timings_s.items())
    console.print(f"timings: {timings}")

    v = report.verification
    if v is not None:
        names = [o.name for o in v.outputs]
        verdict = "[green]PASSED[/]" if v.passed else "[red]FAILED[/]"
        console.print(
            f"verification {verdict}: {v.samples} inputs (box samples, corners, witnesses), "
            f"max abs diff {v.max_abs_diff:.3g}, max rel diff {v.max_rel_diff:.3g} "
            f"(atol {format_tolerance(v.atol, names)}, rtol {format_tolerance(v.rtol, names)})"
        )
        for o in v.outputs:
            status = "PASSED" if o.passed else "FAILED"
            console.print(
                f"  {o.name}: {status}  max abs {o.max_abs_diff:.3g}, max rel {o.max_rel_diff:.3g}, "
                f"min atol that passes {o.required_atol:.3g}"
            )
    if report.proof is not None:
        console.print(proof_verdict(report.proof))
        for note in report.proof.notes:
            console.print(f"  note: {note}")


def _before_after(before: int | None, after: int | None, compress: bool) -> str:
    """``1,234 -> 567`` (compress), ``1,234`` (analyze); a removed ReLU's layer shows ``-> next``."""
    if before is None:
        return ""
    if not compress:
        return f"{before:,}"
    return f"{before:,} -> {'next' if after is None else f'{after:,}'}"


def _channel_table(report: RunReport) -> Table:
    """Per ReLU layer of a CNN: channel verdicts, what pruning removed, params and MACs."""
    compress = report.params_after is not None
    table = Table(title="Channels (a conv channel = all its positions)", title_justify="left")
    columns = ["layer", "kind", "channels", "dead", "active", "mixed"]
    clips = any(layer.channels is not None and layer.channels.clip for layer in report.layers)
    if clips:  # Clip(0, c) layers: "active" is linear, "saturated" at c
        columns.insert(5, "saturated")
    if compress:
        columns += ["removed", "ReLU"]
    columns += ["params", "MACs"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("layer", "kind", "ReLU") else "right")
    for layer in report.layers:
        ch = layer.channels
        if ch is None:
            continue
        kind = f"conv x{ch.positions}" if ch.conv else "dense"
        row = [
            layer.name,
            kind if ch.clip is None else f"{kind}, Clip(0, {ch.clip:g})",
            str(ch.count),
            str(len(ch.dead)),
            str(len(ch.active)),
            str(ch.mixed),
        ]
        if clips:
            row.insert(5, str(len(ch.saturated)) if ch.clip is not None else "")
        if compress:
            row += [str(len(ch.removed)), "removed" if ch.relu_removed else "kept"]
        row += [
            _before_after(layer.params_before, layer.params_after, compress),
            _before_after(layer.macs_before, layer.macs_after, compress),
        ]
        table.add_row(*row)
    return table


def _tally(counts: Counter[str]) -> str:
    """``interval 140, witness 56`` (largest first), or ``none``."""
    if not counts:
        return "none"
    return ", ".join(f"{name} {count}" for name, count in counts.most_common())
