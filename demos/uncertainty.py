"""Is the posterior standard deviation map calibrated? (``--uncertainty``, docs/uncertainty.md)

    scripts/env python demos/uncertainty.py                    # 64², the table of the docs
    scripts/env mpirun -n 2 python demos/uncertainty.py        # the phantoms spread over 2 ranks
    FENICS_RED_DEMO_SMALL=1 scripts/env python demos/uncertainty.py    # 16², 2 phantoms: a check

Simulated data at 25, 35 and 45 dB on a 64² grid (``FENICS_RED_DEMO_GRID`` changes it), the same
phantoms at every SNR (seeds 7100-7105: used nowhere else), two families:

* ``paper``: the default generator (sharp inclusions of 0.3-0.8 in a 0.10-0.15 background, ratio
  2-8), the data the methods are compared on;
* ``mild``: the linearised check, inclusions of 0.15-0.25 with soft edges (3 cells): small
  contrast and smooth, where the Laplace approximation (Gaussian prior, linearised forward
  model) should hold.

For each estimate (``ml`` and ``gn-tikhonov``, each with its σ map,
:class:`fenics_red.uncertainty.UncertaintyRunner`, rank 200, oversampling 10) the share of nodes
with ``|E_true − E_est| ≤ 2σ`` (95 % for a calibrated Gaussian) and ``≤ 1σ`` (68 %), the relative
error, the median of ``σ/E_est``, the time of the estimate and of its map, and the smallest kept
eigenvalue relative to the prior (truncation: below ~0.1 the neglected terms are small). The
tables go to ``runs/uncertainty/calibration.md`` (``FENICS_RED_DEMO_OUT`` changes the folder)
with every row in ``calibration.json``.
"""

import json
import os
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

from fenics_red.data import SimulationSettings, simulate_sample
from fenics_red.methods import get_method
from fenics_red.parallel import exit_with_launcher
from fenics_red.phantoms import PhantomSettings
from fenics_red.raster import ImageGrid
from fenics_red.uncertainty import UncertaintyRunner, UncertaintySettings, coverage

small = os.environ.get("FENICS_RED_DEMO_SMALL") == "1"
n = 16 if small else int(os.environ.get("FENICS_RED_DEMO_GRID", "64"))
grid = ImageGrid(n, n)
out = Path(os.environ.get("FENICS_RED_DEMO_OUT") or "runs/uncertainty")
seeds = range(7100, 7102 if small else int(os.environ.get("FENICS_RED_DEMO_PHANTOMS_END",
                                                            "7106")))
snrs = (25.0, 35.0, 45.0)
methods = ("ml", "gn-tikhonov")
families = {"paper": PhantomSettings(),
            "mild": PhantomSettings(inclusion=(0.15, 0.25), soft_edge=3.0)}
settings = UncertaintySettings(rank=40 if small else 200)
comm = MPI.COMM_WORLD
if comm.size > 1:  # a rank of mpirun: stop when mpirun is gone (Ctrl-C on make paper)
    exit_with_launcher()

jobs = [(family, snr, seed) for family in families for snr in snrs for seed in seeds]
rows = []
runners = {m: UncertaintyRunner(m, get_method(m).setup(grid, SimulationSettings(grid).forward,
                                                       MPI.COMM_SELF, {}), settings)
           for m in methods}
try:
    for k, (family, snr, seed) in enumerate(jobs):
        if k % comm.size != comm.rank:
            continue
        sample = simulate_sample(0, SimulationSettings(grid, snr_db=snr, seed=seed,
                                                       phantoms=families[family]))
        for method, runner in runners.items():
            t = time.perf_counter()
            estimate, _, info, std = runner.run_with_std(sample)
            total = time.perf_counter() - t
            E = sample.E
            rows.append({
                "family": family, "snr": snr, "seed": seed, "method": method,
                "error": float(np.linalg.norm(estimate - E) / np.linalg.norm(E)),
                "coverage_2": coverage(E, estimate, std, 2.0),
                "coverage_1": coverage(E, estimate, std, 1.0),
                "relative_std": float(np.median(std / estimate)),
                "estimate_s": total - info["uncertainty_time"],
                "std_s": info["uncertainty_time"],
                "eigen_s": info["uncertainty_eigen_time"],
                "products": info["uncertainty_hessian_products"],
                "smallest_eigenvalue": info["uncertainty_smallest_eigenvalue"],
                "prior_weight": info["uncertainty_prior_weight"]})
            print(f"[rank {comm.rank}] {family} {snr:g} dB seed {seed} {method}: error "
                  f"{rows[-1]['error']:.3f}, ±2σ {100 * rows[-1]['coverage_2']:.1f} %, "
                  f"σ {rows[-1]['std_s']:.1f} s, estimate {rows[-1]['estimate_s']:.1f} s",
                  flush=True)
finally:
    for runner in runners.values():
        runner.destroy()

gathered = comm.gather(rows, root=0)
if comm.rank == 0:
    rows = [r for part in gathered for r in part]
    lines = [f"Grid {n}², {len(seeds)} phantoms per family (seeds {seeds.start}-"
             f"{seeds.stop - 1}), rank {settings.rank} + {settings.oversampling}; mean (min-max) "
             "over the phantoms. Coverage: share of nodes with |E_true − E_est| ≤ 2σ (1σ); "
             "95 % (68 %) for a calibrated Gaussian. λ_k: smallest kept eigenvalue relative to "
             "the prior (largest over the phantoms).", "",
             "| phantoms | SNR | method | rel. error | ±2σ [%] | ±1σ [%] | median σ/E | "
             "estimate [s] | σ map [s] | of it eigenpairs [s] | Hessian products | λ_k |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family in families:
        for snr in snrs:
            for method in methods:
                chosen = [r for r in rows if (r["family"], r["snr"], r["method"])
                          == (family, snr, method)]

                def cell(key, scale=1.0, fmt=".1f", chosen=chosen):
                    v = scale * np.array([r[key] for r in chosen])
                    return f"{v.mean():{fmt}} ({v.min():{fmt}}-{v.max():{fmt}})"

                lines.append(
                    f"| {family} | {snr:g} dB | {method} | {cell('error', fmt='.3f')} | "
                    f"{cell('coverage_2', 100)} | {cell('coverage_1', 100)} | "
                    f"{np.mean([r['relative_std'] for r in chosen]):.3f} | "
                    f"{np.mean([r['estimate_s'] for r in chosen]):.2f} | "
                    f"{np.mean([r['std_s'] for r in chosen]):.2f} | "
                    f"{np.mean([r['eigen_s'] for r in chosen]):.2f} | {chosen[0]['products']} | "
                    f"{max(r['smallest_eigenvalue'] for r in chosen):.2g} |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.md").write_text(table)
    (out / "calibration.json").write_text(json.dumps(rows, indent=1))
    print(table)
    print(f"wrote {out / 'calibration.md'} and calibration.json")
