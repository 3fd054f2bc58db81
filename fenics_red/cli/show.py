"""``fenics-red show``: a figure of one data set sample (modulus, clean and noisy displacements)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mpi4py import MPI

from ..data import load_dataset
from ..io import check_output_path
from ..parallel import on_root

#: The nodal fields of a sample that the figure draws (uz in 3-D only).
_FIELDS = ("E", "ux", "uy", "uz", "ux_noisy", "uy_noisy", "uz_noisy")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "show", help="plot one sample of a data set",
        description="Write a PNG with the modulus, the inclusion mask and the clean and noisy "
                    "lateral (ux) and axial (uy) displacement images of one sample.")
    parser.add_argument("dataset", help="data set file (.h5) from 'fenics-red simulate'")
    parser.add_argument("--sample", type=int, default=0, help="sample index (default 0)")
    parser.add_argument("--out", required=True, help="output PNG file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=run)


def run(args) -> int:
    comm = MPI.COMM_WORLD
    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file (show writes a PNG image), got "
                         f"{args.out!r}")
    check_output_path(args.out, args.overwrite)  # on every rank, so all fail together
    with load_dataset(args.dataset, check_data=False) as dataset:
        n = len(dataset)
        if not 0 <= args.sample < n:
            raise ValueError(f"--sample {args.sample} does not exist: {args.dataset!r} has {n} "
                             f"samples (0 to {n - 1})")
        dataset.check_values(range(args.sample, args.sample + 1))  # the one sample drawn
        sample = dataset.sample(args.sample)
        grid = dataset.grid
        if dataset.mesh is not None:  # a mesh data set is drawn through its raster
            from ..raster import ValueRaster

            raster = ValueRaster(dataset.mesh, grid)
            images = {name: raster.image(getattr(sample, name)) for name in _FIELDS
                      if getattr(sample, name) is not None}
            if sample.mask is not None:
                images["mask"] = raster.labels(sample.mask)
            sample = dataclasses.replace(sample, **images)
    def plot():
        from ..visualise import plot_sample

        plot_sample(sample, args.out, grid, overwrite=args.overwrite)
        print(f"wrote {args.out}: sample {args.sample} of {args.dataset}")

    on_root(comm, plot)
    return 0
