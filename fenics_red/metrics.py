"""Image-quality metrics between an estimated modulus image and the ground truth.

All metrics take images (NumPy arrays of the same 2-D shape, or 3-D volumes, in the image
convention of :mod:`fenics_red.raster`) and return plain floats, so that the evaluation can store
them in CSV/JSON.
The truth is always the second argument; wherever a metric needs a scale (PSNR's peak, SSIM's data
range) it is taken from the truth, never from the estimate, so that every method is measured with
the same yardstick.

Definitions (``x`` the estimate, ``y`` the truth, ``n`` pixels, ``mask`` the inclusion pixels of the
phantom, ``I``/``B`` inclusion/background, ``m``/``s`` mean/standard deviation over a region):

* ``rmse = sqrt(mean((x - y)^2))``
* ``relative_rmse = ||x - y||_2 / ||y||_2`` (Frobenius norms; equal to ``rmse / rms(y)``)
* ``psnr = 10 log10(max(y)^2 / mean((x - y)^2))`` in dB; the peak is the truth's maximum
  (``inf`` for a perfect estimate)
* ``ssim``: mean structural similarity of Wang et al. (2004) with an 11 x 11 Gaussian window
  (sigma 1.5 pixels, truncated at 3.5 sigma), ``K1 = 0.01``, ``K2 = 0.03``, population (not sample)
  covariances, data range ``L = max(y) - min(y)``, averaged over the pixels whose window lies
  inside the image (a 5-pixel border is left out). It equals scikit-image's
  ``structural_similarity(x, y, data_range=L, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)``. On volumes the window is the 3-D Gaussian (11³ voxels), as
  scikit-image does for 3-D arrays.
* ``cnr_db = 10 log10(2 (m_I - m_B)^2 / (s_I^2 + s_B^2))``, i.e.
  ``20 log10(sqrt(2 (m_I - m_B)^2 / (s_I^2 + s_B^2)))``, the contrast-to-noise ratio of
  elastography (Varghese & Ophir 1998; Bilgen 1999), computed on the *estimate* with the regions
  taken from the phantom's mask; population standard deviations. ``inf`` when both regions are
  exactly uniform (the truth of a piecewise-constant phantom).
* ``contrast_ratio = m_I(x) / m_B(x)``, ``contrast_ratio_true = m_I(y) / m_B(y)`` and
  ``contrast_ratio_error = |contrast_ratio - contrast_ratio_true| / contrast_ratio_true``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["rmse", "relative_rmse", "psnr", "ssim", "cnr_db", "contrast_ratio",
           "contrast_ratio_error", "evaluate_metrics", "METRIC_NAMES", "SSIM_SIGMA",
           "SSIM_TRUNCATE", "SSIM_RADIUS", "SSIM_WINDOW", "SSIM_K1", "SSIM_K2"]

#: Standard deviation (pixels) of the SSIM Gaussian window (Wang et al. 2004).
SSIM_SIGMA = 1.5
#: Truncation of the SSIM window in standard deviations: an 11-tap window with sigma 1.5.
SSIM_TRUNCATE = 3.5
#: Half-width of the SSIM window in pixels (as in scipy.ndimage: 5) and its width (11): images
#: must be at least this wide along every axis.
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
SSIM_WINDOW = 2 * SSIM_RADIUS + 1
#: SSIM stabilising constants, ``C1 = (K1 L)^2`` and ``C2 = (K2 L)^2``.
SSIM_K1 = 0.01
SSIM_K2 = 0.03

#: Keys of the dictionary returned by :func:`evaluate_metrics`, in table order.
METRIC_NAMES = ("rmse", "relative_rmse", "psnr", "ssim", "cnr_db", "contrast_ratio",
                "contrast_ratio_true", "contrast_ratio_error")


# -- input checks ---------------------------------------------------------------------------------

def _image(array, name: str) -> np.ndarray:
    image = np.asarray(array)
    if image.dtype.kind not in "fiub":
        raise ValueError(f"{name} must hold real numbers, got dtype {image.dtype}")
    if image.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2-D image or a 3-D volume, got an array of shape "
                         f"{image.shape}")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    bad = ~np.isfinite(image)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        at = f"row {where[0]}, column {where[1]}" if len(where) == 2 else f"voxel {where}"
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) (NaN or inf), first at "
                         f"{at}")
    return image.astype(np.float64, copy=False)


def _pair(estimate, truth) -> tuple[np.ndarray, np.ndarray]:
    x = _image(estimate, "estimate")
    y = _image(truth, "truth")
    if x.shape != y.shape:
        raise ValueError(f"estimate has shape {x.shape} but truth has shape {y.shape}; "
                         "metrics compare images of the same grid")
    return x, y


def _regions(mask, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean inclusion and background masks; nonzero mask pixels are inclusion."""
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"mask has shape {m.shape} but the images have shape {tuple(shape)}")
    if m.dtype.kind not in "fiub":
        raise ValueError(f"mask must be boolean or numeric, got dtype {m.dtype}")
    if m.dtype.kind == "f" and not np.isfinite(m).all():
        raise ValueError("mask has non-finite values")
    inclusion = m != 0
    n_inc = int(inclusion.sum())
    if n_inc == 0:
        raise ValueError("mask is empty: no inclusion pixel (nonzero value), so inclusion "
                         "statistics (CNR, contrast ratio) are undefined")
    if n_inc == inclusion.size:
        raise ValueError("mask covers the whole image: no background pixel, so background "
                         "statistics (CNR, contrast ratio) are undefined")
    return inclusion, ~inclusion


# -- metrics --------------------------------------------------------------------------------------

def rmse(estimate, truth) -> float:
    """Root-mean-square error ``sqrt(mean((x - y)^2))`` (units of the modulus)."""
    x, y = _pair(estimate, truth)
    return float(np.sqrt(np.mean((x - y) ** 2)))


def relative_rmse(estimate, truth) -> float:
    """Relative error ``||x - y|| / ||y||`` (Frobenius norms); dimensionless."""
    x, y = _pair(estimate, truth)
    norm = float(np.linalg.norm(y))
    if norm == 0.0:
        raise ValueError("truth is identically zero: the relative error is undefined")
    return float(np.linalg.norm(x - y) / norm)


def psnr(estimate, truth) -> float:
    """Peak signal-to-noise ratio in dB, with the truth's maximum as the peak.

    ``10 log10(max(y)^2 / MSE)``; ``inf`` when the estimate equals the truth.
    """
    x, y = _pair(estimate, truth)
    peak = float(np.max(y))
    if peak <= 0.0:
        raise ValueError(f"PSNR needs a positive peak; the truth's maximum is {peak!r}")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return float(10.0 * np.log10(peak**2 / mse))


def ssim(estimate, truth, *, data_range: float | None = None, full: bool = False):
    """Mean structural similarity index of Wang et al. (2004), Gaussian window.

    Args:
        estimate, truth: images of the same shape, at least 11 x 11 pixels.
        data_range: the dynamic range ``L`` in ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``;
            defaults to ``max(truth) - min(truth)`` (must then be positive).
        full: also return the SSIM map (on the cropped interior).

    Local means, variances and the covariance are Gaussian-weighted (sigma 1.5 pixels, window
    11 x 11, population covariances). The map is averaged over the pixels whose whole window lies
    inside the image, so no padding convention enters the result; this reproduces scikit-image's
    ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
    """
    x, y = _pair(estimate, truth)
    radius, window = SSIM_RADIUS, SSIM_WINDOW
    if min(x.shape) < window:
        size = " x ".join([str(window)] * x.ndim)
        raise ValueError(f"SSIM needs images of at least {size} pixels (the Gaussian window), "
                         f"got shape {x.shape}")
    if data_range is None:
        data_range = float(np.max(y) - np.min(y))
        if data_range <= 0.0:
            raise ValueError("the truth is constant, so its data range is zero; pass data_range "
                             "explicitly to compute SSIM")
    elif not (np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")

    def window_mean(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")

    mx, my = window_mean(x), window_mean(y)
    vx = window_mean(x * x) - mx * mx
    vy = window_mean(y * y) - my * my
    vxy = window_mean(x * y) - mx * my
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s_map = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    s_map = s_map[(slice(radius, -radius),) * s_map.ndim]
    value = float(s_map.mean(dtype=np.float64))
    return (value, s_map) if full else value


def _region_stats(x: np.ndarray, inclusion: np.ndarray, background: np.ndarray):
    xi, xb = x[inclusion], x[background]

    def variance(v):  # exactly zero for a uniform region (np.var leaves round-off there)
        return 0.0 if np.ptp(v) == 0 else float(v.var())

    return float(xi.mean()), float(xb.mean()), variance(xi), variance(xb)


def cnr_db(estimate, mask) -> float:
    """Contrast-to-noise ratio in dB between the inclusion (``mask != 0``) and the background.

    ``CNR = 10 log10(2 (m_I - m_B)^2 / (s_I^2 + s_B^2))`` (the 20 log10 of the amplitude ratio
    ``sqrt(2 (m_I - m_B)^2 / (s_I^2 + s_B^2))``); population variances. ``inf`` when both regions
    are exactly uniform, ``-inf`` when their means are equal.
    """
    x = _image(estimate, "estimate")
    inclusion, background = _regions(mask, x.shape)
    m_i, m_b, v_i, v_b = _region_stats(x, inclusion, background)
    contrast = 2.0 * (m_i - m_b) ** 2
    noise = v_i + v_b
    if noise == 0.0:
        return math.inf if contrast > 0 else -math.inf
    if contrast == 0.0:
        return -math.inf
    return float(10.0 * np.log10(contrast / noise))


def contrast_ratio(image, mask) -> float:
    """Ratio of the mean over the inclusion (``mask != 0``) to the mean over the background."""
    x = _image(image, "image")
    inclusion, background = _regions(mask, x.shape)
    m_b = float(x[background].mean())
    if m_b == 0.0:
        raise ValueError("the background mean is zero: the contrast ratio is undefined")
    return float(x[inclusion].mean()) / m_b


def contrast_ratio_error(estimate, truth, mask) -> float:
    """Relative error of the inclusion-to-background ratio, ``|r(x) - r(y)| / r(y)``."""
    x, y = _pair(estimate, truth)
    true_ratio = contrast_ratio(y, mask)
    return abs(contrast_ratio(x, mask) - true_ratio) / abs(true_ratio)


def evaluate_metrics(estimate, truth, mask, valid=None) -> dict[str, float]:
    """All metrics of an estimate against the truth, keyed as :data:`METRIC_NAMES`.

    Args:
        estimate: the reconstructed modulus image.
        truth: the ground-truth modulus image (same shape; sets PSNR's peak and SSIM's range).
        mask: the phantom's inclusion mask (same shape; nonzero = inclusion, zero = background).
        valid: optional boolean image of the pixels inside the tissue (a mesh's raster mask):
            every metric then uses only those pixels (SSIM: its map averaged over them; windows
            near the edge still see the outside pixels, which the raster fills from inside).

    Raises:
        ValueError: on shape mismatch, non-finite values, an empty or full mask, or a truth
            without a positive peak or range.
    """
    x, y = _pair(estimate, truth)
    if valid is None:
        _regions(mask, y.shape)  # validate once, with a clear message, before any metric
        ratio, true_ratio = contrast_ratio(x, mask), contrast_ratio(y, mask)
        return {
            "rmse": rmse(x, y),
            "relative_rmse": relative_rmse(x, y),
            "psnr": psnr(x, y),
            "ssim": ssim(x, y),
            "cnr_db": cnr_db(x, mask),
            "contrast_ratio": ratio,
            "contrast_ratio_true": true_ratio,
            "contrast_ratio_error": abs(ratio - true_ratio) / abs(true_ratio),
        }
    v = np.asarray(valid, dtype=bool)
    if v.shape != y.shape or not v.any():
        raise ValueError(f"valid must be a non-empty boolean image of shape {y.shape}")
    m = np.asarray(mask)
    _regions(m, y.shape)  # the mask's own checks, with their messages
    # the pixel-wise metrics on the inside pixels, as a 1 x n image
    xv, yv, mv = x[v][None, :], y[v][None, :], m[v][None, :]
    _, s_map = ssim(x, y, data_range=float(np.ptp(yv)) or None, full=True)
    radius = SSIM_RADIUS
    inside = v[(slice(radius, -radius),) * v.ndim]
    ratio, true_ratio = contrast_ratio(xv, mv), contrast_ratio(yv, mv)
    return {
        "rmse": rmse(xv, yv),
        "relative_rmse": relative_rmse(xv, yv),
        "psnr": psnr(xv, yv),
        "ssim": float(s_map[inside].mean()) if inside.any() else float(s_map.mean()),
        "cnr_db": cnr_db(xv, mv),
        "contrast_ratio": ratio,
        "contrast_ratio_true": true_ratio,
        "contrast_ratio_error": abs(ratio - true_ratio) / abs(true_ratio),
    }
