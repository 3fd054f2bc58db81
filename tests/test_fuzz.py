"""Malformed inputs thrown at the readers: each gives a valid result or one clear error.

"Clear" means a ``ValueError`` (or ``FileNotFoundError``) naming the file, never a crash, a
traceback from h5py or torch, or a silently wrong result. Serial per rank: every rank fuzzes its
own files.
"""

from mpi4py import MPI

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fenics_red.data import SimulationSettings, load_dataset, simulate_dataset
from fenics_red.denoiser import Denoiser, UNetConfig
from fenics_red.raster import ImageGrid
from fenics_red.training import read_pairs

FUZZ = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"fuzz{MPI.COMM_WORLD.rank}")
    data = simulate_dataset(folder / "set.h5", 2, SimulationSettings(ImageGrid(6, 6), seed=1),
                            MPI.COMM_SELF, progress=False)
    model = Denoiser.untrained(UNetConfig(channels=4, depth=1)).save(folder / "model.pt")
    return {"data": data.read_bytes(), "model": model.read_bytes()}


def _damaged(content: bytes, cut: float, flips: list[int]) -> bytes:
    content = bytearray(content[:max(1, int(len(content) * cut))])
    for position in flips:
        content[position % len(content)] ^= 0xFF
    return bytes(content)


@FUZZ
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.integers(0, 10**7), max_size=4))
def test_a_damaged_data_set_reads_or_is_refused_clearly(good_files, tmp_path, cut, flips):
    path = tmp_path / "set.h5"
    path.write_bytes(_damaged(good_files["data"], cut, flips))
    try:
        with load_dataset(path) as data:
            for sample in data:
                assert np.isfinite(sample.uy_noisy).all() and (sample.E > 0).all()
    except ValueError as error:
        assert str(path) in str(error)


@FUZZ
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.integers(0, 10**6), max_size=4))
def test_a_damaged_model_file_loads_or_is_refused_clearly(good_files, tmp_path, cut, flips):
    path = tmp_path / "model.pt"
    path.write_bytes(_damaged(good_files["model"], cut, flips))
    try:
        denoiser = Denoiser.load(path)
    except ValueError as error:
        assert str(path) in str(error)
    else:
        try:
            assert np.isfinite(denoiser(np.ones((8, 8)))).all()
        except ValueError as error:
            assert "non-finite" in str(error)


@FUZZ
@given(shape=st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 5)),
       fill=st.sampled_from([0.0, 1.0, -1.0, np.nan, np.inf, 1e-320]),
       dtype=st.sampled_from(["f8", "f4", "i4", "u1"]))
def test_malformed_pairs_are_trained_on_or_refused_clearly(tmp_path, shape, fill, dtype):
    import json

    path = tmp_path / "pairs.h5"
    values = np.full(shape, fill).astype(dtype) if dtype.startswith("f") else np.ones(shape,
                                                                                        dtype)
    with h5py.File(path, "w") as f:
        f["truth"], f["estimate"] = values, values
        f["done"] = np.ones(shape[0], np.uint8)
        f.attrs.update(format="fenics-red reconstructions", format_version=1, method="ml",
                       settings="{}", data_path="x", data_attrs=json.dumps({}))
    try:
        pairs = read_pairs(path)
    except ValueError as error:
        assert str(path) in str(error)
    else:
        assert pairs.n >= 2 and np.isfinite(pairs.estimate).all() and (pairs.truth > 0).all()
