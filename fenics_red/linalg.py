"""Small algorithms on PETSc vectors shared by the inverse solvers: the power iteration, the
derivative (Taylor) test and the randomised (double-pass) generalised eigensolver.

All take the operator or the functional as callables on PETSc vectors, so they serve any model
(the statistical likelihood, the Gauss-Newton output-error functional, a regulariser) on any mesh.
Everything is collective on the vectors' communicator: norms and dot products are global, so the
result is the same on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np

__all__ = ["power_iteration", "taylor_test", "convergence_rates", "double_pass_eigh", "gram"]

Apply = Callable[[PETSc.Vec, PETSc.Vec], object]


def power_iteration(apply: Apply, v: PETSc.Vec, iterations: int = 30, rtol: float = 1e-3
                    ) -> float:
    """Estimate the largest eigenvalue ``λ_max`` of a symmetric positive semi-definite operator.

    ``apply(x, y)`` computes ``y = A x``. Starting from ``v`` (normalised here), each step sets
    ``v ← A v / ‖A v‖`` and the estimate ``‖A v‖`` (for the unit iterate ``v``): a lower bound
    that converges to ``λ_max`` from below. Stops after ``iterations`` steps (at least one), or
    when the estimate changes by at most ``rtol`` relative to itself (``rtol = 0``: never early).

    ``v`` is overwritten with the normalised last iterate, a warm start for the next call. If
    ``A v`` vanishes (or is not finite), the iteration stops and returns that norm (0 or NaN),
    leaving ``v`` at the unit vector that produced it; the caller decides whether that is an
    error. The start vector decides whether the result depends on the mesh partition: draw it
    from node positions or from a global image, never from rank-local random numbers.
    """
    w = v.duplicate()
    try:
        v.scale(1.0 / v.norm())
        estimate = 0.0
        for _ in range(max(1, int(iterations))):
            apply(v, w)
            norm = w.norm()
            if not norm > 0.0:
                return float(norm)
            w.copy(v)
            v.scale(1.0 / norm)
            done = rtol > 0 and abs(norm - estimate) <= rtol * norm
            estimate = norm
            if done:
                break
        return float(estimate)
    finally:
        w.destroy()


def convergence_rates(steps: Sequence[float], remainders: Sequence[float]) -> list[float]:
    """Observed orders ``log(r_k / r_{k+1}) / log(h_k / h_{k+1})`` between successive steps."""
    return [math.log(remainders[k] / remainders[k + 1]) / math.log(steps[k] / steps[k + 1])
            if remainders[k] > 0 and remainders[k + 1] > 0 else math.nan
            for k in range(len(steps) - 1)]


def taylor_test(value: Callable[[PETSc.Vec], float], gradient: Apply, m: PETSc.Vec,
                direction: PETSc.Vec, steps: Sequence[float] | None = None,
                hessian_mult: Callable[[PETSc.Vec, PETSc.Vec, PETSc.Vec], object] | None = None
                ) -> dict:
    """Finite-difference check of a gradient (and of Hessian-vector products), hippylib style.

    For a functional ``J`` with ``value(x) = J(x)``, ``gradient(x, out)``: ``out = ∇J(x)`` and,
    optionally, ``hessian_mult(x, v, out)``: ``out = H(x) v``, compares along ``dm = direction``:

    * ``|J(m + h dm) − J(m) − h ∇J(m)·dm|``, which is ``O(h²)`` exactly when the gradient is right
      (``O(h)`` otherwise);
    * with ``hessian_mult``: ``‖∇J(m + h dm) − ∇J(m) − h H(m) dm‖``, ``O(h²)`` exactly when ``H`` is
      the derivative of the gradient.

    Returns ``dict(steps, remainders, rates, directional_derivative, objective)`` and, with
    ``hessian_mult``, ``hessian_remainders`` and ``hessian_rates``; rates near 2 confirm the
    derivatives. The callables may change a model's state (they are last called at a trial
    point); ``m`` and ``direction`` are not changed. Collective. Default steps: ``1e-2 · 2^-k``,
    ``k < 6``.
    """
    steps = [float(h) for h in (steps or [1e-2 * 0.5**k for k in range(6)])]
    trial, g0 = m.duplicate(), m.duplicate()
    g, Hdm = (m.duplicate(), m.duplicate()) if hessian_mult is not None else (None, None)
    try:
        J0 = float(value(m))
        gradient(m, g0)
        dJ = g0.dot(direction)
        if hessian_mult is not None:
            hessian_mult(m, direction, Hdm)
        remainders, hessian_remainders = [], []
        for h in steps:
            trial.waxpy(h, direction, m)
            remainders.append(abs(float(value(trial)) - J0 - h * dJ))
            if hessian_mult is not None:
                gradient(trial, g)
                g.axpy(-1.0, g0)
                g.axpy(-h, Hdm)
                hessian_remainders.append(g.norm())
        result = dict(steps=steps, remainders=remainders,
                      rates=convergence_rates(steps, remainders), directional_derivative=dJ,
                      objective=J0)
        if hessian_mult is not None:
            result.update(hessian_remainders=hessian_remainders,
                          hessian_rates=convergence_rates(steps, hessian_remainders))
        return result
    finally:
        for vec in (trial, g0, g, Hdm):
            if vec is not None:
                vec.destroy()


def _apply_columns(apply: Apply, columns: np.ndarray, x: PETSc.Vec, y: PETSc.Vec) -> np.ndarray:
    """``[A c_0, A c_1, ...]`` for the owned rows ``columns`` (``n_local x m``) of ``m`` vectors."""
    out = np.empty_like(columns)
    for j in range(columns.shape[1]):
        x.array[:] = columns[:, j]
        apply(x, y)
        out[:, j] = y.array_r
    return out


def gram(comm: MPI.Comm, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The global ``leftᵀ right`` of row-distributed ``n_local x m`` blocks (or vectors), on
    every rank. Collective."""
    local = np.ascontiguousarray(left.T @ right)
    comm.Allreduce(MPI.IN_PLACE, local, op=MPI.SUM)
    return local


def _orthonormalise(comm: MPI.Comm, Y: np.ndarray, drop: float = 1e-12) -> np.ndarray:
    """A Euclidean orthonormal basis of the columns of ``Y`` (row-distributed), by classical
    Gram-Schmidt with one reorthogonalisation (CGS2, stable to round-off whatever the
    conditioning of ``Y``). A column that keeps less than ``drop`` of its norm is dependent on
    the ones before it and is left out."""
    Q = np.empty_like(Y)
    k = 0
    for j in range(Y.shape[1]):
        y = Y[:, j].copy()
        norm0 = math.sqrt(comm.allreduce(float(y @ y), op=MPI.SUM))
        for _ in range(2):
            if k:
                h = Q[:, :k].T @ y
                comm.Allreduce(MPI.IN_PLACE, h, op=MPI.SUM)
                y -= Q[:, :k] @ h
        norm = math.sqrt(comm.allreduce(float(y @ y), op=MPI.SUM))
        if norm0 > 0 and norm > drop * norm0:
            Q[:, k] = y / norm
            k += 1
    return Q[:, :k]


def _b_orthonormalise(comm: MPI.Comm, Y: np.ndarray, apply_B: Apply, x: PETSc.Vec,
                      y: PETSc.Vec, passes: int = 2, drop: float = 1e-13) -> np.ndarray:
    """``Q`` with ``Qᵀ B Q = I`` spanning the columns of ``Y`` ("pre-CholQR", as hIPPYlib's
    ``Borthogonalize``): a Euclidean orthonormal basis first (:func:`_orthonormalise`, so that the
    conditioning of ``Y``, which is that of the Hessian, does not enter), then ``passes`` times
    ``Q ← Q U S^-1/2`` from the small Gram matrix ``Qᵀ B Q = U S Uᵀ`` (conditioned like ``B``;
    the second pass removes the round-off of the first). Gram eigenvalues below ``drop · S_max``
    are left out. The small eigenproblems are solved on rank 0 and broadcast, so every rank holds
    the same basis."""
    Y = _orthonormalise(comm, Y)
    for _ in range(passes):
        BY = _apply_columns(apply_B, Y, x, y)
        G = gram(comm, Y, BY)
        transform = None
        if comm.rank == 0:
            s, U = np.linalg.eigh(0.5 * (G + G.T))
            keep = s > drop * max(s[-1], np.finfo(float).tiny)
            transform = U[:, keep] / np.sqrt(s[keep])
        transform = comm.bcast(transform, root=0)
        Y = Y @ transform
    return Y


def double_pass_eigh(apply_A: Apply, apply_B: Apply, solve_B: Apply, omega: np.ndarray,
                     rank: int, template: PETSc.Vec) -> tuple[np.ndarray, np.ndarray]:
    """The ``rank`` largest eigenpairs of ``A v = λ B v`` by the randomised double-pass method.

    ``A`` symmetric positive semi-definite (a data-misfit Hessian), ``B`` symmetric positive
    definite (a prior precision), given as callables ``apply(x, y)``: ``y = A x``, ``y = B x``,
    and ``solve_B(x, y)``: ``y = B⁻¹ x``. ``omega`` holds this rank's rows of ``m ≥ rank``
    random start vectors (``n_local x m``; ``m − rank`` is the oversampling). The algorithm
    (Saibaba, Lee & Kitanidis 2016, Algorithm 6; hIPPYlib's ``doublePassG``)::

        Y = B⁻¹ A Ω,   Q = B-orthonormal basis of Y (Qᵀ B Q = I),
        T = Qᵀ A Q = S Λ Sᵀ,   V = Q S  (the first ``rank`` columns),

    costs ``2m`` products with ``A``, ``m`` solves with ``B``, ``2m`` products with ``B`` and a
    Gram-Schmidt pass over ``m`` vectors (``Y`` is as ill-conditioned as ``A``: it is
    orthonormalised before ``B`` enters, see :func:`_b_orthonormalise`). The eigenvectors are
    ``B``-orthonormal (``Vᵀ B V = I``), so ``A ≈ B V Λ Vᵀ B`` and
    ``(A + B)⁻¹ ≈ B⁻¹ − V diag(λ/(1+λ)) Vᵀ``. Exact (to round-off) when ``m`` reaches the
    dimension; otherwise the error of the pair ``i`` shrinks with ``λ_{m+1}/λ_i``, small
    for the fast-decaying spectra of ill-posed problems.

    Returns ``(λ, V)``: the eigenvalues in decreasing order (at most ``rank``: fewer when ``Y``
    is rank-deficient), the same on every rank, and this rank's rows of ``V``
    (``n_local x len(λ)``). Collective on ``template``'s communicator (every rank calls every
    product); the result does not depend on the partition when ``omega`` does not.
    """
    comm = template.getComm().tompi4py()
    omega = np.asarray(omega, dtype=np.float64)
    if omega.ndim != 2 or omega.shape[0] != template.getLocalSize():
        raise ValueError(f"omega must hold this rank's {template.getLocalSize()} rows of the "
                         f"start vectors, got shape {omega.shape}")
    if not 1 <= rank <= omega.shape[1]:
        raise ValueError(f"rank must be between 1 and the number of start vectors "
                         f"{omega.shape[1]}, got {rank}")
    x, y = template.duplicate(), template.duplicate()
    try:
        AO = _apply_columns(apply_A, omega, x, y)
        Y = _apply_columns(solve_B, AO, x, y)
        Q = _b_orthonormalise(comm, Y, apply_B, x, y)
        AQ = _apply_columns(apply_A, Q, x, y)
        T = gram(comm, Q, AQ)
        pairs = None
        if comm.rank == 0:
            lam, S = np.linalg.eigh(0.5 * (T + T.T))
            order = np.argsort(lam)[::-1][:rank]
            pairs = lam[order], S[:, order]
        lam, S = comm.bcast(pairs, root=0)
        return lam, Q @ S
    finally:
        x.destroy()
        y.destroy()
