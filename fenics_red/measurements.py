"""Simulated ultrasound measurements: clean displacements plus Gaussian noise (paper, eqs. 2-5).

The measured displacement is ``u_m = u + n`` with ``n`` zero-mean Gaussian, independent per dof,
of standard deviation ``σ_c`` on displacement component ``c``, so that ``Σn = diag(σx², σy², ...)``
in 2-D (``diag(σx², σy², σz², ...)`` in 3-D). The *axial* component (along the load: the last one,
``y`` in 2-D, ``z`` in 3-D) has ``σ_axial``; the lateral ones are noisier in practice:
``σ_lateral = r σ_axial`` with the lateral-to-axial noise ratio ``r`` (default 1).

The level follows a target signal-to-noise ratio over the free (non-Dirichlet) dofs,
``SNR = 10 log10(‖u‖² / ‖n‖²)`` (the paper uses 35 dB). ``σ`` is set from the *expected* noise
energy, ``E‖n‖² = Σ_c N_c σ_c² = σ_axial² (r² N_lateral + N_axial) = ‖u‖² 10^(−SNR/10)`` with
``N_c`` the numbers of free dofs of each component (:func:`noise_std_from_energy`), so ``Σn`` is
known exactly and the realised SNR scatters around the target by about ``4.3 sqrt(2 / Σ N_c)``
dB. Support (Dirichlet) dofs are known exactly and stay noise-free.

The generic functions take the components stacked along the first axis (``u`` of shape
``(n_components, ...)``: images ``(2, ny+1, nx+1)``, or nodal arrays); :func:`noise_std_for_snr`,
:func:`add_noise` and :func:`measured_snr_db` are their 2-D spellings with ``(ux, uy)``.

Optional force noise ``w`` (standard deviation ``σw`` per free dof, in the units of the nodal load
vector, ``Σw = σw² I``) models an uncertain applied load: the measured field is then
``u_m = K(E)⁻¹ (f + w) + n`` while the clean field stays ``u = K(E)⁻¹ f``, consistent with the
statistical model ``f = D(u_m) E + w̃``, ``Γ = Σw + K Σn Kᵀ`` (paper, eqs. 2-5).

The random draws are made on whole images in a fixed order, so a measurement depends only on the
generator's state, never on the number of MPI ranks the model is distributed over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from petsc4py import PETSc

import numpy as np
from scipy import sparse

from dolfinx import fem

from . import validation
from .forward import ElasticityModel
from .raster import validate_image

__all__ = ["Measurement", "SimulatedMeasurement", "estimate_noise_std", "free_dof_images",
           "set_displacement",
           "noise_std_from_energy", "component_noise_std", "draw_noise", "realised_snr_db",
           "noise_std_for_snr", "add_noise", "measured_snr_db", "simulate_measurement"]


@dataclass(frozen=True)
class Measurement:
    """What a reconstruction takes: measured displacements, their noise, optionally the truth.

    Attributes:
        displacement: one array per component (``ux, uy[, uz]``): images on grids, one value
            per node in the mesh's order otherwise.
        noise_std: ``σ`` per component of the displacement noise (``Σn``).
        force_std: ``σw`` of the force noise (``Σw = σw² I``; 0: none).
        truth: the true modulus (same layout), or ``None`` for a real measurement.

    The load and the supports are the forward model's (:class:`~fenics_red.forward.
    ForwardSettings`): a measurement is reconstructed with the settings that describe it.
    """

    displacement: tuple[np.ndarray, ...]
    noise_std: tuple[float, ...]
    force_std: float = 0.0
    truth: np.ndarray | None = None

    def __post_init__(self):
        components = tuple(np.asarray(c, dtype=np.float64) for c in self.displacement)
        if len(components) not in (2, 3):
            raise ValueError(f"a measurement has 2 or 3 displacement components, got "
                             f"{len(components)}")
        shape = components[0].shape
        for c, values in zip("xyz", components, strict=False):
            if len(shape) == 2:
                validate_image(values, shape, f"u{c}_noisy")
            elif values.shape != shape or not np.isfinite(values).all():
                raise ValueError(f"u{c}_noisy must hold finite values of shape {shape} (one per "
                                 "node)")
        object.__setattr__(self, "displacement", components)
        sigma = tuple(float(v) for v in np.asarray(self.noise_std, dtype=float).ravel())
        object.__setattr__(self, "noise_std", sigma)
        object.__setattr__(self, "force_std", validation.non_negative(
            0.0 if self.force_std is None else self.force_std, "force_std"))
        self.noise  # noqa: B018  (validates sigma and force_std: one clear error here)
        if len(sigma) != len(components):
            raise ValueError(f"noise_std has {len(sigma)} value(s) for {len(components)} "
                             "displacement components: give one per component")
        if self.truth is not None:
            truth = np.asarray(self.truth, dtype=np.float64)
            if truth.shape != shape:
                raise ValueError(f"the true modulus E has shape {truth.shape}, the displacement "
                                 f"{shape}")
            object.__setattr__(self, "truth", truth)

    @property
    def noise(self):
        """The :class:`~fenics_red.likelihood.NoiseModel` (``Σn``, ``Σw``) of the likelihood."""
        from .likelihood import NoiseModel

        return NoiseModel(self.noise_std, self.force_std)

    @classmethod
    def from_sample(cls, sample) -> Measurement:
        """The measurement of a data set sample: an object or mapping with ``ux_noisy``,
        ``uy_noisy`` (``uz_noisy`` in 3-D), ``noise_std``, optionally ``force_std`` and the truth
        ``E`` (the ``Sample`` of :mod:`fenics_red.data`, or a dict of arrays)."""
        def get(name, default=None):
            if isinstance(sample, dict):
                return sample.get(name, default)
            return getattr(sample, name, default)

        components = [get(f"u{c}_noisy") for c in "xyz"]
        if components[0] is None or components[1] is None:
            raise ValueError("the sample has no measured displacement (ux_noisy, uy_noisy)")
        if get("noise_std") is None:
            raise ValueError("the sample has no noise_std (sigma_x, sigma_y): the likelihood "
                             "needs the noise level")
        return cls(tuple(c for c in components if c is not None), get("noise_std"),
                   get("force_std", 0.0), get("E"))


@dataclass(frozen=True)
class SimulatedMeasurement:
    """Clean and noisy displacement images with the exact noise levels used.

    Arrays are images on grids and one value per node (file order) on meshes.

    Attributes:
        ux, uy: clean displacement images ``u = K(E)⁻¹ f`` (``uz`` too in 3-D).
        ux_noisy, uy_noisy: measured images ``u_m``.
        noise_std: ``(σx, σy)``, standard deviations of the displacement noise (``Σn``).
        force_std: ``σw``, standard deviation of the force noise (``Σw = σw² I``; 0 when none).
        free: boolean arrays, one per component, of the free dofs (where noise was added).
    """

    ux: np.ndarray
    uy: np.ndarray
    ux_noisy: np.ndarray
    uy_noisy: np.ndarray
    noise_std: tuple[float, ...]
    force_std: float
    free: np.ndarray
    uz: np.ndarray | None = None
    uz_noisy: np.ndarray | None = None


def free_dof_images(model: ElasticityModel) -> np.ndarray:
    """Boolean images ``(n_components, ny+1, nx+1)``: True where a displacement dof is free.

    Collective on the model's communicator (every rank gets the whole images).
    """
    mask = model.free_dofs.astype(np.float64)
    return model.images("V").to_images(mask) > 0.5


def set_displacement(model: ElasticityModel, displacement, out: fem.Function,
                     name: str = "measured displacement") -> fem.Function:
    """Fill ``out`` (a function on ``model.V``) with a displacement given in any of its forms.

    ``displacement``: a function on ``model.V``; a PETSc vector of its owned values; its local
    values (owned and ghosts, the layout of ``fem.Function.x.array``); or, on a model with an image
    grid, one image per component (``(ux, uy)`` in 2-D). Raises ``ValueError`` naming ``name`` for
    a wrong shape, and on every rank when any rank holds a non-finite value. Collective.
    """
    n_components = model.V.dofmap.index_map_bs
    n_owned = model.V.dofmap.index_map.size_local * n_components
    if isinstance(displacement, fem.Function):
        out.x.array[:] = displacement.x.array
    elif isinstance(displacement, PETSc.Vec):
        if displacement.getLocalSize() != n_owned:
            raise ValueError(f"{name}: a vector of local size {displacement.getLocalSize()} does "
                             f"not have the shape ({n_owned},) of the owned dofs of V")
        out.x.array[:n_owned] = displacement.array_r
        out.x.scatter_forward()
    elif isinstance(displacement, tuple | list) and len(displacement) == n_components:
        if model.grid is not None:
            arrays = [validate_image(image, model.grid.shape, f"{name} u{'xyz'[c]}")
                      for c, image in enumerate(displacement)]
        else:
            arrays = [np.asarray(a, dtype=np.float64) for a in displacement]
        model.from_values(np.stack(arrays), out.x.array, "V", name)
    else:
        values = np.asarray(displacement, dtype=float)
        if values.shape != out.x.array.shape:
            images = ", ".join(f"u{'xyz'[c]}" for c in range(n_components))
            raise ValueError(f"{name} must be images ({images}), a function on V, a PETSc vector "
                             f"or {out.x.array.size} local values; got shape {values.shape}")
        out.x.array[:] = values
    validation.check_finite(out.x.array, name, model.comm)
    return out


def noise_std_from_energy(energy: float, counts, snr_db: float, noise_ratio: float = 1.0,
                          noisy: bool = False) -> tuple[float, ...]:
    """``σ`` per component whose expected noise energy gives ``snr_db`` (module docstring).

    Solves ``σ_axial² (r² Σ_lateral N_c + N_axial) = ‖u‖² 10^(−SNR/10)``, ``σ_lateral = r σ_axial``,
    for any number of components (the last one axial).

    Args:
        energy: ``‖u‖²`` over the free dofs (of the clean ``u``; of the noisy ``u_m`` when
            ``noisy``: then ``E‖u_m‖² = ‖u‖² (1 + 10^(−SNR/10))`` is corrected for).
        counts: numbers of free dofs per component (``(N_x, N_y)`` or ``(N_x, N_y, N_z)``).
        snr_db: the SNR in dB.
        noise_ratio: ``r``, the lateral-to-axial ratio of the standard deviations.
    """
    snr_db = validation.finite(snr_db, "the SNR", what="a finite number of dB")
    ratio = validation.positive(noise_ratio, "the lateral-to-axial noise ratio")
    counts = [int(c) for c in counts]
    if not counts or sum(counts) == 0:
        raise ValueError("there are no free displacement dofs to add noise to")
    energy = float(energy)
    if not (math.isfinite(energy) and energy > 0):
        raise ValueError(f"the displacement has no energy over the free dofs ({energy!r}); an "
                         "SNR needs a non-zero displacement")
    level = 10.0 ** (-snr_db / 10.0)
    noise_energy = energy * level / (1.0 + level) if noisy else energy * level
    sigma_axial = math.sqrt(noise_energy / (ratio**2 * sum(counts[:-1]) + counts[-1]))
    return (*(ratio * sigma_axial,) * (len(counts) - 1), sigma_axial)


def component_noise_std(u: np.ndarray, free: np.ndarray, snr_db: float,
                        noise_ratio: float = 1.0) -> tuple[float, ...]:
    """``σ`` per component whose expected noise energy gives ``snr_db`` over the free dofs.

    ``u``: the clean components stacked along the first axis; ``free``: booleans of its shape.
    """
    free = np.asarray(free, dtype=bool)
    counts = [int(free[c].sum()) for c in range(len(free))]
    energy = float(sum(np.sum(u[c][free[c]] ** 2) for c in range(len(free))))
    return noise_std_from_energy(energy, counts, snr_db, noise_ratio)


def draw_noise(u: np.ndarray, free: np.ndarray, snr_db: float, rng: np.random.Generator,
               noise_ratio: float = 1.0) -> tuple[np.ndarray, tuple[float, ...]]:
    """``(u + n, σ)``: Gaussian noise of the target SNR on the free dofs of stacked components.

    Draws one standard-normal array of ``u``'s shape from ``rng`` (component 0 first); the
    Dirichlet dofs keep their exact values.
    """
    u = np.asarray(u)
    sigma = component_noise_std(u, free, snr_db, noise_ratio)
    noise = rng.standard_normal(u.shape)
    noise *= np.asarray(sigma).reshape(-1, *(1,) * (u.ndim - 1)) * np.asarray(free, dtype=bool)
    return u + noise, sigma


def realised_snr_db(u: np.ndarray, u_noisy: np.ndarray, free: np.ndarray | None = None) -> float:
    """Realised ``10 log10(‖u‖² / ‖u_m − u‖²)`` over the free dofs (all dofs if ``free`` is None).

    ``u``, ``u_noisy`` (and ``free``): components stacked along the first axis.
    """
    u = np.asarray(u)
    n = np.asarray(u_noisy) - u
    if free is not None:
        free = np.asarray(free, dtype=bool)
        u, n = u[free], n[free]
    return float(10.0 * np.log10(np.sum(u**2) / np.sum(n**2)))


def noise_std_for_snr(ux: np.ndarray, uy: np.ndarray, free: np.ndarray, snr_db: float,
                      noise_ratio: float = 1.0) -> tuple[float, float]:
    """``(σx, σy)`` whose expected noise energy gives ``snr_db`` over the free dofs (2-D).

    Solves ``σy² (r² N_x + N_y) = ‖u_free‖² / 10^(SNR/10)``, ``σx = r σy``.
    """
    return component_noise_std(np.stack([ux, uy]), free, snr_db, noise_ratio)


def add_noise(ux: np.ndarray, uy: np.ndarray, free: np.ndarray, snr_db: float,
              rng: np.random.Generator, noise_ratio: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """``(ux + n_x, uy + n_y, (σx, σy))``: Gaussian noise of the target SNR on the free dofs.

    Draws one standard-normal array of shape ``(2, ny+1, nx+1)`` from ``rng`` (x first); the
    Dirichlet dofs keep their exact values.
    """
    noisy, sigma = draw_noise(np.stack([ux, uy]), free, snr_db, rng, noise_ratio)
    return noisy[0], noisy[1], sigma


def measured_snr_db(ux: np.ndarray, uy: np.ndarray, ux_noisy: np.ndarray, uy_noisy: np.ndarray,
                    free: np.ndarray | None = None) -> float:
    """Realised ``10 log10(‖u‖² / ‖u_m − u‖²)`` over the free dofs (all dofs if ``free`` is
    None), 2-D."""
    return realised_snr_db(np.stack([ux, uy]), np.stack([ux_noisy, uy_noisy]), free)


def simulate_measurement(model: ElasticityModel, modulus: np.ndarray, rng: np.random.Generator,
                         snr_db: float = 35.0, noise_ratio: float = 1.0,
                         force_noise: float = 0.0) -> SimulatedMeasurement:
    """Solve the forward model for ``modulus`` and simulate a noisy measurement of it.

    Args:
        model: a forward model (any communicator; collective on it).
        modulus: nodal moduli in file order: an image ``(ny+1, nx+1)`` on a grid, one value per
            mesh node otherwise (:meth:`ElasticityModel.from_values`).
        rng: the random generator; the displacement noise is drawn first, then (when
            ``force_noise > 0``) the force noise, each as one ``(2, ny+1, nx+1)`` array.
        snr_db: target SNR of the displacement noise in dB (relative to the clean field).
        noise_ratio: ``r = σx / σy``.
        force_noise: ``σw``, the standard deviation of the nodal force noise ``w`` (absolute, in
            load-vector units); 0 for none.

    The model is left holding ``E = modulus`` and, in :attr:`ElasticityModel.u`, the displacement
    of the (possibly perturbed) load.
    """
    force_noise = validation.non_negative(force_noise, "the force noise standard deviation")
    local = model.from_values(modulus, np.empty_like(model.E.x.array), name="modulus")
    model.solve(local)
    u = model.to_values(model.u.x.array, "V")
    free = model.to_values(model.free_dofs.astype(np.float64), "V") > 0.5
    u_noisy, sigma = draw_noise(u, free, snr_db, rng, noise_ratio)
    if force_noise > 0:
        w = rng.standard_normal(u.shape) * (force_noise * free)
        local = model.from_values(w, np.zeros(model.u.x.array.size), "V")
        b = model.assemble_load()  # K(E) is assembled (and factorised) by the solve above
        b.array[:] += local[: b.getLocalSize()]
        model.ksp.solve(b, model.u.x.petsc_vec)
        if model.ksp.getConvergedReason() < 0:
            raise RuntimeError("the forward solve with force noise did not converge (PETSc KSP "
                               f"reason {model.ksp.getConvergedReason()})")
        model.u.x.scatter_forward()
        u_noisy = u_noisy + (model.to_values(model.u.x.array, "V") - u)
    third = {} if len(u) == 2 else {"uz": u[2], "uz_noisy": u_noisy[2]}
    return SimulatedMeasurement(u[0], u[1], u_noisy[0], u_noisy[1], sigma, force_noise, free,
                                **third)


# -- the noise level of a measurement ------------------------------------------------------------

def estimate_noise_std(space, displacement, support_free: bool = True,
                       valid: np.ndarray | None = None) -> tuple[float, ...]:
    """``σ`` per displacement component, estimated from the measured field itself.

    The method (a local-fit residual with a robust scale): at each node, fit a linear function
    (``d + 1`` parameters) by least squares to the values of the node and its neighbours (the
    nodes sharing a cell with it) and take the node's residual, divided by ``sqrt(1 − h)`` with
    ``h`` the node's leverage in that fit, so that for white noise on a locally linear field it
    has standard deviation ``σ``. Over all nodes, ``σ = 1.4826 median |r|`` (the median absolute
    value of a normal variable), which ignores the few nodes where the field bends sharply (the
    edges of stiff inclusions). The smooth curvature of ``u`` over one node spacing is far below
    the noise at the SNRs of elastography (25-45 dB); ``tests/test_measurements.py`` checks the
    estimate against the known ``σ`` of simulated data on a grid and on a mesh.

    Args:
        space: an :class:`~fenics_red.raster.ImageGrid` or :class:`~fenics_red.domain.MeshArrays`.
        displacement: one array per component in that layout (images, or one value per node).
        support_free: leave out the nodes of the support and their neighbours (the support is
            held: noise-free in simulated data, and not measured in the same way in real data).
        valid: booleans, one per node: where the displacement was measured (default: all). Only
            nodes whose fit uses measured nodes alone count.
    """
    from .domain import MeshArrays

    mesh = space if isinstance(space, MeshArrays) else MeshArrays.of_grid(space)
    residual = _local_fit_residual(mesh, support_free, valid)
    sigma = []
    for component in displacement:
        values = np.asarray(component, dtype=np.float64).ravel()
        if values.shape != (len(mesh.points),) or not np.isfinite(values).all():
            raise ValueError(f"each displacement component must hold {len(mesh.points)} finite "
                             f"values (one per node), got shape {np.shape(component)}")
        sigma.append(1.4826 * float(np.median(np.abs(residual @ values))))
    return tuple(sigma)


def _local_fit_residual(mesh, support_free: bool, valid=None) -> sparse.csr_matrix:
    """Rows ``(I − H)[i] / sqrt(1 − h_ii)`` of each node's local linear fit (nodes kept only)."""
    n, d = mesh.points.shape
    adjacency = mesh.adjacency()
    keep = np.ones(n, dtype=bool)
    if support_free and mesh.support.size:
        held = np.zeros(n, dtype=bool)
        held[np.unique(mesh.support)] = True
        keep &= ~held & ~((adjacency @ held.astype(float)) > 0)
    if valid is not None:
        missing = ~np.asarray(valid, dtype=bool).ravel()
        if missing.shape != (n,):
            raise ValueError(f"valid must hold one boolean per node ({n}), got {missing.shape}")
        keep &= ~missing & ~((adjacency @ missing.astype(float)) > 0)
    cols, vals = [], []
    for i in np.flatnonzero(keep):
        ring = np.concatenate([[i], adjacency.indices[adjacency.indptr[i]:adjacency.indptr[i + 1]]])
        if len(ring) <= d + 1:
            continue
        X = np.hstack([np.ones((len(ring), 1)), mesh.points[ring] - mesh.points[i]])
        hat = X[0] @ np.linalg.pinv(X)  # row i of the hat matrix H = X (XᵀX)⁻¹ Xᵀ
        weights = -hat
        weights[0] += 1.0
        scale = math.sqrt(max(1.0 - hat[0], 1e-12))
        cols.append(ring)
        vals.append(weights / scale)
    counts = [len(c) for c in cols]
    row_index = np.repeat(np.arange(len(cols)), counts)
    if not cols:
        raise ValueError("no node has enough neighbours to estimate the noise")
    return sparse.csr_matrix((np.concatenate(vals), (row_index, np.concatenate(cols))),
                             shape=(len(cols), n))
