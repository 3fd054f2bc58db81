# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 3-D elastography: ML, Gauss-Newton TV, and RED with a 3-D and a slice-wise denoiser
#
# Random 3-D phantoms (spheres, ellipsoids, blobs and polyhedra in a soft background) on a box of
# 24³ cells (15 625 nodes, 46 875 displacement dofs), depth along z, the probe pressing the top
# face, 35 dB. The test set (seed 41) is in none of the 3-D denoiser's training sets (`make
# denoiser DIM=3`: 768 phantoms of 16³ cells, seed 31, then 384 of 24³, seed 61), and nothing was
# tuned on it. Methods:
#
# * `ml`, `gn-tv`: the statistical estimate without prior and the classical baseline (its TV
#   weight by the discrepancy principle, as in 2-D);
# * `red (3-D)`, `denoised-ml (3-D)`: RED with the 3-D UNet `fenics_red/data/denoiser-3d.pt`;
# * `red (slice-wise)`, `denoised-ml (slice-wise)`: RED with the shipped 2-D denoiser applied to
#   every axial-lateral slice `volume[:, j, :]` (trained on 64² images of 2-D phantoms).
#
# Every step is a package command; by hand:
#
# ```bash
# scripts/env fenics-red simulate --samples 4 --grid 24 --grid-z 24 --seed 41 \
#     --out runs/test-24-3d-35db.h5
# scripts/env mpirun -n 2 fenics-red evaluate runs/test-24-3d-35db.h5 \
#     --methods ml,gn-tv,red --denoiser fenics_red/data/denoiser-3d.pt \
#     --out runs/eval-3d
# ```
#
# The whole walk-through: `scripts/env mpirun -n 2 python demos/red_3d.py` (writes
# `runs/red-3d-table.md`; every stage resumes).

# %%
import json
import os
from pathlib import Path

from mpi4py import MPI

import numpy as np

from fenics_red.data import SimulationSettings, simulate_dataset
from fenics_red.evaluation import EvaluationSettings, evaluate, read_estimate
from fenics_red.parallel import exit_with_launcher
from fenics_red.raster import ImageGrid
from fenics_red.red import default_denoiser_path

comm = MPI.COMM_WORLD
if comm.size > 1:  # a rank of mpirun: stop when mpirun is gone (Ctrl-C on make paper)
    exit_with_launcher()
small = os.environ.get("FENICS_RED_DEMO_SMALL") == "1"  # the tests run it at a tiny size
folder = Path(os.environ.get("FENICS_RED_DEMO_OUT", "runs"))
cells, n_samples, seed = (10, 1, 41) if small else (24, 4, 41)
if comm.rank == 0:
    folder.mkdir(parents=True, exist_ok=True)
comm.Barrier()
model_3d = default_denoiser_path(dims=3)
model_2d = default_denoiser_path()
if small:  # no trained model in a test: untrained denoisers are the identity map
    from fenics_red.denoiser import DEFAULT_3D_CONFIG, Denoiser, UNetConfig

    model_3d, model_2d = folder / "identity-3d.pt", folder / "identity-2d.pt"
    if comm.rank == 0:
        if not model_3d.exists():
            Denoiser.untrained(DEFAULT_3D_CONFIG).save(model_3d)
        if not model_2d.exists():
            Denoiser.untrained(UNetConfig(channels=4, depth=1)).save(model_2d)
    comm.Barrier()

# %% [markdown]
# ## The test set

# %%
grid = ImageGrid(cells, cells, nz=cells)
data = folder / f"test-{cells}-3d-35db.h5"
if not data.exists():
    simulate_dataset(data, n_samples, SimulationSettings(grid, snr_db=35.0, seed=seed), comm,
                     progress=not small)

# %% [markdown]
# ## Every method on every sample
#
# Three evaluations: the baselines, RED with the 3-D denoiser, RED slice-wise. RED's
# runs also record the error of their start, the denoised ML estimate (`denoised_ml_error`), so
# `denoised-ml` is not run again (an ML estimate costs about 2 minutes at 24³ on one core).

# %%
runs = {
    "baselines": (("ml", "gn-tv"), None),
    "3-D": (("red",), model_3d),
    "slice-wise": (("red",), model_2d),
}
summaries = {}
for name, (methods, model) in runs.items():
    options = {} if model is None else {"red": {"denoiser": str(model)}}
    settings = EvaluationSettings(methods, options, figure_limit=2)
    out = folder / f"eval-{cells}-3d-{name}"
    summaries[name] = evaluate(data, out, settings, comm, progress=not small)
    if comm.rank == 0:  # the mean time per sample of each method, from the rows
        rows = json.loads((out / "metrics.json").read_text())["per_sample"]
        for method in methods:
            times = [r["time"] for r in rows if r["method"] == method]
            summaries[name][method]["time"] = {"mean": sum(times) / len(times)}
        if model is None:
            continue
        starts = [read_estimate(out / "estimates" / "red" / f"sample_{i}.npz")[2]
                  ["denoised_ml_error"] for i in range(n_samples)]
        summaries[name]["denoised-ml"] = {"relative_rmse": {
            "mean": float(np.mean(starts)), "std": float(np.std(starts))}}

# %% [markdown]
# ## The table
#
# Mean ± std over the test set; time per sample on one rank (the samples are spread over the
# ranks). denoised-ml: the relative error only (RED's start, recorded by its runs).

# %%
if comm.rank == 0:
    rows = [("ml", "baselines"), ("gn-tv", "baselines"), ("denoised-ml", "3-D"),
            ("red", "3-D"), ("denoised-ml", "slice-wise"), ("red", "slice-wise")]
    ml = summaries["baselines"]["ml"]["relative_rmse"]["mean"]
    lines = [f"# 3-D results: {n_samples} test phantoms, {cells}³ cells, 35 dB, seed {seed}\n",
             "| method | denoiser | rel. RMSE | vs ml | SSIM | CNR [dB] | contrast error | "
             "time [s] |", "|---|---|---|---|---|---|---|---|"]
    for method, denoiser in rows:
        s = summaries[denoiser][method]
        rel = s["relative_rmse"]
        rest = (f"{s['ssim']['mean']:.3f} | {s['cnr_db']['mean']:.1f} | "
                f"{s['contrast_ratio_error']['mean']:.3f} | {s['time']['mean']:.0f}"
                if "ssim" in s else "- | - | - | -")
        lines.append(
            f"| {method} | {denoiser if 'ml' != method != 'gn-tv' else '-'} | "
            f"{rel['mean']:.3f} ± {rel['std']:.3f} | {rel['mean'] / ml - 1:+.0%} | {rest} |")
    text = "\n".join(lines) + "\n"
    (folder / "red-3d-table.md").write_text(text)
    print(text)
