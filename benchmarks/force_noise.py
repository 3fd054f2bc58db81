"""``Γ⁻¹`` under force noise: CG preconditioned by a factorisation of ``Γ`` or of ``K``.

    scripts/env python benchmarks/force_noise.py
    scripts/env python benchmarks/run.py force_noise          # 1 and 2 ranks

With force noise ``Σw = σw² I`` the covariance ``Γ = Σw + K Σn K`` is no longer ``K Σn K``, whose
inverse two back-substitutions give. :attr:`fenics_red.likelihood.LikelihoodSettings.gamma_pc`
chooses the preconditioner of CG on ``Γ``: ``"gamma"`` (the default where ``K`` is factorised)
factorises the explicit sparse ``Γ`` at every refresh, ``"k"`` applies ``K⁻¹ Σn⁻¹ K⁻¹`` from the
factorisation of ``K``. Sample 0 of ``SimulationSettings(grid, seed=2718)`` at 35 dB on the
package's 2-D grids, and a 3-D box with a stiff sphere; ``σw`` is given relative to the largest
entry of the load vector (``σw / max|f|``: the load per node shrinks with the cells). Columns:

* ``refresh [s]``: assemble ``K(E)`` and factorise (``K``, or ``K Σn K + Σw`` formed and
  factorised), at the true modulus, mean of 3; ``solve [ms]``: one ``Γ⁻¹ r`` (``r`` the data
  residual at the uniform fit), mean of 3; ``iterations``: CG iterations of that solve (``>1000``:
  it did not converge, the default limit); ``peak [MB]``: resident memory of the largest rank
  after the refresh (this process's peak so far: the Γ rows run first);
* ``load (1 min)``, ``CPU/wall``: as in every benchmark.
"""

import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMALL, Meter, mean_time, peak_mb, peak_reset, record  # noqa: E402

from dolfinx import mesh  # noqa: E402
from fenics_red.data import SimulationSettings, simulate_sample  # noqa: E402
from fenics_red.forward import ElasticityModel  # noqa: E402
from fenics_red.likelihood import (  # noqa: E402
    LikelihoodSettings,
    NoiseModel,
    StatisticalLikelihood,
)
from fenics_red.raster import ImageGrid  # noqa: E402

GRIDS = (8, 12) if SMALL else (32, 64, 128)
BOXES = (4,) if SMALL else (12, 16)
RATIOS = (0.03, 0.3)  # σw / max|f|


def _grid_problem(comm, n):
    grid = ImageGrid(n, n)
    sample = simulate_sample(0, SimulationSettings(grid, seed=2718, snr_db=35.0))
    model = ElasticityModel.on_grid(grid, comm)
    return model, (sample.ux_noisy, sample.uy_noisy), sample.noise_std, sample.E, f"{n}x{n}"


def _box_problem(comm, n):
    model = ElasticityModel(mesh.create_box(comm, [np.zeros(3), np.ones(3)], [n] * 3,
                                            mesh.CellType.tetrahedron))
    model.E.interpolate(lambda x: 1.0 + 2.0 * (np.sum((x - 0.5) ** 2, axis=0) < 0.04))
    model.modulus_changed()
    u = model.solve()
    sigma = 0.01 * comm.allreduce(np.abs(u.x.array).max(), op=MPI.MAX)
    truth = model.to_values(model.E.x.array, "Q")
    return model, u, (sigma,) * 3, truth, f"{n}^3"


def _row(comm, problem, ratio, pc):
    model, data, sigma, truth, cells = problem
    load = comm.allreduce(np.abs(model.assemble_load().array_r).max(), op=MPI.MAX)
    fid = StatisticalLikelihood(model, data, NoiseModel(sigma, ratio * load),
                                LikelihoodSettings(gamma_pc=pc))
    E = fid.from_values(truth)
    uniform = fid.create_vector(fid.homogeneous_fit())
    peak_reset()
    meter = Meter()
    refresh = mean_time(lambda: fid.refresh(E), 3, comm)
    peak = peak_mb(comm)
    r, out = fid.residual(uniform, fid.f.duplicate()), fid.f.duplicate()
    iterations = "-"
    try:
        solve = mean_time(lambda: fid.gamma.solve(r, out), 3, comm)
        iterations = fid.gamma.iterations
    except RuntimeError:  # out of CG iterations
        solve, iterations = float("nan"), f">{fid.settings.gamma_max_it}"
    row = {"cells": cells, "dofs": model.n_dofs, "ranks": comm.size, "σw / max|f|": ratio,
           "σw": float(ratio * load), "gamma_pc": pc, "refresh [s]": refresh,
           "solve [ms]": 1e3 * solve, "iterations": iterations, "peak [MB]": peak,
           **meter.columns(comm)}
    for vec in (E, uniform, r, out):
        vec.destroy()
    fid.destroy()
    return row


def main():
    comm = MPI.COMM_WORLD
    rows = []
    problems = ([lambda n=n: _grid_problem(comm, n) for n in GRIDS]
                + [lambda n=n: _box_problem(comm, n) for n in BOXES])
    for make in problems:
        for ratio in RATIOS:
            for pc in ("gamma", "k"):
                problem = make()
                rows.append(_row(comm, problem, ratio, pc))
                problem[0].destroy()
                if comm.rank == 0:
                    print(rows[-1], flush=True)
    if comm.rank == 0:  # one writer: two ranks rewriting one store raced (an empty JSON read)
        print(record("force_noise", rows, ("cells", "ranks", "σw / max|f|", "gamma_pc"),
                     "Γ⁻¹ under force noise: factorised Γ against the K preconditioner",
                     "See the docstring of benchmarks/force_noise.py."))


if __name__ == "__main__":
    main()
