"""Input domains: boxes ``lower <= x_raw <= upper`` over the flattened model input.

The box is what every proof is relative to, so it is parsed strictly: finite bounds, ``lower <=
upper``, the right number of features, and an error naming the argument or file otherwise. Sources:
one of ``--input-range`` strings, ``--input-range-file`` (.npz/.npy/.json) or ``--vnnlib``
properties (their input box), else the model's ``metadata_props`` (ours or onnxsim's).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.errors import DomainError, UnsupportedModelError, UsageError
from onnx_exact.io.vnnlib import parse_vnnlib_box

if TYPE_CHECKING:  # annotations only: the analysis's worker processes never load onnx
    import onnx


DOMAIN_KEY_PREFIX = "onnx_exact.domain."
"""Model ``metadata_props`` key prefix of the box we record (``<prefix><input name>``)."""

ONNXSIM_KEY_PREFIX = "onnxsim.range."
"""onnxsim 0.8's key prefix: ``{"min": number | nested list | null, "max": ...}`` per tensor."""

_RANGE_FORM = "expected [lo,hi], lo,hi or NAME:[lo,hi], e.g. --input-range input:[0,1]"


@dataclass(frozen=True)
class InputLayout:
    """How one sample's flattened features sit in the declared ONNX input tensor.

    Exporters declare the same MLP input in many ways: ``[batch, n]`` with a dynamic batch (named,
    ``unk__N`` or unnamed), a fixed batch of one (ACAS Xu ``[1,1,1,5]``, mnistfc ``[1,784,1]``),
    or no batch axis at all (a rank-1 ``[n]`` input). The box is always over the ``n`` flattened
    features of one sample; this records the per-sample shape and how samples are batched.

    Attributes
    ----------
    name : the graph input.
    sample_shape : shape of one sample without the batch axis; ``prod(sample_shape) == n``.
    has_batch_axis : whether axis 0 of the declared tensor indexes samples.
    batch_size : the fixed size of that axis, or ``None`` when it is dynamic.
    """

    name: str
    sample_shape: tuple[int, ...]
    has_batch_axis: bool
    batch_size: int | None

    @property
    def samples_per_run(self) -> int | None:
        """How many samples one inference call takes (``None``: any number)."""
        if not self.has_batch_axis:
            return 1
        return self.batch_size

    @classmethod
    def from_dims(
        cls, name: str, dims: Sequence[int | None] | None, n_features: int
    ) -> InputLayout:
        """Infer the layout from declared dims (``None`` = symbolic/unknown) and the feature count.

        Rules: no shape information means ``[batch, n]``; a rank-1 input is one sample; for rank
        >= 2, a leading dim that is symbolic is a dynamic batch, a leading fixed ``k`` whose
        remaining dims hold ``n`` features is a fixed batch of ``k``, and a fixed shape whose full
        product is ``n`` (e.g. ``[5, 1]`` for ``MatMul(W, x)``) is one sample without batch axis.
        One unknown non-batch dim is solved from ``n``.
        """
        if dims is None:
            return cls(name, (n_features,), True, None)
        dims = [d if d is not None and d > 0 else None for d in dims]
        if not dims:
            if n_features != 1:
                raise UnsupportedModelError(
                    f"input {name!r} is a scalar but the network reads {n_features} features"
                )
            return cls(name, (), False, None)
        if len(dims) == 1:
            if dims[0] not in (None, n_features):
                raise UnsupportedModelError(
                    f"input {name!r} declares shape {dims} but the network reads {n_features} "
                    "features"
                )
            return cls(name, (n_features,), False, None)
        lead, rest = dims[0], dims[1:]
        if lead is not None and lead != 1 and None not in dims and math.prod(dims) == n_features:
            return cls(name, tuple(dims), False, None)
        return cls(name, _solve_unknown_dims(name, rest, n_features), True, lead)


def _solve_unknown_dims(name: str, dims: list[int | None], n_features: int) -> tuple[int, ...]:
    """Fill at most one unknown dim so that the product is ``n_features``."""
    known = math.prod(d for d in dims if d is not None)
    unknown = [k for k, d in enumerate(dims) if d is None]
    if len(unknown) == 1 and known > 0 and n_features % known == 0:
        filled = list(dims)
        filled[unknown[0]] = n_features // known
        return tuple(filled)
    if not unknown and known == n_features:
        return tuple(dims)
    raise UnsupportedModelError(
        f"input {name!r}: cannot lay {n_features} features into the per-sample shape {dims}; "
        "give the model a static per-sample shape"
    )


def model_input_dims(model: onnx.ModelProto, input_name: str) -> list[int | None] | None:
    """Declared dims of a graph input (``None`` for symbolic ones), or ``None`` if not declared."""
    for value_info in model.graph.input:
        if value_info.name != input_name:
            continue
        tensor_type = value_info.type.tensor_type
        if not tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return None


def model_input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs a user feeds (initializers listed as inputs, as in IR 3 models, excluded)."""
    constants = {init.name for init in model.graph.initializer}
    return [vi.name for vi in model.graph.input if vi.name not in constants]


# ----------------------------------------------------------------------------- CLI strings


def parse_input_range(text: str) -> tuple[str | None, float | np.ndarray, float | np.ndarray]:
    """Parse one ``--input-range`` argument into ``(input name or None, lo, hi)``.

    Accepted forms: ``[lo,hi]``, ``lo,hi``, ``NAME:[lo,hi]`` and ``NAME:lo,hi``. Input names may
    themselves contain ``:`` and ``/`` (tf2onnx writes ``input:0``), so the name ends at the LAST
    ``:[`` (or, without brackets, the last ``:``). Numbers are anything ``float`` reads except
    NaN and infinities: the box must be bounded for any proof to exist.
    """
    stripped = text.strip()
    bracket = stripped.rfind(":[")
    if bracket >= 0:
        name, values = stripped[:bracket], stripped[bracket + 1 :]
    elif ":" in stripped and not stripped.startswith("["):
        name, _, values = stripped.rpartition(":")
    else:
        name, values = None, stripped
    if name is not None and not name.strip():
        raise DomainError(
            f"--input-range {text!r}: the input name before ':' is empty; {_RANGE_FORM}"
        )
    values = values.strip()
    if values.startswith("[") != values.endswith("]"):
        raise DomainError(f"--input-range {text!r}: unbalanced brackets; {_RANGE_FORM}")
    parts = values.strip("[]").split(",")
    if len(parts) != 2:
        raise DomainError(f"--input-range {text!r}: needs exactly two numbers; {_RANGE_FORM}")
    try:
        lo, hi = (float(part) for part in parts)
    except ValueError:
        raise DomainError(f"--input-range {text!r}: not a number; {_RANGE_FORM}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise DomainError(f"--input-range {text!r}: bounds must be finite numbers; {_RANGE_FORM}")
    if lo > hi:
        raise DomainError(f"--input-range {text!r}: lower bound {lo!r} exceeds upper bound {hi!r}")
    return (name.strip() if name is not None else None), lo, hi


# ----------------------------------------------------------------------------- range files


#: The first bytes of a valid file, checked before numpy is asked (it would try to unpickle).
_NUMPY_SIGNATURES = {".npz": b"PK\x03\x04", ".npy": b"\x93NUMPY"}


def load_range_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(lower, upper)`` float64 arrays from a ``.npz``, ``.npy`` or ``.json`` file.

    ``.npz`` holds arrays ``lower`` and ``upper``; ``.npy`` one array of shape ``(2, ...)``
    (row 0 lower, row 1 upper); ``.json`` an object ``{"lower": .., "upper": ..}`` of scalars or
    nested lists. Shapes are checked later against the model input (:func:`resolve_domain`).
    """
    where = f"--input-range-file {os.fspath(path)}"
    suffix = Path(path).suffix.lower()
    if suffix not in (".npz", ".npy", ".json"):
        raise DomainError(f"{where}: unknown file type {suffix!r}; use .npz, .npy or .json")
    try:
        if suffix in _NUMPY_SIGNATURES:
            with open(path, "rb") as handle:
                if not handle.read(8).startswith(_NUMPY_SIGNATURES[suffix]):
                    raise DomainError(
                        f"{where}: not a {suffix} file (wrong signature: corrupt, truncated or "
                        f"another format); write it with np.{'savez' if suffix == '.npz' else 'save'}"
                    )
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                missing = [key for key in ("lower", "upper") if key not in archive.files]
                if missing:
                    raise DomainError(
                        f"{where}: missing array(s) {', '.join(missing)}; it has "
                        f"{', '.join(archive.files) or 'none'} (save it with "
                        "np.savez(F, lower=..., upper=...))"
                    )
                for key in ("lower", "upper"):
                    member = archive.zip.getinfo(f"{key}.npy")
                    with archive.zip.open(member) as handle:
                        _check_npy_size(handle, member.file_size, f"{where} {key}")
                lower, upper = archive["lower"], archive["upper"]
        elif suffix == ".npy":
            with open(path, "rb") as handle:
                _check_npy_size(handle, os.fstat(handle.fileno()).st_size, where)
            stacked = np.load(path, allow_pickle=False)
            if stacked.ndim < 1 or stacked.shape[0] != 2:
                raise DomainError(
                    f"{where}: expected an array of shape (2, ...) (lower, upper), got "
                    f"{stacked.shape}"
                )
            lower, upper = stacked[0], stacked[1]
        else:
            with open(path, encoding="utf-8") as handle:
                content = json.load(handle)
            if not isinstance(content, dict) or not {"lower", "upper"} <= content.keys():
                raise DomainError(f'{where}: expected a JSON object {{"lower": .., "upper": ..}}')
            lower, upper = content["lower"], content["upper"]
        return _float_array(lower, f"{where} lower"), _float_array(upper, f"{where} upper")
    except DomainError:
        raise
    except RecursionError:
        raise DomainError(
            f"{where}: nested too deeply to read (more levels than the input has axes); give "
            "lower and upper as flat lists or save them with np.savez"
        ) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DomainError(f"{where}: cannot read it ({exc})") from None


def _check_npy_size(handle, file_size: int, where: str) -> None:
    """Refuse a ``.npy`` whose header claims more data than the file holds, before loading it.

    numpy allocates the array the header describes before reading it, so a corrupt or hostile
    header (``shape (2, 50000000000)``) would ask for hundreds of GiB.
    """
    try:
        version = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(handle)
    except (ValueError, EOFError) as exc:
        raise DomainError(f"{where}: not a valid .npy header ({exc})") from None
    needed = math.prod(shape) * dtype.itemsize
    available = file_size - handle.tell()
    if needed > available:
        raise DomainError(
            f"{where}: its header claims shape {tuple(shape)} of {dtype} ({needed} bytes) but the "
            f"file holds {available} bytes of data: truncated or corrupt; write it again with np.save"
        )


def _float_array(value: object, where: str) -> np.ndarray:
    """``value`` as a float64 array, or a DomainError naming ``where``."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DomainError(f"{where}: not a number or a rectangular array of numbers") from None


# ----------------------------------------------------------------------------- metadata


def domain_metadata(box: Box) -> dict[str, str]:
    """The ``metadata_props`` entry recording ``box``: ``onnx_exact.domain.<input>`` -> JSON.

    A uniform side is written as one number, otherwise as a flat list. Python's JSON writer emits
    the shortest repr that round-trips, so float64 bounds read back bit-exactly.
    """
    return {
        DOMAIN_KEY_PREFIX + box.input_name: json.dumps(
            {"lower": _json_side(box.lower), "upper": _json_side(box.upper)}
        )
    }


def _json_side(values: np.ndarray) -> float | list[float]:
    if values.size and np.all(values == values[0]):
        return float(values[0])
    return [float(v) for v in values]


def metadata_range(
    model: onnx.ModelProto, input_name: str, model_path: str | None = None
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """``(lower, upper, key)`` recorded for ``input_name`` in the model's metadata, if any.

    Our key ``onnx_exact.domain.<input>`` (``{"lower", "upper"}``) wins over onnxsim's
    ``onnxsim.range.<input>`` (``{"min", "max"}``; ``null`` = unbounded, which is refused here
    because no proof exists over an unbounded box).
    """
    props = {prop.key: prop.value for prop in model.metadata_props}
    for key, (low_field, high_field) in (
        (DOMAIN_KEY_PREFIX + input_name, ("lower", "upper")),
        (ONNXSIM_KEY_PREFIX + input_name, ("min", "max")),
    ):
        if key not in props:
            continue
        where = f"metadata {key} of {model_path or 'the model'}"
        try:
            content = json.loads(props[key])
        except (ValueError, RecursionError):
            raise DomainError(f"{where}: not valid JSON ({props[key][:60]!r})") from None
        if not isinstance(content, dict) or not {low_field, high_field} <= content.keys():
            raise DomainError(
                f'{where}: expected {{"{low_field}": .., "{high_field}": ..}}, '
                f"got {props[key][:60]!r}"
            )
        for field_name in (low_field, high_field):
            if content[field_name] is None:
                raise DomainError(
                    f"{where}: '{field_name}' is null (unbounded); give a finite range with "
                    "--input-range"
                )
        return (
            _float_array(content[low_field], f"{where} {low_field}"),
            _float_array(content[high_field], f"{where} {high_field}"),
            key,
        )
    return None


# ----------------------------------------------------------------------------- resolution


def resolve_domain(
    model: onnx.ModelProto,
    n_features: int,
    input_name: str,
    *,
    input_ranges: Sequence[str] = (),
    range_file: str | os.PathLike | None = None,
    vnnlib: str | os.PathLike | None = None,
    model_path: str | None = None,
) -> Box:
    """The box the analysis runs on, from the source the user gave.

    Sources: ``--input-range`` strings, ``--input-range-file`` or ``--vnnlib`` (at most one of
    the three: giving two is refused as ambiguous), else the model's metadata (ours, then
    onnxsim's); :attr:`Box.source` says which was used. Arrays may have the input's per-sample
    shape, optionally with a leading batch axis of 1, or its flattened size; lower-rank arrays
    broadcast (onnxsim's per-channel ``[1, C, 1, 1]``); scalars apply to every feature. The
    result is checked: finite, within :func:`largest_bound`, ``lower <= upper`` (degenerate
    features ``lo == hi`` allowed), size ``n``.
    """
    layout = InputLayout.from_dims(input_name, model_input_dims(model, input_name), n_features)
    inputs = model_input_names(model)
    ranges = list(input_ranges)
    given = [
        option
        for option, value in (
            ("--input-range", ranges),
            ("--input-range-file", range_file),
            ("--vnnlib", vnnlib),
        )
        if value
    ]
    if len(given) > 1:
        raise UsageError(
            f"{' and '.join(given)} both given; use one of them to define the box (the other "
            "would be ignored)"
        )
    if ranges:
        if len(ranges) > 1:
            raise UsageError(
                f"--input-range given {len(ranges)} times ({', '.join(map(repr, ranges))}); the "
                f"model has one analysed input {input_name!r}: give one range"
            )
        name, lo, hi = parse_input_range(ranges[0])
        if name is not None and name != input_name:
            raise DomainError(
                f"--input-range {ranges[0]!r}: the model has no analysed input {name!r}; its "
                f"inputs are {', '.join(map(repr, inputs))} (use {input_name}:[lo,hi])"
            )
        where, lower, upper = f"--input-range {ranges[0]!r}", lo, hi
        source = "--input-range " + ranges[0]
    elif range_file is not None:
        lower, upper = load_range_file(range_file)
        where = f"--input-range-file {os.fspath(range_file)}"
        source = f"--input-range-file {Path(range_file).name}"
    elif vnnlib is not None:
        lower, upper, note = parse_vnnlib_box(vnnlib, n_features)
        where = f"--vnnlib {os.fspath(vnnlib)}"
        source = f"vnnlib:{Path(vnnlib).name}" + (f" ({note})" if note else "")
    else:
        recorded = metadata_range(model, input_name, model_path)
        if recorded is None:
            example = f"{input_name}:[0,1]"
            raise DomainError(
                f"no input domain for {model_path or 'the model'}: give --input-range "
                f"'{example}', --input-range-file F.npz (arrays lower, upper), --vnnlib "
                f"F.vnnlib, or record metadata_props 'onnx_exact.domain.{input_name}' = "
                '\'{"lower": 0, "upper": 1}\' in the model'
            )
        lower, upper, key = recorded
        where = f"metadata {key} of {model_path or 'the model'}"
        source = f"metadata:{key}"
    return validated_box(
        to_features(lower, layout, n_features, f"{where} lower"),
        to_features(upper, layout, n_features, f"{where} upper"),
        input_name,
        source,
        where,
        max_abs=largest_bound(model, input_name),
    )


def to_features(
    value: float | np.ndarray, layout: InputLayout, n_features: int, where: str
) -> np.ndarray:
    """One side of the box as a flat ``(n,)`` float64 array (see :func:`resolve_domain`)."""
    array = _float_array(value, where)
    if array.ndim == 0:
        return np.full(n_features, float(array))
    if array.ndim == 1 and array.size == n_features:
        return array.copy()
    sample_rank = len(layout.sample_shape)
    while array.ndim > sample_rank and array.shape[0] == 1:
        array = array[0]
    try:
        return np.broadcast_to(array, layout.sample_shape).reshape(-1).copy()
    except ValueError:
        raise DomainError(
            f"{where}: shape {list(array.shape)} does not fit input {layout.name!r}: expected a "
            f"scalar, {n_features} values, or an array of shape {list(layout.sample_shape)}"
        ) from None


MAX_BOUND = 1e150
"""Largest accepted ``|bound|`` for any input type: widths, midpoints and the products of the
analysis (weights times bounds, summed over features and layers) stay far from float64 overflow."""


_NARROW_FLOAT_TYPES = {1: np.float32, 10: np.float16}
"""``onnx.TensorProto.FLOAT`` and ``FLOAT16`` (onnx itself is not imported in worker processes)."""


def largest_bound(model: onnx.ModelProto, input_name: str) -> float:
    """The largest ``|bound|`` accepted for ``input_name``: ``MAX_BOUND``, or less for the input's
    type (a float32 input cannot take a value above ``3.4e38``, a float16 one above ``65504``)."""
    for value_info in model.graph.input:
        if value_info.name == input_name:
            dtype = _NARROW_FLOAT_TYPES.get(value_info.type.tensor_type.elem_type)
            if dtype is not None:
                return min(MAX_BOUND, float(np.finfo(dtype).max))
    return MAX_BOUND


def validated_box(
    lower: np.ndarray,
    upper: np.ndarray,
    input_name: str,
    source: str,
    where: str,
    max_abs: float = MAX_BOUND,
) -> Box:
    """A :class:`Box` after checking finiteness, magnitude and order; errors name ``where``.

    Bounds must satisfy ``|bound| <= max_abs`` (:func:`largest_bound`): a box such as
    ``[-1e308, 1e308]`` is finite but its width and every bound derived from it overflow float64.
    """
    for side_name, side in (("lower", lower), ("upper", upper)):
        bad = np.flatnonzero(~np.isfinite(side))
        if bad.size:
            k = int(bad[0])
            raise DomainError(
                f"{where}: {side_name}[{k}] = {float(side[k])!r} is not finite ({bad.size} such "
                "value(s)); the box must be bounded"
            )
        huge = np.flatnonzero(np.abs(side) > max_abs)
        if huge.size:
            k = int(huge[0])
            raise DomainError(
                f"{where}: {side_name}[{k}] = {float(side[k])!r} is outside the accepted range "
                f"[-{max_abs:.3g}, {max_abs:.3g}] for input {input_name!r} ({huge.size} such "
                "value(s)); larger bounds overflow the input type or float64 arithmetic"
            )
    inverted = np.flatnonzero(lower > upper)
    if inverted.size:
        k = int(inverted[0])
        raise DomainError(
            f"{where}: lower[{k}] = {float(lower[k])!r} > upper[{k}] = {float(upper[k])!r} "
            f"({inverted.size} such feature(s)); the box is empty"
        )
    return Box(
        np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64), input_name, source
    )
