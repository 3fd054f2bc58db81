"""The ``fenics-red`` command line: one module per subcommand in this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Errors in the user's input (``ValueError``, ``OSError``, ...) are reported
in one line with a non-zero exit; under MPI a failure on any rank ends the whole run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "build_parser"]

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ["demo", "forward", "simulate", "reconstruct", "train", "evaluate", "show"]

#: Exceptions that describe bad input rather than a bug: reported without a traceback.
USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="fenics-red",
        description="Ultrasound elastography: forward model, synthetic data and reconstruction "
                    "of the Young's modulus by regularisation by denoising (RED).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None, abort_on_error: bool | None = None) -> int:
    """Run the command line; return the exit status.

    With ``abort_on_error`` (default: when run as a program on more than one rank) an error on
    one rank calls ``MPI_Abort`` so that the other ranks do not wait for it forever.
    """
    from mpi4py import MPI

    args = build_parser().parse_args(argv)
    # Importing DOLFINx (done by building the parser) turns on logging.captureWarnings, which
    # sends Python warnings to a logger without a handler: a command's warnings (data noisier
    # than the denoiser's training data, say) would vanish. Give them back to stderr.
    logging.captureWarnings(False)
    comm = MPI.COMM_WORLD
    if abort_on_error is None:
        abort_on_error = comm.size > 1 and argv is None
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        where = f"[rank {comm.rank}] " if comm.size > 1 else ""
        print(f"fenics-red {args.command}: error: {where}{error}", file=sys.stderr, flush=True)
        if abort_on_error:
            comm.Abort(2)
        return 2
    except BaseException:
        if abort_on_error:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)
        raise


def console_main() -> None:  # pragma: no cover - the installed entry point
    sys.exit(main())
