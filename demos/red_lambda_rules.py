# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Which weight λ keeps RED stable?
#
# RED (paper, equations 6-12) descends on `g(E) + λ R(E)` with `∇R(E) = E − C(E)`: the data
# term pulls towards the measurements, the denoiser `C` towards the modulus maps it has learned.
# This walk-through compares the λ rules of `fenics_red.priors` on held-out phantoms:
#
# * `lipschitz:c`: λ = c L_g, a fixed fraction of the data term's Lipschitz constant;
# * `paper:c`: λ = c ‖∇g(E)‖, the paper's rule (12);
# * `balance:c`: λ = c ‖∇g(E)‖ / ‖E − C(E)‖, the balance of the two gradients.
#
# For each rule it reports the mean relative error of RED, how its runs ended (a fixed point:
# relative change below `rtol`; a round without a significant decrease of the misfit; the misfit
# guard; the step budget), and the λ they ended with,
# next to the two yardsticks: the maximum-likelihood (ML) estimate and one denoiser pass over it
# (`denoised-ml`). The table in `docs/studies.md` comes from this script on
# the three validation sets (one call per SNR).
#
# Choose λ on a validation set, never on the test set of `make paper` (seed 9001) nor on the
# training phantoms (seeds 1-3 and their family offsets, `scripts/train-denoiser`):
#
# ```bash
# for snr in 25 35 45; do
#   scripts/env fenics-red simulate --samples 16 --grid 64 --snr $snr --seed 5000 \
#       --out runs/val-64-${snr}db.h5
#   scripts/env python demos/red_lambda_rules.py runs/val-64-${snr}db.h5 16
# done
# scripts/env python demos/red_lambda_rules.py runs/val-64-35db.h5 16 lipschitz:0.003,lipschitz:0.01
# ```
#
# (a third argument, comma-separated, replaces the list of rules; a rule may carry other
# `REDSettings` fields after `+`, e.g. `lipschitz:0.001+min_misfit_decrease=0+max_steps=20`).

# %%
import os
import sys
from collections import Counter

from mpi4py import MPI

import numpy as np

from fenics_red.data import SimulationSettings, load_dataset, simulate_dataset
from fenics_red.raster import ImageGrid
from fenics_red.red import REDReconstructor, REDSettings, load_denoiser

comm = MPI.COMM_SELF  # one sample at a time on one rank: a small study
small = os.environ.get("FENICS_RED_DEMO_SMALL") == "1"  # the tests run it at a tiny size
data_path = sys.argv[1] if len(sys.argv) > 1 else "runs/val-64-35db.h5"
n_samples = int(sys.argv[2]) if len(sys.argv) > 2 else 16
rules = (sys.argv[3].split(",") if len(sys.argv) > 3 else
         ["paper:1", "lipschitz:0.001", "lipschitz:0.0003", "lipschitz:0.1", "lipschitz:1"])

# %% [markdown]
# The data: a validation set (or, for the tests, three phantoms on a 12² grid), and the
# denoiser (an untrained one is the identity map: then every rule must give back the ML estimate).

# %%
if small:
    import tempfile

    from fenics_red.denoiser import Denoiser, UNetConfig

    folder = tempfile.mkdtemp(prefix="fenics-red-demo-")
    data_path = simulate_dataset(f"{folder}/data.h5", 3, SimulationSettings(ImageGrid(12, 12)),
                                 comm, progress=False)
    n_samples, rules = 3, ["lipschitz:0.01", "balance:1", "lipschitz:0.01+max_steps=2"]
    denoiser = Denoiser.untrained(UNetConfig(channels=4, depth=1))
else:
    denoiser = load_denoiser()
data = load_dataset(data_path)
samples = [data.sample(i) for i in range(min(n_samples, len(data)))]
grid, forward = data.grid, data.settings.forward


def relative_error(estimate, truth):
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


# %% [markdown]
# ## The yardsticks and each rule

# %%
results = {}
for rule in rules:
    lam, *extra = rule.split("+")
    fields = {key: value if key in ("start", "solver", "acceleration") else float(value)
              for key, value in (item.split("=", 1) for item in extra)}
    fields = {k: int(v) if k in ("max_steps", "inner_steps") else v for k, v in fields.items()}
    red = REDReconstructor(grid, forward, REDSettings(lam=lam, **fields), comm,
                           denoiser=denoiser)
    errors, stops, lams, ml, dml = [], Counter(), [], [], []
    for sample in samples:
        estimate, history, info = red.run_sample(sample)
        errors.append(relative_error(estimate, sample.E))
        stops[info["stop"]] += 1
        lams.append(info["lam"] / history["refresh_lipschitz"][-1])
        ml.append(info["ml_error"])
        dml.append(info["denoised_ml_error"])
    red.destroy()
    results[rule] = (np.mean(errors), np.std(errors), stops, np.median(lams))
    results["ml"], results["denoised-ml"] = (np.mean(ml), np.std(ml)), (np.mean(dml),
                                                                          np.std(dml))

# %%
print(f"{len(samples)} samples of {data_path} (SNR {data.settings.snr_db:g} dB)")
print("stops: fixed point (rtol) / no significant misfit decrease / misfit guard / budget")
print(f"{'method':>18} | rel. error (mean ± std) | stops        | median λ / L_g")
for name in ("ml", "denoised-ml"):
    mean, std = results[name]
    print(f"{name:>18} | {mean:.4f} ± {std:.3f}")
for rule in rules:
    mean, std, stops, lam = results[rule]
    counts = "/".join(str(stops[k]) for k in ("rtol", "insignificant", "misfit_guard",
                                               "max_steps"))
    print(f"{'red ' + rule:>18} | {mean:.4f} ± {std:.3f}        | {counts:<12} | {lam:.2e}",
          flush=True)
data.close()
