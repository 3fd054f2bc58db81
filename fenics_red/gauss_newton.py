"""Classical baseline: deterministic FEM output-error inversion by Gauss-Newton-CG (paper, Fig. 2b).

The modulus ``E`` (nodal, P1) is found by minimising

    J(E) = 1/2 sum_free w_c (u_m - u(E))^2 + alpha R(E),        K(E) u(E) = f,

over the free displacement dofs (Dirichlet dofs carry no information), with per-component weights
``w_c`` (one per displacement component: ``w_x, w_y`` in 2-D, ``w_x, w_y, w_z`` in 3-D) and one of
two hand-crafted regularisers (:mod:`fenics_red.regularisers`), written as UFL forms on the model's
modulus function and compiled once:

* ``"tikhonov"``: ``R(E) = 1/2 int |grad E|^2 dx`` (penalises roughness; blurs edges);
* ``"tv"``: smoothed total variation ``R(E) = int sqrt(|grad E|^2 + delta^2) dx`` (keeps edges),
  with ``delta = tv_delta * E0 / L`` (``E0`` the initial homogeneous modulus, ``L`` the largest
  extent of the domain), so ``tv_delta`` is dimensionless.

Positivity is built in: the unknown is the nodal log-modulus ``m`` and ``E_i = exp(m_i)`` node by
node, so ``dE/dm = diag(E)`` exactly. Derivatives come from the adjoint method with the factorised
stiffness. Differentiating ``K(E) u = f`` gives the Jacobian ``J_u = du/dE = -K^-1 D(u)`` (``D(u)``
with its Dirichlet rows zeroed, ``K = diag(K_ff, I)``, symmetric), hence

    grad_m J  = E * (-D(u)^T K^-1 W (u - u_m) + alpha R'(E))
    H_GN p    = E * (D(u)^T K^-1 W K^-1 D(u) (E * p) + alpha R''(E) (E * p))

(``*`` nodal products). ``H_GN`` drops the second-order terms of the residual and of the
exponential map, so it is symmetric positive (semi)definite; for TV, ``R''`` is the lagged-
diffusivity operator ``int grad p . grad q / sqrt(|grad E|^2 + delta^2)``, the SPD majorant of
the TV Hessian. Each Gauss-Newton step solves ``H_GN p = -g`` matrix-free by CG (PETSc KSP on a
``MatShell``, :class:`GaussNewtonHessian`, own options prefix; Eisenstat-Walker forcing
``min(0.5, sqrt(|g|/|g_0|))``); every CG iteration costs two solves with the *same* LU
factorisation of ``K(E)`` (the forward solve of the current iterate), so one GN iteration costs
one factorisation plus ``2 x (CG iterations)`` triangular solves. An Armijo backtracking line
search (:func:`~fenics_red.optimisation.armijo_backtracking`, with a cap on the change of
``log E`` per step) globalises the method.

Choosing ``alpha`` (:mod:`fenics_red.optimisation`):

* fixed: ``GaussNewtonSettings(alpha=...)`` (units: misfit units / regulariser units; depends on
  the grid, the traction and the modulus scale, so prefer the discrepancy principle);
* discrepancy principle (Morozov; ``alpha=None``, the default): with noise of standard deviation
  ``sigma_c`` per displacement component, the expected noise energy over the free dofs is
  ``delta^2 = sum_c w_c n_c sigma_c^2``. Starting from ``alpha_0 = lambda_max(H_misfit) /
  lambda_max(H_reg)`` at the initial guess (power iterations; a value where the regulariser
  dominates), alpha is divided by ``alpha_decrease`` with warm starts until the weighted residual
  ``sum w (u_m - u(E_alpha))^2`` falls below ``tau delta^2``; the crossing is then refined by
  secant steps on ``log residual`` versus ``log alpha`` until it lies within
  ``discrepancy_rtol``. Needs ``sigma`` (for synthetic data at a given SNR over the free dofs,
  ``sigma^2 = |u_free|^2 / (n_free 10^(SNR/10))``).
* L-curve (optional helper, :meth:`GaussNewtonInversion.l_curve`): solves for a decreasing list of
  alphas and returns ``(alpha, residual, R)`` triples with the corner (maximum curvature of
  ``(log residual, log R)``); needs no noise level, costs one solve per alpha.

Any DOLFINx mesh, 2-D or 3-D: the measured displacement may be a function on ``model.V``, a PETSc
vector or local values; on an image grid also component images, and the estimate is then an image
(otherwise the owned nodal values). The communicator is the model's: everything is collective and
runs on any number of ranks.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np

from dolfinx import fem

from . import validation
from .forward import ElasticityModel, ForwardSettings
from .likelihood import best_uniform_modulus
from .linalg import taylor_test
from .measurements import Measurement, set_displacement
from .optimisation import (
    alpha_heuristic,
    armijo_backtracking,
    discrepancy_principle,
    l_curve,
    l_curve_corner,
)
from .petsc_options import set_options
from .raster import ImageGrid
from .regularisers import REGULARISERS, Regulariser, TotalVariation, create_regulariser

__all__ = ["GaussNewtonSettings", "GaussNewtonInversion", "GaussNewtonHessian", "OutputMisfit",
           "reconstruct_gauss_newton", "GaussNewtonRunner", "setup_gn_tikhonov", "setup_gn_tv",
           "l_curve_corner", "expand_component_weights"]

_REGULARISERS = tuple(REGULARISERS)
_PRECONDITIONERS = ("none", "regulariser")
_instance_counter = itertools.count()


@dataclass(frozen=True)
class GaussNewtonSettings:
    """Settings of the Gauss-Newton-CG output-error inversion.

    Attributes:
        regulariser: ``"tikhonov"`` (``1/2 int |grad E|^2``) or ``"tv"`` (smoothed total
            variation ``int sqrt(|grad E|^2 + delta^2)``).
        alpha: fixed regularisation weight, or ``None`` to choose it by the discrepancy principle
            (then the noise level is required).
        tv_delta: TV smoothing, relative: ``delta = tv_delta * E0 / L`` (``E0`` the initial
            homogeneous modulus, ``L`` the largest extent of the domain). The default 0.1 was
            tuned on RED's validation sets with the same effort as RED's weight (it was 1 before
            2026-12-01; ``demos/out_of_family.py``, ``docs/studies.md``); re-tuned with the
            preconditioned CG, 0.033 is 1.7 % better there but fails at 25 dB on the
            out-of-family test sets (README: both shown), so the default stays.
        component_weights: misfit weights of the displacement components: one per component
            (``(w_x, w_y)`` in 2-D, ``(w_x, w_y, w_z)`` in 3-D), one for all, or a pair
            ``(w_lateral, w_axial)``, which in 3-D weighs ``x`` and ``y`` by the first and the
            axial ``z`` (the last, the direction of the load) by the second
            (:func:`expand_component_weights`).
        initial_modulus: homogeneous initial guess; ``None`` fits the best homogeneous modulus to
            the data (one extra forward solve: ``u`` scales as ``1/E``).
        discrepancy_tau: target weighted residual as a multiple of the expected noise energy.
        discrepancy_rtol: accept ``alpha`` when ``|residual / target - 1|`` is below this.
        alpha_initial: first alpha of the discrepancy search; ``None`` uses
            ``lambda_max(H_misfit) / lambda_max(H_reg)`` at the initial guess.
        alpha_decrease: factor between successive alphas of the search.
        max_alpha_trials: bound on the number of alphas tried by the search (refinements
            included).
        max_iterations: Gauss-Newton iterations per alpha.
        gradient_rtol: stop when ``|g| <= gradient_rtol |g_start|`` (start of this alpha's solve).
        decrement_rtol: stop when the predicted decrease ``-g.p / 2`` is below
            ``decrement_rtol * J`` (converged to well below the noise).
        cg_max_iterations: bound on the inner CG iterations per Gauss-Newton step.
        cg_forcing_max: largest relative tolerance of the inner CG.
        preconditioner: of the inner CG: ``"none"``; ``"regulariser"``, a Cholesky
            factorisation of ``alpha E R''(E) E + beta I`` at every Gauss-Newton step
            (:class:`RegulariserPreconditioner`; hIPPYlib preconditions by the prior in the same
            way), with at least one step per alpha (a warm start can pass the decrement test
            before any step once the directions are accurate); or ``"auto"`` (default,
            :meth:`resolve_preconditioner`): ``"regulariser"`` for TV in 2-D, whose small
            smoothing left the plain CG at its iteration bound (2-3 times faster for the same
            accuracy on the validation sets, ``docs/studies.md``), ``"none"`` for Tikhonov, where
            it gained nothing, and in 3-D, where the plain CG does not stall (at 16³: 20 %
            faster preconditioned, and no more accurate).
        armijo_c: sufficient-decrease constant of the line search.
        max_backtracks: halvings of the step before the line search gives up.
        max_log_step: cap on ``max |delta log E|`` of one step (``E`` changes by at most
            ``exp(max_log_step)`` per iteration).
    """

    regulariser: str = "tikhonov"
    alpha: float | None = None
    tv_delta: float = 0.1
    component_weights: tuple[float, ...] = (1.0, 1.0)
    initial_modulus: float | None = None
    discrepancy_tau: float = 1.0
    discrepancy_rtol: float = 0.01
    alpha_initial: float | None = None
    alpha_decrease: float = 10.0
    max_alpha_trials: int = 14
    max_iterations: int = 40
    gradient_rtol: float = 1e-4
    decrement_rtol: float = 1e-4
    cg_max_iterations: int = 150
    cg_forcing_max: float = 0.5
    preconditioner: str = "auto"
    armijo_c: float = 1e-4
    max_backtracks: int = 12
    max_log_step: float = 1.0

    def __post_init__(self):
        set_ = object.__setattr__
        validation.one_of(self.regulariser, "regulariser", _REGULARISERS)
        validation.one_of(self.preconditioner, "preconditioner", ("auto", *_PRECONDITIONERS))
        weights = validation.per_component(
            self.component_weights, "component_weights", (1, 2, 3), allow_zero=True,
            shape_hint="one to three finite non-negative numbers (one per displacement "
                       "component, one for all, or (lateral, axial))")
        if max(weights) == 0:
            raise ValueError(f"component_weights must not all be zero; got "
                             f"{self.component_weights!r}")
        set_(self, "component_weights", weights)
        for name in ("tv_delta", "discrepancy_tau", "discrepancy_rtol", "max_log_step",
                     "gradient_rtol", "decrement_rtol"):
            set_(self, name, validation.positive(getattr(self, name), name))
        if self.tv_delta > 1e12:  # TV is then Tikhonov's quadratic, and delta² overflows
            raise ValueError(f"tv_delta must be at most 1e12 (relative smoothing; far above 1 "
                             f"TV is a quadratic penalty: use gn-tikhonov), got {self.tv_delta!r}")
        for name in ("alpha_initial", "initial_modulus"):
            if getattr(self, name) is not None:
                set_(self, name, validation.positive(getattr(self, name), name))
        if self.alpha is not None:
            set_(self, "alpha", validation.non_negative(
                self.alpha, "alpha", what="None (discrepancy principle) or a finite number >= 0"))
        set_(self, "alpha_decrease", validation.number(self.alpha_decrease, "alpha_decrease", 1.0,
                                                       low_open=True))
        for name in ("armijo_c", "cg_forcing_max"):
            set_(self, name, validation.number(getattr(self, name), name, 0.0, 1.0,
                                               low_open=True, high_open=True))
        for name in ("max_alpha_trials", "max_iterations", "cg_max_iterations",
                     "max_backtracks"):
            set_(self, name, validation.budget(getattr(self, name), name))

    def resolve_preconditioner(self, dim: int) -> str:
        """The inner CG's preconditioner on a ``dim``-D mesh, ``"auto"`` resolved."""
        if self.preconditioner != "auto":
            return self.preconditioner
        return "regulariser" if self.regulariser == "tv" and dim == 2 else "none"

    def to_dict(self) -> dict:
        """Plain dictionary (JSON-serialisable; for output files and histories)."""
        out = asdict(self)
        out["component_weights"] = list(self.component_weights)
        return out

    @classmethod
    def from_dict(cls, values: Mapping) -> GaussNewtonSettings:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown Gauss-Newton setting(s) {sorted(unknown)}; known: "
                             f"{sorted(known)}")
        values = dict(values)
        if "component_weights" in values:
            values["component_weights"] = tuple(values["component_weights"])
        return cls(**values)


def expand_component_weights(weights: Sequence[float], n_components: int) -> np.ndarray:
    """One misfit weight per displacement component from :attr:`GaussNewtonSettings.
    component_weights`: as given when there is one per component, one value for all, and a pair
    ``(lateral, axial)`` in 3-D as ``(lateral, lateral, axial)`` (the axial component is the last,
    the direction of the load)."""
    weights = np.asarray(weights, dtype=float)
    if len(weights) == n_components:
        return weights
    if len(weights) == 1:
        return np.full(n_components, weights[0])
    if len(weights) == 2 and n_components == 3:
        return np.array([weights[0], weights[0], weights[1]])
    raise ValueError(f"component_weights {tuple(weights)} do not fit a displacement of "
                     f"{n_components} components")


class GaussNewtonHessian:
    """The Gauss-Newton Hessian in log-modulus coordinates as a PETSc ``MatShell`` (:attr:`mat`):

        H p = E * (D(u)^T K^-1 W K^-1 D(u) (E * p) + alpha R'' (E * p)).

    Its products use the model's current factorisation of ``K(E)`` (two back-substitutions), the
    matrix ``D`` and the regulariser's Hessian as they are; the inversion keeps them at the
    current iterate. :meth:`misfit_mult` and :meth:`regulariser_mult` apply the two parts alone.

    Args:
        model: the forward model (its ``E`` and its KSP are used).
        D: ``D(u)`` with zero Dirichlet rows.
        weights: the misfit weight of every owned displacement dof (0 on Dirichlet dofs).
        regulariser: the regulariser.
    """

    def __init__(self, model: ElasticityModel, D: PETSc.Mat, weights: PETSc.Vec,
                 regulariser: Regulariser):
        self.model, self.D, self.weights, self.regulariser = model, D, weights, regulariser
        self.alpha = 0.0
        self._nq = model.Q.dofmap.index_map.size_local
        self._t, self._a = D.createVecs()
        self._r, self._b = self._t.duplicate(), self._a.duplicate()
        n = self._t.getSize()
        self.mat = PETSc.Mat().createPython(((self._nq, n), (self._nq, n)), _ShellContext(self),
                                            comm=model.comm)
        self.mat.setUp()

    def mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = H x`` (the product of :attr:`mat`)."""
        E = self.model.E.x.array[: self._nq]
        t, a, b = self._t, self._a, self._b
        t.array[:] = x.array_r * E
        self.D.mult(t, a)
        self.model.ksp.solve(a, b)          # -J (E*x) = K^-1 D (E*x)
        b.pointwiseMult(b, self.weights)
        self.model.ksp.solve(b, a)          # K symmetric: K^-T = K^-1
        self.D.multTranspose(a, y)
        if self.alpha > 0:
            self.regulariser.hessian().mult(t, self._r)
            y.axpy(self.alpha, self._r)
        y.array[:] *= E

    def misfit_mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = H x`` without the regulariser (``alpha = 0``)."""
        saved, self.alpha = self.alpha, 0.0
        try:
            self.mult(x, y)
        finally:
            self.alpha = saved

    def regulariser_mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = E * R'' (E * x)``, the regulariser's part (without ``alpha``)."""
        E = self.model.E.x.array[: self._nq]
        self._t.array[:] = x.array_r * E
        self.regulariser.hessian().mult(self._t, y)
        y.array[:] *= E

    def destroy(self) -> None:
        for obj in (self.mat, self._t, self._a, self._r, self._b):
            obj.destroy()


class RegulariserPreconditioner:
    """``P = alpha E R''(E) E + beta I``, the preconditioner of the inner CG on the Gauss-Newton
    Hessian ``H = E (Dᵀ K⁻¹ W K⁻¹ D + alpha R'') E`` (:class:`GaussNewtonHessian`).

    The regulariser's part is exact; the misfit's part, of low rank where the data say little,
    is replaced by its mean diagonal ``beta = vᵀ H_misfit v / n`` for a ±1 probe ``v`` (one
    Hessian product, the probe a function of the node positions, so any partition gives the
    same ``P``), which also makes ``P`` definite where ``R''`` is not (constants). CG on ``P⁻¹H``
    then needs few iterations where the unpreconditioned one met the small TV smoothing's
    ill-conditioning (measured in ``docs/studies.md``). :meth:`update` reassembles ``P`` at the
    current iterate; the Cholesky factorisation is the CG's PC (MUMPS, options under its
    prefix).
    """

    def __init__(self, hessian: GaussNewtonHessian, probe: PETSc.Vec):
        self.hessian = hessian
        self.probe = probe
        self.mat: PETSc.Mat | None = None
        self._E, self._Hv = probe.duplicate(), probe.duplicate()

    def update(self, alpha: float) -> PETSc.Mat:
        """``P`` at the model's current ``E`` and ``R''``; returns it. Collective."""
        R = self.hessian.regulariser.hessian()
        if self.mat is None:
            self.mat = R.copy()
        else:
            R.copy(self.mat, PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
        self._E.array[:] = self.hessian.model.E.x.array[: self._E.getLocalSize()]
        self.mat.diagonalScale(L=self._E, R=self._E)
        self.mat.scale(alpha)
        self.hessian.misfit_mult(self.probe, self._Hv)
        beta = self.probe.dot(self._Hv) / self.probe.getSize()
        self.mat.shift(beta if beta > 0 and math.isfinite(beta) else 1.0)
        return self.mat

    def destroy(self) -> None:
        for obj in (self.mat, self.probe, self._E, self._Hv):
            if obj is not None:
                obj.destroy()


class OutputMisfit:
    """The data part of the output-error functional: ``1/2 sum_free w_c (u - u_m)^2``.

    Holds the measured displacement ``u_m`` (:attr:`u_obs`), the weight of every owned
    displacement dof (:attr:`weights`: ``w_c`` of its component, 0 on Dirichlet dofs) and the
    numbers of free dofs per component (:attr:`free_counts`, global).

    Args:
        model: the forward model (its space ``V``, supports and communicator).
        displacement: ``u_m`` in any form of :func:`~fenics_red.measurements.set_displacement`.
        component_weights: as :attr:`GaussNewtonSettings.component_weights`.
    """

    def __init__(self, model: ElasticityModel, displacement, component_weights=(1.0, 1.0)):
        V = model.V
        self.comm = model.comm
        self.n_components = bs = V.dofmap.index_map_bs
        self._n = V.dofmap.index_map.size_local * bs
        self.u_obs = set_displacement(model, displacement, fem.Function(V, name="u_measured"))
        self.component_weights = expand_component_weights(component_weights, bs)
        free = model.free_dofs
        weights = np.zeros(self._n)
        for c, w in enumerate(self.component_weights):
            weights[c::bs] = w
        weights[~free] = 0.0
        self.weights = self.u_obs.x.petsc_vec.duplicate()
        self.weights.array[:] = weights
        self.free_counts = np.array([free[c::bs].sum() for c in range(bs)], dtype=np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, self.free_counts, op=MPI.SUM)

    def value(self, u: np.ndarray) -> float:
        """``1/2 sum w (u - u_m)^2`` of local displacement values ``u`` (collective)."""
        r = u[: self._n] - self.u_obs.x.array[: self._n]
        return 0.5 * self.comm.allreduce(float(np.sum(self.weights.array_r * r * r)), op=MPI.SUM)

    def weighted_residual(self, u: np.ndarray, out: PETSc.Vec) -> PETSc.Vec:
        """``out = W (u - u_m)``: the source of the adjoint equation."""
        out.array[:] = self.weights.array_r * (u[: self._n] - self.u_obs.x.array[: self._n])
        return out

    def homogeneous_fit(self, u1: PETSc.Vec) -> float:
        """The uniform modulus that best fits ``u_m``, ``u1`` the displacement of ``E = 1``
        (:func:`~fenics_red.likelihood.best_uniform_modulus`)."""
        return best_uniform_modulus(u1, self.u_obs.x.petsc_vec, self.weights)

    def noise_std(self, noise_std) -> np.ndarray:
        """``noise_std`` (one value, or one per displacement component) per component."""
        sigma = validation.per_component(
            noise_std, "noise_std", (1, self.n_components),
            shape_hint=f"positive: one value, or one per component ({self.n_components})")
        return np.broadcast_to(np.asarray(sigma), (self.n_components,))

    def expected_noise_energy(self, noise_std) -> float:
        """``sum_c w_c n_c sigma_c^2``: expected weighted residual of the noise over free dofs."""
        sigma = self.noise_std(noise_std)
        return float(np.sum(self.component_weights * self.free_counts * sigma**2))

    def destroy(self) -> None:
        self.weights.destroy()


class _ShellContext:
    """Python context of a ``MatShell``: ``mult`` of the operator it wraps."""

    def __init__(self, operator):
        self.operator = operator

    def mult(self, mat, x, y):
        self.operator.mult(x, y)


class GaussNewtonInversion:
    """Output-error inversion of one data set on an :class:`ElasticityModel` (model = forward +
    misfit + regulariser, hippylib-style).

    The model is used in place: its modulus is overwritten by the iterates, its LU factorisation
    is reused for the adjoint and the Hessian products. Create once per data set, then call
    :meth:`reconstruct` (or :meth:`minimise` for one fixed alpha); free with :meth:`destroy`.
    The parts: the data term (:attr:`misfit`, :class:`OutputMisfit`), the regulariser
    (:attr:`regulariser`, :mod:`fenics_red.regularisers`), the Hessian shell
    (:class:`GaussNewtonHessian`), the line search and the alpha rules
    (:mod:`fenics_red.optimisation`), the derivative check (:func:`fenics_red.linalg.taylor_test`).

    Args:
        model: the forward model (mesh, supports, traction, solver).
        ux, uy: measured lateral and axial displacement images ``(ny+1, nx+1)`` (needs a model
            built on an :class:`ImageGrid`); or ``ux`` the measured displacement in any form of
            :func:`~fenics_red.measurements.set_displacement` (a function on ``model.V``, a PETSc
            vector, local values, one image per component) with ``uy=None``.
        settings: regulariser, alpha rule, stopping rules.
    """

    def __init__(self, model: ElasticityModel, ux, uy=None,
                 settings: GaussNewtonSettings | None = None):
        self.settings = settings = settings or GaussNewtonSettings()
        self.model = model
        self.comm = model.comm
        self._nq = model.Q.dofmap.index_map.size_local
        self.misfit = OutputMisfit(model, ux if uy is None else (ux, uy),
                                   settings.component_weights)
        self.u_obs, self.free_counts = self.misfit.u_obs, self.misfit.free_counts

        # parameter m = log E, with ghosts; the regulariser acts on the model's E
        self.m = fem.Function(model.Q, name="log_E")
        self.regulariser = create_regulariser(settings.regulariser, model.E)

        # PETSc work objects, allocated once
        self._D = model.assemble_D(model.u, apply_bcs=True)
        self._q_work, self._v_work1 = self._D.createVecs()
        self._v_work2 = self._v_work1.duplicate()
        self.gradient_vec = self._q_work.duplicate()
        self.direction = self._q_work.duplicate()
        self._hessian = GaussNewtonHessian(model, self._D, self.misfit.weights, self.regulariser)
        self._cg = PETSc.KSP().create(self.comm)
        self._cg.setOperators(self._hessian.mat)
        self._pc = None
        cg_options = {"ksp_type": "cg", "pc_type": "none"}
        #: the inner CG's preconditioner, ``"auto"`` resolved for this mesh
        self.preconditioner = settings.resolve_preconditioner(model.dim)
        if self.preconditioner == "regulariser":
            start = self._start_vector()
            start.array[:] = np.where(start.array_r > 1.0, 1.0, -1.0)  # a ±1 probe
            self._pc = RegulariserPreconditioner(self._hessian, start)
            cg_options.update(pc_type="cholesky", pc_factor_mat_solver_type="mumps")
        set_options(self._cg, f"fenics_red_gn_cg_{next(_instance_counter)}_", cg_options)

        self.alpha = 0.0 if settings.alpha is None else float(settings.alpha)
        self._state_current = False  # the forward solution belongs to the current m
        self._D_current = False  # D(u) is assembled at the current forward solution
        self.initial_modulus: float | None = None
        self._length = float(np.max(model.upper - model.lower))
        self.set_tv_smoothing(1.0)  # until an initial guess sets the modulus scale

    # -- parameter handling ----------------------------------------------------------------------

    def _E_owned(self) -> np.ndarray:
        return self.model.E.x.array[: self._nq]

    def set_parameter(self, m) -> None:
        """Set ``m = log E`` from a Q-layout PETSc Vec, this rank's owned values (a 1-D array, as
        :meth:`parameter` returns) or an image (grids)."""
        if isinstance(m, PETSc.Vec):
            self.m.x.array[: self._nq] = m.array_r
        else:
            values = np.asarray(m, dtype=np.float64)
            if values.ndim >= 2:
                self.model.from_values(values, self.m.x.array, name="parameter image")
            elif values.shape == (self._nq,):
                self.m.x.array[: self._nq] = values
            else:
                raise ValueError(f"parameter must be an image or {self._nq} owned values, got "
                                 f"shape {values.shape}")
        self.m.x.scatter_forward()
        with np.errstate(over="ignore"):
            E = np.exp(self.m.x.array)
        self.model.E.x.array[:] = E
        self.model.modulus_changed()
        self.regulariser.changed()
        self._state_current = self._D_current = False

    def set_modulus_values(self, values, name: str = "modulus") -> None:
        """Set ``m = log E`` from the modulus in file order (an image on grids, one value per
        node on meshes, whose order is not the dof order)."""
        local = self.model.from_values(np.asarray(values, dtype=np.float64),
                                       np.empty(self.m.x.array.size), name=name)
        self.set_parameter(np.log(local[: self._nq]))

    def parameter(self) -> np.ndarray:
        """Copy of the owned values of ``m = log E``."""
        return self.m.x.array[: self._nq].copy()

    def _parameter_vector(self, values) -> PETSc.Vec:
        """A new vector of the parameter space holding ``values`` (as :meth:`set_parameter`)."""
        vec = self._q_work.duplicate()
        if isinstance(values, PETSc.Vec):
            values.copy(vec)
        elif np.ndim(values) == 2:
            scratch = np.empty(self.m.x.array.size)
            self.model.from_values(values, scratch)
            vec.array[:] = scratch[: self._nq]
        else:
            vec.array[:] = np.asarray(values, dtype=np.float64)
        return vec

    def modulus_image(self) -> np.ndarray:
        """The current modulus as an image (collective; image grids only)."""
        return self.model.images("Q").to_image(self.model.E)

    def modulus_values(self) -> np.ndarray:
        """The current modulus in file order on every rank (an image on grids). Collective."""
        return self.model.to_values(self.model.E.x.array)

    def estimate(self) -> np.ndarray:
        """The current modulus in file order, on every rank: an image on an image grid, one
        value per node otherwise (:meth:`modulus_values`). Collective."""
        return self.modulus_values()

    def set_tv_smoothing(self, reference_modulus: float) -> None:
        """Set the TV smoothing ``delta = tv_delta * reference_modulus / L`` (done by
        :meth:`reconstruct` with the initial homogeneous modulus)."""
        self.tv_delta_absolute = self.settings.tv_delta * float(reference_modulus) / self._length
        if isinstance(self.regulariser, TotalVariation):
            self.regulariser.set_smoothing(self.tv_delta_absolute)

    def homogeneous_fit(self) -> float:
        """Least-squares homogeneous modulus (component weights, free dofs):
        :func:`~fenics_red.likelihood.best_uniform_modulus` with ``u₁`` the forward solution of
        ``E = 1``."""
        self.model.E.x.array[:] = 1.0
        self.model.modulus_changed()
        self.regulariser.changed()
        u1 = self.model.solve()
        self._state_current = self._D_current = False
        return self.misfit.homogeneous_fit(u1.x.petsc_vec)

    # -- objective, gradient, Hessian ------------------------------------------------------------

    @property
    def alpha(self) -> float:
        return self._hessian.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._hessian.alpha = validation.non_negative(value, "alpha",
                                                      what="a finite number >= 0")

    def objective(self) -> tuple[float, float, float]:
        """``(J, misfit, R)`` at the current parameter; one forward solve (collective).

        ``misfit = 1/2 sum_free w (u - u_m)^2``, ``J = misfit + alpha R``. Returns ``inf`` values
        if the modulus under- or overflows.
        """
        E = self.model.E.x.array
        bad = int(not (np.isfinite(E).all() and (E > 0).all()))
        if self.comm.allreduce(bad, op=MPI.MAX):
            return math.inf, math.inf, math.inf
        misfit = self.misfit.value(self.model.solve().x.array)
        reg = self.regulariser.value()
        self._state_current = True
        self._D_current = False
        return misfit + self.alpha * reg, misfit, reg

    def gradient(self, out: PETSc.Vec | None = None) -> PETSc.Vec:
        """Gradient of ``J`` with respect to ``m = log E`` (after :meth:`objective`).

        Reassembles ``D(u)`` at the current forward solution; one adjoint solve with the current
        factorisation.
        """
        if not self._state_current:
            raise RuntimeError("call objective() at the current parameter before gradient()")
        out = self.gradient_vec if out is None else out
        model = self.model
        self._assemble_D()
        r = self.misfit.weighted_residual(model.u.x.array, self._v_work1)
        model.ksp.solve(r, self._v_work2)
        self._D.multTranspose(self._v_work2, out)
        out.scale(-1.0)
        if self.alpha > 0:
            out.axpy(self.alpha, self.regulariser.gradient())
        out.array[:] *= self._E_owned()
        return out

    def _assemble_D(self) -> None:
        if not self._state_current:
            raise RuntimeError("call objective() at the current parameter first")
        if not self._D_current:
            self.model.assemble_D(self.model.u, apply_bcs=True)
            self._D_current = True

    def hessian(self) -> PETSc.Mat:
        """The Gauss-Newton Hessian at the current parameter as a ``MatShell`` (after
        :meth:`objective`). Its products use the current factorisation of ``K(E)``."""
        self._assemble_D()
        self.regulariser.hessian()
        return self._hessian.mat

    def _start_vector(self) -> PETSc.Vec:
        """A power-iteration start that depends on the node positions only, so that every
        partition of the mesh gives the same estimate."""
        x = self._q_work.duplicate()
        p = self.model.Q.tabulate_dof_coordinates()[: self._nq]
        x.array[:] = 1.0 + 0.5 * np.cos(12.9898 * p[:, 0] + 78.233 * p[:, 1]
                                        + 37.719 * p[:, 0] * p[:, 1] + 53.371 * p[:, 2])
        return x

    def alpha_heuristic(self) -> float:
        """``lambda_max(H_misfit) / lambda_max(H_reg)`` at the current state (12 power
        iterations each, :func:`~fenics_red.optimisation.alpha_heuristic`): an alpha at which the
        regulariser dominates the Gauss-Newton Hessian."""
        self.hessian()
        start = self._start_vector()
        try:
            return alpha_heuristic(self._hessian.misfit_mult, self._hessian.regulariser_mult,
                                   start, iterations=12)
        finally:
            start.destroy()

    # -- optimisation ----------------------------------------------------------------------------

    def _initialise(self, initial) -> None:
        """Set the initial parameter: a modulus image or nodal values (PETSc vector or owned
        values), a number, or (None) the settings' number or the homogeneous fit."""
        if initial is not None and (isinstance(initial, PETSc.Vec) or np.ndim(initial) >= 1):
            values = (initial.array_r if isinstance(initial, PETSc.Vec)
                      else np.asarray(initial, dtype=np.float64))
            bad = int(not (np.isfinite(values).all() and (values > 0).all()))
            if self.comm.allreduce(bad, op=MPI.MAX):
                raise ValueError("initial modulus must be finite and strictly positive "
                                 "everywhere")
            if isinstance(initial, PETSc.Vec):  # owned values
                self.set_parameter(np.log(values))
            else:  # file order: an image on grids, one value per mesh node otherwise
                self.set_modulus_values(values, "initial modulus")
            E0 = self.comm.allreduce(float(np.sum(self._E_owned())), op=MPI.SUM) / \
                self._q_work.getSize()
        else:
            if initial is None:
                initial = self.settings.initial_modulus
            E0 = float(initial) if initial is not None else self.homogeneous_fit()
            validation.positive(E0, "initial modulus", what="positive and finite")
            self.m.x.array[:] = math.log(E0)
            self.set_parameter(self.m.x.array[: self._nq])
        self.initial_modulus = E0
        self.set_tv_smoothing(E0)

    def _evaluate(self, m: np.ndarray) -> tuple[float, float, float]:
        """Set the parameter to ``m`` and return :meth:`objective` there."""
        self.set_parameter(m)
        return self.objective()

    def _newton_direction(self, g: PETSc.Vec, p: PETSc.Vec, g_norm: float,
                          g_start: float) -> int:
        """``p ≈ -H^-1 g`` by CG with Eisenstat-Walker forcing; returns the CG iterations."""
        s = self.settings
        forcing = min(s.cg_forcing_max, math.sqrt(g_norm / g_start)) if g_start > 0 else 0.5
        self._cg.setTolerances(rtol=forcing, atol=0.0, max_it=s.cg_max_iterations)
        self.hessian()
        if self._pc is not None:
            self._cg.setOperators(self._hessian.mat, self._pc.update(self.alpha))
        g.scale(-1.0)
        p.set(0.0)
        self._cg.solve(g, p)
        g.scale(-1.0)
        return self._cg.getIterationNumber()

    def minimise(self, alpha: float | None = None, history: list | None = None,
                 t_start: float | None = None) -> dict:
        """Gauss-Newton-CG with Armijo backtracking at a fixed alpha from the current parameter.

        Appends one record per iteration to ``history`` (objective, misfit, regularisation,
        gradient norm, step, CG iterations, time since ``t_start``) and returns a summary with the
        stopping reason. Collective.
        """
        s = self.settings
        if alpha is not None:
            self.alpha = alpha
        history = [] if history is None else history
        t_start = time.perf_counter() if t_start is None else t_start
        g, p = self.gradient_vec, self.direction
        J, misfit, reg = self.objective()
        if not math.isfinite(J):
            raise ValueError("the objective is not finite at the initial guess")
        self.gradient(g)
        g_norm = g_start = g.norm()
        reason, iteration = "max_iterations", 0

        def record(iteration: int, step: float, cg_iterations: int) -> None:
            history.append(dict(alpha=self.alpha, iteration=iteration, objective=J,
                                misfit=misfit, regularisation=reg, gradient_norm=g_norm,
                                step=step, cg_iterations=cg_iterations,
                                time=time.perf_counter() - t_start))

        record(0, 0.0, 0)
        for iteration in range(1, s.max_iterations + 1):
            if g_norm <= s.gradient_rtol * g_start or g_norm == 0.0:
                reason = "gradient"
                break
            cg_its = self._newton_direction(g, p, g_norm, g_start)
            slope = g.dot(p)
            if not (slope < 0 and math.isfinite(slope)):  # not a descent direction: use -g
                g.copy(p)
                p.scale(-1.0)
                slope = g.dot(p)
            if -0.5 * slope <= s.decrement_rtol * J and (iteration > 1 or self._pc is None):
                reason = "decrement"  # the predicted decrease
                break
            p_max = p.norm(PETSc.NormType.INFINITY)
            m_old = self.parameter()
            step, values = armijo_backtracking(
                self._evaluate, m_old, p.array_r, J, slope,
                min(1.0, s.max_log_step / p_max) if p_max > 0 else 1.0, s.armijo_c,
                s.max_backtracks)
            if step is None:
                self.set_parameter(m_old)
                self.objective()
                self.gradient(g)
                reason = "line_search"
                break
            relative_change = (J - values[0]) / max(abs(J), np.finfo(float).tiny)
            J, misfit, reg = values
            self.gradient(g)
            g_norm = g.norm()
            record(iteration, step, cg_its)
            if relative_change < 1e-12:
                reason = "stagnation"
                break
        else:
            iteration = s.max_iterations
        return dict(alpha=self.alpha, objective=J, misfit=misfit, regularisation=reg,
                    residual_norm2=2.0 * misfit, gradient_norm=g_norm, iterations=iteration,
                    reason=reason)

    def expected_noise_energy(self, noise_std) -> float:
        """``sum_c w_c n_c sigma_c^2``: expected weighted residual of the noise over free dofs."""
        return self.misfit.expected_noise_energy(noise_std)

    def reconstruct(self, noise_std=None, initial=None) -> tuple[np.ndarray, dict]:
        """Full reconstruction: fixed alpha, or alpha by the discrepancy principle.

        Args:
            noise_std: standard deviation of the displacement noise (a number, or one per
                component); required when ``settings.alpha`` is None.
            initial: initial modulus (image, nodal values or number); default from the settings.

        Returns:
            ``(E, history)``: ``E`` the estimate (:meth:`estimate`: an image on an image grid)
            and ``history`` a JSON-serialisable dict: ``iterations`` (one record per GN
            iteration, all alphas), ``alpha_trials`` (summary per alpha), ``alpha`` (chosen),
            ``target_residual``, ``discrepancy_reached``, ``initial_modulus``, ``time``,
            ``settings``.
        """
        s = self.settings
        t0 = time.perf_counter()
        if s.alpha is None and noise_std is None:
            raise ValueError("the discrepancy principle (settings.alpha=None) needs noise_std; "
                             "pass it or set a fixed alpha")
        target = (s.discrepancy_tau * self.expected_noise_energy(noise_std)
                  if noise_std is not None else None)
        self._initialise(initial)
        iterations: list[dict] = []
        trials: list[dict] = []
        history = dict(iterations=iterations, alpha_trials=trials, target_residual=target,
                       noise_std=None if noise_std is None else
                       self.misfit.noise_std(noise_std).tolist(),
                       initial_modulus=self.initial_modulus,
                       tv_delta_absolute=self.tv_delta_absolute,
                       preconditioner=self.preconditioner, settings=s.to_dict())
        if s.alpha is not None:
            summary = self.minimise(s.alpha, iterations, t0)
            trials.append(summary)
            history.update(alpha=s.alpha, discrepancy_reached=None if target is None else
                           bool(summary["residual_norm2"] <= target * (1 + s.discrepancy_rtol)),
                           time=time.perf_counter() - t0)
            return self.estimate(), history

        # discrepancy principle: decrease alpha (warm starts) until the residual crosses the target
        self.objective()
        self.gradient()
        best, reached = discrepancy_principle(
            lambda alpha: self.minimise(alpha, iterations, t0), self.parameter,
            self.set_parameter, target, s.alpha_initial or self.alpha_heuristic(),
            decrease=s.alpha_decrease, rtol=s.discrepancy_rtol, max_trials=s.max_alpha_trials,
            trials=trials)
        if best is not trials[-1]:  # its solution was restored
            self.alpha = best["alpha"]
            self.objective()
        history.update(alpha=best["alpha"], discrepancy_reached=reached,
                       time=time.perf_counter() - t0)
        return self.estimate(), history

    def l_curve(self, alphas: Sequence[float], initial=None) -> dict:
        """Solve for each alpha (largest first, warm starts) and locate the L-curve corner.

        Returns ``dict(points=[{alpha, residual_norm2, regularisation, iterations}], corner=alpha,
        images={alpha: E}``) with ``E`` as :meth:`estimate`; the corner maximises the curvature of
        ``(log residual, log R)`` (see :func:`l_curve_corner`).
        """
        self._initialise(initial)
        result = l_curve(self.minimise, alphas, self.estimate)
        return dict(points=result["points"], corner=result["corner"],
                    images=result["solutions"])

    # -- verification ----------------------------------------------------------------------------

    def taylor_test(self, m, direction, alpha: float, steps: Sequence[float] | None = None,
                    check_hessian: bool = False) -> dict:
        """Finite-difference check of the reduced gradient (hippylib's ``modelVerify``) by
        :func:`fenics_red.linalg.taylor_test`.

        With ``J(m + h dm) - J(m) - h <g, dm>`` the first-order remainder, returns
        ``dict(steps, remainders, rates, directional_derivative, objective)``; rates near 2 confirm
        the gradient. With ``check_hessian`` also ``hessian_remainders`` and ``hessian_rates`` of
        the Gauss-Newton Hessian (near 2 only where it is the exact Hessian: zero residual,
        ``alpha = 0``). ``m`` and ``direction`` as in :meth:`set_parameter` (images, owned values
        or vectors). Leaves the parameter at ``m``. Collective.
        """
        self.alpha = alpha
        m0, dm = self._parameter_vector(m), self._parameter_vector(direction)

        def value(x):
            return self._evaluate(x)[0]

        def gradient(x, out):
            self._evaluate(x)
            self.gradient(out)

        def hessian_mult(x, v, out):
            gradient(x, self.gradient_vec)
            self.hessian().mult(v, out)

        try:
            return taylor_test(value, gradient, m0, dm, steps,
                               hessian_mult if check_hessian else None)
        finally:
            self.set_parameter(m0)
            m0.destroy()
            dm.destroy()

    def destroy(self) -> None:
        """Free the PETSc objects of the inversion (not the model's). Collective."""
        for obj in (self._cg, self._hessian, self.regulariser, self.misfit, self._q_work,
                    self._v_work1, self._v_work2, self.gradient_vec, self.direction, self._pc):
            if obj is not None:
                obj.destroy()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()


def reconstruct_gauss_newton(model_or_grid: ElasticityModel | ImageGrid, ux_noisy, uy_noisy,
                             noise_std=None, settings: GaussNewtonSettings | None = None,
                             comm: MPI.Comm | None = None, *,
                             forward_settings: ForwardSettings | None = None,
                             initial=None) -> tuple[np.ndarray, dict]:
    """Gauss-Newton-CG reconstruction of a modulus from a measured displacement.

    Args:
        model_or_grid: a forward model (reused; its modulus is overwritten), or an
            :class:`ImageGrid` (a model is built on ``comm`` with ``forward_settings`` and freed
            at the end).
        ux_noisy, uy_noisy: measured lateral and axial displacement images ``(ny+1, nx+1)`` (a
            model on an image grid); or ``ux_noisy`` the displacement in any form of
            :class:`GaussNewtonInversion` with ``uy_noisy=None`` (any mesh).
        noise_std: standard deviation of the displacement noise (number or per component);
            required for the discrepancy principle (``settings.alpha is None``).
        settings: :class:`GaussNewtonSettings` (default: Tikhonov, discrepancy principle).
        comm: communicator for a model built from a grid (default ``COMM_SELF``); with a model
            it must be None or the model's.
        forward_settings: forward settings for a model built from a grid; they must match the
            ones that produced the data (traction, supports, nu, plane).
        initial: initial modulus, image, nodal values or number (default: settings, else
            homogeneous fit).

    Returns:
        ``(E, history)``: the estimate (an image on an image grid, else owned nodal values) and
        the history of :meth:`GaussNewtonInversion.reconstruct`. Collective.
    """
    if isinstance(model_or_grid, ImageGrid):
        model = ElasticityModel.on_grid(model_or_grid, comm or MPI.COMM_SELF, forward_settings)
        owned = True
    elif isinstance(model_or_grid, ElasticityModel):
        model, owned = model_or_grid, False
        if forward_settings is not None:
            raise ValueError("forward_settings apply only when a grid is given; the model has "
                             "its own")
        if comm is not None and MPI.Comm.Compare(comm, model.comm) not in (MPI.IDENT,
                                                                            MPI.CONGRUENT):
            raise ValueError("comm differs from the model's communicator; pass comm=None")
        if model.grid is None and uy_noisy is not None:
            raise ValueError("the model has no ImageGrid; displacement images need one (pass the "
                             "displacement as a function, vector or local values, uy_noisy=None)")
    else:
        raise TypeError(f"expected an ElasticityModel or an ImageGrid, got "
                        f"{type(model_or_grid).__name__}")
    try:
        with GaussNewtonInversion(model, ux_noisy, uy_noisy, settings) as inversion:
            return inversion.reconstruct(noise_std, initial)
    finally:
        if owned:
            model.destroy()


def _factorised_up_to_many_solves_limit(space, forward: ForwardSettings) -> ForwardSettings:
    """``solver="auto"`` resolved for Gauss-Newton, which solves many times with one ``K`` (two
    per CG step on the GN system): MUMPS LU up to ``forward.AUTO_FACTOR_MAX_DOFS``."""
    from dataclasses import replace

    nodes = int(np.prod(space.shape)) if hasattr(space, "create_mesh") else len(space.points)
    return replace(forward, solver=forward.resolve_solver(space.dim, nodes * space.dim,
                                                          many_solves=True))


class GaussNewtonRunner:
    """The ``"gn-tikhonov"`` and ``"gn-tv"`` methods behind the runner API of
    :mod:`fenics_red.methods`: one forward model per grid, one inversion per sample.

    ``alpha`` is chosen per sample by the discrepancy principle with the sample's noise level
    (``noise_std``) unless an ``alpha`` option fixes it. Options are
    :class:`GaussNewtonSettings` fields (``regulariser`` is set by the method's name); the generic
    ``max_steps`` maps to ``max_iterations``.
    """

    def __init__(self, regulariser: str, grid, forward: ForwardSettings,
                 comm: MPI.Comm, options: Mapping | GaussNewtonSettings | None = None):
        self.options = self.gn_settings = gn_options(regulariser, options)
        self.model = ElasticityModel.on_grid(grid, comm, _factorised_up_to_many_solves_limit(
            grid, forward))

    @property
    def settings(self) -> dict:
        return self.gn_settings.to_dict()

    def run(self, sample) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        m = Measurement.from_sample(sample)
        estimate, history = reconstruct_gauss_newton(self.model, m.displacement, None,
                                                     m.noise_std, self.gn_settings)
        rows = history["iterations"]
        columns = sorted({k for row in rows for k, v in row.items()
                          if isinstance(v, int | float | np.number)})
        arrays = {k: np.array([row.get(k, np.nan) for row in rows], dtype=np.float64)
                  for k in columns}
        info = {"alpha": history["alpha"], "discrepancy_reached": history["discrepancy_reached"],
                "alpha_trials": len(history["alpha_trials"]), "iterations": len(rows),
                "preconditioner": history["preconditioner"], "time": history["time"]}
        return estimate, arrays, info

    def destroy(self) -> None:
        self.model.destroy()


def gn_options(regulariser: str, options: Mapping | GaussNewtonSettings | None = None
               ) -> GaussNewtonSettings:
    """The options of ``"gn-<regulariser>"``: :class:`GaussNewtonSettings` with the overrides
    ``options`` (its fields, or the generic ``max_steps`` for ``max_iterations``; ``regulariser``
    is the method's, set by its name); settings of this regulariser pass as they are."""
    method = f"gn-{regulariser}"
    if isinstance(options, GaussNewtonSettings):
        if options.regulariser == regulariser:
            return options
        options = options.to_dict()  # refused below
    values = GaussNewtonSettings(regulariser=regulariser).to_dict()
    for key, value in dict(options or {}).items():
        name = {"max_steps": "max_iterations"}.get(key, key)
        if name not in values:
            accepted = sorted((set(values) - {"regulariser"}) | {"max_steps"})
            raise ValueError(f"method {method!r} has no option {key!r}; accepted: {accepted}")
        if name == "regulariser" and value != regulariser:
            raise ValueError(f"method {method!r} has the regulariser {regulariser!r}, not "
                             f"{value!r} (each regulariser is its own method)")
        values[name] = value
    try:
        return GaussNewtonSettings.from_dict(values)
    except TypeError as error:  # a value of the wrong type, e.g. a string for a number
        raise ValueError(f"method {method!r}: an option has a value of the wrong type "
                         f"({error})") from None


def gn_tikhonov_options(options: Mapping | GaussNewtonSettings | None = None
                        ) -> GaussNewtonSettings:
    """The options of ``"gn-tikhonov"`` (see :func:`gn_options`)."""
    return gn_options("tikhonov", options)


def gn_tv_options(options: Mapping | GaussNewtonSettings | None = None) -> GaussNewtonSettings:
    """The options of ``"gn-tv"`` (see :func:`gn_options`)."""
    return gn_options("tv", options)


def setup_gn_tikhonov(grid, forward, comm, options=None) -> GaussNewtonRunner:
    """Factory of ``"gn-tikhonov"`` (options: see :func:`gn_options`)."""
    return GaussNewtonRunner("tikhonov", grid, forward, comm, options)


def setup_gn_tv(grid, forward, comm, options=None) -> GaussNewtonRunner:
    """Factory of ``"gn-tv"`` (options: see :func:`gn_options`)."""
    return GaussNewtonRunner("tv", grid, forward, comm, options)
