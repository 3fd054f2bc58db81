"""Threads per rank: the cores of a node shared by its ranks; the user's settings win."""

from fenics_red.threads import (
    SPIN_DEFAULTS,
    THREAD_VARIABLES,
    ranks_on_node,
    set_spin_environment,
    set_thread_environment,
    threads_per_rank,
)


def test_ranks_on_the_node_come_from_the_launcher():
    assert ranks_on_node({}) == 1
    assert ranks_on_node({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == 4
    assert ranks_on_node({"MPI_LOCALNRANKS": "3"}) == 3
    assert ranks_on_node({"SLURM_NTASKS_PER_NODE": "8"}) == 1  # a batch script, no step
    # srun's tasks of the step on each node, when every node runs as many
    assert ranks_on_node({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}) == 4
    assert ranks_on_node({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "3"}) == 3
    assert ranks_on_node({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4,2"}) == 1


def test_each_rank_gets_its_share_of_the_cores_and_at_least_one():
    assert threads_per_rank(16, {"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == 4
    assert threads_per_rank(2, {"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 1
    assert threads_per_rank(2, {"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}) == 1
    assert threads_per_rank(8, {}) == 8
    assert threads_per_rank(8, {"FENICS_RED_THREADS": "3"}) == 3


def test_ranks_sharing_a_jobs_cpus_split_them_not_the_nodes(monkeypatch):
    """A Slurm job (or container) of 8 CPUs on a node of 128, 8 ranks unbound: each took all 8
    (128 // 8 = 16, capped by its CPU set), 64 threads on 8 CPUs."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for ranks, expected in (("1", 8), ("2", 4), ("8", 1)):
        env = {"SLURM_CPUS_ON_NODE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": ranks}
        assert threads_per_rank(env=env) == expected
    # bound to a socket of 64 (Open MPI's default above two ranks), 4 ranks on the node: 32
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert threads_per_rank(128, {"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == 32


def test_a_thread_count_that_is_not_one_is_said_and_replaced(capsys):
    """OMP_NUM_THREADS=0 or abc gave pages of torch errors and, under MPI, every core to every
    rank; FENICS_RED_THREADS=abc rewrote a valid OMP_NUM_THREADS; 100000 crashed libgomp."""
    import os

    share = threads_per_rank(env={"OMPI_COMM_WORLD_LOCAL_SIZE": "64"})
    for bad in ("0", "abc", "-1", "", str(100 * (os.cpu_count() or 1))):
        env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "64", "OMP_NUM_THREADS": bad}
        assert set_thread_environment(env) == share and env["OMP_NUM_THREADS"] == str(share)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"OMP_NUM_THREADS={bad!r} is not a number" in err
        env = {"FENICS_RED_THREADS": bad, "OMP_NUM_THREADS": "1"}
        assert set_thread_environment(env) == 1 and env["OMP_NUM_THREADS"] == "1"
        assert "FENICS_RED_THREADS" in capsys.readouterr().err
    # said once per run: by rank 0 only
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMP_NUM_THREADS": "abc"}
    set_thread_environment(env)
    assert capsys.readouterr().err == ""


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
           if k not in (*THREAD_VARIABLES, "FENICS_RED_THREADS")}
    env["OMPI_COMM_WORLD_LOCAL_SIZE"] = "64"  # more ranks than this machine has cores
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True)
    assert int(out.stdout) == 1


def test_a_script_keeps_its_own_blas_threads_and_gets_the_forced_count_on_one_process():
    """``import fenics_red`` acts on one process too (FENICS_RED_THREADS was ignored there), and
    leaves alone a BLAS pool whose size the user set (it was limited to the rank's share)."""
    import os
    import subprocess
    import sys

    script = ("import numpy, threadpoolctl\n"
              "import fenics_red, os  # noqa: F401\n"
              "pools = {p['internal_api']: p['num_threads'] for p in "
              "threadpoolctl.threadpool_info()}\n"
              "print(os.environ['OMP_NUM_THREADS'], pools.get('openblas'))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in (*THREAD_VARIABLES, "FENICS_RED_THREADS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                        "MPI_LOCALNRANKS")}
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, env={**env, "FENICS_RED_THREADS": "1"})
    assert out.stdout.split() == ["1", "1"]
    cpus = os.cpu_count() or 1
    if cpus > 1:
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                             text=True, env={**env, "OMPI_COMM_WORLD_LOCAL_SIZE": "64",
                                             "OPENBLAS_NUM_THREADS": str(cpus)})
        assert out.stdout.split() == ["1", str(cpus)]


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


def test_rank_0_runs_the_denoiser_on_the_cores_of_the_ranks_that_wait_for_it(monkeypatch):
    """On a mesh split over N ranks of a node, the denoiser runs on rank 0 while the others wait
    in a broadcast: it gets N times the threads per rank (unless the user chose the threads);
    each rank's own calls (reconstruct --all, COMM_SELF) keep their share."""
    from mpi4py import MPI

    import torch

    from fenics_red import threads

    comm = MPI.COMM_WORLD
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "_USER_CHOSE", False)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    on_node = node.size
    node.Free()
    assert threads.root_call_threads(MPI.COMM_SELF) is None
    assert threads.root_call_threads(comm) == (None if on_node == 1 else on_node)
    monkeypatch.setattr(threads, "_USER_CHOSE", True)
    assert threads.root_call_threads(comm) is None  # collective all the same
    before = torch.get_num_threads()
    with threads.torch_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
