"""Registry of reconstruction methods: one name, one entry per method, everything else generic.

A *method* turns a data set sample (measured displacements, noise levels) into a modulus image.
Everything that reconstructs data set samples (``fenics-red reconstruct``, ``evaluate``,
``demo``) goes through this registry, so every method is used the same way::

    method = get_method("ml")
    options = method.options({"max_steps": 200})     # validated settings dataclass
    runner = method.setup(grid, forward_settings, comm, options)
    try:
        estimate, history, info = runner.run(sample)
    finally:
        runner.destroy()

A :class:`Method` entry declares, and the command line only loops over the entries:

* ``setup(grid, forward_settings, comm, options) -> runner``, the factory (below);
* ``options(overrides) -> settings``: the method's options as a small validated frozen dataclass
  (:class:`~fenics_red.solvers.MLSettings`, :class:`~fenics_red.red.REDSettings`,
  :class:`~fenics_red.gauss_newton.GaussNewtonSettings`, ...) built from a mapping of overrides
  (or returned as is when it already is one). Unknown keys and bad values raise ``ValueError``
  naming the method and the accepted keys. ``options(settings.to_dict()) == settings``;
* ``flags``: its command-line flags (:class:`Flag`). A flag shared by several methods is one
  object listed by each of them; the command line adds each flag once, in an argument group per
  set of methods that share it (:func:`argument_groups`), and reports a flag given to a method
  that does not list it. :meth:`Method.options_from_args` turns parsed arguments into overrides.

Option names are the settings' field names plus, by convention, the generic ``max_steps``,
``stop`` and ``solver`` (the iteration: ``"fista"``/``"pgd"``), which a method maps to its own
fields (``ml``: ``solver`` → ``method``; ``gn-*``: ``max_steps`` → ``max_iterations``). The
options ``uncertainty`` and ``uncertainty_rank`` (flags ``--uncertainty``,
``--uncertainty-rank``) are not the method's: :func:`split_uncertainty` takes them off before
``options()``/``setup()`` see the rest, and the driver (:func:`fenics_red.reconstruction.
run_method`) wraps the runner in :class:`fenics_red.uncertainty.UncertaintyRunner` (``ml`` and
``gn-tikhonov`` only).

The runner contract (see :class:`Runner`):

* ``setup(grid, forward_settings, comm, options) -> runner`` builds the method's objects once for
  one grid and forward model (meshes, matrices, solvers, networks), distributed over ``comm``.
  ``options`` is what ``options()`` accepts (a mapping of overrides, or the settings).
* ``runner.options`` is the validated settings dataclass.
* ``runner.run(sample)`` (collective on ``comm``) returns ``(estimate, history, info)``: the
  estimate in the data's layout on every rank (an image ``(ny+1, nx+1)`` on grids, one value per
  node ``(N,)`` on meshes); ``history``, a dict of 1-D numpy arrays
  (one per column; lengths may differ between columns, e.g. per-iterate and per-refresh
  records); ``info``, a dict of JSON-able scalars (stop reason, steps, time, ...).
* ``runner.settings`` is the JSON-able dict of the method's full settings (defaults included):
  it is stored beside every estimate, because for early-stopped estimators the settings are part
  of the estimate's definition.
* ``runner.destroy()`` frees the PETSc objects (collective).
* Optionally, ``runner.check_data(data_settings) -> list[str]``: warnings about a data set the
  method was not validated on (RED: data noisier than the denoiser's training SNR);
  :func:`warn_about_data` emits them.

Adding a method: in its own module write the settings dataclass (validated in
``__post_init__``, with ``to_dict``), an ``options(overrides)`` function, a runner class (``run``,
``options``, ``settings``, ``destroy``) and a ``setup`` function; then add one entry
``"name": Method(_lazy(module, "setup_x"), _lazy(module, "x_options"), "one-line description",
flags=(...))`` to :data:`METHODS`, reusing the :class:`Flag` objects of options it shares with
other methods. ``tests/test_methods.py`` then runs it on a phantom, serially and on 2 ranks.
Entries import their module on first use (:func:`_lazy`), and heavy dependencies (torch) are
imported only when a runner needs them: building the command line imports no method module.
"""

from __future__ import annotations

import argparse
import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mpi4py import MPI

import numpy as np

from . import validation
from .forward import ForwardSettings
from .raster import ImageGrid

__all__ = ["Flag", "Method", "Runner", "METHODS", "DEFAULT_METHOD", "get_method", "method_names",
           "flag_users", "argument_groups", "name_methods", "warn_about_data",
           "split_uncertainty", "check_options"]


def warn_about_data(runner, data_settings, comm: MPI.Comm) -> None:
    """Emit, on rank 0 of ``comm``, the runner's ``check_data`` warnings (if it has the hook)."""
    check_data = getattr(runner, "check_data", None)
    if comm.rank == 0 and check_data is not None:
        for message in check_data(data_settings):
            warnings.warn(message, UserWarning, stacklevel=3)


@runtime_checkable
class Runner(Protocol):
    """What :attr:`Method.setup` returns (see the module docstring)."""

    options: Any
    settings: dict

    def run(self, sample) -> tuple[np.ndarray, dict[str, np.ndarray], dict]: ...

    def destroy(self) -> None: ...


@dataclass(frozen=True, eq=False)
class Flag:
    """A command-line flag that sets one option (the same object for every method that takes it).

    Attributes:
        name: the flag, ``"--lam"``; its ``argparse`` destination is the name without dashes.
        option: the option it sets, ``"lam"``.
        help: the help line.
        kwargs: further keywords of ``add_argument`` (``type``, ``choices``, ``metavar``,
            ``action``).
        convert: the parsed value -> the option value, ``None`` when the flag was not given (the
            default: the parsed value itself, ``None`` when absent); may raise ``ValueError``.
    """

    name: str
    option: str
    help: str
    kwargs: Mapping = field(default_factory=dict)
    convert: Callable[[Any], Any] | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    def add_to(self, parser) -> None:
        """Add the flag to an ``argparse`` parser or argument group."""
        parser.add_argument(self.name, dest=self.dest, help=self.help, **self.kwargs)

    def value(self, args: argparse.Namespace):
        """The option value the user gave with this flag, ``None`` when not given."""
        parsed = getattr(args, self.dest, None)
        return self.convert(parsed) if self.convert is not None else parsed


@dataclass(frozen=True)
class Method:
    """A registry entry (see the module docstring).

    Attributes:
        setup: ``setup(grid, forward_settings, comm, options) -> Runner``.
        options: ``options(overrides: Mapping | settings | None) -> settings``: the method's
            validated settings dataclass.
        description: one help line.
        flags: the method's command-line flags.
    """

    setup: Callable[[ImageGrid, ForwardSettings, MPI.Comm, Mapping | Any | None], Runner]
    options: Callable[[Mapping | Any | None], Any]
    description: str
    flags: tuple[Flag, ...] = ()

    def options_from_args(self, args: argparse.Namespace) -> dict:
        """The overrides of this method's options given on the command line (its flags only)."""
        given = {}
        for flag in self.flags:
            value = flag.value(args)
            if value is not None:
                given[flag.option] = value
        return given


def _lazy(module: str, name: str) -> Callable:
    """``fenics_red.<module>.<name>``, imported when first called (keeps imports light)."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"fenics_red.{module}"), name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``fenics_red.{module}.{name}``, imported on first use."
    return call


# -- command-line flags, shared by the methods that list them -------------------------------------

def _positive_steps(value: int | None) -> int | None:
    return None if value is None else validation.budget(value, "--max-steps")


MAX_STEPS = Flag("--max-steps", "max_steps", "budget of iterations (default: the method's)",
                 {"type": int, "metavar": "N"}, _positive_steps)
STOP = Flag("--stop", "stop", "stopping rule: the discrepancy principle (misfit reaches the "
            "number of free equations, or the budget) or the budget alone (default: the "
            "method's)", {"choices": ["discrepancy", "budget"]})
SOLVER = Flag("--solver", "solver", "iteration: monotone FISTA, projected gradient descent, "
              "(red only) the fixed-point form with inner conjugate gradients, or (ml only) "
              "conjugate gradients with Γ frozen, or auto: conjugate gradients on data of 50 dB "
              "or more, FISTA below (default: the method's; ml: auto)",
              {"choices": ["fista", "pgd", "cg", "fixed-point", "auto"]})
DENOISER = Flag("--denoiser", "denoiser", "denoiser model from 'fenics-red train' (default: the "
                "shipped one)", {"metavar": "MODEL.pt"})
NO_FLIP_AVERAGE = Flag("--no-flip-average", "flip_average", "apply the denoiser as it is, not "
                       "averaged over left-right flips", {"action": "store_true"},
                       lambda given: False if given else None)
LAM = Flag("--lam", "lam", "RED weight: a number, paper:C (eq. 12), balance:C or lipschitz:C "
           "(default: the method's)", {"metavar": "RULE"})
START = Flag("--start", "start", "RED's initial modulus (default denoised-ml)",
             {"choices": ["denoised-ml", "ml", "homogeneous"]})
PIXEL = Flag("--pixel", "pixel", "pixel size of the image the denoiser sees on a mesh, in the "
             "mesh's length unit (default: its mean node spacing)", {"type": float,
                                                                     "metavar": "H"})
MIN_MISFIT_DECREASE = Flag(
    "--min-misfit-decrease", "min_misfit_decrease", "RED stops at the first round that lowers "
    "the data misfit by less than C standard deviations sqrt(2n) and keeps the iterate before "
    "it (default 1; 0 turns it off)", {"type": float, "metavar": "C"})

TAU = Flag("--tau", "discrepancy_tau", "Gauss-Newton's discrepancy target: alpha is chosen so "
           "that the weighted residual is TAU times the expected noise energy (default 1)",
           {"type": float, "metavar": "TAU"})
GN_PRECONDITIONER = Flag(
    "--gn-preconditioner", "preconditioner", "preconditioner of Gauss-Newton's inner CG: the "
    "regulariser's Hessian (plus the misfit's mean diagonal), none, or auto: the regulariser "
    "for gn-tv in 2-D, none for gn-tikhonov and in 3-D (default auto)",
    {"choices": ["auto", "none", "regulariser"]})
TV_DELTA = Flag("--tv-delta", "tv_delta", "smoothing of the total variation, relative to the "
                "initial modulus over the domain's extent (default 0.1)",
                {"type": float, "metavar": "DELTA"})


UNCERTAINTY = Flag(
    "--uncertainty", "uncertainty", "also write the posterior standard deviation map 'std' "
    "beside the estimate (low-rank Laplace approximation; docs/uncertainty.md)",
    {"action": "store_true"}, lambda given: True if given else None)
UNCERTAINTY_RANK = Flag(
    "--uncertainty-rank", "uncertainty_rank", "eigenpairs of the data-misfit Hessian kept for "
    "--uncertainty (default 200; too few over-state the standard deviation)",
    {"type": int, "metavar": "K"},
    lambda value: None if value is None else validation.integer(value, "--uncertainty-rank",
                                                                low=1))


#: The registered methods, by name, in the order of the paper's comparison (tables, figures, the
#: demo). Iterating over it is how the command line learns about methods.
METHODS: dict[str, Method] = {
    "gn-tikhonov": Method(_lazy("gauss_newton", "setup_gn_tikhonov"),
                          _lazy("gauss_newton", "gn_tikhonov_options"),
                          "Gauss-Newton-CG, output error, Tikhonov (gradient) regulariser, alpha "
                          "by the discrepancy principle (classical baseline)",
                          flags=(MAX_STEPS, TAU, GN_PRECONDITIONER, UNCERTAINTY,
                                 UNCERTAINTY_RANK)),
    "gn-tv": Method(_lazy("gauss_newton", "setup_gn_tv"), _lazy("gauss_newton", "gn_tv_options"),
                    "Gauss-Newton-CG, output error, smoothed total variation, alpha by the "
                    "discrepancy principle (classical baseline)",
                    flags=(MAX_STEPS, TAU, GN_PRECONDITIONER, TV_DELTA)),
    "ml": Method(_lazy("solvers", "setup_ml"), _lazy("solvers", "ml_options"),
                 "maximum-likelihood estimate (statistical model, no prior, early stopped; the "
                 "denoiser's training input)",
                 flags=(MAX_STEPS, STOP, SOLVER, UNCERTAINTY, UNCERTAINTY_RANK)),
    "denoised-ml": Method(_lazy("red", "setup_denoised_ml"), _lazy("red", "denoised_ml_options"),
                          "the denoiser applied once to the ML estimate (RED's yardstick)",
                          flags=(DENOISER, NO_FLIP_AVERAGE, PIXEL)),
    "red": Method(_lazy("red", "setup_red"), _lazy("red", "red_options"),
                  "regularisation by denoising: the statistical likelihood with the learned "
                  "prior, started from denoised-ml",
                  flags=(MAX_STEPS, SOLVER, DENOISER, LAM, START, MIN_MISFIT_DECREASE,
                         NO_FLIP_AVERAGE, PIXEL)),
}

#: The method of ``fenics-red reconstruct`` when none is named.
DEFAULT_METHOD = "ml"


def flag_users() -> dict[Flag, tuple[str, ...]]:
    """Every flag of the registry and the names of the methods that list it, in registry order;
    ``RuntimeError`` when two different flags have the same name."""
    users: dict[Flag, list[str]] = {}
    names: dict[str, Flag] = {}
    for method_name, method in METHODS.items():
        for flag in method.flags:
            if names.setdefault(flag.name, flag) is not flag:
                raise RuntimeError(f"two different flags {flag.name} in the method registry; "
                                   "methods that share an option must share its Flag")
            users.setdefault(flag, []).append(method_name)
    return {flag: tuple(names) for flag, names in users.items()}


def argument_groups() -> list[tuple[str, list[Flag]]]:
    """The registry's flags grouped by the methods that take them: ``(title, flags)`` pairs, one
    ``argparse`` argument group each, in registry order."""
    groups: dict[tuple[str, ...], list[Flag]] = {}
    for flag, users in flag_users().items():
        groups.setdefault(users, []).append(flag)
    return [(f"options of {name_methods(users, article=False)}", flags)
            for users, flags in groups.items()]


def name_methods(names: Sequence[str], article: bool = True) -> str:
    """``"the method red"``, ``"the methods denoised-ml and red"``, ``"the methods a, b and c"``
    (without ``"the method(s)"`` when ``article`` is false)."""
    names = list(names)
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if not article:
        return text
    return f"the method {text}" if len(names) == 1 else f"the methods {text}"


def method_names() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(METHODS)


def get_method(name: str) -> Method:
    """The registry entry ``name``; ``ValueError`` listing the registered names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reconstruction method {name!r}; choose from "
                         f"{method_names()}") from None


def check_options(name: str, options: Mapping | None) -> None:
    """Validate the overrides ``options`` of method ``name`` as its settings do (the uncertainty
    options taken off first), before any work: a bad value is a one-line ``ValueError``."""
    own, _ = split_uncertainty(name, options)
    get_method(name).options(own)


def split_uncertainty(name: str, options: Mapping | Any | None):
    """``(the method's own options, UncertaintySettings or None)``: the options ``uncertainty``
    and ``uncertainty_rank`` taken off a mapping of overrides (a settings dataclass passes as it
    is, without a map). ``ValueError`` (one line) for a method without an uncertainty map or bad
    uncertainty settings. See :func:`fenics_red.uncertainty.uncertainty_options`."""
    if options is not None and not isinstance(options, Mapping):
        return options, None
    if not options or not ({"uncertainty", "uncertainty_rank"} & set(options)):
        return options, None
    from .uncertainty import uncertainty_options

    return uncertainty_options(name, options)
