# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # The paper's comparison (Fig. 2 and 3, section 5) on held-out phantoms
#
# Ground truth, classical Gauss-Newton (Tikhonov and total variation), the statistical estimate
# without regularisation (ML), one pass of the learned denoiser over it (denoised-ml) and RED,
# on a test set the denoiser never saw (seed 9001; the shipped denoiser was trained on seeds 1-3
# and their family offsets, `scripts/train-denoiser`),
# at 25, 35 and 45 dB. Everything goes through the package's own commands, so each step can be
# rerun by hand:
#
# ```bash
# scripts/env fenics-red simulate --samples 24 --grid 64 --snr 35 --seed 9001 \
#     --out runs/test-64-35db.h5
# scripts/env mpirun -n 2 fenics-red evaluate runs/test-64-35db.h5 --out runs/eval-64-35db \
#     --figures 4
# ```
#
# Run the whole walk-through (about 5 minutes on 2 cores on 2026-12-01; every stage resumes):
#
# ```bash
# make paper            # = scripts/env mpirun -n 2 python demos/paper_comparison.py
# ```
#
# It writes `runs/paper-tables.md` with the tables the README quotes.

# %%
import os
from pathlib import Path

from mpi4py import MPI

from fenics_red.data import SimulationSettings, simulate_dataset
from fenics_red.evaluation import EvaluationSettings, evaluate, summary_table
from fenics_red.parallel import exit_with_launcher
from fenics_red.raster import ImageGrid

comm = MPI.COMM_WORLD
if comm.size > 1:  # a rank of mpirun: stop when mpirun is gone (Ctrl-C on make paper)
    exit_with_launcher()
small = os.environ.get("FENICS_RED_DEMO_SMALL") == "1"  # the tests run it at a tiny size
folder = Path(os.environ.get("FENICS_RED_DEMO_OUT", "runs"))
cells, n_samples, seed = (12, 2, 9001) if small else (64, 24, 9001)
snrs = (35.0,) if small else (25.0, 35.0, 45.0)
all_methods = ("gn-tikhonov", "gn-tv", "ml", "denoised-ml", "red")
options = {}
if comm.rank == 0:  # a fresh clone has no runs/ folder yet
    folder.mkdir(parents=True, exist_ok=True)
comm.Barrier()
if small:  # no trained model in a test: an untrained denoiser is the identity map
    from fenics_red.denoiser import save_identity

    model = save_identity(folder / "identity.pt", comm)
    options = {m: {"denoiser": str(model)} for m in ("denoised-ml", "red")}

# %% [markdown]
# ## Test sets
#
# The same phantoms at every SNR: a sample's phantom and its noise come from separate random
# streams of the seed, so only the noise changes with the SNR.

# %%
grid = ImageGrid(cells, cells)
sets = {}
for snr in snrs:
    path = folder / f"test-{cells}-{snr:g}db.h5"
    if not path.exists():
        simulate_dataset(path, n_samples, SimulationSettings(grid, snr_db=snr, seed=seed), comm,
                         progress=not small)
    sets[snr] = path

# %% [markdown]
# ## Every method on every sample
#
# The Gauss-Newton baselines are the expensive part (a few seconds per sample at 64²), so they
# run at 35 dB only; ML, denoised-ml and RED run at every SNR.

# %%
summaries = {}
for snr, path in sets.items():
    methods = all_methods if snr == 35.0 else ("ml", "denoised-ml", "red")
    settings = EvaluationSettings(methods, {m: o for m, o in options.items() if m in methods},
                                  figure_limit=4)
    summaries[snr] = (methods, evaluate(path, folder / f"eval-{cells}-{snr:g}db", settings,
                                        comm, progress=not small))

# %% [markdown]
# ## Tables
#
# Mean ± std over the test set. The first table is the check of RED against the
# unregularised estimate and the one-shot denoiser at three noise levels; the second is the
# paper's comparison with the classical baselines.

# %%
if comm.rank == 0:
    lines = [f"# RED against its yardsticks ({n_samples} held-out phantoms, {cells}² cells, "
             f"seed {seed})\n",
             "| SNR | ml | denoised-ml | red | red vs ml | red vs denoised-ml |",
             "|---|---|---|---|---|---|"]
    for snr, (_methods, summary) in summaries.items():
        rel = {m: summary[m]["relative_rmse"] for m in ("ml", "denoised-ml", "red")}
        gain = rel["red"]["mean"] / rel["ml"]["mean"] - 1
        over_dml = rel["red"]["mean"] / rel["denoised-ml"]["mean"] - 1
        lines.append(f"| {snr:g} dB | " + " | ".join(
            f"{rel[m]['mean']:.4f} ± {rel[m]['std']:.3f}" for m in rel)
            + f" | {gain:+.0%} | {over_dml:+.2%} |")
    methods, summary = summaries[35.0]
    text = "\n".join(lines) + "\n\n## All methods at 35 dB\n\n" + summary_table(summary, methods)
    (folder / "paper-tables.md").write_text(text)
    print(text)
