"""The ``fenics-red`` command line: one module per subcommand in this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Errors in the user's input (``ValueError``, ``OSError``, ...) are reported
in one line with a non-zero exit; under MPI a failure on any rank ends the whole run.

The command line names no reconstruction method: the commands that run methods loop over the
registry of :mod:`fenics_red.methods` for their flags (:func:`add_method_arguments`) and options
(:func:`method_options`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import signal
import sys
import warnings

__all__ = ["main", "Terminated", "build_parser", "add_method_arguments", "method_options"]

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ["demo", "forward", "simulate", "import", "reconstruct", "train", "evaluate", "show"]
#: A command whose module name differs from it (``import`` is a Python keyword).
_MODULES = {"import": "import_"}

#: Exceptions that describe bad input rather than a bug: reported without a traceback.
USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError)


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line in one line (on rank 0 under MPI), not with the usage text."""

    def error(self, message):
        if "expected one argument" in message:
            message += " (write a value that starts with '-', such as -inf, as --option=-inf)"
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            self._print_message(f"{self.prog}: error: {message} (see {self.prog} --help)\n",
                                sys.stderr)
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="fenics-red",
        description="Ultrasound elastography: forward model, synthetic data and reconstruction "
                    "of the Young's modulus by regularisation by denoising (RED).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{_MODULES.get(name, name)}").register(subparsers)
    return parser


def positive_float(text: str) -> float:
    """An option's value that must be a finite number > 0 (sizes): one line when it is not."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of every registered method, each once, in one argument group per set of
    methods that share flags."""
    from ..methods import argument_groups

    for title, flags in argument_groups():
        group = parser.add_argument_group(title)
        for flag in flags:
            flag.add_to(group)


def method_options(args: argparse.Namespace, methods, named_by: str = "--methods",
                   strict: bool = True) -> dict[str, dict]:
    """``{method: overrides}`` of the method flags the user gave, for each of ``methods`` (named by
    the command's flag ``named_by``) that takes them; methods without any are left out. With
    ``strict``, a flag that none of ``methods`` takes is a ``ValueError`` naming the methods that
    do."""
    from ..methods import flag_users, get_method, name_methods

    methods = list(methods)
    for flag, users in flag_users().items():
        if not strict or flag.value(args) is None or set(users) & set(methods):
            continue
        if named_by == "--method":
            raise ValueError(f"{flag.name} applies to {name_methods(users)}, not "
                             f"{methods[0]!r}")
        absent = {1: "it is not", 2: "neither is"}.get(len(users), "none of them is")
        raise ValueError(f"{flag.name} is used by {name_methods(users)}; {absent} in {named_by}")
    options = {name: get_method(name).options_from_args(args) for name in methods}
    return {name: values for name, values in options.items() if values}


def _check_output(args) -> None:
    """Refuse an empty ``--out``, or one that is one of the command's input files (with
    ``--overwrite`` it would be replaced by the output), before any work."""
    out = getattr(args, "out", None)
    if out is not None and not str(out).strip():
        raise ValueError("--out is empty; give the output's name")
    inputs = [(name.replace("_", "-"), item) for name, value in vars(args).items()
              if name not in ("out", "func", "command")
              for item in (value if isinstance(value, list | tuple) else [value])]
    check_not_input(out, inputs)


def check_not_input(out, inputs, what: str = "the output") -> None:
    """Refuse an output file ``out`` that is one of the ``inputs`` (``(name, path)`` pairs; other
    values are skipped), with or without ``--overwrite``: one line naming both, before any work.
    ``what`` names the output (an extra output of the command, say)."""
    if not out or not os.path.exists(out):
        return
    for name, item in inputs:
        if isinstance(item, str | os.PathLike) and str(item) and os.path.exists(item):
            try:
                same = os.path.samefile(item, out)
            except OSError:
                continue
            if same:
                raise ValueError(f"{what} {str(out)!r} is also this command's input ({name}); "
                                 "write the output to another file (nothing was changed)")


def _one_line(error: BaseException) -> str:
    """An error's message on one line. PETSc's is ``error code N`` and its call stack, one
    ``[rank] ...`` line per frame, the last lines saying what is wrong: those are kept."""
    lines = [line.split("] ", 1)[-1].strip() if line.startswith("[") else line.strip()
             for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    if lines[0].startswith("error code"):
        return f"PETSc {lines[0]}: " + "; ".join(reversed(lines[-2:]))
    return " ".join(lines)


class Terminated(KeyboardInterrupt):
    """``SIGTERM`` (a batch system's time limit, ``kill``): ends a command as Ctrl-C does, so
    its files are closed and released and the same command resumes it; status 143."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None, abort_on_error: bool | None = None) -> int:
    """Run the command line; return the exit status.

    With ``abort_on_error`` (default: when run as a program on more than one rank) an error on
    one rank calls ``MPI_Abort`` so that the other ranks do not wait for it forever.
    """
    from mpi4py import MPI

    args = build_parser().parse_args(argv)
    # Importing DOLFINx (done by building the parser) turns on logging.captureWarnings, which
    # sends Python warnings to a logger without a handler: a command's warnings (a method's
    # warnings about the data it is given, say) would vanish. Give them back to stderr.
    logging.captureWarnings(False)
    comm = MPI.COMM_WORLD
    if abort_on_error is None:
        abort_on_error = comm.size > 1 and argv is None
    if comm.size > 1 and argv is None:  # a rank of mpirun: stop when mpirun is killed
        from ..parallel import exit_with_launcher

        exit_with_launcher()
    if argv is None:  # run as a program: SIGTERM (Slurm's time limit) ends it as Ctrl-C does
        signal.signal(signal.SIGTERM, _terminate)
    # a warning is one line, as an error is (Python's format adds a line of the package's code)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = (lambda message, category, *_, **__:
                              f"fenics-red {args.command}: warning: {message}\n")
    try:
        _check_output(args)
        try:
            return int(args.func(args) or 0)
        except USER_ERRORS as error:  # Ctrl-C in a PETSc callback comes back as a PETSc error
            from ..parallel import interruption

            stop = interruption(error)
            if stop is not None:
                raise (Terminated if isinstance(stop, Terminated) else KeyboardInterrupt) \
                    from error
            raise
    except USER_ERRORS as error:
        from ..parallel import failed_together

        # an error raised on every rank is reported once, and every rank ends cleanly
        everywhere = abort_on_error and failed_together(comm, error)
        where = f"[rank {comm.rank}] " if comm.size > 1 and not everywhere else ""
        if comm.rank == 0 or not everywhere:
            print(f"fenics-red {args.command}: error: {where}{_one_line(error)}",
                  file=sys.stderr, flush=True)
        if abort_on_error and not everywhere:
            comm.Abort(2)
        return 2
    except KeyboardInterrupt as stop:
        status, what = ((128 + signal.SIGTERM, "terminated (SIGTERM)")
                        if isinstance(stop, Terminated) else (130, "interrupted"))
        print(f"fenics-red {args.command}: {what}; what was finished is kept: the same "
              "command continues it (train: with --resume)", file=sys.stderr, flush=True)
        if abort_on_error:
            comm.Abort(status)
        return status
    except BaseException:
        if abort_on_error:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)
        raise
    finally:
        warnings.formatwarning = formatwarning


def console_main() -> None:  # pragma: no cover - the installed entry point
    # the threads per rank are set already: importing this module imported fenics_red first
    sys.exit(main())
