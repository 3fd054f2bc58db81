"""The learned denoiser C_w (paper, eqs. 10-12): shapes, scales, identity at start, model files."""

import numpy as np
import pytest
import torch

from fenics_red.denoiser import (
    MODEL_FORMAT,
    Denoiser,
    DenoiserNet,
    UNet,
    UNetConfig,
    count_parameters,
)

TINY = UNetConfig(channels=4, depth=2)


def phantom(shape, rng):
    """A piecewise-constant modulus map: background 0.1-0.15 with a stiffer disc."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    image = np.full(shape, rng.uniform(0.1, 0.15))
    cy, cx, r = rng.uniform(0.3, 0.7) * ny, rng.uniform(0.3, 0.7) * nx, 0.25 * min(shape)
    image[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(0.3, 0.8)
    return image


def perturbed(config=TINY, seed=1) -> Denoiser:
    """A denoiser whose output layer is non-zero (an untrained one is the identity)."""
    denoiser = Denoiser.untrained(config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.network.unet.out.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return denoiser


@pytest.mark.parametrize("shape", [(17, 21), (65, 65), (2, 3), (33, 9)])
def test_the_denoiser_keeps_the_shape_of_any_image(shape, rng):
    denoiser = perturbed()
    image = rng.uniform(0.1, 0.8, shape)
    out = denoiser(image)
    assert out.shape == shape and out.dtype == np.float64
    assert np.isfinite(out).all()
    assert not np.allclose(out, image)  # it does something


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_unet_maps_batches_of_odd_sizes(depth):
    net = UNet(UNetConfig(channels=2, depth=depth))
    assert net(torch.ones(3, 1, 19, 23)).shape == (3, 1, 19, 23)
    with pytest.raises(ValueError, match="batch, 1, height, width"):
        net(torch.ones(1, 19, 23))


@pytest.mark.parametrize("a", [1e3, 2.5, 1e-3, 7.3])
def test_the_denoiser_is_scale_equivariant_to_round_off(a, rng):
    """C(aE) = a C(E): maps in kPa and in normalised units go through the same network."""
    denoiser = perturbed()
    image = phantom((17, 21), rng) + 0.02 * rng.standard_normal((17, 21))
    reference = denoiser(image)
    np.testing.assert_allclose(denoiser(a * image), a * reference,
                               rtol=1e-12, atol=1e-12 * a * np.abs(reference).max())
    np.testing.assert_allclose(denoiser.residual(a * image), a * (image - reference),
                               rtol=1e-9, atol=1e-12 * a * np.abs(reference).max())


def test_an_untrained_denoiser_is_the_identity(rng):
    denoiser = Denoiser.untrained(TINY)
    image = rng.uniform(0.1, 0.8, (17, 21))
    np.testing.assert_array_equal(denoiser(image), image)
    np.testing.assert_array_equal(denoiser.residual(image), np.zeros_like(image))


def test_the_residual_is_the_image_minus_its_denoised_version(rng):
    """∇R(E) = E − C(E) (eq. 10), computed without the cancellation of the subtraction."""
    denoiser = perturbed()
    image = rng.uniform(0.1, 0.8, (17, 21))
    np.testing.assert_allclose(denoiser.residual(image), image - denoiser(image),
                               atol=1e-14 * np.abs(image).max())


def test_bad_images_are_refused_with_a_message():
    denoiser = Denoiser.untrained(TINY)
    with pytest.raises(ValueError, match="2-D"):
        denoiser(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        denoiser(np.array([[1.0, np.nan], [1.0, 1.0]]))


def test_save_and_load_round_trip_exactly(tmp_path, rng):
    denoiser = perturbed(UNetConfig(channels=3, depth=1))
    path = denoiser.save(tmp_path / "model.pt", {"note": "test", "values": [1, 2.5]})
    loaded = Denoiser.load(path)
    assert loaded.config == denoiser.config
    assert loaded.card == {"note": "test", "values": [1, 2.5]}
    for (k1, v1), (k2, v2) in zip(denoiser.network.state_dict().items(),
                                  loaded.network.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    image = rng.uniform(0.1, 0.8, (9, 13))
    np.testing.assert_array_equal(loaded(image), denoiser(image))
    assert torch.load(path, weights_only=True)["format"] == MODEL_FORMAT


def test_save_refuses_to_replace_a_file_unless_asked(tmp_path):
    denoiser = Denoiser.untrained(TINY)
    denoiser.save(tmp_path / "model.pt")
    with pytest.raises(FileExistsError):
        denoiser.save(tmp_path / "model.pt", overwrite=False)
    with pytest.raises(ValueError, match="JSON"):
        denoiser.save(tmp_path / "other.pt", {"bad": object()})


def test_a_missing_model_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Denoiser.load(tmp_path / "nothing.pt")


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_a_corrupt_model_file_is_a_clear_value_error(tmp_path, rng, damage):
    path = Denoiser.untrained(TINY).save(tmp_path / "model.pt")
    raw = path.read_bytes()
    bad = {"random": rng.bytes(len(raw)), "truncated": raw[: len(raw) // 2], "empty": b""}[damage]
    path.write_bytes(bad)
    with pytest.raises(ValueError, match="not a torch file.*corrupt"):
        Denoiser.load(path)


def test_a_torch_file_of_something_else_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fenics-red denoiser"):
        Denoiser.load(tmp_path / "other.pt")


def test_weights_that_do_not_match_the_architecture_are_refused(tmp_path):
    path = Denoiser.untrained(TINY).save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["architecture"]["channels"] = 8
    torch.save(payload, path)
    with pytest.raises(ValueError, match="do not match its architecture"):
        Denoiser.load(path)


def test_another_format_version_is_refused(tmp_path):
    path = Denoiser.untrained(TINY).save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(ValueError, match="format version 99"):
        Denoiser.load(path)


def test_architecture_settings_are_checked():
    with pytest.raises(ValueError, match="channels"):
        UNetConfig(channels=0)
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"name": "unet", "channels": 4, "depth": 2, "width": 3})
    assert UNetConfig.from_dict(TINY.to_dict()) == TINY
    assert count_parameters(TINY) == sum(p.numel() for p in DenoiserNet(TINY).parameters())


def test_the_default_denoiser_is_small():
    """A few MB at most in the package: under a million parameters (float32)."""
    assert count_parameters(UNetConfig()) < 1_000_000


def test_the_shipped_model_is_a_few_mb_trained_on_540_phantoms_at_35_db():
    from fenics_red.red import default_denoiser_path, load_denoiser

    path = default_denoiser_path()
    assert path.stat().st_size < 5_000_000  # float16 weights
    model = load_denoiser()
    card = model.card
    assert card["trained"] and card["stored_weights"] == "float16"
    assert count_parameters(model.config) == card["parameters"]
    sources = card["data"]["recipe"]["sources"]  # one per pairs file
    at_35 = [s for s in sources if s["data_attrs"]["snr_db"] == 35.0]
    assert sum(s["pairs"] for s in at_35) >= 540 and 35.0 in card["data"]["snr_db"]
    assert card["validation"]["denoised_rel_error"] < 0.7 * card["validation"]["input_rel_error"]


def test_the_flip_average_is_exactly_left_right_equivariant(rng):
    averaged = perturbed(UNetConfig(channels=4, depth=2))
    plain = Denoiser(averaged.network, flip_average=False)
    image = phantom((17, 21), rng)
    flipped = image[:, ::-1]
    np.testing.assert_allclose(averaged(flipped), averaged(image)[:, ::-1], rtol=1e-12)
    np.testing.assert_allclose(averaged(image),  # the network runs in float32, as a batch
                               0.5 * (plain(image) + plain(flipped)[:, ::-1]), rtol=1e-6)
    np.testing.assert_allclose(averaged.residual(image), image - averaged(image), rtol=1e-10,
                               atol=1e-14)
    # the network alone is not: the average is what makes it so
    assert np.abs(plain(flipped) - plain(image)[:, ::-1]).max() > 1e-6


def test_weights_stored_in_half_precision_halve_the_file(tmp_path, rng):
    denoiser = perturbed(UNetConfig(channels=8, depth=2))
    full = denoiser.save(tmp_path / "full.pt", {"note": "float32"})
    half = denoiser.save(tmp_path / "half.pt", {"note": "float16"}, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = Denoiser.load(half)
    assert loaded.card == {"note": "float16", "stored_weights": "float16"}
    assert all(v.dtype == torch.float32 for v in loaded.network.state_dict().values()
               if v.is_floating_point())  # computed in float32 again
    image = phantom((17, 17), rng)
    change = np.linalg.norm(loaded(image) - denoiser(image)) / np.linalg.norm(image)
    assert 0 < change < 1e-3


def test_the_shipped_configuration_has_32_channels_and_1_925_025_parameters():
    from fenics_red.red import load_denoiser

    config = load_denoiser().config
    assert config.channels == 32 and count_parameters(config) == 1_925_025


def test_the_shipped_denoiser_improves_ml_estimates_of_phantoms_it_never_saw():
    """Run ``fenics_red/data/denoiser.pt`` itself on data: four fresh phantoms (a seed that is
    not a training or validation seed), 64², 35 dB, their ML estimates by the recipe."""
    from mpi4py import MPI

    from fenics_red.data import SimulationSettings, simulate_sample
    from fenics_red.raster import ImageGrid
    from fenics_red.red import load_denoiser
    from fenics_red.solvers import MLReconstructor

    grid = ImageGrid(64, 64)
    settings = SimulationSettings(grid, snr_db=35.0, seed=424242)
    denoiser = load_denoiser()
    ml = MLReconstructor(grid, comm=MPI.COMM_SELF)
    before, after = [], []
    try:
        for i in range(4):
            sample = simulate_sample(i, settings)
            estimate, _ = ml.run_sample(sample)
            denoised = np.asarray(denoiser(estimate))
            norm = np.linalg.norm(sample.E)
            before.append(np.linalg.norm(estimate - sample.E) / norm)
            after.append(np.linalg.norm(denoised - sample.E) / norm)
    finally:
        ml.destroy()
    assert np.isfinite(after).all()
    assert np.mean(after) < 0.75 * np.mean(before)
    assert sum(a < b for a, b in zip(after, before, strict=True)) >= 3
