"""Cost of the posterior standard deviation map (``--uncertainty``) against the estimate's.

    scripts/env python benchmarks/uncertainty.py                  # 64² and 128², 1 rank
    scripts/env mpirun -n 2 python benchmarks/uncertainty.py      # the mesh over 2 ranks

Sample 0 of seed 7100 at 35 dB; for ``ml`` and ``gn-tikhonov``: the estimate's time, one
Hessian product (the misfit Hessian the map uses), the map at ranks 100, 200 and 400 (+10
oversampling): all of it, the eigenpairs (``2(k+p)`` products, the Gram-Schmidt pass and the prior
solves) and ``diag(P⁻¹)``; and the smallest kept eigenvalue relative to the prior (below ~0.1 the
truncation leaves out little). Writes ``benchmarks/results/uncertainty.md`` at full size only.
"""

import sys
import time
from pathlib import Path

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMALL, Meter, record  # noqa: E402

from fenics_red.data import SimulationSettings, simulate_sample  # noqa: E402
from fenics_red.methods import get_method  # noqa: E402
from fenics_red.raster import ImageGrid  # noqa: E402
from fenics_red.uncertainty import UncertaintyRunner, UncertaintySettings  # noqa: E402

comm = MPI.COMM_WORLD
sizes = (16,) if SMALL else (64, 128)
ranks = (20,) if SMALL else (100, 200, 400)
rows = []
for n in sizes:
    grid = ImageGrid(n, n)
    settings = SimulationSettings(grid, seed=7100)
    sample = simulate_sample(0, settings)
    for method in ("ml", "gn-tikhonov"):
        runner = get_method(method).setup(grid, settings.forward, comm, {})
        try:
            meter = Meter()
            t = time.perf_counter()
            estimate, _, info = runner.run(sample)
            estimate_s = time.perf_counter() - t
            for k in ranks:
                wrapped = UncertaintyRunner(method, runner, UncertaintySettings(rank=k))
                t = time.perf_counter()
                _, _, extra, _ = wrapped.run_with_std(sample)  # the estimate again, then σ
                products = extra["uncertainty_hessian_products"]
                rows.append({
                    "cells": f"{n}x{n}", "ranks": comm.size, "method": method, "k": k,
                    "estimate [s]": estimate_s, "σ map [s]": extra["uncertainty_time"],
                    "eigenpairs [s]": extra["uncertainty_eigen_time"],
                    "Hessian products": products,
                    "per product [ms]": 1e3 * extra["uncertainty_eigen_time"] / products,
                    "σ map / estimate": extra["uncertainty_time"] / estimate_s,
                    "λ_k": extra["uncertainty_smallest_eigenvalue"],
                    **meter.columns(comm)})
                if comm.rank == 0:
                    print(rows[-1], flush=True)
        finally:
            runner.destroy()

if comm.rank == 0:
    table = record("uncertainty", rows, ("cells", "ranks", "method", "k"),
                   "Posterior standard deviation map: cost against the estimate",
                   "Sample 0 of seed 7100 at 35 dB. 'σ map' = the eigenpairs of H v = λ P v "
                   "(double pass, k + 10 vectors) plus the exact diag(P⁻¹) and, for ml, the "
                   "matched prior weight; 'per product' = eigenpairs time / Hessian products "
                   "(an upper bound: it includes Gram-Schmidt and prior solves). λ_k: smallest "
                   "kept eigenvalue relative to the prior.")
    print(table)
