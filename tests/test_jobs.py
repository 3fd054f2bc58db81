"""Specification of the driver of resumable batch jobs (:mod:`fenics_red.jobs`): progress."""

import sys

import numpy as np

from fenics_red import io
from fenics_red.jobs import ResumableOutput, run_batches

N_ROWS = 50


class _Rows(ResumableOutput):
    """Rows that are only counted."""

    def __init__(self):
        self.n_rows = N_ROWS
        self.done = np.zeros(N_ROWS, dtype=bool)

    def write_row(self, row) -> int:
        return row


def _run(comm, capsys) -> str:
    capsys.readouterr()
    run_batches(comm, _Rows, lambda k: k, batch_size=1, progress="solve")
    return capsys.readouterr().err


def test_progress_in_a_log_is_a_few_plain_lines_not_redraws(comm, capsys, monkeypatch):
    """stderr that is not a terminal (a Slurm job's log, a pipe): no carriage returns, a line
    when it starts, then at most one per interval, and the last one."""
    err = _run(comm, capsys)  # pytest's captured stderr is not a terminal
    monkeypatch.setattr(io, "PROGRESS_INTERVAL", 0.0)  # a line per write
    every_write = _run(comm, capsys)
    if comm.rank != 0:
        assert err == every_write == ""  # rank 0 reports
        return
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2, lines  # the whole run took less than the interval
    assert lines[0].startswith(f"solve: 0/{N_ROWS} sample (0 %)")
    assert lines[1].startswith(f"solve: {N_ROWS}/{N_ROWS} sample (100 %)")
    writes = -(-N_ROWS // comm.size)
    assert len(every_write.splitlines()) == 1 + writes


def test_progress_on_a_terminal_is_a_bar_redrawn_in_place(comm, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    err = _run(comm, capsys)
    if comm.rank == 0:
        assert "\r" in err and f"{N_ROWS}/{N_ROWS}" in err
