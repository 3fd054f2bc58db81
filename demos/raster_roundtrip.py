"""Round-trip error of the raster (nodes -> image -> nodes) on the meshes of ``meshes/``.

    scripts/env python demos/raster_roundtrip.py            # the table of docs/raster.md

Two fields per mesh: a smooth one, ``1 + 0.5 sin(x/6) cos(y/9)`` (x, y in mm), and a piecewise
constant inclusion (0.5 in a disc of radius 5 mm (ROI) or 8 mm (sector), in a ball of radius 6 mm
(box), 0.12 outside, as a P1 interpolant). Pixel sizes: the default (the mesh's mean node
spacing) and 2, 1, 0.5, 0.25 mm (voxels down to 0.5 mm in 3-D).
"""

from pathlib import Path

from mpi4py import MPI

import numpy as np

from dolfinx import fem
from fenics_red.domain import Domain
from fenics_red.raster import raster_for

MESHES = Path(__file__).resolve().parents[1] / "meshes"
DISCS = {"roi-2d": ((20.0, 15.0), 5.0), "sector-2d": ((30.0, 20.0), 8.0),
         "box-3d": ((15.0, 15.0, 10.0), 6.0)}


def main() -> None:
    comm = MPI.COMM_WORLD
    rows = []
    for name, (centre, radius) in DISCS.items():
        domain = Domain.from_file(MESHES / f"{name}.msh", comm)
        Q = fem.functionspace(domain.mesh, ("Lagrange", 1))
        smooth, disc = fem.Function(Q), fem.Function(Q)
        smooth.interpolate(lambda p: 1.0 + 0.5 * np.sin(p[0] / 6.0) * np.cos(p[1] / 9.0))
        disc.interpolate(lambda p, c=centre, r=radius: np.where(
            sum((p[k] - c[k]) ** 2 for k in range(len(c))) < r**2, 0.5, 0.12))
        n = Q.dofmap.index_map.size_local
        for spacing in (None, 2.0, 1.0, 0.5) + ((0.25,) if domain.dim == 2 else ()):
            raster = raster_for(Q, domain, spacing)
            cells = []
            for f in (smooth, disc):
                back = raster.from_images(raster.to_images(f.x.array), np.empty_like(f.x.array))
                err = back[:n] - f.x.array[:n]
                max_err = comm.allreduce(np.abs(err).max(initial=0.0), op=MPI.MAX)
                rms = np.sqrt(comm.allreduce(float(err @ err), op=MPI.SUM)
                              / comm.allreduce(float(f.x.array[:n] @ f.x.array[:n]), op=MPI.SUM))
                cells += [max_err, rms]
            label = "default" if spacing is None else f"{spacing:g}"
            rows.append((name, label, f"{raster.grid.spacing[0]:.3f}", raster.grid.shape, *cells))
    if comm.rank == 0:
        print("| mesh | pixel | hx (mm) | image | smooth max | smooth rel. RMS | "
              "inclusion max | inclusion rel. RMS |")
        print("|---|---|---|---|---|---|---|---|")
        for name, label, hx, shape, *errors in rows:
            print(f"| {name} | {label} | {hx} | {'x'.join(map(str, shape))} | "
                  + " | ".join(f"{e:.2e}" for e in errors) + " |")


if __name__ == "__main__":
    main()
