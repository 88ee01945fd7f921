"""The ``onnx-exact`` command line (typer + rich).

``onnx-exact IN OUT [options]`` is the main job (the ``compress`` subcommand is implied);
``onnx-exact analyze IN`` only reports; ``onnx-exact check A B`` compares two models.

Exit codes: 0 done (and verified; with a proof: proved); 1 verification failed or the models
differ (no output written); 2 usage or input error; 3 internal error; 4 sampled equal but NOT
proved (``check``, and ``compress --prove``, when the proof did not finish); 130 / 143
interrupted by SIGINT / SIGTERM (no output written).
"""

from __future__ import annotations

import importlib
import json
import math
import signal
import sys
import traceback
import warnings
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from onnx_exact import progress as progress_module
from onnx_exact.core.errors import OnnxExactError, UsageError
from onnx_exact.core.time_budget import AUTO_TIME_LIMIT, CNN_TIME_LIMIT, MLP_TIME_LIMIT
from onnx_exact.core.tolerance import DEFAULT_ATOL, DEFAULT_RTOL, is_tolerance, parse_tolerance
from onnx_exact.interrupts import (
    INTERRUPT_EXIT_CODES,
    claim_interrupt_report,
    interrupt_requested,
    interrupted_message,
    raise_if_interrupted,
    request_interrupt,
)
from onnx_exact.parallel import default_jobs, shutdown_pools
from onnx_exact.progress import progress_display
from onnx_exact.version import __version__

if TYPE_CHECKING:  # imported on first use by _load_runtime (see there)
    from onnx_exact.equivalence.render import NOT_PROVED_LINE, render_check
    from onnx_exact.equivalence.results import ProofResult
    from onnx_exact.io.save import numpy_save_path, plan_run_paths, write_file_atomic
    from onnx_exact.pipeline import AnalysisOptions, DomainSpec, analyze, check, compress
    from onnx_exact.report import json_header, make_console, render
    from onnx_exact.resources import parse_memory_size

_RUNTIME = {
    "equivalence.render": ("NOT_PROVED_LINE", "render_check"),
    "io.save": ("numpy_save_path", "plan_run_paths", "write_file_atomic"),
    "pipeline": (
        "AnalysisOptions",
        "DomainSpec",
        "MemoryShortfallWarning",
        "analyze",
        "check",
        "compress",
    ),
    "report": ("json_header", "make_console", "render"),
    "resources": ("parse_memory_size",),
}
"""The names the commands use from modules that import onnx, onnxruntime and highspy.

They are bound on the first command run (:func:`_load_runtime`) or attribute access
(``onnx_exact.cli.check``), not at import: ``--help``, ``--version``, shell completion and usage
errors answer without loading them (a second or more on a busy machine).
"""


def _load_runtime() -> None:
    """Bind the :data:`_RUNTIME` names as module globals; a name already bound (a test's
    monkeypatch) is kept."""
    namespace = globals()
    for module_name, names in _RUNTIME.items():
        module = importlib.import_module(f".{module_name}", __package__)
        for name in names:
            namespace.setdefault(name, getattr(module, name))


def __getattr__(name: str) -> object:
    if any(name in names for names in _RUNTIME.values()):
        _load_runtime()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_PARSER_ERROR: type[Exception] = next(
    cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException"
)
"""The base class of the command-line parser's errors (bad option, missing argument, ...).

Up to typer 0.25 it is click's ``ClickException`` (typer then depends on click); from 0.26 on
typer vendors click as ``typer._click`` and no longer installs it, so importing click breaks a
fresh install. ``typer.BadParameter`` is public in every version and derives from it.
"""

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    subcommand_metavar="[COMMAND] ARGS...",
    context_settings={"help_option_names": ["-h", "--help"]},
    help=(
        "Exact compression of ReLU networks in ONNX by proving neuron stability over an input "
        "box.\n\n"
        "\b\n"
        "  onnx-exact IN.onnx OUT.onnx -r 'x:[0,1]'   compress (the command when none is named)\n"
        "  onnx-exact analyze IN.onnx -r '[0,1]'      which neurons are stable, and how we know\n"
        "  onnx-exact check A.onnx B.onnx -r '[0,1]'  are two models the same on the box?\n"
        "  onnx-exact COMMAND --help                  the options of a command"
    ),
)


def _print_version(value: bool) -> None:
    if value:
        print(f"onnx-exact {__version__}")
        raise typer.Exit(0)


@app.callback()
def _top_level(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            is_eager=True,
            callback=_print_version,
            help="Print the version and exit (anywhere on the command line).",
        ),
    ] = False,
) -> None:
    """The options before the command (``--version``; ``main`` also answers it anywhere)."""


SUBCOMMANDS = {"compress", "analyze", "check"}
TOP_LEVEL_OPTIONS = {"-h", "--help", "--install-completion", "--show-completion"}
"""Options of ``onnx-exact`` itself: with one of them first, ``compress`` is not implied."""
METHODS = ("auto", "isa", "per-neuron")

InputRange = Annotated[
    list[str] | None,
    typer.Option(
        "--input-range",
        "-r",
        "--val-range",
        help="Box for the input: '[lo,hi]' or 'name:[lo,hi]' (repeatable; quote it in a shell). "
        "--val-range is Polygraphy's name for it.",
    ),
]
RangeFile = Annotated[
    str | None,
    typer.Option(help="Box from a file: .npz/.json with lower/upper, or .npy of shape (2, ...)."),
]
Vnnlib = Annotated[
    str | None,
    typer.Option(help="Box from the input constraints of a VNN-LIB property."),
]
TimeLimit = Annotated[
    str,
    typer.Option(
        help=f"Seconds for the whole analysis, 'none' for no limit, or 'auto' (default: "
        f"{MLP_TIME_LIMIT:.0f} for an MLP, {CNN_TIME_LIMIT:.0f} for a CNN, so that the whole "
        "job takes about a minute). Neurons still open then are kept (UNDECIDED): the output "
        "stays exact, just less small.",
        metavar="SECONDS",
        show_default=False,
    ),
]
Method = Annotated[
    str, typer.Option(help="Stability engine: auto (tiered), isa or per-neuron (paper baselines).")
]
Jobs = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Worker processes: a layer's decision MILPs in parallel, and a witness search "
        "beside the proof tiers when a layer has fewer open neurons than jobs. Default: the "
        "cores this process may use, at most 8; --jobs 1 runs everything in this process. "
        "The labels do not depend on it.",
        show_default=False,
    ),
]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        help="Refuse (exit 2) before analysing if the estimated peak exceeds this, e.g. 4G."
    ),
]
Seed = Annotated[int, typer.Option(min=0, help="Seed for sampling (results are deterministic).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show details on errors.")]
Atol = Annotated[
    list[str] | None,
    typer.Option(
        help="Absolute tolerance: 1e-5 for every output and/or out0:1e-4 per output; several "
        "may follow one --atol (Polygraphy's form: --atol 1e-5 out0:1e-4)."
    ),
]
Rtol = Annotated[
    list[str] | None,
    typer.Option(
        help="Relative tolerance: 1e-5 for every output and/or out0:1e-4 per output; several "
        "may follow one --rtol."
    ),
]


class _State:
    verbose: bool = False


def _console(quiet: bool, json_path: str | None = None) -> Console:
    """The report's console: stdout, or stderr when the JSON goes to stdout (``--json -``)."""
    return make_console(quiet, stderr=json_path == "-")


def _progress(enabled: bool) -> AbstractContextManager:
    """The run's progress on stderr (:func:`onnx_exact.progress.progress_display`): a live line
    on a terminal, a heartbeat line every ``HEARTBEAT_SECONDS`` elsewhere (CI logs)."""
    return progress_display(
        enabled, sys.stderr.isatty(), interval=progress_module.HEARTBEAT_SECONDS
    )


def _time_limit(value: str, auto: bool = False) -> float | str | None:
    """``--time-limit``: positive seconds, ``none`` (also ``inf``) for no limit, or (where
    ``auto`` is allowed) ``auto``: the budget the pipeline picks by the kind of network."""
    if value.strip().lower() == "none":
        return None
    if auto and value.strip().lower() == AUTO_TIME_LIMIT:
        return AUTO_TIME_LIMIT
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(
            f"--time-limit '{value}': give a number of seconds, or 'none' for no limit"
        ) from None
    if not seconds > 0:
        raise UsageError(
            f"--time-limit {value}: give a positive number of seconds, or 'none' for no limit"
        )
    return seconds if math.isfinite(seconds) else None


def _options(
    method: str, time_limit: str, jobs: int | None, seed: int, max_memory: str | None
) -> AnalysisOptions:
    if method not in METHODS:
        raise UsageError(f"--method '{method}' is not one of {', '.join(METHODS)}")
    seconds = _time_limit(time_limit, auto=True)
    try:
        limit = parse_memory_size(max_memory) if max_memory is not None else None
    except OverflowError:  # a number such as 1e400 reads as inf, which no int holds
        raise UsageError(
            f"--max-memory {max_memory!r}: not a finite size; give one such as 512M, 4G or 4GiB"
        ) from None
    return AnalysisOptions(
        method=method,
        time_limit=seconds,
        jobs=default_jobs() if jobs is None else jobs,
        seed=seed,
        max_memory=limit,
    )


EXIT_NOT_PROVED = 4
"""Exit code of a run whose samples agree but whose proof ended without a verdict."""


def _verdict(samples_passed: bool, proof: ProofResult | None) -> tuple[int, str]:
    """The exit code and verdict of a sampled comparison plus an optional proof.

    ``(1, "differs")`` when a sample exceeds the tolerance or the proof replayed a
    counterexample; ``(0, "proved")`` when the proof bounded every output; ``(0, "sampled
    equal")`` when no proof was asked for and the samples agree; ``(4, "not proved")`` when the
    samples agree but the proof ended without a verdict (time limit, a violation that does not
    replay in float32, a model it cannot analyse). Exit 0 never stands for a proof that did not
    happen.
    """
    if not samples_passed or (proof is not None and proof.status == "counterexample"):
        return 1, "differs"
    if proof is None:
        return 0, "sampled equal"
    if proof.proved:
        return 0, "proved"
    return EXIT_NOT_PROVED, "not proved"


@app.command("compress")
def compress_command(
    model: Annotated[str, typer.Argument(metavar="IN", help="Input ONNX model.")],
    output: Annotated[
        str, typer.Argument(metavar="OUT", help="Where to write the compressed model.")
    ],
    input_range: InputRange = None,
    input_range_file: RangeFile = None,
    vnnlib: Vnnlib = None,
    time_limit: TimeLimit = AUTO_TIME_LIMIT,
    method: Method = "auto",
    jobs: Jobs = None,
    seed: Seed = 0,
    samples: Annotated[
        int, typer.Option(min=0, help="Random box samples for verification.")
    ] = 2000,
    max_memory: MaxMemory = None,
    atol: Atol = None,
    rtol: Rtol = None,
    prove: Annotated[
        bool, typer.Option(help="Also prove the output equivalent to the input on the box.")
    ] = False,
    report: Annotated[
        str | None,
        typer.Option(
            "--json",
            "--report",
            help="Write the report as JSON to this file (- for stdout; the tables go to stderr).",
        ),
    ] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Compress MODEL exactly on the input box and write OUTPUT (only if it verifies)."""
    _State.verbose = verbose
    _load_runtime()
    tol_abs = parse_tolerance(atol, "--atol", None)
    tol_rel = parse_tolerance(rtol, "--rtol", DEFAULT_RTOL)
    console = _console(quiet, report)
    plan_run_paths(
        models=[("the input model", model)],
        domain_files=[("--input-range-file", input_range_file), ("--vnnlib", vnnlib)],
        output_model=output,
        outputs=[("--json", report)],
    )
    with _progress(not quiet) as progress:
        result = compress(
            model,
            output,
            DomainSpec(input_range or (), input_range_file, vnnlib),
            _options(method, time_limit, jobs, seed, max_memory),
            samples=samples,
            atol=tol_abs,
            rtol=tol_rel,
            prove=prove,
            progress=progress,
        )
    run = result.report
    render(run, console)
    if report:
        write_file_atomic(report, run.write_json)
    if not run.passed:
        Console(stderr=True).print(
            f"onnx-exact: verification FAILED (max abs diff {run.verification.max_abs_diff:.3g}"
            f"{', the proof found a counterexample' if run.proof is not None else ''}); "
            f"'{output}' was not written. Please report this with the model and domain."
        )
        raise typer.Exit(1)
    code, _ = _verdict(run.passed, run.proof)
    if code == EXIT_NOT_PROVED:
        console.print(
            f"wrote {output}: it matches the input on every sample, but its equivalence is "
            f"{NOT_PROVED_LINE} (the proof did not finish; exit code {code})"
        )
        raise typer.Exit(code)
    console.print(f"wrote {output}")


@app.command("analyze")
def analyze_command(
    model: Annotated[str, typer.Argument(metavar="IN", help="Input ONNX model.")],
    input_range: InputRange = None,
    input_range_file: RangeFile = None,
    vnnlib: Vnnlib = None,
    time_limit: TimeLimit = AUTO_TIME_LIMIT,
    method: Method = "auto",
    jobs: Jobs = None,
    seed: Seed = 0,
    max_memory: MaxMemory = None,
    json_path: Annotated[
        str | None,
        typer.Option(
            "--json",
            "--report",
            help="Write the analysis as JSON to this file (- for stdout; the tables go to stderr).",
        ),
    ] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Report which ReLU neurons of MODEL are stable on the input box (writes no model)."""
    _State.verbose = verbose
    _load_runtime()
    plan_run_paths(
        models=[("the input model", model)],
        domain_files=[("--input-range-file", input_range_file), ("--vnnlib", vnnlib)],
        outputs=[("--json", json_path)],
    )
    with _progress(not quiet) as progress:
        result = analyze(
            model,
            DomainSpec(input_range or (), input_range_file, vnnlib),
            _options(method, time_limit, jobs, seed, max_memory),
            progress=progress,
        )
    render(result.report, _console(quiet, json_path))
    if json_path:
        write_file_atomic(json_path, result.report.write_json)


class _Interrupted:
    signum: int = signal.SIGINT


@app.command("check")
def check_command(
    reference: Annotated[str, typer.Argument(metavar="A", help="Reference ONNX model.")],
    candidate: Annotated[str, typer.Argument(metavar="B", help="Model to compare against it.")],
    input_range: InputRange = None,
    input_range_file: RangeFile = None,
    vnnlib: Vnnlib = None,
    atol: Atol = None,
    rtol: Rtol = None,
    samples: Annotated[int, typer.Option(min=0, help="Random box samples.")] = 10_000,
    seed: Seed = 0,
    prove: Annotated[
        bool, typer.Option(help="Prove max |f_A - f_B| <= atol on the box (ReLU nets).")
    ] = True,
    time_limit: Annotated[
        str,
        typer.Option(
            help="Seconds for the proof, or 'none' for no limit; on expiry it is 'not proved'."
        ),
    ] = "600",
    counterexample: Annotated[
        str | None, typer.Option(help="Save a counterexample input here (.npy).")
    ] = None,
    json_path: Annotated[
        str | None,
        typer.Option(
            "--json",
            "--report",
            help="Write the result as JSON to this file (- for stdout; the tables go to stderr).",
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Worker processes of the proof: the exact tiers on units found in one model "
            "only, and the per-output MILPs, in parallel. Default: the cores this process may "
            "use, at most 8; --jobs 1 runs everything in this process.",
            show_default=False,
        ),
    ] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Are A and B the same on the input box? Samples, then a proof (exit 1 if they differ)."""
    _State.verbose = verbose
    _load_runtime()
    plan_run_paths(
        models=[("the reference model", reference), ("the candidate model", candidate)],
        domain_files=[("--input-range-file", input_range_file), ("--vnnlib", vnnlib)],
        outputs=[
            (
                "--counterexample",
                None if counterexample is None else numpy_save_path(counterexample),
            ),
            ("--json", json_path),
        ],
    )
    with _progress(not quiet) as progress:
        result = check(
            reference,
            candidate,
            DomainSpec(input_range or (), input_range_file, vnnlib),
            atol=parse_tolerance(atol, "--atol", DEFAULT_ATOL),
            rtol=parse_tolerance(rtol, "--rtol", DEFAULT_RTOL),
            samples=samples,
            seed=seed,
            prove=prove,
            time_limit=_time_limit(time_limit),
            counterexample_path=counterexample,
            jobs=default_jobs() if jobs is None else jobs,
            progress=progress,
        )
    code, verdict = _verdict(result.sampled.passed, result.proof)
    console = _console(quiet, json_path)
    render_check(result, console)
    if json_path:
        payload = {**json_header(), **result.to_json()}
        payload.update(passed=code == 0, verdict=verdict, exit_code=code)

        def dump(temporary: str) -> None:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=2)

        write_file_atomic(json_path, dump)
    if code:
        raise typer.Exit(code)


_show_other_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The tool's own warnings as one line on stderr, before the run; others as Python shows them."""
    shortfall = globals().get("MemoryShortfallWarning")
    if shortfall is not None and issubclass(category, shortfall):
        print(f"onnx-exact: warning: {message}", file=sys.stderr, flush=True)
    else:
        _show_other_warning(message, category, filename, lineno, file, line)


def _on_signal(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM: kill the worker processes, then unwind like Ctrl-C; nothing is written
    before verification passed.

    Only the first signal does so: the run is unwinding from then on (and
    :func:`onnx_exact.interrupts.end_on_signals` ends it within its grace period whatever
    happens). A second ``KeyboardInterrupt`` raised into that unwinding, by a second Ctrl-C or
    by a signal simulated after the first was swallowed inside a HiGHS callback, could escape
    the handler of the first and end the process by SIGINT instead of the first signal's code.
    """
    if interrupt_requested() is not None:
        return
    _Interrupted.signum = signum
    request_interrupt(signum)
    shutdown_pools(kill=True)  # safe here: no lock, no waiting for the workers' solves
    raise KeyboardInterrupt


def _exit_interrupted() -> None:
    """End a run that a signal interrupted: its one line (unless the watcher thread of
    :func:`onnx_exact.interrupts.end_on_signals` printed it) and the signal's exit code."""
    if claim_interrupt_report():
        print(interrupted_message(_Interrupted.signum), file=sys.stderr)
    sys.exit(INTERRUPT_EXIT_CODES[_Interrupted.signum])


def wants_version(args: list[str]) -> bool:
    """``--version`` / ``-V`` anywhere before a ``--``."""
    options = args[: args.index("--")] if "--" in args else args
    return "--version" in options or "-V" in options


TOLERANCE_OPTIONS = ("--atol", "--rtol")


def normalise_args(args: list[str]) -> list[str]:
    """The command line as the parser takes it, from the forms users bring from other tools.

    * ``compress`` is implied unless a command or one of :data:`TOP_LEVEL_OPTIONS` comes first
      (``onnx-exact IN OUT ...`` and ``onnx-exact -r '[0,1]' IN OUT``).
    * Polygraphy's ``--atol 1e-5 logits:1e-4`` (several values after one option) becomes
      ``--atol 1e-5 --atol logits:1e-4``: every token after the option's value that reads as a
      tolerance (:func:`onnx_exact.core.tolerance.is_tolerance`) is given the option again.
    """
    if args and args[0] not in SUBCOMMANDS and args[0] not in TOP_LEVEL_OPTIONS:
        args = ["compress", *args]
    out: list[str] = []
    option, awaiting_value = None, False
    for index, token in enumerate(args):
        if token == "--":
            return out + args[index:]
        if option is not None:
            if awaiting_value:  # the option's own value, whatever it looks like
                out.append(token)
                awaiting_value = False
                continue
            if is_tolerance(token):
                out += [option, token]
                continue
            option = None
        out.append(token)
        name = token.partition("=")[0]
        if name in TOLERANCE_OPTIONS:
            option, awaiting_value = name, "=" not in token
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point: implied ``compress``, one-line errors, documented exit codes."""
    args = normalise_args(list(sys.argv[1:] if argv is None else argv))
    if wants_version(args):
        print(f"onnx-exact {__version__}")
        sys.exit(0)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    warnings.showwarning = _show_warning
    try:
        exit_code = app(args=args, prog_name="onnx-exact", standalone_mode=False)
        raise_if_interrupted()  # typer turns a KeyboardInterrupt into a returned 130
    except OnnxExactError as err:
        print(f"onnx-exact: error: {err}", file=sys.stderr)
        if _State.verbose:
            traceback.print_exc()
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _exit_interrupted()
    except _PARSER_ERROR as err:
        print(f"onnx-exact: error: {err.format_message()} (see onnx-exact --help)", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - the last line of defence: never a traceback
        if interrupt_requested() is not None:  # the signal surfaced as another error: an
            _exit_interrupted()  # interrupted C-extension import raises ImportError, for one
        print(
            f"onnx-exact: internal error: {type(err).__name__}: {err}. This is a bug: please report "
            "it with the command line (run again with --verbose for the traceback).",
            file=sys.stderr,
        )
        if _State.verbose or "--verbose" in args or "-v" in args:
            traceback.print_exc()
        sys.exit(3)
    finally:  # the run's workers end with it, idle or (after an error) still solving
        shutdown_pools(kill=True)
    sys.exit(exit_code if isinstance(exit_code, int) else 0)
