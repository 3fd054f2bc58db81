"""Inverse-solver benchmark: cost of one gradient step (Γ solve, SpMV, refresh) and of an estimate.

    scripts/env python benchmarks/inverse.py
    scripts/env mpirun -n 2 python benchmarks/inverse.py

For 64², 128² and 256² cells on the ranks of ``MPI.COMM_WORLD`` (mesh distributed), sample 0 of
``SimulationSettings(grid, seed=5)`` at 35 dB. Columns:

* ``refresh``: assemble ``K(E)`` and factorise it (MUMPS Cholesky), i.e. a fresh ``Γ``;
* ``Γ solve``: ``Γ⁻¹ r`` with ``Γ`` frozen (two back-substitutions, ``Σw = 0``);
* ``K back-sub``: one back-substitution of the Γ solver's factorisation; ``fwd back-sub``: one
  back-substitution of the forward model's own solver (``K u = f`` with ``K`` unchanged);
* ``SpMV``: ``D v`` and ``Dᵀ w`` together;
* ``PGD step`` / ``FISTA step``: mean wall time of one iteration of a 60-step run with ``Γ``
  frozen (history times); ``step/fwd`` divides the PGD step by ``fwd back-sub`` (the issue's
  floor: at most 3);
* ``estimate``: wall time of the default ML estimate (data setup, uniform fit, power
  iteration, FISTA with the discrepancy/budget rule), its steps and relative error.

On 64² also the FISTA/PGD speed-up (samples 0-2, each): time for PGD to come within 1 % of the
best error FISTA reaches in 300 steps, divided by FISTA's time to get there.
"""

import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMALL, mean_time, record  # noqa: E402

from fenics_red.data import SimulationSettings, simulate_sample  # noqa: E402
from fenics_red.likelihood import NoiseModel  # noqa: E402
from fenics_red.raster import ImageGrid  # noqa: E402
from fenics_red.solvers import MLReconstructor, MLSettings  # noqa: E402


def step_time(grid, sample, method, comm, steps=60) -> float:
    """Mean time of one iteration with Γ frozen (history times of a ``steps``-step run)."""
    ml = MLReconstructor(grid, settings=MLSettings(method=method, stop="budget",
                                                   max_steps=steps), comm=comm)
    _, history = ml.run_sample(sample)
    ml.destroy()
    t = history.column("time")
    return comm.allreduce((t[-1] - t[0]) / (len(t) - 1), op=MPI.MAX)


def first_time_below(history, level):
    err, t = history.column("error"), history.column("time")
    hit = np.flatnonzero(err <= level)
    return (t[hit[0]], int(history.column("step")[hit[0]])) if len(hit) else (np.nan, -1)


def speed_up(grid, comm, samples=(0, 1, 2)):
    """PGD time / FISTA time to come within 1 % of the best error of 300 FISTA steps.

    Per sample; ``-1`` steps and ``>x`` mark PGD runs that did not get there in 3000 steps.
    """
    ratios, fista_steps, pgd_steps = [], [], []
    for index in samples:
        sample = simulate_sample(index, SimulationSettings(grid, seed=5))
        runs = {}
        for method, steps in (("fista", 300), ("pgd", 3000)):
            ml = MLReconstructor(grid, settings=MLSettings(method=method, stop="budget",
                                                           max_steps=steps), comm=comm)
            runs[method] = ml.run_sample(sample)[1]
            ml.destroy()
        level = 1.01 * runs["fista"].column("error").min()
        t_f, s_f = first_time_below(runs["fista"], level)
        t_p, s_p = first_time_below(runs["pgd"], level)
        fista_steps.append(s_f)
        pgd_steps.append(s_p)
        # not reached: 3000 PGD steps give a lower bound of the speed-up
        t_pgd = runs["pgd"].column("time")[-1]
        ratios.append(f"{t_p / t_f:.1f}" if s_p >= 0 else f">{t_pgd / t_f:.0f}")
    return {"FISTA steps to best": "/".join(map(str, fista_steps)),
            "PGD steps to it": "/".join(map(str, pgd_steps)),
            "FISTA speed-up": "/".join(ratios)}


def main(sizes=(64, 128, 256)):
    comm = MPI.COMM_WORLD
    rows = []
    for n in sizes:
        grid = ImageGrid(n, n)
        sample = simulate_sample(0, SimulationSettings(grid, seed=5))
        start = time.perf_counter()
        ml = MLReconstructor(grid, comm=comm)
        t_setup = time.perf_counter() - start
        fid, model = ml.likelihood, ml.model
        fid.set_data((sample.ux_noisy, sample.uy_noisy), NoiseModel(sample.noise_std))
        E = fid.create_vector(0.2)
        t_refresh = mean_time(lambda fid=fid, E=E: fid.refresh(E), 3, comm)
        r, s = fid.f.duplicate(), fid.f.duplicate()
        fid.residual(E, r)
        t_gamma = mean_time(lambda g=fid.gamma, r=r, s=s: g.solve(r, s), 20, comm)
        t_back = mean_time(lambda g=fid.gamma, r=r, s=s: g.apply_K_inverse(r, s), 20, comm)
        v, w = fid.create_vector(1.0), fid.f.duplicate()
        t_spmv = mean_time(lambda D=fid.D, v=v, w=w: (D.mult(v, w), D.multTranspose(w, v)), 50,
                           comm)
        model.set_modulus(np.full(grid.shape, 0.2))
        model.solve()  # factorises the forward K
        t_fwd = mean_time(model.solve, 10, comm)  # same K: assembles f and back-substitutes
        b = model.assemble_load()
        u = model.u.x.petsc_vec
        t_fwd_back = mean_time(lambda ksp=model.ksp, b=b, u=u: ksp.solve(b, u), 20, comm)
        for vec in (r, s, v, w, E):
            vec.destroy()
        ml.destroy()
        t_pgd = step_time(grid, sample, "pgd", comm)
        t_fista = step_time(grid, sample, "fista", comm)

        comm.Barrier()
        start = time.perf_counter()
        ml = MLReconstructor(grid, comm=comm)
        estimate, history = ml.run_sample(sample)
        t_estimate = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
        ml.destroy()
        error = np.linalg.norm(estimate - sample.E) / np.linalg.norm(sample.E)
        row = {"cells": f"{n}x{n}", "ranks": comm.size, "setup [s]": t_setup,
               "refresh [s]": t_refresh, "Γ solve [ms]": 1e3 * t_gamma,
               "K back-sub [ms]": 1e3 * t_back, "fwd back-sub [ms]": 1e3 * t_fwd_back,
               "fwd solve, same K [ms]": 1e3 * t_fwd, "SpMV [ms]": 1e3 * t_spmv,
               "PGD step [ms]": 1e3 * t_pgd, "FISTA step [ms]": 1e3 * t_fista,
               "PGD step/fwd back-sub": t_pgd / t_fwd_back,
               "FISTA step/fwd back-sub": t_fista / t_fwd_back,
               "estimate [s]": t_estimate, "steps": int(history.final["step"]),
               "stop": history.stop_reason, "error": float(error)}
        if n == 64:
            row.update(speed_up(grid, comm))
        rows.append(row)
        if comm.rank == 0:
            print(row, flush=True)
    if comm.rank == 0:
        print(record("inverse", rows, ("cells", "ranks"),
                     "Inverse solver: cost of a gradient step and of an ML estimate",
                     "Sample 0 of seed 5 at 35 dB; mesh distributed over the ranks. "
                     "'refresh' = assemble K(E) + MUMPS Cholesky (a fresh Γ); a PGD step = one Γ "
                     "solve (two back-substitutions) + two SpMVs; a FISTA step adds one "
                     "back-substitution for the objective at the trial point. 'step/fwd "
                     "back-sub' is the issue's floor (≤ 3 with Γ frozen). 'estimate' = default "
                     "MLSettings, including the uniform fit and 30 power iterations. The FISTA "
                     "speed-up (64², samples 0-2) compares the times to come within 1 % "
                     "of the best error of 300 FISTA steps (PGD: up to 3000 steps; -1 and '>' "
                     "mark runs that did not get there)."))


def stopping_study():
    cases = [(32, 35.0, 16, {}), (64, 35.0, 16, {}), (128, 35.0, 8, {}), (64, 25.0, 16, {}),
             (64, 45.0, 16, {}), (64, 35.0, 16, {"steps_per_round": 50}),
             (64, 35.0, 16, {"steps_per_round": 20})]
    for n, snr, count, extra in cases:
        grid = ImageGrid(n, n)
        ml = MLReconstructor(grid, settings=MLSettings(stop="budget", max_steps=400, **extra))
        best, best_err, at150, combined, reached = [], [], [], [], []
        for i in range(count):
            _, h = ml.run_sample(simulate_sample(i, SimulationSettings(grid, seed=5,
                                                                       snr_db=snr)))
            err, misfit, step = h.column("error"), h.column("misfit"), h.column("step")
            hit = np.flatnonzero(misfit <= h.n_equations)
            stop150 = np.flatnonzero(step >= 150)[0]
            best.append(int(step[np.argmin(err)]))
            best_err.append(err.min())
            at150.append(err[stop150])
            combined.append(err[min(hit[0], stop150)] if len(hit) else err[stop150])
            reached.append(int(step[hit[0]]) if len(hit) else -1)
        ml.destroy()
        print(f"{n}² {snr:g} dB {extra}: best step median {np.median(best):.0f} "
              f"(range {min(best)}-{max(best)}), best error {np.mean(best_err):.3f}, at 150 "
              f"{np.mean(at150):.3f}, discrepancy-or-150 {np.mean(combined):.3f}; misfit ≤ n "
              f"at steps {reached}", flush=True)


if __name__ == "__main__":
    if "--stopping" in sys.argv:
        stopping_study()
    else:
        main(sizes=(8,)) if SMALL else main()
