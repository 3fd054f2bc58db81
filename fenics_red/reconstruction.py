"""Reconstruct the samples of a data set with a registered method; write, resume and load results.

File layout (format ``"fenics-red reconstructions"``, version 1; images in the convention of
:mod:`fenics_red.raster`, shape ``(ny+1, nx+1)``). The training pipeline reads these names:

================ ================== ======== ===============================================
name             shape              dtype    meaning
================ ================== ======== ===============================================
estimate         (n, ny+1, nx+1)    float64  the reconstructed modulus of output row k (``(n, N)``
                                             per node on a mesh data set)
truth            (n, ny+1, nx+1)    float64  the data set's ``E`` of that sample (absent when the
                                             data set has no truth, e.g. a real measurement)
std              (n, ny+1, nx+1)    float64  the posterior standard deviation of the estimate
                                             (only with ``--uncertainty``, option
                                             ``uncertainty``; :mod:`fenics_red.uncertainty`)
index            (n,)               int64    the sample's index in the data set
done             (n,)               uint8    1 once row k is written (all 1 when complete)
history/<k>/<c>  (m,)               float64  column ``c`` of row k's solver history (group
                                             attributes: the method's ``info``, e.g. stop_reason)
================ ================== ======== ===============================================

Attributes: ``format``, ``format_version``, ``fenics_red_version``, ``method``, ``settings``
(JSON of the method's full settings, e.g. :meth:`MLSettings.to_dict`), ``data_path`` (absolute
path of the data set), ``data_attrs`` (JSON of the data set's attributes: grid, forward model,
``snr_db``, ``seed``, ...). With ``--uncertainty`` the settings hold ``"uncertainty"`` (the
:class:`~fenics_red.uncertainty.UncertaintySettings`), and each row's history attributes the
``uncertainty_*`` entries (rank, prior weight, time, ...); :func:`load_std` reads ``std``.

Parallelism: :func:`reconstruct_dataset` either spreads the samples over the ranks (each solves
its own on ``MPI.COMM_SELF``; the default for several samples) or solves each sample with the
mesh distributed over all ranks (``distribute="mesh"``, used for one sample). Rank 0 writes
``OUT.h5.partial`` after every batch and renames it when complete; running again with the same
method, settings and data resumes it (per-row ``done`` flags), as :func:`fenics_red.data.
simulate_dataset` does.

:func:`run_method` is the driver under it (the loop over the samples, the method's setup and
data warnings, resuming, spreading over the ranks): :func:`fenics_red.evaluation.evaluate` runs
it once per method with its own output (one ``.npz`` per run) instead of this file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from mpi4py import MPI

import numpy as np

from .data import load_dataset
from .io import hdf5_digest, plain, to_json
from .jobs import ResumableFile, ResumableOutput, partial_path, run_batches
from .methods import get_method, split_uncertainty, warn_about_data
from .parallel import check_all

__all__ = ["FORMAT", "FORMAT_VERSION", "Reconstructions", "Result", "reconstruct_dataset",
           "run_method", "setup_runner", "method_settings", "has_truth", "load_reconstructions",
           "load_history", "load_std"]

#: Value of the ``format`` attribute of every reconstruction file.
FORMAT = "fenics-red reconstructions"
#: Version of the layout in the module docstring.
FORMAT_VERSION = 1
_REQUIRED_ATTRS = ("format", "format_version", "fenics_red_version", "method", "settings",
                   "data_path", "data_attrs")


class Result(NamedTuple):
    """One run of a method on one sample: what :func:`run_method` writes to its output."""

    row: int  # the position of the sample in the run's ``indices``
    estimate: np.ndarray
    truth: np.ndarray | None  # the data set's E (None without truth)
    history: dict
    info: dict
    std: np.ndarray | None = None  # the posterior standard deviation (with uncertainty only)


def has_truth(dataset) -> bool:
    """Whether a data set holds the true modulus (a real measurement has none)."""
    return bool(getattr(dataset, "has_truth", True))


class _RowFile(ResumableFile):
    """Rank 0's handle on ``OUT.h5.partial`` (layout: module docstring)."""

    POSITIVE, NON_NEGATIVE = ("estimate", "truth"), ("std",)

    def __init__(self, path: Path, attrs: dict, index: np.ndarray, shape: tuple[int, int],
                 overwrite: bool, truth: bool = True, std: bool = False):
        self.index, self.shape = np.asarray(index, dtype=np.int64), tuple(shape)
        self.images = (("estimate", "truth") if truth else ("estimate",)) + (
            ("std",) if std else ())
        super().__init__(path, attrs, len(index), overwrite)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        n = self.n_rows
        return {**{name: (n, *self.shape) for name in self.images}, "index": (n,)}

    def create_datasets(self) -> None:
        chunk = (1, *self.shape)
        for name in self.images:
            self.file.create_dataset(name, (self.n_rows, *self.shape), dtype=np.float64,
                                     chunks=chunk)
        self.file.create_dataset("index", data=self.index)
        self.file.create_group("history")

    def check(self, attrs: dict, where: str) -> None:
        advice = "run again with the same options to resume it, or pass --overwrite to start again"
        f = self.file
        if plain(f.attrs.get("format")) != FORMAT:
            raise ValueError(f"{where} is not a fenics-red reconstruction file; delete it or "
                             f"pass --overwrite")
        differences = [key for key in ("format_version", "method", "settings", "data_attrs",
                                       "data_sha256")
                       if plain(f.attrs.get(key)) != attrs[key]]
        if "data_sha256" in differences:
            raise ValueError(f"{where} was made from different data (the values of "
                             f"{attrs['data_path']!r} changed since); {advice}")
        if differences:
            raise ValueError(f"{where} was made with different {', '.join(differences)}; "
                             f"{advice}")
        if "index" in f and not np.array_equal(f["index"][...], self.index):
            raise ValueError(f"{where} is a run of other samples of the data set; run its "
                             "command again to finish it, or use another --out (--overwrite "
                             "discards it)")
        wrong = self.wrong_dataset()
        if wrong is not None:
            raise ValueError(f"{where} has no dataset {wrong[0]!r} of shape {wrong[1]}; delete "
                             "it or pass --overwrite")
        if "truth" in f and "truth" not in self.images:
            raise ValueError(f"{where} holds truths but the data set has none; {advice}")

    def write_row(self, row: Result) -> int:
        f = self.file
        k, estimate, truth, history, info, std = row
        f["estimate"][k] = estimate
        if "truth" in self.images:
            f["truth"][k] = truth
        if "std" in self.images:
            f["std"][k] = std
        name = f"history/{k}"
        if name in f:
            del f[name]
        group = f.create_group(name)
        for column, values in history.items():
            group.create_dataset(column, data=np.asarray(values, dtype=np.float64).ravel())
        for key, value in info.items():
            group.attrs[key] = value if isinstance(value, str | int | float) else to_json(value)
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
        options: overrides of the method's settings (see :mod:`fenics_red.methods`); with
            ``uncertainty`` (and ``uncertainty_rank``) the output also holds ``std``.
        indices: the samples to reconstruct, in output order (default: all).
        distribute: ``"samples"`` (each rank solves its own on ``COMM_SELF``) or ``"mesh"``
            (every sample on all ranks); default ``"mesh"`` for one sample, else ``"samples"``.
        overwrite: replace an existing output (an unfinished run of the same settings is
            continued, any other discarded).
        progress: a tqdm progress bar on rank 0.
        batch_size: samples per rank between two writes.
        on_batch: ``on_batch(n_done)`` on every rank after each write (tests, progress hooks).

    Raises ``FileNotFoundError``/``FileExistsError``/``ValueError`` (on every rank) for missing
    inputs, an existing output, bad options or a partial file made differently. Returns
    ``out_path``.
    """
    out_path = Path(out_path)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"the batch size (--batch-size) must be a positive integer, got "
                         f"{batch_size!r}")
    get_method(method)  # an unknown method is refused before the data set is read
    dataset = load_dataset(data_path)  # every rank: validated, read lazily
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

        def open_output(settings: dict, truth: bool) -> _RowFile:
            from . import __version__

            attrs = {"format": FORMAT, "format_version": FORMAT_VERSION,
                     "fenics_red_version": __version__, "method": method,
                     "settings": to_json(settings),
                     "data_path": str(Path(data_path).resolve()),
                     "data_attrs": to_json(dataset.attrs),
                     "data_sha256": hdf5_digest(data_path)}  # a resume reads the same values
            return _RowFile(out_path, attrs, indices, dataset.value_shape, overwrite, truth,
                            std="uncertainty" in settings)

        run_method(dataset, comm, method, options, indices, open_output,
                   distribute=distribute or ("mesh" if len(indices) == 1 else "samples"),
                   batch_size=batch_size,
                   progress=f"{method} {out_path.name}" if progress else None,
                   on_batch=on_batch)
    finally:
        dataset.close()
    return out_path


def _without_truth(sample):
    """The sample as a method sees a real measurement: no ``E``, no ``mask``."""
    import dataclasses

    if dataclasses.is_dataclass(sample):
        return dataclasses.replace(sample, E=None, mask=None)
    return sample


def setup_runner(dataset, comm: MPI.Comm, method: str, options: Mapping | None,
                 distribute: str = "samples"):
    """Collective on ``comm``: the runner of ``method`` with ``options`` for an open data set,
    as :func:`run_method` runs it (on ``COMM_SELF`` per rank for ``distribute="samples"``, on
    ``comm`` for ``"mesh"``; wrapped for ``uncertainty``). Bad options, or a missing or damaged
    model file, raise on every rank. The caller calls ``runner.destroy()`` (collective)."""
    if distribute not in ("samples", "mesh"):
        raise ValueError(f"distribute must be 'samples' or 'mesh', got {distribute!r}")
    entry = get_method(method)
    options, uncertainty = split_uncertainty(method, options)
    data_settings = dataset.settings
    solve_comm = comm if distribute == "mesh" else MPI.COMM_SELF
    runner = check_all(comm, lambda: entry.setup(data_settings.space, data_settings.forward,
                                                 solve_comm, dict(options or {})))
    if uncertainty is not None:
        from .uncertainty import UncertaintyRunner

        runner = UncertaintyRunner(method, runner, uncertainty)
    return runner


def method_settings(dataset, comm: MPI.Comm, method: str, options: Mapping | None,
                    distribute: str = "samples") -> dict:
    """Collective on ``comm``: the full settings ``runner.settings`` that :func:`run_method`
    stores beside each estimate of ``method`` with ``options``, found by setting the method up
    (and freeing it again) before any solve: a command that runs several methods checks all
    their options, model files and earlier outputs first."""
    runner = setup_runner(dataset, comm, method, options, distribute)
    try:
        return runner.settings
    finally:
        runner.destroy()


def run_method(dataset, comm: MPI.Comm, method: str, options: Mapping | None,
               indices: Sequence[int],
               open_output: Callable[[dict, bool], ResumableOutput], *,
               distribute: str = "samples", truth: bool | None = None, batch_size: int = 4,
               progress: str | None = None,
               on_batch: Callable[[int], None] | None = None) -> None:
    """Collective on ``comm``: run ``method`` on the samples ``indices`` of an open data set.

    The one loop over a data set's samples (:func:`reconstruct_dataset`, the evaluation suite):
    sets the method up (an error on any rank is raised on every rank), opens the output on rank 0,
    emits the method's data warnings (:func:`fenics_red.methods.warn_about_data`) when samples
    remain to be solved, solves them (resuming an unfinished output) and writes them.

    Args:
        dataset: an open :class:`fenics_red.data.Dataset` (read on every rank).
        comm: the communicator of the run.
        method, options: a registered method and overrides of its settings; ``uncertainty``
            and ``uncertainty_rank`` among them wrap the runner in
            :class:`fenics_red.uncertainty.UncertaintyRunner` (its :class:`Result` rows then
            carry ``std``, and its settings ``"uncertainty"``).
        indices: the samples to run, in output order (row ``k`` is sample ``indices[k]``).
        open_output: ``open_output(settings, truth)``, called on rank 0 with the method's full
            settings and whether the truth is used: creates or resumes the output (a
            :class:`fenics_red.jobs.ResumableOutput` of ``len(indices)`` rows), refusing one made
            with other settings; it is written :class:`Result` rows.
        distribute: ``"samples"`` (each rank solves its own on ``COMM_SELF``) or ``"mesh"``
            (every sample on all ranks).
        truth: pass the data set's truth on (``None``: when it has one, :func:`has_truth`);
            ``False`` runs the method as on a real measurement (samples without ``E`` and
            ``mask``) and writes rows without truth.
        batch_size: samples per rank between two writes.
        progress: the description of a tqdm bar on rank 0 (``None``: no bar).
        on_batch: ``on_batch(n_done)`` on every rank after each write.
    """
    indices = np.asarray(indices, dtype=np.int64)
    truth = has_truth(dataset) if truth is None else bool(truth and has_truth(dataset))
    data_settings = dataset.settings
    _, uncertainty = split_uncertainty(method, options)
    runner = setup_runner(dataset, comm, method, options, distribute)
    try:
        def open_and_warn() -> ResumableOutput:
            output = open_output(runner.settings, truth)
            try:
                if len(output.pending()):
                    warn_about_data(runner, data_settings, comm)  # rank 0 (here) emits them
            except BaseException:
                output.close()
                raise
            return output

        def solve(k: int) -> Result:
            sample = dataset.sample(int(indices[k]))
            if not truth:
                sample = _without_truth(sample)
            std = None
            if uncertainty is not None:
                estimate, history, info, std = runner.run_with_std(sample)
            else:
                estimate, history, info = runner.run(sample)
            return Result(k, estimate, sample.E if truth else None, history, info, std)

        run_batches(comm, open_and_warn, solve, batch_size=batch_size,
                    spread=distribute == "samples", progress=progress, on_batch=on_batch)
    finally:
        runner.destroy()


# -- reading -------------------------------------------------------------------------------------

class Reconstructions(NamedTuple):
    """What :func:`load_reconstructions` returns (unpacks as ``estimates, truth, index, attrs``)."""

    estimates: np.ndarray
    truth: np.ndarray | None  # None when the data set had no truth
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
    decoded from JSON; ``truth`` is ``None`` for a file without truth (a data set without one).
    Raises ``FileNotFoundError`` or ``ValueError`` saying what is wrong.
    """
    def fail(message):
        raise ValueError(f"reconstruction file {str(path)!r}: {message}")

    with _open(path) as f:
        attrs = {key: plain(value) for key, value in f.attrs.items()}
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
        images = ("estimate", "truth") if "truth" in f else ("estimate",)
        for name in (*images, "index", "done"):
            if name not in f or not hasattr(f[name], "shape"):
                fail(f"dataset {name!r} is missing")
        estimates = f["estimate"]
        if estimates.ndim not in (2, 3, 4):
            fail(f"dataset 'estimate' has shape {estimates.shape}, expected (n, ny+1, nx+1), "
                 "(n, nz+1, ny+1, nx+1) in 3-D or (n, N) on a mesh")
        n = estimates.shape[0]
        for name, want, kinds in (("truth", estimates.shape, "f"), ("index", (n,), "iu"),
                                  ("done", (n,), "iub"), ("estimate", estimates.shape, "f")):
            if name == "truth" and "truth" not in images:
                continue
            d = f[name]
            if d.shape != want:
                fail(f"dataset {name!r} has shape {d.shape}, expected {want}")
            if d.dtype.kind not in kinds:
                fail(f"dataset {name!r} has dtype {d.dtype}")
        done = np.asarray(f["done"][...])
        if not (done == 1).all():
            fail(f"incomplete: {int((done == 1).sum())} of {n} rows were written")
        values = {name: np.asarray(f[name][...]) for name in images}
        for name in images:
            if not np.isfinite(values[name]).all():
                rows = np.isfinite(values[name]).reshape(len(values[name]), -1).all(axis=1)
                k = int(np.argwhere(~rows)[0, 0])
                fail(f"dataset {name!r} has non-finite values (first in row {k})")
        index = np.asarray(f["index"][...], dtype=np.int64)
    return Reconstructions(values["estimate"], values.get("truth"), index, attrs)


#: An ML data misfit above this many times its expected value ``n`` (a χ²_n at the truth) is
#: warned about. The 150-step budget leaves 1-4 times ``n`` at 45 dB; plane strain for data in
#: plane stress gave 31 (ROI mesh) and 116 (a user's trapezoid), a sliding support for a fixed
#: one 21 on that trapezoid but only 3 on the ROI mesh, which the warning cannot tell from 45 dB.
MISFIT_WARNING = 10.0


def misfit_problem(info: Mapping) -> str | None:
    """What a run's info (``misfit`` or RED's ``ml_misfit``, and ``n_equations``) says when
    the ML estimate fits the data far worse than their noise level, else None."""
    misfit = info.get("misfit", info.get("ml_misfit"))
    n = info.get("n_equations")
    if misfit is None or not n or not misfit > MISFIT_WARNING * n:
        return None
    return (f"the ML estimate's data misfit is {misfit / n:.3g} times its expected value at the "
            "noise level: the model does not fit these data (check --support, --plane-strain, "
            "--nu, the units and the noise level) or its steps ran out (--max-steps); do not "
            "trust the estimate until that is mended")


def load_history(path: str | os.PathLike, row: int) -> tuple[dict[str, np.ndarray], dict]:
    """The solver history (columns) and info (attributes) of output row ``row``."""
    with _open(path) as f:
        name = f"history/{int(row)}"
        if name not in f:
            raise KeyError(f"reconstruction file {str(path)!r} has no history for row {row}")
        group = f[name]
        return ({key: np.asarray(group[key][...]) for key in group},
                {key: plain(value) for key, value in group.attrs.items()})


def load_std(path: str | os.PathLike) -> np.ndarray:
    """The posterior standard deviations ``std`` of a reconstruction file (shape of its
    estimates); ``ValueError`` when the file was made without ``--uncertainty`` or is damaged."""
    with _open(path) as f:
        if "std" not in f:
            raise ValueError(f"reconstruction file {str(path)!r} has no dataset 'std': it was "
                             "made without --uncertainty")
        std = np.asarray(f["std"][...])
        if std.shape != f["estimate"].shape:
            raise ValueError(f"reconstruction file {str(path)!r}: dataset 'std' has shape "
                             f"{std.shape}, the estimates {f['estimate'].shape}")
    if not (np.isfinite(std).all() and (std >= 0).all()):
        raise ValueError(f"reconstruction file {str(path)!r}: dataset 'std' has non-finite or "
                         "negative values")
    return std
