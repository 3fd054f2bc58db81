"""P1 locking near ν = 1/2 and the nodal bulk part: model error, its effect on ML, and its cost.

    scripts/env python benchmarks/volumetric.py          # about 10 minutes on 2 idle cores
    scripts/env python benchmarks/run.py volumetric --ranks 1

For each case the same nodal modulus (a stiff ball, contrast 3, radius 0.2, in the unit square or
cube), the probe's traction on top and a clamped bottom, ν = 0.495, with
``ForwardSettings(volumetric="element")`` (plain P1) and ``"nodal"`` (the average-nodal-pressure
bulk part, the default in 3-D and plane strain since 2026-12-02). Columns:

* ``axial error``, ``lateral error``: relative L2 distance of the model's displacement from the
  P2 displacement on the same mesh (:func:`fenics_red.forward.reference_displacement`) at the
  nodes; ``noise at 35 dB``: the axial noise σ over the RMS axial displacement, for scale;
* ``ML from P2 data``: relative RMSE of the ``ml`` estimate (default settings) from the P2
  displacement plus noise at 35 dB (seed 7; σ from the P2 data's energy), i.e. data that no P1
  model made, as a measurement is; ``ML from own data``: from the model's own displacement with
  the same noise draw (the inverse crime);
* ``solve [s]``, ``peak [MB]``: one forward solve with a new ``K`` (assembly, factorisation or
  GAMG set-up, solve; MUMPS LU) and the peak resident memory above the process's base before
  the model was built; ``nonzeros of K``.
"""

import sys
import time
from pathlib import Path

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMALL, Meter, peak_mb, peak_reset, record  # noqa: E402

from fenics_red.forward import (  # noqa: E402
    ElasticityModel,
    ForwardSettings,
    reference_displacement,
)
from fenics_red.measurements import noise_std_from_energy  # noqa: E402
from fenics_red.methods import get_method  # noqa: E402
from fenics_red.metrics import relative_rmse  # noqa: E402
from fenics_red.raster import ImageGrid  # noqa: E402

CASES = ([(ImageGrid(4, 4, nz=4), "stress"), (ImageGrid(12, 12), "strain")] if SMALL else
         [(ImageGrid(8, 8, nz=8), "stress"), (ImageGrid(16, 16, nz=16), "stress"),
          (ImageGrid(64, 64), "strain"), (ImageGrid(128, 128), "strain")])
NU = 0.495


def _ball(dim):
    return lambda x: np.where(sum((x[i] - 0.5) ** 2 for i in range(dim)) <= 0.04, 3.0, 1.0)


def _ml_error(grid, settings, data, sigma, truth, comm) -> float:
    runner = get_method("ml").setup(grid, settings, comm, {})
    try:
        sample = {f"u{'xyz'[c]}_noisy": data[c].reshape(grid.shape) for c in range(grid.dim)}
        sample.update(noise_std=sigma, E=truth)
        estimate = runner.run(sample)[0]
    finally:
        runner.destroy()
    return relative_rmse(estimate, truth)


def _row(grid, plane, volumetric, comm):
    settings = ForwardSettings(nu=NU, plane=plane, solver="lu", volumetric=volumetric)
    peak_reset()
    base = peak_mb(comm)
    meter = Meter()
    start = time.perf_counter()
    model = ElasticityModel.on_grid(grid, comm, settings)
    model.E.interpolate(_ball(grid.dim))
    model.modulus_changed()
    own = model.to_values(model.solve().x.array, "V").reshape(grid.dim, -1)
    solve = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    peak = peak_mb(comm) - base
    nonzeros = model.assemble_K().getInfo(PETSc.Mat.InfoType.GLOBAL_SUM)["nz_used"]
    reference = reference_displacement(model)
    truth = model.to_values(model.E.x.array, "Q").reshape(grid.shape)
    free = model.to_values(model.free_dofs.astype(float), "V").reshape(grid.dim, -1) > 0.5
    model.destroy()

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    counts = [int(free[c].sum()) for c in range(grid.dim)]
    sigma = noise_std_from_energy(float(np.sum(reference[free] ** 2)), counts, 35.0)
    noise = (np.random.default_rng(7).standard_normal(own.shape)
             * np.asarray(sigma)[:, None] * free)
    axial = reference[-1][free[-1]]
    cells = f"{grid.nx}x{grid.ny}" if grid.dim == 2 else f"{grid.nx}^3"
    return {"cells": cells, "plane": "3-D" if grid.dim == 3 else plane, "volumetric": volumetric,
            "axial error": rel(own[-1], reference[-1]),
            "lateral error": rel(own[:-1], reference[:-1]),
            "noise at 35 dB": sigma[-1] / float(np.sqrt(np.mean(axial**2))),
            "ML from P2 data": _ml_error(grid, settings, reference + noise, sigma, truth, comm),
            "ML from own data": _ml_error(grid, settings, own + noise, sigma, truth, comm),
            "solve [s]": solve, "peak [MB]": peak, "nonzeros of K": nonzeros,
            **meter.columns(comm)}


def main():
    comm = MPI.COMM_WORLD
    rows = []
    for grid, plane in CASES:
        for volumetric in ("element", "nodal"):
            rows.append(_row(grid, plane, volumetric, comm))
            if comm.rank == 0:
                print(rows[-1], flush=True)
    if comm.rank == 0:
        print(record("volumetric", rows, ("cells", "plane", "volumetric"),
                     "P1 locking at ν = 0.495: plain P1 against the nodal bulk part",
                     "One rank, MUMPS LU. See the docstring of benchmarks/volumetric.py."))


if __name__ == "__main__":
    main()
