"""Time to accuracy of the ML estimate: FISTA (the default) against preconditioned CG.

    scripts/env python benchmarks/ml_solvers.py
    scripts/env mpirun -n 2 python benchmarks/ml_solvers.py
    scripts/env python benchmarks/run.py ml_solvers          # both

One random sharp phantom of the default generator (sample 0 of ``SimulationSettings(grid,
seed=2718)``: a seed no test set uses) at 64², 128² and 256² cells, on the ranks of
``MPI.COMM_WORLD`` (mesh distributed). Both iterations run in the same process, one after the
other, so that a load on the machine hits both.

**Noise-free (200 dB)**: ``MLSettings(method=..., stop="budget", rtol=0)`` (no early stop: the
fixed-point test ``rtol`` would end FISTA far from the truth; ``Γ`` refreshed every 1000 steps,
the default ``steps_per_round``) with a budget of :data:`BUDGETS` steps or seconds, whichever
comes first. Columns:

* ``≤ 10 % [s]`` (5 %, 2 %): wall time from the start of the solve (uniform fit, first
  factorisation of ``K``, FISTA's power iteration or CG's preconditioner included; the assembly
  of ``D(u_m)``, the same for both, not) to the first iterate whose relative L2 error is at most
  10 % (5 %, 2 %); ``not reached`` when the budget ran out first. ``steps``: gradient steps
  (FISTA) or Hessian products (CG) until then; ``back-subs``: back-substitutions with the
  factorisation of ``K`` until then (counted; the common unit of work: a FISTA step costs
  three, a CG step two, the power iteration two per product);
* ``steps run``, ``stop`` (``max_steps``: the step budget; ``time cap``: the seconds),
  ``final error`` (the returned, projected estimate), ``best error`` (over the iterates);
* CG's iterates inside a round are not projected onto ``E ≥ floor`` (the loop projects at each
  refresh and at the end); their errors are upper bounds of the projected ones' (the true
  modulus is above the floor).

**35 dB**: the ML estimate as defined (``MLSettings()`` defaults: discrepancy rule, a budget of
150 steps, ``Γ`` frozen at the uniform fit) and the same with ``method="cg"``: ``time [s]`` to the
stop, ``steps``, ``stop``, ``error`` of the estimate, ``best error`` over the iterates and its
step.

Every row has the machine's 1-minute load average when it started and the CPU time the slowest
rank had over the row's wall time (``CPU/wall``, below 1: other processes took its core). Times
are the slowest rank's.
"""

import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SMALL, Meter, header, markdown_table, merge_rows  # noqa: E402

from fenics_red.data import SimulationSettings, simulate_sample  # noqa: E402
from fenics_red.raster import ImageGrid  # noqa: E402
from fenics_red.solvers import MLReconstructor, MLSettings  # noqa: E402

NAME = "ml_solvers"
SEED = 2718
LEVELS = (0.10, 0.05, 0.02)
#: noise-free budget per grid size: (steps, seconds), whichever comes first
BUDGETS = {8: (60, 20.0)} if SMALL else {64: (3000, 120.0), 128: (2000, 150.0),
                                          256: (800, 150.0)}
METHODS = ("fista", "cg")


def counting_back_subs(ml: MLReconstructor) -> list[int]:
    """Count the back-substitutions of the likelihood's ``K`` factorisation (every ``Γ`` solve,
    data-term value and the uniform fit go through ``Gamma.apply_K_inverse``)."""
    gamma = ml.likelihood.gamma
    count = [0]
    solve = gamma.apply_K_inverse

    def counted(x, y):
        count[0] += 1
        solve(x, y)

    gamma.apply_K_inverse = counted  # an instance attribute: Gamma's own calls see it
    return count


def solve(grid, sample, settings, comm, cap=np.inf):
    """One ML solve with a per-iterate trace ``(step, time, error, back-subs)`` (times: the
    slowest rank's; the solve is stopped when they pass ``cap`` seconds)."""
    ml = MLReconstructor(grid, settings=settings, comm=comm)
    count = counting_back_subs(ml)
    trace = []

    def callback(state):
        t = comm.allreduce(state.time, op=MPI.MAX)  # every rank takes the same decision
        trace.append((state.step, t, state.error, count[0]))
        return t > cap

    meter = Meter()
    comm.Barrier()
    start = time.perf_counter()
    estimate, history = ml.run_sample(sample, callback=callback)
    wall = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    ml.destroy()
    error = float(np.linalg.norm(estimate - sample.E) / np.linalg.norm(sample.E))
    stop = "time cap" if history.stop_reason == "callback" else history.stop_reason
    return np.array(trace), history, error, stop, wall, meter


def first_reached(trace, level):
    hit = np.flatnonzero(trace[:, 2] <= level)
    if not len(hit):
        return "not reached", "", ""
    step, t, _, subs = trace[hit[0]]
    return float(t), int(step), int(subs)


def noise_free_rows(n, comm):
    grid = ImageGrid(n, n)
    sample = simulate_sample(0, SimulationSettings(grid, snr_db=200.0, seed=SEED))
    steps, cap = BUDGETS[n]
    rows = []
    for method in METHODS:
        settings = MLSettings(method=method, stop="budget", max_steps=steps, rtol=0.0)
        trace, history, error, stop, wall, meter = solve(grid, sample, settings, comm, cap)
        row = {"cells": f"{n}x{n}", "ranks": comm.size, "method": method,
               "budget": f"{steps} steps / {cap:g} s", "load (1 min)": meter.load}
        for level in LEVELS:
            t, s, b = first_reached(trace, level)
            pct = f"{100 * level:g} %"
            row.update({f"≤ {pct} [s]": t, f"≤ {pct} steps": s, f"≤ {pct} back-subs": b})
        row.update({"steps run": int(trace[-1, 0]), "stop": stop,
                    "time run [s]": float(trace[-1, 1]), "final error": error,
                    "best error": float(np.nanmin(trace[:, 2])), "wall [s]": wall,
                    "CPU/wall": meter.share(comm)})
        rows.append(row)
        if comm.rank == 0:
            print(row, flush=True)
    return rows


def noisy_rows(n, comm, snr=35.0):
    grid = ImageGrid(n, n)
    sample = simulate_sample(0, SimulationSettings(grid, snr_db=snr, seed=SEED))
    rows = []
    for method in METHODS:
        trace, history, error, stop, wall, meter = solve(grid, sample, MLSettings(method=method),
                                                         comm)
        best = int(np.nanargmin(trace[:, 2]))
        row = {"cells": f"{n}x{n}", "ranks": comm.size, "data": f"{snr:g} dB",
               "method": method, "load (1 min)": meter.load, "time [s]": float(trace[-1, 1]),
               "steps": int(trace[-1, 0]), "back-subs": int(trace[-1, 3]), "stop": stop,
               "misfit/n": float(history.final["misfit"] / history.n_equations),
               "error": error, "best error": float(trace[best, 2]),
               "best at step": int(trace[best, 0]), "wall [s]": wall,
               "CPU/wall": meter.share(comm)}
        rows.append(row)
        if comm.rank == 0:
            print(row, flush=True)
    return rows


def speed_ups(rows):
    """FISTA's time to each level over CG's (``>x``: FISTA did not get there within its budget,
    a lower bound; ``-``: neither did CG)."""
    by = {(r["cells"], r["ranks"], r["method"]): r for r in rows}
    out = []
    for (cells, ranks, method), cg in by.items():
        fista = by.get((cells, ranks, "fista"))
        if method != "cg" or fista is None:
            continue
        row = {"cells": cells, "ranks": ranks}
        for level in LEVELS:
            column = f"≤ {100 * level:g} % [s]"
            t_f, t_c = fista[column], cg[column]
            if isinstance(t_c, str):
                ratio = "-"
            elif isinstance(t_f, str):
                ratio = f">{fista['time run [s]'] / t_c:.0f}"
            else:
                ratio = f"{t_f / t_c:.1f}"
            row[f"FISTA/CG time to {100 * level:g} %"] = ratio
        out.append(row)
    return markdown_table(out) if out else "(no pairs yet)\n"


def write(clean, noisy):
    clean = merge_rows(NAME, clean, ("cells", "ranks", "method"))
    noisy = merge_rows(NAME, noisy, ("cells", "ranks", "data", "method"), section="noisy")
    steps = ", ".join(f"{n}²: {s} steps or {c:g} s" for n, (s, c) in BUDGETS.items())
    text = header("ML estimate: time to accuracy, FISTA against preconditioned CG",
                  f"Sample 0 of seed {SEED} (a random sharp phantom); mesh distributed over the "
                  "ranks; times of the slowest rank from the start of the solve (uniform fit, "
                  "factorisation, power iteration or preconditioner included). See the "
                  "docstring of benchmarks/ml_solvers.py.")
    text += (f"## Noise-free data (200 dB): time to a relative error\n\nBudget ({steps}), "
             "whichever first; `rtol = 0` (no fixed-point stop), Γ refreshed every 1000 steps. "
             "'back-subs': back-substitutions with the factorisation of K (FISTA step 3, CG "
             "step 2, power iteration 2 per product).\n\n")
    text += markdown_table(clean) if clean else "(no rows yet)\n"
    text += "\n### Speed-up of CG\n\n" + speed_ups(clean)
    text += ("\n## 35 dB: the ML estimate to its stop\n\nMLSettings() defaults (discrepancy "
             "rule misfit ≤ n, or 150 steps; Γ frozen at the uniform fit), and the same with "
             "method='cg'.\n\n")
    text += markdown_table(noisy) if noisy else "(no rows yet)\n"
    (RESULTS / f"{NAME}.md").write_text(text)


def main():
    comm = MPI.COMM_WORLD
    clean, noisy = [], []
    for n in BUDGETS:
        clean += noise_free_rows(n, comm)
        noisy += noisy_rows(n, comm)
    if comm.rank == 0:
        write(clean, noisy)
        print((RESULTS / f"{NAME}.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
