"""RED benchmark: the denoiser's share of a RED step, and RED's time against the ML estimate.

    scripts/env python benchmarks/red.py
    scripts/env mpirun -n 2 python benchmarks/red.py

Uses the shipped denoiser on random phantoms at 64² and 128² (35 dB) and at 64² also at 25 and
45 dB (:data:`PLAN`; mesh distributed over the ranks; the denoiser runs on rank 0). Also times
the Gauss-Newton baselines on the same samples.
"""

import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMALL, record, timed  # noqa: E402

from fenics_red.data import SimulationSettings, simulate_sample  # noqa: E402
from fenics_red.denoiser import Denoiser  # noqa: E402
from fenics_red.gauss_newton import setup_gn_tikhonov, setup_gn_tv  # noqa: E402
from fenics_red.raster import ImageGrid  # noqa: E402
from fenics_red.red import REDReconstructor, load_denoiser  # noqa: E402


def seconds_per_call(denoiser, image, repeats=5) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        denoiser(image)
    return (time.perf_counter() - start) / repeats


#: (cells across, SNR in dB): both sizes at the paper's middle SNR, 64² at its other two
PLAN = ((64, 25.0), (64, 35.0), (64, 45.0), (128, 35.0))


def main(plan=PLAN, samples=3):
    comm = MPI.COMM_WORLD
    denoiser = load_denoiser()
    rows = []
    for n, snr in plan:
        grid = ImageGrid(n, n)
        settings = SimulationSettings(grid, snr_db=snr, seed=77)
        data = [simulate_sample(i, settings) for i in range(samples)]
        red = REDReconstructor(grid, settings.forward, comm=comm, denoiser=denoiser)
        image = data[0].E
        t_call = seconds_per_call(denoiser, image)
        t_plain = seconds_per_call(Denoiser(denoiser.network, flip_average=False), image)
        totals = {"ml": [], "red": [], "steps": [], "share": [], "step": [], "wall": []}
        red.run_sample(data[0])  # warm-up: the first call builds torch's kernels
        for sample in data:
            wall, (_, _, info) = timed(lambda: red.run_sample(sample), comm)  # noqa: B023
            totals["wall"].append(wall)
            totals["ml"].append(info["ml_time"])
            totals["red"].append(info["red_time"])
            totals["steps"].append(info["steps"])
            totals["share"].append(info["denoiser_seconds"] / info["red_time"])
            totals["step"].append(info["red_time"] / max(info["steps"], 1))
        red.destroy()
        gn = {}
        for name, setup in (("gn-tikhonov", setup_gn_tikhonov), ("gn-tv", setup_gn_tv)):
            runner = setup(grid, settings.forward, comm)
            start = time.perf_counter()
            for sample in data:
                runner.run(sample)
            gn[name] = (time.perf_counter() - start) / samples
            runner.destroy()
        rows.append({"cells": f"{n}x{n}", "SNR [dB]": snr, "ranks": comm.size,
                     "denoiser call [ms]": 1e3 * t_call,
                     "without flip average [ms]": 1e3 * t_plain,
                     "ML estimate [s]": float(np.mean(totals["ml"])),
                     "RED loop [s]": float(np.mean(totals["red"])),
                     "RED steps": float(np.mean(totals["steps"])),
                     "RED step [ms]": 1e3 * float(np.mean(totals["step"])),
                     "denoiser share of RED": float(np.mean(totals["share"])),
                     "RED sample [s]": float(np.mean(totals["wall"])),
                     "RED / ML time": float(np.sum(totals["wall"]) / np.sum(totals["ml"])),
                     "gn-tikhonov [s]": gn["gn-tikhonov"], "gn-tv [s]": gn["gn-tv"]})
        if comm.rank == 0:
            print(rows[-1], flush=True)
    if comm.rank == 0:
        print(record("red", rows, ("cells", "SNR [dB]", "ranks"),
                     "RED: the denoiser's share and total time",
                     f"Mean over {samples} random phantoms (seed 77) with the shipped "
                     "denoiser and the default REDSettings, after one warm-up sample; 'RED "
                     "sample' is the whole `reconstruct --method red` of a sample (ML estimate, "
                     "denoiser pass, start check, RED loop; slowest rank) and 'RED / ML time' = "
                     "RED sample / ML estimate, the cost of RED over the estimate it starts from "
                     "(before 2026-12-01 the ratio left out the denoiser pass and the start "
                     "check). The denoiser runs "
                     "on rank 0 with torch's default threads, averaged over left-right flips "
                     "(one call on a batch of two; the next column without)."))


if __name__ == "__main__":
    main(plan=((8, 35.0),), samples=1) if SMALL else main()  # make bench SIZE=small
