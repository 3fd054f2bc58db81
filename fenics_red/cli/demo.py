"""``fenics-red demo``: the main job on a built-in phantom, results in one folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mpi4py import MPI

from ..forward import ElasticityModel, ForwardSettings
from ..grid import ImageGrid
from ..io import atomic_output


def builtin_phantom(grid: ImageGrid) -> np.ndarray:
    """A stiff circular inclusion (0.45) in a soft background (0.12), the paper's units."""
    rows, cols = np.mgrid[0: grid.ny + 1, 0: grid.nx + 1]
    y = grid.height - rows * grid.spacing[1]
    x = cols * grid.spacing[0]
    inside = (x - 0.55 * grid.width) ** 2 + (y - 0.5 * grid.height) ** 2 < (0.18 * grid.width) ** 2
    return np.where(inside, 0.45, 0.12)


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the main job on a built-in phantom",
                                   description="Simulate the built-in phantom and write the "
                                               "results to a folder.")
    parser.add_argument("--out", default="demo-output", help="output folder (default %(default)s)")
    parser.add_argument("--grid", type=int, default=64, help="cells per side (default %(default)s)")
    parser.set_defaults(func=run)


def run(args) -> int:
    comm = MPI.COMM_WORLD
    out = Path(args.out)
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    grid = ImageGrid(args.grid, args.grid)
    modulus = builtin_phantom(grid)
    settings = ForwardSettings()
    model = ElasticityModel.on_grid(grid, comm, settings)
    model.solve(modulus)
    ux, uy = model.displacement_images()
    model.destroy()
    if comm.rank == 0:
        with atomic_output(out / "phantom.npz", overwrite=True) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, E=modulus, ux=ux, uy=uy,
                     settings=np.array(json.dumps(settings.to_dict())))
        from ..visualise_forward import plot_forward

        plot_forward(modulus, ux, uy, out / "forward.png")
        print(f"demo results in {out.resolve()}/: phantom.npz, forward.png")
    comm.Barrier()
    return 0
