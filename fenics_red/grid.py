"""Former name of :mod:`fenics_red.raster` (kept while callers move over)."""

from .raster import ImageGrid, NodalImage, validate_image

__all__ = ["ImageGrid", "NodalImage", "validate_image"]
