"""RED reconstruction and the one-shot ``denoised-ml`` yardstick (paper, equations 6-12, Fig. 1).

RED finds a fixed point of the paper's iteration with the learned prior of
:class:`fenics_red.priors.RedPrior`, i.e. an ``E`` with ``∇g(E) + λ (E − C(E)) = 0``::

    E ← [E − ε (∇g(E) + λ (E − C(E)))]₊,   Γ refreshed from E every few steps   (6)-(7), (10)

A run on one data set has three stages:

1. the maximum-likelihood (ML) estimate ``Ẽ`` with the *training recipe* of the denoiser (the
   default :class:`~fenics_red.solvers.MLSettings`: the denoiser was trained on exactly this
   estimator, so it must see the same kind of input);
2. ``C(Ẽ)``: the denoiser applied once. This is the ``denoised-ml`` method, and RED's start;
3. the RED loop from ``C(Ẽ)``. By default (``solver="fixed-point"``, :class:`REDFixedPoint`) each
   outer step refreshes ``Γ`` and λ (a rule of :mod:`fenics_red.priors`,
   :attr:`REDSettings.lam`), applies the denoiser once and solves the stationarity condition with
   ``Γ`` frozen, ``(H + λI) E = Dᵀ Γ⁻¹ f + λ C(E_k)``, by a few CG steps (the fixed-point form of
   Romano, Elad & Milanfar 2017). ``solver="pgd"``/``"fista"`` run the gradient iteration above in
   :class:`fenics_red.solvers.FixedPointSolver` instead, ``Γ`` and λ refreshed every
   :attr:`REDSettings.steps_per_round` steps. Either loop ends by the stopping rules of
   :func:`fenics_red.solvers.stopping_rules`: a fixed point (:attr:`REDSettings.rtol`), a round
   without a significant decrease of the misfit, the misfit guard or the step budget. On the
   validation sets the fixed-point form ends after one to three denoiser calls where the gradient
   loop makes 13-50, with the same errors (``docs/studies.md``, "RED by a fixed point with inner
   CG").

``denoised-ml`` is the honest yardstick for RED: where RED does not beat it, the physics loop adds
nothing to one pass of the network. The defaults (λ = 0.001 L_g, the significance stop and the
misfit guard of :class:`REDSettings`) were chosen on validation sets at 25, 35 and 45 dB; the
measurements, and the commands that made them, are in ``docs/studies.md``. In short: one denoiser
pass takes 37-50 % off the ML estimate's error and the loop changes it by under 0.5 %; larger
weights, and rounds that lower the misfit by less than its noise, make it worse.

The default denoiser is the model shipped in ``fenics_red/data/denoiser.pt`` (trained by
``make denoiser``: see the README); any file written by ``fenics-red train`` can replace it.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np

from . import validation
from .forward import ElasticityModel, ForwardSettings
from .io import file_sha256
from .likelihood import StatisticalLikelihood
from .measurements import Measurement
from .raster import ImageGrid
from .solvers import (
    AT_REFRESH,
    AUTO_CG_MIN_SNR_DB,
    KEEP_LAST_REFRESH,
    FixedPointSolver,
    History,
    IterationState,
    LoopState,
    MLSettings,
    stopping_rules,
)

__all__ = ["REDSettings", "DenoisedMLSettings", "REDReconstructor", "REDFixedPoint",
           "default_denoiser_path",
           "load_denoiser", "red_options", "denoised_ml_options", "setup_red",
           "setup_denoised_ml", "snr_warning", "training_snrs"]

_STARTS = ("denoised-ml", "ml", "homogeneous")
_SOLVERS = ("pgd", "fista", "fixed-point")
_ACCELERATIONS = ("none", "anderson")

#: :attr:`REDSettings.start_check`: chosen on the validation sets of ``docs/studies.md`` (the
#: paper's phantoms and the held-out ``layers`` family; never the test sets): 20 with the base
#: denoiser, 30 since the fine-tuned one (2026-12-01).
START_CHECK = 30.0


def _check_denoiser(settings, name: str) -> None:
    """``denoiser``: ``None`` or a non-empty path (kept as a string); ``flip_average``: a bool."""
    denoiser = settings.denoiser
    if isinstance(denoiser, os.PathLike):
        denoiser = os.fspath(denoiser)
        object.__setattr__(settings, "denoiser", denoiser)
    if denoiser is not None and not (isinstance(denoiser, str) and denoiser):
        raise ValueError(f"{name}.denoiser must be None (the shipped model) or a model file, "
                         f"got {denoiser!r}")
    if not isinstance(settings.flip_average, bool):
        raise ValueError(f"{name}.flip_average must be True or False, got "
                         f"{settings.flip_average!r}")


def default_denoiser_path(dims: int = 2) -> Path:
    """The shipped denoiser model of ``dims``-D data (part of the package data): ``denoiser.pt``
    (2-D images), ``denoiser-3d.pt`` (volumes)."""
    name = "denoiser-3d.pt" if dims == 3 else "denoiser.pt"
    return Path(__file__).resolve().parent / "data" / name


def load_denoiser(path: str | Path | None = None, flip_average: bool = True, dims: int = 2):
    """A :class:`fenics_red.denoiser.Denoiser` from ``path`` (default: the shipped model of
    ``dims``-D data), averaged over the allowed flips unless ``flip_average`` is false. A 2-D
    model for 3-D data (``dims=3``) denoises every axial-lateral slice
    (:class:`~fenics_red.denoiser.SliceWiseDenoiser`, one scale per volume); a 3-D model for 2-D
    data is an error."""
    from .denoiser import Denoiser  # torch: imported only when a denoiser is needed

    path = default_denoiser_path(dims) if path is None else Path(path)
    if not path.exists() and path == default_denoiser_path(dims):
        raise FileNotFoundError(f"the shipped denoiser {str(path)!r} is missing from this "
                                "installation; train one with `make denoiser"
                                f"{' DIM=3' if dims == 3 else ''}` or pass --denoiser")
    denoiser = Denoiser.load(path, flip_average=flip_average)
    if denoiser.dims == 2 and dims == 3:
        return denoiser.slicewise()
    if denoiser.dims != dims:
        raise ValueError(f"{str(path)!r} is a {denoiser.dims}-D denoiser but the data are "
                         f"{dims}-D; pass a 2-D model (--denoiser)")
    return denoiser


@dataclass(frozen=True)
class REDSettings:
    """Settings of the RED loop (the ML stage uses the default :class:`MLSettings`).

    Attributes:
        denoiser: model file (``None``: the shipped one).
        flip_average: average the denoiser over left-right flips (see
            :mod:`fenics_red.denoiser`; measured better at every SNR of the validation sets).
        lam: the λ rule, as :func:`fenics_red.priors.parse_lambda_rule` reads it: a number,
            ``"paper:c"`` (λ = c‖∇g‖, equation 12), ``"balance:c"`` (λ = c‖∇g‖/‖E − C(E)‖) or
            ``"lipschitz:c"`` (λ = c L_g; the default, ``c = 0.001``). See ``docs/studies.md``
            for the measurements behind the default.
        start: ``"denoised-ml"`` (default), ``"ml"`` or ``"homogeneous"`` (the uniform fit).
        start_check: with ``start="denoised-ml"``, start from the ML estimate instead when the
            denoised estimate's data misfit is more than this many times the ML estimate's
            (both with ``Γ`` as the ML estimate left it: two ``Γ`` solves). A denoiser that
            contradicts the data that much has met shapes unlike its training (a layered field:
            ``docs/studies.md``), and RED then lets the data lead; ``0`` turns the check off.
        max_steps: budget of RED gradient steps.
        steps_per_round: steps with ``Γ`` frozen between two refreshes of ``Γ(E)`` and λ.
        rtol: stop when a refresh of ``Γ`` moves ``E`` by less than this (relative); with
            ``"fixed-point"``, when an outer step does.
        solver: ``"pgd"`` (equation 7), ``"fista"``, or ``"fixed-point"``: the denoiser held
            fixed for an outer step while :attr:`inner_steps` preconditioned CG steps solve the
            stationarity condition of (10)-(11) with ``Γ`` frozen, ``(H + λI) E = Dᵀ Γ⁻¹ f +
            λ C(E_k)`` (Romano, Elad & Milanfar 2017, their fixed-point strategy;
            :class:`REDFixedPoint`): one denoiser call per outer step instead of one per
            gradient step, for the same fixed point ``∇g(E) + λ(E − C(E)) = 0``. There
            :attr:`max_steps` counts outer steps (denoiser calls, as for the others), ``Γ`` is
            refreshed at every outer step and ``L_g`` estimated at the first
            (:attr:`steps_per_round` and :attr:`step_scale` are not used).
        step_scale: ``ε = step_scale / (L_g + λ L_R)``.
        misfit_guard: stop when a refresh of ``Γ`` finds the data misfit above the start's, and
            keep the last iterate within it (:attr:`MLSettings.misfit_guard`): RED exists to
            bring the denoised estimate closer to the data, and an iterate that fits them worse
            than its start is being pulled away by the prior (runaway stiff spots with large
            weights, ``docs/studies.md``).
        min_misfit_decrease: stop when a round lowers the misfit (at the refreshes of ``Γ``) by
            less than this many of its standard deviations ``√(2n)``, and keep the iterate
            before that round (:attr:`MLSettings.min_misfit_decrease`): such a round fits the
            noise, not the modulus (the slow drift below the training SNR, ``docs/studies.md``).
            ``0`` turns it off.
        inner_steps: ``"fixed-point"`` only: CG steps per outer step (each one Hessian product
            ``Dᵀ Γ⁻¹ D p``, warm-started at ``E_k``).
        acceleration: ``"fixed-point"`` only: ``"none"`` or ``"anderson"`` (Anderson mixing of
            the outer iterates, depth 2).
    """

    denoiser: str | None = None
    flip_average: bool = True
    lam: str = "lipschitz:0.001"
    start: str = "denoised-ml"
    start_check: float = START_CHECK
    max_steps: int = 200
    steps_per_round: int = 20
    rtol: float = 1e-4
    solver: str = "fixed-point"
    step_scale: float = 1.0
    misfit_guard: bool = True
    min_misfit_decrease: float = 1.0
    pixel: float | None = None
    inner_steps: int = 3
    acceleration: str = "none"

    def __post_init__(self):
        _check_denoiser(self, "REDSettings")
        _check_pixel(self, "REDSettings")
        if self.start not in _STARTS:
            raise ValueError(f"REDSettings.start must be one of {_STARTS}, got {self.start!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"REDSettings.solver must be one of {_SOLVERS}, got {self.solver!r}")
        validation.integer(self.inner_steps, "REDSettings.inner_steps", low=1)
        validation.non_negative(self.start_check, "REDSettings.start_check",
                                what="a misfit ratio >= 0 (0: no check)")
        if self.acceleration not in _ACCELERATIONS:
            raise ValueError(f"REDSettings.acceleration must be one of {_ACCELERATIONS}, got "
                             f"{self.acceleration!r}")
        if self.acceleration != "none" and self.solver != "fixed-point":
            raise ValueError("REDSettings.acceleration applies to solver='fixed-point' only, "
                             f"got solver={self.solver!r}")
        from .priors import parse_lambda_rule

        parse_lambda_rule(self.lam, prior=object(), fidelity=object())  # spelling check only
        try:
            self.loop_settings()  # checks the numbers
        except ValueError as error:  # the same field names
            raise ValueError(str(error).replace("MLSettings.", "REDSettings.")) from None

    def loop_settings(self) -> MLSettings:
        """The :class:`MLSettings` of the RED loop (for ``"fixed-point"``: the numbers of its
        stopping rules, with the method field ``"pgd"``, which it does not use)."""
        method = "pgd" if self.solver == "fixed-point" else self.solver
        return MLSettings(method=method, stop="budget", max_steps=self.max_steps,
                          steps_per_round=self.steps_per_round, rtol=self.rtol,
                          step_scale=self.step_scale, misfit_guard=self.misfit_guard,
                          min_misfit_decrease=self.min_misfit_decrease)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_options(cls, options: Mapping | None, method: str = "red") -> REDSettings:
        """Settings from a mapping of overrides (generic ``max_steps``/``solver`` included)."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in dict(options or {}).items():
            if key not in known:
                raise ValueError(f"method {method!r} has no option {key!r}; accepted: "
                                 f"{sorted(known)}")
            values[key] = value
        return cls(**values)


@dataclass(frozen=True)
class DenoisedMLSettings:
    """Options of ``denoised-ml``: the denoiser (:attr:`REDSettings.denoiser`,
    :attr:`REDSettings.flip_average`); the ML stage is the training recipe, not an option."""

    denoiser: str | None = None
    flip_average: bool = True
    pixel: float | None = None

    def __post_init__(self):
        _check_denoiser(self, "DenoisedMLSettings")
        _check_pixel(self, "DenoisedMLSettings")

    def red_settings(self) -> REDSettings:
        """The :class:`REDSettings` whose first two stages are this method."""
        return REDSettings(denoiser=self.denoiser, flip_average=self.flip_average,
                           pixel=self.pixel)

    def to_dict(self) -> dict:
        return asdict(self)


def red_options(options: Mapping | REDSettings | None = None) -> REDSettings:
    """The ``"red"`` method's options: :class:`REDSettings` with the overrides ``options`` (its
    fields; ``max_steps`` and ``solver`` are fields of the same meaning as the generic names)."""
    if isinstance(options, REDSettings):
        return options
    return REDSettings.from_options(options, "red")


def denoised_ml_options(options: Mapping | DenoisedMLSettings | None = None
                        ) -> DenoisedMLSettings:
    """The ``"denoised-ml"`` method's options: :class:`DenoisedMLSettings` with the overrides
    ``options`` (``denoiser``, ``flip_average``)."""
    if isinstance(options, DenoisedMLSettings):
        return options
    known = {f.name for f in fields(DenoisedMLSettings)}
    unknown = sorted(set(dict(options or {})) - known)
    if unknown:
        raise ValueError(f"method 'denoised-ml' has no option(s) {unknown}; accepted: "
                         f"{sorted(known)} (the ML stage is the training recipe)")
    return DenoisedMLSettings(**dict(options or {}))


class REDFixedPoint:
    """RED by its fixed-point form: the denoiser held for an outer step, an inner Krylov solve
    (Romano, Elad & Milanfar 2017, "The little engine that could", section 5.2).

    With ``Γ`` frozen the data term is quadratic, ``∇g(E) = H E − Dᵀ Γ⁻¹ f`` with ``H = Dᵀ Γ⁻¹ D``,
    so the RED stationarity condition ``∇g(E) + λ(E − C(E)) = 0`` (equations 10-11) reads
    ``(H + λI) E = Dᵀ Γ⁻¹ f + λ C(E)``. Outer step ``k``:

    1. refresh ``Γ(E_k)`` (one factorisation, as every round of the gradient loop) and ask the
       stopping rules: those of the gradient loop's refreshes (misfit guard, significant
       decrease of the misfit: :func:`fenics_red.solvers.stopping_rules`), then the fixed point
       (the last outer step moved ``E`` by less than ``rtol``) and the budget of outer steps;
    2. λ by the rule of :attr:`REDSettings.lam`; ``L_g`` (for the ``lipschitz`` rule) by power
       iteration at the first outer step only (warm-started from the ML estimate's vector) and
       kept: it moved by at most 1.2 % over the runs of 8 validation phantoms at 45 dB, and
       each further estimate cost 5 Hessian products per outer step (``docs/studies.md``);
    3. ``z = C(E_k)``: the one denoiser call of the step. RED from ``denoised-ml`` has it for the
       first step already: ``E_0 = C(E_ml)`` itself is ``z`` (the outer iteration starts at
       ``E_ml``, the first inner solve is warm-started at ``C(E_ml)``);
    4. :attr:`REDSettings.inner_steps` steps of preconditioned CG on
       ``(H + λI) E = Dᵀ Γ⁻¹ f + λz`` from ``E_k`` (initial residual ``−∇g(E_k) − λ(E_k − z)``,
       one Hessian product per step), with the Jacobi preconditioner
       ``c diag(Dᵀ Σn⁻¹ D)/E² + λ`` (that of :class:`fenics_red.solvers.ConjugateGradient`, plus
       λ; ``c`` matches it to ``diag H`` by one Hutchinson probe per run);
    5. ``E_{k+1} = [E]₊`` (optionally Anderson-mixed with the two previous outer steps).

    A fixed point of the outer map with every node above the floor satisfies the RED optimality
    condition whatever the number of inner steps: the inner solve starts at ``E_k``, and at
    ``E_k = E*`` its right-hand side vanishes. With RED's default weight that fixed point fits
    the noise (``docs/studies.md``); the significance stop ends the loop long before it, after
    one to three outer steps, where the gradient loop takes 5-200 steps with one denoiser call
    each.

    The history has one row per refresh (``step``: outer steps so far; ``objective``:
    ``g + λR``; ``grad_norm``: the norm of the RED gradient ``∇g + λ(E − C(E))``, which the fixed
    point drives to zero); the row of the refresh that stopped the loop, and that of a first
    step without a denoiser call, have NaN where λ or ``C`` would be needed (neither is
    computed there). :attr:`inner` lists the CG steps of each outer step and :attr:`products`
    counts the Hessian products of the last run (inner CG, power iterations, the probe).
    Collective.
    """

    def __init__(self, fidelity: StatisticalLikelihood, prior, lam, settings: REDSettings):
        self.fidelity = fidelity
        self.prior = prior
        self.lam = lam
        self.settings = settings
        self.loop = settings.loop_settings()
        self.comm = fidelity.comm
        (self.x, self.grad, self.prior_grad, self.r, self.z, self.p, self.Ap, self.m_inv,
         self.diag, self.d_sigma, self._previous, self._refreshed, self._truth, self._diff) = (
            fidelity.create_vector() for _ in range(14))
        self._power_vector = None
        self._probe = None
        self._scale = None
        self._have_sensitivity = False
        self._anderson: list[tuple[PETSc.Vec, PETSc.Vec]] = []
        self.floor = 0.0
        self.products = 0
        self.inner = []  # inner CG steps of each outer step of the last run

    # -- pieces --------------------------------------------------------------------------------

    def _hessian(self, v, out, lam: float = 0.0):
        self.fidelity.hessian_mult(v, out)
        if lam:
            out.axpy(lam, v)
        return out

    def _lipschitz(self, iterations: int) -> float:
        """``L_g`` by power iteration, warm-started from the previous refresh of the run."""
        L_g, self._power_vector = self.fidelity.lipschitz(iterations, v=self._power_vector)
        return L_g

    def _diagonal(self, x) -> None:
        """``diag = diag(Dᵀ Σn⁻¹ D) / E²`` (unscaled; see :meth:`_preconditioner`); the first
        factor once per run (``D`` and ``Σn`` belong to the data set), in :attr:`d_sigma`."""
        if not self._have_sensitivity:
            self.fidelity.sensitivity(self.d_sigma)
            self._have_sensitivity = True
        self.diag.array[:] = self.d_sigma.array_r / x.array_r**2

    def _preconditioner(self, x, lam: float) -> None:
        """``m_inv = 1 / (c diag + λ)``; ``c = vᵀHv / vᵀ diag v`` for a ±1 probe ``v`` (one
        Hutchinson sample of ``tr H / tr diag``) at the run's first refresh, kept after it."""
        self._diagonal(x)
        if self._scale is None:
            if self._probe is None:  # the same probe on any number of ranks
                size = np.shape(self.fidelity.to_values(x))
                values = np.random.default_rng(20261201).choice([-1.0, 1.0], size=size)
                self._probe = self.fidelity.from_values(values, name="probe")
            self._hessian(self._probe, self.Ap)
            self.p.pointwiseMult(self.diag, self._probe)
            self._scale = self._probe.dot(self.Ap) / self._probe.dot(self.p)
            if not (math.isfinite(self._scale) and self._scale > 0.0):  # H v = 0: degenerate
                self._scale = 1.0
        self.m_inv.array[:] = 1.0 / (self._scale * self.diag.array_r + lam)

    def _inner_solve(self, x, lam: float) -> int:
        """PCG on ``(H + λI) δ = r`` (``r`` holds the residual at ``x``); ``x += δ``. Returns the
        steps taken."""
        r, z, p, Ap = self.r, self.z, self.p, self.Ap
        z.pointwiseMult(self.m_inv, r)
        z.copy(p)
        rz = r.dot(z)
        for step in range(self.settings.inner_steps):
            self._hessian(p, Ap, lam)
            curvature = p.dot(Ap)
            if not (curvature > 0.0 and rz > 0.0):  # solved exactly
                return step
            alpha = rz / curvature
            x.axpy(alpha, p)
            r.axpy(-alpha, Ap)
            z.pointwiseMult(self.m_inv, r)
            rz_new = r.dot(z)
            p.aypx(rz_new / rz, z)
            rz = rz_new
        return self.settings.inner_steps

    def _anderson_mix(self, x_old, x) -> None:
        """Anderson mixing (type II, depth 2) of the outer map ``T``: ``x`` holds ``T(x_old)``."""
        f = x.duplicate()
        f.waxpy(-1.0, x_old, x)  # f_k = T(x_k) − x_k
        history = self._anderson
        if history:
            dF = [f.copy() for _ in history]
            for vec, (f_prev, _) in zip(dF, history, strict=True):
                vec.axpy(-1.0, f_prev)
            G = np.array([[a.dot(b) for b in dF] for a in dF])
            rhs = np.array([a.dot(f) for a in dF])
            try:
                gamma = np.linalg.lstsq(G + 1e-12 * np.trace(G) * np.eye(len(dF)), rhs,
                                        rcond=None)[0]
            except np.linalg.LinAlgError:
                gamma = np.zeros(len(dF))
            for g_i, dF_i, (_, x_prev) in zip(gamma, dF, history, strict=True):
                # x ← x − γ_i (Δx_i + Δf_i), Δx_i = x_k − x_i, Δf_i = f_k − f_i
                x.axpy(-g_i, x_old)
                x.axpy(g_i, x_prev)
                x.axpy(-g_i, dF_i)
            for vec in dF:
                vec.destroy()
        history.insert(0, (f, x_old.copy()))
        while len(history) > 2:
            for vec in history.pop():
                vec.destroy()

    def _clear_anderson(self) -> None:
        for pair in self._anderson:
            for vec in pair:
                vec.destroy()
        self._anderson = []

    def _project(self, vec) -> None:
        array = vec.array
        np.maximum(array, self.floor, out=array)

    # -- the loop ------------------------------------------------------------------------------

    def run(self, E0, *, truth=None, denoised=None, power_vector: PETSc.Vec | None = None
            ) -> tuple[PETSc.Vec, History]:
        """The loop from ``E0`` (nodal values in file order, a vector, or ``None``: the uniform
        best fit); returns the estimate (this object's vector) and the
        :class:`~fenics_red.solvers.History`. Collective.

        ``denoised``: ``C`` of the iterate before ``E0`` when the caller has it (RED from
        ``denoised-ml``: ``E0 = C(E_ml)``): the first outer step then uses it instead of calling
        the denoiser at ``E0``, i.e. the outer iteration starts at ``E_ml`` and its first inner
        solve is warm-started at ``C(E_ml)``; the fixed point is the same. ``power_vector``: a
        start for the first power iteration of ``L_g`` (the ML estimate's of the same data set;
        copied, not changed).
        """
        s, fid, x = self.settings, self.fidelity, self.x
        t0 = time.perf_counter()
        history = History(fid.n_equations)
        if E0 is None:
            x.set(fid.homogeneous_fit())
        elif isinstance(E0, PETSc.Vec):
            E0.copy(x)
        else:
            fid.from_values(E0, x, name="initial modulus")
        local = x.array_r
        if not self.comm.allreduce(bool(np.isfinite(local).all() and (local > 0).all()),
                                   op=MPI.LAND):
            raise ValueError("the initial modulus must be finite and strictly positive")
        self.floor = self.loop.floor * x.sum() / x.getSize()
        self._project(x)
        have_denoised = denoised is not None
        if have_denoised:  # the residual image of the first step: x − C(previous)
            fid.from_values(denoised, self.prior_grad, name="denoised start")
            self.prior_grad.aypx(-1.0, x)
        truth_norm = None
        if truth is not None:
            fid.from_values(truth, self._truth, name="true modulus")
            truth_norm = self._truth.norm()
        if self._power_vector is not None:  # every run afresh: no dependence on earlier ones
            self._power_vector.destroy()
            self._power_vector = None
        if power_vector is not None:
            self._power_vector = power_vector.copy()
        self._scale = None
        self._have_sensitivity = False
        self._clear_anderson()
        self.inner = []
        products = fid.hessian_products
        history.setup_time = time.perf_counter() - t0
        rules = [r for r in stopping_rules(self.loop) if r.when == AT_REFRESH]
        step, change, stop, rule = 0, math.nan, "", None
        cold, L_g = self._power_vector is None, math.nan
        while True:
            fid.refresh(x)
            g = fid.gradient(x, self.grad)
            now = time.perf_counter() - t0
            error = math.nan
            if truth_norm is not None:
                self._diff.waxpy(-1.0, self._truth, x)
                error = self._diff.norm() / truth_norm
            refresh = {"round": step, "step": step, "lipschitz": math.nan,
                       "logdet": fid.logdet(), "misfit": 2 * g, "time": now}
            refresh["nll"] = g + 0.5 * refresh["logdet"]
            history.refreshes.append(refresh)
            # -- the stopping rules first: a run that ends here needs neither L_g nor λ --------
            loop_state = LoopState(step, step, x, math.nan, 2 * g, self.grad.norm(), math.nan,
                                   change, now, error, math.nan, fid.n_equations, 0, math.nan,
                                   self._previous, self._diff)
            for candidate in rules:
                stop = candidate.check(loop_state)
                if stop:
                    rule = candidate
                    break
            if not stop and step > 0 and change < s.rtol:
                stop = "rtol"
            if not stop and step >= s.max_steps:
                stop = "max_steps"
            if stop:
                history.append(round=step, step=step, misfit=2 * g, change=change, time=now,
                               error=error)
                if rule is not None and rule.keep == KEEP_LAST_REFRESH:
                    self._refreshed.copy(x)
                break
            if step == 0:  # L_g once per run: over a run it moves by about 1 % (class doc)
                L_g = self._lipschitz(self.loop.power_iterations if cold
                                      else self.loop.refresh_power_iterations)
            refresh["lipschitz"] = L_g
            state = IterationState(step, step, x, math.nan, 2 * g, loop_state.grad_norm,
                                   math.nan, change, now, error, math.nan)
            state.lipschitz = L_g  # the Lipschitz rule takes it from here
            lam = float(self.lam(state)) if callable(self.lam) else float(self.lam)
            if not (math.isfinite(lam) and lam >= 0):
                raise ValueError(f"the prior weight λ must be finite and non-negative, got {lam!r}")
            x.copy(self._refreshed)
            # -- the step's denoiser call (none at a start whose C is known) ------------------
            if step == 0 and have_denoised:
                R, grad_norm = math.nan, math.nan
                self.r.waxpy(lam, self.prior_grad, self.grad)
            else:
                R = self.prior.gradient(x, self.prior_grad)  # E − C(E), eq. (10)
                self.r.waxpy(lam, self.prior_grad, self.grad)  # ∇g + λ(E − C(E))
                grad_norm = self.r.norm()
            history.append(round=step, step=step, objective=g + lam * R, misfit=2 * g,
                           grad_norm=grad_norm, change=change, time=now, error=error, lam=lam)
            self.r.scale(-1.0)  # the residual of (H + λI)E = Dᵀ Γ⁻¹ f + λ C(E_k) at E_k
            self._preconditioner(x, lam)
            x.copy(self._previous)
            self.inner.append(self._inner_solve(x, lam))
            self._project(x)
            if s.acceleration == "anderson":
                self._anderson_mix(self._previous, x)
                self._project(x)
            self._diff.waxpy(-1.0, self._previous, x)
            change = self._diff.norm() / max(x.norm(), 1e-300)
            step += 1
        history.stop_reason = stop
        self.products = fid.hessian_products - products
        return x, history

    def destroy(self) -> None:
        self._clear_anderson()
        for vec in (self.x, self.grad, self.prior_grad, self.r, self.z, self.p, self.Ap,
                    self.m_inv, self.diag, self.d_sigma, self._previous, self._refreshed,
                    self._truth, self._diff):
            vec.destroy()
        for vec in (self._power_vector, self._probe):
            if vec is not None:
                vec.destroy()


class REDReconstructor:
    """ML estimate, one denoiser pass and the RED loop on one grid; objects built once.

    Args:
        grid, forward: the data's image grid and forward settings.
        settings: :class:`REDSettings`.
        comm: the communicator the mesh is distributed over (the denoiser runs on its rank 0).
        denoiser: an already loaded denoiser (default: load ``settings.denoiser``).
    """

    def __init__(self, grid: ImageGrid, forward: ForwardSettings | None = None,
                 settings: REDSettings | None = None, comm: MPI.Comm = MPI.COMM_SELF,
                 denoiser=None):
        from .priors import RedPrior, parse_lambda_rule

        self.settings = settings or REDSettings()
        self.comm = comm
        self.model = ElasticityModel.on_grid(grid, comm, forward or ForwardSettings())
        self.denoiser = denoiser if denoiser is not None else load_denoiser(
            self.settings.denoiser, self.settings.flip_average, self.model.dim)
        self.model.raster_spacing = self.settings.pixel  # the denoiser's raster on a mesh
        self.ml_settings = MLSettings()
        self.likelihood = StatisticalLikelihood(self.model, settings=self.ml_settings.likelihood)
        self.ml = FixedPointSolver(self.likelihood, self.ml_settings)
        self.prior = RedPrior(self.denoiser, self.likelihood)
        self.rule = parse_lambda_rule(self.settings.lam, self.prior, self.likelihood)
        if self.settings.solver == "fixed-point":
            self.red = REDFixedPoint(self.likelihood, self.prior, self.rule, self.settings)
        else:
            self.red = FixedPointSolver(self.likelihood, self.settings.loop_settings(),
                                        self.prior, lam=self.rule)

    def denoise(self, image: np.ndarray) -> np.ndarray:
        """``C(image)`` on rank 0, broadcast (collective)."""
        return self.prior.denoise(image)

    def run_sample(self, sample, stages: str = "red") -> tuple[np.ndarray, dict, dict]:
        """``(estimate, history, info)`` of a data set sample; ``stages`` ``"denoised-ml"`` stops
        after the denoiser pass. Collective."""
        m = Measurement.from_sample(sample)
        displacement, noise, truth = m.displacement, m.noise, m.truth
        fid = self.likelihood
        fid.set_data(displacement, noise)
        E_ml, ml_history = self.ml.run(truth=truth)
        ml_values = fid.to_values(E_ml)
        # the denoiser sees the raster image; its output comes back to the nodes (exact on grids)
        denoised = fid.to_values(fid.from_image(self.denoise(fid.to_image(E_ml)),
                                                name="denoised ML estimate"))
        floor = self.ml_settings.floor * float(np.mean(ml_values))
        denoised = np.maximum(denoised, floor)
        info = {"ml_steps": int(ml_history.final["step"]), "ml_stop": ml_history.stop_reason,
                "ml_time": float(ml_history.final["time"]),
                "ml_misfit": float(ml_history.final["misfit"]), "n_equations": fid.n_equations}
        if truth is not None:
            norm = np.linalg.norm(truth)
            info.update(ml_error=float(np.linalg.norm(ml_values - truth) / norm),
                        denoised_ml_error=float(np.linalg.norm(denoised - truth) / norm))
        if stages == "denoised-ml":
            history = {f"ml_{k}": v for k, v in ml_history.as_arrays().items()}
            info["time"] = info["ml_time"]
            return denoised, history, info
        start_name = self.settings.start
        if start_name == "denoised-ml" and self.settings.start_check > 0:
            ratio = self._misfit_ratio(ml_values, denoised)
            info["start_misfit_ratio"] = ratio
            if ratio > self.settings.start_check:
                start_name = "ml"
                warnings.warn(
                    "the denoised ML estimate contradicts the data (its misfit is more than "
                    f"{self.settings.start_check:g} times the ML estimate's): RED started from "
                    "the ML estimate instead (run info 'start'); the denoiser has not seen shapes "
                    "like these", UserWarning, stacklevel=2)
        info["start"] = start_name
        start = {"denoised-ml": denoised, "ml": ml_values, "homogeneous": None}[start_name]
        calls, seconds = self.prior.calls, self.prior.seconds
        fixed_point = isinstance(self.red, REDFixedPoint)
        if fixed_point:
            # from denoised-ml, or from the ML estimate after a failed start check (C(E_ml) is
            # then C of the start itself), the first outer step's denoiser call is the one just
            # made; L_g starts from the ML estimate's power vector (same data set, Γ at its start)
            E, history = self.red.run(
                start, truth=truth,
                denoised=denoised if self.settings.start == "denoised-ml" else None,
                power_vector=self.ml.power_vector)
        else:
            E, history = self.red.run(start, truth=truth)
        estimate = fid.to_values(E)
        arrays = history.as_arrays()
        final = history.final
        info.update(steps=int(final["step"]), stop=history.stop_reason,
                    red_time=final["time"], time=info["ml_time"] + final["time"],
                    lam=_last_finite(arrays.get("lam")),
                    denoiser_calls=self.prior.calls - calls,
                    denoiser_seconds=self.prior.seconds - seconds,
                    red_objective=(self.prior.known_value(E) if fixed_point
                                   else self.prior.value(E)))
        if fixed_point:
            arrays["inner_steps"] = np.array(self.red.inner, dtype=float)
            info.update(inner_steps=int(sum(self.red.inner)),
                        hessian_products=int(self.red.products))
        return estimate, arrays, info

    def _misfit_ratio(self, ml_values: np.ndarray, denoised: np.ndarray) -> float:
        """Data misfit of the denoised estimate over the ML estimate's, ``Γ`` as the ML stage
        left it (frozen at its start: no factorisation). Collective."""
        fid = self.likelihood
        vec = fid.from_values(ml_values, name="ML estimate")
        try:
            ml_misfit = fid.value(vec)
            fid.from_values(denoised, vec, name="denoised ML estimate")
            return fid.value(vec) / ml_misfit if ml_misfit > 0 else math.inf
        finally:
            vec.destroy()

    def destroy(self) -> None:
        self.red.destroy()
        self.ml.destroy()
        self.likelihood.destroy()
        self.model.destroy()


def _last_finite(values) -> float:
    """The last finite entry (a history column; NaN where there is none): the λ a run used
    last (the fixed-point loop does not evaluate λ at the refresh where it stops)."""
    finite = np.asarray(values if values is not None else [], dtype=float)
    finite = finite[np.isfinite(finite)]
    return float(finite[-1]) if finite.size else math.nan


class _Runner:
    """Runner API of :mod:`fenics_red.methods` for ``red`` and ``denoised-ml``."""

    def __init__(self, stages: str, grid, forward, comm, options):
        self.stages = stages
        if stages == "denoised-ml":
            self.options = denoised_ml_options(options)
            self.red_settings = self.options.red_settings()
        else:
            self.options = self.red_settings = red_options(options)
        self.reconstructor = REDReconstructor(grid, forward, self.red_settings, comm)
        self.denoiser_path = Path(self.red_settings.denoiser
                                  or default_denoiser_path(self.reconstructor.model.dim))
        # the weights just loaded: a resume must use the same ones (hashed once, not per call)
        self.denoiser_sha256 = file_sha256(self.denoiser_path)

    @property
    def settings(self) -> dict:
        out = {"ml": self.reconstructor.ml_settings.to_dict(),
               "denoiser": str(self.denoiser_path),
               "denoiser_sha256": self.denoiser_sha256,
               "flip_average": self.red_settings.flip_average,
               "pixel": self.red_settings.pixel,
               "denoiser_card": _card_summary(self.reconstructor.denoiser),
               "slice_wise": type(self.reconstructor.denoiser).__name__ == "SliceWiseDenoiser"}
        if self.stages == "red":
            out["red"] = self.red_settings.to_dict()
        return out

    def run(self, sample):
        return self.reconstructor.run_sample(sample, self.stages)

    def check_data(self, data_settings) -> list[str]:
        """Warnings about a data set this method was not validated on (see :func:`snr_warning`)."""
        messages = [snr_warning(self.reconstructor.denoiser,
                                getattr(data_settings, "snr_db", None), self.stages),
                    resolution_warning(self.reconstructor.denoiser, data_settings,
                                       self.red_settings.pixel, self.stages)]
        return [message for message in messages if message]

    def destroy(self) -> None:
        self.reconstructor.destroy()


#: How much noisier than the denoiser's training data (dB) data may be before a warning.
SNR_MARGIN_DB = 3.0


def training_snrs(denoiser) -> list[float]:
    """The SNRs (dB) of the denoiser's training pairs, from its model card (empty if unknown)."""
    data = (getattr(denoiser, "card", {}) or {}).get("data") or {}
    values = data.get("snr_db")
    values = values if isinstance(values, list) else [values]
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def snr_warning(denoiser, snr_db: float | None, method: str = "red") -> str | None:
    """A warning when the data are more than :data:`SNR_MARGIN_DB` noisier than every SNR the
    denoiser was trained at, or so clean that the ``ml`` method solves them by CG
    (:data:`~fenics_red.solvers.AUTO_CG_MIN_SNR_DB` or more) above every training SNR; ``None``
    otherwise (or when either SNR is unknown).

    Measured with a model trained at 35 dB alone: at 25 dB one denoiser pass left the ML estimate
    as it was and RED made it worse (``docs/studies.md``). On clean data (80 dB and above) the
    ``ml`` method solves to the discrepancy by CG, far below RED's start, the FISTA estimate its
    denoiser was trained on.
    """
    snrs = training_snrs(denoiser)
    if snr_db is None or not snrs or not math.isfinite(float(snr_db)):
        return None
    trained = ", ".join(f"{v:g}" for v in sorted(set(snrs)))
    if float(snr_db) >= AUTO_CG_MIN_SNR_DB and float(snr_db) > max(snrs) + SNR_MARGIN_DB:
        return (f"the data ({float(snr_db):g} dB) are cleaner than the denoiser's training data "
                f"({trained} dB): {method!r} was not validated there, and it starts from the "
                "ML estimate of its training recipe, while --method ml solves clean data to "
                "their noise level (--solver auto); compare with --method ml")
    if float(snr_db) >= min(snrs) - SNR_MARGIN_DB:
        return None
    return (f"the data ({float(snr_db):g} dB) are noisier than the denoiser's training data "
            f"({trained} dB): {method!r} was not validated there (a model trained at 35 dB alone "
            "did not improve 25 dB estimates, see docs/studies.md); train a denoiser at this SNR "
            "(scripts/train-denoiser with SNRS=...) and pass it with --denoiser, or compare with "
            "--method ml")


#: How many times more (or fewer) raster pixels across than in training before a warning.
RESOLUTION_FACTOR = 2.0


def raster_shape(data_settings, pixel: float | None = None) -> tuple[int, int]:
    """The shape of the image the denoiser sees for a data set: the grid's, or on a mesh that of
    the raster of :func:`fenics_red.raster.raster_for` (pixels of ``pixel``, default the mean node
    spacing ``sqrt(area / N)``). Serial."""
    from .raster import ImageGrid

    mesh = getattr(data_settings, "mesh", None)
    if mesh is None:
        return tuple(data_settings.grid.shape)
    if pixel is None:
        pixel = mesh.mean_spacing()
    return ImageGrid.covering(mesh.points.min(axis=0), mesh.points.max(axis=0), pixel).shape


def resolution_warning(denoiser, data_settings, pixel: float | None = None,
                       method: str = "red") -> str | None:
    """A warning when the denoiser sees images more than :data:`RESOLUTION_FACTOR` times larger
    or smaller (in pixels across) than its training images: its structures then span other
    numbers of pixels than any it learnt. ``None`` when close, or when either is unknown."""
    trained = ((getattr(denoiser, "card", {}) or {}).get("data") or {}).get("image_shape")
    if not trained or getattr(data_settings, "grid", None) is None:
        return None
    shape = raster_shape(data_settings, pixel)
    ratio = max(shape) / max(trained)
    if 1 / RESOLUTION_FACTOR <= ratio <= RESOLUTION_FACTOR:
        return None
    def size(image_shape):  # "nx x ny" of an image, "nx x ny x nz" of a volume
        return " x ".join(str(n) for n in reversed(image_shape))

    what = "image" if len(shape) == 2 else "volume"
    fix = ("set the raster's pixel size with --pixel (in the mesh's length unit) or train a "
           "denoiser at this resolution" if getattr(data_settings, "mesh", None) is not None
           else "train a denoiser at this resolution (on a grid the pixels are its nodes)")
    return (f"the denoiser sees the modulus as a {size(shape)} {what}, but it was "
            f"trained on {size(trained)} images ({ratio:.2g} times the pixels "
            f"across): {method!r} was not validated at this resolution; {fix}")


def _check_pixel(settings, name: str) -> None:
    if settings.pixel is not None:
        validation.positive(settings.pixel, f"{name}.pixel")


def _card_summary(denoiser) -> dict:
    card = getattr(denoiser, "card", {}) or {}
    return {k: card[k] for k in ("created", "seed", "epochs", "best_epoch") if k in card}


def setup_red(grid, forward, comm, options=None) -> _Runner:
    """Factory of ``"red"`` (options: see :func:`red_options`)."""
    return _Runner("red", grid, forward, comm, options)


def setup_denoised_ml(grid, forward, comm, options=None) -> _Runner:
    """Factory of ``"denoised-ml"`` (options: see :func:`denoised_ml_options`)."""
    return _Runner("denoised-ml", grid, forward, comm, options)
