"""Synthetic modulus phantoms: stiff inclusions in a soft background (paper, section 5).

The paper builds its ground truths from 540 mask images, each inclusion with a normalised modulus
drawn uniformly from [0.3, 0.8] in a background drawn uniformly from [0.10, 0.15] (the unit of its
colour bars is 100 kPa), so that the inclusion-to-background stiffness ratio lies in [2, 8]. This
module makes such phantoms in two ways:

* :func:`random_phantom`: one to several inclusions of random shape (circles, axis-aligned
  ellipses, rotated ellipses, smooth random blobs, polygons) with sizes from a few cells to a third
  of the field;
* on a 3-D grid (:attr:`~fenics_red.raster.ImageGrid.nz` > 0) the same names draw solids in
  physical coordinates: spheres, axis-aligned and rotated ellipsoids, smooth star-shaped blobs and
  convex polyhedra (``"polygon"``), with the same size law, margins, gaps and soft edges;
* :func:`mask_phantom`: the inclusions of a user's mask image (PNG or ``.npy``, any resolution),
  resized to the grid, each connected component an inclusion (:func:`load_mask_folder` reads a
  folder of them).

Both return ``(E, labels)``: ``E`` a float64 image of nodal moduli of shape ``(ny+1, nx+1)`` and
``labels`` an ``int32`` image of the same shape with 0 in the background and ``k = 1..K`` on the
nodes of inclusion ``k`` (the inclusion mask is ``labels > 0``). Images follow the convention of
:mod:`fenics_red.raster` (row 0 is the transducer edge ``y = H``).

With a soft edge the modulus ramps smoothly (a smoothstep over ``soft_edge`` cells centred on the
inclusion boundary) from the background to the inclusion value; the labels mark the nodes where the
ramp is past its midpoint, which are exactly the nodes inside the sharp shape. Every modulus value
is a convex combination of the background and inclusion values, so the bounds always hold.

Everything is deterministic given a :class:`numpy.random.Generator`: the same generator state gives
the same phantom, bit for bit, on any machine and any number of MPI ranks (no MPI is involved).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from . import validation
from .raster import ImageGrid

__all__ = ["SHAPES", "PhantomSettings", "random_phantom", "mask_phantom", "compose_phantom",
           "inclusion_weight", "read_mask", "resize_mask", "mask_files", "load_mask_folder",
           "MASK_SUFFIXES"]

#: Shapes of :func:`random_phantom`.
SHAPES = ("circle", "ellipse", "rotated_ellipse", "blob", "polygon")

#: Families of random phantoms (:attr:`PhantomSettings.family`, ``simulate --family``). Every
#: family draws its moduli from the settings' ``background`` and ``inclusion`` ranges; all but
#: ``inclusions`` draw a soft edge per phantom, uniform in [0, 3] cells (``soft_edge`` > 0 fixes
#: it), and place regions that may touch each other and the field's edges.
FAMILIES = {
    "inclusions": "the paper's: inclusions of the settings' shapes in a uniform background",
    "textured": "the paper's inclusions in a textured background and with texture inside (a "
                "smooth random field of 5-25 % amplitude, 2 cells to a fifth of the field)",
    "gradient": "the paper's inclusions, the whole field scaled by a smooth stiffness gradient "
                "(up to 2:1 across it, any direction)",
    "field": "irregular inclusions: where a smooth random field exceeds a level (10-40 % of the "
             "field), each connected part one inclusion",
    "voronoi": "a random Voronoi partition of 4 to 16 cells, each cell inclusion or background "
               "at even odds: polygons that touch",
    "layers": "two to four layers with wavy boundaries below a background layer, each its own "
              "modulus, and one elliptic inclusion",
    "rings": "one to four annular inclusions: a stiff shell of a third to two thirds of the "
             "radius around a core of background modulus",
}

#: Families the shipped denoisers may be trained on; the others are kept out of training to
#: measure how the learned prior does on shapes it never saw (validation: ``layers``; tests:
#: ``voronoi`` and ``rings``).
TRAINING_FAMILIES = ("inclusions", "textured", "gradient", "field")
HELD_OUT_FAMILIES = ("layers", "voronoi", "rings")

#: File types of mask images.
MASK_SUFFIXES = (".png", ".npy")

_MAX_TRIES = 200  # placements tried per inclusion before giving up on it


@dataclass(frozen=True)
class PhantomSettings:
    """How random phantoms are drawn (paper, section 5; defaults follow the paper).

    Attributes:
        background: range of the uniform background modulus (normalised units, 1 = 100 kPa).
        inclusion: range of the uniform modulus of each inclusion (drawn independently per
            inclusion).
        n_inclusions: inclusive range of the number of inclusions of :func:`random_phantom`
            (between MIN and the drawn number are placed when the field has no room left for
            more; a field without room for MIN is an error that says how many fit).
        shapes: shapes to draw from, uniformly (a subset of :data:`SHAPES`).
        min_size: smallest inclusion diameter, in cells ("a few cells").
        max_size: largest inclusion diameter as a fraction of the field's shorter side (a third).
            Diameters are drawn log-uniformly between the two, so small and large inclusions are
            equally common.
        max_aspect: largest ratio of the long to the short axis of ellipses.
        soft_edge: width of the smooth transition at inclusion edges, in cells (0: sharp edges).
        overlap: whether inclusions may overlap (later ones are drawn over earlier ones); by
            default they keep at least one cell (plus the soft edge) apart.
        family: what :func:`random_phantom` draws, a key of :data:`FAMILIES` (the paper's
            ``"inclusions"`` by default; the others use the ranges above, see there).
    """

    background: tuple[float, float] = (0.10, 0.15)
    inclusion: tuple[float, float] = (0.30, 0.80)
    n_inclusions: tuple[int, int] = (1, 4)
    shapes: tuple[str, ...] = SHAPES
    min_size: float = 3.0
    max_size: float = 1.0 / 3.0
    max_aspect: float = 3.0
    soft_edge: float = 0.0
    overlap: bool = False
    family: str = "inclusions"

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("background", "inclusion"):
            set_(self, name, validation.interval(getattr(self, name), f"PhantomSettings.{name}"))
        if self.background[0] <= 0:
            raise ValueError(f"PhantomSettings.background must be strictly positive, got "
                             f"{self.background!r}")
        set_(self, "n_inclusions", validation.interval(
            self.n_inclusions, "PhantomSettings.n_inclusions", low=1, integer=True))
        shapes = (self.shapes,) if isinstance(self.shapes, str) else tuple(self.shapes)
        unknown = [s for s in shapes if s not in SHAPES]
        if not shapes or unknown:
            raise ValueError(f"PhantomSettings.shapes must be a non-empty subset of {SHAPES}, "
                             f"got {self.shapes!r}")
        set_(self, "shapes", shapes)
        for name in ("min_size", "max_aspect"):
            set_(self, name, validation.number(getattr(self, name), f"PhantomSettings.{name}",
                                               1.0))
        set_(self, "max_size", validation.number(
            self.max_size, "PhantomSettings.max_size", 0.0, 1.0, low_open=True,
            what="a fraction of the field in (0, 1]"))
        set_(self, "soft_edge", validation.non_negative(
            self.soft_edge, "PhantomSettings.soft_edge", what="a number of cells >= 0"))
        set_(self, "overlap", bool(self.overlap))
        if self.family not in FAMILIES:
            raise ValueError(f"PhantomSettings.family must be one of {sorted(FAMILIES)}, got "
                             f"{self.family!r}")

    def to_dict(self) -> dict:
        """Plain dictionary (JSON-serialisable, for file attributes)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PhantomSettings:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a file from another version)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown phantom settings {unknown}; known ones are {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# -- geometry ------------------------------------------------------------------------------------

def _coordinates(grid: ImageGrid) -> tuple[np.ndarray, ...]:
    """Coordinates ``(x, y[, z])`` of every pixel relative to the grid's lower corner, as images
    (image convention: row 0 at ``y = H``, in 3-D at ``z = D``)."""
    if grid.dim == 3:
        points = grid.pixel_points() - np.array(grid.origin)
        return tuple(points[:, k].reshape(grid.shape) for k in range(3))
    hx, hy = grid.spacing
    x = np.arange(grid.nx + 1) * hx
    y = grid.height - np.arange(grid.ny + 1) * hy
    return np.meshgrid(x, y)


def _solid_mask(shape: str, points: tuple[np.ndarray, ...], centre, diameter: float,
                rng: np.random.Generator, settings: PhantomSettings) -> np.ndarray:
    """Voxels inside one 3-D inclusion of ``shape`` (the solid of the 2-D shape of that name)
    whose largest extent is ``diameter``."""
    d = np.stack([p - c for p, c in zip(points, centre, strict=True)], axis=-1)
    radius = diameter / 2.0
    if shape == "circle":  # a sphere
        return (d**2).sum(axis=-1) <= radius**2
    if shape in ("ellipse", "rotated_ellipse"):
        # semi-axes radius >= b >= c with radius / c <= max_aspect
        shorter = np.sort(rng.uniform(1.0, settings.max_aspect, 2))
        axes = radius / np.array([1.0, shorter[0], shorter[1]])
        if shape == "ellipse":  # long axis along x, y or z
            rotation = np.eye(3)[np.roll(np.arange(3), int(rng.integers(3)))]
        else:
            rotation = Rotation.random(random_state=rng).as_matrix()
        u = d @ rotation.T
        return ((u / axes) ** 2).sum(axis=-1) <= 1.0
    if shape == "blob":
        # star-shaped: r(n) = 1 + sum_k a_k cos(k acos(n . d_k) + p_k), smooth on the sphere
        orders = np.arange(2, 6)
        amplitudes = rng.uniform(0.0, 0.3, len(orders)) / orders
        phases = rng.uniform(0.0, 2.0 * math.pi, len(orders))
        directions = Rotation.random(len(orders), random_state=rng).apply([0.0, 0.0, 1.0])

        def profile(unit):
            angle = np.arccos(np.clip(unit @ directions.T, -1.0, 1.0))
            return 1.0 + np.cos(angle * orders + phases) @ amplitudes

        sphere = Rotation.random(2000, random_state=np.random.default_rng(0)).apply([0, 0, 1.0])
        scale = radius / profile(sphere).max()
        r = np.sqrt((d**2).sum(axis=-1))
        unit = d / np.maximum(r, 1e-300)[..., None]
        return r <= scale * profile(unit)
    if shape == "polygon":  # a convex polyhedron: random faces around the centre
        n = int(rng.integers(6, 13))
        normals = Rotation.random(n, random_state=rng).apply([0.0, 0.0, 1.0])
        offsets = rng.uniform(0.6, 1.0, n) * radius
        return ((d @ normals.T <= offsets).all(axis=-1)
                & ((d**2).sum(axis=-1) <= radius**2))
    raise ValueError(f"unknown inclusion shape {shape!r}; choose from {SHAPES}")


def _polygon_inside(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points ``(x, y)`` lie inside the polygon with vertices ``(vx, vy)``."""
    inside = np.zeros(x.shape, dtype=bool)
    for k in range(len(vx)):
        x0, y0, x1, y1 = vx[k - 1], vy[k - 1], vx[k], vy[k]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_cross)
    return inside


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, centre: tuple[float, float],
                diameter: float, rng: np.random.Generator, settings: PhantomSettings
                ) -> np.ndarray:
    """Nodes inside one inclusion of ``shape`` whose largest extent is ``diameter``."""
    dx, dy = x - centre[0], y - centre[1]
    radius = diameter / 2.0
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape in ("ellipse", "rotated_ellipse"):
        aspect = rng.uniform(1.0, settings.max_aspect)
        if shape == "ellipse":  # long axis lateral or axial
            angle = 0.5 * math.pi * rng.integers(2)
        else:
            angle = rng.uniform(0.0, math.pi)
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        return (u / radius) ** 2 + (v * aspect / radius) ** 2 <= 1.0
    phi0 = rng.uniform(0.0, 2.0 * math.pi)
    if shape == "blob":
        # star-shaped with a smooth random radius r(phi) = 1 + sum_k a_k cos(k phi + p_k)
        orders = np.arange(2, 6)
        amplitudes = rng.uniform(0.0, 0.3, len(orders)) / orders
        phases = rng.uniform(0.0, 2.0 * math.pi, len(orders))
        phi_fine = np.linspace(0.0, 2.0 * math.pi, 721)
        profile = 1.0 + np.cos(np.outer(phi_fine, orders) + phases) @ amplitudes
        scale = radius / profile.max()
        r = np.hypot(dx, dy)
        phi = np.arctan2(dy, dx) - phi0
        boundary = scale * (1.0 + np.cos(phi[..., None] * orders + phases) @ amplitudes)
        return r <= boundary
    if shape == "polygon":
        n = int(rng.integers(3, 9))
        angles = phi0 + 2.0 * math.pi * (np.arange(n) + rng.uniform(-0.3, 0.3, n)) / n
        radii = rng.uniform(0.6, 1.0, n)
        radii *= radius / radii.max()
        return _polygon_inside(dx, dy, radii * np.cos(angles), radii * np.sin(angles))
    raise ValueError(f"unknown inclusion shape {shape!r}; choose from {SHAPES}")


def inclusion_weight(inside: np.ndarray, grid: ImageGrid, soft_edge: float = 0.0) -> np.ndarray:
    """Blending weight of one inclusion: 1 inside, 0 outside, a smooth ramp across the edge.

    The ramp is a smoothstep of the signed distance to the inclusion boundary (Euclidean distance
    transform, boundary half a cell outside the last inside node) over ``soft_edge`` cells; it is
    above 1/2 exactly on the nodes of ``inside``. ``soft_edge = 0`` gives the sharp indicator.
    """
    inside = np.asarray(inside, dtype=bool)
    if soft_edge <= 0 or inside.all() or not inside.any():
        return inside.astype(np.float64)
    sampling = grid.spacing[::-1]  # image axes run (z,) y, x
    h = min(sampling)
    depth = ndimage.distance_transform_edt(inside, sampling=sampling)
    gap = ndimage.distance_transform_edt(~inside, sampling=sampling)
    signed = np.where(inside, 0.5 * h - depth, gap - 0.5 * h)
    t = np.clip(0.5 - signed / (soft_edge * h), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def compose_phantom(regions: list[np.ndarray], grid: ImageGrid, rng: np.random.Generator,
                    settings: PhantomSettings) -> tuple[np.ndarray, np.ndarray]:
    """``(E, labels)`` of inclusions on the given node sets, moduli drawn from ``rng``.

    The background value is drawn first, then one value per region, in order. Region ``k`` gets
    label ``k + 1``; a later region is drawn over an earlier one where they overlap.
    """
    background = rng.uniform(*settings.background)
    values = rng.uniform(*settings.inclusion, size=len(regions))
    E = np.full(grid.shape, background, dtype=np.float64)
    labels = np.zeros(grid.shape, dtype=np.int32)
    for k, (inside, value) in enumerate(zip(regions, values, strict=True)):
        weight = inclusion_weight(inside, grid, settings.soft_edge)
        E = (1.0 - weight) * E + weight * value
        labels[inside] = k + 1
    return E, labels


def random_phantom(grid: ImageGrid, rng: np.random.Generator,
                   settings: PhantomSettings | None = None, region: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A random phantom of ``settings.family``: ``(E, labels)`` images (see the module docstring).

    ``region``: a boolean image of the pixels inside the tissue (a mesh's raster mask); every
    inclusion then lies inside it, one pixel from its edge. ``None``: the whole field (the draws
    are then those of a rectangle, bit for bit).

    The family ``inclusions`` (the paper's): the number of inclusions, their shapes, sizes,
    positions and moduli are drawn from ``rng``.
    Inclusions lie entirely inside the field, at least one cell from its edges, and (unless
    ``settings.overlap``) at least one cell plus the soft edge from each other; when no place is
    found after a few hundred tries the phantom keeps the inclusions placed so far if they are at
    least ``settings.n_inclusions[0]``. Raises ``ValueError`` when the grid is too small for an
    inclusion of ``min_size`` cells, or has no room for that many inclusions (saying how many
    were placed): never fewer inclusions than asked for. Other families: :data:`FAMILIES`.
    """
    settings = settings or PhantomSettings()
    if settings.family != "inclusions":
        return _FAMILY_DRAWS[settings.family](grid, rng, settings, region)
    return compose_phantom(_place(grid, rng, settings, region, settings.shapes), grid, rng,
                           settings)


def _place(grid: ImageGrid, rng: np.random.Generator, settings: PhantomSettings,
           region: np.ndarray | None, shapes: tuple[str, ...]) -> list[np.ndarray]:
    """Node sets of non-overlapping random inclusions of ``shapes`` (see :func:`random_phantom`;
    the shape ``"ring"`` draws an annulus)."""
    h = min(grid.spacing)
    shorter = min(grid.extent)
    d_min = settings.min_size * h
    d_max = settings.max_size * shorter  # at least d_min: _log_uniform
    if d_min + 2 * h > shorter:
        raise ValueError(
            f"the {grid.label()} grid is too small for inclusions of min_size = "
            f"{settings.min_size} cells plus a one-cell margin; use a finer grid or a smaller "
            "min_size")
    points = _coordinates(grid)
    n_wanted = int(rng.integers(settings.n_inclusions[0], settings.n_inclusions[1] + 1))
    gap = int(math.ceil(settings.soft_edge)) + 1
    occupied = np.zeros(grid.shape, dtype=bool)
    outside = None if region is None else ~ndimage.binary_erosion(
        np.asarray(region, dtype=bool), iterations=1, border_value=0)
    regions: list[np.ndarray] = []
    for _ in range(n_wanted):
        for _attempt in range(_MAX_TRIES):
            shape = shapes[int(rng.integers(len(shapes)))]
            diameter = _log_uniform(rng, d_min, d_max)
            half = 0.5 * diameter + h  # keep a one-cell margin to the field's edges
            centre = tuple(rng.uniform(half, size - half) if size > 2 * half else 0.5 * size
                           for size in grid.extent)
            if shape == "ring":
                inside = _ring_mask(points, centre, diameter, rng)
            elif grid.dim == 3:
                inside = _solid_mask(shape, points, centre, diameter, rng, settings)
            else:
                inside = _shape_mask(shape, *points, centre, diameter, rng, settings)
            if not inside.any() or (outside is not None and (inside & outside).any()):
                continue
            if not settings.overlap and (
                    ndimage.binary_dilation(inside, iterations=gap) & occupied).any():
                continue
            regions.append(inside)
            occupied |= inside
            break
        else:
            if not regions:
                raise ValueError(f"could not place a single inclusion on the {grid.label()} "
                                 "grid; use a finer grid")
            break  # no room left for more inclusions
    if len(regions) < settings.n_inclusions[0]:
        raise ValueError(
            f"only {len(regions)} of the at least {settings.n_inclusions[0]} inclusions asked for "
            f"fit on the {grid.label()} grid (min_size {settings.min_size:g} cells, "
            f"max_size {settings.max_size:g} of the field"
            f"{'' if settings.overlap else ', kept apart'}); ask for fewer "
            "(--inclusions MIN MAX), smaller ones (--max-size) or use a finer grid")
    return regions


# -- the other families (FAMILIES) ---------------------------------------------------------------

def _ring_mask(points: tuple[np.ndarray, ...], centre, diameter: float,
               rng: np.random.Generator) -> np.ndarray:
    """An annulus (a spherical shell in 3-D), stretched by up to 1.5 along each axis, of largest
    extent ``diameter`` and wall a third to two thirds of its radius."""
    stretch = rng.uniform(1.0, 1.5, len(points))
    stretch /= stretch.max()
    r = np.sqrt(sum(((p - c) / s) ** 2 for p, c, s in zip(points, centre, stretch, strict=True)))
    radius = diameter / 2.0
    return (r <= radius) & (r > radius * (1.0 - rng.uniform(1.0 / 3.0, 2.0 / 3.0)))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A length drawn log-uniformly from [low, max(low, high)] (coarse grids: ``low``)."""
    return math.exp(rng.uniform(math.log(low), math.log(max(low, high))))


def _random_field(grid: ImageGrid, rng: np.random.Generator, length: float) -> np.ndarray:
    """A smooth Gaussian random field on the grid's nodes: white noise smoothed by a Gaussian of
    ``length`` (physical units), then shifted and scaled to zero mean and unit variance."""
    field = ndimage.gaussian_filter(rng.standard_normal(grid.shape),
                                    [length / h for h in grid.spacing[::-1]], mode="reflect")
    return (field - field.mean()) / max(field.std(), 1e-300)


def _family_settings(settings: PhantomSettings, rng: np.random.Generator) -> PhantomSettings:
    """The settings with this phantom's soft edge: drawn in [0, 3] cells unless fixed."""
    soft = settings.soft_edge if settings.soft_edge > 0 else rng.uniform(0.0, 3.0)
    return replace(settings, soft_edge=soft)


def _compose_in(regions: list[np.ndarray], grid: ImageGrid, rng: np.random.Generator,
                settings: PhantomSettings, region: np.ndarray | None):
    """:func:`compose_phantom` of the regions' parts inside the tissue, empty ones dropped."""
    if region is not None:
        regions = [r & np.asarray(region, dtype=bool) for r in regions]
    regions = [r for r in regions if r.any()]
    if not regions:
        raise ValueError(f"no inclusion of this phantom lies in the tissue on the {grid.label()} "
                         "grid; use a finer grid")
    return compose_phantom(regions, grid, rng, settings)


def _textured(grid, rng, settings, region):
    local = _family_settings(settings, rng)
    E, labels = compose_phantom(_place(grid, rng, local, region, settings.shapes), grid, rng,
                                local)
    length = _log_uniform(rng, 2.0 * min(grid.spacing), 0.2 * min(grid.extent))
    amplitude = rng.uniform(0.05, 0.25)
    texture = np.clip(_random_field(grid, rng, length), -2.5, 2.5)
    return E * (1.0 + amplitude * texture), labels


def _gradient(grid, rng, settings, region):
    local = _family_settings(settings, rng)
    E, labels = compose_phantom(_place(grid, rng, local, region, settings.shapes), grid, rng,
                                local)
    direction = rng.standard_normal(grid.dim)
    direction /= np.linalg.norm(direction)
    t = sum(d * p / size for d, p, size in zip(direction, _coordinates(grid), grid.extent,
                                              strict=True))
    t = (t - t.min()) / max(t.max() - t.min(), 1e-300)  # 0 to 1 across the field
    ratio = rng.uniform(1.0, 2.0)  # stiffest to softest end
    return E * ratio ** (t - 0.5), labels


def _field(grid, rng, settings, region):
    local = _family_settings(settings, rng)
    length = _log_uniform(rng, 3.0 * min(grid.spacing), 0.15 * min(grid.extent))
    field = _random_field(grid, rng, length)
    share = rng.uniform(0.1, 0.4)
    inside = field > np.quantile(field, 1.0 - share)
    structure = np.ones((3,) * grid.dim, dtype=bool)
    parts, n = ndimage.label(inside, structure=structure)
    return _compose_in([parts == k for k in range(1, n + 1)], grid, rng, local, region)


def _voronoi(grid, rng, settings, region):
    local = _family_settings(settings, rng)
    n = int(rng.integers(4, 17))
    seeds = rng.uniform(0.0, 1.0, (n, grid.dim)) * np.array(grid.extent)
    points = np.stack(_coordinates(grid), axis=-1)
    nearest = np.argmin(((points[..., None, :] - seeds) ** 2).sum(axis=-1), axis=-1)
    stiff = rng.random(n) < 0.5
    if stiff.all() or not stiff.any():  # keep both a background and an inclusion
        stiff[int(rng.integers(n))] = not stiff[0]
    return _compose_in([nearest == k for k in np.flatnonzero(stiff)], grid, rng, local, region)


def _layers(grid, rng, settings, region):
    local = _family_settings(settings, rng)
    points = _coordinates(grid)
    depth_axis = 1 if grid.dim == 2 else 2  # y in 2-D, z in 3-D: depth below the transducer
    depth = grid.extent[depth_axis] - points[depth_axis]  # 0 at the transducer edge
    n = int(rng.integers(2, 5))
    levels = np.sort(rng.uniform(0.15, 0.9, n)) * grid.extent[depth_axis]
    regions = []
    for level in levels:
        boundary = level
        for axis in (a for a in range(grid.dim) if a != depth_axis):
            wavelength = rng.uniform(0.3, 1.5) * grid.extent[axis]
            amplitude = rng.uniform(0.0, 0.08) * grid.extent[depth_axis]
            boundary = boundary + amplitude * np.sin(
                2.0 * math.pi * points[axis] / wavelength + rng.uniform(0.0, 2.0 * math.pi))
        regions.append(depth > boundary)  # this layer and everything below it ...
    regions = [below & ~deeper
               for below, deeper in zip(regions[:-1], regions[1:], strict=True)] + regions[-1:]
    one = replace(local, n_inclusions=(1, 1))  # ... and one inclusion over them
    regions += _place(grid, rng, one, region, ("rotated_ellipse",))
    return _compose_in(regions, grid, rng, local, region)


def _rings(grid, rng, settings, region):
    local = _family_settings(settings, rng)
    local = replace(local, n_inclusions=(1, min(local.n_inclusions[1], 4)),
                    min_size=max(local.min_size, 6.0), max_size=max(local.max_size, 0.4))
    return _compose_in(_place(grid, rng, local, region, ("ring",)), grid, rng, local, region)


_FAMILY_DRAWS = {"textured": _textured, "gradient": _gradient, "field": _field,
                 "voronoi": _voronoi, "layers": _layers, "rings": _rings}


# -- user masks ----------------------------------------------------------------------------------

def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A boolean inclusion mask from a PNG or ``.npy`` file, at the file's own resolution.

    Grey-level, RGB(A) and boolean images are accepted (the alpha channel is ignored); bright
    pixels are inclusions: in a label image (two levels, or the levels 0, 1, 2, ..., k) every
    pixel above the darkest level, in a grey one (anti-aliased, a JPEG's) the pixels above
    halfway between the smallest and largest value. An image whose inclusions cover
    more than half of it is warned about (inverted?). Raises ``ValueError`` for unreadable files
    and masks without (or with only) inclusion.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            with open(path, "rb") as fh:
                if fh.read(6) != b"\x93NUMPY":
                    raise ValueError(f"cannot read mask image {str(path)!r}: it is not a .npy "
                                     "array file (no .npy header); write it with numpy.save")
            header = np.load(path, mmap_mode="r", allow_pickle=False)  # reads no data
            _check_mask_memory(path, header.shape, header.dtype.itemsize)
            del header
            image = np.load(path, allow_pickle=False)
        elif suffix == ".png":
            from matplotlib import image as mpl_image

            with open(path, "rb") as fh:  # the header only: the size before decoding
                head = fh.read(24)
            if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
                raise ValueError(f"cannot read mask image {str(path)!r}: it is not a PNG file "
                                 "(no PNG header)")
            width, height = struct.unpack(">II", head[16:24])
            _check_mask_memory(path, (height, width, 4), 4)  # decoded as float32 RGBA
            image = mpl_image.imread(path)
        else:
            raise ValueError(f"mask {str(path)!r} is neither a .png nor a .npy file")
    except (OSError, ValueError, EOFError, SyntaxError) as error:
        if isinstance(error, ValueError) and str(path) in str(error):
            raise
        raise ValueError(f"cannot read mask image {str(path)!r}: {error}") from None
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (1, 2, 3, 4):
        channels = image.shape[2]
        colour = image[..., : 3 if channels >= 3 else 1]  # drop alpha
        image = colour.astype(np.float64).mean(axis=2)
    if image.ndim != 2 or min(image.shape) < 2:
        raise ValueError(f"mask image {str(path)!r} must be a 2-D (grey or colour) image, got "
                         f"shape {image.shape}")
    if image.dtype.kind not in "biuf":
        raise ValueError(f"mask image {str(path)!r} must hold numbers, got dtype {image.dtype}")
    image = image.astype(np.float64)
    if not np.isfinite(image).all():
        raise ValueError(f"mask image {str(path)!r} has non-finite values")
    lo, hi = image.min(), image.max()
    if lo == hi:
        raise ValueError(f"mask image {str(path)!r} is constant ({lo}): it has no inclusion")
    # a label image: every level above the background (halfway dropped label 1); a grey one
    # (anti-aliased, or a JPEG's noise): halfway (every level above the darkest made dozens of
    # specks into inclusions)
    mask = image > lo if _labels(np.unique(image)) else image > 0.5 * (lo + hi)
    if mask.mean() > 0.5:
        warnings.warn(f"mask image {str(path)!r}: its inclusions (the pixels brighter than the "
                      f"background) cover {100 * mask.mean():.0f} % of it; an inverted mask "
                      "(white background)? Inclusions are bright on a dark background",
                      UserWarning, stacklevel=2)
    return mask


def _labels(levels: np.ndarray) -> bool:
    """Whether an image's sorted grey levels are those of a label image: two levels (binary), or
    0, 1, ..., k in the file's integer steps (an 8- or 16-bit PNG decodes to k/255, k/65535)."""
    if len(levels) == 2:
        return True
    return any(np.allclose(levels / step, np.arange(len(levels)), rtol=0.0, atol=1e-6)
               for step in (1.0, 1.0 / 255, 1.0 / 65535))


def _check_mask_memory(path: Path, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse a mask image whose reading would exceed the memory limit, from its header: the
    decoded array, then about five float64 copies of its pixels (grey level, threshold, resize)."""
    pixels = int(np.prod(shape[:2])) if len(shape) >= 2 else int(np.prod(shape))
    size = " x ".join(map(str, shape[:2]))
    validation.check_memory(int(np.prod(shape)) * itemsize + 5 * 8 * pixels,
                            f"reading the {size}-pixel mask image {str(path)!r}")


def resize_mask(mask: np.ndarray, grid: ImageGrid) -> np.ndarray:
    """A boolean mask resampled to the grid's nodes (bilinear, then thresholded at 1/2).

    The mask's corner pixels map to the field's corners. Shrinking by more than a factor 2 first
    averages over the pixels that fall on one node, so thin features are not skipped.
    """
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape == grid.shape:
        return mask > 0.5
    factors = [t / s for t, s in zip(grid.shape, mask.shape, strict=True)]
    size = [max(1, int(round(1.0 / f))) if f < 0.5 else 1 for f in factors]
    if max(size) > 1:
        mask = ndimage.uniform_filter(mask, size=size, mode="nearest")
    resized = ndimage.zoom(mask, factors, order=1, mode="nearest")
    if resized.shape != grid.shape:  # rounding of the output shape: crop or pad by one pixel
        fixed = np.zeros(grid.shape)
        rows, cols = min(resized.shape[0], grid.shape[0]), min(resized.shape[1], grid.shape[1])
        fixed[:rows, :cols] = resized[:rows, :cols]
        resized = fixed
    return resized >= 0.5


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (8-neighbour connectivity) of a boolean image, in scan order."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return [labels == k for k in range(1, n + 1)]


def mask_phantom(mask: np.ndarray, grid: ImageGrid, rng: np.random.Generator,
                 settings: PhantomSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(E, labels)`` of a user's mask: every connected component becomes one inclusion.

    ``mask`` is a boolean image of any size (resized with :func:`resize_mask` when it does not fit
    the grid). Components are found with 8-neighbour connectivity and labelled in scan order. The
    background and one modulus per inclusion are drawn from ``rng``. Raises ``ValueError`` when
    nothing of the mask is left on the grid or it covers the whole field.
    """
    settings = settings or PhantomSettings()
    on_grid = resize_mask(mask, grid)
    if not on_grid.any():
        raise ValueError(f"the mask has no inclusion left on the {grid.label()} grid (its "
                         "inclusions are smaller than a cell); use a finer grid")
    if on_grid.all():
        raise ValueError("the mask covers the whole field: there is no background")
    return compose_phantom(_components(on_grid), grid, rng, settings)


def mask_files(folder: str | os.PathLike) -> list[Path]:
    """The PNG and ``.npy`` files of a folder, sorted by name (the order samples use them in)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"mask folder {str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in MASK_SUFFIXES)
    if not files:
        raise ValueError(f"mask folder {str(folder)!r} holds no .png or .npy mask images")
    return files


def load_mask_folder(folder: str | os.PathLike, grid: ImageGrid
                     ) -> tuple[list[str], np.ndarray, str]:
    """Read and resize every mask of a folder: ``(names, masks, sha256)``.

    ``masks`` is a boolean array ``(n_masks, ny+1, nx+1)``; ``sha256`` fingerprints the resized
    masks (and their names), so a data set can tell whether a folder still holds the same masks.
    Every mask is checked here, before any simulation starts; a bad one raises ``ValueError``
    naming the file.
    """
    names, masks = [], []
    for path in mask_files(folder):
        resized = resize_mask(read_mask(path), grid)
        if not resized.any():
            raise ValueError(f"mask {str(path)!r} has no inclusion left on the {grid.nx} x "
                             f"{grid.ny} grid (its inclusions are smaller than a cell)")
        if resized.all():
            raise ValueError(f"mask {str(path)!r} covers the whole field on the grid: there is "
                             "no background")
        names.append(path.name)
        masks.append(resized)
    stack = np.stack(masks)
    digest = hashlib.sha256()
    digest.update("\n".join(names).encode())
    digest.update(np.packbits(stack).tobytes())
    digest.update(str(stack.shape).encode())
    return names, stack, digest.hexdigest()
