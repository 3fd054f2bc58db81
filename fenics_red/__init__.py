"""fenics-red: ultrasound elastography by regularisation by denoising on a DOLFINx forward model.

The flat public API, imported on first use (PEP 562): ``import fenics_red`` itself needs neither
DOLFINx nor torch, so that the denoiser's training (:mod:`fenics_red.training`, ``python -m
fenics_red.cli.train``) runs on a GPU node that has torch but no FEniCSx stack.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

from . import threads as _threads

_threads.set_thread_environment()  # before NumPy loads OpenBLAS when imported first; N ranks
# of mpirun -n N python script.py share the node's CPUs

try:
    __version__ = version("fenics-red")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

#: Public name -> module that defines it.
_EXPORTS = {"ElasticityModel": "forward", "ForwardSettings": "forward",
            "simulate_displacement": "forward", "Domain": "domain", "MeshArrays": "domain",
            "ImageGrid": "raster", "NodalImage": "raster", "PointRaster": "raster",
            "ValueRaster": "raster", "raster_for": "raster", "validate_image": "raster"}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
