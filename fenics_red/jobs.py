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

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from mpi4py import MPI

import numpy as np

from .io import OutputLock, check_output_path, plain, progress_bar, replace_checked, write_error
from .parallel import on_root, raise_local_or_shared

# ``plain`` lives in :mod:`fenics_red.io`; it is re-exported here for existing importers
__all__ = ["ResumableOutput", "ResumableFile", "run_batches", "partial_path", "plain"]


def open_for_writing(path: Path, mode: str):
    """An ``h5py.File`` (mode ``"w"`` or ``"r+"``) that writes only when told to: no chunk cache
    and no sieve buffer (raw data is written by the call that writes it), and metadata kept in
    memory until :meth:`ResumableFile._sync` flushes it. A failed write (a full disk) is then an
    exception of that call, never an error that h5py can only print while it frees an object
    (and after which HDF5 has crashed the process)."""
    import h5py

    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    fapl.set_cache(0, 0, 0, 0.75)
    fapl.set_sieve_buf_size(0)
    name = os.fsencode(path)
    if mode == "w":
        fid = h5py.h5f.create(name, h5py.h5f.ACC_TRUNC, fapl=fapl)
    else:
        fid = h5py.h5f.open(name, h5py.h5f.ACC_RDWR, fapl=fapl)
    config = fid.get_mdc_config()
    config.incr_mode = config.decr_mode = config.flash_incr_mode = 0  # off
    config.evictions_enabled = False
    fid.set_mdc_config(config)
    return h5py.File(fid)


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
        overwrite: replace an existing ``OUT.h5``; a partial file of the same settings is
            resumed (the same command continues an interrupted ``--overwrite`` run), any other
            (other settings, unreadable, damaged) discarded.
    """

    UNREADABLE = "not a readable HDF5 file ({error}); delete it or pass --overwrite"
    #: Float datasets whose finished rows must be positive, and non-negative (every float
    #: dataset's must be finite): a resumed file is checked, so a damaged or edited row never
    #: becomes part of a finished output.
    POSITIVE: tuple[str, ...] = ()
    NON_NEGATIVE: tuple[str, ...] = ()

    def __init__(self, path: Path, attrs: dict, n_rows: int, overwrite: bool):
        self.path, self.partial, self.n_rows = path, partial_path(path), int(n_rows)
        self.overwrite, self.created, self.file, self.lock = overwrite, False, None, None
        check_output_path(path, overwrite)
        self.lock = OutputLock(path)  # one run at a time on OUT and OUT.partial
        try:
            resume = self.partial.exists()
            if resume and overwrite:  # the same --overwrite command continues its own run
                try:
                    self._resume(attrs)
                except Exception:  # another run's, unreadable or damaged: discarded
                    self._close_file()
                    resume = False
            elif resume:
                self._resume(attrs)
            if not resume:
                if self.partial.exists():
                    self.partial.unlink()
                self.file = open_for_writing(self.partial, "w")
                self.created = True
                for key, value in attrs.items():
                    self.file.attrs[key] = value
                self.create_datasets()
                self.file.create_dataset("done", (self.n_rows,), dtype=np.uint8)
                self._sync()
            self.done = np.asarray(self.file["done"][...], dtype=bool)
        except BaseException as error:
            self.close()
            if isinstance(error, RuntimeError | OSError) and not isinstance(
                    error, FileNotFoundError | FileExistsError):
                raise OSError(self._failed(error)) from None
            raise

    def _resume(self, attrs: dict) -> None:
        """Open the partial file for writing; refuse one of other settings or a damaged one."""
        try:
            self.file = open_for_writing(self.partial, "r+")
        except OSError as error:
            raise ValueError(f"cannot resume from {str(self.partial)!r}: "
                             + self.UNREADABLE.format(error=error)) from None
        self.check(attrs, f"the unfinished run {str(self.partial)!r}")
        damage = self.damage()
        if damage is not None:
            raise ValueError(f"cannot resume from {str(self.partial)!r}: it is damaged "
                             f"({damage}); delete it or pass --overwrite")

    def _close_file(self) -> None:
        if self.file is not None and self.file.id.valid:
            try:
                self.file.close()
            except (OSError, RuntimeError):
                pass  # a failed write: the flags on the disk say what is done
        self.file = None

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

    def _sync(self) -> None:
        """Flush the file to the disk; a write error (a full disk) raises here."""
        self.file.flush()
        os.fsync(self.file.id.get_vfd_handle())

    def _failed(self, error: BaseException) -> str:
        return (f"writing {str(self.partial)!r} failed ({write_error(error)}); no row was "
                "marked done that is not on the disk: free space (or remove the cause) and run "
                f"the same command again to resume (delete {self.partial.name!r} to start "
                "again)")

    def damage(self, file=None) -> str | None:
        """Why ``file`` (default: the open one) cannot be resumed: a dataset that does not
        read back (a write that failed, say on a full disk, can leave pointers past the end of
        the file), or a finished row holding values its dataset may not hold
        (:meth:`_bad_rows`); ``None`` when every row of every dataset reads and is valid."""
        file = self.file if file is None else file
        try:
            done = np.asarray(file["done"][...]) == 1
        except (OSError, RuntimeError) as error:
            return f"dataset 'done' does not read back ({write_error(error)})"
        for name in self.shapes():
            dataset = file[name]
            row = int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize
            step = max(1, 2**24 // max(row, 1))
            try:
                for start in range(0, dataset.shape[0], step):
                    bad = self._bad_rows(name, dataset[start:start + step],
                                         done[start:start + step])
                    if bad is not None:
                        return f"row {start + bad[0]} of dataset {name!r}, marked done, {bad[1]}"
            except (OSError, RuntimeError) as error:
                return f"dataset {name!r} does not read back ({write_error(error)})"
        return None

    def _bad_rows(self, name: str, block: np.ndarray, done: np.ndarray
                  ) -> tuple[int, str] | None:
        """``(row in block, what is wrong)`` of the first finished row of a float dataset
        holding non-finite values, or values not positive / negative per :attr:`POSITIVE` and
        :attr:`NON_NEGATIVE`; ``None`` if none."""
        if block.dtype.kind != "f" or not done.any():
            return None
        rows = block.reshape(len(block), -1)
        for bad, what in ((~np.isfinite(rows).all(axis=1), "holds non-finite values"),
                          ((rows <= 0).any(axis=1) if name in self.POSITIVE else None,
                           "holds values <= 0"),
                          ((rows < 0).any(axis=1) if name in self.NON_NEGATIVE else None,
                           "holds negative values")):
            if bad is not None and (bad & done).any():
                return int(np.flatnonzero(bad & done)[0]), what
        return None

    def write(self, rows: Sequence) -> None:
        """Write a batch of rows and flush them to the disk, then set their ``done`` flags and
        flush again: a row is done only once all of it is on the disk. A write error (a full
        disk) is an ``OSError`` saying so, and no flag of the batch is set; a partial file that
        the failed write left unreadable is removed (a later run would only fail on it)."""
        try:
            indices = [self.write_row(row) for row in rows]
            self._sync()
            self.mark_done(indices)
        except (OSError, RuntimeError) as error:
            import h5py

            message = self._failed(error)
            with contextlib.suppress(OSError, RuntimeError):
                self.file.close()
            try:
                with h5py.File(self.partial, "r") as f:
                    damage = self.damage(f)
            except (OSError, RuntimeError) as reopen:
                damage = write_error(reopen)
            if damage is not None:
                self.partial.unlink(missing_ok=True)
                message = (f"writing {str(self.partial)!r} failed ({write_error(error)}) and "
                           f"left it unreadable ({damage}), so it was removed: free space (or "
                           "remove the cause) and run the same command again")
            raise OSError(message) from None

    def mark_done(self, rows: Sequence[int]) -> None:
        """Set the rows' ``done`` flags, then flush (flags last: a row is done only once all of
        it is written)."""
        for k in rows:
            self.file["done"][k] = 1
        self._sync()
        for k in rows:
            self.done[k] = True

    def finish(self) -> None:
        """Close the complete file, check it reads back complete, and rename it to its final
        name (without ``overwrite``, never over a file that appeared meanwhile)."""
        import h5py

        try:
            self._sync()
            self.file.close()
            with h5py.File(self.partial, "r") as f:
                done = np.asarray(f["done"][...])
        except (OSError, RuntimeError) as error:
            raise OSError(self._failed(error)) from None
        if not (done == 1).all():
            raise OSError(f"{str(self.partial)!r} reads back with {int((done != 1).sum())} "
                          "unfinished row(s) after writing all of them; the disk or file "
                          "system lost data: delete it and run again")
        replace_checked(self.partial, self.path, self.overwrite)

    def close(self) -> None:
        """Close the file (if open) and release the lock. A file this run created in which no
        row was finished is removed: a refused or failed run leaves nothing to resume."""
        try:
            self._close_file()
            if self.created and self.partial.exists() and not np.any(getattr(self, "done", ())):
                self.partial.unlink()
        finally:
            if self.lock is not None:
                self.lock.release()


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
        progress: the description of a progress bar on rank 0 (``None``: no bar;
            :func:`fenics_red.io.progress_bar`: plain lines when stderr is not a terminal).
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
            bar = progress_bar(file.n_rows, initial=file.n_rows - len(pending), unit="sample",
                               desc=progress)
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
