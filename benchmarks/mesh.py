"""Meshes of ``meshes/``: reading, forward solve and raster, serially and on 2 ranks.

    scripts/env python benchmarks/mesh.py
    scripts/env mpirun -n 2 python benchmarks/mesh.py

For each mesh: the time to read the gmsh file and distribute it (``Domain.from_file``), to build
the forward model (forms compiled on first use, then cached), the first solve (assembly and the
MUMPS factorisation) and a repeated one (back-substitution), and, on the 2-D meshes, to build the
raster (locating the pixels in the cells) and to apply it both ways.
"""

import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMALL, best_of, record  # noqa: E402

from fenics_red.domain import Domain  # noqa: E402
from fenics_red.forward import ElasticityModel  # noqa: E402

MESHES = Path(__file__).resolve().parents[1] / "meshes"


def _timed(fn):
    MPI.COMM_WORLD.Barrier()
    start = time.perf_counter()
    result = fn()
    MPI.COMM_WORLD.Barrier()
    return result, time.perf_counter() - start


def main(names=("roi-2d", "sector-2d", "box-3d")):
    comm = MPI.COMM_WORLD
    rows = []
    for name in names:
        domain, t_read = _timed(lambda n=name: Domain.from_file(MESHES / f"{n}.msh", comm))
        model, t_model = _timed(lambda d=domain: ElasticityModel(d))
        model.set_modulus(np.full(model.E.x.array.shape, 0.2))
        _, t_first = _timed(model.solve)
        t_again = best_of(model.solve)
        row = {"mesh": name, "nodes": domain.num_file_nodes, "ranks": comm.size,
               "read [s]": t_read, "model [s]": t_model, "first solve [s]": t_first,
               "again [s]": t_again, "raster build [s]": "", "image [s]": "",
               "back [s]": "", "pixels": ""}
        if domain.dim == 2:
            raster, t_raster = _timed(lambda m=model: m.images("Q"))
            values = model.E.x.array
            row.update({"raster build [s]": t_raster,
                        "image [s]": best_of(lambda r=raster, v=values: r.to_images(v)),
                        "back [s]": best_of(lambda r=raster, v=values: r.from_images(
                            r.to_images(v), np.empty_like(v))),
                        "pixels": "x".join(map(str, raster.grid.shape))})
        rows.append(row)
        model.destroy()
        if comm.rank == 0:
            print(row, flush=True)
    if comm.rank == 0:
        print(record("mesh", rows, ("mesh", "ranks"), "Meshes: reading, forward solve, raster",
                     "Times of rank 0 between barriers; 'again' is a back-substitution; "
                     "'back' is image and way back together."))


if __name__ == "__main__":
    main(names=("roi-2d",)) if SMALL else main()  # make bench SIZE=small
