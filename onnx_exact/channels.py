"""The CNN step between the stability analysis and the written model: channel verdicts.

The analysis proves neurons; a CNN's structure is its channels. A conv layer's neurons are
``channels × positions`` (:attr:`DenseLayer.channels` gives the channel of each one), and what an
inference engine can drop is a whole channel: its filter and the matching input slice of every
consumer. Per ReLU layer, from the neuron verdicts:

- a channel is **dead** when *every* one of its neurons is proved INACTIVE: the ReLU outputs 0 at
  every position for every input of the box, so the channel contributes exactly 0 downstream;
- a channel is **active** when every neuron is proved ACTIVE (the ReLU is the identity on it);
- otherwise it is **mixed** (some position unstable, undecided, or stable with the other sign):
  its neuron-level verdicts are reported but cannot change the structure.

A ``Clip(0, c)`` layer (:attr:`DenseLayer.clip`: each unit ``relu(y)`` has a kink neuron
``relu(y - c)``) has two kinks: its dead channels output exactly 0 (0 lies in ``[0, c]``) and
go as a Relu's do; its **active** channels are the *linear* ones (every unit ACTIVE and its kink
INACTIVE: the Clip is the identity there), so a Clip whose every channel is linear is removed
like an identity Relu; a **saturated** channel (every kink ACTIVE: the constant ``c``) is
counted as neither dead nor active, and requested as a constant (:func:`saturated_request`):
the pruner removes it where every consumer takes ``c`` into its bias exactly (a Conv that pads
nothing, a Gemm), else keeps it and says why.

This is also what the analysis's structural focus follows
(:meth:`onnx_exact.stability.state.Analysis.structural`): once a channel is seen positive at
some position its other positions are not pursued toward INACTIVE, and once a layer is seen
negative somewhere none of its neurons is pursued toward ACTIVE (``not_pursued`` in the report).

A dense layer of the head (no ``channels``) has one neuron per channel. The request handed to
:func:`onnx_exact.io.channel_pruning.prune_channels` is the dead channels of every ReLU layer
but the output layer (whose units are the model's outputs) and the ReLUs whose every neuron is
proved active (``linear``: the ReLU is the identity on the box); the pruner removes what it can
prove sound from the graph and says why it kept the rest. The counts before and after are the
ONNX graph's (:mod:`onnx_exact.io.model_stats`), as onnxsim reports them.
"""

from __future__ import annotations

import numpy as np

from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import NeuronState, StabilityResult
from onnx_exact.io.channel_pruning import PruneResult, prune_channels
from onnx_exact.io.model_stats import model_stats, relu_layer_stats
from onnx_exact.io.onnx_reader import ReadResult
from onnx_exact.report import ChannelSummary, RunReport


def channel_summaries(net: Network, stability: StabilityResult) -> list[ChannelSummary]:
    """Channel verdicts of each ReLU layer of ``net`` (``unit_layer_indices`` order)."""
    summaries = []
    for k in net.unit_layer_indices:
        layer = net.layers[k]
        real = layer.real  # auxiliary neurons (residual CNNs, kinks) are no units: never counted
        states = stability.layers[k].states[real]
        conv = layer.channels is not None
        channel = layer.channels[real] if conv else np.arange(states.shape[0])
        count = int(channel.max()) + 1 if channel.size else 0
        neurons = np.bincount(channel, minlength=count)
        active = states == NeuronState.ACTIVE
        saturated = np.zeros(states.shape[0], dtype=bool)
        if layer.clip is not None:  # linear: below the kink at c too; saturated: above it
            kinks = stability.layers[k].states[layer.kinks]
            saturated = kinks == NeuronState.ACTIVE
            active &= kinks == NeuronState.INACTIVE
        present = neurons > 0
        flags = np.stack([states == NeuronState.INACTIVE, active, saturated])
        dead, active, saturated = _whole_channels(channel, flags, neurons)
        summaries.append(
            ChannelSummary(
                count=count,
                conv=conv,
                positions=int(neurons.max()) if count else 0,
                dead=[int(c) for c in np.flatnonzero(dead)],
                active=[int(c) for c in np.flatnonzero(active)],
                mixed=int(np.count_nonzero(present & ~dead & ~active & ~saturated)),
                clip=layer.clip,
                saturated=[int(c) for c in np.flatnonzero(saturated)],
            )
        )
    return summaries


def _whole_channels(channel: np.ndarray, flags: np.ndarray, neurons: np.ndarray) -> np.ndarray:
    """``(kinds, channels)``: for each row of ``flags`` (per neuron), the channels (present,
    ``neurons > 0``) whose every neuron is flagged."""
    count = neurons.shape[0]
    rows = [np.bincount(channel, row, count) == neurons for row in flags]
    return np.array(rows).reshape(flags.shape[0], count) & (neurons > 0)


def pruning_request(net: Network, report: RunReport) -> tuple[dict[str, list[int]], list[str]]:
    """``(dead, linear)`` for :func:`prune_channels` from the layers' channel verdicts.

    The output layer is left out: its units are the graph's outputs, which keep their shape.
    """
    output = net.layers[-1].name if net.layers[-1].relu else None
    dead: dict[str, list[int]] = {}
    linear: list[str] = []
    for layer in report.layers:
        summary = layer.channels
        if summary is None or layer.name == output:
            continue
        if summary.count and len(summary.active) == summary.count:
            linear.append(layer.name)
        elif summary.dead:
            dead[layer.name] = list(summary.dead)
    return dead, linear


def saturated_request(
    net: Network, report: RunReport, dead: dict[str, list[int]]
) -> dict[str, tuple[float, list[int]]]:
    """Clip layer name → ``(c, channels)`` of its saturated channels, for :func:`prune_channels`.

    The output layer is left out, and one channel is left to a layer whose every channel is
    dead or saturated, so that no tensor becomes empty.
    """
    output = net.layers[-1].name if net.layers[-1].relu else None
    request: dict[str, tuple[float, list[int]]] = {}
    for layer in report.layers:
        summary = layer.channels
        if summary is None or summary.clip is None or layer.name == output:
            continue
        channels = list(summary.saturated)
        if len(channels) + len(dead.get(layer.name, ())) >= summary.count:
            channels = channels[1:]
        if channels:
            request[layer.name] = (summary.clip, channels)
    return request


def describe_channels(report: RunReport, read: ReadResult, stability: StabilityResult) -> None:
    """Fill a CNN's report: channel verdicts per layer, the graph's params and MACs (before)."""
    stats = model_stats(read.model)
    report.params_before, report.macs_before = stats.params, stats.macs
    names = [layer.name for layer in report.layers]
    costs = {c.name: c for c in relu_layer_stats(read.model, names, stats)[0]}
    for layer, summary in zip(
        report.layers, channel_summaries(read.network, stability), strict=True
    ):
        layer.channels = summary
        if layer.name in costs:
            layer.params_before = costs[layer.name].params
            layer.macs_before = costs[layer.name].macs


def prune(report: RunReport, read: ReadResult) -> PruneResult:
    """Remove the dead channels and identity ReLUs the report's verdicts allow; record it.

    ``report`` must come from :func:`describe_channels`. Sets, per layer, the channels removed
    (with a note for those not proved dead: released by a grouped Conv, or made constant by a
    removed channel upstream, :mod:`onnx_exact.io.channel_constants`), why proved-dead channels
    were kept, whether the ReLU went, the neurons removed and the layer's params/MACs after
    (``None`` for a removed ReLU: its nodes join the next layer's); and the whole graph's
    params/MACs after.
    """
    dead, linear = pruning_request(read.network, report)
    saturated = saturated_request(read.network, report, dead)
    pruned = prune_channels(read.model, dead, linear, saturated)
    stats = model_stats(pruned.model)
    report.params_after, report.macs_after = stats.params, stats.macs
    kept_relus = [layer.name for layer in report.layers if layer.name not in pruned.removed_relus]
    after = {c.name: c for c in relu_layer_stats(pruned.model, kept_relus, stats)[0]}
    for layer in report.layers:
        summary = layer.channels
        if summary is None:
            continue
        summary.removed = sorted(int(c) for c in pruned.removed.get(layer.name, ()))
        summary.kept_reason = pruned.kept.get(layer.name, "")
        if summary.kept_reason:
            kept = len(set(summary.dead) - set(summary.removed))  # removed may hold released
            report.notes.append(
                f"{layer.name}: {kept} proved-dead channels kept: {summary.kept_reason}"
            )
        summary.folded = sorted(int(c) for c in pruned.folded.get(layer.name, ()))
        unproved = sorted(set(summary.removed) - set(summary.dead) - set(summary.folded))
        if unproved:
            report.notes.append(
                f"{layer.name}: channels {unproved} removed though not proved dead: no longer "
                "read (a grouped Conv lost their group), or a constant on the box because a "
                "removed channel feeds them (taken into the next layer's bias)"
            )
        if layer.name in pruned.unfolded:
            report.notes.append(
                f"{layer.name}: {len(saturated[layer.name][1])} saturated channels (constant "
                f"{summary.clip:g}) kept: {pruned.unfolded[layer.name]}"
            )
        summary.relu_removed = layer.name in pruned.removed_relus
        if layer.name in pruned.fusion.fused:
            report.notes.append(f"{layer.name}: {pruned.fusion.fused[layer.name].describe()}")
        layer.folded = summary.relu_removed
        layer.removed = (
            layer.size if summary.relu_removed else len(summary.removed) * summary.positions
        )
        if layer.name in after:
            layer.params_after = after[layer.name].params
            layer.macs_after = after[layer.name].macs
    return pruned


def summary_metadata(report: RunReport) -> dict[str, str]:
    """The ``onnx_exact.summary`` metadata entry of a pruned CNN (after :func:`prune`)."""
    layers = [layer for layer in report.layers if layer.channels is not None]
    channels = sum(layer.channels.count for layer in layers)
    removed = sum(len(layer.channels.removed) for layer in layers)
    relus = sum(layer.channels.relu_removed for layer in layers)
    return {
        "onnx_exact.summary": (
            f"onnx-exact: {removed} of {channels} ReLU channels removed "
            f"({sum(len(x.channels.dead) for x in layers)} proved dead, "
            f"{sum(len(x.channels.active) for x in layers)} always active, {relus} ReLUs "
            f"removed as the identity, {report.undecided_total} neurons undecided), parameters "
            f"{report.params_before} -> {report.params_after}, MACs {report.macs_before} -> "
            f"{report.macs_after}; exact on the box in onnx_exact.domain.*"
        ),
    }
