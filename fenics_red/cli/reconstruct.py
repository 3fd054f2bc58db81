"""``fenics-red reconstruct``: modulus estimates of a data set's samples (paper, equations 6-9)."""

from __future__ import annotations

from mpi4py import MPI

from ..methods import METHODS, method_names
from ..reconstruction import reconstruct_dataset


def register(subparsers) -> None:
    methods = "; ".join(f"{name}: {METHODS[name].description}" for name in method_names())
    parser = subparsers.add_parser(
        "reconstruct", help="reconstruct the modulus of data set samples with a method",
        description="Estimate the Young's modulus of one sample (--sample i, the mesh spread "
                    "over all MPI ranks) or of every sample (--all, the samples spread over the "
                    "ranks) of a data set made by 'fenics-red simulate', and write estimates, "
                    "truths, solver histories and the method's settings to an HDF5 file. An "
                    f"interrupted --all run resumes from OUT.partial. Methods: {methods}.")
    parser.add_argument("data", metavar="DATA.h5", help="data set (from fenics-red simulate)")
    parser.add_argument("--method", default="ml", choices=method_names(),
                        help="reconstruction method (default %(default)s)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--sample", type=int, metavar="I", help="reconstruct sample I only")
    which.add_argument("--all", action="store_true", help="reconstruct every sample")
    parser.add_argument("--out", required=True, help="output HDF5 file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (and discard an unfinished run)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="budget of iterations (default: the method's)")
    parser.add_argument("--stop", choices=["discrepancy", "budget"], default=None,
                        help="stopping rule: the discrepancy principle (misfit reaches the "
                             "number of free equations, or the budget) or the budget alone "
                             "(default: the method's)")
    parser.add_argument("--solver", choices=["fista", "pgd"], default=None,
                        help="iteration: monotone FISTA or projected gradient descent "
                             "(default: the method's)")
    red = parser.add_argument_group("denoiser methods (red, denoised-ml)")
    red.add_argument("--denoiser", default=None, metavar="MODEL.pt",
                     help="denoiser model from 'fenics-red train' (default: the shipped one)")
    red.add_argument("--lam", default=None, metavar="RULE",
                     help="RED weight: a number, paper:C (eq. 12), balance:C or lipschitz:C "
                          "(default: the method's)")
    red.add_argument("--start", choices=["denoised-ml", "ml", "homogeneous"], default=None,
                     help="RED's initial modulus (default denoised-ml)")
    red.add_argument("--min-misfit-decrease", type=float, default=None, metavar="C",
                     help="RED stops at the first round that lowers the data misfit by less "
                          "than C standard deviations sqrt(2n) and keeps the iterate before it "
                          "(default 1; 0 turns it off)")
    red.add_argument("--no-flip-average", action="store_true",
                     help="apply the denoiser as it is, not averaged over left-right flips")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="samples per rank between two writes of the file (default "
                             "%(default)s)")
    parser.set_defaults(func=run)


def options_from_args(args) -> dict:
    """The generic method options the user gave (see :mod:`fenics_red.methods`)."""
    options = {}
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps must be a positive integer, got {args.max_steps}")
        options["max_steps"] = args.max_steps
    if args.stop is not None:
        options["stop"] = args.stop
    if args.solver is not None:
        options["solver"] = args.solver
    denoiser_options = {  # option -> (the flag that sets it, its value or None)
        "denoiser": ("--denoiser", args.denoiser), "lam": ("--lam", args.lam),
        "start": ("--start", args.start),
        "min_misfit_decrease": ("--min-misfit-decrease", args.min_misfit_decrease),
        "flip_average": ("--no-flip-average", False if args.no_flip_average else None)}
    for name, (flag, value) in denoiser_options.items():
        if value is not None:
            if args.method not in ("red", "denoised-ml"):
                raise ValueError(f"{flag} applies to the methods red and denoised-ml, not "
                                 f"{args.method!r}")
            options[name] = value
    return options


def run(args) -> int:
    comm = MPI.COMM_WORLD
    indices = None if args.all else [args.sample]
    if args.sample is not None and args.sample < 0:
        raise ValueError(f"--sample must be a non-negative sample index, got {args.sample}")
    path = reconstruct_dataset(args.data, args.out, comm, args.method, options_from_args(args),
                               indices=indices, overwrite=args.overwrite,
                               progress=not args.quiet, batch_size=args.batch_size)
    if comm.rank == 0 and not args.quiet:
        from ..reconstruction import load_reconstructions

        result = load_reconstructions(path)
        errors = [float(((e - t) ** 2).sum() ** 0.5 / (t**2).sum() ** 0.5)
                  for e, t in zip(result.estimates, result.truth)]
        mean = sum(errors) / len(errors)
        print(f"wrote {path}: {len(errors)} estimate(s) by {args.method}, mean relative error "
              f"{mean:.3f}")
    return 0
