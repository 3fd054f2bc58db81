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
* optionally ``xdmf/sample_<i>.xdmf``: truth and estimates as P1 functions for ParaView.

Samples are spread over the MPI ranks of the communicator; each rank solves its own on
``MPI.COMM_SELF`` (the methods' objects are built once per rank and method) and writes its own
estimate files; after every round all ranks check for errors together, so a failure on one rank
stops all of them. Rank 0 computes the metrics and draws the figures.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mpi4py import MPI

from .data import load_dataset
from .io import atomic_output
from .methods import get_method, warn_about_data
from .metrics import METRIC_NAMES, evaluate_metrics
from .parallel import check_all, on_root, raise_local_or_shared

__all__ = ["EvaluationSettings", "evaluate", "summarise", "read_estimate", "METRIC_LABELS"]

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
    """

    methods: tuple[str, ...]
    options: Mapping[str, Mapping] = field(default_factory=dict)
    samples: tuple[int, ...] | None = None
    figures: bool = True
    xdmf: bool = False
    figure_limit: int | None = None

    def __post_init__(self):
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        if not methods:
            raise ValueError("give at least one method to evaluate")
        if len(set(methods)) != len(methods):
            raise ValueError(f"a method is listed twice in {list(methods)}")
        for name in methods:
            get_method(name)  # raises, listing the registered names
        object.__setattr__(self, "methods", methods)
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


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def read_estimate(path: str | os.PathLike) -> tuple[np.ndarray, dict, dict]:
    """``(estimate, settings, info)`` of one run file; ``ValueError`` when it is damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            estimate = np.asarray(data["estimate"], dtype=np.float64)
            settings = json.loads(str(data["settings"]))
            info = json.loads(str(data["info"]))
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise ValueError(f"estimate file {str(path)!r} is damaged ({error}); delete it to "
                         "recompute it") from None
    if estimate.ndim != 2 or not np.isfinite(estimate).all():
        raise ValueError(f"estimate file {str(path)!r} holds no finite 2-D image; delete it")
    return estimate, settings, info


def _write_run(path: Path, estimate, history: Mapping, settings: dict, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"history_{k}": np.asarray(v) for k, v in history.items()}
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "wb") as stream:
        np.savez_compressed(stream, estimate=np.asarray(estimate, dtype=np.float64),
                            settings=json.dumps(_jsonable(settings), sort_keys=True),
                            info=json.dumps(_jsonable(info), sort_keys=True), **arrays)


def _prepare_folder(out: Path, manifest: dict, overwrite: bool) -> None:
    """Create the output folder or check that it belongs to this evaluation (rank 0)."""
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the parent folder of {str(out)!r} does not exist")
    record = out / "evaluation.json"
    if out.exists() and overwrite:
        for name in ("estimates", "figures", "xdmf"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("evaluation.json", "metrics.csv", "metrics.json", "summary.md"):
            (out / name).unlink(missing_ok=True)
    if record.exists():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("format") != _FORMAT:
            raise ValueError(f"{str(out)!r} holds an unreadable evaluation.json; pass --overwrite "
                             "to start again")
        if old.get("data") != manifest["data"]:
            raise ValueError(f"{str(out)!r} holds an evaluation of another data set "
                             f"({old.get('data', {}).get('path')!r}); use another folder or "
                             "--overwrite")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {str(out)!r} exists and is not an evaluation "
                              "folder; choose a new folder or pass --overwrite")
    out.mkdir(exist_ok=True)
    with atomic_output(record, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _pending(out: Path, method: str, indices: Sequence[int], settings: dict) -> list[int]:
    """Samples without a stored run of ``method``; stored runs with other settings are refused."""
    todo = []
    for i in indices:
        path = _run_path(out, method, i)
        if not path.exists():
            todo.append(i)
            continue
        _, stored, _ = read_estimate(path)
        if stored != _jsonable(settings):
            raise ValueError(f"{str(path)!r} was computed with other settings of {method!r}; "
                             "pass --overwrite to recompute all, or use another folder")
    return todo


def evaluate(data_path: str | os.PathLike, out: str | os.PathLike,
             settings: EvaluationSettings, comm: MPI.Comm, *, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Evaluate ``settings.methods`` on the samples of ``data_path`` into the folder ``out``.

    Collective on ``comm``. Returns the summary (mean, std and count of every metric per
    method; see :func:`summarise`) on every rank. Layout of ``out``: module docstring.
    """
    out = Path(out)
    dataset = check_all(comm, lambda: load_dataset(data_path))
    try:
        grid, forward = dataset.grid, dataset.settings.forward
        n = len(dataset)
        indices = list(range(n)) if settings.samples is None else list(settings.samples)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"sample(s) {bad} do not exist: {str(data_path)!r} has {n} samples "
                             f"(0 to {n - 1})")
        manifest = {"format": _FORMAT, "data": {"path": str(Path(data_path).resolve()),
                                                "n_samples": n, **_jsonable(dataset.attrs)}}
        on_root(comm, lambda: _prepare_folder(out, manifest, overwrite))
        bar = None
        for method in settings.methods:
            runner = None
            try:
                options = dict(settings.options.get(method, {}))
                # settings are the same on every rank: rank 0 checks the stored runs
                runner = check_all(comm, lambda m=method, o=options:
                                   get_method(m).setup(grid, forward, MPI.COMM_SELF, o))
                pending = on_root(comm, lambda m=method, r=runner:
                                  _pending(out, m, indices, r.settings))
                if pending:
                    warn_about_data(runner, dataset.settings, comm)
                if comm.rank == 0 and progress and pending:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=len(pending), desc=f"evaluate {method}", unit="sample",
                               dynamic_ncols=True)
                for start in range(0, len(pending), comm.size):
                    mine = pending[start:start + comm.size]
                    error = None
                    if comm.rank < len(mine):
                        i = mine[comm.rank]
                        try:
                            estimate, history, info = runner.run(dataset.sample(i))
                            _write_run(_run_path(out, method, i), estimate, history,
                                       runner.settings, info)
                        except Exception as exc:
                            error = exc
                    raise_local_or_shared(comm, error)
                    if bar is not None:
                        bar.update(len(mine))
            finally:
                if bar is not None:
                    bar.close()
                    bar = None
                if runner is not None:
                    runner.destroy()
        return on_root(comm, lambda: _report(out, dataset, indices, settings))
    finally:
        dataset.close()


def summarise(rows: Sequence[Mapping], methods: Sequence[str]) -> dict:
    """``{method: {metric: {"mean", "std", "count"}}}`` over the finite values of each metric."""
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
                "count": int(finite.size)}
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
    for method in methods:
        cells = []
        for m in metrics:
            s = summary[method][m]
            cells.append(f"{_format(s['mean'], m)} ± {_format(s['std'], m)}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _report(out: Path, dataset, indices: Sequence[int], settings: EvaluationSettings) -> dict:
    """Rank 0: metrics of every run, the tables and the figures."""
    rows, truths, estimates = [], {}, {}
    for i in indices:
        sample = dataset.sample(i)
        truths[i] = sample
        estimates[i] = {}
        for method in settings.methods:
            estimate, _, info = read_estimate(_run_path(out, method, i))
            estimates[i][method] = estimate
            row = {"sample": i, "method": method, **evaluate_metrics(estimate, sample.E,
                                                                    sample.mask > 0)}
            row["time"] = float(info.get("time", math.nan) or math.nan)
            rows.append(row)
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
        Path(tmp).write_text(json.dumps(_jsonable({"per_sample": rows, "summary": summary}),
                                        indent=1) + "\n")
    attrs = dataset.attrs
    text = (f"# Evaluation of {len(indices)} sample(s) of `{dataset.path.name}`\n\n"
            f"Grid {attrs['nx']} x {attrs['ny']}, SNR {attrs['snr_db']:g} dB, seed "
            f"{attrs['seed']}. Mean ± std over the samples (CNR over the finite values).\n\n"
            + summary_table(summary, settings.methods))
    with atomic_output(out / "summary.md", overwrite=True) as tmp:
        Path(tmp).write_text(text)
    if settings.figures or settings.xdmf:
        _figures(out, dataset.grid, truths, estimates, rows, settings)
    return summary


def _figures(out, grid, truths, estimates, rows, settings) -> None:
    from .visualise import plot_comparison, plot_profiles, write_xdmf

    error = {(r["sample"], r["method"]): r["relative_rmse"] for r in rows}
    chosen = list(truths.items())[:settings.figure_limit]
    for i, sample in chosen:
        if settings.figures:
            (out / "figures").mkdir(exist_ok=True)
            labels = {m: f"rel. RMSE {error[(i, m)]:.3f}" for m in estimates[i]}
            plot_comparison(sample.E, estimates[i], out / "figures" / f"sample_{i}.png", grid,
                            labels=labels)
            plot_profiles(sample.E, estimates[i], out / "figures" / f"profile_{i}.png", grid,
                          mask=sample.mask)
        if settings.xdmf:
            (out / "xdmf").mkdir(exist_ok=True)
            fields = {"truth": sample.E, **{m.replace("-", "_"): e
                                            for m, e in estimates[i].items()}}
            write_xdmf(fields, out / "xdmf" / f"sample_{i}.xdmf", grid, MPI.COMM_SELF)
