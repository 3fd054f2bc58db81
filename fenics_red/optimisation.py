"""Generic pieces of the Gauss-Newton baseline: the line search and the choice of ``alpha``.

They know nothing about elasticity: each takes the model's operations as callables.

* :func:`armijo_backtracking`: halve the step until the objective decreases sufficiently;
* :func:`alpha_heuristic`: ``λ_max(H_misfit) / λ_max(H_reg)``, a weight at which the
  regulariser dominates the Hessian (the start of the discrepancy search);
* :func:`discrepancy_principle`: Morozov's rule, a search over ``alpha`` (decrease, then secant
  steps on ``log residual`` versus ``log alpha``) until the residual meets a target;
* :func:`l_curve` and :func:`l_curve_corner`: the L-curve and its corner (maximum curvature).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from petsc4py import PETSc

import numpy as np

from .linalg import power_iteration

__all__ = ["armijo_backtracking", "alpha_heuristic", "discrepancy_principle", "l_curve",
           "l_curve_corner"]


def armijo_backtracking(evaluate: Callable[[np.ndarray], tuple], m0: np.ndarray,
                        direction: np.ndarray, value0: float, slope: float, step: float,
                        c: float = 1e-4, max_backtracks: int = 12) -> tuple[float | None, tuple]:
    """Backtracking line search with the Armijo sufficient-decrease condition.

    Tries ``m0 + t·direction`` for ``t = step, step/2, ...`` (at most ``max_backtracks`` times)
    and accepts the first ``t`` with a finite ``J ≤ value0 + c·t·slope`` (``slope = ∇J·direction
    < 0``). ``evaluate(m)`` sets the model to ``m`` and returns a tuple whose first entry is
    ``J(m)`` (further entries are passed through). Returns ``(t, evaluate(m0 + t·direction))``,
    or ``(None, ())`` when no step is accepted (the model is then left at the last trial).
    """
    for _ in range(max_backtracks):
        values = evaluate(m0 + step * direction)
        if math.isfinite(values[0]) and values[0] <= value0 + c * step * slope:
            return step, values
        step *= 0.5
    return None, ()


def alpha_heuristic(misfit_mult: Callable, regulariser_mult: Callable, start: PETSc.Vec,
                    iterations: int = 12) -> float:
    """``λ_max(H_misfit) / λ_max(H_reg)`` by power iterations from ``start`` (not changed).

    ``misfit_mult(x, y)`` and ``regulariser_mult(x, y)`` apply the two parts of the Hessian. An
    ``alpha`` at which the regulariser dominates; 1 when ``H_reg`` vanishes on the iterates.
    ``iterations`` fixed steps each (no early stop). Collective.
    """
    v = start.copy()
    try:
        lam_misfit = power_iteration(misfit_mult, v, iterations, rtol=0.0)
        start.copy(v)
        lam_reg = power_iteration(regulariser_mult, v, iterations, rtol=0.0)
    finally:
        v.destroy()
    return lam_misfit / lam_reg if lam_reg > 0 else 1.0


def discrepancy_principle(solve: Callable[[float], dict], save: Callable[[], object],
                          restore: Callable[[object], None], target: float, alpha: float, *,
                          decrease: float = 10.0, rtol: float = 0.01, max_trials: int = 14,
                          trials: list | None = None) -> tuple[dict, bool]:
    """Morozov's discrepancy principle: the ``alpha`` whose residual meets ``target``.

    ``solve(alpha)`` minimises at ``alpha`` from the current state (warm start) and returns a
    summary with ``"alpha"`` and ``"residual_norm2"``; ``save()`` snapshots the state (the
    solution), ``restore(snapshot)`` brings it back. Starting from a large ``alpha`` (the
    regulariser dominates), ``alpha`` is divided by ``decrease`` until the residual falls below
    the target; the crossing is then refined by secant steps on ``log residual`` versus ``log
    alpha`` inside the bracket (each warm-started from the nearer end) until
    ``|residual / target − 1| ≤ rtol``, at most ``max_trials`` solves in all.

    Every summary (with ``"target_residual"`` added) is appended to ``trials``. Returns ``(best,
    reached)``: the summary whose residual is nearest to the target (the state is restored to its
    solution when it is not the last one solved) and whether the target was met (or the largest
    ``alpha`` already fits: homogeneous data).
    """
    trials = [] if trials is None else trials
    solutions: dict[float, object] = {}
    above = below = None
    reached = False
    for _ in range(max_trials):
        summary = solve(alpha)
        summary["target_residual"] = target
        trials.append(summary)
        solutions[alpha] = save()
        ratio = summary["residual_norm2"] / target
        if abs(ratio - 1.0) <= rtol:
            reached = True
            break
        if ratio > 1.0:
            above = summary
        else:
            below = summary
        if below is None:
            alpha = alpha / decrease
            continue
        if above is None:  # the first (largest) alpha already fits: data are homogeneous
            reached = True
            break
        # secant step on log(residual) versus log(alpha) inside the bracket
        la, lb = math.log(above["alpha"]), math.log(below["alpha"])
        ra, rb = (math.log(above["residual_norm2"]), math.log(below["residual_norm2"]))
        lt = math.log(target)
        w = (lt - rb) / (ra - rb) if ra != rb else 0.5
        w = min(max(w, 0.1), 0.9)  # stay strictly inside the bracket
        alpha = math.exp(lb + w * (la - lb))
        nearest = min((above, below), key=lambda t: abs(math.log(t["alpha"] / alpha)))
        restore(solutions[nearest["alpha"]])
    best = min(trials, key=lambda t: abs(math.log(t["residual_norm2"] / target)))
    if best is not trials[-1]:
        restore(solutions[best["alpha"]])
    return best, reached


def l_curve(solve: Callable[[float], dict], alphas: Sequence[float],
            save: Callable[[], object] | None = None) -> dict:
    """Solve for each alpha (largest first, warm starts) and locate the L-curve corner.

    ``solve(alpha)`` returns a summary with ``"residual_norm2"``, ``"regularisation"`` and
    ``"iterations"``; ``save()`` (optional) records each solution. Returns
    ``dict(points=[{alpha, residual_norm2, regularisation, iterations}], corner=alpha,
    solutions={alpha: save()})`` (see :func:`l_curve_corner`).
    """
    points, solutions = [], {}
    for alpha in sorted((float(a) for a in alphas), reverse=True):
        summary = solve(alpha)
        points.append(dict(alpha=alpha, residual_norm2=summary["residual_norm2"],
                           regularisation=summary["regularisation"],
                           iterations=summary["iterations"]))
        if save is not None:
            solutions[alpha] = save()
    corner = l_curve_corner([p["alpha"] for p in points], [p["residual_norm2"] for p in points],
                            [p["regularisation"] for p in points])
    return dict(points=points, corner=corner, solutions=solutions)


def l_curve_corner(alphas: Sequence[float], residuals: Sequence[float],
                   regularisations: Sequence[float]) -> float:
    """The alpha of maximum curvature of the L-curve ``(log residual, log R)`` (three-point
    Menger curvature; the end points are never chosen). Needs at least three points."""
    if not len(alphas) == len(residuals) == len(regularisations) >= 3:
        raise ValueError("the L-curve corner needs at least three (alpha, residual, R) triples")
    order = np.argsort(alphas)
    x = np.log(np.asarray(residuals, float)[order])
    y = np.log(np.asarray(regularisations, float)[order])
    a = np.asarray(alphas, float)[order]
    best, best_k = -np.inf, 1
    for k in range(1, len(a) - 1):
        p0, p1, p2 = (np.array([x[i], y[i]]) for i in (k - 1, k, k + 1))
        cross = (p1[0] - p0[0]) * (p2[1] - p0[1]) - (p1[1] - p0[1]) * (p2[0] - p0[0])
        denominator = (np.linalg.norm(p1 - p0) * np.linalg.norm(p2 - p1)
                       * np.linalg.norm(p2 - p0))
        curvature = 2 * cross / denominator if denominator > 0 else 0.0
        if curvature > best:
            best, best_k = curvature, k
    return float(a[best_k])
