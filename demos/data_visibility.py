# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # How much can the physics loop add to one denoiser pass?
#
# RED starts from the denoised ML estimate `C(E_ml)` and then lets the data correct it. On the
# project's test sets its loop lowers the error of that start by 0 to 4 %. Is that the loop's
# fault, or do the data hold no more? With `Γ` frozen the data term is exactly quadratic,
# `g(E) = ½‖f − D E‖²_Γ⁻¹`, and the residual at the true modulus is `K(E)·noise`, Gaussian with
# covariance `Γ` (no force noise). So along each eigenvector `vᵢ` of `H = Dᵀ Γ⁻¹ D` (eigenvalue
# `μᵢ`) the data determine `E` to a standard deviation of exactly `1/√μᵢ`, independently of the
# other directions. An error component `cᵢ = vᵢᵀ(E − E_true)` can be corrected by the data only
# where `|cᵢ| > 1/√μᵢ`; elsewhere the data know less than the estimate already does.
#
# For every estimate this walk-through reports, with the Hessian formed densely (one Hessian
# product per node, `Γ` at the true modulus) and diagonalised:
#
# - **visible**: the share of the squared error in directions where `cᵢ² μᵢ > 1`;
# - **oracle**: the relative error of an estimator that keeps, direction by direction, the better
#   of the estimate and the data (`Σ min(cᵢ², 1/μᵢ)`, expected squared error): no method that
#   combines this estimate with these data can beat it without a better prior;
# - **χ² per direction**: the mean of `μᵢ nᵢ²` over all directions, `nᵢ` the data's own error
#   along `vᵢ` (the unregularised least-squares solution's). It is 1 when the noise model is
#   right: a check of `Γ`, not an assumption.
#
# ```bash
# scripts/env mpirun -n 2 python demos/data_visibility.py     # about 40 minutes on 2 cores
# ```
#
# It reads the evaluation folders of `make paper` (`runs/eval-64-*`) and of
# `demos/out_of_family.py` (`runs/out-of-family/eval-*`) and the 35 dB validation sets of
# `demos/red_start_check.py`, takes their first 8 phantoms per set
# (`FENICS_RED_VISIBILITY_SAMPLES`), and writes `runs/data-visibility.md` and one result file
# per phantom (`runs/data-visibility/`, resumed). Each rank takes every other phantom.

# %%
import json
import math
import os
from pathlib import Path

from mpi4py import MPI

import numpy as np

from fenics_red.data import load_dataset
from fenics_red.evaluation import read_estimate
from fenics_red.forward import ElasticityModel
from fenics_red.io import atomic_output, to_json
from fenics_red.likelihood import StatisticalLikelihood
from fenics_red.measurements import Measurement
from fenics_red.metrics import relative_rmse, ssim
from fenics_red.parallel import exit_with_launcher
from fenics_red.red import REDReconstructor, REDSettings
from fenics_red.solvers import MLSettings

world = MPI.COMM_WORLD
if world.size > 1:  # a rank of mpirun: stop when mpirun is gone (Ctrl-C)
    exit_with_launcher()
comm = MPI.COMM_SELF  # one phantom per rank: the dense Hessian lives on one process
small = os.environ.get("FENICS_RED_DEMO_SMALL") == "1"  # the tests run it at a tiny size
runs = Path(os.environ.get("FENICS_RED_DEMO_OUT", "runs"))
n_samples = int(os.environ.get("FENICS_RED_VISIBILITY_SAMPLES", "2" if small else "8"))
methods = ("ml", "denoised-ml", "red")
sets = []  # (label, data set, evaluation folder)
for snr in (25, 35, 45):
    sets.append((f"paper phantoms, {snr} dB", runs / f"test-64-{snr}db.h5",
                 runs / f"eval-64-{snr}db"))
    for family in ("voronoi", "rings"):
        sets.append((f"{family}, {snr} dB", runs / "out-of-family" / f"test-{family}-64-{snr}db.h5",
                     runs / "out-of-family" / f"eval-{family}-{snr}db"))
# part 2 (a loop that would take more): validation sets only, the test sets play no part
validation = [(f"{name}, 35 dB", runs / "out-of-family" / f"val-{stem}64-35db.h5")
              for name, stem in (("paper phantoms (validation)", ""),
                                 ("layers (validation)", "layers-"))]
red_settings = REDSettings()
if small:  # the tests: a tiny data set, its estimates with an untrained (identity) denoiser
    from fenics_red.data import SimulationSettings, simulate_dataset
    from fenics_red.denoiser import Denoiser, UNetConfig
    from fenics_red.evaluation import EvaluationSettings, evaluate
    from fenics_red.raster import ImageGrid

    data, folder = runs / "visibility-small.h5", runs / "visibility-small"
    identity = runs / "identity-denoiser.pt"
    if not world.bcast(data.exists()):
        simulate_dataset(data, n_samples, SimulationSettings(ImageGrid(10, 10), snr_db=35.0,
                                                             seed=3), world, progress=False)
    if world.rank == 0 and not identity.exists():
        Denoiser.untrained(UNetConfig(channels=4, depth=1)).save(identity)
    world.Barrier()
    options = {name: {"denoiser": str(identity)} for name in ("denoised-ml", "red")}
    evaluate(data, folder, EvaluationSettings(methods, options, figures=False), world,
             progress=False)
    sets = [("small", data, folder)]
    validation = [("small", data)]
    red_settings = REDSettings(denoiser=str(identity))
missing = [str(folder / "estimates" / method) for _, _, folder in sets for method in methods
           if not (folder / "estimates" / method).is_dir()]
missing += [str(data) for _, data in validation if not data.exists()]
if missing:  # every rank sees the same files: all stop together
    raise SystemExit(f"{missing[0]} does not exist (and {len(missing) - 1} more): run `make "
                     "paper`, `scripts/env mpirun -n 2 python demos/out_of_family.py` and "
                     "`scripts/env python demos/red_start_check.py` first")
out = runs / "data-visibility"
out.mkdir(parents=True, exist_ok=True)


# %% [markdown]
# ## The measure, one phantom at a time

# %%
def dense_hessian(likelihood: StatisticalLikelihood) -> np.ndarray:
    """``H = Dᵀ Γ⁻¹ D`` at the frozen ``Γ``, column by column (nodal values in file order)."""
    n = likelihood.create_vector().getSize()
    x, y = likelihood.create_vector(), likelihood.create_vector()
    H = np.empty((n, n))
    for j in range(n):
        x.zeroEntries()
        x.setValue(j, 1.0)
        x.assemble()
        likelihood.hessian_mult(x, y)
        H[:, j] = y.array_r
    x.destroy()
    y.destroy()
    return 0.5 * (H + H.T)


def quadratic_form(likelihood: StatisticalLikelihood, at) -> tuple[np.ndarray, np.ndarray]:
    """``(H, Dᵀ Γ⁻¹ f)`` of the data term with ``Γ`` refreshed at the vector ``at``: ``g`` is
    quadratic there, and ``∇g(E) = H E − Dᵀ Γ⁻¹ f`` gives the second from one gradient."""
    likelihood.refresh(at)
    gradient = likelihood.create_vector()
    likelihood.gradient(at, gradient)
    H = dense_hessian(likelihood)
    b = H @ at.array_r - gradient.array_r
    gradient.destroy()
    return H, b


def eigen(H: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(μ, V, informed)``: ``H``'s eigenvalues (round-off negatives set to 0), eigenvectors, and
    the directions the data inform (``μ > 1e-12 μ_max``)."""
    mu, V = np.linalg.eigh(H)
    mu = np.maximum(mu, 0.0)
    return mu, V, mu > 1e-12 * mu.max()


def save_json(path: Path, result: dict) -> None:
    """``result`` to ``path``, whole or not at all (a resumed run skips finished phantoms)."""
    with atomic_output(path) as tmp:
        tmp.write_text(to_json(result, indent=1, sort_keys=False) + "\n")


def visibility(mu: np.ndarray, V: np.ndarray, error: np.ndarray, norm: float) -> dict:
    """Visible share, oracle error and actual error of one estimate's ``error`` (nodal)."""
    c = V.T @ error
    c2 = c**2
    with np.errstate(divide="ignore"):
        data_var = np.where(mu > 0, 1.0 / mu, np.inf)
    visible = c2 * mu > 1.0
    return {"error": float(np.linalg.norm(error) / norm),
            "visible": float(c2[visible].sum() / c2.sum()),
            "oracle": float(math.sqrt(np.minimum(c2, data_var).sum()) / norm)}


def analyse(data_path: Path, folder: Path, index: int) -> dict:
    """The measures of every method's estimate of phantom ``index`` (vectors in the model's own
    order: the Hessian's columns are unit vectors of it)."""
    with load_dataset(data_path) as data:
        grid, forward = data.grid, data.settings.forward
        sample = data.sample(index)
    m = Measurement.from_sample(sample)
    model = ElasticityModel.on_grid(grid, comm, forward)
    likelihood = StatisticalLikelihood(model, settings=MLSettings().likelihood)
    estimates = {}
    try:
        likelihood.set_data(m.displacement, m.noise)
        vec = likelihood.from_values(m.truth, name="true modulus")
        H, b = quadratic_form(likelihood, vec)  # Γ at the truth: the noise model of the data
        t = vec.array_r.copy()
        for method in methods:  # each estimate to the model's order through the same vector
            path = folder / "estimates" / method / f"sample_{index}.npz"
            if path.exists():
                likelihood.from_values(read_estimate(path)[0], vec, name=method)
                estimates[method] = vec.array_r.copy()
        vec.destroy()
    finally:
        likelihood.destroy()
        model.destroy()
    mu, V, informed = eigen(H)
    norm = float(np.linalg.norm(t))
    # the data's own estimate along each informed direction, and its error: n_i ~ N(0, 1/μ_i)
    n_data = (V.T @ b)[informed] / mu[informed] - (V.T @ t)[informed]
    result = {"nodes": int(t.size), "chi2_per_direction": float(np.mean(mu[informed] * n_data**2)),
              "directions_above_1": int((mu > 1.0).sum())}
    for method, values in estimates.items():
        result[method] = visibility(mu, V, values - t, norm)
    return result


# %% [markdown]
# ## All sets, shared over the ranks

# %%
jobs = [(label, data, folder, i) for label, data, folder in sets for i in range(n_samples)]
results = {}
for k, (label, data, folder, i) in enumerate(jobs):
    name = out / f"{data.stem}-{i}.json"
    if k % world.size == world.rank and not name.exists():
        result = analyse(data, folder, i)
        save_json(name, result)
        print(f"{label} #{i}: " + ", ".join(
            f"{m} {result[m]['error']:.3f} -> oracle {result[m]['oracle']:.3f}"
            for m in methods if m in result), flush=True)
world.Barrier()
for label, data, _, i in jobs:
    results.setdefault(label, []).append(
        json.loads((out / f"{data.stem}-{i}.json").read_text()))

# %% [markdown]
# ## The table

# %%
if world.rank == 0:
    lines = ["| set | phantoms | χ² per direction | ml: error → oracle | denoised-ml: error → "
             "oracle | its visible share | red | red vs denoised-ml | oracle vs denoised-ml |",
             "|---" * 9 + "|"]

    def mean(rows, method, key):
        return float(np.mean([r[method][key] for r in rows]))

    for label, rows in results.items():
        chi2 = np.mean([r["chi2_per_direction"] for r in rows])
        dml, red = mean(rows, "denoised-ml", "error"), mean(rows, "red", "error")
        oracle = mean(rows, "denoised-ml", "oracle")
        lines.append(
            f"| {label} | {len(rows)} | {chi2:.2f} | {mean(rows, 'ml', 'error'):.3f} → "
            f"{mean(rows, 'ml', 'oracle'):.3f} | {dml:.3f} → {oracle:.3f} | "
            f"{mean(rows, 'denoised-ml', 'visible'):.2f} | {red:.3f} | "
            f"{100 * (red / dml - 1):+.1f} % | {100 * (oracle / dml - 1):+.1f} % |")
    table = "\n".join(lines) + "\n"
    (runs / "data-visibility.md").write_text(
        "# What the data can still correct (demos/data_visibility.py)\n\n" + table)
    print(table)

# %% [markdown]
# ## Part 2: could a loop take more? The MAP estimate toward the denoised one
#
# With the denoiser held at `z = C(E_ml)` RED's fixed-point equation is that of a Gaussian prior
# centred on `z`: `(H + λI) E = Dᵀ Γ⁻¹ f + λ z`, solved exactly here in `H`'s eigenbasis (`Γ` at
# `z`, as a loop sees it; positivity floor as RED's). Two ways to set `λ`: relative to `H`'s
# largest eigenvalue (`κ μ_max`; RED's own weight is `0.001 L_g`, so `κ = 0.001` is RED's
# equation solved to the end with the denoiser held), and from an assumed relative error `ε`
# of the denoised estimate (`λ = N / (ε² ‖z‖²)`: independent errors of that size at the `N`
# nodes). Relative error and SSIM on the validation sets (paper phantoms and the held-out
# `layers` family, 35 dB); the test sets play no part.

# %%
kappas = (3e-4, 1e-3, 3e-3, 1e-2)
epsilons = (0.05, 0.1, 0.15, 0.2, 0.3)


def map_sweep(data_path: Path, index: int) -> dict:
    """Relative error and SSIM of RED, denoised-ml and the MAP estimates toward ``z``."""
    with load_dataset(data_path) as data:
        grid, forward = data.grid, data.settings.forward
        sample = data.sample(index)
    reconstructor = REDReconstructor(grid, forward, red_settings, comm)
    try:
        red, _, _ = reconstructor.run_sample(sample)
        z_image, _, _ = reconstructor.run_sample(sample, stages="denoised-ml")
        likelihood = reconstructor.likelihood
        z = likelihood.from_values(z_image, name="denoised ML estimate")
        H, b = quadratic_form(likelihood, z)
        zz = z.array_r.copy()
        mu, V, informed = eigen(H)
        cz, cb = V.T @ zz, V.T @ b
        d = np.where(informed, cb / np.where(informed, mu, 1.0), cz)  # the data's own estimate
        truth = sample.E
        result = {}

        def score(name, image):
            result[name] = [relative_rmse(image, truth), float(ssim(image, truth))]

        score("denoised-ml", z_image)
        score("red", red)
        lams = {f"κ = {k:g}": k * mu.max() for k in kappas}
        lams.update({f"ε = {e:g}": zz.size / (e**2 * (zz @ zz)) for e in epsilons})
        floor = red_settings.loop_settings().floor * zz.mean()
        for name, lam in lams.items():
            z.array[:] = np.maximum(V @ (cz + mu / (mu + lam) * (d - cz)), floor)
            score(name, likelihood.to_values(z))
        z.destroy()
        return result
    finally:
        reconstructor.destroy()


jobs = [(label, data, i) for label, data in validation for i in range(n_samples)]
for k, (label, data, i) in enumerate(jobs):
    name = out / f"map-{data.stem}-{i}.json"
    if k % world.size == world.rank and not name.exists():
        result = map_sweep(data, i)
        save_json(name, result)
        print(f"{label} #{i}: " + ", ".join(f"{key} {v[0]:.3f}" for key, v in result.items()),
              flush=True)
world.Barrier()
if world.rank == 0:
    sweeps = {}
    for label, data, i in jobs:
        sweeps.setdefault(label, []).append(
            json.loads((out / f"map-{data.stem}-{i}.json").read_text()))
    keys = list(next(iter(sweeps.values()))[0])
    lines = ["| estimate | " + " | ".join(sweeps) + " |", "|---" * (len(sweeps) + 1) + "|"]
    for key in keys:
        cells = [f"{np.mean([r[key][0] for r in rows]):.4f} / "
                 f"{np.mean([r[key][1] for r in rows]):.3f}" for rows in sweeps.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    sweep_table = "\n".join(lines) + "\n"
    with open(runs / "data-visibility.md", "a") as file:
        file.write("\n## MAP toward the denoised estimate (validation; relative error / SSIM)"
                   "\n\n" + sweep_table)
    print(sweep_table)
