"""A dense-Γ reference implementation against the package's factorised Γ (32² and 48² cells).

    scripts/env python benchmarks/dense_gamma.py
    scripts/env mpirun -n 2 python benchmarks/dense_gamma.py    # the package's path only
    scripts/env python benchmarks/run.py dense_gamma            # both

The authors' public code (github.com/narges-mhm/comp-elast, ``optGFB.py``; Python with numpy)
forms ``Γ = K Σn Kᵀ`` as a dense matrix product, inverts it with ``np.linalg.inv`` and takes the
gradient ``−Dᵀ Γ⁻¹ (f − D E)`` with dense matrices. The reference here does the same on the free
displacement dofs of this package's model (sample 0 of ``SimulationSettings(grid, seed=2718)`` at
35 dB): ``K(E)`` assembled by the package and made dense (``K_ff``), ``Γ = (K_ff Σn) K_ffᵀ``
(``+ σw² I``; ``σw = 0`` here) by a dense product, ``Γ⁻¹ = np.linalg.inv(Γ)``, ``D`` dense, and the
same monotone FISTA as :class:`fenics_red.solvers.MonotoneFISTA` (same uniform start, floor, step
``1/L`` from the same power iteration, same discrepancy/150-step stop) on it. The package's path
is :class:`~fenics_red.likelihood.StatisticalLikelihood`: ``K`` factorised by MUMPS Cholesky,
``Γ⁻¹ r = K⁻¹ Σn⁻¹ K⁻¹ r`` by two back-substitutions, ``Γ`` never formed. Columns:

* ``free dofs``: ``n``, the size of ``Γ``; ``dense Γ [MB]``: one dense ``n × n`` matrix (``Γ``,
  ``Γ⁻¹`` and ``K_ff`` each have this size; the loop keeps ``Γ⁻¹`` and ``D``: ``dense held``);
  ``MUMPS factors [MB]``: entries of the Cholesky factors of ``K`` (``INFOG(29)``) × 8 bytes;
* ``refresh [s]``: the package's refresh of ``Γ`` (assemble ``K(E)``, MUMPS Cholesky; mean of
  3); ``dense form [s]``: assemble ``K(E)``, make ``K_ff`` dense, the dense product;
  ``dense inv [s]``: ``np.linalg.inv(Γ)`` (what the loop uses); ``dense Cholesky [s]``:
  ``scipy.linalg.cho_factor(Γ)`` for comparison (not used by the loop);
* ``gradient [ms]``: ``∇g`` by the package (mean of 20); ``dense gradient [ms]``: by ``Γ⁻¹`` (mean
  of 5); with ``Γ`` frozen at the true modulus and ``E`` the uniform fit;
* ``grad diff (inv)``: ``max|∇g_dense − ∇g| / max|∇g|`` (a correctness check: the two agree to
  the accuracy of the dense inverse, ``κ(Γ) ε`` at worst); ``grad diff (Cholesky)``: the same
  with ``Γ⁻¹ r`` by the dense Cholesky factors;
* ``estimate [s]``: the ML estimate (``MLSettings()`` defaults, ``D`` assembled beforehand) by
  the package, its ``steps``, ``step [ms]`` (mean per FISTA step) and ``error``;
  ``dense estimate [s]``: the same FISTA on the dense ``Γ⁻¹`` (the uniform fit's time, taken
  from the package, included), ``dense steps``, ``dense step [ms]``, ``estimate diff``: relative
  L2 difference of the two estimates;
* ``… ratio``: dense over package; ``load (1 min)``, ``CPU/wall``: as in every benchmark (the
  machine's 1-minute load average when the row started; CPU time over wall time of the slowest
  rank, below 1 when other processes took its core).

Dense linear algebra is numpy/scipy on the stack's BLAS/LAPACK (Debian's reference libblas3
and liblapack3 here, one thread: about 5 GFlop/s for a matrix product; an optimised BLAS would
make the dense times several times smaller but not change their ``n³`` growth). On more than one
rank only the package's columns are measured (the dense reference is serial).
"""

import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np
import scipy.linalg
import scipy.sparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMALL, Meter, mean_time, record  # noqa: E402

from fenics_red.data import SimulationSettings, simulate_sample  # noqa: E402
from fenics_red.measurements import Measurement  # noqa: E402
from fenics_red.raster import ImageGrid  # noqa: E402
from fenics_red.solvers import MLReconstructor, MLSettings  # noqa: E402

NAME = "dense_gamma"
SEED = 2718
SIZES = (6, 8) if SMALL else (32, 48)


def to_scipy(mat) -> scipy.sparse.csr_matrix:
    """A serial PETSc AIJ matrix as scipy CSR."""
    indptr, indices, values = mat.getValuesCSR()
    return scipy.sparse.csr_matrix((values, indices, indptr), shape=mat.getSize())


class DenseLikelihood:
    """``g``, ``∇g`` and ``H v`` with ``Γ`` formed and inverted densely (serial)."""

    def __init__(self, fid):
        self.fid, self.model = fid, fid.model
        self.free = fid.gamma.free.array_r.astype(bool)
        self.D = to_scipy(fid.D)[self.free].toarray()
        self.f = fid.f.array_r[self.free].copy()
        self.s2 = fid.gamma.sigma2.array_r[self.free].copy()
        self.sw2 = fid.noise.force_std ** 2
        self.G = self.Ginv = None

    def form(self, E: np.ndarray) -> None:
        """``Γ(E) = K_ff Σn K_ffᵀ (+ σw² I)``, dense (``E``: nodal values in dof order)."""
        model = self.model
        model.E.x.array[: E.size] = E
        model.E.x.scatter_forward()
        model.check_modulus()
        model.modulus_changed()
        K = to_scipy(model.assemble_K(apply_bcs=True))[self.free][:, self.free].toarray()
        self.G = (K * self.s2) @ K.T
        if self.sw2:
            self.G[np.diag_indices_from(self.G)] += self.sw2

    def invert(self) -> None:
        self.Ginv = np.linalg.inv(self.G)

    def value(self, E) -> float:
        r = self.f - self.D @ E
        return 0.5 * r @ (self.Ginv @ r)

    def gradient(self, E) -> tuple[np.ndarray, float]:
        r = self.f - self.D @ E
        s = self.Ginv @ r
        return -(self.D.T @ s), 0.5 * r @ s

    def hessian(self, v) -> np.ndarray:
        return self.D.T @ (self.Ginv @ (self.D @ v))


def dense_fista(dense: DenseLikelihood, level: float, start: np.ndarray, n_equations: int,
                s: MLSettings) -> tuple[np.ndarray, int, str]:
    """Monotone FISTA on the dense ``Γ⁻¹``, step for step :class:`MonotoneFISTA` inside
    :class:`FixedPointSolver` with the ML estimate's settings (``Γ`` frozen at ``level``)."""
    floor = s.floor * level
    x = np.maximum(np.full(start.size, level), floor)
    dense.form(x)
    dense.invert()
    v, estimate = start / np.linalg.norm(start), 0.0  # fenics_red.linalg.power_iteration
    for _ in range(s.power_iterations):
        w = dense.hessian(v)
        norm = np.linalg.norm(w)
        v = w / norm
        done = abs(norm - estimate) <= 1e-3 * norm
        estimate = norm
        if done:
            break
    eps = s.step_scale / estimate
    y, t = x.copy(), 1.0
    grad, fx = dense.gradient(y)
    fresh, steps, prox_change = True, 0, np.inf
    while True:
        if 2 * fx <= s.discrepancy * n_equations:
            return x, steps, "discrepancy"
        if steps >= s.max_steps:
            return x, steps, "max_steps"
        if steps > 0 and prox_change < s.rtol:
            return x, steps, "rtol"
        if not fresh:
            grad, _ = dense.gradient(y)
        z = np.maximum(y - eps * grad, floor)
        fz = dense.value(z)
        prox_change = np.linalg.norm(z - y) / max(np.linalg.norm(y), 1e-300)
        x_old = x.copy()
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        if fz <= fx:
            x, fx = z.copy(), fz
        a, b = t / t_new, (t - 1.0) / t_new
        y = a * (z - x) + (1.0 + b) * x - b * x_old
        t, fresh = t_new, False
        steps += 1


def row_for(n: int, comm) -> dict:
    meter = Meter()
    grid = ImageGrid(n, n)
    sample = simulate_sample(0, SimulationSettings(grid, seed=SEED))
    m = Measurement.from_sample(sample)
    ml = MLReconstructor(grid, comm=comm)
    fid, solver = ml.likelihood, ml.solver
    fid.set_data(m.displacement, m.noise)
    truth = fid.from_values(sample.E)
    row = {"cells": f"{n}x{n}", "ranks": comm.size, "free dofs": fid.n_equations,
           "load (1 min)": meter.load}

    # -- the package: refresh, gradient, the ML estimate --------------------------------------
    t_fit = mean_time(fid.homogeneous_fit, 1, comm)
    level = fid.homogeneous_fit()
    E = fid.create_vector(level)
    grad = fid.create_vector()
    t_refresh = mean_time(lambda: fid.refresh(truth), 3, comm)
    mumps = getattr(fid.gamma, "_mumps", None)
    entries = mumps.getMumpsInfog(29) if mumps is not None else 0
    entries = -entries * 1e6 if entries < 0 else entries  # negative: millions
    t_grad = mean_time(lambda: fid.gradient(E, grad), 20, comm)
    comm.Barrier()
    start = time.perf_counter()
    x, history = solver.run(truth=truth)
    t_estimate = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    estimate = fid.to_values(x)
    t = history.column("time")
    steps = int(history.final["step"])
    row.update({"MUMPS factors [MB]": 8 * entries / 2**20, "refresh [s]": t_refresh,
                "gradient [ms]": 1e3 * t_grad, "estimate [s]": t_estimate, "steps": steps,
                "step [ms]": 1e3 * comm.allreduce((t[-1] - t[0]) / max(len(t) - 1, 1),
                                                  op=MPI.MAX),
                "error": float(history.final["error"]), "stop": history.stop_reason})

    # -- the dense reference (serial) ---------------------------------------------------------
    if comm.size > 1:
        if comm.rank == 0:
            print(f"[dense_gamma] {n}x{n}: the dense reference is serial; on {comm.size} ranks "
                  "only the package's columns are measured", flush=True)
        row["dense"] = f"serial only (not run on {comm.size} ranks)"
    else:
        dense = DenseLikelihood(fid)
        size = dense.f.size
        t0 = time.perf_counter()
        dense.form(truth.array_r)
        t_form = time.perf_counter() - t0
        t0 = time.perf_counter()
        dense.invert()
        t_inv = time.perf_counter() - t0
        t0 = time.perf_counter()
        chol = scipy.linalg.cho_factor(dense.G)
        t_chol = time.perf_counter() - t0
        t_dgrad = mean_time(lambda: dense.gradient(E.array_r), 5, comm)
        fid.refresh(truth)  # the package's Γ frozen at the same modulus
        fid.gradient(E, grad)
        g_dense, _ = dense.gradient(E.array_r)
        r = dense.f - dense.D @ E.array_r
        g_chol = -(dense.D.T @ scipy.linalg.cho_solve(chol, r))
        scale = np.abs(grad.array_r).max()
        del chol
        dense.G = None  # the loop keeps Γ⁻¹ and D only
        start_vector = fid.from_image(np.random.default_rng(12345).uniform(0.5, 1.5, grid.shape))
        t0 = time.perf_counter()
        x_dense, dense_steps, dense_stop = dense_fista(dense, level, start_vector.array_r.copy(),
                                                       fid.n_equations, MLSettings())
        t_dense = time.perf_counter() - t0 + t_fit
        t1 = time.perf_counter()
        for _ in range(3):  # one FISTA step: a gradient and a value
            dense.gradient(x_dense)
            dense.value(x_dense)
        t_dstep = (time.perf_counter() - t1) / 3
        out = fid.create_vector()
        out.array[:] = x_dense
        dense_estimate = fid.to_values(out)
        for vec in (out, start_vector):
            vec.destroy()
        row.update({
            "dense Γ [MB]": 8 * size**2 / 2**20,
            "dense held [MB]": (dense.Ginv.nbytes + dense.D.nbytes) / 2**20,
            "dense form [s]": t_form, "dense inv [s]": t_inv, "dense Cholesky [s]": t_chol,
            "dense gradient [ms]": 1e3 * t_dgrad,
            "grad diff (inv)": float(np.abs(g_dense - grad.array_r).max() / scale),
            "grad diff (Cholesky)": float(np.abs(g_chol - grad.array_r).max() / scale),
            "dense estimate [s]": t_dense, "dense steps": dense_steps,
            "dense stop": dense_stop, "dense step [ms]": 1e3 * t_dstep,
            "estimate diff": float(np.linalg.norm(dense_estimate - estimate)
                                   / np.linalg.norm(estimate)),
            "refresh ratio": (t_form + t_inv) / t_refresh,
            "gradient ratio": t_dgrad / t_grad, "estimate ratio": t_dense / t_estimate})
        del dense
    for vec in (E, grad, truth):
        vec.destroy()
    ml.destroy()
    row["CPU/wall"] = meter.share(comm)
    return row


def main():
    comm = MPI.COMM_WORLD
    rows = []
    for n in SIZES:
        rows.append(row_for(n, comm))
        if comm.rank == 0:
            print(rows[-1], flush=True)
    if comm.rank == 0:
        print(record(NAME, rows, ("cells", "ranks"),
                     "Dense Γ (formed and inverted, as the authors' code) against the "
                     "factorised Γ",
                     f"Sample 0 of seed {SEED} at 35 dB. Dense: Γ = K_ff Σn K_ffᵀ by a dense "
                     "product, np.linalg.inv, dense D, the same monotone FISTA (serial only, "
                     "one BLAS thread, reference BLAS). Package: MUMPS Cholesky of K, Γ⁻¹ r by "
                     "two back-substitutions. 'grad diff': max |∇g_dense − ∇g| / max |∇g|. "
                     "See the docstring of benchmarks/dense_gamma.py."), flush=True)


if __name__ == "__main__":
    main()
