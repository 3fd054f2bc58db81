"""3-D forward model and Γ solve on tetrahedral boxes, 1 or more ranks, beside a STREAM triad.

    scripts/env python benchmarks/forward3d.py
    scripts/env mpirun -n 2 python benchmarks/forward3d.py
    scripts/env python benchmarks/run.py forward3d              # both, then the speed-ups
    scripts/env mpirun -n 2 python benchmarks/forward3d.py gamma:56 gamg:70   # some rows only
    srun -n 64 python benchmarks/forward3d.py gamg:160                 # any size (12 M dofs)

Unit cubes of n³ cells (``dolfinx.mesh.create_box``, 6 tetrahedra per cube, (n+1)³ nodes and
3 (n+1)³ displacement dofs) wrapped into a :class:`~fenics_red.domain.Domain` (load on top,
clamped bottom); modulus pseudo-random in [0.1, 0.8] per node (a hash of its grid position,
the same on any number of ranks), ν = 0.495, the plain P1 element (``volumetric="element"``, the
3-D default until 2026-12-02, with which these tables were measured; the nodal bulk part, the
default since, has about 4 times the nonzeros and 3-5 times the memory:
:data:`fenics_red.forward.NODAL_MEMORY_FACTOR`). Rows:

* ``gamg``: :class:`~fenics_red.forward.ElasticityModel` with ``ForwardSettings(solver="gamg")``
  (CG, smoothed aggregation with the 6 rigid-body modes, relative tolerance 1e-12); 16³, 32³,
  64³ and 70³ cells (1.07 M dofs);
* ``lu``: the same with MUMPS LU (on OpenBLAS), 20³ only: at 32³ (107 811 dofs) its
  factorisation takes 16 s and 2.3 GB on 1 rank (measured once, 2026-12-01; 145 s with the
  reference BLAS), against 11 s and 0.3 GB for the GAMG set-up + solve;
* ``Γ (2 K solves)``: ``StatisticalLikelihood(...).gamma.solve`` at 56³ cells (0.56 M dofs) with
  the K solver given explicitly as CG + GAMG (``LikelihoodSettings(k_petsc_options=...)``, the
  forward model's GAMG options) and the Γ KSP as ``preonly`` (Σw = 0: ``Γ⁻¹ r = K⁻¹ Σn⁻¹ K⁻¹ r``,
  two K solves). Its "PC setup" is ``refresh``: K assembled and copied, GAMG set up.

Columns: wall times (slowest rank; one call each, the solves are long), iterations (CG; for Γ
those of the two K solves), peak resident memory per rank (``VmHWM`` of ``/proc/self/status``,
reset at the start of each row after freed memory is given back with ``malloc_trim``, largest
over the ranks; the row's mesh, spaces, matrices and solver, plus the process's about 120 MB of
Python, DOLFINx and PETSc), the 1-minute load average of the machine when the row started, and
the CPU time the slowest rank got over the row's wall time (other jobs on the machine show as
less than 1). The triad is ``a = b + s c`` on arrays of 2²⁶ doubles (three arrays, 1.5 GB per
process, beyond the caches), evaluated in blocks of 2¹⁵ so that ``s c`` stays in the cache
(24 bytes moved per element, as STREAM counts), best of 10; with 2 ranks each process works on
its own arrays at the same time, and the GB/s are summed. Below the tables: the speed-ups of
2 ranks against 1 and the weak-scaling model of docs/hpc.md (:func:`projection`).
"""

import os
import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    SMALL,
    Meter,
    header,
    markdown_table,
    merge_rows,
    peak_mb,
    peak_reset,
    timed,
)

from dolfinx import mesh  # noqa: E402
from fenics_red.domain import Domain  # noqa: E402
from fenics_red.forward import ElasticityModel, ForwardSettings  # noqa: E402

VOLUMETRIC = "element"  # what the tables were measured with (module docstring)
from fenics_red.likelihood import (  # noqa: E402
    LikelihoodSettings,
    NoiseModel,
    StatisticalLikelihood,
)

NAME = "forward3d"
#: the K solver of Γ, given explicitly: the forward model's GAMG options (fenics_red.forward)
GAMG = {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-12, "ksp_atol": 1e-30,
        "ksp_max_it": 2000, "pc_gamg_coarse_eq_limit": 1000,
        "mg_levels_ksp_type": "chebyshev", "mg_levels_pc_type": "jacobi"}
if SMALL:  # make bench SIZE=small: seconds
    GAMG_SIZES, LU_SIZES, GAMMA_SIZE, TRIAD_LENGTH = (4, 6), (4,), 6, 2**18
else:
    GAMG_SIZES, LU_SIZES, GAMMA_SIZE, TRIAD_LENGTH = (16, 32, 64, 70), (20,), 56, 2**26


def levels(ksp) -> str:
    """Number of multigrid levels of a GAMG preconditioner ("" for LU)."""
    pc = ksp.getPC()
    return str(pc.getMGLevels()) if pc.getType() == "gamg" else ""


def box_model(n: int, comm, solver: str) -> ElasticityModel:
    msh = mesh.create_box(comm, [np.zeros(3), np.ones(3)], [n, n, n], mesh.CellType.tetrahedron)
    model = ElasticityModel(Domain.from_mesh(msh, source=f"box {n}^3"),
                            ForwardSettings(solver=solver, volumetric=VOLUMETRIC))
    # a random modulus per node, the same for any number of ranks (by node coordinates)
    x = model.Q.tabulate_dof_coordinates()
    index = np.rint(x * n).astype(np.int64) @ np.array([1, n + 1, (n + 1) ** 2])
    model.E.x.array[:] = 0.1 + 0.7 * ((index * 2654435761) % 1000003) / 1000003
    model.modulus_changed()
    return model


def row_start(n: int, comm) -> dict:
    peak_reset()
    meter = Meter()
    return {"cells": f"{n}^3", "dofs": 3 * (n + 1) ** 3, "ranks": comm.size,
            "load (1 min)": meter.load, "_meter": meter}


def row_end(row: dict, comm) -> dict:
    """Add the peak memory and the share of the row's wall time the slowest rank had a CPU for
    (below 1: other processes took cores from it)."""
    meter = row.pop("_meter")
    row["peak memory/rank [MB]"] = peak_mb(comm)
    row["CPU/wall"] = meter.share(comm)
    return row


def forward_row(n: int, solver: str, comm) -> dict:
    row = row_start(n, comm)
    model = box_model(n, comm, solver)
    t_K, _ = timed(model.assemble_K, comm)
    t_D, _ = timed(lambda: model.assemble_D(model.u), comm)
    model.assemble_load()
    t_pc, _ = timed(model.ksp.setUp, comm)  # GAMG hierarchy or LU factorisation
    t_solve, _ = timed(model.solve, comm)   # K is assembled: the set-up solver is reused
    row.update({"what": solver, "K assembly [s]": t_K, "D(u) assembly [s]": t_D,
                "PC setup [s]": t_pc, "solve [s]": t_solve,
                "iterations": str(model.ksp.getIterationNumber()),
                "levels": levels(model.ksp)})
    model.destroy()
    return row_end(row, comm)


def gamma_row(n: int, comm) -> dict:
    row = row_start(n, comm)
    model = box_model(n, comm, "gamg")  # (its K carries the rigid-body near-nullspace)
    t_K, _ = timed(model.assemble_K, comm)
    t_D, _ = timed(lambda: model.assemble_D(model.u), comm)
    settings = LikelihoodSettings(k_petsc_options=GAMG, petsc_options={"ksp_type": "preonly"})
    fid = StatisticalLikelihood(model, noise=NoiseModel((1e-5, 1e-5, 2e-5)), settings=settings)
    gamma = fid.gamma
    E = fid.create_vector()
    E.array[:] = model.E.x.array[: model.Q.dofmap.index_map.size_local]
    t_refresh, _ = timed(lambda: fid.refresh(E), comm)
    r, out = gamma.free.duplicate(), gamma.free.duplicate()
    r.setRandom()
    r.pointwiseMult(r, gamma.free)  # a residual: zero on Dirichlet rows
    history = []  # iteration numbers of the K solves; each solve starts at 0
    gamma.k_ksp.setMonitor(lambda ksp, it, rnorm: history.append(it))
    t_solve, _ = timed(lambda: gamma.solve(r, out), comm)
    ends = [i for i, it in enumerate(history) if it == 0][1:] + [len(history)]
    per_solve = [history[i - 1] for i in ends]
    row.update({"what": "Γ (2 K solves)", "K assembly [s]": t_K, "D(u) assembly [s]": t_D,
                "PC setup [s]": t_refresh, "solve [s]": t_solve,
                "iterations": "+".join(str(i) for i in per_solve),
                "levels": levels(gamma.k_ksp)})
    for vec in (E, r, out):
        vec.destroy()
    fid.destroy()
    model.destroy()
    return row_end(row, comm)


def triad(comm, length: int, repeat: int = 10, block: int = 2**15) -> dict:
    """STREAM triad ``a = b + s c`` on each rank's own arrays, all ranks at once: GB/s summed."""
    a, b, c = np.zeros(length), np.full(length, 1.0), np.full(length, 2.0)
    tmp = np.empty(block)
    best = np.inf
    meter = Meter()
    for _ in range(repeat):
        comm.Barrier()
        start = time.perf_counter()
        for i in range(0, length, block):
            j = min(i + block, length)
            np.multiply(c[i:j], 3.0, out=tmp[: j - i])
            np.add(b[i:j], tmp[: j - i], out=a[i:j])
        best = min(best, comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    assert a[0] == 7.0
    return {"processes": comm.size, "doubles per array": length, "load (1 min)": meter.load,
            "triad [GB/s]": comm.size * 24 * length / best / 1e9, "CPU/wall": meter.share(comm)}


#: Assumed cluster numbers of the weak-scaling model (not measured here: docs/hpc.md).
CLUSTER = {
    "triad per core, full node [GB/s]": 4.0,   # e.g. 128 cores sharing about 500 GB/s
    "message latency [us]": 2.0,               # MPI point-to-point, InfiniBand-class
    "off-node bandwidth per rank [GB/s]": 0.2,  # a 25 GB/s NIC shared by 128 ranks
    "neighbour ranks": 14,                     # of a subdomain of a partitioned 3-D mesh
    "halo exchanges per level per iteration": 8,  # CG SpMV, Chebyshev(2) pre/post, residual, R, P
    "reductions per iteration": 5,             # CG's 2 dots and norm, coarse gather/scatter
}


def projection(rows: list[dict], streams: list[dict]) -> str:
    """The weak-scaling model of docs/hpc.md from the measured rows: time of one GAMG forward
    solve at a fixed number of dofs per rank, up to 1000 ranks."""
    gamg1 = sorted((r for r in rows if r["what"] == "gamg" and r["ranks"] == 1),
                   key=lambda r: r["dofs"])
    gamg2 = [r for r in rows if r["what"] == "gamg" and r["ranks"] == 2]
    triads = {t["processes"]: t["triad [GB/s]"] for t in streams}
    if len(gamg1) < 2 or not gamg2 or 2 not in triads:
        return "(needs GAMG rows on 1 and 2 ranks and the triad on 2 processes)\n"
    # iterations = a + b ln N, least squares over the serial rows
    N = np.array([r["dofs"] for r in gamg1], float)
    it = np.array([int(r["iterations"]) for r in gamg1], float)
    b, a = np.polyfit(np.log(N), it, 1)
    # levels: coarsening factor q per level from the largest row, L(N) = 1 + log(N/1000)/log q
    big = gamg1[-1]
    q = max(4.0, (big["dofs"] / 1000) ** (1 / max(1, int(big["levels"]) - 1)))
    c = CLUSTER
    bandwidth = c["triad per core, full node [GB/s]"]
    here = triads[2] / 2  # GB/s per core with both cores streaming
    alpha = c["message latency [us]"] * 1e-6
    lines = [f"Iterations fitted as {a:.1f} + {b:.2f} ln N (N dofs; serial rows "
             f"{', '.join(f'{int(n)}: {int(i)}' for n, i in zip(N, it, strict=True))}); "
             f"GAMG coarsens by about {q:.0f}x per level ({big['levels']} levels at "
             f"{big['dofs']} dofs). Local work per iteration from the 2-rank rows (both cores "
             f"busy) times {here:.1f}/{bandwidth:g} (triad per core here, 2 processes / "
             "assumed on the cluster). Assumed: "
             + "; ".join(f"{k} {v:g}" for k, v in c.items()) + ".", ""]
    out = []
    for row in sorted(gamg2, key=lambda r: r["dofs"]):
        n_loc = row["dofs"] / 2
        t_local = row["solve [s]"] / int(row["iterations"]) * here / bandwidth
        halo = 6 * (n_loc / 3) ** (2 / 3) * 3 * 8  # bytes: one node layer around a cube
        for ranks in (2, 8, 64, 512, 1000):
            n = n_loc * ranks
            iterations = a + b * np.log(n)
            n_levels = 1 + np.log(max(n / 1000, 1)) / np.log(q)
            exchanges = c["halo exchanges per level per iteration"]
            t_halo = 0.0 if ranks <= 2 else (
                exchanges * 1.2 * halo / (c["off-node bandwidth per rank [GB/s]"] * 1e9)
                + n_levels * exchanges * c["neighbour ranks"] * alpha)
            t_reduce = 0.0 if ranks <= 2 else (  # 2 ranks: in the measured time
                c["reductions per iteration"] * alpha * np.ceil(np.log2(ranks)))
            t_it = t_local + t_halo + t_reduce
            out.append({"dofs/rank": int(n_loc), "ranks": ranks, "dofs": f"{n:.3g}",
                        "iterations": round(iterations), "levels": round(n_levels, 1),
                        "local [ms/it]": 1e3 * t_local, "halo [ms/it]": 1e3 * t_halo,
                        "reductions [ms/it]": 1e3 * t_reduce,
                        "solve [s]": iterations * t_it})
        base = out[-5]["solve [s]"]
        for r in out[-5:]:
            r["weak efficiency"] = base / r["solve [s]"]
    return "\n".join(lines) + "\n" + markdown_table(out)


def speed_ups(rows: list[dict]) -> str:
    """2 ranks against 1: the forward solve (and set-up + solve), for each row with both."""
    by = {(r["cells"], r["what"], r["ranks"]): r for r in rows}
    out = []
    for (cells, what, ranks), two in by.items():
        one = by.get((cells, what, 1))
        if ranks != 2 or one is None:
            continue
        total = lambda r: r["PC setup [s]"] + r["solve [s]"]  # noqa: E731
        out.append({"cells": cells, "dofs": two["dofs"], "what": what,
                    "solve: 1 rank / 2 ranks": one["solve [s]"] / two["solve [s]"],
                    "setup + solve": total(one) / total(two),
                    "K assembly": one["K assembly [s]"] / two["K assembly [s]"],
                    "memory/rank, 2 ranks / 1": (two["peak memory/rank [MB]"]
                                                 / one["peak memory/rank [MB]"])})
    if not out:
        return "(run on 1 and on 2 ranks to fill it)\n"
    large = [r["solve: 1 rank / 2 ranks"] for r in out if r["dofs"] >= 500_000]
    floor = (f"\nAt 500 000 dofs and more the solves run {min(large):.2f} to {max(large):.2f} "
             "times faster on 2 ranks than on 1 (the issue's floor: 1.6).\n" if large else "")
    return markdown_table(out) + floor


PLAN = ([("gamg", n) for n in GAMG_SIZES[:2]] + [("lu", n) for n in LU_SIZES]
        + [("gamma", GAMMA_SIZE)] + [("gamg", n) for n in GAMG_SIZES[2:]]
        + [("triad", TRIAD_LENGTH)])  # smallest first


def main(only=()):
    """Run the rows of :data:`PLAN`, or those named in ``only``: ``KIND`` (every row of that
    kind in the plan) or ``KIND:N`` (that kind on N³ cells, in the plan or not, e.g.
    ``gamg:100`` under ``srun`` for a weak-scaling point); the table is written after each."""
    comm = MPI.COMM_WORLD
    plan = [(kind, n) for kind, n in PLAN if not only or kind in only]
    plan += [(kind, int(n)) for kind, _, n in (item.partition(":") for item in only) if n]
    for kind, n in plan:
        if kind not in ("gamg", "lu", "gamma", "triad"):
            raise SystemExit(f"unknown row {kind}:{n}; rows are gamg, lu, gamma (:N) and triad")
        if kind == "triad":
            rows, streams = [], [triad(comm, n)]
        else:
            rows = [gamma_row(n, comm) if kind == "gamma" else forward_row(n, kind, comm)]
            streams = []
        if comm.rank == 0:
            print((rows or streams)[0], flush=True)
            write(rows, streams)


def write(rows: list[dict], streams: list[dict]) -> None:
    """Merge new rows into benchmarks/results/forward3d.json and render forward3d.md."""
    key = ("cells", "ranks", "what")
    merged = merge_rows(NAME, rows, key)
    streams = merge_rows(NAME, streams, ("processes",), section="triad")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    notes = (f"Intel Xeon (KVM guest), {memory:.0f} GiB. Wall times of one call, slowest rank; "
             "'PC setup' is the GAMG hierarchy (or the LU factorisation; for Γ: refresh, K "
             "assembled + copied + GAMG set up); 'solve' reuses it. Peak memory per rank "
             "includes about 120 MB of Python and libraries. 'load': the machine's 1-minute "
             "load average when the row started (it counts this benchmark's own ranks once "
             "they have run for a while: about 1 on 1 rank, 2 on 2); 'CPU/wall': the CPU time "
             "the slowest rank got over the row's wall time (below 1: other processes took its "
             "core). See the docstring of benchmarks/forward3d.py.")
    text = header("3-D forward model and Γ solve", notes)
    text += markdown_table(merged) if merged else "(no rows yet)\n"
    text += "\n## Speed-up, 2 ranks against 1\n\n" + speed_ups(merged)
    text += ("\n## Memory bandwidth: STREAM triad on 1 and 2 cores\n\n"
             "`a = b + s c` (numpy, blocked), each process on its own arrays, GB/s summed over "
             "the processes (24 bytes per element).\n\n"
             + (markdown_table(streams) if streams else "(not run yet)\n"))
    one = [s for s in streams if s["processes"] == 1]
    two = [s for s in streams if s["processes"] == 2]
    if one and two:
        ratio = two[0]["triad [GB/s]"] / one[0]["triad [GB/s]"]
        text += (f"\nTriad, 2 processes / 1: {ratio:.2f}: about the most a memory-bound kernel "
                 "(sparse matrix-vector products, the bulk of a GAMG solve) can gain from the "
                 "second core. The triad varies by some 10 % between runs even on a quiet "
                 "machine; each row is the best of 10 passes.\n")
    text += ("\n## Weak-scaling projection to 1000 ranks (a model, not a measurement)\n\n"
             "One GAMG forward solve (CG to 1e-12) at a fixed number of dofs per rank; the model "
             "and its assumptions are in docs/hpc.md. 2 ranks: this machine's measurement "
             "rescaled to the assumed per-core bandwidth.\n\n" + projection(merged, streams))
    (RESULTS / f"{NAME}.md").write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
