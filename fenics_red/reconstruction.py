"""Reconstruct the samples of a data set with a registered method; write, resume and load results.

File layout (format ``"fenics-red reconstructions"``, version 1; images in the convention of
:mod:`fenics_red.grid`, shape ``(ny+1, nx+1)``). The training pipeline reads these names:

================ ================== ======== ===============================================
name             shape              dtype    meaning
================ ================== ======== ===============================================
estimate         (n, ny+1, nx+1)    float64  the reconstructed modulus of output row k
truth            (n, ny+1, nx+1)    float64  the data set's ``E`` of that sample
index            (n,)               int64    the sample's index in the data set
done             (n,)               uint8    1 once row k is written (all 1 when complete)
history/<k>/<c>  (m,)               float64  column ``c`` of row k's solver history (group
                                             attributes: the method's ``info``, e.g. stop_reason)
================ ================== ======== ===============================================

Attributes: ``format``, ``format_version``, ``fenics_red_version``, ``method``, ``settings``
(JSON of the method's full settings, e.g. :meth:`MLSettings.to_dict`), ``data_path`` (absolute
path of the data set), ``data_attrs`` (JSON of the data set's attributes: grid, forward model,
``snr_db``, ``seed``, ...).

Parallelism: :func:`reconstruct_dataset` either spreads the samples over the ranks (each solves
its own on ``MPI.COMM_SELF``; the default for several samples) or solves each sample with the
mesh distributed over all ranks (``distribute="mesh"``, used for one sample). Rank 0 writes
``OUT.h5.partial`` after every batch and renames it when complete; running again with the same
method, settings and data resumes it (per-row ``done`` flags), as :func:`fenics_red.data.
simulate_dataset` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from mpi4py import MPI

from .data import load_dataset
from .jobs import ResumableFile, partial_path, run_batches
from .jobs import plain as _plain
from .methods import get_method, warn_about_data

__all__ = ["FORMAT", "FORMAT_VERSION", "Reconstructions", "reconstruct_dataset",
           "load_reconstructions", "load_history"]

#: Value of the ``format`` attribute of every reconstruction file.
FORMAT = "fenics-red reconstructions"
#: Version of the layout in the module docstring.
FORMAT_VERSION = 1
_REQUIRED_ATTRS = ("format", "format_version", "fenics_red_version", "method", "settings",
                   "data_path", "data_attrs")


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=_plain)


class _RowFile(ResumableFile):
    """Rank 0's handle on ``OUT.h5.partial`` (layout: module docstring)."""

    def __init__(self, path: Path, attrs: dict, index: np.ndarray, shape: tuple[int, int],
                 overwrite: bool):
        self.index, self.shape = np.asarray(index, dtype=np.int64), tuple(shape)
        super().__init__(path, attrs, len(index), overwrite)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        n = self.n_rows
        return {"estimate": (n, *self.shape), "truth": (n, *self.shape), "index": (n,)}

    def create_datasets(self) -> None:
        chunk = (1, *self.shape)
        for name in ("estimate", "truth"):
            self.file.create_dataset(name, (self.n_rows, *self.shape), dtype=np.float64,
                                     chunks=chunk)
        self.file.create_dataset("index", data=self.index)
        self.file.create_group("history")

    def check(self, attrs: dict, where: str) -> None:
        advice = "run again with the same options to resume it, or pass --overwrite to start again"
        f = self.file
        if _plain(f.attrs.get("format")) != FORMAT:
            raise ValueError(f"{where} is not a fenics-red reconstruction file; delete it or "
                             f"pass --overwrite")
        differences = [key for key in ("format_version", "method", "settings", "data_attrs")
                       if _plain(f.attrs.get(key)) != attrs[key]]
        if differences:
            raise ValueError(f"{where} was made with different {', '.join(differences)}; "
                             f"{advice}")
        wrong = self.wrong_dataset()
        if wrong is not None:
            raise ValueError(f"{where} has no dataset {wrong[0]!r} of shape {wrong[1]}; delete "
                             "it or pass --overwrite")
        if not np.array_equal(f["index"][...], self.index):
            raise ValueError(f"{where} holds other samples of the data set; {advice}")

    def write_row(self, row: tuple) -> int:
        f = self.file
        k, estimate, truth, history, info = row
        f["estimate"][k] = estimate
        f["truth"][k] = truth
        name = f"history/{k}"
        if name in f:
            del f[name]
        group = f.create_group(name)
        for column, values in history.items():
            group.create_dataset(column, data=np.asarray(values, dtype=np.float64).ravel())
        for key, value in info.items():
            group.attrs[key] = value if isinstance(value, str | int | float) else _json(value)
        return k


def reconstruct_dataset(data_path: str | os.PathLike, out_path: str | os.PathLike,
                        comm: MPI.Comm, method: str = "ml", options: Mapping | None = None, *,
                        indices: Sequence[int] | None = None, distribute: str | None = None,
                        overwrite: bool = False, progress: bool = True, batch_size: int = 4,
                        on_batch: Callable[[int], None] | None = None) -> Path:
    """Reconstruct samples of the data set ``data_path`` into ``out_path`` (layout: module doc).

    Args:
        data_path: a data set made by :func:`fenics_red.data.simulate_dataset`.
        out_path: the output HDF5 file (written via ``out_path + ".partial"``).
        comm: the communicator of the run (collective on it).
        method: a name registered in :data:`fenics_red.methods.METHODS`.
        options: overrides of the method's settings (see :mod:`fenics_red.methods`).
        indices: the samples to reconstruct, in output order (default: all).
        distribute: ``"samples"`` (each rank solves its own on ``COMM_SELF``) or ``"mesh"``
            (every sample on all ranks); default ``"mesh"`` for one sample, else ``"samples"``.
        overwrite: replace an existing output and discard an unfinished run.
        progress: a tqdm progress bar on rank 0.
        batch_size: samples per rank between two writes.
        on_batch: ``on_batch(n_done)`` on every rank after each write (tests, progress hooks).

    Raises ``FileNotFoundError``/``FileExistsError``/``ValueError`` (on every rank) for missing
    inputs, an existing output, bad options or a partial file made differently. Returns
    ``out_path``.
    """
    out_path = Path(out_path)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    entry = get_method(method)
    dataset = load_dataset(data_path)  # every rank: validated, read lazily
    runner = None
    try:
        n_data = len(dataset)
        if indices is None:
            indices = np.arange(n_data, dtype=np.int64)
        else:
            indices = np.asarray(indices)
            if (indices.ndim != 1 or len(indices) == 0 or indices.dtype.kind not in "iu"
                    or (indices < 0).any() or (indices >= n_data).any()):
                raise ValueError(f"sample indices must be integers in 0..{n_data - 1} (the data "
                                 f"set has {n_data} samples), got {indices.tolist()}")
            indices = indices.astype(np.int64)
        distribute = distribute or ("mesh" if len(indices) == 1 else "samples")
        if distribute not in ("samples", "mesh"):
            raise ValueError(f"distribute must be 'samples' or 'mesh', got {distribute!r}")
        settings = dataset.settings
        solve_comm = comm if distribute == "mesh" else MPI.COMM_SELF
        runner = entry.setup(settings.grid, settings.forward, solve_comm, dict(options or {}))
        warn_about_data(runner, settings, comm)

        from . import __version__

        data_attrs = dataset.attrs
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION,
                 "fenics_red_version": __version__, "method": method,
                 "settings": _json(runner.settings),
                 "data_path": str(Path(data_path).resolve()), "data_attrs": _json(data_attrs)}

        def solve(k: int) -> tuple:
            sample = dataset.sample(int(indices[k]))
            estimate, history, info = runner.run(sample)
            return k, estimate, sample.E, history, info

        run_batches(comm, lambda: _RowFile(out_path, attrs, indices, settings.grid.shape,
                                           overwrite),
                    solve, batch_size=batch_size, spread=distribute == "samples",
                    progress=f"{method} {out_path.name}" if progress else None,
                    on_batch=on_batch)
    finally:
        if runner is not None:
            runner.destroy()
        dataset.close()
    return out_path


# -- reading -------------------------------------------------------------------------------------

class Reconstructions(NamedTuple):
    """What :func:`load_reconstructions` returns (unpacks as ``estimates, truth, index, attrs``)."""

    estimates: np.ndarray
    truth: np.ndarray
    index: np.ndarray
    attrs: dict


def _open(path: str | os.PathLike):
    import h5py

    path = Path(path)
    if not path.exists():
        partial = partial_path(path)
        hint = (f" (an unfinished run left {str(partial)!r}: run the same reconstruct command "
                "again to finish it)") if partial.exists() else ""
        raise FileNotFoundError(f"reconstruction file {str(path)!r} does not exist{hint}")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"reconstruction file {str(path)!r} is not a readable HDF5 file: "
                         f"{error}") from None


def load_reconstructions(path: str | os.PathLike) -> Reconstructions:
    """Read and validate a reconstruction file (layout: module docstring).

    Checks the format and version, the attributes (``settings`` and ``data_attrs`` must be JSON),
    the datasets' presence, shapes and dtypes, that every row was written, and that the estimates
    and truths are finite. ``attrs`` has plain values with ``settings`` and ``data_attrs``
    decoded from JSON. Raises ``FileNotFoundError`` or ``ValueError`` saying what is wrong.
    """
    def fail(message):
        raise ValueError(f"reconstruction file {str(path)!r}: {message}")

    with _open(path) as f:
        attrs = {key: _plain(value) for key, value in f.attrs.items()}
        if attrs.get("format") != FORMAT:
            fail(f"not a fenics-red reconstruction file (attribute format is "
                 f"{attrs.get('format')!r}, expected {FORMAT!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            fail(f"format version {attrs.get('format_version')!r} is not supported (this "
                 f"fenics-red reads version {FORMAT_VERSION})")
        missing = [key for key in _REQUIRED_ATTRS if key not in attrs]
        if missing:
            fail(f"missing attribute(s) {missing}")
        for key in ("settings", "data_attrs"):
            try:
                attrs[key] = json.loads(attrs[key])
            except (TypeError, json.JSONDecodeError):
                fail(f"attribute {key!r} is not valid JSON")
        for name in ("estimate", "truth", "index", "done"):
            if name not in f or not hasattr(f[name], "shape"):
                fail(f"dataset {name!r} is missing")
        estimates, truth = f["estimate"], f["truth"]
        if estimates.ndim != 3:
            fail(f"dataset 'estimate' has shape {estimates.shape}, expected (n, ny+1, nx+1)")
        n = estimates.shape[0]
        for name, want, kinds in (("truth", estimates.shape, "f"), ("index", (n,), "iu"),
                                  ("done", (n,), "iub"), ("estimate", estimates.shape, "f")):
            d = f[name]
            if d.shape != want:
                fail(f"dataset {name!r} has shape {d.shape}, expected {want}")
            if d.dtype.kind not in kinds:
                fail(f"dataset {name!r} has dtype {d.dtype}")
        done = np.asarray(f["done"][...])
        if not (done == 1).all():
            fail(f"incomplete: {int((done == 1).sum())} of {n} rows were written")
        estimates, truth = np.asarray(estimates[...]), np.asarray(truth[...])
        for name, values in (("estimate", estimates), ("truth", truth)):
            if not np.isfinite(values).all():
                k = int(np.argwhere(~np.isfinite(values).all(axis=(1, 2)))[0, 0])
                fail(f"dataset {name!r} has non-finite values (first in row {k})")
        index = np.asarray(f["index"][...], dtype=np.int64)
    return Reconstructions(estimates, truth, index, attrs)


def load_history(path: str | os.PathLike, row: int) -> tuple[dict[str, np.ndarray], dict]:
    """The solver history (columns) and info (attributes) of output row ``row``."""
    with _open(path) as f:
        name = f"history/{int(row)}"
        if name not in f:
            raise KeyError(f"reconstruction file {str(path)!r} has no history for row {row}")
        group = f[name]
        return ({key: np.asarray(group[key][...]) for key in group},
                {key: _plain(value) for key, value in group.attrs.items()})
