"""Shared helpers of the benchmarks: timing and Markdown tables merged across rank counts.

Each benchmark records rows (dicts) under a key (for example grid size and number of ranks); rows
are kept in ``benchmarks/results/NAME.json`` so that serial and ``mpirun -n 2`` runs fill one
table, rendered to ``benchmarks/results/NAME.md``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import time
from pathlib import Path

#: ``make bench SIZE=small`` (``FENICS_RED_BENCH_SIZE=small``): every benchmark at a tiny size, only
#: to check that it runs; its tables go to ``FENICS_RED_BENCH_OUT`` (make: ``runs/bench/``), never
#: over the real ones in ``benchmarks/results/``.
SIZE = os.environ.get("FENICS_RED_BENCH_SIZE") or "full"
if SIZE not in ("full", "small"):
    raise SystemExit(f"FENICS_RED_BENCH_SIZE must be full or small, got {SIZE!r}")
SMALL = SIZE == "small"
RESULTS = Path(os.environ.get("FENICS_RED_BENCH_OUT")
               or ("runs/bench" if SMALL else Path(__file__).resolve().parent / "results"))


def best_of(fn, repeat: int = 3) -> float:
    """Smallest wall time of ``repeat`` calls of ``fn`` (seconds)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def mean_time(fn, repeat: int, comm) -> float:
    """Mean wall time of ``fn`` over ``repeat`` calls (after one warm-up), the slowest rank's."""
    from mpi4py import MPI

    fn()
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return comm.allreduce((time.perf_counter() - start) / repeat, op=MPI.MAX)


class Meter:
    """The machine's 1-minute load average when a timed row starts, and the share of the row's
    wall time the slowest rank had a CPU for (``CPU/wall``; below 1: other processes on the
    machine took cores from it). Start one per row; :meth:`columns` gives both columns."""

    def __init__(self):
        self.load = os.getloadavg()[0]
        self._clock = (time.perf_counter(), time.process_time())

    def share(self, comm=None) -> float:
        """CPU time over wall time since the start, the smallest over the ranks of ``comm``."""
        wall, cpu = self._clock
        share = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-12)
        if comm is None:
            return share
        from mpi4py import MPI

        return comm.allreduce(share, op=MPI.MIN)

    def columns(self, comm=None) -> dict:
        return {"load (1 min)": self.load, "CPU/wall": self.share(comm)}


def peak_reset() -> None:
    """Give freed memory back to the system (a previous row's MUMPS factors stay resident
    otherwise) and reset this process's peak resident memory (VmHWM) to what is left."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak then covers the whole run so far
        pass


def peak_mb(comm) -> float:
    """The largest peak resident memory over the ranks, in MB (VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from mpi4py import MPI

    return comm.allreduce(kb / 1024, op=MPI.MAX)


def timed(fn, comm) -> tuple[float, object]:
    """Wall time of one call of ``fn`` (slowest rank), and its result."""
    from mpi4py import MPI

    comm.Barrier()
    start = time.perf_counter()
    out = fn()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX), out


def record(name: str, rows: list[dict], key: tuple[str, ...], title: str, notes: str = "") -> str:
    """Merge ``rows`` into the table ``name`` (rows with the same key replace older ones)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    ordered = merge_rows(name, rows, key)
    table = header(title, notes) + markdown_table(ordered)
    (RESULTS / f"{name}.md").write_text(table)
    return table


def header(title: str, notes: str = "") -> str:
    """The title and machine line of a results table."""
    return (f"# {title}\n\nMachine: {platform.machine()}, {os.cpu_count()} cores; "
            f"updated {time.strftime('%Y-%m-%d %H:%M')}. {notes}".strip() + "\n\n")


def merge_rows(name: str, rows: list[dict], key: tuple[str, ...], section: str = "rows"
               ) -> list[dict]:
    """Merge ``rows`` into ``section`` of ``benchmarks/results/NAME.json`` (rows with the same
    key replace older ones; other sections are kept) and return that section, sorted. Rank 0
    only."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / f"{name}.json"
    old = json.loads(store.read_text()) if store.exists() else {}
    merged = {tuple(r[k] for k in key): r for r in old.get(section, [])}
    merged.update({tuple(r[k] for k in key): r for r in rows})
    ordered = [merged[k] for k in sorted(merged, key=_natural)]
    old[section] = ordered
    partial = store.with_name(store.name + ".partial")  # replaced whole: never read half-written
    partial.write_text(json.dumps({"rows": [], **old}, indent=1))
    os.replace(partial, store)
    return ordered


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of ``rows`` (columns: every key of the rows, in order of appearance,
    unless given)."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _natural(key: tuple) -> tuple:
    """Sort '64x64' before '128x128': numbers inside strings compare as numbers."""
    return tuple(tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(k)))
                 for k in key)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
