"""Shared helpers of the benchmarks: timing and Markdown tables merged across rank counts.

Each benchmark records rows (dicts) under a key (for example grid size and number of ranks); rows
are kept in ``benchmarks/results/NAME.json`` so that serial and ``mpirun -n 2`` runs fill one
table, rendered to ``benchmarks/results/NAME.md``.
"""

from __future__ import annotations

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


def record(name: str, rows: list[dict], key: tuple[str, ...], title: str, notes: str = "") -> str:
    """Merge ``rows`` into the table ``name`` (rows with the same key replace older ones)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / f"{name}.json"
    old = json.loads(store.read_text()) if store.exists() else {"rows": []}
    merged = {tuple(r[k] for k in key): r for r in old["rows"]}
    merged.update({tuple(r[k] for k in key): r for r in rows})
    ordered = [merged[k] for k in sorted(merged, key=_natural)]
    store.write_text(json.dumps({"rows": ordered}, indent=1))
    columns = list(ordered[0])
    lines = [f"# {title}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; "
             f"updated {time.strftime('%Y-%m-%d %H:%M')}. {notes}".strip(), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in ordered:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    table = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(table)
    return table


def _natural(key: tuple) -> tuple:
    """Sort '64x64' before '128x128': numbers inside strings compare as numbers."""
    return tuple(tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(k)))
                 for k in key)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
