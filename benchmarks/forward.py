"""Forward-model benchmark: assembly and solve times for 64^2 to 512^2 cells (1 or more ranks).

    scripts/env python benchmarks/forward.py
    scripts/env mpirun -n 2 python benchmarks/forward.py
"""

import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMALL, best_of, record  # noqa: E402

from fenics_red import ElasticityModel, ForwardSettings, ImageGrid  # noqa: E402


def main(sizes=(64, 128, 256, 512)):
    comm = MPI.COMM_WORLD
    rows = []
    for n in sizes:
        grid = ImageGrid(n, n)
        for solver in ("lu", "gamg"):
            model = ElasticityModel.on_grid(grid, comm, ForwardSettings(solver=solver))
            modulus = np.random.default_rng(0).uniform(0.1, 0.8, grid.shape)
            model.set_modulus(modulus)
            t_K = best_of(model.assemble_K)
            t_D = best_of(lambda m=model: m.assemble_D(m.u))
            model.modulus_changed()
            comm.Barrier()
            start = time.perf_counter()
            model.solve()
            t_first = time.perf_counter() - start
            t_again = best_of(model.solve)  # K unchanged: LU reuses its factors
            rows.append({"cells": f"{n}x{n}", "dofs": model.V.dofmap.index_map.size_global * 2,
                         "ranks": comm.size, "solver": solver, "K assembly [s]": t_K,
                         "D(u) assembly [s]": t_D, "solve, new K [s]": t_first,
                         "solve, same K [s]": t_again,
                         "iterations": model.ksp.getIterationNumber()})
            model.destroy()
            if comm.rank == 0:
                print(rows[-1], flush=True)
    if comm.rank == 0:
        print(record("forward", rows, ("cells", "ranks", "solver"),
                     "Forward model: assembly and solve",
                     "'solve, new K' includes the LU factorisation or the GAMG setup; "
                     "'same K' is a back-substitution (LU) or a fresh CG solve (GAMG)."))


if __name__ == "__main__":
    main(sizes=(8,)) if SMALL else main()  # make bench SIZE=small
