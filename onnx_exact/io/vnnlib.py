"""VNN-LIB 1.0 properties: the input box they constrain ``X_0 .. X_{n-1}`` to.

Only the input constraints matter to onnx-exact (a model compressed exactly on the property's input
set is all it needs); see :func:`parse_vnnlib_box` for how conjunctions, disjunctions and
constraints that are not variable bounds are turned into one box that contains the input set.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_exact.core.errors import DomainError

_VNNLIB_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VNNLIB_COMMENT = re.compile(r";[^\n]*")
_INPUT_VARIABLE = re.compile(r"X_(\d+)\Z")
_OUTPUT_VARIABLE = re.compile(r"Y_\d+\Z")
_COMPARISONS = {"<=", ">=", "<", ">", "="}
_VNNLIB2_HEADS = {"vnnlib-version", "declare-network", "declare-input"}


@dataclass
class _VnnlibStats:
    """What the box ignores of a property, for the note."""

    disjuncts: int = 0
    unused_input_constraints: int = 0


def parse_vnnlib_box(
    path: str | os.PathLike, n_features: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """The input box of a VNN-LIB property: ``(lower, upper, note)`` over ``X_0 .. X_{n-1}``.

    Only input constraints matter: a box that compresses the model exactly on the property's
    input set is all the tool needs, so constraints that involve an output ``Y_j`` are ignored.
    Input constraints ``(<= X_i c)``, ``(>= X_i c)`` (either operand order, ``<``/``>`` taken closed,
    ``=`` as both) conjoined at the top level or inside ``(and ...)`` intersect. An ``(or ...)``
    over inputs contributes the hull of its disjuncts, each intersected with the top-level box
    first: the result over-approximates the union, which keeps every compression sound on the
    property, and the note says so. Input constraints that are not bounds on a single variable
    (e.g. ``(<= X_0 X_1)``) are dropped likewise (the box only grows).

    The file is tokenised with one regular expression and parsed with an explicit stack, so a
    784-input property (~2400 asserts) takes milliseconds.
    """
    where = f"--vnnlib {os.fspath(path)}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DomainError(f"{where}: cannot read it ({exc})") from None
    expressions = _parse_sexpressions(_VNNLIB_COMMENT.sub("", text), where)
    heads = {expr[0] for expr in expressions if isinstance(expr, list) and expr}
    if heads & _VNNLIB2_HEADS:
        raise DomainError(
            f"{where}: a VNN-LIB 2.0 property ({', '.join(sorted(heads & _VNNLIB2_HEADS))}); "
            "onnx-exact reads VNN-LIB 1.0 input bounds on (declare-const X_i Real) variables: "
            "convert the property, or give its input box with --input-range-file"
        )
    asserts = [
        expr[1]
        for expr in expressions
        if isinstance(expr, list) and len(expr) == 2 and expr[0] == "assert"
    ]
    lower = np.full(n_features, -np.inf)
    upper = np.full(n_features, np.inf)
    stats = _VnnlibStats()
    # Conjunctive asserts first, so each disjunct of an (or ...) is cut by the full conjunction.
    for expr in sorted(asserts, key=_contains_or):
        lower, upper = _tighten(expr, lower, upper, n_features, where, stats)
    if np.all(np.isneginf(lower) & np.isposinf(upper)):
        raise DomainError(f"{where}: no bounds on the inputs X_0 .. X_{n_features - 1}")
    empty = np.flatnonzero(lower > upper)
    if empty.size:
        k = int(empty[0])
        raise DomainError(
            f"{where}: the input box is empty "
            f"(X_{k} >= {float(lower[k])!r} and X_{k} <= {float(upper[k])!r})"
        )
    unbounded = np.flatnonzero(~(np.isfinite(lower) & np.isfinite(upper)))
    if unbounded.size:
        k = int(unbounded[0])
        side = "lower" if not np.isfinite(lower[k]) else "upper"
        raise DomainError(
            f"{where}: X_{k} has no {side} bound ({unbounded.size} input(s) unbounded); "
            "the tool needs a finite box"
        )
    notes = []
    if stats.disjuncts:
        notes.append(f"hull of {stats.disjuncts} disjuncts of an (or ...) over the inputs")
    if stats.unused_input_constraints:
        notes.append(
            f"{stats.unused_input_constraints} input constraint(s) that are not variable bounds "
            "ignored (the box over-approximates them)"
        )
    return lower, upper, "; ".join(notes)


def _parse_sexpressions(text: str, where: str) -> list:
    """Nested lists of string tokens for every top-level s-expression of ``text``."""
    stack: list[list] = [[]]
    for token in _VNNLIB_TOKEN.findall(text):
        if token == "(":
            stack.append([])
        elif token == ")":
            if len(stack) == 1:
                raise DomainError(f"{where}: unbalanced ')' in the property")
            closed = stack.pop()
            stack[-1].append(closed)
        else:
            stack[-1].append(token)
    if len(stack) != 1:
        raise DomainError(f"{where}: unbalanced '(' in the property (file truncated?)")
    return stack[0]


def _contains_or(expr: object) -> bool:
    if isinstance(expr, list):
        return bool(expr) and (expr[0] == "or" or any(_contains_or(sub) for sub in expr[1:]))
    return False


def _mentions(expr: object, variable: re.Pattern) -> bool:
    if isinstance(expr, list):
        return any(_mentions(sub, variable) for sub in expr)
    return isinstance(expr, str) and variable.match(expr) is not None


def _tighten(
    expr: object,
    lower: np.ndarray,
    upper: np.ndarray,
    n_features: int,
    where: str,
    stats: _VnnlibStats,
) -> tuple[np.ndarray, np.ndarray]:
    """A box containing ``{x in [lower, upper] : expr(x)}`` (returns new arrays when changed)."""
    if not isinstance(expr, list) or not expr or not _mentions(expr, _INPUT_VARIABLE):
        return lower, upper
    head = expr[0]
    if head == "and":
        for sub in expr[1:]:
            lower, upper = _tighten(sub, lower, upper, n_features, where, stats)
        return lower, upper
    if head == "or":
        boxes = [_tighten(sub, lower, upper, n_features, where, stats) for sub in expr[1:]]
        feasible = [(lo, hi) for lo, hi in boxes if np.all(lo <= hi)]
        stats.disjuncts += len(expr) - 1
        if not feasible:
            return boxes[0] if boxes else (lower, upper)
        return (
            np.minimum.reduce([lo for lo, _ in feasible]),
            np.maximum.reduce([hi for _, hi in feasible]),
        )
    if _mentions(expr, _OUTPUT_VARIABLE):
        return lower, upper
    bound = _variable_bound(expr, n_features, where) if head in _COMPARISONS else None
    if bound is None:
        stats.unused_input_constraints += 1
        return lower, upper
    index, op, constant = bound
    if op in (">=", ">", "="):
        lower = lower.copy()
        lower[index] = max(lower[index], constant)
    if op in ("<=", "<", "="):
        upper = upper.copy()
        upper[index] = min(upper[index], constant)
    return lower, upper


def _variable_bound(expr: list, n_features: int, where: str) -> tuple[int, str, float] | None:
    """``(index, op, c)`` meaning ``X_index op c`` for a comparison of a variable and a constant."""
    if len(expr) != 3:
        return None
    op, left, right = expr
    left_var, right_var = _input_index(left), _input_index(right)
    if left_var is not None and right_var is None:
        index, constant = left_var, _constant(right, where)
    elif right_var is not None and left_var is None:
        index, constant = right_var, _constant(left, where)
        op = {"<=": ">=", ">=": "<=", "<": ">", ">": "<", "=": "="}[op]
    else:
        return None
    if constant is None:
        return None
    if index >= n_features:
        raise DomainError(
            f"{where}: constrains X_{index} but the model has only {n_features} input features"
        )
    return index, op, constant


def _input_index(token: object) -> int | None:
    if isinstance(token, str):
        match = _INPUT_VARIABLE.match(token)
        if match:
            return int(match.group(1))
    return None


def _constant(token: object, where: str) -> float | None:
    """A numeric literal, also SMT-LIB's unary minus ``(- c)``; ``None`` for anything else.

    A literal that reads as NaN or an infinity is an error, not an ignored constraint: dropping
    it would silently widen the box the property asks for.
    """
    if isinstance(token, list):
        if len(token) == 2 and token[0] == "-":
            inner = _constant(token[1], where)
            return None if inner is None else -inner
        return None
    try:
        value = float(token)
    except ValueError:
        return None
    if not math.isfinite(value):
        raise DomainError(f"{where}: the bound {token!r} is not a finite number; fix the property")
    return value
