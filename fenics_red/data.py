"""Synthetic elastography data sets in HDF5: simulate, resume, load and validate (paper, section 5).

A data set holds ``n`` samples, each a phantom modulus ``E`` (:mod:`fenics_red.phantoms`), its clean
displacement ``u = K(E)⁻¹ f`` (:mod:`fenics_red.forward`, equation 1) and a noisy measurement
``u_m`` at a target SNR (:mod:`fenics_red.measurements`). The paper trains its denoiser on such
data made from 540 mask images at 35 dB.

File layout (format version 2) on image grids (every image in the convention of
:mod:`fenics_red.raster`: shape ``(ny+1, nx+1)``, row 0 the transducer edge ``y = H``, column 0
at ``x = 0``):

========== ========================= ======== ==============================================
dataset    shape                     dtype    meaning
========== ========================= ======== ==============================================
E          (n, ny+1, nx+1)           float64  Young's modulus (normalised, 1 = 100 kPa)
ux, uy     (n, ny+1, nx+1)           float64  clean lateral / axial displacement
ux_noisy   (n, ny+1, nx+1)           float64  measured (noisy) lateral displacement
uy_noisy   (n, ny+1, nx+1)           float64  measured (noisy) axial displacement
mask       (n, ny+1, nx+1)           uint16   0 background, k = 1..K nodes of inclusion k
noise_std  (n, 2)                    float64  (σx, σy) of the displacement noise: Σn
force_std  (n,)                      float64  σw of the force noise: Σw = σw² I (0: none)
done       (n,)                      uint8    1 once the sample is written (all 1 when complete)
========== ========================= ======== ==============================================

Attributes (everything needed to redo the file): ``format``, ``format_version``,
``fenics_red_version``, ``n_samples``; the grid ``nx``, ``ny``, ``width``, ``height``; the forward
model ``nu``, ``plane``, ``traction``, ``shear_traction``, ``support``, ``solver``,
``petsc_options`` (JSON); the noise ``snr_db``, ``noise_ratio``, ``force_noise``; ``seed``; the
phantom settings ``phantoms`` (JSON); the masks ``masks_dir``, ``n_masks``, ``masks_sha256``
(empty / 0 for random phantoms), ``layout`` (``grid`` or ``mesh``), and descriptive
``image_convention`` and ``units`` strings.

Every file holds its mesh in the group ``mesh``: ``points`` ``(N, gdim)`` in the file's node order,
``cells`` (0-based), and the ``load`` and ``support`` facets as node lists
(:class:`~fenics_red.domain.MeshArrays`; fingerprint ``mesh_sha256``), so it is self-contained.
An imported measurement (``source = "measurement"``, :mod:`fenics_red.measured`) may also hold
``mesh/force``, nodal forces ``(N, gdim)`` that load the model instead of the traction, and
per-node ``valid`` and ``reference`` flags; it has no truth and no clean ``ux``, ``uy``. On
a grid the nodes are the pixels in row-major order, so the images above are the nodal values in
that order. On a mesh (``simulate --mesh``, ``layout = "mesh"``) the same datasets hold one value
per node, ``(n, N)`` instead of ``(n, ny+1, nx+1)``, and the grid attributes (with ``x0``, ``y0``)
describe the raster on which the phantoms were drawn in physical coordinates (each node takes the
value of its nearest pixel; inclusions lie inside the mesh). Files of format version 1 (grids,
without the mesh group) still read.

In 3-D (a box grid, ``nz > 0``, depth along ``z``) every image is a volume ``(nz+1, ny+1, nx+1)``
(axis 0 the depth from the transducer face, :mod:`fenics_red.raster`), the displacement has a
third component ``uz``/``uz_noisy`` (axial), ``noise_std`` is ``(n, 3)`` and the attributes add
``nz``, ``depth`` and ``z0``.

Reproducibility: sample ``i`` is drawn from ``SeedSequence(seed).spawn(n)[i]`` (two children of
it: phantom, then noise), so it is the same whatever the number of samples, the MPI rank count or
the resumption history. Each rank solves its samples on ``MPI.COMM_SELF``; rank 0 writes.
Interrupted runs leave ``FILE.h5.partial`` (flushed after every batch); running again with the
same settings resumes it, and the file is renamed to ``FILE.h5`` when complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from mpi4py import MPI

import numpy as np

from . import validation
from .domain import MeshArrays
from .forward import ElasticityModel, ForwardSettings
from .jobs import ResumableFile, run_batches
from .jobs import plain as _plain
from .measurements import simulate_measurement
from .parallel import on_root as _on_root
from .phantoms import PhantomSettings, load_mask_folder, mask_phantom, random_phantom
from .raster import ImageGrid

__all__ = ["SimulationSettings", "Sample", "Dataset", "load_dataset", "simulate_dataset",
           "simulate_sample", "sample_generators", "FORMAT", "FORMAT_VERSION", "IMAGE_DATASETS",
           "image_datasets"]

#: Value of the ``format`` attribute of every data set file.
FORMAT = "fenics-red synthetic elastography"
#: Version of the layout written (module docstring); version 1 (grids, no mesh group) still reads.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
#: Float64 image stacks of a 2-D data set, ``(n, ny+1, nx+1)``; :func:`image_datasets` in 3-D.
IMAGE_DATASETS = ("E", "ux", "uy", "ux_noisy", "uy_noisy")
#: Datasets a data set without truth (a real measurement) lacks: both or neither.
TRUTH_DATASETS = ("E", "mask")
#: Clean displacements, optional without truth (an imported measurement has none).
CLEAN_DATASETS = ("ux", "uy", "uz")
#: Per-node flags of an imported measurement (:mod:`fenics_red.measured`), optional.
FLAG_DATASETS = ("valid", "reference")
MASK_DTYPE = np.uint16


def image_datasets(dim: int) -> tuple[str, ...]:
    """The float64 stacks of a ``dim``-D data set: :data:`IMAGE_DATASETS`, plus ``uz`` and
    ``uz_noisy`` in 3-D."""
    return IMAGE_DATASETS + (("uz", "uz_noisy") if dim == 3 else ())

#: The smallest noise standard deviation a data set may give, relative to its largest noisy
#: displacement (an SNR of about 240 dB; double precision's round-off is 1e-16).
NOISE_FLOOR = 1e-12
#: The largest SNR a simulation takes (:meth:`SimulationSettings.check_noise_floor`):
#: 20 log10(1 / NOISE_FLOOR) less 20 dB for the largest displacement over its RMS.
MAX_SNR_DB = 220.0

_FORWARD_KEYS = ("nu", "plane", "traction", "shear_traction", "support", "solver")
#: Attributes that describe, but do not determine, the data (ignored when resuming).
_INFORMATIVE = ("masks_dir", "image_convention", "units")


# -- settings and samples ------------------------------------------------------------------------

@dataclass(frozen=True)
class SimulationSettings:
    """Everything that determines a synthetic data set (with the mask folder, if any).

    Attributes:
        grid: the image grid (nodes = pixels).
        forward: material law, loads, supports and solver of the forward model.
        snr_db: SNR of the displacement noise in dB over the free dofs (paper: 35 dB).
        noise_ratio: lateral-to-axial noise ratio ``σx / σy``.
        force_noise: standard deviation ``σw`` of the nodal force noise (0: none).
        seed: root seed; sample ``i`` uses ``SeedSequence(seed).spawn(n)[i]``.
        phantoms: how random phantoms are drawn (also the moduli of mask phantoms).
        mesh: the mesh of a mesh data set (then ``grid`` is the raster of its phantoms), or
            ``None`` on an image grid.
    """

    grid: ImageGrid
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    snr_db: float = 35.0
    noise_ratio: float = 1.0
    force_noise: float = 0.0
    seed: int = 0
    phantoms: PhantomSettings = field(default_factory=PhantomSettings)
    mesh: MeshArrays | None = None

    def __post_init__(self):
        for name, kind in (("grid", ImageGrid), ("forward", ForwardSettings),
                           ("phantoms", PhantomSettings)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"SimulationSettings.{name} must be a {kind.__name__}, got "
                                 f"{type(getattr(self, name)).__name__}")
        set_ = object.__setattr__
        set_(self, "snr_db", validation.finite(self.snr_db, "SimulationSettings.snr_db",
                                               what="a finite number of dB"))
        set_(self, "noise_ratio", validation.positive(self.noise_ratio,
                                                      "SimulationSettings.noise_ratio"))
        set_(self, "force_noise", validation.non_negative(self.force_noise,
                                                          "SimulationSettings.force_noise"))
        set_(self, "seed", validation.seed(self.seed, "SimulationSettings.seed"))
        if self.mesh is not None and not isinstance(self.mesh, MeshArrays):
            raise ValueError(f"SimulationSettings.mesh must be MeshArrays or None, got "
                             f"{type(self.mesh).__name__}")
        # the model the data come from, resolved ("auto" depends on the dimension), as stored
        set_(self, "forward", replace(self.forward,
                                      volumetric=self.forward.resolve_volumetric(self.dim)))

    @property
    def space(self):
        """Where the data live: the mesh arrays, or the image grid (for
        :func:`~fenics_red.domain.make_domain` and the methods' ``setup``)."""
        return self.grid if self.mesh is None else self.mesh

    @property
    def value_shape(self) -> tuple[int, ...]:
        """Shape of one sample's nodal arrays: the image shape, or ``(N,)`` on a mesh."""
        return self.grid.shape if self.mesh is None else self.mesh.shape

    @property
    def dim(self) -> int:
        """Spatial dimension: that of the mesh, or of the grid."""
        return self.grid.dim if self.mesh is None else self.mesh.dim

    def check_noise_floor(self) -> None:
        """Refuse to simulate noise below the data's round-off, which every method refuses
        (:data:`NOISE_FLOOR`): the SNR of the component with the smaller noise (``noise_ratio``
        splits it) above :data:`MAX_SNR_DB`. When simulating only: a data set made before is
        read back whatever its SNR."""
        smallest = self.snr_db + 20.0 * abs(math.log10(self.noise_ratio))
        if smallest > MAX_SNR_DB:
            raise ValueError(f"an SNR of {self.snr_db:g} dB with a noise ratio of "
                             f"{self.noise_ratio:g} puts one component's noise at about "
                             f"{smallest:.0f} dB, above {MAX_SNR_DB:g} dB where it falls below "
                             "double precision's round-off of the data, which every method "
                             "refuses: lower --snr (200 dB is noise-free for every purpose)")

    def to_attrs(self) -> dict:
        """Flat HDF5 attributes (strings, numbers, JSON for nested values)."""
        g, f = self.grid, self.forward
        attrs = {"nx": int(g.nx), "ny": int(g.ny), "width": float(g.width),
                 "height": float(g.height)}
        attrs["layout"] = "grid" if self.mesh is None else "mesh"
        if self.mesh is not None:
            attrs.update(x0=float(g.x0), y0=float(g.y0))
        if g.nz:
            attrs.update(nz=int(g.nz), depth=float(g.depth), z0=float(g.z0))
        attrs.update({key: getattr(f, key) for key in _FORWARD_KEYS})
        attrs["volumetric"] = f.volumetric  # resolved: the model the data came from
        attrs["petsc_options"] = json.dumps(dict(f.petsc_options), sort_keys=True)
        attrs.update(snr_db=self.snr_db, noise_ratio=self.noise_ratio,
                     force_noise=self.force_noise, seed=self.seed,
                     phantoms=json.dumps(self.phantoms.to_dict(), sort_keys=True))
        return attrs

    @classmethod
    def from_attrs(cls, attrs) -> SimulationSettings:
        """Inverse of :meth:`to_attrs`; raises ``ValueError`` naming missing or bad attributes."""
        needed = ["nx", "ny", "width", "height", *_FORWARD_KEYS, "petsc_options", "snr_db",
                  "noise_ratio", "force_noise", "seed", "phantoms"]
        defaults = {}
        if _plain(attrs.get("source")) == "measurement":  # no phantoms, no seed: not simulated
            defaults = {"seed": 0, "phantoms": json.dumps(PhantomSettings().to_dict())}
        missing = [key for key in needed if key not in attrs and key not in defaults]
        if missing:
            raise ValueError(f"missing attribute(s) {missing}")
        a = {key: _plain(attrs[key]) if key in attrs else defaults[key] for key in needed}
        try:
            grid = ImageGrid(_int(a["nx"], "nx"), _int(a["ny"], "ny"), float(a["width"]),
                             float(a["height"]), float(_plain(attrs.get("x0", 0.0))),
                             float(_plain(attrs.get("y0", 0.0))),
                             _int(_plain(attrs.get("nz", 0)), "nz"),
                             float(_plain(attrs.get("depth", 1.0))),
                             float(_plain(attrs.get("z0", 0.0))))
            forward = ForwardSettings(
                nu=float(a["nu"]), plane=str(a["plane"]), traction=float(a["traction"]),
                shear_traction=float(a["shear_traction"]), support=str(a["support"]),
                solver=str(a["solver"]), petsc_options=json.loads(a["petsc_options"]),
                # data sets from before the nodal bulk integration used the plain P1 element
                volumetric=str(_plain(attrs.get("volumetric", "element"))))
            phantoms = PhantomSettings.from_dict(json.loads(a["phantoms"]))
            return cls(grid, forward, float(a["snr_db"]), float(a["noise_ratio"]),
                       float(a["force_noise"]), _int(a["seed"], "seed"), phantoms)
        except (TypeError, ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"invalid settings attributes: {error}") from None


@functools.lru_cache(maxsize=4)
def _grid_mesh(grid: ImageGrid) -> MeshArrays:
    """The mesh of a grid data set (made once per grid: the attributes and the file need it)."""
    return MeshArrays.of_grid(grid)


def mesh_digest(mesh: MeshArrays) -> str:
    """A fingerprint of a mesh's arrays (a resumed mesh data set must be on the same mesh)."""
    return _arrays_digest(mesh.points, mesh.cells, mesh.load, mesh.support, mesh.force)


def _arrays_digest(points, cells, load, support, force=None) -> str:
    """:func:`mesh_digest` of the arrays themselves (a damaged file's, which make no mesh)."""
    import hashlib

    digest = hashlib.sha256()
    arrays = [points, cells, load, support]
    if force is not None:  # a measurement's nodal forces are part of its mesh
        arrays.append(force)
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _int(value, name: str) -> int:
    return validation.integer(value, f"attribute {name}")


@dataclass
class Sample:
    """One sample of a data set: nodal arrays (images ``(ny+1, nx+1)`` on grids, volumes in 3-D,
    ``(N,)`` on meshes) and its noise levels.

    ``mask`` holds integer labels (0 background, ``k > 0`` inclusion ``k``); ``noise_std`` is
    ``(σx, σy[, σz])`` (``Σn``) and ``force_std`` is ``σw`` (``Σw = σw² I``) of the measurement.
    ``E`` and ``mask`` are ``None`` for a data set without truth (a real measurement).
    """

    index: int
    E: np.ndarray | None
    ux: np.ndarray | None  # None in an imported measurement (no clean displacement)
    uy: np.ndarray | None
    ux_noisy: np.ndarray
    uy_noisy: np.ndarray
    mask: np.ndarray | None
    noise_std: tuple[float, ...]
    force_std: float
    uz: np.ndarray | None = None  # the third (axial) component in 3-D
    uz_noisy: np.ndarray | None = None


def sample_generators(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """``(phantom_rng, noise_rng)`` of sample ``index``: the two children of its seed sequence.

    The sample's sequence equals ``SeedSequence(seed).spawn(n)[index]`` for any ``n > index``.
    Separate streams keep the phantoms of a seed the same when only the noise settings change.
    """
    sequence = np.random.SeedSequence(seed, spawn_key=(int(index),))
    phantom, noise = sequence.spawn(2)
    return np.random.default_rng(phantom), np.random.default_rng(noise)


def simulate_sample(index: int, settings: SimulationSettings,
                    model: ElasticityModel | None = None, masks: np.ndarray | None = None,
                    region: np.ndarray | None = None) -> Sample:
    """Sample ``index`` of the data set of ``settings``: phantom, clean and noisy displacements.

    ``model``: a forward model of ``settings.grid`` and ``settings.forward`` to reuse (default: a
    new one on ``MPI.COMM_SELF``, destroyed afterwards). ``masks``: boolean masks
    ``(n_masks, ny+1, nx+1)`` (:func:`~fenics_red.phantoms.load_mask_folder`); sample ``i`` uses
    mask ``i mod n_masks``. Without masks the phantom is random.

    On a mesh (``settings.mesh``) the phantom is drawn on ``settings.grid`` in physical
    coordinates, its inclusions inside ``region`` (the pixels inside the mesh: default
    :func:`phantom_region`), and each node takes the value of its nearest pixel.
    """
    phantom_rng, noise_rng = sample_generators(settings.seed, index)
    if settings.mesh is not None and region is None:
        region = phantom_region(settings)
    if masks is not None:
        E, labels = mask_phantom(masks[index % len(masks)], settings.grid, phantom_rng,
                                 settings.phantoms)
    else:
        E, labels = random_phantom(settings.grid, phantom_rng, settings.phantoms, region)
    if settings.mesh is not None:  # the nearest pixel of every node
        nearest = settings.grid.pixel_index(settings.mesh.points[:, :settings.grid.dim])
        E, labels = E.ravel()[nearest], labels.ravel()[nearest]
    if int(labels.max()) > np.iinfo(MASK_DTYPE).max:
        raise ValueError(f"sample {index} has {int(labels.max())} inclusions; at most "
                         f"{np.iinfo(MASK_DTYPE).max} fit the mask's integer type")
    own = model is None
    if own:
        model = ElasticityModel.on_grid(settings.space, MPI.COMM_SELF, settings.forward)
    try:
        m = simulate_measurement(model, E, noise_rng, settings.snr_db, settings.noise_ratio,
                                 settings.force_noise)
    finally:
        if own:
            model.destroy()
    return Sample(int(index), E, m.ux, m.uy, m.ux_noisy, m.uy_noisy,
                  labels.astype(MASK_DTYPE), tuple(float(s) for s in m.noise_std),
                  float(m.force_std), m.uz, m.uz_noisy)


def phantom_region(settings: SimulationSettings) -> np.ndarray:
    """Boolean image on ``settings.grid``: the pixels inside ``settings.mesh`` (serial)."""
    from .raster import ValueRaster

    return ValueRaster(settings.mesh, settings.grid).mask


def mesh_settings(mesh: MeshArrays, spacing: float | None = None, **kwargs
                  ) -> SimulationSettings:
    """Settings of a data set on ``mesh`` (2-D or 3-D): its phantoms drawn on the raster over the
    mesh's bounding box with pixels (voxels) of ``spacing`` (default: the mean node spacing,
    ``(size / N)^(1/d)``). ``kwargs``: the other :class:`SimulationSettings` fields."""
    if spacing is None:
        spacing = mesh.mean_spacing()
    grid = ImageGrid.covering(mesh.points.min(axis=0), mesh.points.max(axis=0), spacing)
    return SimulationSettings(grid, mesh=mesh, **kwargs)


# -- writing -------------------------------------------------------------------------------------

def _file_attrs(settings: SimulationSettings, n_samples: int, masks_dir, n_masks: int,
                masks_sha256: str) -> dict:
    from . import __version__

    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION,
             "fenics_red_version": __version__, "n_samples": int(n_samples)}
    attrs.update(settings.to_attrs())
    attrs["mesh_sha256"] = mesh_digest(settings.mesh or _grid_mesh(settings.grid))
    attrs.update(masks_dir="" if masks_dir is None else str(Path(masks_dir).resolve()),
                 n_masks=int(n_masks), masks_sha256=masks_sha256,
                 image_convention="(ny+1, nx+1) nodal images; row 0 = transducer edge y = H, "
                                  "column 0 = x = 0" if settings.mesh is None else
                                  "(N,) nodal values in the node order of /mesh/points",
                 units="modulus normalised (1 = 100 kPa); displacement in length units of the "
                       "grid; mask: 0 background, k > 0 inclusion k")
    return attrs


def _attr_differences(old, new: dict) -> list[str]:
    differences = []
    for key, value in new.items():
        if key in _INFORMATIVE:
            continue
        if key not in old:
            differences.append(f"{key}: missing in the file, {value!r} now")
        elif _plain(old[key]) != value:
            differences.append(f"{key}: {_plain(old[key])!r} in the file, {value!r} now")
    return differences


class _SampleFile(ResumableFile):
    """Rank 0's handle on ``FILE.h5.partial`` (layout: module docstring)."""

    UNREADABLE = ("it is not a readable HDF5 file ({error}); delete it or pass --overwrite "
                  "(overwrite=True) to start again")
    POSITIVE, NON_NEGATIVE = ("E", "noise_std"), ("force_std",)

    def __init__(self, path: Path, attrs: dict, settings: SimulationSettings, overwrite: bool):
        self.shape = tuple(settings.value_shape)
        self.dim = settings.dim
        self.mesh = settings.mesh or _grid_mesh(settings.grid)
        super().__init__(path, attrs, attrs["n_samples"], overwrite)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        n, images = self.n_rows, (self.n_rows, *self.shape)
        return {**{name: images for name in (*image_datasets(self.dim), "mask")},
                "noise_std": (n, self.dim), "force_std": (n,)}

    def create_datasets(self) -> None:
        n, chunk = self.n_rows, (1, *self.shape)
        for name in image_datasets(self.dim):
            self.file.create_dataset(name, (n, *self.shape), dtype=np.float64, chunks=chunk)
        self.file.create_dataset("mask", (n, *self.shape), dtype=MASK_DTYPE, chunks=chunk)
        self.file.create_dataset("noise_std", (n, self.dim), dtype=np.float64)
        self.file.create_dataset("force_std", (n,), dtype=np.float64)
        group = self.file.create_group("mesh")
        for name in ("points", "cells", "load", "support"):
            group.create_dataset(name, data=getattr(self.mesh, name))

    def check(self, attrs: dict, where: str) -> None:
        advice = ("run again with the same settings to resume it, or pass --overwrite "
                  "(overwrite=True) to start again")
        if _plain(self.file.attrs.get("format")) != FORMAT:
            raise ValueError(f"{where} is not a fenics-red data set; delete it or {advice}")
        differences = _attr_differences(self.file.attrs, attrs)
        if differences:
            raise ValueError(f"{where} was made with different settings ("
                             + "; ".join(differences) + f"); {advice}")
        wrong = self.wrong_dataset()
        if wrong is not None:
            raise ValueError(f"{where} has no dataset {wrong[0]!r} of shape {wrong[1]}; it is "
                             f"damaged: delete it or pass --overwrite (overwrite=True)")

    def write_row(self, s: Sample) -> int:
        f, i = self.file, s.index
        for name in image_datasets(self.dim):
            f[name][i] = getattr(s, name)
        f["mask"][i] = s.mask
        f["noise_std"][i] = s.noise_std
        f["force_std"][i] = s.force_std
        return i


def simulate_dataset(path: str | os.PathLike, n_samples: int, settings: SimulationSettings,
                     comm: MPI.Comm, masks_dir: str | os.PathLike | None = None,
                     overwrite: bool = False, progress: bool = True, *,
                     batch_size: int = 8,
                     on_batch: Callable[[int], None] | None = None) -> Path:
    """Simulate ``n_samples`` samples into the HDF5 file ``path`` (layout: module docstring).

    Collective on ``comm``: the samples are spread over its ranks, each solving its own on
    ``MPI.COMM_SELF``; rank 0 writes ``path + ".partial"`` after every batch (``batch_size``
    samples per rank) and renames it to ``path`` when all are done. An existing partial file made
    with the same settings is resumed (a mismatch is a ``ValueError`` listing the differences); an
    existing ``path`` is a ``FileExistsError`` unless ``overwrite`` (which resumes a partial
    file of the same settings and discards any other). With ``masks_dir`` the phantoms come
    from the folder's mask images (sample ``i`` uses the ``i mod n_masks``-th by name).
    ``on_batch(n_done)`` is called on every rank after each batch is written (a hook for tests
    and progress reports; an exception raised in it stops the run, leaving a resumable partial
    file). Returns ``path``.
    """
    path = Path(path)
    validation.integer(n_samples, "the number of samples", low=1)
    if not isinstance(settings, SimulationSettings):
        raise ValueError(f"settings must be SimulationSettings, got {type(settings).__name__}")
    validation.integer(batch_size, "batch_size", low=1)
    settings.check_noise_floor()
    n_samples = int(n_samples)
    grid = settings.grid

    masks, sha = None, ""
    if masks_dir is not None and grid.dim == 3:
        raise ValueError("mask images (--masks) are 2-D; the phantoms of a 3-D grid or mesh come "
                         "from the generator (--family, --shapes): leave out --masks")
    if masks_dir is not None:
        _, masks, sha = _on_root(comm, lambda: load_mask_folder(masks_dir, grid))
    attrs = _file_attrs(settings, n_samples, masks_dir, 0 if masks is None else len(masks), sha)

    model: ElasticityModel | None = None
    region = None

    def solve(index: int) -> Sample:
        nonlocal model, region
        if model is None:
            model = ElasticityModel.on_grid(settings.space, MPI.COMM_SELF, settings.forward)
            region = None if settings.mesh is None else phantom_region(settings)
        return simulate_sample(index, settings, model, masks, region)

    try:
        run_batches(comm, lambda: _SampleFile(path, attrs, settings, overwrite), solve,
                    batch_size=batch_size, progress=f"simulate {path.name}" if progress else None,
                    on_batch=on_batch)
    finally:
        if model is not None:
            model.destroy()
    return path


# -- reading -------------------------------------------------------------------------------------

class Dataset:
    """A validated data set file, read lazily (h5py, read-only; safe on every rank at once).

    Use as a context manager or call :meth:`close`. ``len(dataset)`` is the number of samples,
    ``dataset.sample(i)`` one :class:`Sample`, ``dataset.read(name)`` a whole stack.
    """

    def __init__(self, path: str | os.PathLike, check_data: bool = True):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"data set {str(self.path)!r} does not exist")
        if not self.path.is_file():
            raise FileNotFoundError(f"data set {str(self.path)!r} is not a file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            raise ValueError(f"data set {str(self.path)!r} is not a readable HDF5 file (truncated "
                             f"or corrupt?): {error}") from None
        try:
            self._validate(check_data)
        except (OSError, KeyError, RuntimeError) as error:  # h5py on a damaged object or chunk
            self._file.close()
            raise ValueError(f"data set {str(self.path)!r} is damaged (truncated or corrupt?): "
                             f"{error}") from None
        except Exception:
            self._file.close()
            raise

    def _fail(self, message: str):
        raise ValueError(f"data set {str(self.path)!r}: {message}")

    def _validate(self, check_data: bool) -> None:
        f = self._file
        attrs = f.attrs
        if _plain(attrs.get("format")) != FORMAT:
            self._fail(f"not a fenics-red data set (attribute format is "
                       f"{_plain(attrs.get('format'))!r}, expected {FORMAT!r})")
        version = _plain(attrs.get("format_version"))
        if version not in READ_VERSIONS:
            self._fail(f"format version {version!r} is not supported (this fenics-red reads "
                       f"versions {list(READ_VERSIONS)})")
        self.format_version = version
        missing = [k for k in ("n_samples", "fenics_red_version", "n_masks", "masks_sha256")
                   if k not in attrs]
        if missing:
            self._fail(f"missing attribute(s) {missing}")
        try:
            self.settings = SimulationSettings.from_attrs(attrs)
        except ValueError as error:
            self._fail(str(error))
        if version >= 2:  # the mesh is stored; a grid's is checked, a mesh's is used
            layout = _plain(attrs.get("layout"))
            if layout not in ("grid", "mesh"):
                self._fail(f"attribute layout must be 'grid' or 'mesh', got {layout!r}")
            mesh = self._read_mesh()
            if layout == "mesh":
                self.settings = dataclasses.replace(self.settings, mesh=mesh)
        n = _plain(attrs["n_samples"])
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            self._fail(f"attribute n_samples must be a positive integer, got {n!r}")
        self.n_samples = n
        present = [name for name in TRUTH_DATASETS if name in f]
        if len(present) == 1:
            self._fail(f"dataset {present[0]!r} without "
                       f"{(set(TRUTH_DATASETS) - set(present)).pop()!r}: a data set has both "
                       "(the truth) or neither (a real measurement)")
        self.has_truth = bool(present)
        shape = self.settings.value_shape
        self.dim = self.settings.dim
        expected = {name: ((n, *shape), "f") for name in image_datasets(self.dim)}
        expected.update(mask=((n, *shape), "iu"), noise_std=((n, self.dim), "f"),
                        force_std=((n,), "f"),
                        done=((n,), "iub"))
        if not self.has_truth:
            for name in TRUTH_DATASETS:
                del expected[name]
            for name in CLEAN_DATASETS:  # a measurement has no clean displacement
                if name in expected and name not in f:
                    del expected[name]
        for name in FLAG_DATASETS:
            if name in f:
                expected[name] = ((n, *shape), "iub")
        for name, (want, kinds) in expected.items():
            if name not in f:
                self._fail(f"dataset {name!r} is missing")
            d = f[name]
            if not hasattr(d, "shape"):
                self._fail(f"{name!r} is a group, expected a dataset")
            if d.shape != want:
                self._fail(f"dataset {name!r} has shape {d.shape}, expected {want} "
                           f"(n_samples, ...) from the attributes")
            if d.dtype.kind not in kinds:
                self._fail(f"dataset {name!r} has dtype {d.dtype}, expected "
                           f"{'float' if kinds == 'f' else 'integer'}")
        done = np.asarray(f["done"][...])
        if not (done == 1).all():
            self._fail(f"incomplete: {int((done == 1).sum())} of {n} samples were written (an "
                       "interrupted run; run the same simulate command again to finish it)")
        if check_data:
            self.check_values()

    def _read_mesh(self) -> MeshArrays:
        f = self._file
        arrays = {}
        for name in ("points", "cells", "load", "support"):
            key = f"mesh/{name}"
            if key not in f or not hasattr(f[key], "shape"):
                self._fail(f"format 2 needs the dataset {key!r} (the mesh)")
            arrays[name] = np.asarray(f[key][...])
        if "mesh/force" in f:
            arrays["force"] = np.asarray(f["mesh/force"][...])
        stored = _plain(f.attrs.get("mesh_sha256"))
        damaged = "the mesh does not match its fingerprint mesh_sha256 (damaged file?)"
        try:
            mesh = MeshArrays(**arrays)
        except ValueError as error:  # a damaged file is said so, not "remove the bad nodes"
            if stored != _arrays_digest(**arrays):
                self._fail(damaged)
            self._fail(str(error))
        if stored != mesh_digest(mesh):
            self._fail(damaged)
        return mesh

    def check_values(self, samples: range | None = None) -> None:
        """Check the values of ``samples`` (default: all), block by block: finite fields,
        ``E > 0``, non-negative mask labels, ``noise_std`` finite and above round-off of the
        sample's largest displacement (:data:`NOISE_FLOOR`), ``force_std`` finite and >= 0.
        Raises ``ValueError`` naming the first bad sample. What ``load_dataset`` checks for
        every sample (``check_data``), and ``show`` for the one it draws."""
        f = self._file
        rows = range(self.n_samples) if samples is None else samples
        per_block = max(1, int(2**25 // (8 * np.prod(self.settings.value_shape))))
        largest = np.zeros(len(rows))  # of each sample's noisy displacement
        for name in (*image_datasets(self.dim), "mask"):
            if name not in f:  # no truth (or no clean displacement)
                continue
            d = f[name]
            for first in range(0, len(rows), per_block):
                start = rows.start + first
                block = d[start:min(start + per_block, rows.stop)]
                if name == "mask":
                    if (block < 0).any():
                        self._fail("dataset 'mask' has negative labels")
                    continue
                finite = np.isfinite(block)
                if not finite.all():
                    i, *where = np.argwhere(~finite)[0]
                    at = (f"row {where[0]}, column {where[1]}" if len(where) == 2
                          else f"node {where[0]}" if len(where) == 1
                          else f"voxel {tuple(int(w) for w in where)}")
                    self._fail(f"dataset {name!r} has {int((~finite).sum())} non-finite value(s) "
                               f"(NaN or inf), first in sample {start + i} at {at}")
                if name == "E" and not (block > 0).all():
                    i = int(np.argwhere((block <= 0).reshape(len(block), -1).any(axis=1))[0, 0])
                    lost = " (all zero: a lost write?)" if not block[i].any() else ""
                    self._fail(f"dataset 'E' must be strictly positive; sample {start + i} has "
                               f"minimum {float(block[i].min())!r}{lost}")
                if name.endswith("_noisy"):
                    at = slice(first, first + len(block))
                    largest[at] = np.maximum(largest[at], np.abs(block).reshape(
                        len(block), -1).max(axis=1))
        sigma = f["noise_std"][rows.start:rows.stop]
        if not (np.isfinite(sigma).all() and (sigma > 0).all()):
            i = int(np.argwhere(~(np.isfinite(sigma) & (sigma > 0)).all(axis=1))[0, 0])
            self._fail(f"dataset 'noise_std' must be finite and > 0; sample {rows.start + i} has "
                       f"{sigma[i].tolist()}")
        # below round-off of the data (or with sigma² out of double precision's range) the
        # noise weights 1/sigma² are meaningless and the methods divide by zero
        floor = np.maximum(NOISE_FLOOR * largest, np.sqrt(np.finfo(np.float64).tiny))
        low = (sigma < floor[:, None]).any(axis=1)
        if low.any():
            i = int(np.argmax(low))
            self._fail(f"dataset 'noise_std' of sample {rows.start + i} is {sigma[i].min():.3g}, "
                       f"below {NOISE_FLOOR:g} of its largest displacement ({largest[i]:.3g}) "
                       "where double precision's round-off dominates: give the measurement's "
                       "real noise level")
        force = f["force_std"][rows.start:rows.stop]
        if not (np.isfinite(force).all() and (force >= 0).all()):
            i = int(np.argwhere(~(np.isfinite(force) & (force >= 0)))[0, 0])
            self._fail(f"dataset 'force_std' must be finite and >= 0; sample {rows.start + i} "
                       f"has {force[i].tolist()}")

    # -- access ----------------------------------------------------------------------------------

    @property
    def grid(self) -> ImageGrid:
        return self.settings.grid

    @property
    def mesh(self) -> MeshArrays | None:
        """The mesh of a format-2 data set (``None`` on an image grid)."""
        return self.settings.mesh

    @property
    def value_shape(self) -> tuple[int, ...]:
        """Shape of one sample's nodal arrays (an image, or ``(N,)`` on a mesh)."""
        return self.settings.value_shape

    @property
    def attrs(self) -> dict:
        """All file attributes as plain Python values."""
        return {key: _plain(value) for key, value in self._file.attrs.items()}

    @property
    def measurement(self) -> dict | None:
        """How an imported measurement was read (:mod:`fenics_red.measured`); ``None`` for a
        simulated data set."""
        if _plain(self._file.attrs.get("source")) != "measurement":
            return None
        try:
            return json.loads(_plain(self._file.attrs["measurement"]))
        except (KeyError, TypeError, json.JSONDecodeError):
            self._fail("an imported measurement needs its attribute 'measurement' (JSON)")

    def valid(self, index: int) -> np.ndarray:
        """Booleans ``value_shape``: where sample ``index`` was measured (all True unless the
        data set says otherwise)."""
        if "valid" not in self._file:
            return np.ones(self.value_shape, dtype=bool)
        return np.asarray(self._file["valid"][index]) != 0

    def reference(self, index: int) -> np.ndarray | None:
        """Booleans ``value_shape`` of the reference region of sample ``index`` (or ``None``)."""
        if "reference" not in self._file:
            return None
        return np.asarray(self._file["reference"][index]) != 0

    def __len__(self) -> int:
        return self.n_samples

    def sample(self, index: int) -> Sample:
        """Sample ``index`` (``0 <= index < n_samples``; raises ``IndexError`` otherwise)."""
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"sample index must be an integer, got {index!r}")
        if not 0 <= index < self.n_samples:
            raise IndexError(f"sample {index} does not exist: {str(self.path)!r} has "
                             f"{self.n_samples} samples (0 to {self.n_samples - 1})")
        f, i = self._file, int(index)
        images = {name: np.asarray(f[name][i], dtype=np.float64) if name in f else None
                  for name in image_datasets(self.dim)}
        sigma = f["noise_std"][i]
        return Sample(i, mask=np.asarray(f["mask"][i]) if "mask" in f else None,
                      noise_std=tuple(float(v) for v in sigma),
                      force_std=float(f["force_std"][i]), **images)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(self.n_samples):
            yield self.sample(i)

    def read(self, name: str, index=slice(None)) -> np.ndarray:
        """A whole dataset (or ``index`` of it) as a numpy array, e.g. ``read("E")``."""
        names = [*image_datasets(self.dim), "mask", "noise_std", "force_std"]
        if name not in names:
            raise KeyError(f"no dataset {name!r}; choose from {names}")
        if name not in self._file:
            raise KeyError(f"data set {str(self.path)!r} has no truth ({name!r}): a real "
                           "measurement")
        return np.asarray(self._file[name][index])

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        g = self.grid
        cells = g.label().replace(" ", "")
        return (f"Dataset({str(self.path)!r}, n_samples={self.n_samples}, grid={cells}, "
                f"snr_db={self.settings.snr_db})")


def load_dataset(path: str | os.PathLike, check_data: bool = True) -> Dataset:
    """Open and validate a data set (layout: module docstring).

    Checks the format attributes, the settings, every dataset's presence, shape and dtype, that
    all samples were written, and (``check_data``) that all values are finite, ``E > 0``,
    ``noise_std > 0`` and ``force_std >= 0``. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` saying what is wrong otherwise. Not collective.
    """
    return Dataset(path, check_data)
