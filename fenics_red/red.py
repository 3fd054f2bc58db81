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

Choice of λ and of the stopping rule (``demos/red_lambda_rules.py``, one call per SNR, with the
shipped denoiser, on validation sets of 16 phantoms at 64², seed 5000, used neither in training
nor in ``make paper``; mean relative error; in brackets the median λ / L_g of the paper's rule).
With the defaults (denoiser averaged over left-right flips, see :mod:`fenics_red.denoiser`):

============================== ================ ================ ================
                               25 dB            35 dB            45 dB
============================== ================ ================ ================
ml                             0.4194           0.3805           0.3285
denoised-ml (RED's start)      0.2644           0.1929           0.1643
0.001 L_g (the default)        0.2643           0.1925           0.1639
0.01 L_g                       0.2646           0.1924           0.1637
paper (12), c = 1              0.2658 (6.4e-3)  0.1927 (9.6e-4)  0.1638 (9.3e-4)
============================== ================ ================ ================

A wider sweep, made first, with the same network not averaged over flips (``flip_average=False``):

============================== ================ ================ ================
                               25 dB            35 dB            45 dB
============================== ================ ================ ================
denoised-ml                    0.2680           0.1998           0.1672
paper (12), c = 1              0.2689 (6.0e-3)  0.1996 (1.0e-3)  0.1667 (8.8e-4)
0.001 L_g                      0.2677           0.1993           0.1667
0.003 L_g                      0.2678           0.1992           0.1667
0.01 L_g                       0.2681           0.1992           0.1665
0.03 L_g                       0.2693           0.1996           0.1669
0.1 L_g                        0.2695           0.2016           0.1683
0.001 L_g without the          0.2718           0.1992           0.1667
significance stop
============================== ================ ================ ================

Projected gradient steps, 20 per refresh of ``Γ``, at most 200. What the tables say:

* **The denoiser does the work.** One pass takes the ML estimate's error down by 37 %, 49 % and
  50 %; the RED loop then changes it by −0.4 % to +0.1 % at weights up to 0.01 L_g. Weights of
  0.03 L_g and above make it worse at every SNR: iterated, any denoiser pulls towards its own
  fixed points, which are close to, but not, the clean maps (five passes over a clean map move
  it by 1.5 %; the model card's ``clean_drift_5``). The paper's rule (12) gives about 1e-3 L_g at
  35 and 45 dB, i.e. the default, and six times more at 25 dB, where ``‖∇g‖`` grows with the
  noise: a little worse there.
* **Why the stopping rule.** With a small weight the loop is nearly the data term's gradient
  descent from the denoised start. Where the data are noisy that descent keeps lowering the misfit
  by amounts smaller than its own noise (one standard deviation of a χ²_n misfit is ``√(2n)``,
  about 1.6 % of ``n``) while adding texture: at 25 dB the error crept up round after round (0.2680
  → 0.2718 in 200 steps; with the previous, 35 dB-only model 0.42 → 0.44). The rule
  :attr:`REDSettings.min_misfit_decrease` ends the loop at the first round that lowers the misfit
  by less than ``√(2n)`` and keeps the iterate before it: 14 of 16 runs at 25 dB end there after
  one or two rounds, at 35 dB all 16 (the loop's later rounds were below the noise there too), at
  45 dB only 1 of 16 (the others reach a fixed point first). Where the data still carry
  information it changes nothing (35 and 45 dB: within 1e-4, second table).
* **Guards.** Large weights with the previous model (λ = L_g) let stiff spots run away (one 35 dB
  phantom ended at max/median 283, the truth's is 5.4), where the displacement is insensitive to
  the modulus; the misfit guard (:attr:`REDSettings.misfit_guard`) stops a run whose misfit rises
  above its start's (2 of 16 at 25 dB and 1 of 16 at 45 dB with the default weight).

The previous shipped model, trained on 35 dB pairs only, gave denoised-ml errors of 0.423, 0.202
and 0.222 on the same sets: one pass left 25 dB estimates as they were and RED then drifted
(0.42 → 0.44 with 0.001 L_g, 0.63 with the paper's rule). Training across SNRs (25, 35 and 45 dB
pairs) fixed the first (0.268) and the stopping rule the second. That RED adds so little to one
pass is the finding, not a tuning gap: with these data and this denoiser, the physics loop only
confirms the denoised estimate. Phantoms unlike the training ones do not change that (35 dB,
16 phantoms each, seed 6000, ``fenics-red simulate --samples 16 --grid 64 --snr 35 --seed 6000``
with the option in brackets, then ``reconstruct --all`` with each method; mean relative error of
ml / denoised-ml / red): the training recipe 0.423 / 0.1957 / 0.1954, soft edges
(``--soft-edge 3``) 0.379 / 0.1442 / 0.1437, 5-8 inclusions (``--inclusions 5 8``) 0.513 /
0.2675 / 0.2666, a sliding bottom (``--support sliding``) 0.432 / 0.2099 / 0.2095, one or two
large inclusions (``--max-size 0.5 --inclusions 1 2``) 0.376 / 0.1875 / 0.1868. RED is below
its start on 77 of the 80 phantoms and above it on none, by 0.2-0.4 %. A loop that adds more
than a denoiser pass needs a prior with a true potential (a gradient-step denoiser), not tried.

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


def load_denoiser(path: str | Path | None = None, flip_average: bool = True):
    """A :class:`fenics_red.denoiser.Denoiser` from ``path`` (default: the shipped model),
    averaged over left-right flips unless ``flip_average`` is false."""
    from .denoiser import Denoiser  # torch: imported only when a denoiser is needed

    path = default_denoiser_path() if path is None else Path(path)
    if not path.exists() and path == default_denoiser_path():
        raise FileNotFoundError(f"the shipped denoiser {str(path)!r} is missing from this "
                                "installation; train one with `make denoiser` or pass --denoiser")
    return Denoiser.load(path, flip_average=flip_average)


@dataclass(frozen=True)
class REDSettings:
    """Settings of the RED loop (the ML stage uses the default :class:`MLSettings`).

    Attributes:
        denoiser: model file (``None``: the shipped one).
        flip_average: average the denoiser over left-right flips (see
            :mod:`fenics_red.denoiser`; measured better at every SNR of the validation sets).
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
        min_misfit_decrease: stop when a round lowers the misfit (at the refreshes of ``Γ``) by
            less than this many of its standard deviations ``√(2n)``, and keep the iterate
            before that round (:attr:`MLSettings.min_misfit_decrease`): such a round fits the
            noise, not the modulus (the slow drift below the training SNR, module docstring).
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

    def __post_init__(self):
        if not isinstance(self.flip_average, bool):
            raise ValueError(f"REDSettings.flip_average must be True or False, got "
                             f"{self.flip_average!r}")
        if self.start not in _STARTS:
            raise ValueError(f"REDSettings.start must be one of {_STARTS}, got {self.start!r}")
        from .priors import parse_lambda_rule

        parse_lambda_rule(self.lam, prior=object(), fidelity=object())  # spelling check only
        self.loop_settings()  # checks the numbers

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
            self.settings.denoiser, self.settings.flip_average)
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
            known = {"denoiser", "flip_average"}
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
               "flip_average": self.red_settings.flip_average,
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

    Measured with a model trained at 35 dB alone: at 25 dB one denoiser pass left the ML estimate
    as it was and RED made it worse (module docstring).
    """
    snrs = training_snrs(denoiser)
    if snr_db is None or not snrs or not math.isfinite(float(snr_db)):
        return None
    if float(snr_db) >= min(snrs) - SNR_MARGIN_DB:
        return None
    trained = ", ".join(f"{v:g}" for v in sorted(set(snrs)))
    return (f"the data ({float(snr_db):g} dB) are noisier than the denoiser's training data "
            f"({trained} dB): {method!r} was not validated there (a model trained at 35 dB alone "
            "did not improve 25 dB estimates, see fenics_red/red.py); train a denoiser at this SNR "
            "(scripts/train-denoiser with SNRS=...) and pass it with --denoiser, or compare with "
            "--method ml")


def _card_summary(denoiser) -> dict:
    card = getattr(denoiser, "card", {}) or {}
    return {k: card[k] for k in ("created", "seed", "epochs", "best_epoch") if k in card}


def setup_red(grid, forward, comm, options=None) -> _Runner:
    """Factory of ``"red"`` (options: :class:`REDSettings` fields)."""
    return _Runner("red", grid, forward, comm, options)


def setup_denoised_ml(grid, forward, comm, options=None) -> _Runner:
    """Factory of ``"denoised-ml"`` (options: ``denoiser``, ``flip_average``)."""
    return _Runner("denoised-ml", grid, forward, comm, options)
