"""The comparison tolerances, one policy for the CLI, the sampled check, the proof and the report.

Semantics are Polygraphy's: two outputs ``a`` (reference) and ``b`` agree element-wise when
``|a - b| <= atol + rtol * |a|`` (see :mod:`onnx_exact.verify`). A tolerance is one number for every
output, or ``{output name: number}`` with the value for outputs it does not name under ``""``
(``"*"`` is read as well). On the command line each ``--atol``/``--rtol`` value is ``1e-4``
(every output) or ``name:1e-4`` (one output, split at the *last* colon so names may contain
colons); several may be given. The proof of ``check`` is absolute: it uses ``atol`` of the output it bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from onnx_exact.core.errors import UsageError

DEFAULT_ATOL = 1e-5
"""Absolute tolerance when none is given (Polygraphy's default)."""

DEFAULT_RTOL = 1e-5
"""Relative tolerance when none is given (Polygraphy's default)."""

Tolerance = float | Mapping[str, float]
"""One value for every output, or ``{name: value}`` with a default under ``""``."""


def parse_tolerance(
    values: Sequence[str] | None, option: str, default: float | None
) -> float | dict[str, float] | None:
    """The tolerance that ``--atol``/``--rtol`` values give (see the module docstring).

    Parameters
    ----------
    values : the option's values in command-line order; a later value for the same output wins.
    option : the option's name, for messages (``"--atol"``).
    default : returned when no value is given (``None``: the caller chooses later).

    Returns
    -------
    A number when no value names an output; otherwise ``{name: value, "": fallback}`` where the
    fallback is the last unnamed value, else ``DEFAULT_ATOL`` (equal to ``DEFAULT_RTOL``).

    Raises
    ------
    UsageError
        A value is not a number or ``name:number``, or is negative, NaN or infinite (which would
        switch the comparison off).
    """
    if not values:
        return default
    fallback = DEFAULT_ATOL
    per_output: dict[str, float] = {}
    for value in values:
        name, _, number = value.rpartition(":")
        try:
            parsed = float(number)
        except ValueError:
            raise UsageError(
                f"{option} '{value}': expected a number or 'output_name:number'"
            ) from None
        if not (math.isfinite(parsed) and parsed >= 0):
            raise UsageError(
                f"{option} '{value}': a tolerance must be a finite number >= 0 (NaN or Inf "
                "would switch the comparison off)"
            )
        if name:
            per_output[name] = parsed
        else:
            fallback = parsed
    if not per_output:
        return fallback
    per_output.setdefault("", fallback)
    return per_output


def is_tolerance(token: str) -> bool:
    """Whether a command-line token reads as a tolerance value: ``1e-5`` or ``name:1e-5``.

    A model path never parses as a number after its last colon, and an option starts with ``-``.
    """
    _, _, number = token.rpartition(":")
    try:
        float(number)
    except ValueError:
        return False
    return not token.startswith("-")


def tolerance_for(value: Tolerance, name: str, default: float = DEFAULT_ATOL) -> float:
    """The tolerance of output ``name``: its own entry, else the one under ``""`` (or ``"*"``),
    else ``default``; a plain number applies to every output."""
    if isinstance(value, Mapping):
        for key in (name, "", "*"):
            if key in value:
                return float(value[key])
        return default
    return float(value)


def format_tolerance(tolerance: Tolerance, outputs: Sequence[str]) -> str:
    """A tolerance as the user reads it: ``1e-05``, or ``logits 7.52e-05`` per output.

    A ``{output: value}`` tolerance may carry a default under ``""`` for outputs it does not
    name; it is shown (as ``others``) only when some output of ``outputs`` falls back to it.
    """
    if not isinstance(tolerance, Mapping):
        return f"{tolerance:.3g}"
    parts = [f"{name} {value:.3g}" for name, value in tolerance.items() if name]
    if "" in tolerance and any(name not in tolerance for name in outputs):
        parts.append(f"others {tolerance['']:.3g}")
    return ", ".join(parts)
