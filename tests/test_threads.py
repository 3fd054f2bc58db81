"""Threads per rank: the cores of a node shared by its ranks; the user's settings win."""

from fenics_red.threads import (
    SPIN_DEFAULTS,
    ranks_on_node,
    set_spin_environment,
    set_thread_environment,
    threads_per_rank,
)


def test_ranks_on_the_node_come_from_the_launcher():
    assert ranks_on_node({}) == 1
    assert ranks_on_node({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == 4
    assert ranks_on_node({"MPI_LOCALNRANKS": "3"}) == 3
    assert ranks_on_node({"SLURM_NTASKS_PER_NODE": "8"}) == 1  # srun: FENICS_RED_THREADS


def test_each_rank_gets_its_share_of_the_cores_and_at_least_one():
    assert threads_per_rank(16, {"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == 4
    assert threads_per_rank(2, {"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 1
    assert threads_per_rank(2, {"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}) == 1
    assert threads_per_rank(8, {}) == 8
    assert threads_per_rank(8, {"FENICS_RED_THREADS": "3"}) == 3


def test_the_environment_is_set_unless_the_user_chose(monkeypatch):
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "64"}
    assert set_thread_environment(env) == 1
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    mine = {"OMPI_COMM_WORLD_LOCAL_SIZE": "64", "OMP_NUM_THREADS": "7"}
    assert set_thread_environment(mine) == 7 and "OPENBLAS_NUM_THREADS" not in mine
    forced = {"FENICS_RED_THREADS": "2", "OMP_NUM_THREADS": "7"}
    assert set_thread_environment(forced) == 2 and forced["OMP_NUM_THREADS"] == "2"


def test_a_script_under_a_launcher_gets_its_share_even_after_numpy_started_blas():
    """``mpirun -n N python script.py`` whose script imports NumPy (and so OpenBLAS's pool)
    before ``fenics_red``: the import limits the running pool to the rank's share."""
    import os
    import subprocess
    import sys

    script = ("import numpy, threadpoolctl\n"
              "import fenics_red  # noqa: F401\n"
              "print(max(p['num_threads'] for p in threadpoolctl.threadpool_info()))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "FENICS_RED_THREADS")}
    env["OMPI_COMM_WORLD_LOCAL_SIZE"] = "64"  # more ranks than this machine has cores
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True)
    assert int(out.stdout) == 1


def test_idle_blas_workers_sleep_soon_unless_the_user_chose():
    env = {}
    set_spin_environment(env)
    assert env == SPIN_DEFAULTS and int(env["OPENBLAS_THREAD_TIMEOUT"]) < 28  # 28: OpenBLAS's
    mine = {"OPENBLAS_THREAD_TIMEOUT": "28"}
    set_thread_environment(mine)
    assert mine["OPENBLAS_THREAD_TIMEOUT"] == "28"


def test_importing_fenics_red_first_sets_the_idle_wait_before_numpy_loads_openblas():
    """On one rank too: OpenBLAS reads the variable once, when NumPy loads it."""
    import os
    import subprocess
    import sys

    script = ("import os, sys\n"
              "import fenics_red  # noqa: F401\n"
              "assert 'numpy' not in sys.modules\n"
              "print(os.environ['OPENBLAS_THREAD_TIMEOUT'])\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_THREAD_TIMEOUT", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == SPIN_DEFAULTS["OPENBLAS_THREAD_TIMEOUT"]
