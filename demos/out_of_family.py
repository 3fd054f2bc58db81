# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # The learned prior on shapes it never saw, against tuned baselines
#
# The shipped denoiser was trained on the four training families (`inclusions`, `textured`,
# `gradient`, `field`; `simulate --family`).
# Here every method meets two families that no training set holds (`voronoi`: polygons that
# touch, each its own modulus; `rings`: stiff shells around soft cores; `simulate --help`), at 25,
# 35 and 45 dB, 24 phantoms each, on seeds used nowhere else (9101-9106).
#
# **Fair baselines.** RED's weight and stopping rule were chosen on the validation sets of
# `docs/studies.md` (16 paper phantoms per SNR, seed 5000; five λ rules, then a wider sweep of
# seven). The Gauss-Newton baselines get the same data and as many settings: the discrepancy
# target τ (`--tau`) for both, and with it the TV smoothing (`--tv-delta`) for GN-TV. One
# setting per method is kept for all three SNRs (as RED's λ rule is), the one with the lowest
# mean relative RMSE over the 48 validation phantoms. The test sets play no part in any choice.
#
# ```bash
# scripts/env mpirun -n 2 python demos/out_of_family.py     # about an hour on 2 cores
# ```
#
# It writes `runs/out-of-family/tuning.md`, `runs/out-of-family/tables.md` and
# `docs/figures/families.png` (one phantom of each family). Every evaluation resumes.

# %%
import json
import os
from pathlib import Path

from mpi4py import MPI

import numpy as np

from fenics_red.data import SimulationSettings, simulate_dataset
from fenics_red.evaluation import EvaluationSettings, evaluate, read_estimate
from fenics_red.methods import get_method
from fenics_red.parallel import exit_with_launcher
from fenics_red.phantoms import FAMILIES, HELD_OUT_FAMILIES, PhantomSettings, random_phantom
from fenics_red.raster import ImageGrid

comm = MPI.COMM_WORLD
if comm.size > 1:  # a rank of mpirun: stop when mpirun is gone (Ctrl-C on make paper)
    exit_with_launcher()
small = os.environ.get("FENICS_RED_DEMO_SMALL") == "1"  # the tests run it at a tiny size
folder = Path(os.environ.get("FENICS_RED_DEMO_OUT", "runs")) / "out-of-family"
cells, n_val, n_test = (16, 2, 2) if small else (64, 16, 24)
snrs = (35.0,) if small else (25.0, 35.0, 45.0)
test_families = ("voronoi", "rings")
assert set(test_families) <= set(HELD_OUT_FAMILIES)
grid = ImageGrid(cells, cells)
if comm.rank == 0:
    folder.mkdir(parents=True, exist_ok=True)
comm.Barrier()
options = {}
if small:  # no trained model in a test: an untrained denoiser is the identity map
    from fenics_red.denoiser import save_identity

    model = save_identity(folder / "identity.pt", comm)
    options = {m: {"denoiser": str(model)} for m in ("denoised-ml", "red")}


def data_set(name: str, n: int, snr: float, seed: int, family: str = "inclusions") -> Path:
    """The data set ``name`` (simulated once; a finished file is kept)."""
    path = folder / f"{name}.h5"
    if not path.exists():
        settings = SimulationSettings(grid, snr_db=snr, seed=seed,
                                      phantoms=PhantomSettings(family=family))
        simulate_dataset(path, n, settings, comm, progress=not small)
    return path


def per_sample(out: Path) -> list[dict]:
    """The rows of an evaluation's ``metrics.json`` (one per sample and method)."""
    return json.loads((out / "metrics.json").read_text())["per_sample"]


# %% [markdown]
# ## The families, one phantom each

# %%
if comm.rank == 0 and not small:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(FAMILIES), figsize=(2.2 * len(FAMILIES), 2.6))
    for axis, family in zip(axes, FAMILIES, strict=True):
        E, _ = random_phantom(grid, np.random.default_rng(3), PhantomSettings(family=family))
        axis.imshow(E, cmap="viridis", vmin=0.0, vmax=1.0)
        held = " (held out)" if family in HELD_OUT_FAMILIES else ""
        axis.set_title(family + held, fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    Path("docs/figures").mkdir(parents=True, exist_ok=True)
    figure.savefig("docs/figures/families.png", dpi=100)
    plt.close(figure)

# %% [markdown]
# ## Tuning the baselines on RED's validation sets
#
# τ = 1 is the default. τ below 1 fits the data closer than their noise (less
# regularisation), above 1 less closely. A first grid, then rounds around each method's best, τ
# 10 % either side and the smoothing one step either way on a ladder of steps of about 3, until
# no best moves (at most six rounds; settings tried before are not run again): the search may
# leave the first grid.

# %%
taus = (0.7, 1.0) if small else (0.6, 0.8, 1.0, 1.3, 1.7)
tv_grid = ([(0.7, 1.0), (1.0, 1.0)] if small else
           [(tau, delta) for tau in (0.6, 0.8, 1.0, 1.3) for delta in (0.3, 1.0, 3.0)])
first = ([("gn-tikhonov", {"discrepancy_tau": tau}) for tau in taus]
         + [("gn-tv", {"discrepancy_tau": tau, "tv_delta": delta}) for tau, delta in tv_grid])
validation = {snr: data_set(f"val-{cells}-{snr:g}db", n_val, snr, 5000) for snr in snrs}
scores: dict[tuple, float] = {}


def tag(option: dict) -> str:
    return "".join(f"-{k.split('_')[-1]}{v:g}" for k, v in sorted(option.items()))


def tune(candidates) -> dict:
    """Mean validation relative RMSE of each new candidate; the best setting of each method."""
    for method, option in candidates:
        key = (method, tuple(sorted(option.items())))
        if key in scores:
            continue
        values = []
        for snr, path in validation.items():
            out = folder / f"tune-{snr:g}db-{method}{tag(option)}"
            evaluate(path, out, EvaluationSettings((method,), {method: option}, figures=False),
                     comm, progress=not small)
            if comm.rank == 0:
                values += [r["relative_rmse"] for r in per_sample(out)]
        scores[key] = comm.bcast(float(np.mean(values)) if comm.rank == 0 else None)
    best = {}  # method -> key of its lowest score
    for key, value in scores.items():
        if key[0] not in best or value < scores[best[key[0]]]:
            best[key[0]] = key
    return {method: dict(option) for method, (_, option) in best.items()}


deltas = (0.0037, 0.011, 0.033, 0.1, 0.3, 1.0, 3.0, 9.0)  # the smoothing's ladder


def around(method: str, option: dict) -> list:
    """The settings next to ``option``: τ × 0.9 and × 1.1, the smoothing's ladder neighbours."""
    tau = option["discrepancy_tau"]
    near = [(method, {**option, "discrepancy_tau": round(tau * f, 3)}) for f in (0.9, 1.1)]
    if "tv_delta" in option:
        i = deltas.index(option["tv_delta"])
        near += [(method, {**option, "tv_delta": deltas[j]})
                 for j in (i - 1, i + 1) if 0 <= j < len(deltas)]
    return near


best = tune(first)
for _ in range(1 if small else 6):
    before, best = best, tune([c for m, o in best.items() for c in around(m, o)])
    if best == before:
        break
if comm.rank == 0:
    lines = ["# Tuning the Gauss-Newton baselines (validation: seed 5000, paper phantoms, "
             f"{n_val} per SNR at {', '.join(f'{s:g}' for s in snrs)} dB)\n",
             "| method | setting | mean relative RMSE |", "|---|---|---|"]
    for (method, option), value in scores.items():
        text = ", ".join(f"{k} = {v:g}" for k, v in option)
        lines.append(f"| {method} | {text} | {value:.4f} |")
    lines += ["", "Kept: " + "; ".join(
        f"{m}: {o} ({scores[(m, tuple(sorted(o.items())))]:.4f})" for m, o in best.items())]
    (folder / "tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

# %% [markdown]
# ## Every method on the held-out families
#
# The tuned baselines run as `gn-tikhonov` and `gn-tv` with the kept settings (the command line:
# `evaluate --methods gn-tv --tau T --tv-delta D`); their defaults are also reported. Each
# Gauss-Newton setting has a folder of its own, so a setting shared by two rows runs once.

# %%
gn_rows = {"gn-tikhonov (defaults)": ("gn-tikhonov", {}), "gn-tv (defaults)": ("gn-tv", {}),
           "gn-tikhonov": ("gn-tikhonov", best["gn-tikhonov"]), "gn-tv": ("gn-tv", best["gn-tv"])}
learned = ("ml", "denoised-ml", "red")
results = {}
seed = 9101
for family in test_families:
    for snr in snrs:
        path = data_set(f"test-{family}-{cells}-{snr:g}db", n_test, snr, seed, family)
        seed += 1
        out = folder / f"eval-{family}-{snr:g}db"
        evaluate(path, out, EvaluationSettings(learned, options, figure_limit=2), comm,
                 progress=not small)
        rows = per_sample(out) if comm.rank == 0 else []
        for row, (method, option) in gn_rows.items():
            settings = get_method(method).options(option)
            where = folder / (f"eval-{family}-{snr:g}db-{method}"
                              + tag({"discrepancy_tau": settings.discrepancy_tau,
                                     **({"tv_delta": settings.tv_delta}
                                        if method == "gn-tv" else {})}))
            evaluate(path, where, EvaluationSettings((method,), {method: option},
                                                     figures=False), comm, progress=not small)
            if comm.rank == 0:
                rows += [{**r, "method": row} for r in per_sample(where)]
        results[family, snr] = rows

# %% [markdown]
# ## Tables
#
# Mean ± std over each test set. RED is compared with the better GN-TV of the set (tuned or
# default, by mean relative RMSE), and "below on" counts the phantoms where RED's relative RMSE
# is below that one's.

# %%
if comm.rank == 0:
    shown = ("gn-tikhonov (defaults)", "gn-tv (defaults)", "gn-tikhonov", "gn-tv", "ml",
             "denoised-ml", "red")
    names = {"gn-tikhonov": "gn-tikhonov (tuned)", "gn-tv": "gn-tv (tuned)"}
    metrics = (("relative_rmse", "rel. RMSE", 3), ("ssim", "SSIM", 3), ("cnr_db", "CNR [dB]", 1),
               ("contrast_ratio_error", "contrast error", 3))
    lines = [f"# Held-out families ({n_test} phantoms each, {cells}² cells; tuned: "
             + "; ".join(f"{m} {o}" for m, o in best.items()) + ")\n"]
    for (family, snr), rows in results.items():
        lines += [f"## {family}, {snr:g} dB\n",
                  "| method | " + " | ".join(title for _, title, _ in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        by_method = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["sample"])
                     for m in shown}
        for method in shown:
            values = [np.array([r[k] for r in by_method[method]]) for k, _, _ in metrics]
            entries = [f"{v.mean():.{d}f} ± {v.std():.{d}f}"
                       for v, (_, _, d) in zip(values, metrics, strict=True)]
            lines.append(f"| {names.get(method, method)} | " + " | ".join(entries) + " |")
        red, dml = (np.array([r["relative_rmse"] for r in by_method[m]])
                    for m in ("red", "denoised-ml"))
        # the better GN-TV on this set, tuned or default: RED is measured against the stronger
        tv_row = min(("gn-tv", "gn-tv (defaults)"), key=lambda m: np.mean(
            [r["relative_rmse"] for r in by_method[m]]))
        tv = np.array([r["relative_rmse"] for r in by_method[tv_row]])
        runs = sorted((folder / f"eval-{family}-{snr:g}db" / "estimates" / "red").glob("*.npz"))
        from_ml = sum(read_estimate(run)[2].get("start") == "ml" for run in runs)
        lines += ["", f"RED / better GN-TV ({names.get(tv_row, tv_row)}): "
                      f"{red.mean() / tv.mean():.3f} (RED below on "
                      f"{int((red < tv).sum())} of {len(red)}); RED / denoised-ml: "
                      f"{red.mean() / dml.mean():.4f}; RED started from the ML estimate "
                      f"(start check) on {from_ml} of {len(runs)}\n"]
    (folder / "tables.md").write_text("\n".join(lines))
    print("\n".join(lines))
