"""The main job end to end: every exporter pattern and the shared real models, compress → verify.

Each case runs the full pipeline (read → domain → stability → reduce → write → verify), then checks
the written file independently in onnxruntime against the original on fresh box samples, and, on
the shared models, that we prove at least every neuron onnxsim's ``stable_relu_prune`` proves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SHARED_MODELS
from exporter_fixtures import (
    ALL_BUILDERS,
    EXTERNAL_DATA_BUILDERS,
    box_samples,
    run_onnx,
    save_external,
)

from onnx_exact.core.verdicts import NeuronState
from onnx_exact.pipeline import DomainSpec, compress


def _save_box(path: Path, lower: np.ndarray, upper: np.ndarray) -> str:
    np.savez(path, lower=lower, upper=upper)
    return str(path)


def _assert_same_outputs(original, compressed, lower, upper, atol=1e-5, rtol=1e-5) -> None:
    x = box_samples(lower, upper, 300, seed=123)
    for ref, out in zip(run_onnx(original, x), run_onnx(compressed, x), strict=True):
        if isinstance(ref, np.ndarray) and ref.dtype.kind == "f":
            np.testing.assert_allclose(out, ref, atol=atol, rtol=rtol)
        elif isinstance(ref, np.ndarray):
            np.testing.assert_array_equal(out, ref)
        else:  # ZipMap: a list of dicts
            assert [sorted(d) for d in out] == [sorted(d) for d in ref]


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_every_exporter_pattern_compresses_exactly(name, tmp_path):
    model, lower, upper = ALL_BUILDERS[name]()
    box = _save_box(tmp_path / "box.npz", lower, upper)
    out = tmp_path / "small.onnx"
    if name in EXTERNAL_DATA_BUILDERS:
        source = tmp_path / "model.onnx"
        save_external(model, source)
    else:
        source = model
    result = compress(source, out, DomainSpec(range_file=box))
    report = result.report
    assert report.verification is not None and report.verification.passed
    assert report.params_after <= report.params_before
    first = report.layers[0]
    # The fixtures force hidden unit 0 dead and unit 1 always active on their box.
    assert 0 in first.stably_inactive
    assert 1 in first.stably_active
    assert first.undecided == []
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    initializers = {init.name for init in model.graph.initializer}
    data_inputs = [i.name for i in model.graph.input if i.name not in initializers]
    assert [i.name for i in written.graph.input if i.name not in initializers] == data_inputs
    assert [o.name for o in written.graph.output] == [o.name for o in model.graph.output]
    _assert_same_outputs(model, written, lower, upper)


def _shared_cases() -> list[tuple[str, str]]:
    manifest = SHARED_MODELS / "manifest.json"
    if not manifest.exists():
        return []
    # The cases that finish in seconds; the benchmark (bench/stability.py) runs all of them.
    wanted = {
        "acasxu/ACASXU_run2a_1_1_batch_2000.onnx": {"prop_1", "prop_2", "prop_3", "prop_4"},
        "mnistfc/mnist-net_256x2.onnx": {"prop_0_0.03"},
        "rl/cartpole.onnx": {"case_safe_14"},
        "rl/dubinsrejoin.onnx": {"case_safe_0"},
    }
    cases = []
    for entry in json.loads(manifest.read_text()):
        for domain in entry["domains"]:
            if domain["name"] in wanted.get(entry["model"], ()):
                folder = (SHARED_MODELS / entry["model"]).parent
                cases.append((entry["model"], str(folder / domain["box_npz"])))
    return cases


SHARED_CASES = _shared_cases()


@pytest.mark.skipif(not SHARED_CASES, reason="../shared/models is not present")
@pytest.mark.parametrize(
    ("model_rel", "box_path"),
    SHARED_CASES,
    ids=[
        f"{Path(m).stem}:{Path(b).stem.removeprefix(Path(m).stem + '.')}" for m, b in SHARED_CASES
    ],
)
def test_shared_models_compress_and_prove_at_least_onnxsim(
    model_rel, box_path, tmp_path, shared_models
):
    from onnxsim import stable_relu_prune

    model_path = shared_models / model_rel
    out = tmp_path / "small.onnx"
    result = compress(model_path, out, DomainSpec(range_file=box_path))
    report = result.report
    assert report.verification.passed
    assert report.undecided_total == 0
    assert report.params_after <= report.params_before

    # onnxsim proves stability with interval + CROWN bounds: we must prove a superset.
    box = np.load(box_path)
    model = onnx.load(model_path)
    input_name = result.analysis.read.network.input_name
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    lo = box["lower"].reshape(dims)
    hi = box["upper"].reshape(dims)
    try:
        theirs = stable_relu_prune.analyze(model, input_ranges={input_name: (lo, hi)})
    except Exception as err:  # noqa: BLE001 - onnxsim refuses some graphs; nothing to compare
        pytest.skip(f"onnxsim refused the model: {err}")
    stability = result.analysis.stability
    ours = [stability.layers[k] for k in result.analysis.read.network.relu_layer_indices]
    assert len(theirs.layers) == len(ours)
    for their_layer, our_layer in zip(theirs.layers, ours, strict=True):
        if their_layer.dead_units is None:
            continue
        assert np.all(our_layer.states[their_layer.dead_units] == NeuronState.INACTIVE)
        assert np.all(our_layer.states[their_layer.on_units] == NeuronState.ACTIVE)


def test_the_tolerance_covers_the_round_off_of_both_models(tmp_path):
    """The default verification atol is 4x the *sum* of the input model's and the compressed
    model's own measured float32 round-off (at least 1e-5): two float evaluations of one exact
    function can differ by both errors, and folding can make the compressed model's larger."""
    from onnx_exact.io.onnx_reader import read_model
    from onnx_exact.verify import ROUNDOFF_FACTOR, measured_roundoff, model_roundoff

    source = Path(__file__).resolve().parent.parent / "models" / "mnist_2x100_l1_1e-3.onnx"
    result = compress(source, tmp_path / "small.onnx", DomainSpec())
    read = read_model(source)
    box = result.analysis.box
    name = read.network.output_name
    own = measured_roundoff(read, box, seed=0)[name]
    written = model_roundoff(result.model, result.reduction.network, read.input_dtype, box, 0)
    assert own > 0 and written[name] > 0
    atol = result.report.verification.atol
    atol = atol.get(name, atol[""]) if isinstance(atol, dict) else atol
    assert atol == pytest.approx(max(1e-5, ROUNDOFF_FACTOR * (own + written[name])))
    assert any("of the compressed model" in note for note in result.report.notes)
    assert result.report.verification.passed
