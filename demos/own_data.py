"""Walk-through: your own measurement, from a MATLAB file in metres and pascals to a modulus map.

    scripts/env python demos/own_data.py                  # writes runs/own-data/
    scripts/env mpirun -n 2 python demos/own_data.py      # the same, the mesh over 2 ranks

A user has nodal displacements from another finite-element code (or a tracking code that works
on a mesh): node coordinates in metres, 1-based triangles as MATLAB writes them, the displacement
as one interleaved vector ``[ux0, uy0, ux1, uy1, ...]`` in metres, and the probe pressure in Pa.
Here that file is made first, from a phantom simulated on the ROI mesh of ``meshes/`` (its true
modulus is kept aside to score the result). Then, exactly as a user would run it:

1. ``fenics-red import measurement.mat ... --length-unit m --displacement-unit m --traction PA``
   checks the file (which variables, 0- or 1-based cells, units), estimates the noise level from
   the data and writes a data set;
2. ``fenics-red reconstruct data.h5 --sample 0 --method red`` writes the estimate, and beside it
   ``estimate-modulus.mat`` (the user's variable names and node order, the modulus ``E`` in kPa),
   ``estimate-modulus-mesh.xdmf`` (ParaView) and ``estimate-modulus.png``;
3. the same measurement without the force (the usual case in ultrasound): the modulus relative to
   the background median.
"""

import os
from pathlib import Path

from mpi4py import MPI

import numpy as np
import scipy.io

from fenics_red.cli import main
from fenics_red.data import mesh_settings, simulate_sample
from fenics_red.domain import Domain, MeshArrays
from fenics_red.parallel import exit_with_launcher
from fenics_red.raster import ImageGrid

small = os.environ.get("FENICS_RED_DEMO_SMALL") == "1"  # the tests run it at a tiny size
folder = Path(os.environ.get("FENICS_RED_DEMO_OUT", "runs")) / "own-data"
MESH = Path(__file__).resolve().parents[1] / "meshes" / "roi-2d.msh"
PRESSURE_PA = 100.0  # the probe pressure of the simulation (1e-3 in units of 100 kPa)
comm = MPI.COMM_WORLD
if comm.size > 1:  # a rank of mpirun: stop when mpirun is gone (Ctrl-C on make paper)
    exit_with_launcher()


def make_measurement() -> None:
    """The user's file (rank 0): a phantom on the ROI mesh at 35 dB, in m, 1-based, interleaved."""
    mesh = (MeshArrays.of_grid(ImageGrid(24, 18, 40.0, 30.0)) if small  # the tests: 475 nodes
            else Domain.from_file(MESH, MPI.COMM_SELF).to_arrays())  # coordinates in mm
    sample = simulate_sample(0, mesh_settings(mesh, snr_db=35.0, seed=2026))
    scipy.io.savemat(folder / "measurement.mat", {
        "nodes": mesh.points * 1e-3,
        "elements": mesh.cells + 1,
        "u": np.column_stack([sample.ux_noisy, sample.uy_noisy]).ravel() * 1e-3})
    np.save(folder / "truth-kPa.npy", sample.E * 100.0)  # for scoring only: a user has none


def run(*argv: str) -> None:
    if main([str(a) for a in argv]) != 0:
        raise SystemExit(f"fenics-red {argv[0]} failed")


if comm.rank == 0:
    folder.mkdir(parents=True, exist_ok=True)
    make_measurement()
comm.Barrier()

common = ["--displacement", "u", "--interleaved", "--length-unit", "m",
          "--displacement-unit", "m", "--overwrite"]
run("import", folder / "measurement.mat", "--out", folder / "data.h5", "--traction", PRESSURE_PA,
    "--modulus-unit", "kPa", *common)
run("reconstruct", folder / "data.h5", "--sample", 0, "--method", "red", "--out",
    folder / "estimate.h5", "--overwrite", "--quiet")
run("import", folder / "measurement.mat", "--out", folder / "data-unknown-force.h5", *common)
run("reconstruct", folder / "data-unknown-force.h5", "--sample", 0, "--method", "red", "--out",
    folder / "relative.h5", "--overwrite", "--quiet")

if comm.rank == 0:
    truth = np.load(folder / "truth-kPa.npy")
    known = scipy.io.loadmat(folder / "estimate-modulus.mat")
    relative = scipy.io.loadmat(folder / "relative-modulus.mat")
    E, R = known["E"].ravel(), relative["E"].ravel()
    error = np.linalg.norm(E - truth) / np.linalg.norm(truth)
    print(f"known force: {known['E_meaning'][0]}")
    print(f"  relative error against the true modulus: {error:.3f}; background median "
          f"{np.median(E):.1f} kPa (true {np.median(truth):.1f} kPa)")
    print(f"unknown force: {relative['E_meaning'][0]}")
    print(f"  largest difference from the known-force estimate over its median: "
          f"{np.max(np.abs(R - E / np.median(E))):.1e}")
    print(f"figures and files in {folder}/: estimate-modulus.png, estimate-modulus.mat "
          "(variables nodes, elements, E, E_unit, E_meaning), estimate-modulus-mesh.xdmf")
