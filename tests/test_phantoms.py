"""Specification of the phantoms: stiff inclusions in a soft background (paper, section 5).

Pure numpy: every rank runs the same checks on its own, with no communication.
"""

from mpi4py import MPI

import numpy as np
import pytest
from scipy import ndimage

from fenics_red import ImageGrid
from fenics_red.phantoms import (
    FAMILIES,
    HELD_OUT_FAMILIES,
    SHAPES,
    TRAINING_FAMILIES,
    PhantomSettings,
    load_mask_folder,
    mask_phantom,
    random_phantom,
    read_mask,
    resize_mask,
)

GRID = ImageGrid(24, 20, 1.2, 1.0)

#: sha256 (first 16 hex digits) of the default phantoms of seeds 0-2 on GRID, as drawn before
#: phantom families were added (test_the_paper_family_draws_what_it_drew_before_families_existed).
_PAPER_DIGEST = "0563d0ba78ca07f6"


def _rank_dir(mpi_tmp_path):
    """A folder of this rank's own inside the shared temporary folder."""
    path = mpi_tmp_path / f"rank{MPI.COMM_WORLD.rank}"
    path.mkdir()
    return path


def _check_moduli(E, labels, settings, sharp=True):
    """The paper's bounds: background and inclusions uniform in their ranges, ratio 2-8."""
    assert E.shape == labels.shape == GRID.shape
    assert E.dtype == np.float64 and labels.dtype == np.int32
    assert np.isfinite(E).all()
    lo = min(settings.background[0], settings.inclusion[0])
    hi = max(settings.background[1], settings.inclusion[1])
    assert lo <= E.min() and E.max() <= hi
    n = int(labels.max())
    assert n >= 1 and set(np.unique(labels)) == set(range(n + 1))  # labels 0..K, none missing
    if sharp:
        background = np.unique(E[labels == 0])
        assert len(background) == 1
        b = background[0]
        assert settings.background[0] <= b <= settings.background[1]
        for k in range(1, n + 1):
            values = np.unique(E[labels == k])
            assert len(values) == 1, f"inclusion {k} is not uniform"
            assert settings.inclusion[0] <= values[0] <= settings.inclusion[1]
            assert 2.0 - 1e-12 <= values[0] / b <= 8.0 + 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_gives_uniform_inclusions_within_the_paper_bounds(shape):
    settings = PhantomSettings(shapes=(shape,))
    for seed in range(8):
        E, labels = random_phantom(GRID, np.random.default_rng(seed), settings)
        _check_moduli(E, labels, settings)
        assert settings.n_inclusions[0] <= labels.max() <= settings.n_inclusions[1]
        # inclusions keep off the field's edges (one-cell margin)
        border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        assert not border.any()


def test_mixed_shapes_and_the_stiffness_ratio_over_many_phantoms():
    settings = PhantomSettings()
    ratios = []
    for seed in range(40):
        E, labels = random_phantom(GRID, np.random.default_rng(seed), settings)
        _check_moduli(E, labels, settings)
        ratios.append(E.max() / E.min())
    assert 2.0 <= min(ratios) and max(ratios) <= 8.0
    assert max(ratios) - min(ratios) > 1.5  # the ratio really varies


def test_phantoms_are_deterministic_given_the_generator():
    a = random_phantom(GRID, np.random.default_rng(7))
    b = random_phantom(GRID, np.random.default_rng(7))
    c = random_phantom(GRID, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_inclusion_sizes_span_a_few_cells_to_a_third_of_the_field():
    grid = ImageGrid(48, 48)
    settings = PhantomSettings(shapes=("circle",), n_inclusions=(1, 1), min_size=3.0,
                               max_size=1 / 3)
    diameters = []
    for seed in range(60):
        _, labels = random_phantom(grid, np.random.default_rng(seed), settings)
        rows, cols = np.nonzero(labels == 1)
        diameters.append(max(np.ptp(rows), np.ptp(cols)) + 1)  # extent in nodes
    assert min(diameters) <= 6  # a few cells
    assert max(diameters) >= 12  # large ones too
    assert max(diameters) <= 48 / 3 + 1  # never more than a third of the field


def test_inclusions_do_not_overlap_or_touch_unless_asked():
    settings = PhantomSettings(n_inclusions=(4, 4), max_size=0.3)
    for seed in range(10):
        _, labels = random_phantom(GRID, np.random.default_rng(seed), settings)
        for k in range(1, labels.max() + 1):
            grown = ndimage.binary_dilation(labels == k, iterations=1)
            assert set(np.unique(labels[grown])) <= {0, k}


def test_soft_edges_ramp_between_background_and_inclusion_and_keep_the_labels():
    grid = ImageGrid(32, 32)
    sharp = PhantomSettings(shapes=("circle",), n_inclusions=(1, 1), min_size=10)
    soft = PhantomSettings(shapes=("circle",), n_inclusions=(1, 1), min_size=10, soft_edge=3.0)
    E0, labels0 = random_phantom(grid, np.random.default_rng(3), sharp)
    E1, labels1 = random_phantom(grid, np.random.default_rng(3), soft)
    assert np.array_equal(labels0, labels1)  # labels mark the sharp shape
    b, v = E0.min(), E0.max()
    assert np.isclose(E1.min(), b) and np.isclose(E1.max(), v)
    between = (E1 > b + 1e-9) & (E1 < v - 1e-9)
    assert between.sum() > 10  # a real ramp
    assert (E1[labels1 > 0] > 0.5 * (b + v)).all()  # past the midpoint inside
    assert (E1[labels1 == 0] < 0.5 * (b + v)).all()
    assert len(np.unique(E0)) == 2  # sharp phantoms take two values only


def test_a_grid_too_small_for_an_inclusion_is_refused():
    with pytest.raises(ValueError, match="too small"):
        random_phantom(ImageGrid(4, 4), np.random.default_rng(0), PhantomSettings(min_size=3))


@pytest.mark.parametrize("kwargs, message", [
    ({"background": (0.2, 0.1)}, "background"),
    ({"background": (0.0, 0.1)}, "strictly positive"),
    ({"inclusion": (0.3,)}, "pair"),
    ({"n_inclusions": (0, 2)}, "n_inclusions"),
    ({"n_inclusions": (1.5, 2)}, "integers"),
    ({"shapes": ("circle", "star")}, "subset"),
    ({"shapes": ()}, "subset"),
    ({"min_size": 0.5}, "min_size"),
    ({"max_size": 1.5}, "max_size"),
    ({"max_aspect": 0.5}, "max_aspect"),
    ({"soft_edge": -1}, "soft_edge"),
])
def test_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PhantomSettings(**kwargs)


def test_settings_round_trip_through_a_dictionary():
    settings = PhantomSettings(n_inclusions=(2, 3), shapes=("blob", "polygon"), soft_edge=1.5)
    assert PhantomSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="unknown phantom settings"):
        PhantomSettings.from_dict({**settings.to_dict(), "colour": "red"})


# -- user masks ------------------------------------------------------------------------------------

def _two_discs(shape=(60, 80)):
    rows, cols = np.mgrid[0: shape[0], 0: shape[1]]
    a = (rows - 20) ** 2 + (cols - 20) ** 2 < 10**2
    b = (rows - 40) ** 2 + (cols - 58) ** 2 < 12**2
    return a | b


def test_each_connected_component_of_a_mask_becomes_one_inclusion():
    settings = PhantomSettings()
    E, labels = mask_phantom(_two_discs(), GRID, np.random.default_rng(0), settings)
    assert labels.max() == 2
    _check_moduli(E, labels, settings)
    # the resized mask keeps the area fraction of the original
    assert abs((labels > 0).mean() - _two_discs().mean()) < 0.03


def test_masks_are_read_from_png_and_npy_in_grey_colour_and_boolean(mpi_tmp_path):
    from matplotlib import image as mpl_image

    folder = _rank_dir(mpi_tmp_path)
    mask = _two_discs()
    np.save(folder / "a.npy", mask)  # boolean
    np.save(folder / "b.npy", mask.astype(np.uint8) * 255)  # 0/255 grey
    mpl_image.imsave(folder / "c.png", mask.astype(float), cmap="gray")  # RGBA PNG
    (folder / "notes.txt").write_text("not a mask")  # ignored
    for name in ("a.npy", "b.npy", "c.png"):
        assert np.array_equal(read_mask(folder / name), mask), name
    names, masks, sha = load_mask_folder(folder, GRID)
    assert names == ["a.npy", "b.npy", "c.png"]
    assert masks.shape == (3, *GRID.shape) and masks.dtype == bool
    assert np.array_equal(masks[0], resize_mask(mask, GRID))
    assert load_mask_folder(folder, GRID)[2] == sha  # a stable fingerprint
    np.save(folder / "b.npy", np.flipud(mask))
    assert load_mask_folder(folder, GRID)[2] != sha  # that changes with the masks


def test_every_label_of_a_label_image_is_an_inclusion_and_an_inverted_mask_is_warned(
        mpi_tmp_path):
    """Labels 1, 2, 3 on 0 (as .npy and as an 8-bit PNG, which matplotlib reads as k/255): all
    three discs are inclusions (a halfway threshold dropped label 1), while a grey mask keeps
    the halfway threshold. A mask whose "inclusions" cover most of it, an inverted one, is
    warned about."""
    from PIL import Image

    folder = _rank_dir(mpi_tmp_path)
    y, x = np.mgrid[0:60, 0:90]
    labels = np.zeros((60, 90), dtype=np.uint8)
    for k, cx in enumerate((15, 45, 75), start=1):
        labels[(x - cx) ** 2 + (y - 30) ** 2 < 64] = k
    np.save(folder / "labels.npy", labels)
    Image.fromarray(labels).save(folder / "labels.png")
    for name in ("labels.npy", "labels.png"):
        assert np.array_equal(read_mask(folder / name), labels > 0), name
    # a grey mask with a few faint specks (a JPEG's noise) is thresholded halfway: the specks
    # are no inclusions (every level above the darkest made them 141)
    speckled = (labels > 0).astype(np.uint8) * 255
    speckled[::7, ::11] = np.where(speckled[::7, ::11] == 0, 2, 253)
    Image.fromarray(speckled).save(folder / "speckled.png")
    assert np.array_equal(read_mask(folder / "speckled.png"), labels > 0)
    np.save(folder / "inverted.npy", (labels == 0).astype(np.uint8) * 255)
    with pytest.warns(UserWarning, match="an inverted mask"):
        read_mask(folder / "inverted.npy")


def test_bad_masks_are_refused_with_the_file_named(mpi_tmp_path):
    folder = _rank_dir(mpi_tmp_path)
    with pytest.raises(ValueError, match="no .png or .npy"):
        load_mask_folder(folder, GRID)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mask_folder(folder / "missing", GRID)
    np.save(folder / "flat.npy", np.zeros((10, 10)))
    with pytest.raises(ValueError, match="flat.npy.*constant"):
        load_mask_folder(folder, GRID)
    (folder / "flat.npy").unlink()
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read mask image .*broken.png"):
        load_mask_folder(folder, GRID)
    (folder / "broken.png").unlink()
    tiny = np.zeros((200, 200), dtype=bool)
    tiny[100, 100] = True  # one pixel: nothing left on a 24 x 20 grid
    np.save(folder / "tiny.npy", tiny)
    with pytest.raises(ValueError, match="tiny.npy.*smaller than a cell"):
        load_mask_folder(folder, GRID)


# -- bad requests and inputs refused, never quietly changed ---------------------------------------

def test_more_inclusions_than_fit_are_refused_saying_how_many_fit():
    """--inclusions 100 100 on a 64² grid: an error naming how many fitted, not 8 quietly."""
    with pytest.raises(ValueError, match=r"only \d+ of the at least 100 inclusions asked for fit "
                                         r"on the 64 x 64 grid.*--inclusions MIN MAX"):
        random_phantom(ImageGrid(64, 64), np.random.default_rng(0),
                       PhantomSettings(n_inclusions=(100, 100)))


def test_fewer_inclusions_than_drawn_but_at_least_min_are_kept_as_before():
    """MIN 1, MAX 100: the phantom has between 1 and the drawn number (the draws of the default
    settings, and so the data sets of a seed, are unchanged)."""
    settings = PhantomSettings(n_inclusions=(1, 100))
    for seed in range(3):
        _, labels = random_phantom(ImageGrid(32, 32), np.random.default_rng(seed), settings)
        assert 1 <= labels.max() < 100
    E, labels = random_phantom(GRID, np.random.default_rng(7), PhantomSettings())
    E_again, _ = random_phantom(GRID, np.random.default_rng(7), PhantomSettings())
    assert np.array_equal(E, E_again) and 1 <= labels.max() <= 4


def test_the_simulate_command_refuses_too_many_inclusions_in_one_line(mpi_tmp_path, capsys):
    from fenics_red.cli import main

    out = mpi_tmp_path / "set.h5"
    assert main(["simulate", "--samples", "2", "--grid", "16", "--inclusions", "100", "100",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    if MPI.COMM_WORLD.rank == 0:
        assert "of the at least 100 inclusions asked for fit" in err
    assert not out.exists()


def test_a_text_file_named_npy_is_said_not_to_be_a_npy_file(mpi_tmp_path):
    folder = _rank_dir(mpi_tmp_path)
    (folder / "mask.npy").write_text("0 1 1 0\n0 1 1 0\n")
    with pytest.raises(ValueError, match="mask.npy'?: it is not a .npy array file") as error:
        load_mask_folder(folder, GRID)
    assert "pickled" not in str(error.value)
    (folder / "mask.npy").unlink()
    (folder / "mask.png").write_text("not a picture")
    with pytest.raises(ValueError, match="mask.png'?: it is not a PNG file"):
        load_mask_folder(folder, GRID)


def _png_header(width: int, height: int) -> bytes:
    """The signature and IHDR chunk of a grey 8-bit PNG of that size (no image data)."""
    import struct
    import zlib

    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body
            + struct.pack(">I", zlib.crc32(body)))


def test_huge_mask_images_are_refused_from_their_header_before_decoding(mpi_tmp_path,
                                                                        monkeypatch):
    """A 20000² PNG (1.6 MB on disk) decodes to more than 6 GB: refused from the size in its
    header, as is a 20000² .npy (a sparse file here), under FENICS_RED_MEMORY_LIMIT."""
    folder = _rank_dir(mpi_tmp_path)
    monkeypatch.setenv("FENICS_RED_MEMORY_LIMIT", "4G")
    (folder / "huge.png").write_bytes(_png_header(20000, 20000))
    with pytest.raises(ValueError, match=r"20000 x 20000-pixel mask image .*huge.png.* needs "
                                         r"about .* more than the limit of 4 GB"):
        load_mask_folder(folder, GRID)
    (folder / "huge.png").unlink()
    with open(folder / "huge.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "|u1", "fortran_order": False, "shape": (20000, 20000)})
        fh.truncate(fh.tell() + 20000 * 20000)
    with pytest.raises(ValueError, match="20000 x 20000-pixel mask image .*huge.npy"):
        load_mask_folder(folder, GRID)


# -- families of phantoms beyond the paper's (out-of-family tests of the learned prior) -----------

#: How far each family may take a modulus outside the settings' ranges (a factor on each side).
_FAMILY_SPREAD = {"textured": 1.0 / 0.375, "gradient": 2.0 ** 0.5}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_draws_labelled_phantoms_within_its_moduli_deterministically(family):
    settings = PhantomSettings(family=family)
    lo, hi = settings.background[0], settings.inclusion[1]
    spread = _FAMILY_SPREAD.get(family, 1.0)
    grid = ImageGrid(40, 32, 1.25, 1.0)
    for seed in range(6):
        E, labels = random_phantom(grid, np.random.default_rng(seed), settings)
        again, labels_again = random_phantom(grid, np.random.default_rng(seed), settings)
        assert np.array_equal(E, again) and np.array_equal(labels, labels_again)
        assert E.shape == labels.shape == grid.shape and labels.dtype == np.int32
        assert np.isfinite(E).all() and lo / spread - 1e-12 <= E.min()
        assert E.max() <= hi * spread + 1e-12
        n = int(labels.max())
        assert n >= 1 and set(np.unique(labels)) == set(range(n + 1))  # a background, 1..K
        inside, outside = E[labels > 0].mean(), E[labels == 0].mean()
        assert inside > 1.5 * outside  # inclusions are the stiff regions
    E3, labels3 = random_phantom(ImageGrid(10, 10, nz=10, depth=1.0), np.random.default_rng(0),
                                 PhantomSettings(family=family, min_size=2))
    assert E3.shape == (11, 11, 11) and labels3.max() >= 1 and np.isfinite(E3).all()


def test_the_paper_family_draws_what_it_drew_before_families_existed():
    """The default family's phantoms of a seed are those of earlier versions, bit for bit (the
    project's data sets and tables stay reproducible): a fingerprint of three phantoms."""
    import hashlib

    digest = hashlib.sha256()
    for seed in range(3):
        E, labels = random_phantom(GRID, np.random.default_rng(seed), PhantomSettings())
        digest.update(E.tobytes())
        digest.update(labels.tobytes())
    assert digest.hexdigest()[:16] == _PAPER_DIGEST


def test_families_differ_in_what_they_draw():
    """Whole-field families touch the field's edges and hold regions that touch each other; the
    paper's inclusions never do; rings have holes."""
    grid = ImageGrid(48, 48)

    def draws(family, n=8):
        return [random_phantom(grid, np.random.default_rng(s), PhantomSettings(family=family))[1]
                for s in range(n)]

    def touches_edge(labels):
        return np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).any()

    def touching_pairs(labels):
        grown = [ndimage.binary_dilation(labels == k) for k in range(1, labels.max() + 1)]
        return any(set(np.unique(labels[g])) - {0, k + 1} for k, g in enumerate(grown))

    assert not any(touches_edge(labels) for labels in draws("inclusions"))
    for family in ("field", "voronoi", "layers"):
        assert sum(touches_edge(labels) for labels in draws(family)) >= 4, family
    assert any(touching_pairs(labels) for labels in draws("voronoi"))
    assert any(touching_pairs(labels) for labels in draws("layers"))
    for labels in draws("rings", 4):  # every ring has a hole of background
        for k in range(1, labels.max() + 1):
            ring = labels == k
            assert (ndimage.binary_fill_holes(ring) & ~ring).any()


def test_families_keep_inclusions_in_the_tissue_of_a_mesh_raster():
    grid = ImageGrid(32, 32)
    tissue = np.zeros(grid.shape, dtype=bool)
    tissue[4:30, 2:25] = True
    for family in FAMILIES:
        _, labels = random_phantom(grid, np.random.default_rng(1), PhantomSettings(family=family),
                                   region=tissue)
        assert labels.max() >= 1 and not labels[~tissue].any(), family


def test_training_and_held_out_families_split_the_families():
    assert set(TRAINING_FAMILIES) | set(HELD_OUT_FAMILIES) == set(FAMILIES)
    assert not set(TRAINING_FAMILIES) & set(HELD_OUT_FAMILIES)
    assert "inclusions" in TRAINING_FAMILIES


def test_a_family_is_stored_with_the_settings_and_old_settings_read_as_the_paper_s():
    settings = PhantomSettings(family="voronoi")
    assert PhantomSettings.from_dict(settings.to_dict()) == settings
    old = PhantomSettings().to_dict()
    del old["family"]  # a data set written before families
    assert PhantomSettings.from_dict(old).family == "inclusions"
    with pytest.raises(ValueError, match="family must be one of"):
        PhantomSettings(family="stars")
