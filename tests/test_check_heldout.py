"""``check`` on pairs built the way users build them, beyond the pairs the benchmark uses: the
verdict of a proved pair does not depend on onnxruntime's float32 round-off."""

from __future__ import annotations

import numpy as np
from test_equivalence import gemm_mlp, random_weights, unit_box

from onnx_exact.equivalence.check import check_equivalence


def large_valued_weights():
    """A 16-64-64-4 MLP whose hidden values reach ~100 on [-1, 1]^16: onnxruntime's float32
    outputs are ~1e-5 from exact, so two exports of it differ by more than atol 1e-5."""
    return [(w * 4.0, b * 4.0) for w, b in random_weights((16, 64, 64, 4), seed=21)]


def permuted(weights, seed=5):
    """Hidden units permuted (the next layer's columns with them): the same exact function,
    summed by onnxruntime in another order."""
    rng = np.random.default_rng(seed)
    out = [(np.array(w), np.array(b)) for w, b in weights]
    for k in range(len(out) - 1):
        order = rng.permutation(out[k][0].shape[0])
        out[k] = (out[k][0][order], out[k][1][order])
        out[k + 1] = (out[k + 1][0][:, order], out[k + 1][1])
    return out


def test_a_proved_pair_is_not_failed_by_float32_round_off():
    weights = large_valued_weights()
    box = unit_box(16, -1.0, 1.0)
    report = check_equivalence(gemm_mlp(weights), gemm_mlp(permuted(weights)), box, samples=4000)
    assert report.proof.proved and report.proof.bound <= 1e-5
    out = report.sampled.outputs[0]
    assert out.max_abs_diff > 1e-5  # onnxruntime's float32 differences exceed the default atol
    assert report.sampled.passed and report.passed
    assert 1e-5 < report.sampled.atol[out.name] < 1e-3 and report.sampled.atol[""] == 1e-5
    assert any("float round-off" in note for note in report.proof.notes)


def test_a_real_difference_on_the_same_model_still_fails():
    weights = large_valued_weights()
    changed = [(np.array(w), np.array(b)) for w, b in weights]
    changed[-1][1][0] += np.float32(1e-3)
    box = unit_box(16, -1.0, 1.0)
    report = check_equivalence(gemm_mlp(weights), gemm_mlp(changed), box, samples=1000)
    assert not report.passed and not report.sampled.passed
    assert report.sampled.atol == 1e-5


def test_a_difference_the_samples_found_is_confirmed_before_any_tier():
    weights = random_weights((6, 24, 24, 3), seed=4)
    changed = [(np.array(w), np.array(b)) for w, b in weights]
    changed[-1][1][1] += np.float32(1e-3)
    box = unit_box(6, -1.0, 1.0)
    report = check_equivalence(gemm_mlp(weights), gemm_mlp(changed), box, samples=500)
    proof = report.proof
    assert proof.status == "counterexample" and proof.counterexample.output == 1
    assert proof.counterexample.replayed_difference > 1e-5
    assert "milp" not in proof.timings_s and "stable-units" not in proof.timings_s
    assert [d.status for d in proof.directions].count("violated") == 1


def test_the_counterexample_line_compares_one_coordinate_with_itself(tmp_path):
    """The counterexample's onnxruntime value is the difference at the coordinate whose exact
    difference it reports (it was the largest over every output coordinate), and the saved file
    is named as ``np.save`` names it."""
    from onnx_exact.equivalence.render import proof_verdict

    weights = random_weights((6, 24, 24, 3), seed=4)
    changed = [(np.array(w), np.array(b)) for w, b in weights]
    changed[-1][1][1] += np.float32(1e-3)
    box = unit_box(6, -1.0, 1.0)
    report = check_equivalence(
        gemm_mlp(weights),
        gemm_mlp(changed),
        box,
        samples=500,
        counterexample_path=tmp_path / "cx",
    )
    example = report.proof.counterexample
    assert "same coordinate" in example.replayed_where
    assert abs(example.replayed_difference - abs(example.exact_difference)) < 1e-5
    assert "same coordinate" in proof_verdict(report.proof)
    assert report.counterexample_path == str(tmp_path / "cx.npy")
    assert np.load(tmp_path / "cx.npy").shape == (6,)
