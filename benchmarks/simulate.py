"""Data simulation benchmark: samples per second for 64^2 and 128^2 grids (1 or more ranks).

    scripts/env python benchmarks/simulate.py
    scripts/env mpirun -n 2 python benchmarks/simulate.py

Each rank simulates its own samples on ``MPI.COMM_SELF`` (phantom, LU forward solve, noise), so
the rate should grow with the number of ranks until the disk writes on rank 0 dominate.
"""

import sys
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMALL, record  # noqa: E402

from fenics_red.data import SimulationSettings, simulate_dataset  # noqa: E402
from fenics_red.raster import ImageGrid  # noqa: E402


def main(cases=((64, 32), (128, 16))):
    comm = MPI.COMM_WORLD
    rows = []
    folder = Path(comm.bcast(tempfile.mkdtemp(prefix="fenics-red-bench-") if comm.rank == 0
                             else None))
    for n, samples in cases:
        settings = SimulationSettings(ImageGrid(n, n), seed=1)
        path = folder / f"set{n}.h5"
        comm.Barrier()
        start = time.perf_counter()
        simulate_dataset(path, samples, settings, comm, progress=False, overwrite=True)
        elapsed = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
        rows.append({"cells": f"{n}x{n}", "ranks": comm.size, "samples": samples,
                     "time [s]": elapsed, "samples/s": samples / elapsed,
                     "file [MB]": path.stat().st_size / 1e6 if comm.rank == 0 else 0.0})
        if comm.rank == 0:
            print(rows[-1], flush=True)
    if comm.rank == 0:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        print(record("simulate", rows, ("cells", "ranks"), "Synthetic data: simulation rate",
                     "fenics-red simulate: random phantoms, MUMPS LU forward solve per sample on "
                     "COMM_SELF, 35 dB noise, HDF5 written by rank 0 after every batch of 8 "
                     "samples per rank; wall time including the first model set-up."))


if __name__ == "__main__":
    main(cases=((8, 2),)) if SMALL else main()  # make bench SIZE=small
