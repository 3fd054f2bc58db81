"""How well the measured field tells its own noise level (``estimate_noise_std``).

    scripts/env python demos/noise_estimate.py        # the table of docs/studies.md

Simulated samples whose ``σ`` is known exactly (seed 9001, lateral noise ``r = 1`` and ``2``), on
the 64² grid and on the ROI mesh of ``meshes/``, at 25, 35 and 45 dB: the ratio of the estimate to
the true ``σ`` per component, its range over the samples.
"""

from pathlib import Path

from mpi4py import MPI

import numpy as np

from fenics_red.data import SimulationSettings, mesh_settings, simulate_sample
from fenics_red.domain import Domain
from fenics_red.measurements import estimate_noise_std
from fenics_red.raster import ImageGrid

MESH = Path(__file__).resolve().parents[1] / "meshes" / "roi-2d.msh"


def main(n_samples: int = 8) -> None:
    roi = Domain.from_file(MESH, MPI.COMM_SELF).to_arrays()
    print("| data | SNR | r | σx estimate / true | σy estimate / true |")
    print("|---|---|---|---|---|")
    for where in ("64² grid", "ROI mesh"):
        for snr in (25.0, 35.0, 45.0):
            for ratio in (1.0, 2.0):
                common = dict(snr_db=snr, noise_ratio=ratio, seed=9001)
                settings = (SimulationSettings(ImageGrid(64, 64), **common) if where == "64² grid"
                            else mesh_settings(roi, **common))
                found = []
                for i in range(n_samples):
                    s = simulate_sample(i, settings)
                    est = estimate_noise_std(settings.space, (s.ux_noisy, s.uy_noisy))
                    found.append(np.array(est) / np.array(s.noise_std))
                lo, hi = np.min(found, axis=0), np.max(found, axis=0)
                print(f"| {where} | {snr:g} dB | {ratio:g} | {lo[0]:.3f}-{hi[0]:.3f} | "
                      f"{lo[1]:.3f}-{hi[1]:.3f} |")


if __name__ == "__main__":
    main()
