"""Property-based fuzzing of the whole pipeline over every exporter pattern and random boxes.

For a random builder of ``exporter_fixtures.ALL_BUILDERS`` (29 exporter patterns) and a random
sub-box of its domain (widths from the whole box down to 1e-3 of it, some features collapsed to a
point ``lo == hi``), :func:`onnx_exact.pipeline.compress` must

1. not raise (every fixture is a supported model and every box is valid);
2. produce a model that passes its own verification;
3. never call a neuron stable that a float64 forward pass over the box shows in the other sign: on
   fresh uniform samples, Bernoulli corners and the box's extreme corners, ``ACTIVE`` neurons must
   have ``y >= 0`` and ``INACTIVE`` neurons ``y <= 0``.

The example count is ``FUZZ_EXAMPLES`` (reported in ``docs/reliability.md``).
"""

from __future__ import annotations

import numpy as np
from exporter_fixtures import ALL_BUILDERS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_exact.core.verdicts import NeuronState
from onnx_exact.pipeline import AnalysisOptions, DomainSpec, compress

FUZZ_EXAMPLES = 60
CHECK_SAMPLES = 3000
VERIFY_SAMPLES = 300


@st.composite
def sub_boxes(draw) -> tuple[str, int, float, float]:
    """A builder name, a seed, the share of point features and the relative box width."""
    name = draw(st.sampled_from(sorted(ALL_BUILDERS)))
    seed = draw(st.integers(0, 2**31 - 1))
    point_share = draw(st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0]))
    width = draw(st.sampled_from([1.0, 0.5, 0.1, 1e-3]))
    return name, seed, point_share, width


def _box(
    lower: np.ndarray, upper: np.ndarray, seed: int, point_share: float, width: float
) -> tuple[np.ndarray, np.ndarray]:
    """``[lo', hi']`` of relative ``width`` at a random place inside ``[lower, upper]``; a random
    ``point_share`` of the features are collapsed to a single value."""
    rng = np.random.default_rng(seed)
    span = upper - lower
    start = lower + (1.0 - width) * span * rng.random(lower.shape)
    sub_lower, sub_upper = start, np.minimum(start + width * span, upper)
    points = rng.random(lower.shape) < point_share
    sub_upper[points] = sub_lower[points]
    return sub_lower, sub_upper


def _check_points(lower: np.ndarray, upper: np.ndarray, seed: int) -> np.ndarray:
    """Uniform samples, Bernoulli corners (p = 0.1, 0.5, 0.9) and the two extreme corners."""
    rng = np.random.default_rng(seed + 1)
    n = lower.shape[0]
    uniform = lower + (upper - lower) * rng.random((CHECK_SAMPLES, n))
    corners = [
        np.where(rng.random((CHECK_SAMPLES // 3, n)) < p, upper, lower) for p in (0.1, 0.5, 0.9)
    ]
    return np.vstack([uniform, *corners, lower, upper])


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=sub_boxes())
def test_compress_never_crashes_always_verifies_and_never_flips_a_stable_neuron(
    tmp_path_factory, case
):
    name, seed, point_share, width = case
    model, lower, upper = ALL_BUILDERS[name]()
    sub_lower, sub_upper = _box(lower, upper, seed, point_share, width)
    box_file = tmp_path_factory.mktemp("fuzz") / "box.npz"
    np.savez(box_file, lower=sub_lower, upper=sub_upper)

    result = compress(
        model,
        None,
        DomainSpec(range_file=str(box_file)),
        AnalysisOptions(time_limit=20.0, seed=seed % 1000),
        samples=VERIFY_SAMPLES,
    )

    verification = result.report.verification
    assert verification is not None and verification.passed, (name, verification)
    net = result.analysis.read.network
    x_net = net.input_map.apply(_check_points(sub_lower, sub_upper, seed))
    verdicts = zip(
        net.layers, result.analysis.stability.layers, net.preactivations(x_net), strict=True
    )
    for dense, layer, y in verdicts:
        if not dense.relu:
            continue  # a layer without ReLU is "linear", not a stability claim
        active = layer.states == NeuronState.ACTIVE
        inactive = layer.states == NeuronState.INACTIVE
        flipped_active = np.flatnonzero(active & (y.min(axis=0) < 0))
        flipped_inactive = np.flatnonzero(inactive & (y.max(axis=0) > 0))
        assert flipped_active.size == 0, (name, layer.name, "ACTIVE seen < 0", flipped_active)
        assert flipped_inactive.size == 0, (name, layer.name, "INACTIVE seen > 0", flipped_inactive)
