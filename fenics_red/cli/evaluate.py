"""``fenics-red evaluate``: every method on every sample, metrics, tables and figures (Fig. 2-3)."""

from __future__ import annotations

import argparse

from mpi4py import MPI

from ..methods import METHODS, get_method, method_names
from . import add_method_arguments, method_options
from .simulate import check_pixel_memory


def _index_list(text: str) -> tuple[int, ...]:
    """``"0,3,5-7"`` -> ``(0, 3, 5, 6, 7)``."""
    indices = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                if hi < lo:
                    raise ValueError
                indices.extend(range(lo, hi + 1))
            else:
                indices.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"takes non-negative indices like 0,3,5-7 (ranges low-high), got {text!r}"
            ) from None
    return tuple(indices)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="run several methods on a data set and compare them",
        description="Run each method on each sample (resumable: runs already in OUT are "
                    "reused), then write metrics.csv, metrics.json, summary.md and per-sample "
                    "figures (truth and estimates on one colour scale; a cross-section profile). "
                    "A method's options are in the groups that name it; each goes to every "
                    "method in --methods that takes it.")
    parser.add_argument("dataset", help="data set file (.h5) from 'fenics-red simulate'")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods (default %(default)s); registered: "
                             + ", ".join(method_names()))
    parser.add_argument("--out", required=True, help="output folder")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--samples", type=_index_list, default=None,
                       help="sample indices, e.g. 0,3,5-7 (default: all)")
    group.add_argument("--first", type=int, default=None, metavar="N",
                       help="evaluate the first N samples")
    parser.add_argument("--figures", type=int, default=None, metavar="N",
                        help="draw figures (and XDMF files) for the first N evaluated samples "
                             "only (default: all)")
    parser.add_argument("--xdmf", action="store_true",
                        help="also write truth and estimates as XDMF files for ParaView")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard earlier results in OUT and start again (the new results "
                             "are built in OUT.partial and replace OUT's only when complete; "
                             "the same command resumes an interrupted run)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_method_arguments(parser)
    parser.set_defaults(func=run)


def settings_from_args(args):
    from ..evaluation import EvaluationSettings

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for name in methods:  # an unknown name first, before the flags that name methods
        get_method(name)
    options = method_options(args, methods)
    if args.first is not None and args.first < 1:
        raise ValueError(f"--first must be a positive number of samples, got {args.first}")
    samples = args.samples if args.first is None else tuple(range(args.first))
    return EvaluationSettings(methods, options, samples, figures=args.figures != 0,
                              xdmf=args.xdmf, figure_limit=args.figures)


def run(args) -> int:
    from ..evaluation import evaluate, summary_table

    comm = MPI.COMM_WORLD
    settings = settings_from_args(args)
    check_pixel_memory(args.dataset, [o.get("pixel") for o in settings.options.values()], comm)
    summary = evaluate(args.dataset, args.out, settings, comm, overwrite=args.overwrite,
                       progress=not args.quiet)
    if comm.rank == 0:
        if summary:  # empty without truth: no metrics
            print(summary_table(summary, settings.methods), end="")
        print(f"wrote {args.out}/: "
              + ("metrics.csv, metrics.json, " if summary else "estimates/, ") + "summary.md"
              + (", figures/" if settings.figures else "") + (", xdmf/" if settings.xdmf else ""))
    return 0
