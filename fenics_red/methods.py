"""Registry of reconstruction methods: one name, one factory, one dict entry per method.

A *method* turns a data set sample (measured displacements, noise levels) into a modulus image.
Everything that reconstructs many samples (``fenics-red reconstruct``, the training-set builder,
the benchmarks) goes through this registry, so every method is used the same way::

    runner = get_method("ml").setup(grid, forward_settings, comm, {"max_steps": 200})
    try:
        estimate, history, info = runner.run(sample)
    finally:
        runner.destroy()

The contract (see :class:`Runner`):

* ``setup(grid, forward_settings, comm, options) -> runner`` builds the method's objects once for
  one grid and forward model (meshes, matrices, solvers, networks), distributed over ``comm``.
  ``options`` is a mapping of overrides of the method's settings; unknown keys and bad values
  raise ``ValueError`` naming the accepted ones. The command line passes the generic keys
  ``max_steps``, ``stop`` and ``solver`` (the iteration: ``"fista"``/``"pgd"``) when the user
  gives them; a method maps them to its own settings or rejects them.
* ``runner.run(sample)`` (collective on ``comm``) returns ``(estimate, history, info)``: the
  estimate as an image ``(ny+1, nx+1)`` on every rank; ``history``, a dict of 1-D numpy arrays
  (one per column; lengths may differ between columns, e.g. per-iterate and per-refresh
  records); ``info``, a dict of JSON-able scalars (stop reason, steps, time, ...).
* ``runner.settings`` is the JSON-able dict of the method's full settings (defaults included):
  it is stored beside every estimate, because for early-stopped estimators the settings are part
  of the estimate's definition.
* ``runner.destroy()`` frees the PETSc objects (collective).
* Optionally, ``runner.check_data(data_settings) -> list[str]``: warnings about a data set the
  method was not validated on (RED: data noisier than the denoiser's training SNR);
  :func:`warn_about_data` emits them.

Adding a method (e.g. ``"gn-tikhonov"``, ``"gn-tv"``, ``"denoised-ml"``, ``"red"``): write a
runner class with ``run``, ``settings`` and ``destroy`` and a ``setup`` function, then add one
entry ``"name": Method(setup, "one-line description")`` to :data:`METHODS`. Import heavy
dependencies (torch) inside ``setup``, never at module level: ``import fenics_red`` must stay
light.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from mpi4py import MPI

from .forward import ForwardSettings
from .grid import ImageGrid

__all__ = ["Method", "Runner", "METHODS", "get_method", "method_names", "MLRunner", "setup_ml",
           "warn_about_data"]


def warn_about_data(runner, data_settings, comm: MPI.Comm) -> None:
    """Emit, on rank 0 of ``comm``, the runner's ``check_data`` warnings (if it has the hook)."""
    check_data = getattr(runner, "check_data", None)
    if comm.rank == 0 and check_data is not None:
        for message in check_data(data_settings):
            warnings.warn(message, UserWarning, stacklevel=3)


@runtime_checkable
class Runner(Protocol):
    """What :attr:`Method.setup` returns (see the module docstring)."""

    settings: dict

    def run(self, sample) -> tuple[np.ndarray, dict[str, np.ndarray], dict]: ...

    def destroy(self) -> None: ...


@dataclass(frozen=True)
class Method:
    """A registry entry: ``setup(grid, forward_settings, comm, options) -> Runner``, a help line."""

    setup: Callable[[ImageGrid, ForwardSettings, MPI.Comm, Mapping], Runner]
    description: str


# -- "ml": the maximum-likelihood (unregularised, early-stopped) estimate ------------------------

#: Generic command-line option names and the :class:`~fenics_red.solvers.MLSettings` fields.
_ML_GENERIC = {"solver": "method", "max_steps": "max_steps", "stop": "stop"}


class MLRunner:
    """The ``"ml"`` method: :class:`fenics_red.solvers.MLReconstructor` behind the runner API."""

    def __init__(self, grid: ImageGrid, forward: ForwardSettings, comm: MPI.Comm,
                 options: Mapping | None = None):
        from .solvers import MLReconstructor, MLSettings

        values = MLSettings().to_dict()
        for key, value in dict(options or {}).items():
            field = _ML_GENERIC.get(key, key)
            if field not in values:
                accepted = sorted(set(values) | set(_ML_GENERIC))
                raise ValueError(f"method 'ml' has no option {key!r}; accepted: {accepted}")
            values[field] = value
        self.ml_settings = MLSettings.from_dict(values)
        self.reconstructor = MLReconstructor(grid, forward, self.ml_settings, comm)

    @property
    def settings(self) -> dict:
        return self.ml_settings.to_dict()

    def run(self, sample) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        estimate, history = self.reconstructor.run_sample(sample)
        return estimate, history.as_arrays(), history.summary()

    def destroy(self) -> None:
        self.reconstructor.destroy()


def setup_ml(grid: ImageGrid, forward: ForwardSettings, comm: MPI.Comm,
             options: Mapping | None = None) -> MLRunner:
    """Factory of the ``"ml"`` method (options: :class:`~fenics_red.solvers.MLSettings` fields,
    or the generic ``solver``/``max_steps``/``stop``)."""
    return MLRunner(grid, forward, comm, options)


def _lazy(module: str, name: str) -> Callable:
    """A factory imported from ``fenics_red.<module>`` when first called (keeps imports light)."""
    def setup(grid, forward, comm, options=None):
        import importlib

        return getattr(importlib.import_module(f"fenics_red.{module}"), name)(
            grid, forward, comm, options)
    setup.__name__ = name
    return setup


#: The registered methods, by name (one entry per method).
METHODS: dict[str, Method] = {
    "gn-tikhonov": Method(_lazy("gauss_newton", "setup_gn_tikhonov"),
                          "Gauss-Newton-CG, output error, Tikhonov (gradient) regulariser, alpha "
                          "by the discrepancy principle (classical baseline)"),
    "gn-tv": Method(_lazy("gauss_newton", "setup_gn_tv"),
                    "Gauss-Newton-CG, output error, smoothed total variation, alpha by the "
                    "discrepancy principle (classical baseline)"),
    "ml": Method(setup_ml, "maximum-likelihood estimate (statistical model, no prior, early "
                           "stopped; the denoiser's training input)"),
    "denoised-ml": Method(_lazy("red", "setup_denoised_ml"),
                          "the denoiser applied once to the ML estimate (RED's yardstick)"),
    "red": Method(_lazy("red", "setup_red"),
                  "regularisation by denoising: the statistical likelihood with the learned "
                  "prior, started from denoised-ml"),
}


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
