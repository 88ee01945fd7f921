"""The one exception hierarchy of onnx-exact.

Every error the tool raises on purpose derives from :class:`OnnxExactError`. Its message is one line
that names the file, node or argument at fault and says what to do; the CLI prints exactly that line
and exits with :attr:`OnnxExactError.exit_code`. Anything else that escapes is an internal error
(exit 3) and the CLI asks the user to report it.
"""

from __future__ import annotations


class OnnxExactError(Exception):
    """Base class: a clear, one-line, user-facing failure.

    The message stays one line even when what it quotes does not (a file name or a bound with a
    newline in it): newlines are shown as ``\\n``, so the CLI still prints exactly one line.
    """

    exit_code: int = 2

    def __str__(self) -> str:
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class UnsupportedModelError(OnnxExactError):
    """The model cannot be read or analysed (not ONNX, unsupported op, non-constant weight, ...)."""


class MalformedModelError(UnsupportedModelError):
    """The file is not a valid ONNX model at all (undecodable, tensor data that does not match its
    dims, a broken graph): no runtime can run it, so ``check`` does not fall back to sampling."""


class DomainError(OnnxExactError):
    """The input domain is missing, malformed, empty, not finite or of the wrong size."""


class UsageError(OnnxExactError):
    """A command-line argument or API argument is wrong (bad path, conflicting options, ...)."""


class SolverError(OnnxExactError):
    """HiGHS failed in a way that is not a time limit; the affected directions are kept."""

    exit_code = 3


class ResourceError(OnnxExactError):
    """The job would exceed a resource guard (memory) set by the user or the machine."""


class VerificationError(OnnxExactError):
    """The compressed model does not match the original within the requested tolerance."""

    exit_code = 1
