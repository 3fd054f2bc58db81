"""The ML estimate by FISTA (the data recipe) and by conjugate gradients (``--solver cg``).

    scripts/env python demos/ml_solvers.py          # the tables of docs/studies.md (a few minutes)

Random sharp phantoms of the default generator (seeds 100-107: not the paper's test set), first
with essentially exact data (200 dB) at 32² and 64² (5 phantoms each, a budget of 3000 steps for
both iterations), then at 25, 35 and 45 dB at 64² (8 phantoms, the default budget of 150 steps,
discrepancy rule, Γ frozen at the initial modulus for both). A second table places the SNR
from which the ml method's default ("auto") takes CG, and checks that default on exact data.
Columns: mean relative error (min-max), mean steps, mean seconds per estimate (one process).
"""

import os
import time

from mpi4py import MPI

import numpy as np

from fenics_red.data import SimulationSettings, simulate_sample
from fenics_red.raster import ImageGrid
from fenics_red.solvers import ML_DEFAULTS, MLReconstructor, MLSettings

small = os.environ.get("FENICS_RED_DEMO_SMALL") == "1"


def run(grid, snr, seeds, settings):
    errors, steps, seconds = [], [], []
    ml = MLReconstructor(grid, settings=settings, comm=MPI.COMM_SELF)
    try:
        for seed in seeds:
            sample = simulate_sample(0, SimulationSettings(grid, snr_db=snr, seed=seed))
            t = time.perf_counter()
            estimate, history = ml.run_sample(sample)
            seconds.append(time.perf_counter() - t)
            errors.append(np.linalg.norm(estimate - sample.E) / np.linalg.norm(sample.E))
            steps.append(history.final["step"])
    finally:
        ml.destroy()
    return (f"{np.mean(errors):.3f} ({np.min(errors):.3f}-{np.max(errors):.3f}) | "
            f"{np.mean(steps):.0f} | {np.mean(seconds):.2f}")


print("| data | iteration | relative error | steps | seconds |")
print("|---|---|---|---|---|")
sizes = (16,) if small else (32, 64)
for n in sizes:
    for name in ("fista", "cg"):
        settings = MLSettings(method=name, max_steps=300 if small else 3000)
        print(f"| {n}², 200 dB | {name} | "
              + run(ImageGrid(n, n), 200.0, range(100, 102 if small else 105), settings) + " |",
              flush=True)
for snr in ((35.0,) if small else (25.0, 35.0, 45.0)):
    for name, settings in (("fista", MLSettings()), ("cg", MLSettings(method="cg"))):
        n = 16 if small else 64
        print(f"| {n}², {snr:g} dB | {name} | "
              + run(ImageGrid(n, n), snr, range(100, 102 if small else 108), settings) + " |",
              flush=True)

# The default of the ml method (ML_DEFAULTS: "auto", the iteration's own budget) takes CG from
# AUTO_CG_MIN_SNR_DB up. Where CG's discrepancy-stopped estimate overtakes FISTA's (64², seeds
# 300-305, neither the phantoms above nor any test set), and the default on exact data (seeds
# 110-114, again new).
print("\n| data | iteration | relative error | steps | seconds |")
print("|---|---|---|---|---|")
n = 16 if small else 64
for snr in ((60.0,) if small else (45.0, 50.0, 55.0, 65.0, 80.0)):
    for name, settings in (("fista", MLSettings()),
                           ("cg", MLSettings(method="cg", max_steps=None))):
        print(f"| {n}², {snr:g} dB | {name} | "
              + run(ImageGrid(n, n), snr, range(300, 302 if small else 306), settings) + " |",
              flush=True)
for n in sizes:
    print(f"| {n}², 200 dB | default (auto) | "
          + run(ImageGrid(n, n), 200.0, range(110, 112 if small else 115), ML_DEFAULTS) + " |",
          flush=True)
