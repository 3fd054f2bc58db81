"""The learned denoiser C_w (paper, eqs. 10-12): shapes, scales, identity at start, model files."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fenics_red.denoiser import (
    DEFAULT_3D_CONFIG,
    MODEL_FORMAT,
    Denoiser,
    DenoiserNet,
    SliceWiseDenoiser,
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


def assert_scale_equivariant(denoiser, x, a: float) -> None:
    """``C(a x) = a C(x)`` and ``R(a x) = a R(x)`` to round-off, for a ``C`` that changes ``x``."""
    reference = denoiser(x)
    assert not np.allclose(reference, x)
    np.testing.assert_allclose(denoiser(a * x), a * reference,
                               rtol=1e-12, atol=1e-12 * a * np.abs(reference).max())
    np.testing.assert_allclose(denoiser.residual(a * x), a * (x - reference),
                               rtol=1e-9, atol=1e-12 * a * np.abs(reference).max())


@pytest.mark.parametrize("a", [1e3, 2.5, 1e-3, 7.3])
def test_the_denoiser_is_scale_equivariant_to_round_off(a, rng):
    """C(aE) = a C(E): maps in kPa and in normalised units go through the same network."""
    denoiser = perturbed()
    image = phantom((17, 21), rng) + 0.02 * rng.standard_normal((17, 21))
    assert_scale_equivariant(denoiser, image, a)


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
    with pytest.raises(ValueError, match="2-D"):
        denoiser(np.ones(5))
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


@pytest.mark.usefixtures("one_process")
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


# -- 3-D: volumes (nz+1, ny+1, nx+1), axis 0 the depth (the load), 1 the elevation y, 2 lateral x --

TINY_3D = UNetConfig(channels=4, depth=2, dims=3)
#: The physically allowed flips of a volume: x (axis 2), y (axis 1) and both.
ALLOWED_FLIPS = {"x": (2,), "y": (1,), "x and y": (1, 2)}


def phantom_3d(shape, rng):
    """A piecewise-constant modulus volume: background 0.1-0.15 with a stiffer ball."""
    z, y, x = np.mgrid[tuple(slice(0, n) for n in shape)]
    volume = np.full(shape, rng.uniform(0.1, 0.15))
    centre = [rng.uniform(0.3, 0.7) * n for n in shape]
    r = 0.3 * min(shape)
    volume[(z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < r**2] = \
        rng.uniform(0.3, 0.8)
    return volume


def noisy_phantom_3d(shape, rng):
    return phantom_3d(shape, rng) * (1 + 0.1 * rng.standard_normal(shape))


@pytest.mark.parametrize("shape", [(9, 11, 13), (2, 3, 5), (17, 9, 9)])
def test_the_3d_denoiser_keeps_the_shape_of_volumes_of_odd_sizes(shape, rng):
    denoiser = perturbed(TINY_3D)
    assert denoiser.dims == 3
    volume = rng.uniform(0.1, 0.8, shape)
    out = denoiser(volume)
    assert out.shape == shape and out.dtype == np.float64
    assert np.isfinite(out).all()
    assert not np.allclose(out, volume)  # it does something


def test_the_3d_unet_maps_batches_of_volumes_and_refuses_images():
    net = UNet(UNetConfig(channels=2, depth=2, dims=3))
    assert net(torch.ones(2, 1, 9, 11, 13)).shape == (2, 1, 9, 11, 13)
    with pytest.raises(ValueError, match=r"\(batch, 1, depth, height, width\)"):
        net(torch.ones(2, 1, 11, 13))


@pytest.mark.parametrize("a", [1e3, 2.5, 1e-3, 7.3])
def test_the_3d_denoiser_is_scale_equivariant_to_round_off(a, rng):
    denoiser = perturbed(TINY_3D)
    volume = noisy_phantom_3d((9, 11, 13), rng)
    assert_scale_equivariant(denoiser, volume, a)


def test_an_untrained_3d_denoiser_is_the_identity(rng):
    denoiser = Denoiser.untrained(TINY_3D)
    volume = rng.uniform(0.1, 0.8, (9, 11, 13))
    np.testing.assert_array_equal(denoiser(volume), volume)
    np.testing.assert_array_equal(denoiser.residual(volume), np.zeros_like(volume))


@pytest.mark.parametrize("flip", ALLOWED_FLIPS)
def test_the_3d_flip_average_is_exactly_equivariant_under_the_x_and_y_flips(flip, rng):
    """The load is along the depth: x → −x and y → −y (and both) are symmetries, depth is not."""
    axes = ALLOWED_FLIPS[flip]
    averaged = perturbed(TINY_3D)
    plain = Denoiser(averaged.network, flip_average=False)
    volume = noisy_phantom_3d((9, 11, 13), rng)
    flipped = np.flip(volume, axes)
    reference = averaged(volume)
    np.testing.assert_allclose(averaged(flipped), np.flip(reference, axes), rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(averaged.residual(flipped), np.flip(volume - reference, axes),
                               rtol=1e-9, atol=1e-15)
    # the average over the group of four flips, computed as one batch in float32
    group = [(), (2,), (1,), (1, 2)]
    mean = sum(np.flip(plain(np.flip(volume, g)), g) if g else plain(volume) for g in group) / 4
    np.testing.assert_allclose(reference, mean, rtol=1e-6)
    # the network alone is not equivariant: the average is what makes it so
    assert np.abs(plain(flipped) - np.flip(plain(volume), axes)).max() > 1e-6


def test_the_3d_denoiser_does_not_average_over_the_depth_flip(rng):
    """Flipping the depth turns the loaded face over: not a symmetry, not imposed."""
    denoiser = perturbed(TINY_3D)
    volume = noisy_phantom_3d((9, 11, 13), rng)
    assert np.abs(denoiser(volume[::-1]) - denoiser(volume)[::-1]).max() > 1e-6


def test_a_3d_model_saves_and_loads_exactly(tmp_path, rng):
    denoiser = perturbed(TINY_3D)
    path = denoiser.save(tmp_path / "model3d.pt", {"note": "3-D"})
    payload = torch.load(path, weights_only=True)
    assert payload["architecture"] == {"name": "unet", "channels": 4, "depth": 2, "dims": 3}
    loaded = Denoiser.load(path)
    assert loaded.config == TINY_3D and loaded.dims == 3 and loaded.card == {"note": "3-D"}
    volume = rng.uniform(0.1, 0.8, (9, 11, 13))
    np.testing.assert_array_equal(loaded(volume), denoiser(volume))
    half = Denoiser.load(denoiser.save(tmp_path / "half.pt", half=True))
    change = np.linalg.norm(half(volume) - denoiser(volume)) / np.linalg.norm(volume)
    assert 0 < change < 1e-3


def test_an_input_of_the_other_dimension_is_refused_in_one_line(rng):
    volume_model, image_model = Denoiser.untrained(TINY_3D), Denoiser.untrained(TINY)
    for bad in (np.ones((9, 11)), np.ones((2, 9, 11, 13)), np.ones((0, 3, 4))):
        with pytest.raises(ValueError, match=r"^a 3-D denoiser takes non-empty volumes of shape "
                                             r"\(nz\+1, ny\+1, nx\+1\), got shape") as error:
            volume_model(bad)
        assert "\n" not in str(error.value)
        with pytest.raises(ValueError, match="3-D denoiser takes"):
            volume_model.residual(bad)
    with pytest.raises(ValueError, match=r"^a 2-D denoiser takes .*\(ny\+1, nx\+1\), got shape "
                                         r"\(9, 11, 13\).*slicewise"):
        image_model(np.ones((9, 11, 13)))


def test_the_dims_of_an_architecture_are_2_or_3_and_2_when_absent():
    assert UNetConfig().dims == 2 and UNetConfig.from_dict({"channels": 4, "depth": 2}) == TINY
    assert "dims" not in TINY.to_dict()  # 2-D files are written as before 3-D networks existed
    assert UNetConfig.from_dict(TINY_3D.to_dict()) == TINY_3D
    for bad in (1, 4, True, 3.0, "3"):
        with pytest.raises(ValueError, match="dims must be 2"):
            UNetConfig(dims=bad)


def test_a_model_file_written_before_3d_networks_loads_as_2d(tmp_path, rng):
    """The shipped model's file has no ``dims``; an older file like it loads as a 2-D model."""
    from fenics_red.red import default_denoiser_path

    shipped = torch.load(default_denoiser_path(), weights_only=True)
    assert "dims" not in shipped["architecture"]
    path = perturbed(TINY).save(tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["architecture"] == {"name": "unet", "channels": 4, "depth": 2}
    loaded = Denoiser.load(path)
    assert loaded.dims == 2
    image = rng.uniform(0.1, 0.8, (9, 13))
    np.testing.assert_array_equal(loaded(image), perturbed(TINY)(image))


def reference_2d_denoiser(network: DenoiserNet, image: np.ndarray) -> np.ndarray:
    """The 2-D flip-averaged denoiser as it was computed before 3-D networks existed, written
    out in ``torch.nn.functional`` calls on the network's weights (a positive image)."""
    state, depth = network.state_dict(), network.config.depth

    def conv(h, name, padding=1):
        return F.conv2d(h, state[f"unet.{name}.weight"], state[f"unet.{name}.bias"],
                        padding=padding)

    def block(h, name):
        return F.silu(conv(F.silu(conv(h, f"{name}.0")), f"{name}.2"))

    x = torch.from_numpy(image)[None, None]
    batch = torch.cat([x, x.flip(-1)])
    scale = batch.abs().flatten(1).median(dim=1).values.reshape(-1, 1, 1, 1)
    h = (batch / scale).to(torch.float32)
    height, width = h.shape[-2:]
    pad_h, pad_w = (-height) % 2**depth, (-width) % 2**depth
    top, left = pad_h // 2, pad_w // 2
    h = F.pad(h, (left, pad_w - left, top, pad_h - top), mode="reflect")
    h, skips = block(h, "inc"), []
    for i in range(depth):
        skips.append(h)
        h = block(F.avg_pool2d(h, 2), f"down.{i}")
    for i in reversed(range(depth)):
        up = F.conv_transpose2d(h, state[f"unet.upsample.{i}.weight"],
                                state[f"unet.upsample.{i}.bias"], stride=2)
        h = block(torch.cat([skips.pop(), up], dim=1), f"up.{i}")
    h = conv(h, "out", padding=0)[..., top:top + height, left:left + width]
    residual = h.to(torch.float64) * scale
    return image - (0.5 * (residual[0, 0] + residual[1, 0].flip(-1))).numpy()


@pytest.mark.parametrize("shape", [(65, 65), (17, 21)])
def test_the_shipped_model_gives_bit_for_bit_what_the_2d_denoiser_gave(shape, rng):
    from fenics_red.red import load_denoiser

    denoiser = load_denoiser()
    assert denoiser.dims == 2
    image = phantom(shape, rng) * (1 + 0.1 * rng.standard_normal(shape))
    with torch.inference_mode():
        expected = reference_2d_denoiser(denoiser.network, image)
    np.testing.assert_array_equal(denoiser(image), expected)


def test_the_small_default_3d_network_has_85_017_parameters():
    assert DEFAULT_3D_CONFIG == UNetConfig(channels=8, depth=2, dims=3)
    assert count_parameters(DEFAULT_3D_CONFIG) == 85_017
    assert count_parameters(TINY_3D) == sum(p.numel() for p in DenoiserNet(TINY_3D).parameters())
    # a 3 x 3 x 3 convolution has 3 times the weights of a 3 x 3 one (the 2 x 2 x 2 transposed
    # convolutions twice, biases and the 1 x 1 x 1 output layer the same)
    assert 2.8 < count_parameters(TINY_3D) / count_parameters(TINY) < 3


# -- a 2-D model on volumes, slice by slice --------------------------------------------------------

@pytest.mark.parametrize("scale", ["volume", "slice"])
@pytest.mark.parametrize("a", [1e3, 7.3])
def test_the_slicewise_denoiser_is_scale_equivariant_to_round_off(scale, a, rng):
    denoiser = perturbed().slicewise(scale)
    volume = noisy_phantom_3d((9, 11, 13), rng)
    reference = denoiser(volume)
    assert not np.allclose(reference, volume)
    np.testing.assert_allclose(denoiser(a * volume), a * reference,
                               rtol=1e-12, atol=1e-12 * a * np.abs(reference).max())


@pytest.mark.parametrize("scale", ["volume", "slice"])
@pytest.mark.parametrize("flip", ALLOWED_FLIPS)
def test_the_slicewise_denoiser_is_exactly_equivariant_under_the_x_and_y_flips(scale, flip, rng):
    """x: the 2-D model's left-right average on each slice; y: it reverses the slices' order."""
    axes = ALLOWED_FLIPS[flip]
    denoiser = perturbed().slicewise(scale)
    volume = noisy_phantom_3d((9, 11, 13), rng)
    np.testing.assert_allclose(denoiser(np.flip(volume, axes)), np.flip(denoiser(volume), axes),
                               rtol=1e-12, atol=1e-15)


#: A batch against single images through the float32 network: round-off of the outputs.
BATCH_ATOL = 1e-8


def test_the_slicewise_denoiser_with_slice_scales_is_the_2d_denoiser_on_each_slice(rng):
    """Each axial-lateral plane volume[:, j, :] is denoised as a 2-D image.

    To float32 round-off (``BATCH_ATOL``): one batch of slices and single images may take other
    convolution kernels (thread counts differ under ``mpirun``); a wrong slice axis is 1e-2 off.
    """
    image_model = perturbed()
    volume = noisy_phantom_3d((9, 11, 13), rng)
    expected = np.stack([image_model(volume[:, j, :]) for j in range(11)], axis=1)
    slicewise = SliceWiseDenoiser(image_model, scale="slice")
    np.testing.assert_allclose(slicewise(volume), expected, rtol=0, atol=BATCH_ATOL)
    np.testing.assert_allclose(slicewise.residual(volume), volume - expected, rtol=0,
                               atol=BATCH_ATOL)


def test_the_slicewise_denoiser_divides_every_slice_by_the_volume_median(rng):
    """With one scale for the volume, a slice is denoised as the 2-D model would denoise it if
    its median were the volume's: equal when every slice has the volume's median..."""
    image_model = perturbed()
    slicewise = image_model.slicewise()
    volume = np.full((9, 11, 13), 0.12)  # background: over half of every slice
    volume[2:6, 3:8, 4:9] = rng.uniform(0.3, 0.8, (4, 5, 5))
    expected = np.stack([image_model(volume[:, j, :]) for j in range(11)], axis=1)
    np.testing.assert_allclose(slicewise(volume), expected, rtol=0, atol=BATCH_ATOL)
    # ...and different for a slice through a large inclusion, whose own median is the inclusion
    volume = np.full((9, 11, 13), 0.12)
    volume[:, 5, :] = 0.5
    volume[0, 5, 0] = 0.12
    by_slice = SliceWiseDenoiser(image_model, scale="slice")(volume)
    assert np.abs(slicewise(volume)[:, 5] - by_slice[:, 5]).max() > 1e-6
    np.testing.assert_allclose(slicewise(volume)[:, 4], by_slice[:, 4], rtol=0, atol=BATCH_ATOL)


def test_the_slicewise_denoiser_takes_volumes_and_a_2d_model(rng):
    image_model = Denoiser.untrained(TINY, seed=3)
    slicewise = image_model.slicewise()
    assert slicewise.dims == 3 and slicewise.card is image_model.card
    assert slicewise.config == TINY and slicewise.flip_average
    volume = rng.uniform(0.1, 0.8, (9, 11, 13))
    np.testing.assert_array_equal(slicewise(volume), volume)  # untrained: the identity
    with pytest.raises(ValueError, match=r"3-D denoiser takes .*\(nz\+1, ny\+1, nx\+1\)"):
        slicewise(np.ones((9, 11)))
    with pytest.raises(ValueError, match="needs a 2-D Denoiser"):
        SliceWiseDenoiser(Denoiser.untrained(TINY_3D))
    with pytest.raises(ValueError, match="'volume' or 'slice'"):
        image_model.slicewise("pixel")
