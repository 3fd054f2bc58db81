"""Classical baseline: deterministic FEM output-error inversion by Gauss-Newton-CG (paper, Fig. 2b).

The modulus ``E`` (nodal, P1) is found by minimising

    J(E) = 1/2 sum_free w_c (u_m - u(E))^2 + alpha R(E),        K(E) u(E) = f,

over the free displacement dofs (Dirichlet dofs carry no information), with per-component weights
``w_c`` (``w_x`` for lateral, ``w_y`` for axial dofs) and one of two hand-crafted regularisers,
written as UFL forms on the model's modulus function and compiled once:

* ``"tikhonov"``: ``R(E) = 1/2 int |grad E|^2 dx`` (penalises roughness; blurs edges);
* ``"tv"``: smoothed total variation ``R(E) = int sqrt(|grad E|^2 + delta^2) dx`` (keeps edges),
  with ``delta = tv_delta * E0 / L`` (``E0`` the initial homogeneous modulus, ``L`` the larger side
  of the domain), so ``tv_delta`` is dimensionless.

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
``MatShell``, own options prefix; Eisenstat-Walker forcing ``min(0.5, sqrt(|g|/|g_0|))``); every
CG iteration costs two solves with the *same* LU factorisation of ``K(E)`` (the forward solve of
the current iterate), so one GN iteration costs one factorisation plus ``2 x (CG iterations)``
triangular solves. An Armijo backtracking line search (with a cap on the change of ``log E`` per
step) globalises the method.

Choosing ``alpha``:

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

The communicator is the model's: everything is collective and runs on any number of ranks.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import ufl
from mpi4py import MPI
from petsc4py import PETSc

from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc

from .forward import ElasticityModel, ForwardSettings
from .grid import ImageGrid, validate_image

__all__ = ["GaussNewtonSettings", "GaussNewtonInversion", "reconstruct_gauss_newton",
           "GaussNewtonRunner", "setup_gn_tikhonov", "setup_gn_tv",
           "l_curve_corner"]

_REGULARISERS = ("tikhonov", "tv")
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
            homogeneous modulus, ``L`` the larger side of the domain).
        component_weights: misfit weights ``(w_x, w_y)`` of the lateral and axial displacement.
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
        armijo_c: sufficient-decrease constant of the line search.
        max_backtracks: halvings of the step before the line search gives up.
        max_log_step: cap on ``max |delta log E|`` of one step (``E`` changes by at most
            ``exp(max_log_step)`` per iteration).
    """

    regulariser: str = "tikhonov"
    alpha: float | None = None
    tv_delta: float = 1.0
    component_weights: tuple[float, float] = (1.0, 1.0)
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
    armijo_c: float = 1e-4
    max_backtracks: int = 12
    max_log_step: float = 1.0

    def __post_init__(self):
        if self.regulariser not in _REGULARISERS:
            raise ValueError(f"regulariser must be one of {_REGULARISERS}, got "
                             f"{self.regulariser!r}")
        object.__setattr__(self, "component_weights",
                           tuple(float(w) for w in self.component_weights))
        if len(self.component_weights) != 2 or not all(
                np.isfinite(w) and w >= 0 for w in self.component_weights) \
                or max(self.component_weights) == 0:
            raise ValueError("component_weights must be two finite non-negative numbers, not both "
                             f"zero; got {self.component_weights!r}")
        positive = ["tv_delta", "discrepancy_tau", "discrepancy_rtol", "cg_forcing_max",
                    "armijo_c", "max_log_step", "gradient_rtol", "decrement_rtol"]
        optional_positive = ["alpha_initial", "initial_modulus"]
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is None and name in optional_positive:
                continue
            if not (isinstance(value, int | float) and np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.alpha is not None and not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be None (discrepancy principle) or a finite number "
                             f">= 0, got {self.alpha!r}")
        if not self.alpha_decrease > 1:
            raise ValueError(f"alpha_decrease must exceed 1, got {self.alpha_decrease!r}")
        if not self.armijo_c < 1 or not self.cg_forcing_max < 1:
            raise ValueError("armijo_c and cg_forcing_max must be below 1")
        for name in ("max_alpha_trials", "max_iterations", "cg_max_iterations",
                     "max_backtracks"):
            value = getattr(self, name)
            if not (isinstance(value, int | np.integer) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

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


class _HessianContext:
    """``MatShell`` context: the Gauss-Newton Hessian in log-modulus coordinates."""

    def __init__(self, inversion: GaussNewtonInversion):
        self.inv = inversion

    def mult(self, mat, x, y):
        inv = self.inv
        E = inv._E_owned()
        t, a, b = inv._q_work, inv._v_work1, inv._v_work2
        t.array[:] = x.array_r * E
        inv._D.mult(t, a)
        inv.model.ksp.solve(a, b)          # -J (E*x) = K^-1 D (E*x)
        b.array[:] *= inv._weights_owned
        inv.model.ksp.solve(b, a)          # K symmetric: K^-T = K^-1
        inv._D.multTranspose(a, y)
        if inv._alpha > 0:
            inv._reg_hessian.mult(t, inv._q_work2)
            y.axpy(inv._alpha, inv._q_work2)
        y.array[:] *= E
        inv._hessian_products += 1


class GaussNewtonInversion:
    """Output-error inversion of one data set on an :class:`ElasticityModel` (model = forward +
    misfit + regulariser, hippylib-style).

    The model is used in place: its modulus is overwritten by the iterates, its LU factorisation
    is reused for the adjoint and the Hessian products. Create once per data set, then call
    :meth:`reconstruct` (or :meth:`minimise` for one fixed alpha); free with :meth:`destroy`.

    Args:
        model: the forward model (mesh, supports, traction, solver).
        ux, uy: measured lateral and axial displacement images ``(ny+1, nx+1)`` (needs a model
            built on an :class:`ImageGrid`), or ``ux`` a function/array of local dof values on
            ``model.V`` with ``uy=None``.
        settings: regulariser, alpha rule, stopping rules.
    """

    def __init__(self, model: ElasticityModel, ux, uy=None,
                 settings: GaussNewtonSettings | None = None):
        self.settings = settings = settings or GaussNewtonSettings()
        self.model = model
        self.comm = model.comm
        V, Q = model.V, model.Q
        self._nq = Q.dofmap.index_map.size_local
        self._nv = V.dofmap.index_map.size_local * V.dofmap.index_map_bs

        # data
        self.u_obs = fem.Function(V, name="u_measured")
        if uy is None:
            values = ux.x.array if isinstance(ux, fem.Function) else np.asarray(ux, float)
            if values.shape != self.u_obs.x.array.shape:
                raise ValueError(f"displacement of {values.shape} local values does not fit the "
                                 f"model's {self.u_obs.x.array.shape}")
            self.u_obs.x.array[:] = values
        else:
            shape = model.grid.shape if model.grid is not None else None
            ux = validate_image(ux, shape, "lateral displacement image ux")
            uy = validate_image(uy, shape, "axial displacement image uy")
            model.images("V").from_images(np.stack([ux, uy]), self.u_obs.x.array)
        bad = int(not np.isfinite(self.u_obs.x.array).all())
        if self.comm.allreduce(bad, op=MPI.MAX):
            raise ValueError("measured displacement has non-finite values")

        free = model.free_dofs
        weights = np.zeros(self._nv)
        weights[0::2], weights[1::2] = settings.component_weights
        weights[~free] = 0.0
        self._weights_owned = weights
        self.free_counts = np.array([(free[0::2]).sum(), (free[1::2]).sum()], dtype=np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, self.free_counts, op=MPI.SUM)

        # parameter m = log E, with ghosts
        self.m = fem.Function(Q, name="log_E")

        # regulariser forms, compiled once
        E = model.E
        q, p = ufl.TestFunction(Q), ufl.TrialFunction(Q)
        self._delta2 = fem.Constant(model.mesh, PETSc.ScalarType(0.0))
        if settings.regulariser == "tikhonov":
            R = 0.5 * ufl.inner(ufl.grad(E), ufl.grad(E)) * ufl.dx
            hessian = ufl.inner(ufl.grad(p), ufl.grad(q)) * ufl.dx
        else:
            s = ufl.sqrt(ufl.inner(ufl.grad(E), ufl.grad(E)) + self._delta2)
            R = s * ufl.dx
            hessian = ufl.inner(ufl.grad(p), ufl.grad(q)) / s * ufl.dx  # lagged diffusivity
        self._R = fem.form(R)
        self._dR = fem.form(ufl.derivative(R, E, q))
        self._HR = fem.form(hessian)
        self._reg_hessian = fem_petsc.create_matrix(self._HR)
        self._reg_hessian_current = False
        self._reg_grad = fem_petsc.create_vector(self._dR)

        # PETSc work objects, allocated once
        self._D = model.assemble_D(model.u, apply_bcs=True)
        self._q_work, self._v_work1 = self._D.createVecs()
        self._q_work2 = self._q_work.duplicate()
        self._v_work2 = self._v_work1.duplicate()
        self.gradient_vec = self._q_work.duplicate()
        self.direction = self._q_work.duplicate()
        n_global = self._q_work.getSize()
        self._hessian = PETSc.Mat().createPython(((self._nq, n_global), (self._nq, n_global)),
                                                 _HessianContext(self), comm=self.comm)
        self._hessian.setUp()
        self._cg = PETSc.KSP().create(self.comm)
        self._cg.setOptionsPrefix(f"fenics_red_gn_cg_{next(_instance_counter)}_")
        self._cg.setOperators(self._hessian)
        self._cg.setType(PETSc.KSP.Type.CG)
        self._cg.getPC().setType(PETSc.PC.Type.NONE)
        self._cg.setFromOptions()

        self._alpha = 0.0 if settings.alpha is None else float(settings.alpha)
        self._hessian_products = 0
        self._state_current = False  # the forward solution belongs to the current m
        self._D_current = False  # D(u) is assembled at the current forward solution
        self.initial_modulus: float | None = None
        self._length = float(np.max(model.upper - model.lower))
        self.set_tv_smoothing(1.0)  # until an initial guess sets the modulus scale

    # -- parameter handling ----------------------------------------------------------------------

    def _E_owned(self) -> np.ndarray:
        return self.model.E.x.array[: self._nq]

    def set_parameter(self, m) -> None:
        """Set ``m = log E`` from a Q-layout PETSc Vec, local owned values or an image."""
        if isinstance(m, PETSc.Vec):
            self.m.x.array[: self._nq] = m.array_r
        else:
            values = np.asarray(m, dtype=np.float64)
            if values.ndim == 2:
                self.model.images("Q").from_images(values, self.m.x.array)
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
        self._state_current = self._D_current = False
        self._reg_hessian_current = False

    def parameter(self) -> np.ndarray:
        """Copy of the owned values of ``m = log E``."""
        return self.m.x.array[: self._nq].copy()

    def modulus_image(self) -> np.ndarray:
        """The current modulus as an image (collective)."""
        return self.model.images("Q").to_image(self.model.E)

    def set_tv_smoothing(self, reference_modulus: float) -> None:
        """Set the TV smoothing ``delta = tv_delta * reference_modulus / L`` (done by
        :meth:`reconstruct` with the initial homogeneous modulus)."""
        self.tv_delta_absolute = self.settings.tv_delta * float(reference_modulus) / self._length
        self._delta2.value = self.tv_delta_absolute**2

    def homogeneous_fit(self) -> float:
        """Least-squares homogeneous modulus: ``u(E0) = u(1) / E0`` for a uniform ``E0``."""
        self.model.E.x.array[:] = 1.0
        self.model.modulus_changed()
        u1 = self.model.solve().x.array[: self._nv]
        d = self.u_obs.x.array[: self._nv]
        w = self._weights_owned
        num = self.comm.allreduce(float(np.sum(w * u1 * d)), op=MPI.SUM)
        den = self.comm.allreduce(float(np.sum(w * u1 * u1)), op=MPI.SUM)
        self._state_current = self._D_current = False
        if not (num > 0 and den > 0):
            raise ValueError("the measured displacement does not correlate positively with the "
                             "model's response to the traction: check the load direction, the "
                             "supports and the displacement sign convention")
        return den / num

    # -- objective, gradient, Hessian ------------------------------------------------------------

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {value!r}")
        self._alpha = float(value)

    def objective(self) -> tuple[float, float, float]:
        """``(J, misfit, R)`` at the current parameter; one forward solve (collective).

        ``misfit = 1/2 sum_free w (u - u_m)^2``, ``J = misfit + alpha R``. Returns ``inf`` values
        if the modulus under- or overflows.
        """
        E = self.model.E.x.array
        bad = int(not (np.isfinite(E).all() and (E > 0).all()))
        if self.comm.allreduce(bad, op=MPI.MAX):
            return math.inf, math.inf, math.inf
        u = self.model.solve().x.array[: self._nv]
        r = u - self.u_obs.x.array[: self._nv]
        misfit = 0.5 * self.comm.allreduce(float(np.sum(self._weights_owned * r * r)), op=MPI.SUM)
        reg = self.comm.allreduce(float(fem.assemble_scalar(self._R)), op=MPI.SUM)
        self._state_current = True
        self._D_current = False
        return misfit + self._alpha * reg, misfit, reg

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
        r = self._v_work1
        r.array[:] = self._weights_owned * (model.u.x.array[: self._nv]
                                            - self.u_obs.x.array[: self._nv])
        model.ksp.solve(r, self._v_work2)
        self._D.multTranspose(self._v_work2, out)
        out.scale(-1.0)
        if self._alpha > 0:
            with self._reg_grad.localForm() as local:
                local.set(0.0)
            fem_petsc.assemble_vector(self._reg_grad, self._dR)
            self._reg_grad.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            out.axpy(self._alpha, self._reg_grad)
        out.array[:] *= self._E_owned()
        return out

    def _assemble_D(self) -> None:
        if not self._state_current:
            raise RuntimeError("call objective() at the current parameter first")
        if not self._D_current:
            self.model.assemble_D(self.model.u, apply_bcs=True)
            self._D_current = True

    def _update_reg_hessian(self) -> None:
        if self._reg_hessian_current and self.settings.regulariser == "tikhonov":
            return
        self._reg_hessian.zeroEntries()
        fem_petsc.assemble_matrix(self._reg_hessian, self._HR)
        self._reg_hessian.assemble()
        self._reg_hessian_current = True

    def hessian(self) -> PETSc.Mat:
        """The Gauss-Newton Hessian at the current parameter as a ``MatShell`` (after
        :meth:`objective`). Its products use the current factorisation of ``K(E)``."""
        self._assemble_D()
        self._update_reg_hessian()
        return self._hessian

    def _power_iteration(self, apply, iterations: int = 12) -> float:
        x, y = self._q_work2.duplicate(), self._q_work2.duplicate()
        # a start vector that depends on the node positions only, so that every partition of
        # the mesh gives the same estimate
        points = self.model.Q.tabulate_dof_coordinates()[: self._nq]
        x.array[:] = 1.0 + 0.5 * np.cos(12.9898 * points[:, 0] + 78.233 * points[:, 1]
                                        + 37.719 * points[:, 0] * points[:, 1])
        x.normalize()
        value = 0.0
        for _ in range(iterations):
            apply(x, y)
            value = y.norm()
            if value == 0:
                break
            y.copy(x)
            x.scale(1.0 / value)
        x.destroy()
        y.destroy()
        return value

    def alpha_heuristic(self) -> float:
        """``lambda_max(H_misfit) / lambda_max(H_reg)`` at the current state (power iterations):
        an alpha at which the regulariser dominates the Gauss-Newton Hessian."""
        self.hessian()
        saved, self._alpha = self._alpha, 0.0
        lam_misfit = self._power_iteration(lambda x, y: self._hessian.mult(x, y))
        self._alpha = saved
        E = self._E_owned()
        t = self._q_work.duplicate()

        def reg(x, y):
            t.array[:] = x.array_r * E
            self._reg_hessian.mult(t, y)
            y.array[:] *= E

        lam_reg = self._power_iteration(reg)
        t.destroy()
        return lam_misfit / lam_reg if lam_reg > 0 else 1.0

    # -- optimisation ----------------------------------------------------------------------------

    def _initialise(self, initial) -> None:
        """Set the initial parameter: an image (E), a float, or the homogeneous fit."""
        if initial is not None and np.ndim(initial) == 2:
            image = validate_image(initial, self.model.grid.shape if self.model.grid else None,
                                   "initial modulus image", positive=True)
            self.set_parameter(np.log(image))
            E0 = self.comm.allreduce(float(np.sum(self._E_owned())), op=MPI.SUM) / \
                self._q_work.getSize()
        else:
            if initial is None:
                initial = self.settings.initial_modulus
            E0 = float(initial) if initial is not None else self.homogeneous_fit()
            if not (np.isfinite(E0) and E0 > 0):
                raise ValueError(f"initial modulus must be positive and finite, got {E0!r}")
            self.m.x.array[:] = math.log(E0)
            self.set_parameter(self.m.x.array[: self._nq])
        self.initial_modulus = E0
        self.set_tv_smoothing(E0)

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
        history.append(dict(alpha=self._alpha, iteration=0, objective=J, misfit=misfit,
                            regularisation=reg, gradient_norm=g_norm, step=0.0, cg_iterations=0,
                            time=time.perf_counter() - t_start))
        for iteration in range(1, s.max_iterations + 1):
            if g_norm <= s.gradient_rtol * g_start or g_norm == 0.0:
                reason = "gradient"
                break
            # inner CG on the GN Hessian, Eisenstat-Walker forcing
            forcing = min(s.cg_forcing_max, math.sqrt(g_norm / g_start)) if g_start > 0 else 0.5
            self._cg.setTolerances(rtol=forcing, atol=0.0, max_it=s.cg_max_iterations)
            self.hessian()
            g.scale(-1.0)
            p.set(0.0)
            self._cg.solve(g, p)
            g.scale(-1.0)
            cg_its = self._cg.getIterationNumber()
            slope = g.dot(p)
            if not (slope < 0 and math.isfinite(slope)):  # not a descent direction: use -g
                g.copy(p)
                p.scale(-1.0)
                slope = g.dot(p)
            decrement = -0.5 * slope
            if decrement <= s.decrement_rtol * J:
                reason = "decrement"
                break
            p_max = p.norm(PETSc.NormType.INFINITY)
            scale = min(1.0, s.max_log_step / p_max) if p_max > 0 else 1.0
            # Armijo backtracking on m + t p
            step, accepted = scale, False
            m_old = self.parameter()
            for _ in range(s.max_backtracks):
                self.set_parameter(m_old + step * p.array_r)
                J_new, misfit_new, reg_new = self.objective()
                if math.isfinite(J_new) and J_new <= J + s.armijo_c * step * slope:
                    accepted = True
                    break
                step *= 0.5
            if not accepted:
                self.set_parameter(m_old)
                self.objective()
                self.gradient(g)
                reason = "line_search"
                break
            relative_change = (J - J_new) / max(abs(J), np.finfo(float).tiny)
            J, misfit, reg = J_new, misfit_new, reg_new
            self.gradient(g)
            g_norm = g.norm()
            history.append(dict(alpha=self._alpha, iteration=iteration, objective=J,
                                misfit=misfit, regularisation=reg, gradient_norm=g_norm,
                                step=step, cg_iterations=cg_its,
                                time=time.perf_counter() - t_start))
            if relative_change < 1e-12:
                reason = "stagnation"
                break
        else:
            iteration = s.max_iterations
        return dict(alpha=self._alpha, objective=J, misfit=misfit, regularisation=reg,
                    residual_norm2=2.0 * misfit, gradient_norm=g_norm, iterations=iteration,
                    reason=reason)

    def expected_noise_energy(self, noise_std) -> float:
        """``sum_c w_c n_c sigma_c^2``: expected weighted residual of the noise over free dofs."""
        sigma = np.broadcast_to(np.asarray(noise_std, dtype=float), (2,))
        if not (np.isfinite(sigma).all() and (sigma > 0).all()):
            raise ValueError(f"noise_std must be positive (one value, or one per component), "
                             f"got {noise_std!r}")
        w = np.asarray(self.settings.component_weights)
        return float(np.sum(w * self.free_counts * sigma**2))

    def reconstruct(self, noise_std=None, initial=None) -> tuple[np.ndarray, dict]:
        """Full reconstruction: fixed alpha, or alpha by the discrepancy principle.

        Args:
            noise_std: standard deviation of the displacement noise (a number, or one per
                component); required when ``settings.alpha`` is None.
            initial: initial modulus (image or number); default from the settings.

        Returns:
            ``(E_image, history)`` with ``history`` a JSON-serialisable dict: ``iterations`` (one
            record per GN iteration, all alphas), ``alpha_trials`` (summary per alpha), ``alpha``
            (chosen), ``target_residual``, ``discrepancy_reached``, ``initial_modulus``,
            ``time``, ``settings``.
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
                       np.broadcast_to(np.asarray(noise_std, float), (2,)).tolist(),
                       initial_modulus=self.initial_modulus,
                       tv_delta_absolute=self.tv_delta_absolute, settings=s.to_dict())
        if s.alpha is not None:
            summary = self.minimise(s.alpha, iterations, t0)
            trials.append(summary)
            history.update(alpha=s.alpha, discrepancy_reached=None if target is None else
                           bool(summary["residual_norm2"] <= target * (1 + s.discrepancy_rtol)),
                           time=time.perf_counter() - t0)
            return self.modulus_image(), history

        # discrepancy principle: decrease alpha (warm starts) until the residual crosses the target
        self.objective()
        self.gradient()
        alpha = s.alpha_initial or self.alpha_heuristic()
        solutions: dict[float, np.ndarray] = {}
        above = below = None
        reached = False
        for _ in range(s.max_alpha_trials):
            summary = self.minimise(alpha, iterations, t0)
            summary["target_residual"] = target
            trials.append(summary)
            solutions[alpha] = self.parameter()
            ratio = summary["residual_norm2"] / target
            if abs(ratio - 1.0) <= s.discrepancy_rtol:
                reached = True
                break
            if ratio > 1.0:
                above = summary
            else:
                below = summary
            if below is None:
                alpha = alpha / s.alpha_decrease
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
            self.set_parameter(solutions[nearest["alpha"]])
        best = min(trials, key=lambda t: abs(math.log(t["residual_norm2"] / target)))
        if best is not trials[-1]:
            self.set_parameter(solutions[best["alpha"]])
            self.alpha = best["alpha"]
            self.objective()
        history.update(alpha=best["alpha"], discrepancy_reached=reached,
                       time=time.perf_counter() - t0)
        return self.modulus_image(), history

    def l_curve(self, alphas: Sequence[float], initial=None) -> dict:
        """Solve for each alpha (largest first, warm starts) and locate the L-curve corner.

        Returns ``dict(points=[{alpha, residual_norm2, regularisation, iterations}], corner=alpha,
        images={alpha: E_image})``; the corner maximises the curvature of
        ``(log residual, log R)`` (see :func:`l_curve_corner`).
        """
        self._initialise(initial)
        points, images = [], {}
        for alpha in sorted((float(a) for a in alphas), reverse=True):
            summary = self.minimise(alpha)
            points.append(dict(alpha=alpha, residual_norm2=summary["residual_norm2"],
                               regularisation=summary["regularisation"],
                               iterations=summary["iterations"]))
            images[alpha] = self.modulus_image()
        corner = l_curve_corner([p["alpha"] for p in points],
                                [p["residual_norm2"] for p in points],
                                [p["regularisation"] for p in points])
        return dict(points=points, corner=corner, images=images)

    # -- verification ----------------------------------------------------------------------------

    def taylor_test(self, m, direction, alpha: float, steps: Sequence[float] | None = None
                    ) -> dict:
        """Finite-difference check of the reduced gradient (hippylib's ``modelVerify``).

        With ``J(m + h dm) - J(m) - h <g, dm>`` the first-order remainder, returns
        ``dict(steps, remainders, rates, directional_derivative)``; rates near 2 confirm the
        gradient. ``m`` and ``direction`` as in :meth:`set_parameter` (images or owned values).
        Collective.
        """
        steps = list(steps or [1e-2 * 0.5**k for k in range(6)])
        self.alpha = alpha
        self.set_parameter(m)
        m0 = self.parameter()
        if isinstance(direction, np.ndarray) and direction.ndim == 2:
            self.set_parameter(direction)
            dm = self.parameter()
            self.set_parameter(m0)
        else:
            dm = np.asarray(direction, dtype=float)
        J0, _, _ = self.objective()
        g = self.gradient()
        dJ = self.comm.allreduce(float(g.array_r @ dm), op=MPI.SUM)
        remainders = []
        for h in steps:
            self.set_parameter(m0 + h * dm)
            J, _, _ = self.objective()
            remainders.append(abs(J - J0 - h * dJ))
        self.set_parameter(m0)
        rates = [math.log(remainders[k] / remainders[k + 1]) / math.log(steps[k] / steps[k + 1])
                 for k in range(len(steps) - 1)]
        return dict(steps=steps, remainders=remainders, rates=rates, directional_derivative=dJ,
                    objective=J0)

    def destroy(self) -> None:
        """Free the PETSc objects of the inversion (not the model's). Collective."""
        for obj in (self._cg, self._hessian, self._reg_hessian, self._reg_grad, self._q_work,
                    self._q_work2, self._v_work1, self._v_work2, self.gradient_vec,
                    self.direction):
            obj.destroy()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()


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


def reconstruct_gauss_newton(model_or_grid: ElasticityModel | ImageGrid, ux_noisy, uy_noisy,
                             noise_std=None, settings: GaussNewtonSettings | None = None,
                             comm: MPI.Comm | None = None, *,
                             forward_settings: ForwardSettings | None = None,
                             initial=None) -> tuple[np.ndarray, dict]:
    """Gauss-Newton-CG reconstruction of a modulus image from measured displacement images.

    Args:
        model_or_grid: a forward model built on an image grid (reused; its modulus is
            overwritten), or an :class:`ImageGrid` (a model is built on ``comm`` with
            ``forward_settings`` and freed at the end).
        ux_noisy, uy_noisy: measured lateral and axial displacement images ``(ny+1, nx+1)``.
        noise_std: standard deviation of the displacement noise (number or per component);
            required for the discrepancy principle (``settings.alpha is None``).
        settings: :class:`GaussNewtonSettings` (default: Tikhonov, discrepancy principle).
        comm: communicator for a model built from a grid (default ``COMM_SELF``); with a model
            it must be None or the model's.
        forward_settings: forward settings for a model built from a grid; they must match the
            ones that produced the data (traction, supports, nu, plane).
        initial: initial modulus, image or number (default: settings, else homogeneous fit).

    Returns:
        ``(E_image, history)``; see :meth:`GaussNewtonInversion.reconstruct`. Collective.
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
        if model.grid is None:
            raise ValueError("the model has no ImageGrid; images in and out need one")
    else:
        raise TypeError(f"expected an ElasticityModel or an ImageGrid, got "
                        f"{type(model_or_grid).__name__}")
    try:
        with GaussNewtonInversion(model, ux_noisy, uy_noisy, settings) as inversion:
            return inversion.reconstruct(noise_std, initial)
    finally:
        if owned:
            model.destroy()


class GaussNewtonRunner:
    """The ``"gn-tikhonov"`` and ``"gn-tv"`` methods behind the runner API of
    :mod:`fenics_red.methods`: one forward model per grid, one inversion per sample.

    ``alpha`` is chosen per sample by the discrepancy principle with the sample's noise level
    (``noise_std``) unless an ``alpha`` option fixes it. Options are
    :class:`GaussNewtonSettings` fields (``regulariser`` is set by the method's name); the generic
    ``max_steps`` maps to ``max_iterations``.
    """

    def __init__(self, regulariser: str, grid: ImageGrid, forward: ForwardSettings,
                 comm: MPI.Comm, options: Mapping | None = None):
        values = GaussNewtonSettings(regulariser=regulariser).to_dict()
        for key, value in dict(options or {}).items():
            name = {"max_steps": "max_iterations"}.get(key, key)
            if name not in values or name == "regulariser":
                accepted = sorted((set(values) - {"regulariser"}) | {"max_steps"})
                raise ValueError(f"method 'gn-{regulariser}' has no option {key!r}; accepted: "
                                 f"{accepted}")
            values[name] = value
        self.gn_settings = GaussNewtonSettings.from_dict(values)
        self.model = ElasticityModel.on_grid(grid, comm, forward)

    @property
    def settings(self) -> dict:
        return self.gn_settings.to_dict()

    def run(self, sample) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        estimate, history = reconstruct_gauss_newton(
            self.model, sample.ux_noisy, sample.uy_noisy, tuple(sample.noise_std),
            self.gn_settings)
        rows = history["iterations"]
        columns = sorted({k for row in rows for k, v in row.items()
                          if isinstance(v, int | float | np.number)})
        arrays = {k: np.array([row.get(k, np.nan) for row in rows], dtype=np.float64)
                  for k in columns}
        info = {"alpha": history["alpha"], "discrepancy_reached": history["discrepancy_reached"],
                "alpha_trials": len(history["alpha_trials"]), "iterations": len(rows),
                "time": history["time"]}
        return estimate, arrays, info

    def destroy(self) -> None:
        self.model.destroy()


def setup_gn_tikhonov(grid, forward, comm, options=None) -> GaussNewtonRunner:
    """Factory of ``"gn-tikhonov"`` (options: :class:`GaussNewtonSettings` fields)."""
    return GaussNewtonRunner("tikhonov", grid, forward, comm, options)


def setup_gn_tv(grid, forward, comm, options=None) -> GaussNewtonRunner:
    """Factory of ``"gn-tv"`` (options: :class:`GaussNewtonSettings` fields)."""
    return GaussNewtonRunner("tv", grid, forward, comm, options)
