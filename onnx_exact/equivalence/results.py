"""What ``check`` and its proof report: :class:`ProofResult` and :class:`CheckReport` (the JSON).

The proof's verdict per output direction and method (:mod:`onnx_exact.equivalence.prover`), and the
sampled comparison beside it; ``to_json`` is the contract of ``onnx-exact check --json`` (JSON has
no infinities: they are written as strings).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from onnx_exact.core.box import Box
from onnx_exact.equivalence.correspondence import METHODS, Correspondence
from onnx_exact.equivalence.proof import Counterexample, DirectionBound

if TYPE_CHECKING:  # annotation only: the proof over two Networks never loads onnx
    from onnx_exact.verify import EquivalenceReport


@dataclass
class ProofResult:
    """The verdict of :func:`onnx_exact.equivalence.prover.prove_equivalence`.

    Attributes
    ----------
    status : "proved" (every output and sign bounded by ``tol``), "counterexample" (a violation
        that replays), "not proved" (time limit, or a violation that does not replay in float32),
        "not applicable" (a model the reader cannot turn into a ReLU network, or mismatched
        interfaces; ``notes`` say why).
    tolerance : the absolute ``tol`` proved against.
    bound : ``max`` over outputs and signs of the proved bounds on ``|f_A - f_B|`` (``inf`` when
        some direction has none); when proved, the ``epsilon`` of "equivalent up to epsilon".
    tiers : the methods that proved directions ("matched", "stable-units", "milp"; see
        :mod:`onnx_exact.equivalence.correspondence`).
    directions : per output coordinate and sign, each with the method that proved it
        (``tier``) or its status "open" / "violated".
    counterexample : set iff ``status == "counterexample"``.
    best_difference : the largest ``|f_A - f_B|`` (float64) seen at a concrete input of the box.
    free_neurons, shared_neurons, binaries : size of the canonical form: registered free neurons,
        neurons shared with one of them, and binaries of the MILP (0 if it was not needed).
    output_tensor : the tensor the proof is about (the network's end tensor).
    time_limit_hit : the deadline passed with some direction still open.
    error_floor : the largest accumulated error of the canonical forms (float64 round-off of the
        forms, plus the residuals of shared neurons: e.g. a compressor's float32 re-rounding of
        folded weights); no tier can prove a bound below it.
    """

    status: str
    tolerance: float
    bound: float
    tiers: list[str] = field(default_factory=list)
    directions: list[DirectionBound] = field(default_factory=list)
    counterexample: Counterexample | None = None
    best_difference: float = 0.0
    free_neurons: int = 0
    shared_neurons: int = 0
    binaries: int = 0
    time_s: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)
    output_tensor: str = ""
    notes: list[str] = field(default_factory=list)
    time_limit_hit: bool = False
    error_floor: float = 0.0
    correspondence: Correspondence | None = None

    @property
    def proved(self) -> bool:
        return self.status == "proved"

    @property
    def open_directions(self) -> list[DirectionBound]:
        return [d for d in self.directions if d.status == "open"]

    def to_json(self) -> dict[str, Any]:
        example = self.counterexample
        return {
            "status": self.status,
            "tolerance": _json_float(self.tolerance),
            "bound": _json_float(self.bound),
            "tiers": self.tiers,
            "best_difference": _json_float(self.best_difference),
            "output_tensor": self.output_tensor,
            "free_neurons": self.free_neurons,
            "shared_neurons": self.shared_neurons,
            "binaries": self.binaries,
            "time_s": self.time_s,
            "time_limit_hit": self.time_limit_hit,
            "error_floor": _json_float(self.error_floor),
            "timings_s": self.timings_s,
            "directions": [
                {
                    "output": d.output,
                    "sign": d.sign,
                    "bound": _json_float(d.bound),
                    "tier": d.tier,
                    "status": d.status,
                }
                for d in self.directions
            ],
            "methods": {
                m: sum(d.tier == m and d.status == "proved" for d in self.directions)
                for m in METHODS
            },  # fmt: skip
            "open": [{"output": d.output, "sign": d.sign} for d in self.open_directions],
            "correspondence": None
            if self.correspondence is None
            else self.correspondence.to_json(),
            "counterexample": None
            if example is None
            else {
                "input": example.input.tolist(),
                "output": example.output,
                "exact_difference": example.exact_difference,
                "replayed_difference": example.replayed_difference,
                "replayed_where": example.replayed_where,
            },
            "notes": self.notes,
        }


@dataclass
class CheckReport:
    """Sampled comparison plus (optionally) the proof, for ``onnx-exact check``.

    ``passed`` is the exit-code verdict: the samples passed and the proof found no counterexample
    (a proof that ran out of time does not fail the check; ``proof.status`` says it).
    """

    model_a: str
    model_b: str
    box: Box
    sampled: EquivalenceReport
    proof: ProofResult | None
    counterexample_path: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.sampled.passed and (self.proof is None or self.proof.status != "counterexample")

    def to_json(self) -> dict[str, Any]:
        sampled = self.sampled
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "domain_source": self.box.source,
            "passed": self.passed,
            "sampled": {
                "samples": sampled.samples,
                "passed": sampled.passed,
                "atol": sampled.atol,
                "rtol": sampled.rtol,
                "max_abs_diff": _json_float(sampled.max_abs_diff),
                "max_rel_diff": _json_float(sampled.max_rel_diff),
                "outputs": [
                    {
                        "name": o.name,
                        "passed": o.passed,
                        "max_abs_diff": _json_float(o.max_abs_diff),
                        "max_rel_diff": _json_float(o.max_rel_diff),
                        "where": o.where_abs,
                        "required_atol": _json_float(o.required_atol),
                        "required_rtol": _json_float(o.required_rtol),
                        "mismatched_elements": o.mismatched_elements,
                    }
                    for o in sampled.outputs
                ],
            },
            "proof": None if self.proof is None else self.proof.to_json(),
            "counterexample_path": self.counterexample_path,
            "timings_s": self.timings_s,
        }

    def write_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, indent=2)


def _json_float(value: float) -> float | str:
    """JSON has no infinities: write them as strings."""
    return float(value) if math.isfinite(value) else str(float(value))
