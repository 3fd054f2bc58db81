"""Are the methods scale-equivariant? (Why an unknown force costs only a factor.)

    scripts/env python demos/scale_equivariance.py [C]       # default C = 37

Reconstructs one 32² phantom at 35 dB with each registered method twice: with the traction of the
data, and with the traction times ``C`` (the same displacements). A scale-equivariant method
returns ``C`` times the first estimate; the table gives the largest relative difference
(max-norm) between the second estimate over ``C`` and the first. ``docs/measurements.md`` quotes
the result for ``C = 37`` and ``C = 1 + 1e-7``.
"""

import dataclasses
import sys

from mpi4py import MPI

import numpy as np

from fenics_red.data import SimulationSettings, simulate_sample
from fenics_red.methods import get_method, method_names
from fenics_red.raster import ImageGrid

scale = float(sys.argv[1]) if len(sys.argv) > 1 else 37.0
settings = SimulationSettings(ImageGrid(32, 32), snr_db=35.0, seed=3)
sample = dataclasses.replace(simulate_sample(0, settings), E=None, mask=None)  # as measured
print(f"| method | E(C t) / C against E(t), C = {scale:.8g}: relative max-norm difference |")
print("|---|---|")
for name in method_names():
    estimates = []
    for c in (1.0, scale):
        forward = dataclasses.replace(settings.forward, traction=settings.forward.traction * c)
        runner = get_method(name).setup(settings.space, forward, MPI.COMM_SELF, {})
        try:
            estimates.append(runner.run(sample)[0] / c)
        finally:
            runner.destroy()
    difference = np.abs(estimates[1] - estimates[0]).max() / np.abs(estimates[0]).max()
    print(f"| {name} | {difference:.1e} |")
