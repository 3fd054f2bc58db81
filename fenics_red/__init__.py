"""fenics-red: ultrasound elastography by regularisation by denoising on a DOLFINx forward model.

The flat public API. torch and pyvista are imported only by the modules that need them.
"""

from importlib.metadata import PackageNotFoundError, version

from .forward import ElasticityModel, ForwardSettings, simulate_displacement
from .grid import ImageGrid, NodalImage, validate_image

try:
    __version__ = version("fenics-red")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["ElasticityModel", "ForwardSettings", "ImageGrid", "NodalImage", "__version__",
           "simulate_displacement", "validate_image"]
