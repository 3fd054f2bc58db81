"""Simulated ultrasound measurements: clean displacements plus Gaussian noise (paper, eqs. 2-5).

The measured displacement is ``u_m = u + n`` with ``n`` zero-mean Gaussian, independent per dof,
of standard deviation ``σx`` on the lateral (x) and ``σy`` on the axial (y) components, so that
``Σn = diag(σx², σy², ...)``. Lateral tracking is noisier in practice: ``σx = r σy`` with the
lateral-to-axial noise ratio ``r`` (default 1).

The level follows a target signal-to-noise ratio over the free (non-Dirichlet) dofs,
``SNR = 10 log10(‖u‖² / ‖n‖²)`` (the paper uses 35 dB). ``σ`` is set from the *expected* noise
energy, ``E‖n‖² = σy² (r² N_x + N_y) = ‖u‖² 10^(−SNR/10)`` with ``N_x, N_y`` the numbers of free
lateral and axial dofs, so ``Σn`` is known exactly and the realised SNR scatters around the target
by about ``4.3 sqrt(2 / (N_x + N_y))`` dB. Support (Dirichlet) dofs are known exactly and stay
noise-free.

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

import numpy as np

from .forward import ElasticityModel

__all__ = ["Measurement", "free_dof_images", "noise_std_for_snr", "add_noise", "measured_snr_db",
           "simulate_measurement"]


@dataclass(frozen=True)
class Measurement:
    """Clean and noisy displacement images with the exact noise levels used.

    Attributes:
        ux, uy: clean displacement images ``u = K(E)⁻¹ f``.
        ux_noisy, uy_noisy: measured images ``u_m``.
        noise_std: ``(σx, σy)``, standard deviations of the displacement noise (``Σn``).
        force_std: ``σw``, standard deviation of the force noise (``Σw = σw² I``; 0 when none).
        free: boolean images ``(2, ny+1, nx+1)`` of the free x and y dofs (where noise was added).
    """

    ux: np.ndarray
    uy: np.ndarray
    ux_noisy: np.ndarray
    uy_noisy: np.ndarray
    noise_std: tuple[float, float]
    force_std: float
    free: np.ndarray


def free_dof_images(model: ElasticityModel) -> np.ndarray:
    """Boolean images ``(2, ny+1, nx+1)``: True where the x / y displacement dof is free.

    Collective on the model's communicator (every rank gets the whole images).
    """
    mask = model.free_dofs.astype(np.float64)
    return model.images("V").to_images(mask) > 0.5


def _check_snr(snr_db: float, noise_ratio: float) -> tuple[float, float]:
    snr_db, noise_ratio = float(snr_db), float(noise_ratio)
    if not math.isfinite(snr_db):
        raise ValueError(f"the SNR must be a finite number of dB, got {snr_db!r}")
    if not (math.isfinite(noise_ratio) and noise_ratio > 0):
        raise ValueError(f"the lateral-to-axial noise ratio must be finite and > 0, got "
                         f"{noise_ratio!r}")
    return snr_db, noise_ratio


def noise_std_for_snr(ux: np.ndarray, uy: np.ndarray, free: np.ndarray, snr_db: float,
                      noise_ratio: float = 1.0) -> tuple[float, float]:
    """``(σx, σy)`` whose expected noise energy gives ``snr_db`` over the free dofs.

    Solves ``σy² (r² N_x + N_y) = ‖u_free‖² / 10^(SNR/10)``, ``σx = r σy``.
    """
    snr_db, ratio = _check_snr(snr_db, noise_ratio)
    free = np.asarray(free, dtype=bool)
    n_x, n_y = int(free[0].sum()), int(free[1].sum())
    if n_x + n_y == 0:
        raise ValueError("there are no free displacement dofs to add noise to")
    energy = float(np.sum(ux[free[0]] ** 2) + np.sum(uy[free[1]] ** 2))
    if not (math.isfinite(energy) and energy > 0):
        raise ValueError(f"the clean displacement has no energy over the free dofs ({energy!r}); "
                         "an SNR needs a non-zero displacement")
    sigma_y = math.sqrt(energy * 10.0 ** (-snr_db / 10.0) / (ratio**2 * n_x + n_y))
    return (ratio * sigma_y, sigma_y)


def add_noise(ux: np.ndarray, uy: np.ndarray, free: np.ndarray, snr_db: float,
              rng: np.random.Generator, noise_ratio: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """``(ux + n_x, uy + n_y, (σx, σy))``: Gaussian noise of the target SNR on the free dofs.

    Draws one standard-normal array of shape ``(2, ny+1, nx+1)`` from ``rng`` (x first); the
    Dirichlet dofs keep their exact values.
    """
    sigma = noise_std_for_snr(ux, uy, free, snr_db, noise_ratio)
    noise = rng.standard_normal((2, *np.shape(ux)))
    noise *= np.asarray(sigma)[:, None, None] * np.asarray(free, dtype=bool)
    return ux + noise[0], uy + noise[1], sigma


def measured_snr_db(ux: np.ndarray, uy: np.ndarray, ux_noisy: np.ndarray, uy_noisy: np.ndarray,
                    free: np.ndarray | None = None) -> float:
    """Realised ``10 log10(‖u‖² / ‖u_m − u‖²)`` over the free dofs (all dofs if ``free`` is None)."""
    u = np.stack([ux, uy])
    n = np.stack([ux_noisy, uy_noisy]) - u
    if free is not None:
        free = np.asarray(free, dtype=bool)
        u, n = u[free], n[free]
    return float(10.0 * np.log10(np.sum(u**2) / np.sum(n**2)))


def simulate_measurement(model: ElasticityModel, modulus: np.ndarray, rng: np.random.Generator,
                         snr_db: float = 35.0, noise_ratio: float = 1.0,
                         force_noise: float = 0.0) -> Measurement:
    """Solve the forward model for ``modulus`` and simulate a noisy measurement of it.

    Args:
        model: a forward model with an image grid (any communicator; collective on it).
        modulus: modulus image ``(ny+1, nx+1)``.
        rng: the random generator; the displacement noise is drawn first, then (when
            ``force_noise > 0``) the force noise, each as one ``(2, ny+1, nx+1)`` array.
        snr_db: target SNR of the displacement noise in dB (relative to the clean field).
        noise_ratio: ``r = σx / σy``.
        force_noise: ``σw``, the standard deviation of the nodal force noise ``w`` (absolute, in
            load-vector units); 0 for none.

    The model is left holding ``E = modulus`` and, in :attr:`ElasticityModel.u`, the displacement
    of the (possibly perturbed) load.
    """
    force_noise = float(force_noise)
    if not (math.isfinite(force_noise) and force_noise >= 0):
        raise ValueError(f"the force noise standard deviation must be finite and >= 0, got "
                         f"{force_noise!r}")
    model.solve(modulus)
    ux, uy = model.displacement_images()
    free = free_dof_images(model)
    ux_noisy, uy_noisy, sigma = add_noise(ux, uy, free, snr_db, rng, noise_ratio)
    if force_noise > 0:
        w = rng.standard_normal((2, *ux.shape)) * (force_noise * free)
        images = model.images("V")
        local = np.zeros(images.num_local * images.block_size)
        images.from_images(w, local)
        b = model.assemble_load()  # K(E) is assembled (and factorised) by the solve above
        owned = images.num_owned * images.block_size
        b.array[:] += local[:owned]
        model.ksp.solve(b, model.u.x.petsc_vec)
        if model.ksp.getConvergedReason() < 0:
            raise RuntimeError("the forward solve with force noise did not converge (PETSc KSP "
                               f"reason {model.ksp.getConvergedReason()})")
        model.u.x.scatter_forward()
        wx, wy = model.displacement_images()
        ux_noisy, uy_noisy = ux_noisy + (wx - ux), uy_noisy + (wy - uy)
    return Measurement(ux, uy, ux_noisy, uy_noisy, sigma, force_noise, free)
