"""The statistical data term of elastography: noise model, ``Γ(E)`` and the likelihood (eqs. 2-9).

Measured displacements ``u_m = u + n`` (``n ~ N(0, Σn)``) and noisy forces (``w ~ N(0, Σw)``) give
the statistical linear model (paper, equations 3-5)::

    f = D(u_m) E + w̃,    w̃ ~ N(0, Γ),    Γ = Σw + K(E) Σn K(E)ᵀ,

whose negative log-likelihood is (equation 6 without the prior)::

    J(E) = ½ ‖f − D(u_m) E‖²_{Γ⁻¹} + ½ log|Γ|        (+ n/2 log 2π),

with data term ``g(E) = ½ ‖f − D(u_m) E‖²_{Γ⁻¹}`` (equation 8) and, for ``Γ`` frozen, gradient
``∇g(E) = −D(u_m)ᵀ Γ⁻¹ (f − D(u_m) E)`` (equation 9).

Only the rows of *free* displacement dofs take part: Dirichlet dofs carry unknown reaction forces
(and noise-free, prescribed displacements). In this module every vector on the displacement space
has full length; ``D(u_m)``, ``f`` and the residual have zero Dirichlet rows, ``K`` is assembled as
``diag(K_ff, I)`` and ``Σn``/``Σw`` are 1/0 on Dirichlet rows, so that ``Γ = diag(Γ_ff, I)``, every
``Γ⁻¹ r`` vanishes on Dirichlet rows and ``log|Γ| = log|Γ_ff|``.

Linear algebra: ``Γ ≈ K Σn K`` is as ill-conditioned as
``K²``, so ``Γ`` is never formed for solves. It is a matrix-free PETSc ``MatShell``; ``Γ⁻¹ r`` is a
PETSc KSP whose preconditioner ``P⁻¹ = K⁻¹ Σn⁻¹ K⁻¹`` uses ONE factorisation (MUMPS Cholesky by
default) of ``K(E)`` for as long as ``Γ`` is frozen. With ``Σw = 0`` that preconditioner *is*
``Γ⁻¹`` (two back-substitutions, KSP type ``preonly``); with ``Σw ≠ 0`` the KSP is CG on the shell,
preconditioned where ``K`` is factorised by a factorisation of the explicit sparse ``Γ`` (below),
which ``K⁻¹ Σn⁻¹ K⁻¹`` cannot replace: it leaves ``Σw`` out, and CG then needs hundreds of
iterations (:attr:`LikelihoodSettings.gamma_pc`).
Large 3-D problems replace the factorisation by CG + GAMG with the rigid-body near-nullspace
(:attr:`LikelihoodSettings.k_solver`), set up once per refresh; its solves to a relative tolerance
of 1e-12 are tighter than CG on ``Γ`` would be, so ``Σw = 0`` still applies ``P⁻¹`` directly.

Log-determinant (only reported: the fixed-point scheme freezes ``Γ``, so ``log|Γ|`` is never
differentiated):

* ``Σw = 0``: ``log|Γ_ff| = 2 log|det K_ff| + Σ_free log σ²`` with ``det K_ff`` from the MUMPS
  factorisation that the solves use anyway (``ICNTL(33)``; ``RINFOG(12)·2^INFOG(34)``): exact and
  free at every size where a factorisation is affordable.
* ``Σw ≠ 0``: ``Γ = K Σn K + Σw`` is formed as a sparse matrix (``K`` times a scaled ``K``, a
  two-ring stencil, 2.7 times the nonzeros of ``K`` in 2-D) and factorised by MUMPS, the solves'
  preconditioner: exact, affordable where ``K``'s factorisation is.
* Large problems or an iterative ``K`` solver (GAMG): ``logdet()`` returns ``nan`` and the history
  reports the data term only; a stochastic Lanczos quadrature estimate (Hutchinson probes with
  Lanczos on ``log``, using the same ``Γ`` shell) would be the way to add it.

PETSc options: the ``Γ`` KSP uses the prefix ``fenics_red_gamma_`` and the ``K`` solver
``fenics_red_gamma_k_``; command-line options with these prefixes override the defaults here, and
:attr:`LikelihoodSettings.petsc_options` / :attr:`LikelihoodSettings.k_petsc_options` override both
(:func:`fenics_red.petsc_options.set_options`).

Dimensions: nothing here depends on the mesh being 2-D. ``Σn`` has one standard deviation per
displacement component (the block size of the displacement space, the mesh's geometric
dimension), and a dof's component is its index modulo that block size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np

from dolfinx import fem

from . import validation
from .forward import _SOLVER_OPTIONS, AUTO_FACTOR_MAX_DOFS, MUMPS_WORKSPACE, ElasticityModel
from .linalg import power_iteration
from .measurements import noise_std_from_energy, set_displacement
from .petsc_options import set_mumps_options, set_options
from .raster import validate_image

__all__ = ["NoiseModel", "LikelihoodSettings", "Gamma", "StatisticalLikelihood",
           "best_uniform_modulus", "AUTO_CHOLESKY_MAX_DOFS",
           "AUTO_GAMMA_FACTOR_MAX_DOFS_3D"]

#: Options prefix of the ``Γ`` KSP and of the ``K(E)`` solver inside its preconditioner.
GAMMA_PREFIX = "fenics_red_gamma_"
K_PREFIX = "fenics_red_gamma_k_"

_K_DEFAULTS = {"ksp_type": "preonly", "pc_type": "cholesky", "pc_factor_mat_solver_type": "mumps",
               **MUMPS_WORKSPACE}
#: Defaults of the ``K`` solver per :attr:`LikelihoodSettings.k_solver`; ``"gamg"`` is the
#: forward model's (CG, relative tolerance 1e-12, rigid-body near-nullspace).
_K_OPTIONS = {"cholesky": _K_DEFAULTS, "gamg": _SOLVER_OPTIONS["gamg"]}
_K_SOLVERS = ("auto", *_K_OPTIONS)
_GAMMA_PCS = ("auto", "gamma", "k")

#: ``k_solver="auto"``: the largest 3-D problem (global displacement dofs) whose ``K`` is
#: factorised by MUMPS Cholesky. Far above the forward model's threshold: one factorisation
#: serves every ``Γ`` solve while ``Γ`` is frozen (a round has hundreds of gradient steps), and a
#: back-substitution costs 1/15 to 1/25 of a GAMG solve. Factorisation / one back-substitution
#: on tetrahedral unit cubes (nu = 0.495, 1 rank, OpenBLAS, one thread): 2.8 / 0.17 s at 24^3
#: cells (47k dofs, 0.3 GB), 12 / 0.57 s at 32^3 (108k, 1.1 GB), 32 / 0.87 s at 40^3 (207k,
#: 2.4 GB), 56 / 1.4 s at 44^3 (273k, 3.8 GB; 47 / 0.8 s on 2 ranks); a GAMG solve of ``K`` takes
#: 10 s at 108k. Time (~ N^2) and memory (~ N^(4/3)) set the limit: extrapolated, about 75 s and
#: 4.5 GB at 300k dofs. (With the reference BLAS the factorisation took 10 times longer: 148 s
#: at 32^3.) The same limit as any solver of many solves per ``K``
#: (:data:`fenics_red.forward.AUTO_FACTOR_MAX_DOFS`).
AUTO_CHOLESKY_MAX_DOFS = AUTO_FACTOR_MAX_DOFS

#: ``gamma_pc="auto"`` under force noise: the largest 3-D problem (global displacement dofs) whose
#: explicit ``Γ`` is factorised. Its two-ring stencil fills far more in 3-D than in 2-D: at 24^3
#: cells (47k dofs, 1 rank, plain P1) 2.0 GB peak against 0.3 GB for ``K``'s factorisation, and a
#: refresh 3-6 times ``K``'s. CG with ``K⁻¹ Σn⁻¹ K⁻¹`` needs no memory but hundreds of
#: iterations (``benchmarks/force_noise.py``: 134 per solve at 16^3 with σw 3 % of the largest
#: nodal load, 976 at 12^3 with 30 %); above this size it is the only choice.
AUTO_GAMMA_FACTOR_MAX_DOFS_3D = 50_000


@dataclass(frozen=True)
class NoiseModel:
    """Diagonal noise covariances of the measurement (paper, equations 2-5).

    Attributes:
        sigma: one standard deviation of the displacement noise ``n`` per displacement component
            (as many as the mesh's geometric dimension): ``(σx, σy)`` in 2-D (lateral, axial),
            ``(σx, σy, σz)`` in 3-D; ``Σn = diag(σx², σy², σx², ...)`` on the free dofs.
        force_std: standard deviation ``σw`` of the force noise ``w``: ``Σw = σw² I`` on the free
            dofs (0, the default, gives the exact two-back-substitution ``Γ⁻¹``).
    """

    sigma: tuple[float, ...]
    force_std: float = 0.0

    def __post_init__(self):
        sigma = validation.per_component(
            self.sigma, "NoiseModel.sigma", (2, 3), what="finite and strictly positive",
            shape_hint="one standard deviation per displacement component: a pair "
                       "(sigma_x, sigma_y) in 2-D, a triple (sigma_x, sigma_y, sigma_z) in 3-D")
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "force_std", validation.non_negative(
            self.force_std, "NoiseModel.force_std", what="finite and non-negative"))

    @property
    def n_components(self) -> int:
        """Number of displacement components (2 or 3)."""
        return len(self.sigma)

    @classmethod
    def from_snr(cls, sum_u2: float, counts, snr_db: float, ratio: float = 1.0,
                 force_std: float = 0.0, noisy: bool = True) -> NoiseModel:
        """The noise of a target SNR, ``SNR = 10 log10(‖u‖² / ‖n‖²)`` over the free dofs.

        Args:
            sum_u2: ``‖u‖²`` over the free dofs (of the noisy ``u_m`` when ``noisy``: then
                ``E‖u_m‖² = ‖u‖² (1 + 10^(−SNR/10))`` is corrected for).
            counts: numbers of free dofs per component (``(N_x, N_y)`` or ``(N_x, N_y, N_z)``);
                the last component is the axial one.
            snr_db: the SNR in dB.
            ratio: ``σ_lateral / σ_axial`` (lateral-to-axial noise ratio).

        See :func:`fenics_red.measurements.noise_std_from_energy`.
        """
        return cls(noise_std_from_energy(sum_u2, counts, snr_db, ratio, noisy), force_std)

    def to_dict(self) -> dict:
        return {"sigma": list(self.sigma), "force_std": self.force_std}


@dataclass(frozen=True)
class LikelihoodSettings:
    """Linear-algebra settings of ``Γ⁻¹`` (they change round-off, not the estimator).

    Attributes:
        gamma_rtol: relative tolerance of CG on ``Γ`` (used only when ``Σw ≠ 0``).
        gamma_max_it: iteration limit of CG on ``Γ``.
        logdet: ask the ``K`` factorisation for its determinant (MUMPS ``ICNTL(33)``), so that
            :meth:`StatisticalLikelihood.logdet` is exact; negligible cost.
        k_solver: the ``K(E)`` solver: ``"auto"`` (default: MUMPS Cholesky in 2-D and for 3-D
            problems up to :data:`AUTO_CHOLESKY_MAX_DOFS` displacement dofs, GAMG above),
            ``"cholesky"`` or ``"gamg"`` (CG to a relative tolerance of 1e-12, smoothed
            aggregation with the rigid-body near-nullspace: ``Γ⁻¹`` to about that tolerance, no
            log-determinant). :attr:`Gamma.k_solver` tells which one is used.
        petsc_options: options of the ``Γ`` KSP (without the ``fenics_red_gamma_`` prefix).
        k_petsc_options: options of the ``K(E)`` solver (without the ``fenics_red_gamma_k_``
            prefix), over the defaults of ``k_solver``. With an iterative ``K`` solver the
            log-determinant is unavailable, and ``Γ`` is solved by CG on the shell unless the
            ``K`` solves are at least as tight as ``gamma_rtol`` (then, with ``Σw = 0``, by the
            two ``K`` solves of the preconditioner alone).
        gamma_pc: the preconditioner of CG on ``Γ`` when ``Σw ≠ 0``: ``"gamma"`` factorises the
            explicit sparse ``Γ = K Σn K + Σw`` at every refresh (MUMPS Cholesky, about 3 times
            the factorisation of ``K``; CG then converges in one or two iterations), ``"k"``
            applies ``K⁻¹ Σn⁻¹ K⁻¹`` from the factorisation of ``K`` (no extra memory, but ``Σw``
            is what it leaves out: 160 CG iterations per solve at 64² with ``σw`` 3 % of the
            largest nodal load, more than 1000 at 30 %: ``benchmarks/force_noise.py``);
            ``"auto"`` (default): ``"gamma"`` where ``K`` is factorised,
            ``"k"`` with an iterative ``K`` solver and in 3-D above
            :data:`AUTO_GAMMA_FACTOR_MAX_DOFS_3D` dofs (memory). Unused when ``Σw = 0``.
    """

    gamma_rtol: float = 1e-10
    gamma_max_it: int = 1000
    logdet: bool = True
    k_solver: str = "auto"
    gamma_pc: str = "auto"
    petsc_options: Mapping[str, object] = field(default_factory=dict)
    k_petsc_options: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        validation.positive(self.gamma_rtol, "LikelihoodSettings.gamma_rtol")
        if self.k_solver not in _K_SOLVERS:
            raise ValueError(f"LikelihoodSettings.k_solver must be one of {list(_K_SOLVERS)}, "
                             f"got {self.k_solver!r}")
        validation.integer(self.gamma_max_it, "LikelihoodSettings.gamma_max_it", low=1)
        if self.gamma_pc not in _GAMMA_PCS:
            raise ValueError(f"LikelihoodSettings.gamma_pc must be one of {list(_GAMMA_PCS)}, "
                             f"got {self.gamma_pc!r}")
        for name in ("petsc_options", "k_petsc_options"):
            validation.mapping(getattr(self, name), f"LikelihoodSettings.{name}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["petsc_options"] = {k: str(v) for k, v in self.petsc_options.items()}
        out["k_petsc_options"] = {k: str(v) for k, v in self.k_petsc_options.items()}
        return out

    @classmethod
    def from_dict(cls, values: Mapping) -> LikelihoodSettings:
        return cls(**dict(values))

    def resolve_k_solver(self, dim: int, n_dofs: int) -> str:
        """``"cholesky"`` or ``"gamg"``: the ``K`` solver for a mesh of dimension ``dim`` with
        ``n_dofs`` global displacement dofs (``"auto"``: GAMG only in 3-D above
        :data:`AUTO_CHOLESKY_MAX_DOFS`)."""
        if self.k_solver != "auto":
            return self.k_solver
        return "gamg" if dim == 3 and n_dofs > AUTO_CHOLESKY_MAX_DOFS else "cholesky"


class Gamma:
    """``Γ(E) = Σw + K(E) Σn K(E)ᵀ`` on the free dofs (paper, equation 5), frozen between refreshes.

    :attr:`mat` is a matrix-free PETSc ``MatShell``; :meth:`solve` applies ``Γ⁻¹`` with the KSP
    :attr:`ksp` (prefix ``fenics_red_gamma_``), preconditioned by ``K⁻¹ Σn⁻¹ K⁻¹`` from one
    factorisation of ``K(E)`` (KSP :attr:`k_ksp`, prefix ``fenics_red_gamma_k_``), refreshed only
    by :meth:`refresh`; with force noise (``Σw ≠ 0``) and a factorised ``K``, by a factorisation
    of the explicit sparse ``Γ`` instead (:attr:`LikelihoodSettings.gamma_pc`). All objects are
    allocated once; :meth:`refresh` reassembles in place.

    Args:
        model: the forward model; its ``E`` and its ``K`` matrix are used as scratch by
            :meth:`refresh` (``Γ`` keeps its own copy of ``K``, so later use of the model does not
            change a frozen ``Γ``).
        noise: the noise covariances.
        settings: solver settings; kept as :attr:`settings` with ``k_solver="auto"`` resolved.
    """

    def __init__(self, model: ElasticityModel, noise: NoiseModel,
                 settings: LikelihoodSettings | None = None):
        self.model = model
        self.comm = model.comm
        self.settings = settings = settings or LikelihoodSettings()
        self.K = model.assemble_K(apply_bcs=True).copy()
        self.free = self.K.createVecLeft()
        self.free.array[:] = model.free_dofs.astype(float)
        self.n_free = int(self.comm.allreduce(int(model.free_dofs.sum()), op=MPI.SUM))
        self.sigma2 = self.free.duplicate()       # Σn (1 on Dirichlet rows)
        self.sigma2_inv = self.free.duplicate()   # Σn⁻¹
        self.force2 = self.free.duplicate()       # Σw (0 on Dirichlet rows)
        self._t1, self._t2, self._t3 = (self.free.duplicate() for _ in range(3))
        self.E = fem.Function(model.Q)            # the modulus Γ is frozen at
        self.n_components = model.V.dofmap.index_map_bs  # the mesh's geometric dimension
        # displacement component of each owned dof (dofs are blocked: x, y[, z] per node)
        self._component = np.arange(self.free.getLocalSize()) % self.n_components

        self.mat = PETSc.Mat().createPython(self.K.getSizes(), _GammaShell(self), comm=self.comm)
        self.mat.setUp()

        #: the ``K`` solver's defaults in use, ``"cholesky"`` or ``"gamg"`` (``"auto"`` resolved)
        self.k_solver = settings.resolve_k_solver(model.dim, model.n_dofs)
        self.settings = settings = replace(settings, k_solver=self.k_solver)
        self.k_ksp = PETSc.KSP().create(self.comm)
        self.k_ksp.setOperators(self.K)
        set_options(self.k_ksp, K_PREFIX, _K_OPTIONS[self.k_solver], settings.k_petsc_options)
        if self.k_ksp.getPC().getType() == "gamg":  # before the first refresh sets the PC up
            self.K.setNearNullSpace(model.rigid_body_modes())
        self.exact_factor = (self.k_ksp.getType() == "preonly"
                             and self.k_ksp.getPC().getType() in ("lu", "cholesky"))
        # K solves at least as tight as CG on Γ would be: Γ⁻¹ = K⁻¹ Σn⁻¹ K⁻¹ directly (Σw = 0)
        self.tight_K = self.exact_factor or (
            self.k_ksp.getType() != "preonly"
            and self.k_ksp.getTolerances()[0] <= settings.gamma_rtol)
        self._mumps = None
        if self.exact_factor and self.k_ksp.getPC().getFactorSolverType() == "mumps":
            pc = self.k_ksp.getPC()
            if settings.logdet:
                self._mumps = _mumps_with_determinant(pc)
            else:
                pc.setFactorSetUpSolverType()
                self._mumps = pc.getFactorMatrix()
        #: the explicit sparse ``Γ`` and the ``K`` copy scaled by ``Σn`` it is formed from,
        #: allocated at the first refresh that needs them (force noise with ``gamma_pc="gamma"``)
        self.G = self._scaled_K = None
        self._k_factored = self._frozen = self._gamma_pending = False
        self.ksp = PETSc.KSP().create(self.comm)
        self.ksp.setOperators(self.mat)
        self.set_noise(noise)
        self._logdet_K = math.nan

    # -- noise -------------------------------------------------------------------------------------

    def set_noise(self, noise: NoiseModel) -> None:
        """Set ``Σn`` and ``Σw`` (the factorisation of ``K`` is kept). Collective."""
        if not isinstance(noise, NoiseModel):
            raise TypeError(f"noise must be a NoiseModel, got {type(noise).__name__}")
        if noise.n_components != self.n_components:
            raise ValueError(f"the NoiseModel has {noise.n_components} standard deviations "
                             f"{noise.sigma}; the displacement has {self.n_components} "
                             "components (one standard deviation per component)")
        self.noise = noise
        free = self.free.array_r.astype(bool)
        s2 = np.array([s**2 for s in noise.sigma])
        self.sigma2.array[:] = np.where(free, s2[self._component], 1.0)
        self.sigma2_inv.array[:] = 1.0 / self.sigma2.array_r
        self.force2.array[:] = np.where(free, noise.force_std**2, 0.0)
        exact = noise.force_std == 0.0 and self.tight_K
        #: ``"gamma"``: CG on ``Γ`` preconditioned by the factorisation of the explicit ``Γ``
        #: (force noise, ``K`` factorised); ``"k"``: by ``K⁻¹ Σn⁻¹ K⁻¹`` (or that alone)
        self.gamma_pc = "k"
        if noise.force_std > 0.0 and self.settings.gamma_pc == "gamma":
            self.gamma_pc = "gamma"
        elif noise.force_std > 0.0 and self.settings.gamma_pc == "auto":
            small = self.model.dim == 2 or self.model.n_dofs <= AUTO_GAMMA_FACTOR_MAX_DOFS_3D
            self.gamma_pc = "gamma" if self.exact_factor and small else "k"
        if exact:
            defaults = {"ksp_type": "preonly"}
        else:
            defaults = {"ksp_type": "cg", "ksp_rtol": self.settings.gamma_rtol,
                        "ksp_atol": 0.0, "ksp_max_it": self.settings.gamma_max_it}
        if self.gamma_pc == "gamma":
            defaults.update(pc_type="cholesky", pc_factor_mat_solver_type="mumps")
        self.ksp.getPC().setType(PETSc.PC.Type.NONE)  # drop a previous noise model's PC
        set_options(self.ksp, GAMMA_PREFIX, defaults, self.settings.petsc_options)
        if self.gamma_pc == "k":
            self.ksp.getPC().setType(PETSc.PC.Type.PYTHON)
            self.ksp.getPC().setPythonContext(_GammaPreconditioner(self))
        #: ``Γ⁻¹ = K⁻¹ Σn⁻¹ K⁻¹`` applied directly: exact with a factorisation of ``K``, to the
        #: ``K`` solver's tolerance with an iterative one
        self.exact = exact and self.ksp.getType() == "preonly"
        # log Σ_free log σ², for the log-determinant
        counts = np.array([np.sum(free & (self._component == c))
                           for c in range(self.n_components)], dtype=float)
        counts = self.comm.allreduce(counts, op=MPI.SUM)
        self._counts = counts.astype(int)
        self._logdet_sigma = float(sum(counts[c] * math.log(s2[c])
                                       for c in range(self.n_components)))
        self._logdet_gamma = None
        # Γ's factorisation (if any) belongs to the old noise; one put off is made at first use
        if self._frozen and not (self._gamma_pending and self.gamma_pc == "gamma"):
            self._factorise()

    @property
    def free_counts(self) -> tuple[int, ...]:
        """Numbers of free dofs of each displacement component (global): ``(N_x, N_y[, N_z])``."""
        return tuple(int(c) for c in self._counts)

    # -- state -------------------------------------------------------------------------------------

    def refresh(self, E: PETSc.Vec, gamma: bool = True) -> None:
        """Freeze ``Γ`` at the modulus ``E`` (nodal values, a vector of the modulus space).

        Assembles ``K(E)`` and factorises it once (numeric factorisation; the symbolic analysis
        is kept from the first call). Collective. Raises ``ValueError`` for a non-positive ``E``.
        ``gamma=False``: for ``K⁻¹`` alone (:meth:`apply_K_inverse`); a factorisation of the
        explicit ``Γ`` (``gamma_pc="gamma"``) is then made at its first use, if any.
        """
        model = self.model
        n = model.Q.dofmap.index_map.size_local
        model.E.x.array[:n] = E.array_r
        model.E.x.scatter_forward()
        model.check_modulus()
        model.modulus_changed()
        model.assemble_K(apply_bcs=True).copy(self.K, PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
        self.E.x.array[:] = model.E.x.array
        self._k_factored = False
        self._frozen = True
        self._factorise(gamma)

    def _factorise(self, gamma: bool = True) -> None:
        """The one factorisation while ``Γ`` is frozen: of ``K``, or of the explicit ``Γ``
        (``gamma=False``: of ``K`` now, and of ``Γ`` at its first use)."""
        self._logdet_K, self._logdet_gamma = math.nan, None
        explicit = self.gamma_pc == "gamma"
        self._gamma_pending = explicit and not gamma
        if explicit and gamma:
            self._factorise_gamma()
        else:
            self._factorise_K()

    def _factorise_gamma(self) -> None:
        """Factorise the explicit ``Γ`` (MUMPS; its log-determinant with it)."""
        self._gamma_pending = False
        self._form_explicit()
        self.ksp.setOperators(self.mat, self.G)
        pc = self.ksp.getPC()
        set_mumps_options(self.ksp, MUMPS_WORKSPACE)  # the factor exists once G is set
        mumps = (self.settings.logdet and pc.getType() in ("lu", "cholesky")
                 and pc.getFactorSolverType() == "mumps")
        if mumps:
            _mumps_with_determinant(pc)
        pc.setUp()
        self._check_reason(self.ksp, "factorisation of Γ(E)", setup=True)
        if mumps:
            self._logdet_gamma = _mumps_logdet(pc.getFactorMatrix())

    def _factorise_K(self) -> None:
        self.k_ksp.getPC().setUp()
        self._check_reason(self.k_ksp, "factorisation of K(E)", setup=True)
        self._k_factored = True
        if self._mumps is not None and self.settings.logdet:
            self._logdet_K = _mumps_logdet(self._mumps)

    def _form_explicit(self) -> None:
        """``G = K Σn K + Σw`` as a sparse matrix (a two-ring stencil; ``diag(Γ_ff, I)``)."""
        if self.G is None:
            self._scaled_K = self.K.copy()
        else:
            self.K.copy(self._scaled_K, PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
        self._scaled_K.diagonalScale(L=self.sigma2)
        self.G = self.K.matMult(self._scaled_K, result=self.G)
        self.G.setDiagonal(self.force2, addv=PETSc.InsertMode.ADD_VALUES)

    def _require_frozen(self, factor: bool = False):
        """``factor``: what follows needs ``Γ``'s factorisation (made now if it was put off)."""
        if not self._frozen:
            raise RuntimeError("Gamma.refresh(E) must be called before Γ is applied or solved")
        if factor and self._gamma_pending:
            self._factorise_gamma()

    def _check_reason(self, ksp, what, setup=False):
        reason = ksp.getPC().getFailedReason() if setup else ksp.getConvergedReason()
        if (not setup and reason == PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT and ksp is self.ksp
                and self.gamma_pc == "k"):
            raise RuntimeError(
                f"{what} did not converge in {ksp.getIterationNumber()} CG iterations: with force "
                "noise, Γ = Σw + K Σn Kᵀ is far from its preconditioner K Σn Kᵀ; use "
                "LikelihoodSettings(gamma_pc='gamma') (a factorisation of Γ), raise "
                "LikelihoodSettings.gamma_max_it (-fenics_red_gamma_ksp_max_it) or check the "
                "force noise of the data set")
        if (setup and reason not in (0, None)) or (not setup and reason < 0):
            raise RuntimeError(f"{what} failed (PETSc reason {reason}); is E positive and "
                               "bounded, and are the solver options right?")

    # -- operators ---------------------------------------------------------------------------------

    def mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = Γ x = Σw x + K Σn K x`` (no inverse; for CG and tests).

        With ``K = diag(K_ff, I)``, ``Σn = 1`` and ``Σw = 0`` on Dirichlet rows this is
        ``diag(Γ_ff, I) x`` without any masking.
        """
        self._require_frozen()
        self.K.mult(x, self._t1)
        self._t1.pointwiseMult(self._t1, self.sigma2)
        self.K.mult(self._t1, y)
        self._t2.pointwiseMult(self.force2, x)
        y.axpy(1.0, self._t2)

    def apply_K_inverse(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = K(E)⁻¹ x`` with the frozen factorisation (one back-substitution). Collective."""
        self._require_frozen()
        if not self._k_factored:  # Γ's factorisation is used instead; K's made on first use
            self._factorise_K()
        self.k_ksp.solve(x, y)
        self._check_reason(self.k_ksp, "K(E) solve")

    def precondition(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = K⁻¹ Σn⁻¹ K⁻¹ x``: ``Γ⁻¹`` exactly when ``Σw = 0`` (two back-substitutions)."""
        self.apply_K_inverse(x, self._t1)
        self._t1.pointwiseMult(self._t1, self.sigma2_inv)
        self.apply_K_inverse(self._t1, y)

    def solve(self, r: PETSc.Vec, out: PETSc.Vec) -> PETSc.Vec:
        """``out = Γ⁻¹ r`` by the KSP (exact two back-substitutions when ``Σw = 0``)."""
        self._require_frozen(factor=True)
        self.ksp.solve(r, out)
        self._check_reason(self.ksp, "Γ solve")
        return out

    def inv_norm2(self, r: PETSc.Vec) -> float:
        """``rᵀ Γ⁻¹ r``; one back-substitution when ``Σw = 0`` (``‖K⁻¹ r‖²_{Σn⁻¹}``)."""
        if self.exact:
            self.apply_K_inverse(r, self._t3)
            self._t1.pointwiseMult(self._t3, self._t3)
            return self._t1.dot(self.sigma2_inv)
        self.solve(r, self._t3)
        return r.dot(self._t3)

    @property
    def iterations(self) -> int:
        """Iterations of the last ``Γ`` solve (1 when exact)."""
        return max(1, self.ksp.getIterationNumber())

    def logdet(self) -> float:
        """``log|Γ_ff|`` at the frozen modulus (module docstring); ``nan`` if unavailable."""
        self._require_frozen(factor=True)
        if self.noise.force_std == 0.0:
            return 2.0 * self._logdet_K + self._logdet_sigma
        if self._logdet_gamma is None:  # no sparse factorisation where K is not factorised
            self._logdet_gamma = (self._explicit_logdet()
                                  if self.settings.logdet and self.exact_factor else math.nan)
        return self._logdet_gamma

    def _explicit_logdet(self) -> float:
        """``log|K Σn K + Σw|`` from a separate MUMPS factorisation of the explicit sparse ``Γ``
        (``gamma_pc="k"``; with ``"gamma"`` the solves' factorisation gives it)."""
        self._form_explicit()
        ksp = PETSc.KSP().create(self.comm)
        try:
            ksp.setOperators(self.G)
            ksp.setType("preonly")
            pc = ksp.getPC()
            pc.setType("cholesky")
            pc.setFactorSolverType("mumps")
            _mumps_with_determinant(pc)
            pc.setUp()
            return _mumps_logdet(pc.getFactorMatrix())
        finally:
            ksp.destroy()

    def destroy(self) -> None:
        """Free the PETSc objects (collective)."""
        for obj in (self.ksp, self.k_ksp, self.mat, self.K, self.free, self.sigma2,
                    self.sigma2_inv, self.force2, self._t1, self._t2, self._t3, self.G,
                    self._scaled_K):
            if obj is not None:
                obj.destroy()


def _mumps_with_determinant(pc: PETSc.PC) -> PETSc.Mat:
    """Create the MUMPS factor of ``pc`` (before its set-up) asking for the determinant."""
    pc.setFactorSetUpSolverType()
    F = pc.getFactorMatrix()
    F.setMumpsIcntl(33, 1)
    return F


def _mumps_logdet(F: PETSc.Mat) -> float:
    """``log|det|`` of a MUMPS factorisation made with ``ICNTL(33) = 1`` (``nan`` if not
    positive): ``RINFOG(12)·2^INFOG(34)``."""
    mantissa, exponent = F.getMumpsRinfog(12), F.getMumpsInfog(34)
    return math.log(mantissa) + exponent * math.log(2.0) if mantissa > 0 else math.nan


class _GammaShell:
    """Python context of the ``Γ`` MatShell."""

    def __init__(self, gamma: Gamma):
        self.gamma = gamma

    def mult(self, mat, x, y):
        self.gamma.mult(x, y)


class _GammaPreconditioner:
    """Python context of the ``Γ`` KSP's preconditioner ``K⁻¹ Σn⁻¹ K⁻¹``."""

    def __init__(self, gamma: Gamma):
        self.gamma = gamma

    def apply(self, pc, x, y):
        self.gamma.precondition(x, y)


class StatisticalLikelihood:
    """Data fidelity of the statistical model ``f = D(u_m) E + w̃``, ``w̃ ~ N(0, Γ)`` (eqs. 4-9).

    ``g(E) = ½ ‖f − D(u_m) E‖²_{Γ⁻¹}`` (equation 8), ``∇g(E) = −D(u_m)ᵀ Γ⁻¹ (f − D(u_m) E)``
    (equation 9, ``Γ`` frozen) and ``J(E) = g(E) + ½ log|Γ|`` (equation 6 without the prior), on
    PETSc vectors of the modulus space (create them with :meth:`create_vector`). ``Γ`` is frozen at
    the modulus of the last :meth:`refresh` (the fixed-point scheme of equations 6-7).

    ``D(u_m)`` is assembled once per data set (:meth:`set_data`); matrices, vectors and solvers
    are allocated once, in the constructor, and reused for every data set on the same model.

    Any DOLFINx mesh, 2-D or 3-D: the displacement is given as a function on ``model.V``, a PETSc
    vector of its owned values or its local values (with ghosts); a model on an image grid also
    takes component images, and :meth:`from_image`/:meth:`to_image` convert moduli.

    Args:
        model: the forward model (its mesh, supports, loads and material law).
        displacement: the measured displacement ``u_m`` (see :meth:`set_data`); optional here,
            then :meth:`set_data` must be called before use.
        noise: the noise covariances (required with ``displacement``).
        settings: linear-algebra settings.
    """

    def __init__(self, model: ElasticityModel, displacement=None, noise: NoiseModel | None = None,
                 settings: LikelihoodSettings | None = None):
        self.model = model
        self.comm = model.comm
        self.settings = settings or LikelihoodSettings()
        self.D = model.assemble_D(model.u_data, apply_bcs=True).copy()
        n_components = model.V.dofmap.index_map_bs
        self.gamma = Gamma(model, noise or NoiseModel((1.0,) * n_components), self.settings)
        self.settings = self.gamma.settings  # k_solver="auto" resolved
        self.f = self.D.createVecLeft()
        self.u_m = self.D.createVecLeft()
        self._r, self._s, self._v = self.f.duplicate(), self.f.duplicate(), self.f.duplicate()
        self._n_owned_q = model.Q.dofmap.index_map.size_local
        self._has_data = False
        self.hessian_products = 0  # calls of hessian_mult so far (solvers report their cost)
        if displacement is not None:
            if noise is None:
                raise ValueError("a NoiseModel is needed with the measured displacement")
            self.set_data(displacement, noise)

    # -- data --------------------------------------------------------------------------------------

    @property
    def n_equations(self) -> int:
        """Number of free equations (free displacement dofs): the expected value of
        ``(f − D E)ᵀ Γ⁻¹ (f − D E)`` at the true modulus."""
        return self.gamma.n_free

    @property
    def noise(self) -> NoiseModel:
        return self.gamma.noise

    def set_data(self, displacement, noise: NoiseModel | None = None) -> None:
        """Set the measured displacement ``u_m`` (assembling ``D(u_m)`` once) and the noise.

        ``displacement``: a function on ``model.V``, a PETSc vector of its owned values, its local
        values (owned and ghosts, ``u.x.array``), or (on an image grid) one image per component
        (``(ux, uy)``). Raises ``ValueError`` for wrong shapes or non-finite values (on every
        rank). Collective.
        """
        model = self.model
        u = set_displacement(model, displacement, model.u_data, "measured displacement")
        model.assemble_D(u, apply_bcs=True).copy(self.D, PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
        n = self.u_m.getLocalSize()
        self.u_m.array[:] = u.x.array[:n]
        model.assemble_load().copy(self.f)
        self.f.pointwiseMult(self.f, self.gamma.free)
        if noise is not None:
            self.gamma.set_noise(noise)
        self._has_data = True

    def set_noise(self, noise: NoiseModel) -> None:
        """Change ``Σn``/``Σw`` (the frozen factorisation of ``K`` is kept)."""
        self.gamma.set_noise(noise)

    def noise_from_snr(self, snr_db: float, ratio: float = 1.0, force_std: float = 0.0
                       ) -> NoiseModel:
        """The :class:`NoiseModel` of the current (noisy) ``u_m`` at a given SNR in dB, with
        ``SNR = 10 log10(‖u‖²/‖n‖²)`` over the free dofs and ``σ_lateral = ratio σ_axial`` (the
        axial component is the last one)."""
        return NoiseModel.from_snr(self._free_sum(self.u_m.array_r ** 2), self.gamma.free_counts,
                                   snr_db, ratio, force_std)

    def data_snr_db(self) -> float:
        """The measured data's SNR in dB, ``10 log10(‖u‖² / E‖n‖²)`` over the free dofs, with
        ``‖u‖² ≈ ‖u_m‖² − E‖n‖²`` and ``E‖n‖² = Σ σ²`` of the noise model (``-inf`` when the
        data are no larger than their noise). Collective."""
        free = self.gamma.free.array_r.astype(bool)
        sigma2 = np.divide(1.0, self.gamma.sigma2_inv.array_r, where=free,
                           out=np.zeros(free.shape))
        ratio = self._free_sum(self.u_m.array_r ** 2) / self._free_sum(sigma2) - 1.0
        return 10.0 * math.log10(ratio) if ratio > 0 else -math.inf

    def _free_sum(self, values: np.ndarray) -> float:
        """The global sum of owned per-dof ``values`` over the free dofs (of the measured data:
        raises before :meth:`set_data`). Collective."""
        self._require_data()
        free = self.gamma.free.array_r.astype(bool)
        return self.comm.allreduce(float(np.sum(values[free])), op=MPI.SUM)

    def _require_data(self):
        if not self._has_data:
            raise RuntimeError("no measured displacement: call set_data(displacement, noise)")

    # -- vectors and images ------------------------------------------------------------------------

    def create_vector(self, value: float | None = None) -> PETSc.Vec:
        """A new (non-ghosted) vector of nodal moduli, optionally filled with ``value``."""
        vec = self.D.createVecRight()
        if value is not None:
            vec.set(value)
        return vec

    def to_image(self, E: PETSc.Vec) -> np.ndarray:
        """The image ``(ny+1, nx+1)`` of nodal moduli through the model's raster (exact on grids,
        sampled elsewhere), on every rank. Collective."""
        return self.model.images("Q").to_images(E.array_r)[0]

    def from_image(self, image, out: PETSc.Vec | None = None, name: str = "modulus image"
                   ) -> PETSc.Vec:
        """Nodal values of an image ``(ny+1, nx+1)`` through the model's raster into ``out``
        (new vector by default)."""
        raster = self.model.images("Q")
        image = validate_image(image, raster.grid.shape, name)
        out = out or self.create_vector()
        scratch = np.empty(self.model.E.x.array.size)
        raster.from_images(image, scratch)
        out.array[:] = scratch[: self._n_owned_q]
        return out

    def to_values(self, E: PETSc.Vec) -> np.ndarray:
        """Nodal moduli in file order (an image on grids, one value per node otherwise), on every
        rank. Exact. Collective."""
        return self.model.to_values(E.array_r)

    def from_values(self, values, out: PETSc.Vec | None = None, name: str = "modulus"
                    ) -> PETSc.Vec:
        """Nodal moduli in file order (:meth:`to_values`' layout) into ``out`` (new vector by
        default). Raises ``ValueError`` for a wrong shape or non-finite values."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim >= 2 and self.model.grid is not None:
            values = validate_image(values, self.model.grid.shape, name)
        elif not np.isfinite(values).all():
            raise ValueError(f"{name} has non-finite values (NaN or inf)")
        out = out or self.create_vector()
        scratch = np.empty(self.model.E.x.array.size)
        self.model.from_values(values, scratch, name=name)
        out.array[:] = scratch[: self._n_owned_q]
        return out

    # -- the data term -----------------------------------------------------------------------------

    def refresh(self, E: PETSc.Vec) -> None:
        """Freeze ``Γ`` at ``E``: assemble ``K(E)`` and factorise it once (fixed point, eq. 5-7)."""
        self.gamma.refresh(E)

    def residual(self, E: PETSc.Vec, out: PETSc.Vec) -> PETSc.Vec:
        """``out = f − D(u_m) E`` (zero on Dirichlet rows)."""
        self._require_data()
        self.D.mult(E, out)
        out.aypx(-1.0, self.f)
        return out

    def value(self, E: PETSc.Vec) -> float:
        """``g(E) = ½ (f − DE)ᵀ Γ⁻¹ (f − DE)`` (equation 8); one back-substitution if ``Σw = 0``."""
        return 0.5 * self.gamma.inv_norm2(self.residual(E, self._r))

    def gradient(self, E: PETSc.Vec, out: PETSc.Vec) -> float:
        """``out = ∇g(E) = −D(u_m)ᵀ Γ⁻¹ (f − D(u_m) E)`` (equation 9); returns ``g(E)``.

        Costs two SpMVs and one ``Γ`` solve (two back-substitutions when ``Σw = 0``).
        """
        r = self.residual(E, self._r)
        s = self.gamma.solve(r, self._s)
        self.D.multTranspose(s, out)
        out.scale(-1.0)
        return 0.5 * r.dot(s)

    def sensitivity(self, out: PETSc.Vec) -> PETSc.Vec:
        """``out = diag(Dᵀ Σn⁻¹ D)`` over the free rows, floored at 1e-12 of its largest: the
        Jacobi scale of the Hessian ``Dᵀ Γ⁻¹ D`` up to ``K`` (``Γ⁻¹ = K⁻ᵀ Σn⁻¹ K⁻¹``, ``K``
        scaling with ``E``), used to precondition CG on the data term. Collective."""
        D2 = self.D.copy()
        indptr, indices, values = D2.getValuesCSR()
        D2.setValuesCSR(indptr, indices, values**2)
        D2.assemble()
        weights = self.gamma.sigma2_inv.copy()
        weights.pointwiseMult(weights, self.gamma.free)
        D2.multTranspose(weights, out)
        weights.destroy()
        D2.destroy()
        largest = out.max()[1]
        np.maximum(out.array, 1e-12 * largest, out=out.array)
        return out

    def hessian_mult(self, v: PETSc.Vec, out: PETSc.Vec) -> PETSc.Vec:
        """``out = D(u_m)ᵀ Γ⁻¹ D(u_m) v`` (the Hessian of ``g`` for frozen ``Γ``)."""
        self._require_data()
        self.hessian_products += 1
        self.D.mult(v, self._v)
        self.gamma.solve(self._v, self._s)
        self.D.multTranspose(self._s, out)
        return out

    def lipschitz(self, iterations: int = 30, rtol: float = 1e-3, v: PETSc.Vec | None = None
                  ) -> tuple[float, PETSc.Vec]:
        """Power-iteration estimate of ``L = λ_max(Dᵀ Γ⁻¹ D)``, the Lipschitz constant of ``∇g``.

        A lower bound that converges from below (:func:`fenics_red.linalg.power_iteration`).
        Starts from ``v`` (warm start across refreshes) or from a fixed start vector that does
        not depend on the number of ranks (a pseudo-random image on an image grid, ones
        otherwise); stops when the estimate changes by less than ``rtol``. Returns ``(L, v)``
        with ``v`` the normalised last iterate.
        """
        if v is None:
            grid = self.model.grid
            if grid is not None:
                v = self.from_image(np.random.default_rng(12345).uniform(0.5, 1.5, grid.shape))
            else:
                v = self.create_vector(1.0)
        estimate = power_iteration(self.hessian_mult, v, iterations, rtol)
        if not estimate > 0.0:
            raise RuntimeError("D(u_m)ᵀ Γ⁻¹ D(u_m) vanishes: is the measured displacement zero?")
        return estimate, v

    def misfit(self, E: PETSc.Vec) -> float:
        """``(f − DE)ᵀ Γ⁻¹ (f − DE) = 2 g(E)``: about :attr:`n_equations` at the true ``E``."""
        return 2.0 * self.value(E)

    def logdet(self) -> float:
        """``log|Γ|`` over the free dofs at the frozen modulus (``nan`` when unavailable)."""
        return self.gamma.logdet()

    def objective(self, E: PETSc.Vec, logdet_weight: float = 0.5) -> float:
        """``J(E) = g(E) + w log|Γ|`` with ``Γ`` frozen at the last refresh.

        ``w = ½`` (default) gives the Gaussian negative log-likelihood up to ``n/2 log 2π``. The
        paper's equation 6 writes ``N/2 log|Γ|``: pass ``logdet_weight=N/2`` for that weighting.
        Refresh at ``E`` first for the likelihood at ``E`` itself.
        """
        return self.value(E) + logdet_weight * self.logdet()

    def homogeneous_fit(self) -> float:
        """The uniform modulus whose displacement best fits ``u_m`` (``Σn⁻¹``-weighted, free dofs;
        ``Σw`` is ignored here): :func:`best_uniform_modulus` with ``u₁ = K(1)⁻¹ f``.

        Costs one factorisation of ``K`` (not of ``Γ``), and leaves ``Γ`` frozen at ``E = 1``.
        """
        self._require_data()
        ones = self.create_vector(1.0)
        try:
            self.gamma.refresh(ones, gamma=False)
            u1 = self._s
            self.gamma.apply_K_inverse(self.f, u1)
            self._v.pointwiseMult(self.gamma.sigma2_inv, self.gamma.free)
            return best_uniform_modulus(u1, self.u_m, self._v)
        finally:
            ones.destroy()

    def destroy(self) -> None:
        """Free the PETSc objects (collective)."""
        self.gamma.destroy()
        for obj in (self.D, self.f, self.u_m, self._r, self._s, self._v):
            obj.destroy()


def best_uniform_modulus(u1: PETSc.Vec, u_m: PETSc.Vec, weights: PETSc.Vec) -> float:
    """The uniform modulus ``c`` whose displacement best fits ``u_m`` in the ``weights`` norm.

    Linear elasticity is linear in ``E``: ``K(c) = c K(1)``, so ``u(c) = u₁ / c`` with ``u₁`` the
    displacement of ``E = 1`` and the weighted least-squares ``1/c`` is ``⟨u₁, u_m⟩_W / ⟨u₁,
    u₁⟩_W``. ``weights`` (one per displacement dof, 0 on Dirichlet dofs) is ``Σn⁻¹`` for the
    likelihood and the component weights for Gauss-Newton. Vectors with the layout of the owned
    displacement dofs (ghosted ones too); collective. Raises ``ValueError`` when ``u_m`` does not
    follow the load (``⟨u₁, u_m⟩_W ≤ 0``).
    """
    weighted = u1.duplicate()
    try:
        weighted.pointwiseMult(weights, u1)
        num, den = weighted.dot(u1), weighted.dot(u_m)
    finally:
        weighted.destroy()
    if not (den > 0 and num > 0):
        raise ValueError("the measured displacement does not correlate positively with the "
                         "model's response to the load (⟨u₁, u_m⟩ ≤ 0): check the load "
                         "direction, the supports and the displacement sign convention")
    return float(num / den)
