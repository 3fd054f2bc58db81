"""Small algorithms on PETSc vectors shared by the inverse solvers: the power iteration and the
derivative (Taylor) test.

Both take the operator or the functional as callables on PETSc vectors, so they serve any model
(the statistical likelihood, the Gauss-Newton output-error functional, a regulariser) on any mesh.
Everything is collective on the vectors' communicator: norms and dot products are global, so the
result is the same on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from petsc4py import PETSc

__all__ = ["power_iteration", "taylor_test", "convergence_rates"]

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
