"""The console view of ``onnx-exact check``: the sampled table, the per-output verdicts (Polygraphy
style) and the proof's verdict with its correspondence and open directions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from onnx_exact.core.tolerance import DEFAULT_ATOL, DEFAULT_RTOL, tolerance_for

if TYPE_CHECKING:
    from onnx_exact.equivalence.results import CheckReport, ProofResult


NOT_PROVED_LINE = "[yellow]NOT PROVED (sampled equal)[/yellow]"
"""The verdict of samples that agree and a proof that did not finish (exit code 4)."""


def render_check(report: CheckReport, console: Console) -> None:
    """Per-output PASSED/FAILED lines (Polygraphy style), the difference table, the proof verdict."""
    sampled = report.sampled
    table = Table(title=f"sampled comparison ({sampled.samples} inputs, {report.box.source})")
    for column in ("output", "max abs diff", "max rel diff", "at input", "min atol", "min rtol"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for out in sampled.outputs:
        table.add_row(
            out.name,
            f"{out.max_abs_diff:.3g}",
            f"{out.max_rel_diff:.3g}",
            str(out.where_abs),
            f"{out.required_atol:.3g}",
            f"{out.required_rtol:.3g}",
        )
    console.print(table)
    for out in sampled.outputs:
        atol = tolerance_for(sampled.atol, out.name, DEFAULT_ATOL)
        rtol = tolerance_for(sampled.rtol, out.name, DEFAULT_RTOL)
        if out.passed:
            console.print(
                f"[green]PASSED[/green] | Output: {out.name!r} | Difference is within tolerance "
                f"(rel={rtol:g}, abs={atol:g})"
            )
        else:
            console.print(
                f"[red]FAILED[/red] | Output: {out.name!r} | Difference exceeds tolerance "
                f"(rel={rtol:g}, abs={atol:g}): {out.mismatched_elements} elements, max abs diff "
                f"{out.max_abs_diff:.3g}"
            )
    proof = report.proof
    if proof is not None:
        console.print(proof_verdict(proof))
        if proof.correspondence is not None:
            console.print(f"  correspondence: {proof.correspondence.summary()}")
        open_directions = proof.open_directions
        if open_directions and proof.status != "counterexample":
            shown = ", ".join(f"{d.output}{'+' if d.sign > 0 else '-'}" for d in open_directions)
            console.print(f"  open (output and sign): {shown}")
        for note in proof.notes:
            console.print(f"  note: {note}")
    if report.counterexample_path:
        console.print(f"counterexample written to {report.counterexample_path}")
    if not report.passed:
        closing = "[red]FAILED[/red]"
    elif report.proof is not None and not report.proof.proved:
        closing = NOT_PROVED_LINE  # exit code 4: sampled equal, the proof did not finish
    else:
        closing = "[green]PASSED[/green]"
    console.print(closing, f"| {report.model_a} vs {report.model_b}")


def proof_verdict(proof: ProofResult) -> str:
    if proof.status == "proved":
        return (
            f"[green]proved equivalent on the box up to ε = {proof.bound:.3g}[/green] "
            f"(|f_A - f_B| ≤ {proof.tolerance:g} on {proof.output_tensor!r}; "
            f"by {', '.join(proof.tiers)}; {proof.time_s:.2f} s)"
        )
    if proof.status == "counterexample":
        example = proof.counterexample
        return (
            f"[red]NOT equivalent: counterexample[/red] at output {example.output}: exact "
            f"difference {example.exact_difference:.6g} > {proof.tolerance:g}; "
            f"{example.replayed_where or 'onnxruntime'}: {example.replayed_difference:.6g} "
            f"({proof.time_s:.2f} s)"
        )
    if proof.status == "not applicable":
        return "proof not applicable"
    why = "within the time limit" if proof.time_limit_hit else "(see the notes)"
    return (
        f"[yellow]not proved {why}[/yellow] (best bound {proof.bound:.3g} > "
        f"{proof.tolerance:g}; largest difference seen {proof.best_difference:.3g}; "
        f"{proof.time_s:.2f} s)"
    )
