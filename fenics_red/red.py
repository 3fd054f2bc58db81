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
   :mod:`fenics_red.priors` (:attr:`REDSettings.lam`), until the relative change of ``E`` falls
   below :attr:`REDSettings.rtol` (a fixed point) or the step budget is spent.

``denoised-ml`` is the honest yardstick for RED: where RED does not beat it, the physics loop adds
nothing to one pass of the network.

Choice of λ (``demos/red_lambda_rules.py``, one call per SNR, with the shipped denoiser, on
validation sets of 16 phantoms at 64², seed 5000, used neither in training nor in ``make paper``;
mean relative error; in brackets the median λ / L_g, or the runs stopped by the misfit guard):

============================== ================ ================ ================
                               25 dB            35 dB            45 dB
============================== ================ ================ ================
ml                             0.419            0.381            0.328
denoised-ml (RED's start)      0.423            0.202            0.222
paper (12), c = 1              0.625 (1.1e-2)   0.2009 (9.0e-4)  0.2220 (8.8e-4)
0.001 L_g (the default)        0.442            0.2015           0.2218
0.0003 L_g                     0.442            0.2016           0.2219
0.1 L_g                        0.977            0.223            0.247
L_g                            1.30 (6 guard)   0.888 (8 guard)  0.367 (10 guard)
============================== ================ ================ ================

Projected gradient steps, 20 per refresh of ``Γ``, at most 200. At the training SNR (35 dB) and
above, every small weight reaches a fixed point (16 of 16) a little better than its start: the
paper's rule gives λ ≈ 9e-4 L_g there, the weight the default fixes (the script with the rules
``lipschitz:0.003,lipschitz:0.01,lipschitz:0.03`` at 35 dB gave 0.2009, 0.2015 and 0.2058: no
weight gains more). The rules part at 25 dB, an SNR the denoiser was not trained on: ``‖∇g‖`` grows
with the noise, so rule (12) raises λ twelve-fold exactly where the prior is least reliable, and
the iterate drifts (0.42 → 0.63). With a small fixed weight the loop is close to the data term
alone, which at 25 dB also makes the estimate worse (0.42 → 0.44, the same for 0.0003 and 0.001
L_g: the data term drives it): every misfit-reducing step fits noise that the 35 dB denoiser cannot
tell from structure (on six phantoms of the ``make paper`` 25 dB set the error added is in the
background: its share of ‖E‖ went from 0.00-0.06 to 0.00-0.17 while the inclusions' error stayed; a
ceiling on the modulus, tried, did not help). Large weights (0.1 L_g, L_g) drift or diverge:
iterated, the denoiser lets stiff spots run away (one 35 dB phantom with λ = L_g ended at
max/median 283, the truth's is 5.4), and the data hardly object (the displacement is insensitive to
the modulus of a region much stiffer than its surroundings). The misfit guard
(:attr:`REDSettings.misfit_guard`) stops such a run when the misfit rises above the start's (6, 8
and 10 of 16 runs with λ = L_g); it does not see a runaway that the data cannot see. Hence the
default: a fixed, small weight, the value of rule (12) at the training SNR. Making the loop add
more than one denoiser pass, and making it safe below the training SNR, needs a denoiser trained
across noise levels whose fixed points are the clean maps (a gradient-step or Jacobian-regularised
denoiser): the open research question of this method.

The default denoiser is the model shipped in ``fenics_red/data/denoiser.pt`` (trained by
``make denoiser``: see the README); any file written by ``fenics-red train`` can replace it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from mpi4py import MPI

from .forward import ElasticityModel, ForwardSettings
from .grid import ImageGrid
from .likelihood import StatisticalLikelihood
from .parallel import on_root
from .solvers import FixedPointSolver, MLSettings, measurement_from_sample

__all__ = ["REDSettings", "REDReconstructor", "default_denoiser_path", "load_denoiser",
           "setup_red", "setup_denoised_ml", "snr_warning", "training_snrs"]

_STARTS = ("denoised-ml", "ml", "homogeneous")


def default_denoiser_path() -> Path:
    """The shipped denoiser model (part of the package data)."""
    return Path(__file__).resolve().parent / "data" / "denoiser.pt"


def load_denoiser(path: str | Path | None = None):
    """A :class:`fenics_red.denoiser.Denoiser` from ``path`` (default: the shipped model)."""
    from .denoiser import Denoiser  # torch: imported only when a denoiser is needed

    path = default_denoiser_path() if path is None else Path(path)
    if not path.exists() and path == default_denoiser_path():
        raise FileNotFoundError(f"the shipped denoiser {str(path)!r} is missing from this "
                                "installation; train one with `make denoiser` or pass --denoiser")
    return Denoiser.load(path)


@dataclass(frozen=True)
class REDSettings:
    """Settings of the RED loop (the ML stage uses the default :class:`MLSettings`).

    Attributes:
        denoiser: model file (``None``: the shipped one).
        lam: the λ rule, as :func:`fenics_red.priors.parse_lambda_rule` reads it: a number,
            ``"paper:c"`` (λ = c‖∇g‖, equation 12), ``"balance:c"`` (λ = c‖∇g‖/‖E − C(E)‖) or
            ``"lipschitz:c"`` (λ = c L_g; the default, ``c = 0.001``). See the module docstring
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
            than its start is being pulled away by the prior (the divergence of the module
            docstring).
    """

    denoiser: str | None = None
    lam: str = "lipschitz:0.001"
    start: str = "denoised-ml"
    max_steps: int = 200
    steps_per_round: int = 20
    rtol: float = 1e-4
    solver: str = "pgd"
    step_scale: float = 1.0
    misfit_guard: bool = True

    def __post_init__(self):
        if self.start not in _STARTS:
            raise ValueError(f"REDSettings.start must be one of {_STARTS}, got {self.start!r}")
        from .priors import parse_lambda_rule

        parse_lambda_rule(self.lam, prior=object(), fidelity=object())  # spelling check only
        self.loop_settings()  # checks the numbers

    def loop_settings(self) -> MLSettings:
        """The :class:`MLSettings` of the RED loop."""
        return MLSettings(method=self.solver, stop="budget", max_steps=self.max_steps,
                          steps_per_round=self.steps_per_round, rtol=self.rtol,
                          step_scale=self.step_scale, misfit_guard=self.misfit_guard)

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
        self.denoiser = denoiser if denoiser is not None else load_denoiser(
            self.settings.denoiser)
        self.model = ElasticityModel.on_grid(grid, comm, forward or ForwardSettings())
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
        displacement, noise, truth = measurement_from_sample(sample)
        fid = self.likelihood
        fid.set_data(displacement, noise)
        E_ml, ml_history = self.ml.run(truth=truth)
        ml_image = fid.to_image(E_ml)
        denoised = self.denoise(ml_image)
        floor = self.ml_settings.floor * float(np.mean(ml_image))
        denoised = np.maximum(denoised, floor)
        info = {"ml_steps": int(ml_history.final["step"]), "ml_stop": ml_history.stop_reason,
                "ml_time": float(ml_history.final["time"])}
        if truth is not None:
            norm = np.linalg.norm(truth)
            info.update(ml_error=float(np.linalg.norm(ml_image - truth) / norm),
                        denoised_ml_error=float(np.linalg.norm(denoised - truth) / norm))
        if stages == "denoised-ml":
            history = {f"ml_{k}": v for k, v in ml_history.as_arrays().items()}
            info["time"] = info["ml_time"]
            return denoised, history, info
        start = {"denoised-ml": denoised, "ml": ml_image, "homogeneous": None}[
            self.settings.start]
        calls, seconds = self.prior.calls, self.prior.seconds
        E, history = self.red.run(start, truth=truth)
        estimate = fid.to_image(E)
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
        if stages == "denoised-ml":
            known = {"denoiser"}
            unknown = sorted(set(dict(options or {})) - known)
            if unknown:
                raise ValueError(f"method 'denoised-ml' has no option(s) {unknown}; accepted: "
                                 f"{sorted(known)} (the ML stage is the training recipe)")
        self.stages = stages
        self.red_settings = REDSettings.from_options(options, stages)
        self.reconstructor = REDReconstructor(grid, forward, self.red_settings, comm)

    @property
    def settings(self) -> dict:
        out = {"ml": self.reconstructor.ml_settings.to_dict(),
               "denoiser": str(self.red_settings.denoiser or default_denoiser_path()),
               "denoiser_card": _card_summary(self.reconstructor.denoiser)}
        if self.stages == "red":
            out["red"] = self.red_settings.to_dict()
        return out

    def run(self, sample):
        return self.reconstructor.run_sample(sample, self.stages)

    def check_data(self, data_settings) -> list[str]:
        """Warnings about a data set this method was not validated on (see :func:`snr_warning`)."""
        message = snr_warning(self.reconstructor.denoiser, getattr(data_settings, "snr_db", None),
                              self.stages)
        return [message] if message else []

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

    Measured with the shipped model (35 dB): at 25 dB one denoiser pass leaves the ML estimate as
    it is and RED makes it worse (module docstring, README results).
    """
    snrs = training_snrs(denoiser)
    if snr_db is None or not snrs or not math.isfinite(float(snr_db)):
        return None
    if float(snr_db) >= min(snrs) - SNR_MARGIN_DB:
        return None
    trained = ", ".join(f"{v:g}" for v in sorted(set(snrs)))
    return (f"the data ({float(snr_db):g} dB) are noisier than the denoiser's training data "
            f"({trained} dB): {method!r} was not validated there (the shipped model's RED drifts "
            "away from its start at 25 dB, see fenics_red/red.py); train a denoiser at this SNR "
            "(scripts/train-denoiser with SNRS=...) and pass it with --denoiser, or compare with "
            "--method ml")


def _card_summary(denoiser) -> dict:
    card = getattr(denoiser, "card", {}) or {}
    return {k: card[k] for k in ("created", "seed", "epochs", "best_epoch") if k in card}


def setup_red(grid, forward, comm, options=None) -> _Runner:
    """Factory of ``"red"`` (options: :class:`REDSettings` fields)."""
    return _Runner("red", grid, forward, comm, options)


def setup_denoised_ml(grid, forward, comm, options=None) -> _Runner:
    """Factory of ``"denoised-ml"`` (option: ``denoiser``)."""
    return _Runner("denoised-ml", grid, forward, comm, options)
