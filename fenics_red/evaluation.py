"""The evaluation suite: every method on every sample, metrics, tables and the paper's figures.

``evaluate`` reproduces the comparison of the paper (Fig. 2 and 3, section 5) on a data set of
:mod:`fenics_red.data`: it runs each reconstruction method of :mod:`fenics_red.methods` on each
selected sample, scores the estimates with :mod:`fenics_red.metrics` against the phantom (regions
from its mask) and writes, into one output folder:

* ``estimates/<method>/sample_<i>.npz``: the estimate, its history and the method's settings,
  one file per run, written atomically; a run that is interrupted resumes where it stopped (the
  runs already on disk are reused when their settings match, and refused otherwise);
* ``metrics.csv`` and ``metrics.json``: one row per (sample, method), and mean ± std per method;
* ``summary.md``: the table of mean ± std of every metric per method;
* ``figures/sample_<i>.png`` (truth and every estimate on one colour scale, pyvista) and
  ``figures/profile_<i>.png`` (a lateral cross-section through the largest inclusion,
  matplotlib);
* optionally ``xdmf/sample_<i>.xdmf``: truth and estimates as P1 functions for ParaView;
* with the option ``uncertainty`` (``--uncertainty``; ``ml`` and ``gn-tikhonov``): the posterior
  standard deviation ``std`` in the run files, ``figures/uncertainty_<i>.png`` (estimate, ``σ``
  and ``|error|/σ`` per method, 2-D data sets) and the share of nodes within ±2σ of the truth in
  ``summary.md`` (:mod:`fenics_red.uncertainty`).

Every method is set up once before any solve, so that bad options, a missing model file or
stored runs made with other settings are refused before the first estimate. With ``overwrite``
an existing evaluation stays as it is until the new one is complete: the new one is built in
``OUT.partial`` (which a run of the same command resumes) and then renamed into place (files in
``OUT`` that are not the evaluation's own are kept).

The truth is optional: for a data set without one (a real measurement; or with
``EvaluationSettings(truth=False)``) the methods run as on a real measurement (no ``E``, no mask),
the metrics (``metrics.csv``, ``metrics.json``) and the truth's panels are skipped with a one-line
warning saying why (also written to ``summary.md``), and the estimates and their figures are
written as usual; :func:`evaluate` then returns an empty summary.

The runs go through :func:`fenics_red.reconstruction.run_method`, the driver of ``fenics-red
reconstruct``: samples are spread over the MPI ranks of the communicator, each rank solves its
own on ``MPI.COMM_SELF`` (the methods' objects are built once per rank and method), rank 0 writes
the estimate files after every round, and an error on one rank stops all of them. Rank 0 computes
the metrics and draws the figures.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mpi4py import MPI

import numpy as np

from .data import load_dataset
from .io import OutputLock, atomic_output, hdf5_digest, plain, sync_folder, to_json
from .jobs import ResumableOutput, partial_path
from .methods import get_method
from .metrics import METRIC_NAMES, SSIM_WINDOW, evaluate_metrics
from .parallel import check_all, on_root
from .raster import ImageGrid, ValueRaster, central_slice
from .reconstruction import Result, has_truth, method_settings, misfit_problem, run_method
from .uncertainty import coverage

__all__ = ["EvaluationSettings", "evaluate", "summarise", "read_estimate", "read_std",
           "METRIC_LABELS"]

#: Column headers of the summary table.
METRIC_LABELS = {"rmse": "RMSE", "relative_rmse": "rel. RMSE", "psnr": "PSNR [dB]",
                 "ssim": "SSIM", "cnr_db": "CNR [dB]", "contrast_ratio": "contrast",
                 "contrast_ratio_true": "true contrast",
                 "contrast_ratio_error": "contrast error"}
_FORMAT = "fenics-red evaluation"


@dataclass(frozen=True)
class EvaluationSettings:
    """What an evaluation runs.

    Attributes:
        methods: names of registered methods (:data:`fenics_red.methods.METHODS`), in table order.
        options: per-method option overrides, ``{"red": {"denoiser": "model.pt"}}``.
        samples: indices of the samples to evaluate (``None``: all).
        figures: draw the per-sample figures.
        xdmf: write ParaView files per sample.
        figure_limit: draw figures (and XDMF files) for the first this many samples only
            (``None``: all).
        truth: compare with the data set's truth (``E`` and mask) when it has one; ``False``
            evaluates it as a real measurement (no metrics, no truth panels).
    """

    methods: tuple[str, ...]
    options: Mapping[str, Mapping] = field(default_factory=dict)
    samples: tuple[int, ...] | None = None
    figures: bool = True
    xdmf: bool = False
    figure_limit: int | None = None
    truth: bool = True

    def __post_init__(self):
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        if not methods:
            raise ValueError("give at least one method to evaluate")
        if len(set(methods)) != len(methods):
            raise ValueError(f"a method is listed twice in {list(methods)}")
        for name in methods:
            get_method(name)  # raises, listing the registered names
        object.__setattr__(self, "methods", methods)
        if self.figure_limit is not None and (isinstance(self.figure_limit, bool) or not isinstance(
                self.figure_limit, int) or self.figure_limit < 0):
            raise ValueError(f"the number of samples with figures (--figures) must be an integer "
                             f">= 0, got {self.figure_limit!r}")
        if self.xdmf and self.figure_limit == 0:
            raise ValueError("--xdmf writes its files for the samples that get figures, and "
                             "--figures 0 leaves none: drop one of them")
        unknown = sorted(set(self.options) - set(methods))
        if unknown:
            raise ValueError(f"options given for method(s) {unknown} that are not evaluated")
        if self.samples is not None:
            samples = tuple(int(i) for i in self.samples)
            if not samples or len(set(samples)) != len(samples):
                raise ValueError(f"the sample list must be non-empty without repeats, got "
                                 f"{list(self.samples)}")
            object.__setattr__(self, "samples", samples)


def _run_path(out: Path, method: str, index: int) -> Path:
    return out / "estimates" / method / f"sample_{index}.npz"


def _read_run(path: str | os.PathLike) -> tuple[np.ndarray, dict, dict, np.ndarray | None]:
    """``(estimate, settings, info, std or None)`` of one run file, checked: a damaged file (cut
    short, corrupt, edited: a modulus that is not positive, a negative σ) is a ``ValueError``
    saying so, never a score."""
    def damaged(why):
        return ValueError(f"estimate file {str(path)!r} is damaged ({why}); delete it to "
                          "recompute it")

    try:
        with np.load(path, allow_pickle=False) as data:
            estimate = np.asarray(data["estimate"], dtype=np.float64)
            settings = json.loads(str(data["settings"]))
            info = json.loads(str(data["info"]))
            std = np.asarray(data["std"], dtype=np.float64) if "std" in data.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise damaged(error) from None
    if not (isinstance(settings, dict) and isinstance(info, dict)):
        raise damaged("its settings or info are not a JSON object")
    if estimate.ndim not in (1, 2, 3) or not np.isfinite(estimate).all():
        raise damaged("no finite image or nodal values")
    if not (estimate > 0).all():
        raise damaged(f"a modulus of {estimate.min():.3g}, not positive")
    if std is not None and (std.shape != estimate.shape
                            or not (np.isfinite(std).all() and (std >= 0).all())):
        raise damaged("its standard deviations are non-finite, negative or of another shape")
    return estimate, settings, info, std


def read_estimate(path: str | os.PathLike) -> tuple[np.ndarray, dict, dict]:
    """``(estimate, settings, info)`` of one run file; ``ValueError`` when it is damaged."""
    return _read_run(path)[:3]


def read_std(path: str | os.PathLike) -> np.ndarray | None:
    """The posterior standard deviation of one run file (``None`` when it was run without the
    option ``uncertainty``); ``ValueError`` when the file is damaged."""
    return _read_run(path)[3]


def _write_run(path: Path, estimate, history: Mapping, settings: dict, info: dict,
               std=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"history_{k}": np.asarray(v) for k, v in history.items()}
    if std is not None:
        arrays["std"] = np.asarray(std, dtype=np.float64)
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "wb") as stream:
        np.savez_compressed(stream, estimate=np.asarray(estimate, dtype=np.float64),
                            settings=to_json(settings), info=to_json(info), **arrays)


class _RunFolder(ResumableOutput):
    """Rank 0's handle on the runs of one method, ``estimates/<method>/sample_<i>.npz``: one
    file per sample (row ``k`` is sample ``indices[k]``), done once its file exists. Stored runs
    made with other settings are refused."""

    def __init__(self, out: Path, method: str, indices: Sequence[int], settings: dict):
        self.settings = settings
        self.paths = [_run_path(out, method, int(i)) for i in indices]
        self.n_rows = len(self.paths)
        self.done = np.zeros(self.n_rows, dtype=bool)
        wanted = plain(settings, for_json=True)  # as stored, after a JSON round trip
        for k, path in enumerate(self.paths):
            if path.exists():
                _, stored, _ = read_estimate(path)
                if stored != wanted:
                    raise ValueError(f"{str(path)!r} was computed with other settings of "
                                     f"{method!r}; pass --overwrite to recompute all, or use "
                                     "another folder")
                self.done[k] = True

    def write_row(self, row: Result) -> int:
        _write_run(self.paths[row.row], row.estimate, row.history, self.settings, row.info,
                   row.std)
        return row.row


def check_evaluation_folder(out: Path, overwrite: bool = False) -> None:
    """Refuse an output folder that is a file or holds other files than an evaluation's (an
    evaluation writes only into its own folders or new ones)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} is a file, not a folder")
    if out.exists() and not (out / "evaluation.json").exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {str(out)!r} exists and is not an evaluation "
                              "folder (no evaluation.json); choose a new folder"
                              + ("" if overwrite else " or an empty one")
                              + ": --overwrite only replaces an evaluation's own results")


def _read_json(folder: Path):
    """The parsed ``folder/evaluation.json`` (``None``: none or not JSON)."""
    try:
        return json.loads((folder / "evaluation.json").read_text())
    except (OSError, ValueError):
        return None


def _ours(record) -> bool:
    return isinstance(record, dict) and record.get("format") == _FORMAT


def _record(folder: Path) -> dict | None:
    """The manifest ``evaluation.json`` of an evaluation folder (``None``: none or unreadable)."""
    old = _read_json(folder)
    return old if _ours(old) else None


def _check_not_foreign(folder: Path) -> None:
    """Refuse a folder whose ``evaluation.json`` is readable JSON of something other than an
    evaluation (a user's file of that name; a damaged one of ours passes): it is never cleared
    or replaced."""
    record = _read_json(folder)
    if record is not None and not _ours(record):
        raise FileExistsError(f"folder {str(folder)!r} holds an evaluation.json that fenics-red "
                              "did not write; choose another output folder")


def _stale_runs(folder: Path, runs: Mapping[str, dict], indices: Sequence[int],
                damaged: bool = False) -> list[tuple[str, Path]]:
    """``(method, path)`` of the stored runs in ``folder`` of the samples ``indices`` made with
    other settings than ``runs`` (``{method: settings}``); ``damaged``: also those that do not
    read (else their ``ValueError`` is raised)."""
    stale = []
    for method, settings in runs.items():
        wanted = plain(settings, for_json=True)  # as stored, after a JSON round trip
        for i in indices:
            path = _run_path(folder, method, int(i))
            if not path.exists():
                continue
            try:
                stored = read_estimate(path)[1]
            except ValueError:
                if not damaged:
                    raise
                stored = None
            if stored != wanted:
                stale.append((method, path))
    return stale


#: An evaluation's own folders and files (``--overwrite`` replaces these, and only these).
_OWN_FOLDERS = ("estimates", "figures", "xdmf")
#: The file that marks an evaluation as being replaced by :func:`_swap_in` (it moves with it to
#: ``OUT.replaced``): only a folder holding it is taken for a swap's leftover.
_SWAP_MARK = ".replacing"
_OWN_FILES = ("evaluation.json", "metrics.csv", "metrics.json", "summary.md", _SWAP_MARK)


def _clear(folder: Path) -> None:
    """Delete an evaluation's own results in ``folder`` (never other files)."""
    for name in _OWN_FOLDERS:
        shutil.rmtree(folder / name, ignore_errors=True)
    for name in _OWN_FILES:
        (folder / name).unlink(missing_ok=True)


def _discard_replaced(replaced: Path, out: Path) -> None:
    """Delete the old evaluation ``replaced`` after the swap, moving the files in it that are
    not the evaluation's own (a user's notes, say) into its successor ``out`` first."""
    for entry in replaced.iterdir():
        own = entry.name in _OWN_FOLDERS + _OWN_FILES or entry.name.endswith(".lock")
        if not own and not (out / entry.name).exists():
            os.rename(entry, out / entry.name)
    shutil.rmtree(replaced)


def _replaced_path(out: Path) -> Path:
    """``OUT.replaced``: the old evaluation while :func:`_swap_in` puts the new one in place."""
    return out.with_name(out.name + ".replaced")


def _finish_swap(out: Path) -> None:
    """Complete a swap (:func:`_swap_in`) that was cut short: an ``OUT.replaced`` evaluation
    is put back when ``OUT`` is missing (cut between the two renames: the new evaluation is
    still in ``OUT.partial``, where the same command finishes it), else deleted. A folder of
    that name that no swap left (no mark) is the user's and is left alone; a mark left in
    ``OUT`` by a swap cut before its first rename is removed."""
    replaced = _replaced_path(out)
    if not (replaced / _SWAP_MARK).exists():
        if (out / _SWAP_MARK).exists():
            with OutputLock(out / "evaluation.json"):  # refused while a run is swapping
                (out / _SWAP_MARK).unlink(missing_ok=True)
        return
    with OutputLock(replaced / "evaluation.json"):  # refused while a run is swapping
        if out.exists():
            _discard_replaced(replaced, out)
        else:
            os.rename(replaced, out)
            (out / _SWAP_MARK).unlink()
            sync_folder(out.parent)


def _swap_in(out: Path, staging: Path) -> None:
    """Put the complete evaluation ``staging`` in the place of ``out``; the old one is deleted
    only after that (an interruption between the renames is undone by :func:`_finish_swap`)."""
    replaced = _replaced_path(out)
    (out / _SWAP_MARK).touch()
    os.rename(out, replaced)
    os.rename(staging, out)
    sync_folder(out.parent)
    _discard_replaced(replaced, out)


def _prepare_folder(out: Path, manifest: dict, overwrite: bool, runs: Mapping[str, dict],
                    indices: Sequence[int]) -> tuple[Path, list[OutputLock]]:
    """Check the output folder against this evaluation (rank 0) and return ``(work, locks)``:
    the folder to write into and the locks (``evaluation.json.lock``) held until the
    evaluation ends. ``runs``: ``{method: settings}`` of the runs of the samples ``indices``.

    Everything is checked before anything is written: without ``overwrite`` the data set's
    fingerprint and the settings of the stored runs. Nothing is deleted before the folder is
    known to be an evaluation folder: ``--overwrite`` replaces an evaluation's own results,
    never a folder of other files, and builds the new evaluation aside in ``OUT.partial``
    (``work``; a run of the same command resumes it) while ``OUT`` stays as it is until
    :func:`_swap_in` replaces it with the complete one."""
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the parent folder of {str(out)!r} does not exist")
    _finish_swap(out)
    old = None
    if (out / "evaluation.json").exists():
        old = _record(out)
        _check_not_foreign(out)
        if old is None and not overwrite:
            raise ValueError(f"{str(out)!r} holds an unreadable evaluation.json; pass "
                             "--overwrite to start again")
    else:
        check_evaluation_folder(out, overwrite)
    work = out
    if not overwrite:
        if old is not None and old.get("data") != manifest["data"]:
            changed = ("values changed since" if old.get("data", {}).get("path")
                       == manifest["data"]["path"] else "another data set than")
            raise ValueError(f"{str(out)!r} holds an evaluation of {changed} the data set "
                             f"{manifest['data']['path']!r} (its fingerprint differs); use "
                             "another folder or --overwrite")
        for method, path in _stale_runs(out, runs, indices)[:1]:
            raise ValueError(f"{str(path)!r} was computed with other settings of {method!r}; "
                             "pass --overwrite to recompute all, or use another folder")
    elif out.is_dir() and any(out.iterdir()):  # an evaluation to replace: build the new aside
        work = partial_path(out)
        check_evaluation_folder(work, overwrite)
        _check_not_foreign(work)
        if _replaced_path(out).exists():  # no swap's (_finish_swap took those): the user's
            raise FileExistsError(f"{str(_replaced_path(out))!r} is in the way: --overwrite "
                                  "moves the old evaluation there while it puts the new one in "
                                  "place; move or rename that folder")
    locks = []
    try:
        for folder in dict.fromkeys((out, work)):
            folder.mkdir(exist_ok=True)
            locks.append(OutputLock(folder / "evaluation.json"))
        if work != out:  # resume an earlier --overwrite run of the same data and settings
            if (_record(work) or {}).get("data") != manifest["data"]:
                _clear(work)
            for _, path in _stale_runs(work, runs, indices, damaged=True):
                path.unlink()
        with atomic_output(work / "evaluation.json", overwrite=True) as tmp:
            Path(tmp).write_text(to_json(manifest, indent=2) + "\n")
    except BaseException:
        for lock in reversed(locks):
            lock.release()
        raise
    return work, locks


def _no_truth(dataset, settings: EvaluationSettings) -> str | None:
    """Why the estimates cannot be compared with a truth (``None``: they can)."""
    if not has_truth(dataset):
        return "the data set has no true modulus (no dataset 'E'), as a real measurement"
    if not settings.truth:
        return "comparison with the truth is turned off (EvaluationSettings.truth=False)"
    return None


def evaluate(data_path: str | os.PathLike, out: str | os.PathLike,
             settings: EvaluationSettings, comm: MPI.Comm, *, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Evaluate ``settings.methods`` on the samples of ``data_path`` into the folder ``out``.

    Collective on ``comm``. Returns the summary (mean, std and count of every metric per
    method; see :func:`summarise`) on every rank; an empty dict when there are no metrics (no
    truth: module docstring). Layout of ``out``: module docstring.
    """
    out = Path(out)
    locks: list[OutputLock] = []  # rank 0's locks of the folders
    dataset = check_all(comm, lambda: load_dataset(data_path))
    try:
        n = len(dataset)
        indices = list(range(n)) if settings.samples is None else list(settings.samples)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5
                                                    else "")
            raise ValueError(f"sample(s) {shown} do not exist: {str(data_path)!r} has {n} "
                             f"samples (0 to {n - 1})")
        shape = metric_grid(dataset).shape
        if dataset.has_truth and min(shape) < SSIM_WINDOW:  # found before any estimate is made
            raise ValueError(f"the data set's images are {' x '.join(map(str, shape))} pixels; "
                             f"SSIM needs at least {SSIM_WINDOW} across: evaluate data sets of "
                             f"{SSIM_WINDOW - 1} cells or more per side")
        # every method's options and model files, before any solve: set each up once
        runs = {method: method_settings(dataset, comm, method, settings.options.get(method, {}))
                for method in settings.methods}
        manifest = plain({"format": _FORMAT, "data": {
            "path": str(Path(data_path).resolve()), "n_samples": n, **dataset.attrs,
            "sha256": on_root(comm, lambda: hdf5_digest(data_path))}}, for_json=True)

        def prepare():
            work, held = _prepare_folder(out, manifest, overwrite, runs, indices)
            locks.extend(held)
            return work
        work = on_root(comm, prepare)
    except BaseException:
        dataset.close()
        raise
    try:
        no_truth = _no_truth(dataset, settings)
        if no_truth and comm.rank == 0:
            warnings.warn(f"metrics and truth figures skipped: {no_truth}; the estimates and "
                          "their figures are written", UserWarning, stacklevel=2)
        for method in settings.methods:
            run_method(dataset, comm, method, settings.options.get(method, {}), indices,
                       lambda run_settings, _, m=method: _RunFolder(work, m, indices,
                                                                    run_settings),
                       distribute="samples", truth=no_truth is None, batch_size=1,
                       progress=f"evaluate {method}" if progress else None)

        def report():
            summary = _report(work, dataset, indices, settings, no_truth)
            if work != out:  # --overwrite: the complete new evaluation replaces the old one
                _swap_in(out, work)
            return summary
        return on_root(comm, report)
    finally:
        dataset.close()
        for lock in reversed(locks):
            lock.release()


def summarise(rows: Sequence[Mapping], methods: Sequence[str]) -> dict:
    """``{method: {metric: {"mean", "std", "count", "non_finite"}}}`` over the finite values of
    each metric; ``non_finite`` counts the values left out (NaN or inf, e.g. the CNR of a flat
    image), which :func:`summary_table` marks."""
    summary = {}
    for method in methods:
        chosen = [r for r in rows if r["method"] == method]
        summary[method] = {}
        for name in METRIC_NAMES:
            values = np.array([r[name] for r in chosen], dtype=np.float64)
            finite = values[np.isfinite(values)]
            summary[method][name] = {
                "mean": float(finite.mean()) if finite.size else math.nan,
                "std": float(finite.std()) if finite.size else math.nan,
                "count": int(finite.size), "non_finite": int(values.size - finite.size)}
    return summary


def _format(value: float, name: str) -> str:
    if not math.isfinite(value):
        return "inf" if value > 0 else "–"
    if name in ("psnr", "cnr_db"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def summary_table(summary: Mapping, methods: Sequence[str],
                  metrics: Sequence[str] = ("relative_rmse", "rmse", "psnr", "ssim", "cnr_db",
                                            "contrast_ratio_error")) -> str:
    """A Markdown table of mean ± std per method (one row per method)."""
    lines = ["| method | " + " | ".join(METRIC_LABELS[m] for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    dropped = False
    for method in methods:
        cells = []
        for m in metrics:
            s = summary[method][m]
            cell = f"{_format(s['mean'], m)} ± {_format(s['std'], m)}"
            if s.get("non_finite"):
                cell += f" ({s['count']} of {s['count'] + s['non_finite']})†"
                dropped = True
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if dropped:
        lines.append("\n† over the finite values only: the others (NaN or inf) are left out")
    return "\n".join(lines) + "\n"


def _describe(attrs: Mapping) -> str:
    """``Grid 64 x 64, SNR 35 dB, seed 1.``: the data set line of ``summary.md``."""
    parts = [f"Grid {attrs['nx']} x {attrs['ny']}" + (f" x {attrs['nz']}" if "nz" in attrs else "")]
    if "snr_db" in attrs:
        parts.append(f"SNR {attrs['snr_db']:g} dB")
    if "seed" in attrs:
        parts.append(f"seed {attrs['seed']}")
    return ", ".join(parts) + "."


def metric_grid(dataset) -> ImageGrid:
    """The image grid of metrics and figures: the data set's own, or on a mesh whose phantom
    raster is narrower than SSIM's window along some axis (a coarse 3-D mesh) a finer one, with
    :data:`~fenics_red.metrics.SSIM_WINDOW` pixels across the narrowest axis (the P1 fields
    then sampled at more points)."""
    grid = dataset.grid
    if dataset.mesh is None or min(grid.shape) >= SSIM_WINDOW:
        return grid
    spacing = min(grid.extent) / (SSIM_WINDOW - 1)
    lower = np.array(grid.origin)
    return ImageGrid.covering(lower, lower + np.array(grid.extent), spacing)


def _report(out: Path, dataset, indices: Sequence[int], settings: EvaluationSettings,
            no_truth: str | None = None) -> dict:
    """Rank 0: metrics of every run, the tables and the figures (``no_truth``: why there is no
    truth to compare with; then no metrics and figures of the estimates only)."""
    rows, samples, estimates = [], {}, {}
    # metrics and figures compare images: exact copies on grids, the raster of a mesh otherwise
    raster = ValueRaster(dataset.settings.space, metric_grid(dataset))
    valid = None if dataset.mesh is None else raster.mask
    nodal = {}  # the estimates as stored (per node on a mesh), for the XDMF files
    infos = {}  # the runs' info, {sample: {method: info}}
    stds = {}  # posterior standard deviations (runs with the option uncertainty), as images
    nodal_stds = {}  # ... and as stored, for the XDMF files
    coverages = {}  # {method: [share of nodes with |truth - estimate| <= 2 sigma, per sample]}
    measurement, units = dataset.measurement, None
    if measurement is not None:  # figures and XDMF in the user's unit, as reconstruct writes
        from .measured import output_scale

        units = measurement["output"]["label"]
    for i in indices:
        sample = None if no_truth else dataset.sample(i)
        if sample is not None and dataset.mesh is not None:
            sample = dataclasses.replace(sample, E=raster.image(sample.E),
                                         mask=raster.labels(sample.mask))
        samples[i] = sample
        estimates[i], nodal[i], nodal_stds[i] = {}, {}, {}
        for method in settings.methods:
            estimate, _, info = read_estimate(_run_path(out, method, i))
            infos.setdefault(i, {})[method] = info
            if estimate.shape != tuple(dataset.value_shape):
                raise ValueError(f"estimate file {str(_run_path(out, method, i))!r} has shape "
                                 f"{estimate.shape}, the data set {tuple(dataset.value_shape)}; "
                                 "delete it to recompute it")
            std = read_std(_run_path(out, method, i))
            if measurement is not None:
                scale = output_scale(estimate, measurement, dataset.valid(i),
                                     dataset.reference(i))
                estimate, std = estimate * scale, None if std is None else std * scale
            estimates[i][method] = raster.image(estimate)
            nodal[i][method] = estimate
            if std is not None:
                nodal_stds[i][method] = std
                stds.setdefault(i, {})[method] = raster.image(std)
                if sample is not None:
                    coverages.setdefault(method, []).append(coverage(
                        sample.E, estimates[i][method], stds[i][method], valid=valid))
            if sample is None:
                continue
            row = {"sample": i, "method": method,
                   **evaluate_metrics(estimates[i][method], sample.E, sample.mask > 0, valid)}
            row["time"] = float(info.get("time", math.nan) or math.nan)
            rows.append(row)
    heading = (f"# Evaluation of {len(indices)} sample(s) of `{dataset.path.name}`\n\n"
               + _describe(dataset.attrs))
    if no_truth:
        summary = {}
        for name in ("metrics.csv", "metrics.json"):  # of an earlier evaluation with the truth
            (out / name).unlink(missing_ok=True)
        text = (f"{heading} No metrics: {no_truth}. The estimates are in "
                "`estimates/<method>/sample_<i>.npz`" + (
                    "" if units is None else
                    f" in the package's unit (100 kPa; the figures show {units}, as `fenics-red "
                    "reconstruct` writes them)") + ".\n")
    else:
        summary = summarise(rows, settings.methods)
        columns = ["sample", "method", *METRIC_NAMES, "time"]
        with atomic_output(out / "metrics.csv", overwrite=True) as tmp, \
                open(tmp, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                                 for k, v in row.items()})
        with atomic_output(out / "metrics.json", overwrite=True) as tmp:
            Path(tmp).write_text(to_json({"per_sample": rows, "summary": summary}, indent=1,
                                         sort_keys=False) + "\n")
        text = (f"{heading} Mean ± std over the samples (CNR over the finite values).\n\n"
                + summary_table(summary, settings.methods))
    for method, values in coverages.items():
        text += (f"\n{method}: the truth lies within ±2σ of the estimate (posterior standard "
                 f"deviation, docs/uncertainty.md) at {100 * np.mean(values):.1f} % of the nodes "
                 f"(mean over {len(values)} sample(s)).\n")
    missed = {method: [i for i in indices if infos[i][method].get("discrepancy_reached") is False]
              for method in settings.methods}
    for method in settings.methods:
        where = [i for i in indices if misfit_problem(infos[i][method])]
        if where:
            text += f"\n{method} on sample(s) {where}: {misfit_problem(infos[where[0]][method])}.\n"
    for method, where in missed.items():
        if where:
            text += (f"\n{method} did not reach its discrepancy target (the noise level) on "
                     f"sample(s) {where}: its misfit stayed above the noise level when its steps "
                     "(or its search for α) ran out, so its estimate there may be unreliable "
                     "(noise that its model does not hold, such as force noise, does this).\n")
    with atomic_output(out / "summary.md", overwrite=True) as tmp:
        Path(tmp).write_text(text)
    if settings.figures or settings.xdmf:
        truths = {i: None if no_truth else dataset.sample(i).E for i in samples}
        _figures(out, raster.grid, samples, estimates, rows, settings,
                 (dataset.settings.space, truths, nodal, nodal_stds), stds, units=units)
    return summary


def _figures(out, grid, samples, estimates, rows, settings, nodal, stds=None,
             units: str | None = None) -> None:
    """Per sample: the comparison and the profile figure (images), the XDMF file (on the data
    set's grid or mesh: ``nodal = (space, truths, estimates, stds)`` as stored); a sample of
    ``None``:
    no truth, figures of the estimates only."""
    from .visualise import plot_comparison, plot_profiles, plot_uncertainty, write_xdmf

    error = {(r["sample"], r["method"]): r["relative_rmse"] for r in rows}
    unit = {} if units is None else {"units": units}  # a measurement's: its modulus unit
    chosen = list(samples.items())[:settings.figure_limit]
    for i, sample in chosen:
        truth = None if sample is None else sample.E
        if settings.figures and grid.dim == 3:  # the axial-lateral slice through the inclusions
            j = central_slice(None if sample is None else sample.mask, grid.shape)
            plane = grid.axial_plane()
            truth = None if truth is None else truth[:, j, :]
            shown = {m: e[:, j, :] for m, e in estimates[i].items()}
            labels = {m: f"rel. RMSE {error[(i, m)]:.3f}, slice y[{j}]" for m in shown
                      if (i, m) in error}
            (out / "figures").mkdir(exist_ok=True)
            plot_comparison(truth, shown, out / "figures" / f"sample_{i}.png", plane,
                            labels=labels, **unit)
            plot_profiles(truth, shown, out / "figures" / f"profile_{i}.png", plane,
                          mask=None if sample is None else sample.mask[:, j, :], **unit)
        elif settings.figures:
            (out / "figures").mkdir(exist_ok=True)
            labels = {m: f"rel. RMSE {error[(i, m)]:.3f}" for m in estimates[i]
                      if (i, m) in error}
            space, truths, values, _ = nodal
            if hasattr(space, "cells") and space.dim == 2:  # drawn on the mesh itself
                plot_comparison(truths[i], values[i], out / "figures" / f"sample_{i}.png",
                                space, labels=labels, **unit)
            else:
                plot_comparison(truth, estimates[i], out / "figures" / f"sample_{i}.png", grid,
                                labels=labels, **unit)
            plot_profiles(truth, estimates[i], out / "figures" / f"profile_{i}.png", grid,
                          mask=None if sample is None else sample.mask, **unit)
            if stds and stds.get(i):
                plot_uncertainty(truth, {m: estimates[i][m] for m in stds[i]}, stds[i],
                                 out / "figures" / f"uncertainty_{i}.png", grid, **unit)
        if settings.xdmf:
            (out / "xdmf").mkdir(exist_ok=True)
            space, truths, values, value_stds = nodal
            fields = {} if truths[i] is None else {"truth": truths[i]}
            fields.update({m.replace("-", "_"): e for m, e in values[i].items()})
            fields.update({f"{m.replace('-', '_')}_std": e for m, e in value_stds[i].items()})
            write_xdmf(fields, out / "xdmf" / f"sample_{i}.xdmf", space, MPI.COMM_SELF)
