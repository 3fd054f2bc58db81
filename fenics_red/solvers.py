"""Fixed-point projected gradient descent for the statistical estimator (paper, equations 6-9).

The loop (``E ← [E − ε(∇g(E) + λ∇R(E))]₊`` with ``Γ`` frozen, then ``Γ ← Γ(E)``, equations 5-7)
is assembled from separate objects, as in deepinv's ``optim``:

* the data fidelity, :class:`fenics_red.likelihood.StatisticalLikelihood` (``g``, ``∇g``,
  ``refresh``, ``lipschitz``);
* an optional prior (any object with ``gradient(E, out) -> R(E) or None``, ``value(E)`` and
  ``lipschitz``, see :class:`Prior`) and its weight ``λ`` (a number, or a callable evaluated at
  every refresh, e.g. the paper's rule ``λ ≥ ‖∇g(E)‖``, equation 12);
* the iteration, :class:`ProjectedGradient` or :class:`MonotoneFISTA`;
* the stopping rules, small objects with one interface (:class:`StoppingRule`:
  :class:`MisfitGuard`, :class:`SignificantDecrease`, :class:`Discrepancy`, :class:`StepBudget`,
  :class:`FixedPoint`), composed by :func:`stopping_rules` from the frozen dataclass
  :class:`MLSettings`, which holds every number of the loop.

Without a prior the loop computes the maximum-likelihood (ML) estimate (equation 6 with λ = 0;
``g`` and ``∇g``: equations 8-9). At realistic noise it *semi-converges*: the error first falls,
then grows as the iteration fits the noise, so the ML estimate is an early-stopped iteration and
its stopping rule is part of its definition. The defaults of :class:`MLSettings` are that
definition (the data recipe of the denoiser, stored with every estimate): start from the uniform
modulus that best fits the data, monotone FISTA with ``Γ`` frozen at it, stop at the first
iterate whose misfit is at most the number ``n`` of free equations (the discrepancy principle) or
after 150 steps. The measurements behind these choices, and the commands that made them, are in
``docs/studies.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Protocol, runtime_checkable

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np

from . import validation
from .forward import ElasticityModel, ForwardSettings
from .likelihood import LikelihoodSettings, NoiseModel, StatisticalLikelihood
from .measurements import Measurement
from .raster import ImageGrid

__all__ = ["MLSettings", "History", "IterationState", "LoopState", "Prior", "ProjectedGradient",
           "MonotoneFISTA", "FixedPointSolver", "MLReconstructor", "reconstruct_ml",
           "StoppingRule", "MisfitGuard", "SignificantDecrease",
           "CallbackStop", "Discrepancy", "StepBudget", "FixedPoint", "stopping_rules",
           "ml_options", "MLRunner", "setup_ml", "MAX_STEPS", "AUTO_CG_MIN_SNR_DB",
           "ML_DEFAULTS"]

_METHODS = ("pgd", "fista", "cg", "auto")

#: The budget of each iteration when :attr:`MLSettings.max_steps` is ``None``: CG converges on
#: exact data in about 3000 steps at 64² (docs/studies.md); noisy data stop it far sooner.
MAX_STEPS = {"pgd": 150, "fista": 150, "cg": 3000}

#: ``method="auto"`` takes CG for data whose SNR (:meth:`StatisticalLikelihood.data_snr_db`) is
#: at least this, FISTA below: with the discrepancy stop, CG's estimate was the better one on
#: average from 55 dB up and FISTA's at 45 dB and below (docs/studies.md).
AUTO_CG_MIN_SNR_DB = 50.0
_STOPS = ("discrepancy", "budget")


@dataclass(frozen=True)
class MLSettings:
    """Settings of the fixed-point projected-gradient loop; the defaults define the ML estimate.

    Attributes:
        method: ``"fista"`` (default; monotone FISTA, Beck & Teboulle 2009), ``"pgd"``
            (projected gradient descent, equation 7), ``"cg"`` (conjugate gradients on the
            quadratic data term with ``Γ`` frozen, :class:`ConjugateGradient`; the ML estimate
            only, no prior) or ``"auto"`` (CG for data of :data:`AUTO_CG_MIN_SNR_DB` or more
            without a prior, FISTA otherwise: :meth:`resolved`; the ``ml`` method's default).
        stop: ``"discrepancy"`` (default: stop when the misfit reaches ``τ n``, or at the budget)
            or ``"budget"`` (run :attr:`max_steps` steps unless converged, see :attr:`rtol`).
        discrepancy: ``τ`` of the discrepancy rule.
        max_steps: the budget of gradient steps (all rounds together); ``None``: the
            iteration's own (:data:`MAX_STEPS`).
        steps_per_round: gradient steps with ``Γ`` frozen before it is refreshed from the current
            ``E`` (equations 5-7). The default exceeds :attr:`max_steps`: the ML estimate keeps
            ``Γ`` at the initial modulus (``docs/studies.md``); RED-type loops refresh.
        rtol: a round ends when a proximal-gradient step changes ``E`` by less than ``rtol``
            (relative); the solve ends when, in addition, the round moved ``E`` by less than
            ``rtol`` (fixed point of equations 6-7 reached).
        floor: positivity floor of ``[·]₊`` relative to the initial level: ``E ≥ floor · E₀``.
        initial: the uniform initial modulus; ``None`` (default) fits it to the data
            (:meth:`StatisticalLikelihood.homogeneous_fit`).
        step_scale: ``ε = step_scale / L`` with ``L`` the power-iteration estimate of the largest
            eigenvalue of ``Dᵀ Γ⁻¹ D`` (+ ``λ`` times the prior's constant); PGD decreases the
            objective for ``step_scale < 2``, FISTA needs ``≤ 1``.
        power_iterations: power iterations for ``L`` at the first refresh.
        refresh_power_iterations: warm-started power iterations at later refreshes.
        backtracking: halve the step until the sufficient-decrease condition holds (one more
            data-term value per step; guards against an underestimated ``L``).
        restart: restart FISTA's momentum at each refresh of ``Γ`` (else carry it over).
        misfit_guard: stop (reason ``"misfit_guard"``) when a refresh of ``Γ`` finds the misfit
            above its value at the start of the run (or above ``τ n``, the noise level, when
            that is larger), and return the last refreshed iterate that was within it. A prior
            that pulls the estimate away from the data (a denoiser iterated outside the inputs
            it was trained on) is stopped there instead of diverging. The history ends with the
            refresh that tripped the guard; the estimate is the iterate of the refresh before
            it. Used by RED; off for the ML estimate.
        min_misfit_decrease: stop (reason ``"insignificant"``) when a refresh of ``Γ`` finds the
            misfit less than this many standard deviations ``√(2n)`` below the previous
            refresh's, and return the iterate of the previous refresh. Under the noise model the
            misfit at a fixed ``E`` is χ²-distributed with ``n`` degrees of freedom (standard
            deviation ``√(2n)``): a round that lowers it by less is not evidence from the data,
            only a fit of their noise, and a prior-driven loop that keeps going on such rounds
            creeps away from its start (RED below the denoiser's training SNR: see
            :mod:`fenics_red.red`). ``0`` (the default) turns it off.
        likelihood: linear-algebra settings of ``Γ⁻¹`` (round-off only, not the estimator).
    """

    method: str = "fista"
    stop: str = "discrepancy"
    discrepancy: float = 1.0
    max_steps: int | None = 150
    steps_per_round: int = 1000
    rtol: float = 1e-6
    floor: float = 0.01
    initial: float | None = None
    step_scale: float = 1.0
    power_iterations: int = 30
    refresh_power_iterations: int = 5
    backtracking: bool = False
    restart: bool = True
    misfit_guard: bool = False
    min_misfit_decrease: float = 0.0
    likelihood: LikelihoodSettings = field(default_factory=LikelihoodSettings)

    def __post_init__(self):
        if self.method not in _METHODS:
            raise ValueError(f"MLSettings.method must be one of {_METHODS}, got {self.method!r}")
        if self.stop not in _STOPS:
            raise ValueError(f"MLSettings.stop must be one of {_STOPS}, got {self.stop!r}")
        validation.positive(self.discrepancy, "MLSettings.discrepancy")
        if self.max_steps is not None:
            validation.budget(self.max_steps, "MLSettings.max_steps")
        validation.integer(self.steps_per_round, "MLSettings.steps_per_round", low=1)
        validation.non_negative(self.rtol, "MLSettings.rtol")
        validation.number(self.floor, "MLSettings.floor", 0.0, 1.0, low_open=True,
                          high_open=True)
        if self.initial is not None:
            validation.positive(self.initial, "MLSettings.initial")
        validation.number(self.step_scale, "MLSettings.step_scale", 0.0, 2.0, low_open=True,
                          high_open=True)
        validation.non_negative(self.min_misfit_decrease, "MLSettings.min_misfit_decrease")
        validation.integer(self.power_iterations, "MLSettings.power_iterations", low=1)
        validation.integer(self.refresh_power_iterations,
                           "MLSettings.refresh_power_iterations", low=1)
        for name in ("backtracking", "restart", "misfit_guard"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ValueError(f"MLSettings.{name} must be True or False")
        if isinstance(self.likelihood, Mapping):
            object.__setattr__(self, "likelihood", LikelihoodSettings.from_dict(self.likelihood))
        if not isinstance(self.likelihood, LikelihoodSettings):
            raise ValueError("MLSettings.likelihood must be LikelihoodSettings")

    def to_dict(self) -> dict:
        """Plain JSON-able dictionary (stored beside every estimate)."""
        out = asdict(self)
        out["likelihood"] = self.likelihood.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: Mapping) -> MLSettings:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown MLSettings field(s): {sorted(unknown)}")
        return cls(**dict(values))

    def replace(self, **changes) -> MLSettings:
        return replace(self, **changes)

    def resolved(self, snr_db: float | None = None, prior: bool = False) -> MLSettings:
        """The settings a run uses: ``"auto"`` made ``"cg"`` or ``"fista"`` by the data's SNR
        (``snr_db``; FISTA with a ``prior``) and ``max_steps=None`` the iteration's budget."""
        method = self.method
        if method == "auto":
            if snr_db is None and not prior:
                raise ValueError("MLSettings.method 'auto' needs the data's SNR to choose")
            method = "fista" if prior or snr_db < AUTO_CG_MIN_SNR_DB else "cg"
        steps = MAX_STEPS[method] if self.max_steps is None else self.max_steps
        return replace(self, method=method, max_steps=steps)


@runtime_checkable
class Prior(Protocol):
    """What the loop needs of a regulariser ``R`` (e.g. RED: ``∇R(E) = E − C(E)``, eq. 10).

    ``gradient`` fills ``out = ∇R(E)`` and returns ``R(E)`` when it comes for free (RED:
    ``½ Eᵀ(E − C(E))``, eq. 11) or ``None``; ``value`` returns ``R(E)``; ``lipschitz`` bounds the
    Lipschitz constant of ``∇R`` (enters the step size as ``L_g + λ L_R``). Calls are collective.
    """

    lipschitz: float

    def gradient(self, E: PETSc.Vec, out: PETSc.Vec) -> float | None: ...

    def value(self, E: PETSc.Vec) -> float: ...


@dataclass
class IterationState:
    """What a callback sees after each step (``E`` is the live iterate: copy it to keep it)."""

    round: int
    step: int
    E: PETSc.Vec
    objective: float
    misfit: float
    grad_norm: float
    step_size: float
    change: float
    time: float
    error: float
    lam: float


# -- stopping rules ------------------------------------------------------------------------------

#: When the loop asks a rule (:attr:`StoppingRule.when`): at the first iterate after each refresh
#: of ``Γ``, at every iterate, or when a round has ended without a stop (before the next refresh).
AT_REFRESH, AT_STEP, AT_ROUND_END = "refresh", "step", "round_end"
#: Which iterate the loop returns when a rule stops it (:attr:`StoppingRule.keep`): the current
#: one, or that of the last refresh of ``Γ`` that passed every rule.
KEEP_CURRENT, KEEP_LAST_REFRESH = "current", "last_refresh"


@dataclass
class LoopState(IterationState):
    """What a stopping rule sees: the iterate as a callback sees it, and the loop's bookkeeping.

    ``n_equations``: free equations ``n`` (the misfit's expected value at the true ``E``);
    ``round_steps``: steps since the last refresh of ``Γ``; ``prox_change``: relative change of
    the last proximal-gradient step; ``round_start``: the iterate at the last refresh; ``work``: a
    scratch vector of the same layout.
    """

    n_equations: int
    round_steps: int
    prox_change: float
    round_start: PETSc.Vec
    work: PETSc.Vec


@runtime_checkable
class StoppingRule(Protocol):
    """One reason to end the fixed-point loop.

    ``check(state)`` returns the reason to stop (the history's ``stop_reason``) or ``None``. The
    loop asks its rules at the point :attr:`when` (:data:`AT_REFRESH`, :data:`AT_STEP` or
    :data:`AT_ROUND_END`), in order; the first reason ends the run, which then returns the
    iterate named by :attr:`keep`. A rule may keep state across the calls of one run:
    :func:`stopping_rules` makes fresh ones for every run. States hold values reduced over the
    ranks, so every rank takes the same decision; collective operations on the state's vectors
    are allowed (every rank asks every rule).
    """

    when: str
    keep: str

    def check(self, state: LoopState) -> str | None: ...


class MisfitGuard:
    """``"misfit_guard"``: a refresh finds the misfit above its value at the start of the run, or
    above ``τ n`` when that is larger (:attr:`MLSettings.misfit_guard`); keeps the last
    refreshed iterate within the limit."""

    when, keep = AT_REFRESH, KEEP_LAST_REFRESH

    def __init__(self, discrepancy: float):
        self.discrepancy = discrepancy
        self.limit = math.inf

    def check(self, state: LoopState) -> str | None:
        if state.round == 0:  # misfits within the noise level are never suspicious
            self.limit = max(state.misfit, self.discrepancy * state.n_equations)
        return "misfit_guard" if state.misfit > self.limit else None


class SignificantDecrease:
    """``"insignificant"``: a refresh finds the misfit less than ``c √(2n)`` (``c`` standard
    deviations of a χ²_n misfit) below the previous refresh's
    (:attr:`MLSettings.min_misfit_decrease`): the round was not supported by the data; keeps the
    iterate of the previous refresh."""

    when, keep = AT_REFRESH, KEEP_LAST_REFRESH

    def __init__(self, min_decrease: float):
        self.min_decrease = min_decrease
        self.previous = math.inf

    def check(self, state: LoopState) -> str | None:
        if self.previous - state.misfit < self.min_decrease * math.sqrt(2.0 * state.n_equations):
            return "insignificant"
        self.previous = state.misfit
        return None


class CallbackStop:
    """``"callback"``: the user's ``callback(state)`` returned a true value (asked at every
    iterate, before the rules of the settings)."""

    when, keep = AT_STEP, KEEP_CURRENT

    def __init__(self, callback: Callable[[IterationState], bool | None]):
        self.callback = callback

    def check(self, state: LoopState) -> str | None:
        return "callback" if self.callback(state) else None


class Discrepancy:
    """``"discrepancy"``: the misfit is at most ``τ n`` (the discrepancy principle,
    :attr:`MLSettings.stop` ``"discrepancy"``)."""

    when, keep = AT_STEP, KEEP_CURRENT

    def __init__(self, discrepancy: float):
        self.discrepancy = discrepancy

    def check(self, state: LoopState) -> str | None:
        return "discrepancy" if state.misfit <= self.discrepancy * state.n_equations else None


class StepBudget:
    """``"max_steps"``: :attr:`MLSettings.max_steps` gradient steps are done."""

    when, keep = AT_STEP, KEEP_CURRENT

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def check(self, state: LoopState) -> str | None:
        return "max_steps" if state.step >= self.max_steps else None


class FixedPoint:
    """``"rtol"``: a round ended by a proximal step smaller than :attr:`MLSettings.rtol` moved
    ``E`` by less than ``rtol`` (relative) since its refresh of ``Γ``: a fixed point of
    equations 6-7."""

    when, keep = AT_ROUND_END, KEEP_CURRENT

    def __init__(self, rtol: float):
        self.rtol = rtol

    def check(self, state: LoopState) -> str | None:
        if not state.prox_change < self.rtol:
            return None
        state.work.waxpy(-1.0, state.round_start, state.E)
        return "rtol" if state.work.norm() <= self.rtol * state.E.norm() else None


def stopping_rules(settings: MLSettings, callback: Callable | None = None
                   ) -> list[StoppingRule]:
    """Fresh stopping rules of one run, in the order the loop asks them."""
    rules: list[StoppingRule] = []
    if settings.misfit_guard:
        rules.append(MisfitGuard(settings.discrepancy))
    if settings.min_misfit_decrease > 0:
        rules.append(SignificantDecrease(settings.min_misfit_decrease))
    if callback is not None:
        rules.append(CallbackStop(callback))
    if settings.stop == "discrepancy":
        rules.append(Discrepancy(settings.discrepancy))
    rules.append(StepBudget(settings.max_steps))
    rules.append(FixedPoint(settings.rtol))
    return rules


def _first_stop(rules: list[StoppingRule], state: LoopState) -> tuple[str, StoppingRule | None]:
    """The first rule's reason to stop, and the rule (``("", None)`` when none stops)."""
    for rule in rules:
        reason = rule.check(state)
        if reason:
            return reason, rule
    return "", None


class History:
    """Per-iteration record of the loop: one row per iterate, plus one row per refresh.

    Columns of :attr:`rows` (see :attr:`COLUMNS`): ``round``, ``step`` (gradient steps so far),
    ``objective`` (``g + λR`` with ``Γ`` frozen at the round's start: decreases within a round),
    ``misfit`` (``(f − DE)ᵀ Γ⁻¹ (f − DE)``; compare with :attr:`n_equations`), ``grad_norm``
    (``‖∇(g + λR)‖`` at the point of the gradient), ``step_size`` (``ε``), ``change`` (relative
    change of ``E`` in the step), ``time`` (seconds since the start), ``error`` (relative L2 error
    against the truth, ``nan`` without one) and ``lam``. :attr:`refreshes` holds one dict per
    refresh (``round``, ``step``, ``lipschitz``, ``logdet``, ``nll`` = ``g + ½ log|Γ|`` at the
    refreshed ``Γ``, ``misfit``, ``time``).
    """

    COLUMNS = ("round", "step", "objective", "misfit", "grad_norm", "step_size", "change", "time",
               "error", "lam")

    def __init__(self, n_equations: int):
        self.n_equations = int(n_equations)
        self.rows: list[dict] = []
        self.refreshes: list[dict] = []
        self.stop_reason = ""
        self.setup_time = 0.0
        self.solver = ""  # the iteration that ran (MLSettings.resolved)
        self.max_steps = 0

    def append(self, **row) -> None:
        self.rows.append({c: row.get(c, math.nan) for c in self.COLUMNS})

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> np.ndarray:
        return np.array([row[name] for row in self.rows], dtype=float)

    def as_arrays(self) -> dict[str, np.ndarray]:
        """Columns as arrays (``iter_*``) and refresh records (``refresh_*``)."""
        out = {name: self.column(name) for name in self.COLUMNS}
        for key in ("round", "step", "lipschitz", "logdet", "nll", "misfit", "time"):
            out[f"refresh_{key}"] = np.array([r[key] for r in self.refreshes], dtype=float)
        return out

    @property
    def final(self) -> dict:
        return self.rows[-1] if self.rows else {}

    def summary(self) -> dict:
        """Scalars for logs and file attributes."""
        final = self.final
        return {"steps": int(final.get("step", 0)), "rounds": len(self.refreshes),
                "misfit": float(final.get("misfit", math.nan)),
                "n_equations": self.n_equations, "error": float(final.get("error", math.nan)),
                "time": float(final.get("time", math.nan)), "stop_reason": self.stop_reason,
                "solver": self.solver, "max_steps": self.max_steps}


class _Objective:
    """``F = g + λR`` and its gradient; counts data-term evaluations."""

    def __init__(self, fidelity: StatisticalLikelihood, prior, work: PETSc.Vec):
        self.fidelity = fidelity
        self.prior = prior
        self.lam = 0.0
        self._work = work
        self.g = math.nan  # data term of the last evaluation

    def value_and_gradient(self, E, grad) -> float:
        self.g = self.fidelity.gradient(E, grad)
        if self.prior is None or self.lam == 0.0:
            return self.g
        r = self.prior.gradient(E, self._work)
        if r is None:
            r = self.prior.value(E)
        grad.axpy(self.lam, self._work)
        return self.g + self.lam * r

    def value(self, E) -> float:
        self.g = self.fidelity.value(E)
        if self.prior is None or self.lam == 0.0:
            return self.g
        return self.g + self.lam * self.prior.value(E)


class ProjectedGradient:
    """``E ← [E − ε∇F(E)]₊`` (paper, equation 7), with optional backtracking.

    One gradient evaluation per step (two ``Γ`` back-substitutions and two SpMVs for the ML
    estimate), and the objective value comes with it; backtracking adds one value per trial.
    Protocol of an iteration: ``reset(x)`` at each refresh of ``Γ``; ``evaluate(x, F)`` returns
    ``(F(x), g(x), grad_norm)`` of the current iterate; ``advance(x, F, project, ε, bt)`` moves
    ``x`` in place and returns the step size used.
    """

    name = "pgd"

    def __init__(self, template: PETSc.Vec):
        self.grad = template.duplicate()
        self.trial = template.duplicate()
        self.work = template.duplicate()

    def reset(self, x: PETSc.Vec, restart: bool = True) -> None:
        self._fx = None

    def evaluate(self, x: PETSc.Vec, objective: _Objective) -> tuple[float, float, float]:
        self._fx = objective.value_and_gradient(x, self.grad)
        return self._fx, objective.g, self.grad.norm()

    def advance(self, x, objective: _Objective, project, eps: float, backtracking: bool
                ) -> tuple[float, float]:
        while True:
            self.trial.waxpy(-eps, self.grad, x)
            project(self.trial)
            if not backtracking:
                break
            if _sufficient_decrease(objective, self.trial, x, self.grad, self._fx, eps,
                                    self.work):
                break
            eps *= 0.5
        self.work.waxpy(-1.0, x, self.trial)
        prox_change = self.work.norm() / max(x.norm(), 1e-300)
        self.trial.copy(x)
        return eps, prox_change

    def destroy(self):
        for vec in (self.grad, self.trial, self.work):
            vec.destroy()


def _sufficient_decrease(objective, z, y, grad, fy, eps, work) -> bool:
    """``F(z) ≤ F(y) + ∇F(y)·(z − y) + ‖z − y‖²/(2ε)`` (descent lemma; Beck & Teboulle 2009)."""
    fz = objective.value(z)
    work.waxpy(-1.0, y, z)
    dd, gd = work.dot(work), grad.dot(work)
    return fz <= fy + gd + dd / (2 * eps) + 1e-12 * abs(fy) or eps < 1e-30


class MonotoneFISTA:
    """Monotone FISTA (Beck & Teboulle 2009, MFISTA) for ``min F(E)`` s.t. ``E ≥ floor``.

    ``z = [y − ε∇F(y)]₊``; ``x⁺ = z`` if ``F(z) ≤ F(x)`` else ``x``;
    ``y⁺ = x⁺ + (t/t⁺)(z − x⁺) + ((t − 1)/t⁺)(x⁺ − x)``, ``t⁺ = (1 + √(1 + 4t²))/2``. Each step
    costs one gradient at ``y`` and one value at ``z`` (three back-substitutions for the ML
    estimate); the objective never increases, and the momentum restarts at every refresh of
    ``Γ`` (unless :attr:`MLSettings.restart` is off). Same protocol as
    :class:`ProjectedGradient`.
    """

    name = "fista"

    def __init__(self, template: PETSc.Vec):
        self.grad = template.duplicate()
        self.y = template.duplicate()
        self.z = template.duplicate()
        self.x_old = template.duplicate()

    def reset(self, x: PETSc.Vec, restart: bool = True) -> None:
        """Start a round (``Γ`` refreshed). ``restart=False`` keeps the momentum (``t``, ``y``)."""
        if restart or not hasattr(self, "t"):
            x.copy(self.y)
            self.t = 1.0
            self._y_is_x = True
        else:
            self._y_is_x = False
        self.fx = None
        self.grad_norm = math.nan
        self._grad_current = False

    def evaluate(self, x, objective: _Objective) -> tuple[float, float, float]:
        if self.fx is None:
            if self._y_is_x:  # y == x: the gradient at y gives F(x) too
                self.fy = self.fx = objective.value_and_gradient(self.y, self.grad)
                self.grad_norm = self.grad.norm()
                self._grad_current = True
            else:
                self.fx = objective.value(x)
            self.gx = objective.g
        return self.fx, self.gx, self.grad_norm

    def advance(self, x, objective: _Objective, project, eps: float, backtracking: bool
                ) -> tuple[float, float]:
        if not self._grad_current:
            self.fy = objective.value_and_gradient(self.y, self.grad)
            self.grad_norm = self.grad.norm()
        while True:
            self.z.waxpy(-eps, self.grad, self.y)
            project(self.z)
            if not backtracking or _sufficient_decrease(objective, self.z, self.y, self.grad,
                                                        self.fy, eps, self.x_old):
                break
            eps *= 0.5
        fz = objective.value(self.z)
        gz = objective.g
        self.x_old.waxpy(-1.0, self.y, self.z)
        prox_change = self.x_old.norm() / max(self.y.norm(), 1e-300)
        x.copy(self.x_old)
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * self.t**2))
        if fz <= self.fx:
            self.z.copy(x)
            self.fx, self.gx = fz, gz
        # y = x + (t/t_new)(z − x) + ((t − 1)/t_new)(x − x_old)
        a, b = self.t / t_new, (self.t - 1.0) / t_new
        self.y.waxpy(-1.0, x, self.z)          # z − x
        self.y.scale(a)
        self.y.axpy(1.0 + b, x)
        self.y.axpy(-b, self.x_old)
        self.t = t_new
        self._grad_current = False
        return eps, prox_change

    def destroy(self):
        for vec in (self.grad, self.y, self.z, self.x_old):
            vec.destroy()


class ConjugateGradient:
    """Preconditioned conjugate gradients on ``g(E) = ½‖f − DE‖²_{Γ⁻¹}`` with ``Γ`` frozen and
    ``E ≥ floor`` (a Newton-Krylov step of the fixed-point loop, equations 6-7, for the ML
    estimate).

    With ``Γ`` frozen ``g`` is quadratic with Hessian ``H = Dᵀ Γ⁻¹ D`` (matrix-free, one ``Γ``
    solve per product). CG on ``H δ = −∇g`` needs one product per step (the cost of a gradient)
    and is slowed by ``H``'s conditioning as ``√κ``, not ``κ``; its early iterates are smooth, and
    its semi-convergence under noise is the regularisation that the discrepancy rule stops
    (Hanke 1995). The preconditioner is the diagonal of ``Dᵀ Σn⁻¹ D`` over ``E²`` (``Γ`` with
    ``K`` replaced by its scale ``E``: the local sensitivity of the equations to each node's
    modulus, one sparse product per refresh), which evens out the nodes that the strain field
    barely loads. ``g`` and ``−∇g`` are updated exactly
    from the step, so the misfit at every iterate is known without another solve.

    Within a round the iterates are not projected (:attr:`projects` is false): the loop puts
    ``E`` on the positivity floor before each refresh of ``Γ`` (which needs ``E > 0``) and at the
    end. Keeping the bound inside CG (an active set that cuts steps at the floor and restarts)
    was measured worse: every restart drops the Krylov space, and early CG iterates touch the
    floor where the solution is far above it (``docs/studies.md``). Same protocol as
    :class:`ProjectedGradient`; the step size it returns is CG's ``α``. A round runs
    :attr:`MLSettings.steps_per_round` steps unless CG has converged exactly: its residual falls
    by six orders of magnitude while the estimate still improves (64², exact data: a round that
    ended there, after 328 of 1000 steps, doubled the error at step 1000), so it is no measure of
    a solved round.
    """

    name = "cg"
    needs_lipschitz = False
    projects = False

    def __init__(self, template: PETSc.Vec):
        self.r, self.z, self.p, self.Hp, self.m_inv = (template.duplicate() for _ in range(5))

    def reset(self, x: PETSc.Vec, restart: bool = True) -> None:
        self._fresh = True

    def _preconditioner(self, fidelity, x: PETSc.Vec) -> None:
        """``m_inv = x² / diag(Dᵀ Σn⁻¹ D)`` over the free rows, at every refresh of ``Γ``:
        ``Γ⁻¹ = K⁻ᵀ Σn⁻¹ K⁻¹`` and ``K`` scales with the round's ``E`` (and ``D`` changes with
        each data set, in place)."""
        fidelity.sensitivity(self.m_inv)
        self.m_inv.array[:] = x.array_r**2 / self.m_inv.array_r

    def evaluate(self, x, objective: _Objective) -> tuple[float, float, float]:
        if objective.prior is not None and objective.lam != 0.0:
            raise ValueError("the 'cg' iteration solves the ML estimate's quadratic data term; "
                             "a prior needs 'fista' or 'pgd'")
        if self._fresh:
            self._preconditioner(objective.fidelity, x)
            self.g = objective.value_and_gradient(x, self.r)
            self.r.scale(-1.0)  # r = −∇g: the descent direction
            self.z.pointwiseMult(self.m_inv, self.r)
            self.z.copy(self.p)
            self.rz = self.r.dot(self.z)
            self._fresh = False
        return self.g, self.g, self.r.norm()

    def advance(self, x, objective: _Objective, project, eps: float, backtracking: bool
                ) -> tuple[float, float]:
        objective.fidelity.hessian_mult(self.p, self.Hp)
        curvature = self.p.dot(self.Hp)
        if not (curvature > 0.0 and self.rz > 0.0):  # nothing left to fit: the round is solved
            return eps, 0.0
        alpha = self.rz / curvature
        x.axpy(alpha, self.p)
        self.g -= 0.5 * alpha * self.rz  # g(x + αp) = g − α rᵀp + ½α² pᵀHp, rᵀp = rᵀz
        self.r.axpy(-alpha, self.Hp)
        self.z.pointwiseMult(self.m_inv, self.r)
        rz = self.r.dot(self.z)
        self.p.aypx(rz / self.rz, self.z)
        self.rz = rz
        # a round runs its steps_per_round: CG's residual falls by many orders of magnitude
        # long before the estimate stops improving, so it is no measure of a solved round
        return alpha, math.inf if rz > 0.0 else 0.0

    def destroy(self):
        for vec in (self.r, self.z, self.p, self.Hp, self.m_inv):
            vec.destroy()


_ITERATIONS = {"pgd": ProjectedGradient, "fista": MonotoneFISTA, "cg": ConjugateGradient}


class FixedPointSolver:
    """The fixed-point loop of equations 6-7: refresh ``Γ(E)``, then gradient steps with it frozen.

    Args:
        fidelity: the data term (with its data set).
        settings: loop settings (:class:`MLSettings`).
        prior: optional regulariser (:class:`Prior`); ``None`` gives the ML estimate.
        lam: prior weight ``λ``: a number or ``lam(state) -> float`` called at every refresh with
            the :class:`IterationState` of the current iterate (its ``grad_norm`` is ``‖∇g‖``).

    Vectors and iterations are allocated once; :meth:`run` may be called for many data sets (set
    each on ``fidelity`` first).
    """

    def __init__(self, fidelity: StatisticalLikelihood, settings: MLSettings | None = None,
                 prior: Prior | None = None, lam: float | Callable = 0.0):
        self.fidelity = fidelity
        self.settings = settings or MLSettings()
        if not isinstance(self.settings, MLSettings):
            raise TypeError(f"settings must be MLSettings, got {type(self.settings).__name__}")
        if prior is not None and not isinstance(prior, Prior):
            raise TypeError("prior must provide gradient(E, out), value(E) and lipschitz")
        self.prior = prior
        self.lam = lam
        self.comm = fidelity.comm
        self.x = fidelity.create_vector()
        self._start = fidelity.create_vector()
        self._work = fidelity.create_vector()
        self._diff = fidelity.create_vector()
        self._truth = fidelity.create_vector()
        self._refreshed = fidelity.create_vector()  # the iterate of the last refresh of Γ
        self._objective = _Objective(fidelity, prior, self._work)
        self._iterations: dict = {}  # by method: "auto" may use two on different data sets
        if self.settings.method != "auto":
            self._iteration(self.settings.method)
        self._power_vector = None
        self.floor = 0.0

    def _iteration(self, method: str):
        if method not in self._iterations:
            self._iterations[method] = _ITERATIONS[method](self.x)
        return self._iterations[method]

    @property
    def power_vector(self) -> PETSc.Vec | None:
        """The last power iteration's vector of ``Dᵀ Γ⁻¹ D`` (``None`` before a run): a warm
        start for another solver on the same data set."""
        return self._power_vector

    def _project(self, vec: PETSc.Vec) -> None:
        """``[·]₊``: the positivity floor (local, no communication)."""
        array = vec.array
        np.maximum(array, self.floor, out=array)

    def initial_level(self) -> float:
        """The uniform initial modulus (fitted to the data unless :attr:`MLSettings.initial`)."""
        if self.settings.initial is not None:
            return float(self.settings.initial)
        return self.fidelity.homogeneous_fit()

    def _lambda(self, state: IterationState) -> float:
        if self.prior is None:
            return 0.0
        lam = self.lam(state) if callable(self.lam) else self.lam
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"the prior weight λ must be finite and non-negative, got {lam!r}")
        return float(lam)

    def _error(self, x, truth_norm) -> float:
        if truth_norm is None:
            return math.nan
        self._diff.waxpy(-1.0, self._truth, x)
        return self._diff.norm() / truth_norm

    def _start_vector(self, E0) -> float:
        fid = self.fidelity
        if E0 is None or isinstance(E0, int | float | np.floating | np.integer):
            level = self.initial_level() if E0 is None else float(E0)
            if not (math.isfinite(level) and level > 0):
                raise ValueError(f"the initial modulus must be finite and positive, got {level!r}")
            self.x.set(level)
            return level
        if isinstance(E0, PETSc.Vec):
            E0.copy(self.x)
        else:
            fid.from_values(E0, self.x, name="initial modulus")
        local = self.x.array_r
        if not self.comm.allreduce(bool(np.isfinite(local).all() and (local > 0).all()),
                                   op=MPI.LAND):  # every rank reduces, then all raise together
            raise ValueError("the initial modulus must be finite and strictly positive")
        level = self.x.sum() / self.x.getSize()
        return level

    def run(self, E0: PETSc.Vec | np.ndarray | float | None = None, *,
            truth: PETSc.Vec | np.ndarray | None = None,
            callback: Callable[[IterationState], bool | None] | None = None
            ) -> tuple[PETSc.Vec, History]:
        """Run the loop from ``E0`` (vector, image or number; default: :meth:`initial_level`).

        Returns the estimate (the solver's own vector: copy it before the next run) and the
        :class:`History`. ``truth`` (vector or image) adds the relative error to the history.
        ``callback(state)`` is called for every iterate; returning ``True`` stops the loop. The
        loop ends when one of :func:`stopping_rules` (composed from the settings, the callback
        first among the per-iterate rules) gives a reason: the history's ``stop_reason``.
        Collective.
        """
        fid, obj, x = self.fidelity, self._objective, self.x
        t0 = time.perf_counter()
        s = self.settings.resolved(
            fid.data_snr_db() if self.settings.method == "auto" and self.prior is None else None,
            prior=self.prior is not None)
        it = self._iteration(s.method)
        history = History(fid.n_equations)
        history.solver, history.max_steps = s.method, s.max_steps
        self.floor = s.floor * self._start_vector(E0)
        self._project(x)
        truth_norm = None
        if truth is not None:
            if isinstance(truth, PETSc.Vec):
                truth.copy(self._truth)
            else:
                fid.from_values(truth, self._truth, name="true modulus")
            truth_norm = self._truth.norm()
        history.setup_time = time.perf_counter() - t0
        if self._power_vector is not None:
            # every run starts its power iteration afresh: an estimate must not depend on the
            # data sets solved before it (e.g. on how --all spread the samples over ranks)
            self._power_vector.destroy()
            self._power_vector = None

        rules = stopping_rules(s, callback)
        at_refresh, at_step, at_round_end = ([r for r in rules if r.when == when]
                                             for when in (AT_REFRESH, AT_STEP, AT_ROUND_END))
        keep_refreshed = any(r.keep == KEEP_LAST_REFRESH for r in rules)
        steps, rnd, change, prox_change, stop, rule = 0, 0, 0.0, math.inf, "", None
        projects = getattr(it, "projects", True)
        while True:
            # -- refresh Γ(E) (equation 5): one factorisation, then L by power iteration ------
            if not projects:  # an iteration that leaves the bound to the loop (cg)
                self._project(x)
            fid.refresh(x)
            if getattr(it, "needs_lipschitz", True):
                iters = (s.power_iterations if self._power_vector is None
                         else s.refresh_power_iterations)
                L_g, self._power_vector = fid.lipschitz(iters, v=self._power_vector)
            else:  # CG takes its own steps
                L_g = math.nan
            lam = 0.0
            if self.prior is not None:  # λ rules may look at ‖∇g(E)‖ (equation 12)
                g_ref = fid.gradient(x, self._work)
                lam = self._lambda(IterationState(
                    rnd, steps, x, math.nan, 2 * g_ref, self._work.norm(), math.nan, change,
                    time.perf_counter() - t0, math.nan, math.nan))
            obj.lam = lam
            L = L_g + (lam * float(self.prior.lipschitz) if self.prior is not None else 0.0)
            eps = s.step_scale / L
            x.copy(self._start)
            it.reset(x, restart=s.restart or rnd == 0)
            refresh = {"round": rnd, "step": steps, "lipschitz": L_g, "logdet": fid.logdet()}
            round_steps = 0
            while True:
                F, g, grad_norm = it.evaluate(x, obj)
                now = time.perf_counter() - t0
                if round_steps == 0:
                    refresh.update(nll=g + 0.5 * refresh["logdet"], misfit=2 * g, time=now)
                    history.refreshes.append(refresh)
                history.append(round=rnd, step=steps, objective=F, misfit=2 * g,
                               grad_norm=grad_norm, step_size=eps, change=change, time=now,
                               error=self._error(x, truth_norm), lam=lam)
                state = LoopState(rnd, steps, x, F, 2 * g, grad_norm, eps, change, now,
                                  history.rows[-1]["error"], lam, fid.n_equations, round_steps,
                                  prox_change, self._start, self._diff)
                if round_steps == 0:
                    stop, rule = _first_stop(at_refresh, state)
                    if stop:
                        break
                    if keep_refreshed:
                        x.copy(self._refreshed)
                stop, rule = _first_stop(at_step, state)
                if stop:
                    break
                if round_steps > 0 and prox_change < s.rtol:
                    break  # the frozen-Γ problem is solved: refresh (or stop, below)
                if round_steps >= s.steps_per_round:
                    break
                x.copy(self._diff)
                eps, prox_change = it.advance(x, obj, self._project, eps, s.backtracking)
                self._diff.axpy(-1.0, x)
                change = self._diff.norm() / max(x.norm(), 1e-300)
                steps += 1
                round_steps += 1
            if not stop:
                stop, rule = _first_stop(at_round_end, state)
            if stop:
                if rule.keep == KEEP_LAST_REFRESH:
                    self._refreshed.copy(x)  # back to the iterate of the refresh before
                if not projects:
                    self._project(x)
                break
            rnd += 1
        history.stop_reason = stop
        return x, history

    def destroy(self) -> None:
        """Free the PETSc objects (collective)."""
        for iteration in self._iterations.values():
            iteration.destroy()
        for vec in (self.x, self._start, self._work, self._diff, self._truth, self._refreshed):
            vec.destroy()
        if self._power_vector is not None:
            self._power_vector.destroy()


class MLReconstructor:
    """Maximum-likelihood (unregularised, early-stopped) estimates on one grid, objects reused.

    Builds the forward model, the likelihood and the solver once; :meth:`run` estimates one data
    set after another (the training-set builder calls it for every phantom).

    Args:
        grid: the image grid of the data.
        forward: the forward model's settings (material law, loads, supports) used to make the
            data.
        settings: the estimator (default: :class:`MLSettings` defaults: the data recipe).
        comm: the communicator the mesh is distributed over.
    """

    def __init__(self, grid: ImageGrid, forward: ForwardSettings | None = None,
                 settings: MLSettings | None = None, comm: MPI.Comm = MPI.COMM_SELF):
        self.grid = grid
        self.settings = settings or MLSettings()
        self.model = ElasticityModel.on_grid(grid, comm, forward or ForwardSettings())
        self.likelihood = StatisticalLikelihood(self.model, settings=self.settings.likelihood)
        self.solver = FixedPointSolver(self.likelihood, self.settings)

    def run(self, displacement, noise: NoiseModel, truth=None, E0=None, callback=None
            ) -> tuple[np.ndarray, History]:
        """The ML estimate (on every rank, in the data's layout: an image on grids, one value per
        node on meshes) of the measured displacement components with ``noise``.

        ``truth`` (same layout) adds errors to the history; ``E0`` overrides the initial guess.
        Collective.
        """
        self.likelihood.set_data(displacement, noise)
        E, history = self.solver.run(E0, truth=truth, callback=callback)
        return self.likelihood.to_values(E), history

    def run_sample(self, sample, callback=None) -> tuple[np.ndarray, History]:
        """:meth:`run` on a data set sample (see :meth:`Measurement.from_sample
        <fenics_red.measurements.Measurement.from_sample>`)."""
        m = Measurement.from_sample(sample)
        return self.run(m.displacement, m.noise, truth=m.truth, callback=callback)

    def destroy(self) -> None:
        self.solver.destroy()
        self.likelihood.destroy()
        self.model.destroy()


def reconstruct_ml(sample, settings: MLSettings | None = None, comm: MPI.Comm = MPI.COMM_SELF,
                   *, grid: ImageGrid | None = None, forward: ForwardSettings | None = None,
                   callback=None) -> tuple[np.ndarray, History]:
    """The ML estimate of one sample: ``(E_image, history)``.

    ``sample`` as in :meth:`Measurement.from_sample`; ``grid`` defaults to unit width and square
    cells (pass ``dataset.settings.grid``), ``forward`` to :class:`ForwardSettings` defaults (pass
    ``dataset.settings.forward``: the loads must be those that made the data). For many samples
    use :class:`MLReconstructor`, which allocates once.
    """
    m = Measurement.from_sample(sample)
    displacement, noise, truth = m.displacement, m.noise, m.truth
    if grid is None and np.ndim(displacement[0]) != 2:
        raise ValueError("a sample of one value per mesh node needs its mesh: pass "
                         "grid=dataset.settings.space")
    grid = grid or ImageGrid.from_shape(np.shape(displacement[0]))
    ml = MLReconstructor(grid, forward, settings, comm)
    try:
        return ml.run(displacement, noise, truth=truth, callback=callback)
    finally:
        ml.destroy()


# -- the "ml" method of fenics_red.methods ------------------------------------------------------

#: Generic option names of :mod:`fenics_red.methods` and the :class:`MLSettings` fields.
_ML_GENERIC = {"solver": "method", "max_steps": "max_steps", "stop": "stop"}


#: The ``"ml"`` method's defaults: the iteration chosen by the data's SNR, with its own budget.
#: At 25-45 dB this is the data recipe :class:`MLSettings` (FISTA, 150 steps), the estimate RED
#: and the denoiser's training start from; on nearly exact data, CG to convergence.
ML_DEFAULTS = MLSettings(method="auto", max_steps=None)


def ml_options(options: Mapping | MLSettings | None = None) -> MLSettings:
    """The ``"ml"`` method's options: :data:`ML_DEFAULTS` with the overrides ``options``
    (its fields, or the generic ``solver``/``max_steps``/``stop``); settings pass as they are."""
    if isinstance(options, MLSettings):
        return options
    values = ML_DEFAULTS.to_dict()
    for key, value in dict(options or {}).items():
        name = _ML_GENERIC.get(key, key)
        if name not in values:
            accepted = sorted(set(values) | set(_ML_GENERIC))
            raise ValueError(f"method 'ml' has no option {key!r}; accepted: {accepted}")
        values[name] = value
    return MLSettings.from_dict(values)


class MLRunner:
    """The ``"ml"`` method: :class:`MLReconstructor` behind the runner API of
    :mod:`fenics_red.methods`."""

    def __init__(self, grid: ImageGrid, forward: ForwardSettings, comm: MPI.Comm,
                 options: Mapping | MLSettings | None = None):
        self.options = ml_options(options)
        self.reconstructor = MLReconstructor(grid, forward, self.options, comm)

    @property
    def settings(self) -> dict:
        return self.options.to_dict()

    def run(self, sample) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        estimate, history = self.reconstructor.run_sample(sample)
        return estimate, history.as_arrays(), history.summary()

    def destroy(self) -> None:
        self.reconstructor.destroy()


def setup_ml(grid: ImageGrid, forward: ForwardSettings, comm: MPI.Comm,
             options: Mapping | MLSettings | None = None) -> MLRunner:
    """Factory of the ``"ml"`` method (options: see :func:`ml_options`)."""
    return MLRunner(grid, forward, comm, options)
