"""Where the estimate can be trusted: posterior standard deviations by low-rank Laplace.

With the data-misfit Hessian ``H`` of an estimate and a Gaussian prior of precision ``P``, the
Laplace (linearised) posterior covariance is ``C = (H + P)⁻¹``. ``H`` is low-rank relative to
``P`` for these ill-posed problems, so (as hIPPYlib does) ``C`` is written through the ``k``
largest eigenpairs of the generalised problem ``H v = λ P v`` (``Vᵀ P V = I``)::

    C ≈ P⁻¹ − V diag(λ / (1 + λ)) Vᵀ,        σᵢ² = (P⁻¹)ᵢᵢ − Σⱼ λⱼ/(1+λⱼ) V_ij²,

found by the randomised double-pass method (:func:`fenics_red.linalg.double_pass_eigh`, ``2(k +
p)`` Hessian products for rank ``k`` and oversampling ``p``). Truncation leaves out the terms
``λ/(1+λ) v²`` of the neglected pairs, so a too small ``k`` *over*-states ``σ`` (conservative);
``info["uncertainty_smallest_eigenvalue"]`` is the smallest kept ``λ`` (relative to the prior):
below about 0.1 the neglected terms are small. ``diag(P⁻¹)`` is computed exactly by solves with
blocks of unit vectors against one Cholesky factorisation of ``P`` (MUMPS multi-right-hand-side
solves, ``n / block_size`` of them): exact, about 14 s at 128² on one rank and growing faster
than the number of nodes (``n`` back-substitutions), so a runner solves it once per run and
rescales it for later samples; much larger meshes would switch to probing.

The prior ``P``. Both estimates use the Tikhonov gradient prior ``½ ∫|∇E|²`` of ``gn-tikhonov``,
made proper by a mass term: ``R_γ = ∫∇p·∇q + γ ∫p q`` with ``γ = mass_weight / L²`` (``L`` the
largest extent of the domain). ``∫∇p·∇q`` alone leaves the constant unpenalised (``R_γ`` is then
singular and ``P⁻¹`` does not exist); ``γ = 1/L²`` weighs the mass term like the gradient term of
a mode of wavelength ``2πL``, so it constrains the mean level only (which the data determine far
better) and not the local variations (the Matérn-type ``−Δ + 1/L²`` prior of hIPPYlib's
examples).

* ``gn-tikhonov`` minimises ``½ Σ w_c (u − u_m)² + α R(E)``. Read as a negative log-posterior it
  is divided by the noise variance ``s² = Σ_c w_c n_c σ_c² / Σ_c n_c`` (``s = σ`` for the default
  unit weights and equal components), so the prior precision is ``(α/s²) R_γ`` at the ``α`` the
  discrepancy principle chose. The data-misfit Hessian is the Gauss-Newton Hessian of the
  output-error term with the true noise weights ``Σn⁻¹``, ``H = Jᵀ Σn⁻¹ J``, ``J = ∂u/∂m``, in
  GN's parameter ``m = log E`` at the estimate (GN's own :class:`GaussNewtonHessian` shell), and
  the prior in ``m`` is ``diag(E) (α/s²) R_γ diag(E)``. Then ``σ_E = E σ_m``: the first-order
  (delta-method) map of ``σ_m``, and exactly the ``σ`` of the Gauss-Newton posterior in ``E``
  (``diag(E)`` cancels), so the parametrisation does not change the number. Where the
  linearisation holds (small noise, mild contrast) ``E_true`` lies within ``E_est ± 2σ_E`` at
  about 95 % of the nodes; with sharp, strong inclusions the Gaussian smoothness prior is wrong
  (GN flattens their contrast) and the truth leaves the band inside them (``docs/uncertainty.md``
  has the measured numbers).
* ``ml`` has no prior, and the unregularised problem's covariance ``H⁻¹`` is useless (condition
  number about 1e16: the nodal values the data barely see have variances of 1e10 and more). Its
  estimate is regularised by early stopping instead. ``σ`` for ``ml`` is therefore the posterior
  standard deviation of the *matched Tikhonov model*: the frozen-``Γ`` statistical likelihood
  (quadratic in ``E``, so the Laplace approximation is exact for it) with the prior
  ``N(E₀, (β R_γ)⁻¹)``, ``E₀`` the modulus ``Γ`` is frozen at (the ML's uniform start) and
  ``β`` the weight whose MAP estimate fits the data exactly as well as the ML estimate does
  (the ``Γ``-weighted misfit of the ML estimate; ``n`` when its discrepancy rule stopped it). It
  is the uncertainty of a regularised estimate of the same resolution, *not* the sampling
  spread of the early-stopped iterate (which has no prior to be a posterior of). The misfit of
  that MAP estimate follows from the same eigenpairs (:func:`map_misfit`), so ``β`` costs no
  further PDE solves: ``H v = λ R_γ v`` does not depend on ``β`` (the eigenvalues against
  ``β R_γ`` are ``λ/β``). ``σ² = (diag(R_γ⁻¹) − Σ λ/(λ+β) v²) / β``.

Use: ``fenics-red reconstruct DATA.h5 --method ml|gn-tikhonov --uncertainty [--uncertainty-rank
K]`` writes the map as the dataset ``std`` beside ``estimate`` (:func:`fenics_red.
reconstruction.load_std`); ``evaluate --uncertainty`` draws it. In code, wrap a method's runner
in :class:`UncertaintyRunner`. Everything is collective on the model's communicator, and the
start vectors are drawn in file order from ``seed``, so the map does not depend on the
partition (same on 1 and 2 ranks to round-off).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

from petsc4py import PETSc

import numpy as np

import ufl
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc

from . import validation
from .domain import mesh_bounds
from .linalg import double_pass_eigh, gram
from .petsc_options import set_options

__all__ = ["UncertaintySettings", "uncertainty_options", "PriorPrecision", "LowRankPosterior",
           "low_rank_posterior", "map_misfit", "matched_prior_weight", "ml_posterior_std",
           "gn_posterior_std", "UncertaintyRunner", "SUPPORTED_METHODS", "coverage"]

#: Methods that have an uncertainty map (``--uncertainty``).
SUPPORTED_METHODS = ("ml", "gn-tikhonov")
_PREFIX = "fenics_red_uncertainty_"


@dataclass(frozen=True)
class UncertaintySettings:
    """Settings of the low-rank posterior standard deviation (module docstring).

    Attributes:
        rank: ``k``, the number of eigenpairs of ``H v = λ P v`` kept (``--uncertainty-rank``).
            Too small a rank over-states ``σ`` (it is an upper bound in exact arithmetic).
        oversampling: ``p``, extra random vectors (``k + p`` of them, capped at the number of
            nodes); 10 is the usual choice.
        seed: seed of the random start vectors (drawn in file order: partition-independent).
        mass_weight: ``γ L²`` of the prior's mass term ``γ ∫p q`` (module docstring).
        block_size: unit vectors per multi-right-hand-side solve for ``diag(P⁻¹)``.
    """

    rank: int = 200
    oversampling: int = 10
    seed: int = 20261
    mass_weight: float = 1.0
    block_size: int = 512

    def __post_init__(self):
        validation.integer(self.rank, "the uncertainty rank (--uncertainty-rank)", low=1)
        validation.integer(self.oversampling, "UncertaintySettings.oversampling", low=0)
        validation.seed(self.seed, "UncertaintySettings.seed")
        validation.integer(self.block_size, "UncertaintySettings.block_size", low=1)
        object.__setattr__(self, "mass_weight", validation.positive(
            self.mass_weight, "UncertaintySettings.mass_weight"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> UncertaintySettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown uncertainty setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))


def uncertainty_options(method: str, options: Mapping | None) -> tuple[dict, UncertaintySettings
                                                                         | None]:
    """Split a method's option overrides into ``(the method's own, UncertaintySettings or
    None)``.

    ``options["uncertainty"]``: ``True`` (defaults), a mapping of :class:`UncertaintySettings`
    fields or the settings themselves; ``options["uncertainty_rank"]`` (the flag
    ``--uncertainty-rank``) sets the rank and needs ``uncertainty``. Raises ``ValueError`` in one
    line for a method without an uncertainty map or bad settings.
    """
    options = dict(options or {})
    given = options.pop("uncertainty", None)
    rank = options.pop("uncertainty_rank", None)
    if given is None or given is False:
        if rank is not None:
            raise ValueError("--uncertainty-rank (uncertainty_rank) needs --uncertainty")
        return options, None
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"--uncertainty (a posterior standard deviation map) is available for "
                         f"{' and '.join(SUPPORTED_METHODS)}, not {method!r}")
    if isinstance(given, UncertaintySettings):
        settings = given
    elif given is True:
        settings = UncertaintySettings()
    elif isinstance(given, Mapping):
        settings = UncertaintySettings.from_dict(given)
    else:
        raise ValueError(f"the option uncertainty must be True, a mapping of uncertainty "
                         f"settings or UncertaintySettings, got {given!r}")
    if rank is not None:
        settings = replace(settings, rank=rank)
    return options, settings


# -- the prior precision ---------------------------------------------------------------------

class PriorPrecision:
    """``P = diag(s) w (∫∇p·∇q + γ ∫pq) diag(s)`` on a scalar P1 space, assembled, with one
    Cholesky factorisation (MUMPS) for solves and the exact ``diag(P⁻¹)``.

    Args:
        Q: the scalar P1 space (the model's modulus space).
        weight: ``w`` (``α/s²`` for gn-tikhonov, 1 for ml whose ``β`` is applied later).
        mass_weight: ``γ L²`` with ``L`` the largest extent of the mesh.
        scale: owned nodal values ``s`` (``E`` for GN's log-parameter), or ``None``.
    """

    def __init__(self, Q, weight: float, mass_weight: float, scale: np.ndarray | None = None):
        mesh = Q.mesh
        self.comm = mesh.comm
        self.weight, self.mass_weight = float(weight), float(mass_weight)
        self.scale = None if scale is None else np.asarray(scale, dtype=float).copy()
        lower, upper = mesh_bounds(mesh)
        self.length = float(np.max(upper - lower))
        gamma = fem.Constant(mesh, PETSc.ScalarType(mass_weight / self.length**2))
        p, q = ufl.TrialFunction(Q), ufl.TestFunction(Q)
        form = fem.form(ufl.inner(ufl.grad(p), ufl.grad(q)) * ufl.dx + gamma * p * q * ufl.dx)
        self.mat = fem_petsc.assemble_matrix(form)
        self.mat.assemble()
        self.mat.scale(float(weight))
        if scale is not None:
            s = self.mat.createVecLeft()
            s.array[:] = scale
            self.mat.diagonalScale(s, s)
            s.destroy()
        self.ksp = PETSc.KSP().create(self.comm)
        self.ksp.setOperators(self.mat)
        set_options(self.ksp, _PREFIX, {"ksp_type": "preonly", "pc_type": "cholesky",
                                        "pc_factor_mat_solver_type": "mumps"}, {})
        self.ksp.setUp()

    def mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        self.mat.mult(x, y)

    def solve(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        self.ksp.solve(x, y)

    def inverse_diagonal(self, block_size: int = 512, cache: dict | None = None) -> np.ndarray:
        """The owned entries of ``diag(P⁻¹)``, exactly: ``P⁻¹ [e_j0 ... e_j0+b]`` by one
        multi-right-hand-side solve per block of ``b`` unit vectors. Collective.

        ``cache`` (a dict kept by the caller for one mesh and partition): ``P = diag(s) w R
        diag(s)`` with ``R`` fixed by the mesh and ``mass_weight``, so ``diag(P⁻¹) = diag(R⁻¹) /
        (w s²)``; the first call stores ``diag(R⁻¹)``, later ones rescale it (the solves grow
        like the square of the nodes: 14 s at 128², docs/uncertainty.md)."""
        factor = self.weight * (1.0 if self.scale is None else self.scale**2)
        if cache is not None and self.mass_weight in cache:
            return cache[self.mass_weight] / factor
        out = self._inverse_diagonal(block_size)
        if cache is not None:
            cache[self.mass_weight] = out * factor
        return out

    def _inverse_diagonal(self, block_size: int) -> np.ndarray:
        n = self.mat.getSize()[0]
        start, end = self.mat.getOwnershipRange()
        out = np.empty(end - start)
        for j0 in range(0, n, block_size):
            m = min(block_size, n - j0)
            B = PETSc.Mat().createDense(((end - start, n), (PETSc.DECIDE, m)), comm=self.comm)
            B.setUp()
            rows = np.arange(max(start, j0), min(end, j0 + m), dtype=np.int32)
            for r in rows:
                B.setValue(int(r), int(r - j0), 1.0)
            B.assemble()
            X = B.duplicate()
            try:
                self.ksp.matSolve(B, X)
                local = X.getDenseArray(readonly=True)
                out[rows - start] = local[rows - start, rows - j0]
            finally:
                B.destroy()
                X.destroy()
        return out

    def destroy(self) -> None:
        self.ksp.destroy()
        self.mat.destroy()


# -- the low-rank posterior -------------------------------------------------------------------

@dataclass
class LowRankPosterior:
    """``H v = λ P v`` truncated: ``eigenvalues`` (decreasing, the same on every rank), this rank's
    rows of the ``P``-orthonormal ``vectors`` and ``diag(P⁻¹)`` (owned entries)."""

    eigenvalues: np.ndarray
    vectors: np.ndarray
    prior_inverse_diagonal: np.ndarray
    hessian_products: int
    times: dict

    def variance(self, beta: float = 1.0) -> np.ndarray:
        """Owned entries of ``diag((H + β P)⁻¹) ≈ (diag(P⁻¹) − Σ λ/(λ+β) v²) / β``."""
        factors = self.eigenvalues / (self.eigenvalues + beta)
        reduction = (self.vectors**2) @ factors
        return np.maximum(self.prior_inverse_diagonal - reduction, 0.0) / beta


def _start_vectors(model, n_vectors: int, seed: int, n_owned: int) -> np.ndarray:
    """``n_owned x n_vectors`` standard normal start vectors drawn in file order (the image, or
    the mesh's node order) with ``seed``: the same global vectors on any partition."""
    shape = tuple(model.domain.value_shape)
    rng = np.random.default_rng(seed)
    scratch = np.empty(model.E.x.array.size)
    out = np.empty((n_owned, n_vectors))
    for j in range(n_vectors):
        model.from_values(rng.standard_normal(shape), scratch)
        out[:, j] = scratch[:n_owned]
    return out


def low_rank_posterior(apply_H, prior: PriorPrecision, model, template: PETSc.Vec,
                       settings: UncertaintySettings, cache: dict | None = None
                       ) -> LowRankPosterior:
    """The ``rank`` dominant eigenpairs of ``H v = λ P v`` (double pass) and ``diag(P⁻¹)``.

    ``apply_H(x, y)``: ``y = H x`` on vectors like ``template`` (the model's modulus space).
    Collective.
    """
    n = template.getSize()
    m = min(settings.rank + settings.oversampling, n)
    k = min(settings.rank, m)
    t0 = time.perf_counter()
    omega = _start_vectors(model, m, settings.seed, template.getLocalSize())
    lam, V = double_pass_eigh(apply_H, prior.mult, prior.solve, omega, k, template)
    t1 = time.perf_counter()
    diagonal = prior.inverse_diagonal(settings.block_size, cache)
    t2 = time.perf_counter()
    return LowRankPosterior(lam, V, diagonal, 2 * m,
                            {"eigenpairs": t1 - t0, "prior_diagonal": t2 - t1})


def map_misfit(posterior: LowRankPosterior, c: np.ndarray, tail: float, r2: float,
               beta: float) -> float:
    """The misfit ``‖f − D E_β‖²_{Γ⁻¹}`` of the MAP estimate of the linear model with prior
    ``N(E₀, (β P)⁻¹)``: ``r2 − Σ cᵢ² (λᵢ + 2β)/(λᵢ + β)² − 2 tail / β``.

    ``r2 = ‖f − D E₀‖²_{Γ⁻¹}``, ``c = Vᵀ b`` with ``b = Dᵀ Γ⁻¹ (f − D E₀)``; ``tail = bᵀ P⁻¹ b −
    Σ cᵢ²`` is the part of ``b`` outside the kept eigenvectors, taken with ``λ ≪ β`` there (the
    neglected eigenvalues are small). Increases with ``β``."""
    lam = posterior.eigenvalues
    return float(r2 - np.sum(c**2 * (lam + 2 * beta) / (lam + beta) ** 2)
                 - 2.0 * max(tail, 0.0) / beta)


def matched_prior_weight(posterior: LowRankPosterior, c, tail, r2, target: float
                         ) -> tuple[float, bool]:
    """``β`` with ``map_misfit(β) = target`` (bisection in ``log β``), and whether it was
    reachable: ``β`` is kept at least the smallest kept eigenvalue (where the truncated formula
    holds); below it the returned ``β`` is that bound and the flag ``False``."""
    lam = posterior.eigenvalues
    low, high = max(float(lam[-1]), 1e-300), max(float(lam[0]), 1.0) * 1e8
    if map_misfit(posterior, c, tail, r2, low) >= target:
        return low, False
    if map_misfit(posterior, c, tail, r2, high) <= target:
        return high, False
    for _ in range(200):
        mid = math.sqrt(low * high)
        if map_misfit(posterior, c, tail, r2, mid) < target:
            low = mid
        else:
            high = mid
        if high / low < 1 + 1e-10:
            break
    return math.sqrt(low * high), True


def ml_posterior_std(likelihood, estimate: PETSc.Vec, settings: UncertaintySettings,
                     cache: dict | None = None) -> tuple[PETSc.Vec, dict]:
    """``σ`` of the ML estimate (module docstring: the matched Tikhonov model with ``Γ`` as the
    ML solve left it frozen). Returns the owned values as a new vector and an info dict.
    Collective."""
    t0 = time.perf_counter()
    model = likelihood.model
    nq = model.Q.dofmap.index_map.size_local
    prior = PriorPrecision(model.Q, 1.0, settings.mass_weight)
    E0, b, work = likelihood.create_vector(), likelihood.create_vector(), likelihood.create_vector()
    try:
        E0.array[:] = likelihood.gamma.E.x.array[:nq]  # the modulus Γ is frozen at
        posterior = low_rank_posterior(likelihood.hessian_mult, prior, model, E0, settings,
                                       cache)
        r2 = 2.0 * likelihood.gradient(E0, b)
        b.scale(-1.0)  # b = Dᵀ Γ⁻¹ (f − D E₀)
        c = gram(likelihood.comm, posterior.vectors, b.array_r)
        prior.solve(b, work)
        tail = b.dot(work) - float(np.sum(c**2))
        target = likelihood.misfit(estimate)
        beta, reached = matched_prior_weight(posterior, c, tail, r2, target)
        std = likelihood.create_vector()
        std.array[:] = np.sqrt(posterior.variance(beta))
    finally:
        for obj in (prior, E0, b, work):
            obj.destroy()
    lam = posterior.eigenvalues
    info = {"uncertainty_rank": int(lam.size), "uncertainty_prior_weight": beta,
            "uncertainty_prior_weight_matched": reached,
            "uncertainty_target_misfit": target,
            "uncertainty_smallest_eigenvalue": float(lam[-1] / beta),
            "uncertainty_hessian_products": posterior.hessian_products,
            "uncertainty_eigen_time": posterior.times["eigenpairs"],
            "uncertainty_time": time.perf_counter() - t0}
    return std, info


def _tikhonov_noise_variance(weights, counts, sigma) -> float:
    """``s² = Σ w_c n_c σ_c² / Σ n_c``: the noise variance that turns GN's functional into a
    negative log-posterior."""
    weights, counts, sigma = (np.asarray(v, dtype=float) for v in (weights, counts, sigma))
    return float(np.sum(weights * counts * sigma**2) / np.sum(counts))


def gn_posterior_std(model, displacement, noise_std, estimate, alpha: float,
                     gn_settings, settings: UncertaintySettings, cache: dict | None = None
                     ) -> tuple[np.ndarray, dict]:
    """``σ_E`` of a gn-tikhonov estimate (module docstring): the Gauss-Newton posterior in
    ``m = log E`` at ``estimate`` (file order: an image on grids) with the prior
    ``diag(E) (α/s²) R_γ diag(E)``, ``σ_E = E σ_m``. Returns the owned values and an info dict.
    Uses the model in place (its modulus becomes the estimate). Collective."""
    from .gauss_newton import GaussNewtonInversion, expand_component_weights

    if not (alpha is not None and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"the uncertainty map of gn-tikhonov needs a positive alpha (its "
                         f"prior weight), got {alpha!r}")
    t0 = time.perf_counter()
    n_components = model.V.dofmap.index_map_bs
    sigma = np.broadcast_to(np.asarray(noise_std, dtype=float).ravel(), (n_components,))
    # the misfit Hessian with the noise weights Σn⁻¹: Jᵀ Σn⁻¹ J
    weighted = replace(gn_settings, component_weights=tuple(1.0 / sigma**2), alpha=float(alpha))
    inversion = GaussNewtonInversion(model, displacement, None, weighted)
    prior = None
    try:
        s2 = _tikhonov_noise_variance(
            expand_component_weights(gn_settings.component_weights, n_components),
            inversion.free_counts, sigma)
        inversion.set_modulus_values(estimate, "gn-tikhonov estimate")  # file order
        inversion.objective()
        H = inversion.hessian()
        inversion.alpha = 0.0  # the data part only: Jᵀ Σn⁻¹ J in m = log E
        E = np.exp(inversion.parameter())
        prior = PriorPrecision(model.Q, alpha / s2, settings.mass_weight, scale=E)
        template = inversion.gradient_vec
        posterior = low_rank_posterior(H.mult, prior, model, template, settings, cache)
        std = E * np.sqrt(posterior.variance(1.0))
    finally:
        inversion.destroy()
        if prior is not None:
            prior.destroy()
    lam = posterior.eigenvalues
    info = {"uncertainty_rank": int(lam.size), "uncertainty_prior_weight": alpha / s2,
            "uncertainty_smallest_eigenvalue": float(lam[-1]),
            "uncertainty_hessian_products": posterior.hessian_products,
            "uncertainty_eigen_time": posterior.times["eigenpairs"],
            "uncertainty_time": time.perf_counter() - t0}
    return std, info


def coverage(truth, estimate, std, factor: float = 2.0, valid=None) -> float:
    """Share of nodes (pixels; those of ``valid`` only when given) with
    ``|truth − estimate| ≤ factor · σ``."""
    truth, estimate, std = (np.asarray(v, dtype=float) for v in (truth, estimate, std))
    inside = np.abs(truth - estimate) <= factor * std
    return float(np.mean(inside if valid is None else inside[np.asarray(valid, dtype=bool)]))


def _warn_unmatched(index: int, info: dict, extra: dict, std: np.ndarray) -> None:
    """One line saying why an ml map whose prior weight ``β`` could not be matched
    (:func:`matched_prior_weight`) is not meaningful, and what to do. ``β`` then sits at a bound:
    at the smallest kept eigenvalue (the estimate fits the data more closely than the kept
    eigenpairs reach: ``σ`` understated) or far above it (it fits no better than the uniform
    start, e.g. stopped at step 0: ``σ`` near zero)."""
    steps = info.get("steps")
    if extra["uncertainty_smallest_eigenvalue"] >= 1.0:  # β at the smallest kept eigenvalue
        why = (f"the ML estimate fits the data more closely than the {extra['uncertainty_rank']}"
               " kept eigenpairs can represent")
        what = "raise --uncertainty-rank"
    else:
        why = ("the ML estimate fits the data no better than its uniform start"
               + (" (it stopped at step 0)" if steps == 0 else ""))
        what = "check the data's noise level (import --noise-std)"
    warnings.warn(f"the ml uncertainty map (std) of sample {index} is not meaningful: no prior "
                  f"weight matches its misfit because {why}, so std (largest "
                  f"{float(np.max(std)):.3g}) is only a bound; {what} or use --method "
                  "gn-tikhonov --uncertainty", UserWarning, stacklevel=3)


class UncertaintyRunner:
    """A method's runner (:mod:`fenics_red.methods`) that also returns the ``σ`` map.

    :meth:`run_with_std` returns ``(estimate, history, info, std)`` (``std`` in the estimate's
    layout, on every rank; ``info`` gains the ``uncertainty_*`` entries); :meth:`run` keeps the
    runner contract. :attr:`settings` adds ``"uncertainty"`` to the method's settings, so that
    outputs with and without the map are told apart (and not resumed into each other).
    """

    def __init__(self, method: str, runner, settings: UncertaintySettings):
        if method not in SUPPORTED_METHODS:
            raise ValueError(f"--uncertainty is available for {' and '.join(SUPPORTED_METHODS)},"
                             f" not {method!r}")
        self.method, self.runner, self.uncertainty = method, runner, settings
        self.options = runner.options
        self._prior_diagonal: dict = {}  # diag(R⁻¹) of this runner's mesh, after its first map

    @property
    def settings(self) -> dict:
        return {**self.runner.settings, "uncertainty": self.uncertainty.to_dict()}

    def check_data(self, data_settings) -> list[str]:
        check = getattr(self.runner, "check_data", None)
        return [] if check is None else check(data_settings)

    def run(self, sample):
        estimate, history, info, _ = self.run_with_std(sample)
        return estimate, history, info

    def run_with_std(self, sample):
        from .measurements import Measurement

        estimate, history, info = self.runner.run(sample)
        info = dict(info)
        if self.method == "ml":
            likelihood = self.runner.reconstructor.likelihood
            E = likelihood.from_values(estimate)
            try:
                std_vec, extra = ml_posterior_std(likelihood, E, self.uncertainty,
                                                  self._prior_diagonal)
                std = likelihood.to_values(std_vec)
                std_vec.destroy()
            finally:
                E.destroy()
            if not extra["uncertainty_prior_weight_matched"] and likelihood.comm.rank == 0:
                _warn_unmatched(sample.index, info, extra, std)
        else:
            m = Measurement.from_sample(sample)
            model = self.runner.model
            owned, extra = gn_posterior_std(model, m.displacement, m.noise_std, estimate,
                                            info.get("alpha"), self.runner.gn_settings,
                                            self.uncertainty, self._prior_diagonal)
            std = model.to_values(owned)
        info.update(extra)
        return estimate, history, info, std

    def destroy(self) -> None:
        self.runner.destroy()
