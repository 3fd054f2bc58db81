"""How well the measured field tells its own noise level (``estimate_noise_std``).

    scripts/env python demos/noise_estimate.py        # the table of docs/studies.md

Simulated samples whose ``σ`` is known exactly (seed 9001, lateral noise ``r = 1`` and ``2``), on
the 64² grid, the ROI mesh and the 3-D box mesh of ``meshes/`` (856 nodes), at 25, 35 and 45 dB:
the ratio of the estimate to the true ``σ`` per component, its range over the samples.
"""

from pathlib import Path

from mpi4py import MPI

import numpy as np

from fenics_red.data import SimulationSettings, mesh_settings, simulate_sample
from fenics_red.domain import Domain
from fenics_red.measurements import estimate_noise_std
from fenics_red.raster import ImageGrid

MESHES = Path(__file__).resolve().parents[1] / "meshes"


def main(n_samples: int = 8) -> None:
    meshes = {where: Domain.from_file(MESHES / name, MPI.COMM_SELF).to_arrays()
              for where, name in (("ROI mesh", "roi-2d.msh"), ("3-D box mesh", "box-3d.msh"))}
    print("| data | SNR | r | σx estimate / true | σy estimate / true | σz estimate / true |")
    print("|---|---|---|---|---|---|")
    for where in ("64² grid", *meshes):
        for snr in (25.0, 35.0, 45.0):
            for ratio in (1.0, 2.0):
                common = dict(snr_db=snr, noise_ratio=ratio, seed=9001)
                settings = (SimulationSettings(ImageGrid(64, 64), **common) if where == "64² grid"
                            else mesh_settings(meshes[where], **common))
                found = []
                for i in range(n_samples):
                    s = simulate_sample(i, settings)
                    fields = (s.ux_noisy, s.uy_noisy) + ((s.uz_noisy,) if settings.dim == 3
                                                          else ())
                    est = estimate_noise_std(settings.space, fields)
                    found.append(np.array(est) / np.array(s.noise_std))
                lo, hi = np.min(found, axis=0), np.max(found, axis=0)
                cells = [f"{a:.3f}-{b:.3f}" for a, b in zip(lo, hi, strict=True)]
                print(f"| {where} | {snr:g} dB | {ratio:g} | " + " | ".join(
                    cells + ["—"] * (3 - len(cells))) + " |")


if __name__ == "__main__":
    main()
