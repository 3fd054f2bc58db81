"""Test fixtures that work serially and under ``mpirun -n 2`` (after DOLFINx's own conftest)."""

import gc
import tempfile
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _collect_and_sync():
    """Free PETSc objects in step on every rank and line the ranks up between tests."""
    yield
    gc.collect()
    MPI.COMM_WORLD.Barrier()


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


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
