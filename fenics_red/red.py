"""RED reconstruction and the one-shot ``denoised-ml`` yardstick (paper, equations 6-12, Fig. 1).

RED runs the fixed-point loop of :class:`fenics_red.solvers.FixedPointSolver` with the learned
prior of :class:`fenics_red.priors.RedPrior`::

    E ← [E − ε (∇g(E) + λ (E − C(E)))]₊,   Γ refreshed from E every few steps   (6)-(7), (10)

A run on one data set has three stages:

1. the maximum-likelihood (ML) estimate ``Ẽ`` with the *training recipe* of the denoiser (the
   default :class:`~fenics_red.solvers.MLSettings`: the denoiser was trained on exactly this
   estimator, so it must see the same kind of input);
2. ``C(Ẽ)``: the denoiser applied once. This is the ``denoised-ml`` method, and RED's start;
3. the RED loop from ``C(Ẽ)``, with ``Γ`` refreshed from the (now smooth) iterate every
   :attr:`REDSettings.steps_per_round` steps and λ set at each refresh by a rule of
   :mod:`fenics_red.priors` (:attr:`REDSettings.lam`), until one of the loop's stopping rules
   (:func:`fenics_red.solvers.stopping_rules`) ends it: a fixed point (:attr:`REDSettings.rtol`),
   a round without a significant decrease of the misfit, the misfit guard or the step budget.

``denoised-ml`` is the honest yardstick for RED: where RED does not beat it, the physics loop adds
nothing to one pass of the network. The defaults (λ = 0.001 L_g, the significance stop and the
misfit guard of :class:`REDSettings`) were chosen on validation sets at 25, 35 and 45 dB; the
measurements, and the commands that made them, are in ``docs/studies.md``. In short: one denoiser
pass takes 37-50 % off the ML estimate's error and the loop changes it by under 0.5 %; larger
weights, and rounds that lower the misfit by less than its noise, make it worse.

The default denoiser is the model shipped in ``fenics_red/data/denoiser.pt`` (trained by
``make denoiser``: see the README); any file written by ``fenics-red train`` can replace it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mpi4py import MPI

import numpy as np

from . import validation
from .forward import ElasticityModel, ForwardSettings
from .io import file_sha256
from .likelihood import StatisticalLikelihood
from .measurements import Measurement
from .parallel import on_root
from .raster import ImageGrid
from .solvers import FixedPointSolver, MLSettings

__all__ = ["REDSettings", "DenoisedMLSettings", "REDReconstructor", "default_denoiser_path",
           "load_denoiser", "red_options", "denoised_ml_options", "setup_red",
           "setup_denoised_ml", "snr_warning", "training_snrs"]

_STARTS = ("denoised-ml", "ml", "homogeneous")
_SOLVERS = ("pgd", "fista")


def _check_denoiser(settings, name: str) -> None:
    """``denoiser``: ``None`` or a non-empty path (kept as a string); ``flip_average``: a bool."""
    denoiser = settings.denoiser
    if isinstance(denoiser, os.PathLike):
        denoiser = os.fspath(denoiser)
        object.__setattr__(settings, "denoiser", denoiser)
    if denoiser is not None and not (isinstance(denoiser, str) and denoiser):
        raise ValueError(f"{name}.denoiser must be None (the shipped model) or a model file, "
                         f"got {denoiser!r}")
    if not isinstance(settings.flip_average, bool):
        raise ValueError(f"{name}.flip_average must be True or False, got "
                         f"{settings.flip_average!r}")


def default_denoiser_path(dims: int = 2) -> Path:
    """The shipped denoiser model of ``dims``-D data (part of the package data): ``denoiser.pt``
    (2-D images), ``denoiser-3d.pt`` (volumes)."""
    name = "denoiser-3d.pt" if dims == 3 else "denoiser.pt"
    return Path(__file__).resolve().parent / "data" / name


def load_denoiser(path: str | Path | None = None, flip_average: bool = True, dims: int = 2):
    """A :class:`fenics_red.denoiser.Denoiser` from ``path`` (default: the shipped model of
    ``dims``-D data), averaged over the allowed flips unless ``flip_average`` is false. A 2-D
    model for 3-D data (``dims=3``) denoises every axial-lateral slice
    (:class:`~fenics_red.denoiser.SliceWiseDenoiser`, one scale per volume); a 3-D model for 2-D
    data is an error."""
    from .denoiser import Denoiser  # torch: imported only when a denoiser is needed

    path = default_denoiser_path(dims) if path is None else Path(path)
    if not path.exists() and path == default_denoiser_path(dims):
        raise FileNotFoundError(f"the shipped denoiser {str(path)!r} is missing from this "
                                "installation; train one with `make denoiser"
                                f"{' DIM=3' if dims == 3 else ''}` or pass --denoiser")
    denoiser = Denoiser.load(path, flip_average=flip_average)
    if denoiser.dims == 2 and dims == 3:
        return denoiser.slicewise()
    if denoiser.dims != dims:
        raise ValueError(f"{str(path)!r} is a {denoiser.dims}-D denoiser but the data are "
                         f"{dims}-D; pass a 2-D model (--denoiser)")
    return denoiser


@dataclass(frozen=True)
class REDSettings:
    """Settings of the RED loop (the ML stage uses the default :class:`MLSettings`).

    Attributes:
        denoiser: model file (``None``: the shipped one).
        flip_average: average the denoiser over left-right flips (see
            :mod:`fenics_red.denoiser`; measured better at every SNR of the validation sets).
        lam: the λ rule, as :func:`fenics_red.priors.parse_lambda_rule` reads it: a number,
            ``"paper:c"`` (λ = c‖∇g‖, equation 12), ``"balance:c"`` (λ = c‖∇g‖/‖E − C(E)‖) or
            ``"lipschitz:c"`` (λ = c L_g; the default, ``c = 0.001``). See ``docs/studies.md``
            for the measurements behind the default.
        start: ``"denoised-ml"`` (default), ``"ml"`` or ``"homogeneous"`` (the uniform fit).
        max_steps: budget of RED gradient steps.
        steps_per_round: steps with ``Γ`` frozen between two refreshes of ``Γ(E)`` and λ.
        rtol: stop when a refresh of ``Γ`` moves ``E`` by less than this (relative).
        solver: ``"pgd"`` (equation 7) or ``"fista"``.
        step_scale: ``ε = step_scale / (L_g + λ L_R)``.
        misfit_guard: stop when a refresh of ``Γ`` finds the data misfit above the start's, and
            keep the last iterate within it (:attr:`MLSettings.misfit_guard`): RED exists to
            bring the denoised estimate closer to the data, and an iterate that fits them worse
            than its start is being pulled away by the prior (runaway stiff spots with large
            weights, ``docs/studies.md``).
        min_misfit_decrease: stop when a round lowers the misfit (at the refreshes of ``Γ``) by
            less than this many of its standard deviations ``√(2n)``, and keep the iterate
            before that round (:attr:`MLSettings.min_misfit_decrease`): such a round fits the
            noise, not the modulus (the slow drift below the training SNR, ``docs/studies.md``).
            ``0`` turns it off.
    """

    denoiser: str | None = None
    flip_average: bool = True
    lam: str = "lipschitz:0.001"
    start: str = "denoised-ml"
    max_steps: int = 200
    steps_per_round: int = 20
    rtol: float = 1e-4
    solver: str = "pgd"
    step_scale: float = 1.0
    misfit_guard: bool = True
    min_misfit_decrease: float = 1.0
    pixel: float | None = None

    def __post_init__(self):
        _check_denoiser(self, "REDSettings")
        _check_pixel(self, "REDSettings")
        if self.start not in _STARTS:
            raise ValueError(f"REDSettings.start must be one of {_STARTS}, got {self.start!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"REDSettings.solver must be one of {_SOLVERS}, got {self.solver!r}")
        from .priors import parse_lambda_rule

        parse_lambda_rule(self.lam, prior=object(), fidelity=object())  # spelling check only
        try:
            self.loop_settings()  # checks the numbers
        except ValueError as error:  # the same field names
            raise ValueError(str(error).replace("MLSettings.", "REDSettings.")) from None

    def loop_settings(self) -> MLSettings:
        """The :class:`MLSettings` of the RED loop."""
        return MLSettings(method=self.solver, stop="budget", max_steps=self.max_steps,
                          steps_per_round=self.steps_per_round, rtol=self.rtol,
                          step_scale=self.step_scale, misfit_guard=self.misfit_guard,
                          min_misfit_decrease=self.min_misfit_decrease)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_options(cls, options: Mapping | None, method: str = "red") -> REDSettings:
        """Settings from a mapping of overrides (generic ``max_steps``/``solver`` included)."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in dict(options or {}).items():
            if key not in known:
                raise ValueError(f"method {method!r} has no option {key!r}; accepted: "
                                 f"{sorted(known)}")
            values[key] = value
        return cls(**values)


@dataclass(frozen=True)
class DenoisedMLSettings:
    """Options of ``denoised-ml``: the denoiser (:attr:`REDSettings.denoiser`,
    :attr:`REDSettings.flip_average`); the ML stage is the training recipe, not an option."""

    denoiser: str | None = None
    flip_average: bool = True
    pixel: float | None = None

    def __post_init__(self):
        _check_denoiser(self, "DenoisedMLSettings")
        _check_pixel(self, "DenoisedMLSettings")

    def red_settings(self) -> REDSettings:
        """The :class:`REDSettings` whose first two stages are this method."""
        return REDSettings(denoiser=self.denoiser, flip_average=self.flip_average,
                           pixel=self.pixel)

    def to_dict(self) -> dict:
        return asdict(self)


def red_options(options: Mapping | REDSettings | None = None) -> REDSettings:
    """The ``"red"`` method's options: :class:`REDSettings` with the overrides ``options`` (its
    fields; ``max_steps`` and ``solver`` are fields of the same meaning as the generic names)."""
    if isinstance(options, REDSettings):
        return options
    return REDSettings.from_options(options, "red")


def denoised_ml_options(options: Mapping | DenoisedMLSettings | None = None
                        ) -> DenoisedMLSettings:
    """The ``"denoised-ml"`` method's options: :class:`DenoisedMLSettings` with the overrides
    ``options`` (``denoiser``, ``flip_average``)."""
    if isinstance(options, DenoisedMLSettings):
        return options
    known = {f.name for f in fields(DenoisedMLSettings)}
    unknown = sorted(set(dict(options or {})) - known)
    if unknown:
        raise ValueError(f"method 'denoised-ml' has no option(s) {unknown}; accepted: "
                         f"{sorted(known)} (the ML stage is the training recipe)")
    return DenoisedMLSettings(**dict(options or {}))


class REDReconstructor:
    """ML estimate, one denoiser pass and the RED loop on one grid; objects built once.

    Args:
        grid, forward: the data's image grid and forward settings.
        settings: :class:`REDSettings`.
        comm: the communicator the mesh is distributed over (the denoiser runs on its rank 0).
        denoiser: an already loaded denoiser (default: load ``settings.denoiser``).
    """

    def __init__(self, grid: ImageGrid, forward: ForwardSettings | None = None,
                 settings: REDSettings | None = None, comm: MPI.Comm = MPI.COMM_SELF,
                 denoiser=None):
        from .priors import RedPrior, parse_lambda_rule

        self.settings = settings or REDSettings()
        self.comm = comm
        self.model = ElasticityModel.on_grid(grid, comm, forward or ForwardSettings())
        self.denoiser = denoiser if denoiser is not None else load_denoiser(
            self.settings.denoiser, self.settings.flip_average, self.model.dim)
        self.model.raster_spacing = self.settings.pixel  # the denoiser's raster on a mesh
        self.ml_settings = MLSettings()
        self.likelihood = StatisticalLikelihood(self.model, settings=self.ml_settings.likelihood)
        self.ml = FixedPointSolver(self.likelihood, self.ml_settings)
        self.prior = RedPrior(self.denoiser, self.likelihood)
        self.rule = parse_lambda_rule(self.settings.lam, self.prior, self.likelihood)
        self.red = FixedPointSolver(self.likelihood, self.settings.loop_settings(), self.prior,
                                    lam=self.rule)

    def denoise(self, image: np.ndarray) -> np.ndarray:
        """``C(image)`` on rank 0, broadcast (collective)."""
        return on_root(self.comm, lambda: np.asarray(self.denoiser(image), dtype=np.float64))

    def run_sample(self, sample, stages: str = "red") -> tuple[np.ndarray, dict, dict]:
        """``(estimate, history, info)`` of a data set sample; ``stages`` ``"denoised-ml"`` stops
        after the denoiser pass. Collective."""
        m = Measurement.from_sample(sample)
        displacement, noise, truth = m.displacement, m.noise, m.truth
        fid = self.likelihood
        fid.set_data(displacement, noise)
        E_ml, ml_history = self.ml.run(truth=truth)
        ml_values = fid.to_values(E_ml)
        # the denoiser sees the raster image; its output comes back to the nodes (exact on grids)
        denoised = fid.to_values(fid.from_image(self.denoise(fid.to_image(E_ml)),
                                                name="denoised ML estimate"))
        floor = self.ml_settings.floor * float(np.mean(ml_values))
        denoised = np.maximum(denoised, floor)
        info = {"ml_steps": int(ml_history.final["step"]), "ml_stop": ml_history.stop_reason,
                "ml_time": float(ml_history.final["time"])}
        if truth is not None:
            norm = np.linalg.norm(truth)
            info.update(ml_error=float(np.linalg.norm(ml_values - truth) / norm),
                        denoised_ml_error=float(np.linalg.norm(denoised - truth) / norm))
        if stages == "denoised-ml":
            history = {f"ml_{k}": v for k, v in ml_history.as_arrays().items()}
            info["time"] = info["ml_time"]
            return denoised, history, info
        start = {"denoised-ml": denoised, "ml": ml_values, "homogeneous": None}[
            self.settings.start]
        calls, seconds = self.prior.calls, self.prior.seconds
        E, history = self.red.run(start, truth=truth)
        estimate = fid.to_values(E)
        arrays = history.as_arrays()
        final = history.final
        info.update(steps=int(final["step"]), stop=history.stop_reason,
                    red_time=final["time"], time=info["ml_time"] + final["time"],
                    lam=float(arrays["lam"][-1]) if "lam" in arrays else math.nan,
                    denoiser_calls=self.prior.calls - calls,
                    denoiser_seconds=self.prior.seconds - seconds,
                    red_objective=self.prior.value(E))
        return estimate, arrays, info

    def destroy(self) -> None:
        self.red.destroy()
        self.ml.destroy()
        self.likelihood.destroy()
        self.model.destroy()


class _Runner:
    """Runner API of :mod:`fenics_red.methods` for ``red`` and ``denoised-ml``."""

    def __init__(self, stages: str, grid, forward, comm, options):
        self.stages = stages
        if stages == "denoised-ml":
            self.options = denoised_ml_options(options)
            self.red_settings = self.options.red_settings()
        else:
            self.options = self.red_settings = red_options(options)
        self.reconstructor = REDReconstructor(grid, forward, self.red_settings, comm)
        self.denoiser_path = Path(self.red_settings.denoiser
                                  or default_denoiser_path(self.reconstructor.model.dim))
        # the weights just loaded: a resume must use the same ones (hashed once, not per call)
        self.denoiser_sha256 = file_sha256(self.denoiser_path)

    @property
    def settings(self) -> dict:
        out = {"ml": self.reconstructor.ml_settings.to_dict(),
               "denoiser": str(self.denoiser_path),
               "denoiser_sha256": self.denoiser_sha256,
               "flip_average": self.red_settings.flip_average,
               "pixel": self.red_settings.pixel,
               "denoiser_card": _card_summary(self.reconstructor.denoiser),
               "slice_wise": type(self.reconstructor.denoiser).__name__ == "SliceWiseDenoiser"}
        if self.stages == "red":
            out["red"] = self.red_settings.to_dict()
        return out

    def run(self, sample):
        return self.reconstructor.run_sample(sample, self.stages)

    def check_data(self, data_settings) -> list[str]:
        """Warnings about a data set this method was not validated on (see :func:`snr_warning`)."""
        messages = [snr_warning(self.reconstructor.denoiser,
                                getattr(data_settings, "snr_db", None), self.stages),
                    resolution_warning(self.reconstructor.denoiser, data_settings,
                                       self.red_settings.pixel, self.stages)]
        return [message for message in messages if message]

    def destroy(self) -> None:
        self.reconstructor.destroy()


#: How much noisier than the denoiser's training data (dB) data may be before a warning.
SNR_MARGIN_DB = 3.0


def training_snrs(denoiser) -> list[float]:
    """The SNRs (dB) of the denoiser's training pairs, from its model card (empty if unknown)."""
    data = (getattr(denoiser, "card", {}) or {}).get("data") or {}
    values = data.get("snr_db")
    values = values if isinstance(values, list) else [values]
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def snr_warning(denoiser, snr_db: float | None, method: str = "red") -> str | None:
    """A warning when the data are more than :data:`SNR_MARGIN_DB` noisier than every SNR the
    denoiser was trained at, ``None`` otherwise (or when either SNR is unknown).

    Measured with a model trained at 35 dB alone: at 25 dB one denoiser pass left the ML estimate
    as it was and RED made it worse (``docs/studies.md``).
    """
    snrs = training_snrs(denoiser)
    if snr_db is None or not snrs or not math.isfinite(float(snr_db)):
        return None
    if float(snr_db) >= min(snrs) - SNR_MARGIN_DB:
        return None
    trained = ", ".join(f"{v:g}" for v in sorted(set(snrs)))
    return (f"the data ({float(snr_db):g} dB) are noisier than the denoiser's training data "
            f"({trained} dB): {method!r} was not validated there (a model trained at 35 dB alone "
            "did not improve 25 dB estimates, see docs/studies.md); train a denoiser at this SNR "
            "(scripts/train-denoiser with SNRS=...) and pass it with --denoiser, or compare with "
            "--method ml")


#: How many times more (or fewer) raster pixels across than in training before a warning.
RESOLUTION_FACTOR = 2.0


def raster_shape(data_settings, pixel: float | None = None) -> tuple[int, int]:
    """The shape of the image the denoiser sees for a data set: the grid's, or on a mesh that of
    the raster of :func:`fenics_red.raster.raster_for` (pixels of ``pixel``, default the mean node
    spacing ``sqrt(area / N)``). Serial."""
    from .raster import ImageGrid

    mesh = getattr(data_settings, "mesh", None)
    if mesh is None:
        return tuple(data_settings.grid.shape)
    if pixel is None:
        pixel = mesh.mean_spacing()
    return ImageGrid.covering(mesh.points.min(axis=0), mesh.points.max(axis=0), pixel).shape


def resolution_warning(denoiser, data_settings, pixel: float | None = None,
                       method: str = "red") -> str | None:
    """A warning when the denoiser sees images more than :data:`RESOLUTION_FACTOR` times larger
    or smaller (in pixels across) than its training images: its structures then span other
    numbers of pixels than any it learnt. ``None`` when close, or when either is unknown."""
    trained = ((getattr(denoiser, "card", {}) or {}).get("data") or {}).get("image_shape")
    if not trained or getattr(data_settings, "grid", None) is None:
        return None
    shape = raster_shape(data_settings, pixel)
    ratio = max(shape) / max(trained)
    if 1 / RESOLUTION_FACTOR <= ratio <= RESOLUTION_FACTOR:
        return None
    def size(image_shape):  # "nx x ny" of an image, "nx x ny x nz" of a volume
        return " x ".join(str(n) for n in reversed(image_shape))

    what = "image" if len(shape) == 2 else "volume"
    return (f"the denoiser sees the modulus as a {size(shape)} {what}, but it was "
            f"trained on {size(trained)} images ({ratio:.2g} times the pixels "
            f"across): {method!r} was not validated at this resolution; set the raster's pixel "
            "size with --pixel (in the mesh's length unit) or train a denoiser at this "
            "resolution")


def _check_pixel(settings, name: str) -> None:
    if settings.pixel is not None:
        validation.positive(settings.pixel, f"{name}.pixel")


def _card_summary(denoiser) -> dict:
    card = getattr(denoiser, "card", {}) or {}
    return {k: card[k] for k in ("created", "seed", "epochs", "best_epoch") if k in card}


def setup_red(grid, forward, comm, options=None) -> _Runner:
    """Factory of ``"red"`` (options: see :func:`red_options`)."""
    return _Runner("red", grid, forward, comm, options)


def setup_denoised_ml(grid, forward, comm, options=None) -> _Runner:
    """Factory of ``"denoised-ml"`` (options: see :func:`denoised_ml_options`)."""
    return _Runner("denoised-ml", grid, forward, comm, options)
