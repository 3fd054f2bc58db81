"""Test fixtures that work serially and under ``mpirun -n 2`` (after DOLFINx's own conftest)."""

import gc
import tempfile
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest


def pytest_collection_modifyitems(items):
    """Tests marked slow first (in their order), so that the serial session's workers
    (pytest-xdist) end together instead of one of them starting a 100 s test last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _collect_and_sync():
    """Free PETSc objects in step on every rank and line the ranks up between tests.

    What outlives a test (imports: DOLFINx, torch, matplotlib; caches, fixtures of wider scope) is
    frozen after the collection: later collections skip it (a full one took 0.17 s per test), and
    an object of it that only a reference cycle frees is never freed, on every rank alike."""
    yield
    gc.collect()
    gc.freeze()
    MPI.COMM_WORLD.Barrier()


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.fixture
def one_process(comm):
    """For tests of serial work (training, a model on COMM_SELF, commands that start their own
    processes and mpirun): under mpirun every rank would repeat it alike, so once is enough."""
    if comm.size > 1:
        pytest.skip("serial by design: run by the serial session of make test")


@pytest.fixture
def several_ranks(comm):
    """For tests that compare a run on all ranks with one on COMM_SELF: on one rank both are the
    same run, so they run in the session under mpirun -n 2 only."""
    if comm.size == 1:
        pytest.skip("compares ranks: run under mpirun -n 2")


@pytest.fixture
def mpi_tmp_path():
    """One temporary folder shared by all ranks (rank 0 makes it and removes it)."""
    comm = MPI.COMM_WORLD
    path = tempfile.mkdtemp(prefix="fenics-red-test-") if comm.rank == 0 else None
    path = Path(comm.bcast(path, root=0))
    yield path
    comm.Barrier()
    if comm.rank == 0:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)
