"""Resumable batch jobs under MPI: rows solved over the ranks, written by rank 0 to ``OUT.h5``.

Simulating a data set (:func:`fenics_red.data.simulate_dataset`) and reconstructing one
(:func:`fenics_red.reconstruction.reconstruct_dataset`, whose driver
:func:`~fenics_red.reconstruction.run_method` the evaluation suite runs per method) are long
runs of independent rows whose results go into one HDF5 file (or, for the evaluation, one file
per row). They must survive interruption and never leave a half-written file
under the final name (project convention: outputs written via ``.partial`` + rename), so they
share this pattern:

* :class:`ResumableOutput` is what the driver writes to: ``n_rows`` rows, which of them are done,
  ``write(rows)``, ``finish()`` and ``close()``.
* :class:`ResumableFile` is rank 0's handle on ``OUT.h5.partial``: it refuses an existing
  ``OUT.h5`` unless overwriting, creates the partial file (attributes, the file's own datasets and
  per-row ``done`` flags) or reopens one made with the same attributes (else a ``ValueError``
  saying what differs and suggesting ``--overwrite``), writes rows batch by batch (flags last,
  then a flush, so a row is done only once all of it is on disk) and renames the file to
  ``OUT.h5`` when every row is done.
* :func:`run_batches` is the collective driver: it spreads the pending rows over the ranks (or
  runs every row on all of them), gathers the results on rank 0, writes them after every batch,
  and raises an error of any rank on every rank (:mod:`fenics_red.parallel`) so none hangs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from mpi4py import MPI

import numpy as np

from .io import plain
from .parallel import on_root, raise_local_or_shared

# ``plain`` lives in :mod:`fenics_red.io`; it is re-exported here for existing importers
__all__ = ["ResumableOutput", "ResumableFile", "run_batches", "partial_path", "plain"]


def partial_path(path: Path) -> Path:
    """``OUT.h5.partial``: where an unfinished run of ``OUT.h5`` is written."""
    return path.with_name(path.name + ".partial")


class ResumableOutput:
    """What :func:`run_batches` writes to (rank 0 only): ``n_rows`` rows and their done flags.

    Subclasses set ``n_rows`` and ``done`` (a boolean array, ``True`` for the rows already
    written, e.g. by an interrupted run) when they open, and define :meth:`write_row`;
    :class:`ResumableFile` is the one-HDF5-file kind, :class:`fenics_red.evaluation` keeps one
    file per row.
    """

    n_rows: int
    done: np.ndarray

    def write_row(self, row) -> int:
        """Write the data of one result row (not its ``done`` flag); return the row's index."""
        raise NotImplementedError

    def mark_done(self, rows: Sequence[int]) -> None:
        """Record that ``rows`` are completely written (after their data)."""
        for k in rows:
            self.done[k] = True

    @property
    def n_done(self) -> int:
        """The number of rows written so far."""
        return int(self.done.sum())

    def pending(self) -> np.ndarray:
        """Indices of the rows not written yet, ascending."""
        return np.flatnonzero(~self.done)

    def write(self, rows: Sequence) -> None:
        """Write a batch of rows, then mark them done."""
        self.mark_done([self.write_row(row) for row in rows])

    def finish(self) -> None:
        """Called once every row is written (and only then)."""

    def close(self) -> None:
        """Release what the output holds open (called whatever happened)."""


class ResumableFile(ResumableOutput):
    """Rank 0's handle on ``OUT.h5.partial``: create or resume, write rows, finish (rename).

    Subclasses describe their file: :meth:`create_datasets` (a new file's datasets besides
    ``done``), :meth:`shapes` (those datasets' shapes, checked when resuming), :meth:`check` (is
    a partial file a run of these attributes?) and :meth:`write_row`. ``UNREADABLE`` is the end of
    the error for a partial file that is not HDF5 (``{error}`` is filled in).

    Args:
        path: the final output ``OUT.h5`` (its folder must exist).
        attrs: the file attributes (written to a new file, compared by :meth:`check` on resume).
        n_rows: the number of rows (length of ``done``).
        overwrite: replace an existing ``OUT.h5`` and discard an existing partial file.
    """

    UNREADABLE = "not a readable HDF5 file ({error}); delete it or pass --overwrite"

    def __init__(self, path: Path, attrs: dict, n_rows: int, overwrite: bool):
        import h5py

        self.path, self.partial, self.n_rows = path, partial_path(path), int(n_rows)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"the folder of output {str(path)!r} does not exist")
        if path.exists() and not overwrite:
            raise FileExistsError(f"output {str(path)!r} already exists; remove it or pass "
                                  "--overwrite (overwrite=True) to replace it")
        if self.partial.exists() and not overwrite:
            try:
                self.file = h5py.File(self.partial, "r+")
            except OSError as error:
                raise ValueError(f"cannot resume from {str(self.partial)!r}: "
                                 + self.UNREADABLE.format(error=error)) from None
            try:
                self.check(attrs, f"the unfinished run {str(self.partial)!r}")
            except Exception:
                self.file.close()
                raise
        else:
            if self.partial.exists():
                self.partial.unlink()
            self.file = h5py.File(self.partial, "w")
            for key, value in attrs.items():
                self.file.attrs[key] = value
            self.create_datasets()
            self.file.create_dataset("done", (self.n_rows,), dtype=np.uint8)
            self.file.flush()
        self.done = np.asarray(self.file["done"][...], dtype=bool)

    # -- what subclasses define ----------------------------------------------------------------

    def create_datasets(self) -> None:
        """Create the datasets of a new file in ``self.file`` (``done`` is added afterwards)."""
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of the datasets of :meth:`create_datasets`, in the order checked."""
        raise NotImplementedError

    def check(self, attrs: dict, where: str) -> None:
        """Raise ``ValueError`` (starting with ``where``) unless the reopened file resumes a run
        with ``attrs`` (see :meth:`wrong_dataset` for the layout)."""
        raise NotImplementedError

    # -- common part ---------------------------------------------------------------------------

    def wrong_dataset(self) -> tuple[str, tuple[int, ...]] | None:
        """``(name, expected shape)`` of the first dataset (``done`` last) missing from the file
        or of another shape; ``None`` when the layout is right."""
        for name, shape in (*self.shapes().items(), ("done", (self.n_rows,))):
            if name not in self.file or self.file[name].shape != shape:
                return name, shape
        return None

    def mark_done(self, rows: Sequence[int]) -> None:
        """Set the rows' ``done`` flags, then flush (flags last: a row is done only once all of
        it is written)."""
        for k in rows:
            self.file["done"][k] = 1
            self.done[k] = True
        self.file.flush()

    def finish(self) -> None:
        """Close the complete file and rename it to its final name."""
        self.file.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def run_batches(comm: MPI.Comm, open_file: Callable[[], ResumableOutput],
                solve: Callable[[int], object], *, batch_size: int, spread: bool = True,
                progress: str | None = None,
                on_batch: Callable[[int], None] | None = None) -> None:
    """Collective on ``comm``: solve every pending row of a resumable file and finish the file.

    Args:
        comm: the communicator of the run (every rank calls this).
        open_file: called on rank 0 only; returns the :class:`ResumableOutput` (an error in it is
            raised on every rank).
        solve: ``solve(k)`` returns the result row of row ``k`` (what ``write_row`` takes).
        batch_size: rows per rank between two writes.
        spread: ``True``: each rank solves its share of a batch and rank 0 gathers the results;
            ``False``: every rank solves every row together (e.g. a mesh distributed over
            ``comm``) and rank 0 writes its own results.
        progress: the description of a tqdm bar on rank 0 (``None``: no bar).
        on_batch: ``on_batch(n_done)`` on every rank after each write; an exception in it stops
            the run, leaving a resumable partial file.

    An error of ``solve`` on any rank is raised on every rank after the batch, so none waits in
    a collective call. The file is closed on rank 0 whatever happens. Rank 0 opens it only once
    every rank has arrived, so that no rank still has the file open (say, reading a partial file
    just before resuming it): HDF5 would refuse rank 0 its write lock.
    """
    file: ResumableOutput | None = None
    bar = None
    comm.Barrier()
    try:
        def open_on_root():
            nonlocal file
            file = open_file()
            return file.pending()
        pending = on_root(comm, open_on_root)
        if comm.rank == 0 and progress is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=file.n_rows, initial=file.n_rows - len(pending), unit="sample",
                       desc=progress, dynamic_ncols=True)
        step = batch_size * (comm.size if spread else 1)
        for start in range(0, len(pending), step):
            batch = pending[start:start + step]
            mine = batch[comm.rank::comm.size] if spread else batch
            results, error = [], None
            try:
                for k in mine:
                    results.append(solve(int(k)))
            except Exception as exc:
                error = exc
            raise_local_or_shared(comm, error)
            if spread:
                gathered = comm.gather(results, root=0)
                rows = [row for part in (gathered or []) for row in part]
            else:
                rows = results

            def write(rows=rows):
                file.write(rows)
                return file.n_done
            n_done = on_root(comm, write)
            if bar is not None:
                bar.update(n_done - bar.n)
            if on_batch is not None:
                on_batch(n_done)
        on_root(comm, lambda: file.finish())
    finally:
        if bar is not None:
            bar.close()
        if file is not None:
            file.close()
