"""A full 3-D reconstruction, ML and RED, as a user runs it: time and memory per rank.

    scripts/env mpirun -n 2 python benchmarks/reconstruct3d.py     # 44³ cells, 273 375 dofs: RED
    scripts/env python benchmarks/reconstruct3d.py                 # the same on one rank
    scripts/env mpirun -n 2 python benchmarks/reconstruct3d.py 24 ml red   # N³ cells, methods

One random 3-D phantom of N³ cells (``fenics-red simulate --grid N --grid-z N --seed 43``, 35 dB,
simulated once and kept in ``runs/bench-data/``, ``$RUNS/bench-data`` under ``make bench``),
the plain P1 element (``--volumetric element``: the tables were measured with it, before the
nodal bulk part became the 3-D default on 2026-12-02; see ``benchmarks/forward3d.py``),
then ``fenics-red reconstruct --sample 0`` with
``--method red`` and the shipped 3-D denoiser (and ``--method ml`` when asked for), the mesh
spread over the ranks, every setting at its default: the likelihood's ``K`` by MUMPS Cholesky
up to ``AUTO_CHOLESKY_MAX_DOFS``, GAMG above. RED's time includes its own ML stage (it starts
from the denoised ML estimate). Columns: wall time of the command (slowest rank) and, from the
run's record, the ML and RED stages, their steps, the denoiser's calls, the relative error,
the peak resident memory per rank, the load average when the row started and CPU/wall (as in
``benchmarks/forward3d.py``). The 3-D denoiser was fine-tuned at 24³ cells: at other sizes RED
warns that it was not validated there (the row times the pipeline, its error is not a result
of the method).
"""

import os
import sys
from pathlib import Path

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import h5py  # noqa: E402
from common import RESULTS, SMALL, Meter, peak_mb, peak_reset, record, timed  # noqa: E402

from fenics_red.cli import main as cli  # noqa: E402
from fenics_red.likelihood import LikelihoodSettings  # noqa: E402
from fenics_red.metrics import relative_rmse  # noqa: E402
from fenics_red.red import default_denoiser_path  # noqa: E402

#: the data sets and estimates (``make bench SIZE=small``: beside its tables)
DATA = (RESULTS / "reconstruct3d-data" if SMALL
        else Path(os.environ.get("FENICS_RED_BENCH_DATA", "runs/bench-data")))
CELLS = 6 if SMALL else 44  # 3 · 45³ = 273 375 displacement dofs


def data_set(n: int, comm) -> Path:
    """The benchmark's phantom on n³ cells, simulated on the first call."""
    path = DATA / f"box-{n}-seed43.h5"
    if not path.exists():
        if comm.rank == 0:
            DATA.mkdir(parents=True, exist_ok=True)
        comm.Barrier()
        status = cli(["simulate", "--samples", "1", "--grid", str(n), "--grid-z", str(n),
                      "--seed", "43", "--snr", "35", "--volumetric", "element",
                      "--out", str(path), "--quiet"])
        if status:
            raise SystemExit(f"simulating {path} failed")
    return path


def reconstruction_row(n: int, method: str, comm) -> dict:
    data = data_set(n, comm)
    out = DATA / f"box-{n}-{method}-{comm.size}ranks.h5"
    extra = ["--denoiser", str(default_denoiser_path(dims=3))] if method == "red" else []
    peak_reset()
    meter = Meter()
    wall, status = timed(lambda: cli(["reconstruct", str(data), "--sample", "0", "--method",
                                      method, "--out", str(out), "--overwrite", "--quiet",
                                      *extra]), comm)
    if status:
        raise SystemExit(f"reconstruct --method {method} failed")
    dofs = 3 * (n + 1) ** 3
    row = {"cells": f"{n}^3", "dofs": dofs, "ranks": comm.size, "method": method,
           "K solver": LikelihoodSettings().resolve_k_solver(3, dofs), "wall [s]": wall}
    with h5py.File(out, "r") as f:
        info = dict(f["history/0"].attrs)
        error = relative_rmse(f["estimate"][0], f["truth"][0])
    red = method == "red"
    row.update({"ML stage [s]": info["ml_time"] if red else info.get("time", wall),
                "ML steps": int(info["ml_steps" if red else "steps"]),
                "RED loop [s]": info["red_time"] if red else "",
                "RED steps": int(info["steps"]) if red else "",
                "denoiser calls": int(info["denoiser_calls"]) if red else "",
                "denoiser [s]": info["denoiser_seconds"] if red else "",
                "ML error": info["ml_error"] if red else "", "rel. error": error,
                "peak memory/rank [MB]": peak_mb(comm), **meter.columns(comm)})
    return row


def main(n: int = CELLS, methods=("red",)) -> None:
    """RED's row holds the ML estimate too (its first stage, the same recipe as ``--method ml``
    below 50 dB); ``ml`` alone only when asked for."""
    comm = MPI.COMM_WORLD
    rows = [reconstruction_row(n, method, comm) for method in methods]
    if comm.rank == 0:
        for row in rows:
            print(row, flush=True)
        print(record("reconstruct3d", rows, ("cells", "ranks", "method"),
                     "A full 3-D reconstruction: ML and RED",
                     "One random phantom, 35 dB, seed 43, `fenics-red reconstruct --sample 0` "
                     "with default settings (RED: the shipped 3-D denoiser). See the docstring "
                     "of benchmarks/reconstruct3d.py."))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else CELLS, tuple(sys.argv[2:]) or ("red",))
