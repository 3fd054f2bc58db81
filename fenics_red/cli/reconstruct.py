"""``fenics-red reconstruct``: modulus estimates of a data set's samples (paper, equations 6-9)."""

from __future__ import annotations

from mpi4py import MPI

import numpy as np

from ..methods import DEFAULT_METHOD, METHODS, check_options, method_names
from ..reconstruction import reconstruct_dataset
from . import add_method_arguments, check_not_input, method_options
from .simulate import check_pixel_memory


def register(subparsers) -> None:
    methods = "; ".join(f"{name}: {METHODS[name].description}" for name in method_names())
    parser = subparsers.add_parser(
        "reconstruct", help="reconstruct the modulus of data set samples with a method",
        description="Estimate the Young's modulus of one sample (--sample i, the mesh spread "
                    "over all MPI ranks) or of every sample (--all, the samples spread over the "
                    "ranks) of a data set made by 'fenics-red simulate' or 'import', and write "
                    "estimates, truths, solver histories and the method's settings to an HDF5 "
                    "file; for a measurement (fenics-red import) also the modulus in its layout "
                    "and units, XDMF and a figure (OUT-modulus.*). An "
                    "interrupted --all run resumes from OUT.partial. With --uncertainty (ml, "
                    "gn-tikhonov) the file also holds the posterior standard deviation map "
                    "'std' (docs/uncertainty.md). A method's options are "
                    f"in the groups that name it. Methods: {methods}.")
    parser.add_argument("data", metavar="DATA.h5",
                        help="data set (from fenics-red simulate or fenics-red import)")
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=method_names(),
                        help="reconstruction method (default %(default)s)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--sample", type=int, metavar="I", help="reconstruct sample I only")
    which.add_argument("--all", action="store_true", help="reconstruct every sample")
    parser.add_argument("--out", required=True, help="output HDF5 file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (an unfinished run of other settings is "
                             "discarded; one of these settings is continued)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="samples per rank between two writes of the file (default "
                             "%(default)s)")
    add_method_arguments(parser)
    parser.set_defaults(func=run)


def options_from_args(args) -> dict:
    """The options of ``--method`` the user gave, validated (see :mod:`fenics_red.methods`); a
    flag of other methods only is an error."""
    options = method_options(args, [args.method], named_by="--method").get(args.method, {})
    check_options(args.method, options)  # bad values are reported before any work
    return options


def _measurement(data, out, overwrite: bool, comm) -> dict | None:
    """How an imported measurement was read (``None`` for a simulated data set); its outputs in
    the user's layout are checked before any work."""
    from ..data import load_dataset
    from ..io import check_output_path
    from ..measured import export_paths
    from ..parallel import on_root

    def read():
        with load_dataset(data, check_data=False) as dataset:
            measurement = dataset.measurement
        if measurement is not None:
            inputs = [("DATA.h5", data),
                      ("the measurement it was imported from", measurement["source"]["file"]),
                      ("the mesh it was imported with",  # absolute, as resolved at import
                       measurement["source"].get("mesh_file", measurement["settings"].get("mesh"))),
                      ("the facets file it was imported with",
                       measurement["source"].get("facets_file"))]
            for path in export_paths(out, measurement, heavy=True):
                check_not_input(path, inputs, "the estimate's extra output")
                check_output_path(path, overwrite)
        return measurement

    return on_root(comm, read)


def _warn_about_fits(path) -> None:
    """One warning for the samples whose ML estimate fits the data far worse than their noise
    level (:func:`fenics_red.reconstruction.misfit_problem`), whatever the run's verbosity."""
    import warnings

    from ..reconstruction import load_history, load_reconstructions, misfit_problem

    index = load_reconstructions(path).index
    problems = {int(i): misfit_problem(load_history(path, row)[1]) for row, i in enumerate(index)}
    bad = [i for i, problem in problems.items() if problem]
    if bad:
        which = f"sample {bad[0]}" if len(bad) == 1 else f"{len(bad)} samples (first {bad[0]})"
        warnings.warn(f"{which}: {problems[bad[0]]}", UserWarning, stacklevel=2)


def run(args) -> int:
    comm = MPI.COMM_WORLD
    indices = None if args.all else [args.sample]
    if args.sample is not None and args.sample < 0:
        raise ValueError(f"--sample must be a non-negative sample index, got {args.sample}")
    options = options_from_args(args)
    check_pixel_memory(args.data, [options.get("pixel")], comm)
    measurement = _measurement(args.data, args.out, args.overwrite, comm)
    path = reconstruct_dataset(args.data, args.out, comm, args.method, options,
                               indices=indices, overwrite=args.overwrite,
                               progress=not args.quiet, batch_size=args.batch_size)
    if measurement is not None:  # the estimate in the user's layout and units, XDMF, figure
        from ..measured import export_estimates

        written = export_estimates(args.data, path, comm, args.overwrite, args.method)
        if comm.rank == 0 and not args.quiet:
            print(f"{measurement['output']['meaning']}: wrote "
                  + ", ".join(str(p) for p in written))
    if comm.rank == 0:
        _warn_about_fits(path)
    if comm.rank == 0 and not args.quiet:
        from ..reconstruction import load_reconstructions

        result = load_reconstructions(path)
        n = len(result.estimates)
        if result.truth is None:  # a real measurement: nothing to compare with
            print(f"wrote {path}: {n} estimate(s) by {args.method} (no truth in the data set)")
        else:
            errors = [float(((e - t) ** 2).sum() ** 0.5 / (t**2).sum() ** 0.5)
                      for e, t in zip(result.estimates, result.truth, strict=True)]
            print(f"wrote {path}: {n} estimate(s) by {args.method}, mean relative error "
                  f"{sum(errors) / n:.3f}")
        if result.attrs["settings"].get("uncertainty") is not None:
            from ..reconstruction import load_std
            from ..uncertainty import coverage

            std = load_std(path)
            line = f"posterior standard deviation 'std': median {float(np.median(std)):.3g}"
            if result.truth is not None:
                inside = coverage(result.truth, result.estimates, std)
                line += f", truth within ±2σ at {100 * inside:.1f} % of the nodes"
            print(line)
    return 0
