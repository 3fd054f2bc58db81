"""Image metrics against values worked out by hand on tiny arrays (pure NumPy, any rank count)."""

import math

import numpy as np
import pytest

from fenics_red.metrics import (
    METRIC_NAMES,
    cnr_db,
    contrast_ratio,
    contrast_ratio_error,
    evaluate_metrics,
    psnr,
    relative_rmse,
    rmse,
    ssim,
)


def _ssim_by_hand(x, y, data_range, sigma=1.5, radius=5, k1=0.01, k2=0.03):
    """SSIM from the definition: an explicit normalised 11 x 11 Gaussian window at each pixel."""
    offsets = np.arange(-radius, radius + 1)
    w = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    w /= w.sum()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    values = []
    for i in range(radius, x.shape[0] - radius):
        for j in range(radius, x.shape[1] - radius):
            px = x[i - radius:i + radius + 1, j - radius:j + radius + 1]
            py = y[i - radius:i + radius + 1, j - radius:j + radius + 1]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            vxy = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * vxy + c2)
                          / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_rmse_and_relative_rmse_by_hand():
    truth = np.ones((2, 2))
    estimate = np.array([[1.0, 2.0], [3.0, 4.0]])  # errors 0, 1, 2, 3: sum of squares 14
    assert rmse(estimate, truth) == pytest.approx(math.sqrt(14 / 4), rel=1e-15)
    assert relative_rmse(estimate, truth) == pytest.approx(math.sqrt(14) / 2, rel=1e-15)


def test_psnr_uses_the_peak_of_the_truth():
    truth = np.array([[0.0, 2.0], [2.0, 2.0]])
    estimate = truth + np.array([[1.0, 0.0], [0.0, -1.0]])  # MSE 0.5, peak 2
    assert psnr(estimate, truth) == pytest.approx(10 * math.log10(4 / 0.5), rel=1e-14)
    # the estimate's own maximum (3) must not change the peak
    assert psnr(estimate, truth) != pytest.approx(10 * math.log10(9 / 0.5))


def test_cnr_and_contrast_ratio_by_hand():
    estimate = np.array([[4.0, 6.0, 1.0], [2.0, 3.0, 2.0]])
    truth = np.array([[6.0, 6.0, 2.0], [2.0, 2.0, 2.0]])
    mask = np.array([[1, 1, 0], [0, 0, 0]])
    # inclusion 4, 6: mean 5, variance 1; background 1, 2, 3, 2: mean 2, variance 0.5
    assert cnr_db(estimate, mask) == pytest.approx(10 * math.log10(2 * 9 / 1.5), rel=1e-14)
    assert cnr_db(estimate, mask) == pytest.approx(20 * math.log10(math.sqrt(12)), rel=1e-14)
    assert contrast_ratio(estimate, mask) == pytest.approx(2.5, rel=1e-15)
    assert contrast_ratio(truth, mask) == pytest.approx(3.0, rel=1e-15)
    assert contrast_ratio_error(estimate, truth, mask) == pytest.approx(1 / 6, rel=1e-14)
    # a boolean mask and a label mask (several inclusions, labels 1 and 2) mean the same
    assert cnr_db(estimate, mask.astype(bool)) == cnr_db(estimate, 2 * mask)


def test_cnr_of_uniform_regions_is_infinite():
    truth = np.where(np.eye(4, dtype=bool), 0.5, 0.1)
    assert cnr_db(truth, np.eye(4)) == math.inf


def test_ssim_of_constant_images_is_the_luminance_term():
    c1_value, c2_value, data_range = 0.5, 1.0, 1.0
    x, y = np.full((12, 13), c1_value), np.full((12, 13), c2_value)
    C1 = (0.01 * data_range) ** 2
    expected = (2 * c1_value * c2_value + C1) / (c1_value**2 + c2_value**2 + C1)
    assert ssim(x, y, data_range=data_range) == pytest.approx(expected, rel=1e-12)


def test_ssim_matches_the_windowed_definition(rng):
    truth = rng.uniform(0.1, 0.8, (14, 17))
    estimate = truth + rng.normal(0, 0.1, truth.shape)
    expected = _ssim_by_hand(estimate, truth, truth.max() - truth.min())
    assert ssim(estimate, truth) == pytest.approx(expected, rel=1e-12)
    value, s_map = ssim(estimate, truth, full=True)
    assert s_map.shape == (14 - 10, 17 - 10)
    assert 0 < value < 1
    # negating the structure makes the covariance term negative
    assert ssim(truth.max() + truth.min() - truth, truth) < 0


def test_identity_is_perfect(rng):
    truth = np.full((16, 16), 0.12)
    mask = np.zeros_like(truth, dtype=bool)
    mask[5:10, 4:9] = True
    truth[mask] = 0.6
    result = evaluate_metrics(truth.copy(), truth, mask)
    assert tuple(result) == METRIC_NAMES
    assert result["rmse"] == 0.0 and result["relative_rmse"] == 0.0
    assert result["psnr"] == math.inf
    assert result["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert result["cnr_db"] == math.inf
    assert result["contrast_ratio"] == pytest.approx(5.0) == result["contrast_ratio_true"]
    assert result["contrast_ratio_error"] == 0.0
    assert all(isinstance(v, float) for v in result.values())


def test_evaluate_metrics_agrees_with_the_single_metrics(rng):
    truth = np.full((13, 15), 0.1)
    mask = np.zeros(truth.shape, dtype=np.uint8)
    mask[3:8, 6:11] = 1
    truth[mask == 1] = 0.5
    estimate = truth * rng.uniform(0.8, 1.2, truth.shape)
    result = evaluate_metrics(estimate, truth, mask)
    assert result["rmse"] == rmse(estimate, truth)
    assert result["psnr"] == psnr(estimate, truth)
    assert result["ssim"] == ssim(estimate, truth)
    assert result["cnr_db"] == cnr_db(estimate, mask)
    assert result["contrast_ratio_error"] == contrast_ratio_error(estimate, truth, mask)
    assert result["relative_rmse"] < 0.2 and result["ssim"] < 1.0


@pytest.mark.parametrize(
    "estimate, truth, mask, message",
    [
        (np.ones((12, 12)), np.ones((12, 11)), np.eye(12), "shape"),
        (np.ones((12, 12)), np.ones((12, 12)), np.eye(11), "mask has shape"),
        (np.full((12, 12), np.nan), np.ones((12, 12)), np.eye(12), "non-finite"),
        (np.ones((12, 12)), np.where(np.eye(12), np.inf, 1.0), np.eye(12), "non-finite"),
        (np.ones((12, 12)), np.ones((12, 12)), np.zeros((12, 12)), "mask is empty"),
        (np.ones((12, 12)), np.ones((12, 12)), np.ones((12, 12)), "whole image"),
        (np.ones(12), np.ones(12), np.ones(12), "2-D"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(estimate, truth, mask, message):
    with pytest.raises(ValueError, match=message):
        evaluate_metrics(estimate, truth, mask)


def test_ssim_input_errors():
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(np.ones((8, 20)), np.arange(160.0).reshape(8, 20))
    with pytest.raises(ValueError, match="constant"):
        ssim(np.ones((12, 12)), np.ones((12, 12)))
    with pytest.raises(ValueError, match="positive"):
        psnr(np.ones((2, 2)), -np.ones((2, 2)))


def test_metrics_over_the_inside_pixels_ignore_the_outside():
    """``valid`` (a mesh's raster mask): all True changes nothing; values outside never enter the
    pixel-wise metrics (SSIM's windows near the edge do see them: the raster fills them from the
    nearest inside pixel)."""
    rng = np.random.default_rng(3)
    truth = np.full((24, 30), 0.12)
    truth[8:14, 10:18] = 0.5
    mask = (truth > 0.2).astype(int)
    estimate = truth + rng.normal(0.0, 0.02, truth.shape)
    everything = evaluate_metrics(estimate, truth, mask)
    same = evaluate_metrics(estimate, truth, mask, np.ones(truth.shape, dtype=bool))
    for name in ("rmse", "relative_rmse", "psnr", "ssim", "cnr_db", "contrast_ratio"):
        assert abs(same[name] - everything[name]) <= 1e-12 * abs(everything[name]), name
    valid = np.ones(truth.shape, dtype=bool)
    valid[:, :4] = False
    spoiled = estimate.copy()
    spoiled[:, :4] = 100.0
    clean = evaluate_metrics(estimate, truth, mask, valid)
    dirty = evaluate_metrics(spoiled, truth, mask, valid)
    assert {k: v for k, v in dirty.items() if k != "ssim"} == {
        k: v for k, v in clean.items() if k != "ssim"}
