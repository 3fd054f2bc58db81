"""Your own measurements: displacement files in physical units as data sets (``fenics-red import``).

A measurement is a displacement field, with no truth, from speckle tracking or another
finite-element code. :func:`import_measurement` reads it, checks it, converts it to the package's
units and writes a data set of format 2 (:mod:`fenics_red.data`, ``source = "measurement"``) that
``reconstruct`` and ``evaluate`` take; :func:`export_estimates` writes a reconstruction back in
the user's layout and units.

Two layouts (:class:`ImportSettings`):

* **nodal**: node coordinates ``(N, 2)`` or ``(N, 3)`` (3-D: depth along ``z``, ``uz`` the
  axial component), cells ``(M, 3)`` or ``(M, 4)`` 0- or 1-based (detected, or
  ``index_base``), and the
  displacement as component arrays or one vector ``(N, d)``, ``(d, N)`` or interleaved
  ``[ux0, uy0, ux1, ...]``. Or the mesh from a gmsh/XDMF file (``mesh``), in its node order.
* **image**: axial and lateral displacement images with the depth along the first axis (row 0
  at the probe, the axial displacement positive away from it), a pixel ``spacing`` (axial,
  lateral) and an optional region of interest; the pixels become the nodes of a triangle mesh
  (:meth:`~fenics_red.domain.MeshArrays.of_grid`), or the images are sampled bilinearly at the
  nodes of a given ``mesh`` (:mod:`fenics_red.raster`).

Files: ``.npy`` (one array, the displacement), ``.npz``, MATLAB ``.mat`` (v5 by
:func:`scipy.io.loadmat`, v7.3 by h5py, transposed back to MATLAB's shapes), ``.h5``, XDMF and
VTK ``.vtu``/``.vtk`` (meshio: its points, cells and point data; an XDMF time series such as
DOLFINx's ``write_function`` output: its last step). Missing values (NaN, or 0 in
a validity mask) carry no data: they are filled by harmonic interpolation over the mesh so that
``D(u)`` can be assembled, kept out of the noise estimate, and flagged in the data set's
``valid`` dataset (the estimate there is drawn but not trusted).

Units: lengths and displacements in m, mm or µm are stored in mm; the modulus is computed in the
package's unit (1 = 100 kPa) and reported in Pa or kPa. With a known ``traction`` (Pa) the modulus
is absolute. Without it, the usual case in ultrasound, the modulus is known only up to a factor:
the model is loaded by a nominal traction (the measured mean axial strain, so the background
comes out near 1) and the output is the relative modulus ``E / median(E)`` over the measured nodes
(``normalise = "background"``) or over a reference region (``"reference"``), optionally times a
known ``reference_modulus`` (a gel of known stiffness). The statistical estimators are
scale-equivariant (``tests/test_measured.py``), so this equals the known-force estimate divided by
its median.

The held components of the support (all of them when fixed, the depth one when sliding) are
measured relative to their mean over the support nodes (a rigid translation, invisible to
``D(u)E = K(E)u``, that the output-error baselines would otherwise fit). The noise level is given
(``snr_db`` or ``noise_std``) or estimated by :func:`fenics_red.measurements.estimate_noise_std`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mpi4py import MPI

import numpy as np
from scipy import sparse
from scipy.sparse import linalg as sparse_linalg

from . import validation
from .domain import Domain, MeshArrays, check_cells, planar_points, read_domain, read_meshio
from .io import atomic_output, check_input_file, check_output_path, file_sha256, plain, to_json
from .parallel import on_root

__all__ = ["ImportSettings", "Measured", "VariableFile", "import_measurement", "read_measurement",
           "export_estimates", "output_modulus", "LENGTH_UNITS", "MODULUS_UNITS", "KPA"]

#: Length and displacement units, as millimetres.
LENGTH_UNITS = {"m": 1e3, "mm": 1.0, "um": 1e-3, "µm": 1e-3}
#: Modulus (and stress) units, as kPa.
MODULUS_UNITS = {"Pa": 1e-3, "kPa": 1.0}
#: The package's modulus unit in kPa (normalised moduli: 1 = 100 kPa).
KPA = 100.0
SUFFIXES = (".npy", ".npz", ".mat", ".h5", ".hdf5", ".xdmf", ".vtu", ".vtk")
#: the mesh formats among them: a mesh with data at its nodes, read and written by meshio
MESH_SUFFIXES = (".xdmf", ".vtu", ".vtk")
NORMALISATIONS = ("background", "reference")

_DEFAULT_NAMES = {
    "nodes": ("nodes", "points", "coordinates", "coords", "p", "xy", "x"),
    "cells": ("cells", "elements", "triangles", "tetrahedra", "connectivity", "t", "tri"),
    "displacement": ("displacement", "u", "U", "disp"),
    "axial": ("axial", "uz_axial", "u_axial", "axial_displacement"),
    "lateral": ("lateral", "u_lateral", "lateral_displacement"),
    "valid": ("valid", "validity", "valid_mask"),
}


def _unit(value: str, units: Mapping, what: str) -> float:
    if value not in units:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(units)}")
    return float(units[value])


# -- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportSettings:
    """How to read a measurement file (``fenics-red import`` flags; stored with the data set).

    Attributes:
        layout: ``"nodal"``, ``"image"``, or ``"auto"`` (image when ``spacing`` is given).
        nodes, cells: variable names of the node coordinates and cells (default: the first of
            the usual names present, e.g. ``nodes``/``points``, ``cells``/``elements``).
        displacement: one variable with every component (``(N, d)``, ``(d, N)`` or, with
            ``interleaved``, ``[ux0, uy0, ux1, ...]``; for images ``(2, rows, cols)`` as axial,
            lateral). ``ux``, ``uy``, ``uz``: separate components instead (nodal).
        axial, lateral: the image variables (default ``axial``, ``lateral``).
        interleaved: a 1-D ``displacement`` is interleaved by node.
        index_base: 0 or 1 for the cells (default: detected; a file that contradicts it is
            refused).
        mesh: a mesh file (gmsh ``.msh``, XDMF, VTK, ...): nodal data are in its node order;
            images are sampled at its nodes.
        spacing: image pixel size ``(axial, lateral)`` in ``length_unit``.
        roi: image region ``(depth_from, depth_to, lateral_from, lateral_to)`` in ``length_unit``
            (depth from the first row, lateral from the first column).
        valid: variable of a validity mask (nonzero where the displacement was measured).
        load_facets, support_facets: variables of the loaded and supported boundary facets as
            node lists ``(F, d)`` in the cells' numbering (default: the facets at the largest and
            smallest depth coordinate, the last one).
        reference: variable of a reference-region mask (``normalise = "reference"``).
        length_unit, displacement_unit: ``m``, ``mm`` or ``um``; modulus_unit: ``Pa`` or ``kPa``.
        traction: the known probe pressure on the loaded boundary in Pa (``None``: unknown force).
        force: instead, a variable of known nodal forces (nodal data; shaped as the
            displacement) in Pa times the length unit to the power ``d - 1`` (N/m per unit
            thickness in 2-D with metres, N in 3-D).
        normalise: with an unknown force, ``"background"`` (median over the measured nodes) or
            ``"reference"`` (median over the ``reference`` mask).
        reference_modulus: the modulus of that background or region in ``modulus_unit``
            (scales the relative modulus to absolute values).
        support, plane, nu: the forward model (:class:`~fenics_red.forward.ForwardSettings`).
        snr_db, noise_std: the noise level (SNR in dB, or ``σ`` per component in
            ``displacement_unit``); neither: estimated from the data.
        noise_ratio: ``σ_lateral / σ_axial`` with ``snr_db`` (default 1).
    """

    layout: str = "auto"
    nodes: str | None = None
    cells: str | None = None
    displacement: str | None = None
    ux: str | None = None
    uy: str | None = None
    uz: str | None = None
    axial: str | None = None
    lateral: str | None = None
    interleaved: bool = False
    index_base: int | None = None
    mesh: str | None = None
    mesh_facets: str | None = None
    spacing: tuple[float, float] | None = None
    roi: tuple[float, float, float, float] | None = None
    valid: str | None = None
    reference: str | None = None
    load_facets: str | None = None
    support_facets: str | None = None
    length_unit: str = "mm"
    displacement_unit: str = "mm"
    modulus_unit: str = "kPa"
    traction: float | None = None
    force: str | None = None
    normalise: str = "background"
    reference_modulus: float | None = None
    support: str = "fixed"
    plane: str = "stress"
    nu: float = 0.495
    snr_db: float | None = None
    noise_std: tuple[float, ...] | None = None
    noise_ratio: float = 1.0

    def __post_init__(self):
        set_ = object.__setattr__
        validation.one_of(self.layout, "layout", ("auto", "nodal", "image"))
        _unit(self.length_unit, LENGTH_UNITS, "length unit")
        _unit(self.displacement_unit, LENGTH_UNITS, "displacement unit")
        _unit(self.modulus_unit, MODULUS_UNITS, "modulus unit")
        validation.one_of(self.normalise, "normalise", NORMALISATIONS)
        if self.index_base is not None:
            validation.one_of(self.index_base, "the cells' index base", (0, 1))
        if self.mesh_facets is not None and self.mesh is None:
            raise ValueError("--facets marks the boundary of a mesh file; give --mesh too")
        if self.spacing is not None:
            set_(self, "spacing", validation.per_component(
                self.spacing, "the pixel spacing", (2,), shape_hint="two sizes (axial, lateral)"))
        if self.roi is not None:
            roi = tuple(validation.finite(v, "the region of interest") for v in self.roi)
            if len(roi) != 4 or roi[0] >= roi[1] or roi[2] >= roi[3]:
                raise ValueError("the region of interest must be DEPTH_FROM DEPTH_TO LATERAL_FROM "
                                 f"LATERAL_TO with from < to, got {self.roi!r}")
            set_(self, "roi", roi)
        if self.traction is not None and self.force is not None:
            raise ValueError("give the load once: a traction or nodal forces, not both")
        if self.traction is not None:
            set_(self, "traction", validation.positive(self.traction, "the traction (Pa)"))
        if self.known_force:
            if self.reference_modulus is not None:
                raise ValueError("a known traction gives absolute moduli; the reference modulus "
                                 "is for an unknown force (leave out one of them)")
        if self.reference_modulus is not None:
            set_(self, "reference_modulus", validation.positive(self.reference_modulus,
                                                                "the reference modulus"))
        if self.normalise == "reference" and self.reference is None:
            raise ValueError("normalising to a reference region needs the region: name its mask "
                             "variable (--reference NAME)")
        if self.snr_db is not None and self.noise_std is not None:
            raise ValueError("give the noise level once: an SNR or sigma per component, not both")
        if self.snr_db is not None:
            set_(self, "snr_db", validation.finite(self.snr_db, "the SNR",
                                                   what="a finite number of dB"))
        if self.noise_std is not None:
            set_(self, "noise_std", validation.per_component(self.noise_std, "the noise sigma"))
        set_(self, "noise_ratio", validation.positive(self.noise_ratio, "the noise ratio"))
        # the forward model's own checks (nu, plane, support)
        self.forward_settings(1.0)

    def check_flags(self) -> None:
        """Refuse options that this import would ignore without a word. At import only: a data
        set keeps its settings as given, and reading them back must not fail."""
        if self.reference is not None and self.normalise != "reference":
            raise ValueError("--reference names the region that --normalise reference divides by: "
                             "add --normalise reference, or leave --reference out")
        if self.noise_ratio != 1.0 and self.snr_db is None:
            raise ValueError("--noise-ratio splits the noise of --snr between the components: "
                             "give --snr too, or sigma per component with --noise-std")
        if self.interleaved and self.displacement is None and (self.ux or self.uy or self.uz):
            raise ValueError("--interleaved is for one --displacement variable with every "
                             "component, not for --ux/--uy/--uz")
        nodal_only = [flag for flag, value in (
            ("--nodes", self.nodes), ("--cells", self.cells), ("--ux", self.ux),
            ("--uy", self.uy), ("--uz", self.uz), ("--index-base", self.index_base),
            ("--load-facets", self.load_facets), ("--support-facets", self.support_facets),
            ("--force", self.force), ("--interleaved", self.interleaved or None))
            if value is not None]
        if self.image and nodal_only:
            raise ValueError(f"{', '.join(nodal_only)} {'is' if len(nodal_only) == 1 else 'are'} "
                             "for nodal data, and --spacing makes these images (--axial, "
                             "--lateral): leave them out, or drop --spacing for nodal data")

    @property
    def image(self) -> bool:
        return self.layout == "image" or (self.layout == "auto" and self.spacing is not None)

    @property
    def known_force(self) -> bool:
        return self.traction is not None or self.force is not None

    def forward_settings(self, traction: float):
        from .forward import ForwardSettings

        return ForwardSettings(nu=self.nu, plane=self.plane, traction=traction,
                               support=self.support)

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self), for_json=True)

    @classmethod
    def from_dict(cls, values: Mapping) -> ImportSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# -- reading named arrays ------------------------------------------------------------------------

@contextlib.contextmanager
def _no_pickles():
    """numpy's refusal of pickled objects (also what it makes of bytes that are no numpy
    file) said for a user."""
    try:
        yield
    except ValueError as error:
        if "pickle" not in str(error):
            raise
        raise ValueError("it is not a numpy file of arrays (numpy finds pickled Python objects, "
                         "which are never loaded: a corrupt file, or one saved with objects)"
                         ) from None


class VariableFile:
    """The named arrays of a measurement file (``.npy``, ``.npz``, ``.mat`` v5/v7.3, ``.h5``,
    XDMF). ``names`` lists them; :meth:`get` returns one as a numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = check_input_file(path, "measurement file")
        self.suffix = self.path.suffix.lower()
        if self.suffix not in SUFFIXES:
            raise ValueError(f"measurement file {str(self.path)!r}: unknown suffix "
                             f"{self.path.suffix!r}; use one of {', '.join(SUFFIXES)}")
        self.kind = {".hdf5": ".h5"}.get(self.suffix, self.suffix)
        reader = "mesh" if self.kind in MESH_SUFFIXES else self.kind[1:]
        try:
            self._arrays = getattr(self, "_read_" + reader)()
        except (ValueError, KeyError) as error:
            raise ValueError(f"measurement file {str(self.path)!r}: {error}") from None
        except Exception as error:  # a reader's own exception on a corrupt file
            raise ValueError(f"measurement file {str(self.path)!r} cannot be read as "
                             f"{self.kind} ({type(error).__name__}: {error}); is it truncated "
                             "or of another format?") from None
        self.version = getattr(self, "version", self.kind)

    @property
    def names(self) -> list[str]:
        return sorted(self._arrays)

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def get(self, name: str, what: str) -> np.ndarray:
        """The array ``name`` (``what`` it is for, for the error)."""
        if name not in self._arrays:
            raise ValueError(f"{str(self.path)!r} has no variable {name!r} ({what}); it has "
                             f"{', '.join(self.names) or 'no arrays'}")
        array = np.asarray(self._arrays[name])
        if array.dtype.kind not in "fiub":
            raise ValueError(f"variable {name!r} ({what}) holds {array.dtype} data, not numbers")
        return array

    def find(self, given: str | None, key: str, what: str, required: bool = True) -> str | None:
        """The variable name ``given``, or the first usual name for ``key`` in the file."""
        if given is not None:
            self.get(given, what)
            return given
        for name in _DEFAULT_NAMES[key]:
            if name in self._arrays:
                return name
        if required:
            raise ValueError(f"{str(self.path)!r} has none of the usual names for {what} "
                             f"({', '.join(_DEFAULT_NAMES[key])}); name it with --{key} "
                             f"(variables: {', '.join(self.names) or 'none'})")
        return None

    # one reader per format --------------------------------------------------------------------

    def _read_npy(self) -> dict:
        with _no_pickles():
            return {"displacement": np.load(self.path, allow_pickle=False)}

    def _read_npz(self) -> dict:
        with _no_pickles(), np.load(self.path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}

    def _read_mat(self) -> dict:
        import scipy.io

        try:
            contents = scipy.io.loadmat(self.path)
            self.version = "mat v5"
        except NotImplementedError:  # v7.3 files are HDF5
            self.version = "mat v7.3"
            return self._read_h5(transpose=True)
        return {k: v for k, v in contents.items() if not k.startswith("__")}

    def _read_h5(self, transpose: bool = False) -> dict:
        import h5py

        arrays = {}

        def visit(name, item):
            if isinstance(item, h5py.Dataset) and not name.startswith("#"):
                array = item[()]
                # MATLAB v7.3 stores column-major arrays: h5py sees the shape reversed
                arrays[name] = np.asarray(array).T if transpose else np.asarray(array)

        with h5py.File(self.path, "r") as f:
            f.visititems(visit)
        return arrays

    def _read_mesh(self) -> dict:  # XDMF, VTK: a mesh with point data, read by meshio
        data, cells = read_meshio(self.path)
        if len(cells) != 1:
            raise ValueError(f"a {self.kind} measurement needs one block of triangles or "
                             f"tetrahedra, got {[block.type for block in data.cells]}")
        arrays = {"nodes": data.points, "cells": cells[0].data}
        for name, values in data.point_data.items():
            arrays[name] = values
        self.index_base = 0
        return arrays


# -- the measurement on a mesh -------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Measured:
    """A measurement on a mesh, in mm: what :func:`read_measurement` returns.

    ``displacement`` is ``(d, N)`` in file node order (missing values filled), ``valid`` and
    ``reference`` are ``(N,)`` booleans, ``layout`` says how to write values back in the user's
    layout (:func:`export_estimates`).
    """

    mesh: MeshArrays
    displacement: np.ndarray
    valid: np.ndarray
    reference: np.ndarray | None
    layout: dict


def _vector(array: np.ndarray) -> np.ndarray:
    """A MATLAB-style ``(n, 1)`` or ``(1, n)`` array as ``(n,)``."""
    if array.ndim == 2 and 1 in array.shape:
        return array.ravel()
    return array


def _rows(array: np.ndarray, widths: tuple = (2, 3)) -> np.ndarray:
    """A table of one row per node, cell or facet (``(M, w)``, ``w`` in ``widths``), also when
    stored ``(w, M)``, as MATLAB codes often store them."""
    if array.ndim == 2 and array.shape[1] not in widths and array.shape[0] in widths:
        return array.T
    return array


def _cells(array: np.ndarray, n_nodes: int, base: int | None, name: str,
           width: int | None = None) -> tuple[np.ndarray, int, str]:
    """0-based integer cells (or facets: ``width`` nodes each), the index base and how it was
    found."""
    array = np.asarray(array)
    widths = (3, 4) if width is None else (width,)
    if array.ndim != 2:
        raise ValueError(f"{name!r} must be a 2-D array of node numbers "
                         f"({' or '.join(f'(M, {w})' for w in widths)}), got shape {array.shape}")
    array = _rows(array, widths)
    if array.size == 0:
        raise ValueError(f"{name!r} holds no cells (shape {array.shape})")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise ValueError(f"cells {name!r} must hold whole node numbers")
    elif array.dtype.kind not in "iu":
        raise ValueError(f"cells {name!r} must hold node numbers, got {array.dtype}")
    cells = array.astype(np.int64)
    low, high = int(cells.min()), int(cells.max())
    if base is None:
        if low == 0:
            base, how = 0, "detected: a cell uses node 0"
        elif high == n_nodes:
            base, how = 1, f"detected: a cell uses node {n_nodes} of {n_nodes}"
        else:
            raise ValueError(f"cannot tell whether the cells {name!r} are 0- or 1-based (no cell "
                             f"uses node 0 or node {n_nodes}); pass --index-base 0 or 1")
    else:
        how = "given"
        fix = (f"drop --index-base {base}" if width is None else
               f"the cells are {base}-based: number the facets as the cells")
        if base == 0 and high == n_nodes:
            raise ValueError(f"{'cells' if width is None else 'facets'} {name!r} use node "
                             f"{n_nodes} of {n_nodes} nodes: they look 1-based, not 0-based "
                             f"({fix})")
        if base == 1 and low == 0:
            raise ValueError(f"{'cells' if width is None else 'facets'} {name!r} use node 0: "
                             f"they are 0-based, not 1-based ({fix})")
    cells = cells - base
    if cells.min() < 0 or cells.max() >= n_nodes:
        bad = int(cells.min() + base if cells.min() < 0 else cells.max() + base)
        raise ValueError(f"cells {name!r} reference node {bad}, but there are {n_nodes} nodes "
                         f"({base}-based: {base} to {n_nodes - 1 + base})")
    return cells, base, how


def _field(file: VariableFile, name: str, n: int, d: int, interleaved: bool, what: str
           ) -> tuple[np.ndarray, dict]:
    """A nodal vector field ``(d, N)`` stored as ``(N, d)``, ``(d, N)`` or interleaved; in
    2-D also as three components whose third is zero (how VTK and meshio store 2-D vectors)."""
    array = _vector(file.get(name, what))
    how = {}
    if d == 2 and array.ndim == 2 and n != 3 and array.shape in ((n, 3), (3, n)):
        z = array[:, 2] if array.shape == (n, 3) else array[2]
        if (np.abs(z) > 1e-12 * np.nanmax(np.abs(array), initial=0.0)).any():  # NaN: False
            raise ValueError(f"{what} {name!r} has three components on a 2-D mesh and the "
                             f"third is not zero (largest {np.nanmax(np.abs(z)):.3g}): give the "
                             "3-D mesh it belongs to, or two components")
        array, how = (array[:, :2] if array.shape == (n, 3) else array[:2],
                      {"third_component": "zero, dropped"})
    if array.ndim == 1:
        if array.size != d * n:
            raise ValueError(f"{what} {name!r} has {array.size} values, but {n} nodes in "
                             f"{d}-D need {d * n}: a mesh and a {what} that do not match")
        if not interleaved:
            raise ValueError(f"{what} {name!r} is a vector of {d} x {n} values: pass "
                             "--interleaved if it is [x0, y0, x1, y1, ...]")
        return array.reshape(n, d).T.astype(np.float64), {"vector": name, "interleaved": True}
    if array.shape == (n, d):
        return array.T.astype(np.float64), {"vector": name, "shape": "nodes x components", **how}
    if array.shape == (d, n):
        return array.astype(np.float64), {"vector": name, "shape": "components x nodes", **how}
    raise ValueError(f"{what} {name!r} has shape {array.shape}; {n} nodes in {d}-D need "
                     f"({n}, {d}), ({d}, {n}) or {d * n} interleaved values: a mesh and a "
                     f"{what} that do not match")


def _components(file: VariableFile, s: ImportSettings, n: int, d: int) -> tuple[np.ndarray, dict]:
    """Nodal displacement ``(d, N)`` in the file's unit and how it was stored: the named
    components, one named vector, a vector under a usual name, or components named
    ``ux``, ``uy`` (, ``uz``)."""
    given = (s.ux, s.uy, s.uz)
    names = None
    if any(name is not None for name in given):
        names = list(given[:d])
    elif (s.displacement is None and file.find(None, "displacement", "", required=False) is None
          and all(f"u{c}" in file for c in "xyz"[:d])):
        names = [f"u{c}" for c in "xyz"[:d]]
    if names is not None:
        if any(name is None for name in names):
            raise ValueError(f"{d}-D nodes need {', '.join('--u' + c for c in 'xyz'[:d])}")
        arrays = [_vector(file.get(name, f"displacement u{c}"))
                  for name, c in zip(names, "xyz", strict=False)]
        for name, array in zip(names, arrays, strict=True):
            if array.shape != (n,):
                raise ValueError(f"displacement {name!r} has shape {array.shape}, but there are "
                                 f"{n} nodes: a mesh and a displacement that do not match")
        return np.stack(arrays).astype(np.float64), {"components": names}
    name = file.find(s.displacement, "displacement", "the displacement", required=False)
    if name is None:
        usual = ", ".join(_DEFAULT_NAMES["displacement"] + tuple(f"u{c}" for c in "xyz"[:d]))
        flags = " ".join(f"--u{c}" for c in "xyz"[:d])
        raise ValueError(f"{str(file.path)!r} has none of the usual names for the displacement "
                         f"({usual}); name it with --displacement, or its components with "
                         f"{flags} (variables: {', '.join(file.names) or 'none'})")
    return _field(file, name, n, d, s.interleaved, "displacement")


def _check_own_nodes(file: VariableFile, s: ImportSettings, points: np.ndarray) -> None:
    """With ``--mesh`` the displacement is read in the mesh file's node order: refuse
    ``--nodes``/``--cells`` (the file's own mesh, which ``--mesh`` replaces), and node
    coordinates in the file that are not the mesh file's, node for node (another order, another
    mesh), which would pair each value with the wrong node without a word."""
    if s.nodes is not None or s.cells is not None:
        raise ValueError("--nodes/--cells name the file's own mesh and --mesh replaces it: give "
                         "one or the other")
    name = next((n for n in ("nodes", "points", "coordinates", "coords") if n in file), None)
    if name is None:
        return
    try:
        own = np.asarray(file.get(name, "the node coordinates"))
    except ValueError:  # not an array of numbers: not coordinates
        return
    own = _rows(own)
    if own.ndim != 2 or own.shape[1] not in (2, 3) or own.dtype.kind not in "fiu":
        return  # not coordinates
    if own.ndim == 2 and own.shape[1] == 3 and points.shape[1] == 2:
        own = own[:, :2] if np.ptp(own[:, 2]) == 0 else own
    where = f"{str(file.path)!r} has node coordinates {name!r}"
    if own.shape != points.shape:
        raise ValueError(f"{where} of shape {own.shape}, but mesh file {str(s.mesh)!r} has "
                         f"{points.shape}: the displacement belongs to another mesh; drop --mesh "
                         "to use the file's own nodes and cells")
    gap = np.abs(own.astype(np.float64) - points).max(axis=1)
    size = float(np.ptp(points, axis=0).max())
    if gap.max() > 1e-6 * size:
        node = int(np.argmax(gap))
        raise ValueError(f"{where} that are not the nodes of mesh file {str(s.mesh)!r}, node "
                         f"for node (node {node}, 0-based, is {gap[node]:.3g} away; the same "
                         "length unit?): the "
                         "displacement is read in the mesh file's node order, so drop --mesh to "
                         "use the file's own nodes and cells, or reorder it")


def _valid_name(file: VariableFile, s: ImportSettings) -> str | None:
    """The validity mask's variable: ``--valid``, or a usual name (``valid``, ...) in the file."""
    return file.find(s.valid, "valid", "the validity mask", required=False)


def _mask(file: VariableFile, name: str | None, shape: tuple, what: str) -> np.ndarray | None:
    if name is None:
        return None
    array = file.get(name, what)
    array = _vector(array) if len(shape) == 1 else array
    if array.shape != shape:
        raise ValueError(f"{what} {name!r} has shape {array.shape}, expected {shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{what} {name!r} has non-finite values; use 0 and 1")
    if array.dtype.kind == "f" and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{what} {name!r} holds values other than 0 and 1 (e.g. "
                         f"{array[~np.isin(array, (0, 1))].flat[0]:g}): is it a mask?")
    return array != 0


def _mesh_files(s: ImportSettings) -> dict:
    """The mesh (and facets) file as resolved at import, for the layout record."""
    files = {"mesh_file": str(Path(s.mesh).resolve())}
    if s.mesh_facets is not None:
        files["facets_file"] = str(Path(s.mesh_facets).resolve())
    return files


def _nodal(file: VariableFile, s: ImportSettings, comm_self=MPI.COMM_SELF) -> tuple:
    """Mesh arrays (file length unit), displacement (file unit), validity, reference, layout."""
    layout: dict = {"layout": "nodal"}
    if s.mesh is not None:
        mesh = read_domain(s.mesh, comm_self, s.mesh_facets).to_arrays()
        layout.update(_mesh_files(s))
        points = mesh.points
        _check_own_nodes(file, s, points)
    else:
        nodes = file.find(s.nodes, "nodes", "the node coordinates")
        points = _rows(file.get(nodes, "the node coordinates"))
        if points.ndim != 2 or points.shape[1] not in (2, 3):
            raise ValueError(f"node coordinates {nodes!r} must have shape (N, 2) or (N, 3), got "
                             f"{points.shape}")
        if not np.isfinite(points).all():
            raise ValueError(f"node coordinates {nodes!r} have non-finite values")
        points = points.astype(np.float64)
        name = file.find(s.cells, "cells", "the cells")
        base = getattr(file, "index_base", None) if s.index_base is None else s.index_base
        cells, base, how = _cells(file.get(name, "the cells"), len(points), base, name)
        planar = planar_points(points, cells.shape[1])
        if planar.shape[1] != points.shape[1]:  # triangles at a constant z (meshio writes so)
            layout["z"] = float(points[0, 2])
            points = planar
        check_cells(points, cells)
        facets = {}
        for key, given in (("load", s.load_facets), ("support", s.support_facets)):
            if given is not None:
                facets[key], _, _ = _cells(file.get(given, f"the {key} facets"), len(points),
                                           base, given, width=points.shape[1])
        mesh = Domain.from_arrays(points, cells, comm_self, source=str(file.path),
                                  **facets).to_arrays()
        layout.update(nodes=nodes, cells=name, index_base=base, index_base_found=how)
    n, d = mesh.points.shape
    u, stored = _components(file, s, n, d)
    layout.update(stored)
    valid = _mask(file, _valid_name(file, s), (n,), "validity mask")
    reference = _mask(file, s.reference, (n,), "reference mask")
    if s.force is not None:
        force, stored = _field(file, s.force, n, d, s.interleaved, "nodal force")
        if not np.isfinite(force).all():
            raise ValueError(f"nodal force {s.force!r} has non-finite values")
        mesh = dataclasses.replace(mesh, force=force.T)
        layout["force"] = stored
    return mesh, u, valid, reference, layout


def _images(file: VariableFile, s: ImportSettings) -> tuple[np.ndarray, np.ndarray, dict]:
    """Axial and lateral images (rows = depth) and how they were stored."""
    if s.displacement is not None or ("displacement" in file and s.axial is None):
        name = s.displacement or "displacement"
        array = file.get(name, "the displacement images")
        if array.ndim == 3 and array.shape[0] == 2:
            return array[0], array[1], {"vector": name, "stored": "(2, rows, cols): axial, lateral"}
        if array.ndim == 3 and array.shape[2] == 2:
            return array[..., 0], array[..., 1], {"vector": name,
                                                  "stored": "(rows, cols, 2): axial, lateral"}
        raise ValueError(f"displacement images {name!r} must have shape (2, rows, cols) or "
                         f"(rows, cols, 2) (axial, lateral), got {array.shape}")
    axial = file.get(file.find(s.axial, "axial", "the axial displacement image"),
                     "the axial displacement")
    lateral = file.get(file.find(s.lateral, "lateral", "the lateral displacement image"),
                       "the lateral displacement")
    if axial.ndim != 2 or axial.shape != lateral.shape:
        raise ValueError(f"the axial and lateral displacements must be 2-D images (rows, cols) of "
                         f"one shape, got {axial.shape} and {lateral.shape}")
    return axial, lateral, {"axial": s.axial or file.find(None, "axial", ""),
                            "lateral": s.lateral or file.find(None, "lateral", "")}


def _image(file: VariableFile, s: ImportSettings) -> tuple:
    """Images onto a mesh: the ROI's pixels as nodes, or bilinear samples at a mesh's nodes."""
    from .raster import ImageGrid, _multilinear_matrix

    axial, lateral, stored = _images(file, s)
    if min(axial.shape) < 2:
        raise ValueError(f"displacement images need at least 2 x 2 pixels, got {axial.shape}")
    rows, cols = axial.shape
    valid = _mask(file, _valid_name(file, s), axial.shape, "validity mask")
    reference = _mask(file, s.reference, axial.shape, "reference mask")
    h_axial, h_lateral = s.spacing
    r0, r1, c0, c1 = 0, rows - 1, 0, cols - 1
    if s.roi is not None:
        z0, z1, x0, x1 = s.roi
        r0 = max(0, math.ceil(z0 / h_axial - 1e-9))
        r1 = min(rows - 1, math.floor(z1 / h_axial + 1e-9))
        c0 = max(0, math.ceil(x0 / h_lateral - 1e-9))
        c1 = min(cols - 1, math.floor(x1 / h_lateral + 1e-9))
        if r1 - r0 < 1 or c1 - c0 < 1:
            raise ValueError(f"the region of interest {s.roi} holds fewer than 2 x 2 pixels of the "
                             f"{rows} x {cols} image (spacing {h_axial} x {h_lateral} "
                             f"{s.length_unit})")
    window = np.s_[r0:r1 + 1, c0:c1 + 1]
    # the package's frame: x lateral from the first column, y up from the deepest row (the
    # probe at the top): pixel (i, j) is at x = j h_lateral, y = (rows - 1 - i) h_axial
    grid = ImageGrid(c1 - c0, r1 - r0, (c1 - c0) * h_lateral, (r1 - r0) * h_axial,
                     c0 * h_lateral, (rows - 1 - r1) * h_axial)
    u = np.stack([lateral[window], -axial[window]]).astype(np.float64)
    ok = _check_values(u.reshape(2, -1), None if valid is None else valid[window].ravel())
    ok = ok.reshape(u.shape[1:])
    ref = None if reference is None else reference[window]
    layout = {"layout": "image", "shape": [rows, cols], "window": [r0, r1, c0, c1],
              "spacing": list(s.spacing), **stored}
    if s.mesh is None:
        layout["grid"] = [grid.nx, grid.ny, grid.width, grid.height, grid.x0, grid.y0]
        return (MeshArrays.of_grid(grid), u.reshape(2, -1), ok.ravel(),
                None if ref is None else ref.ravel(), layout)
    # a mesh of the region: sample the images (missing pixels filled first) at its nodes
    mesh = read_domain(s.mesh, MPI.COMM_SELF, s.mesh_facets).to_arrays()
    if mesh.dim != 2:
        raise ValueError("displacement images go onto a 2-D mesh; the mesh file is 3-D")
    points = mesh.points  # in the file's length unit, like the spacing
    lower, upper = grid.pixel_points().min(axis=0), grid.pixel_points().max(axis=0)
    tol = 1e-9 * max(grid.width, grid.height)
    if (points < lower - tol).any() or (points > upper + tol).any():
        raise ValueError("the mesh reaches outside the image (region of interest); mesh and image "
                         "share one frame: x lateral from the first column, y up from the "
                         "deepest row (y = (rows - 1) x spacing - depth)")
    image_mesh = MeshArrays.of_grid(grid)
    filled = _fill(image_mesh, np.where(ok.ravel(), u.reshape(2, -1), np.nan), ok.ravel())
    B = _multilinear_matrix(grid, points)
    node_ok = (B @ (~ok.ravel()).astype(float)) < 1e-12
    node_ref = None if ref is None else (B @ ref.ravel().astype(float)) > 0.5
    layout.update(_mesh_files(s))
    if s.snr_db is None and s.noise_std is None:
        layout["sampled_noise_std"] = _sampled_noise(image_mesh, u.reshape(2, -1), ok.ravel(),
                                                     B, node_ok)
    return mesh, np.stack([B @ c for c in filled]), node_ok, node_ref, layout


def _sampled_noise(pixels: MeshArrays, u: np.ndarray, ok: np.ndarray, B, node_ok: np.ndarray
                   ) -> list[float]:
    """``σ`` per component of images sampled at a mesh's nodes (``B``: the bilinear weights),
    in the images' unit: estimated on the pixels, where the noise is white (on the smooth
    interpolant at finer nodes the local fits see almost none: 5 times too low), times the
    root mean square over the measured nodes of ``sqrt(Σ_j B_ij²)``, the noise a weighted sum
    of independent pixels keeps."""
    from .measurements import estimate_noise_std

    sigma = estimate_noise_std(pixels, np.where(ok, u, 0.0), valid=ok)
    gain = float(np.sqrt(np.mean(np.asarray(B.multiply(B).sum(axis=1)).ravel()[node_ok])))
    return [gain * float(v) for v in sigma]


def _fill(mesh: MeshArrays, u: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``u`` with its values at ``~valid`` nodes replaced by the harmonic interpolant (graph
    Laplacian of the mesh's edges) of the valid ones."""
    missing = ~valid
    if not missing.any():
        return u
    A = mesh.adjacency()
    L = sparse.diags(np.asarray(A.sum(axis=1)).ravel()) - A
    Luu = L[missing][:, missing].tocsc()
    Auk = A[missing][:, valid]
    out = u.copy()
    solve = sparse_linalg.factorized(Luu)
    for c in range(len(u)):
        out[c, missing] = solve(Auk @ np.nan_to_num(u[c, valid]))
    if not np.isfinite(out).all():
        raise ValueError("missing displacement values could not be filled: a part of the mesh "
                         "has no measured node")
    return out


def _check_values(u: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """The validity of each node: ``valid`` (checked against the values) or where ``u`` is
    finite. Non-finite values where the mask says measured are refused."""
    finite = np.isfinite(u).all(axis=0)
    if valid is None and np.isinf(u).any():  # NaN marks a node without data, not infinity
        node = int(np.flatnonzero(np.isinf(u).any(axis=0))[0])
        raise ValueError(f"the displacement has {int(np.isinf(u).sum())} infinite value(s) "
                         f"(first: node {node}, 0-based): mark nodes without data with NaN or "
                         "a validity mask")
    if valid is None:
        return finite
    bad = valid & ~finite
    if bad.any():
        raise ValueError(f"the displacement has {int(bad.sum())} non-finite value(s) where the "
                         f"validity mask says it was measured (first: node "
                         f"{int(np.flatnonzero(bad)[0])}, 0-based); mark them 0 in the mask")
    return valid


def read_measurement(path: str | os.PathLike, settings: ImportSettings) -> Measured:
    """Read and check a measurement file; the mesh and displacement in mm (serial).

    Raises ``ValueError`` with one line saying what is wrong: missing variables, shapes that do
    not match, cells outside the nodes or of the wrong index base, zero-size or inverted cells,
    non-finite values where the data are said to be valid, an unknown unit.
    """
    s = settings
    file = VariableFile(path)
    to_mm = _unit(s.length_unit, LENGTH_UNITS, "length unit")
    u_to_mm = _unit(s.displacement_unit, LENGTH_UNITS, "displacement unit")
    if s.image:
        if s.spacing is None:
            raise ValueError("displacement images need the pixel spacing: --spacing AXIAL LATERAL")
        if s.force is not None:
            raise ValueError("nodal forces (--force) go with nodal data on a mesh; give images a "
                             "--traction, or none")
        mesh, u, valid, reference, layout = _image(file, s)
    else:
        if s.spacing is not None or s.roi is not None:
            raise ValueError("--spacing and --roi describe displacement images; nodal data are on "
                             "their mesh")
        mesh, u, valid, reference, layout = _nodal(file, s)
        valid = _check_values(u, valid)
    force = None
    if mesh.force is not None:  # Pa (length unit)^(d-1) -> the package's units, mm
        force = mesh.force * (MODULUS_UNITS["Pa"] / KPA) * to_mm ** (mesh.dim - 1)
    mesh = MeshArrays(mesh.points * to_mm, mesh.cells, mesh.load, mesh.support, force)
    if not valid.any():
        raise ValueError("no node has a measured displacement (all NaN or masked out)")
    if reference is not None and not (reference & valid).any():
        raise ValueError("the reference region holds no measured node")
    u = _fill(mesh, np.where(valid, u, np.nan), valid)
    layout.update(file=str(file.path.resolve()), format=file.version, sha256=file_sha256(file.path),
                  n_nodes=int(len(mesh.points)), n_valid=int(valid.sum()))
    return Measured(mesh, u * u_to_mm, valid, reference, layout)


# -- the data set --------------------------------------------------------------------------------

def _held(support: str, d: int) -> list[int]:
    return list(range(d)) if support == "fixed" else [d - 1]


def _support_nodes(mesh: MeshArrays) -> np.ndarray:
    return np.unique(mesh.support)


def _nominal_traction(mesh: MeshArrays, u: np.ndarray, valid: np.ndarray) -> float:
    """The mean axial strain between the loaded and supported boundaries: the traction that
    loads a unit modulus (1 = 100 kPa) as much as the data show."""
    d = mesh.dim
    load, support = np.unique(mesh.load), np.unique(mesh.support)
    load, support = load[valid[load]], support[valid[support]]
    if not len(load) or not len(support):
        raise ValueError("the loaded or the supported boundary has no measured node: the force "
                         "cannot be normalised")
    depth = mesh.points[load, d - 1].mean() - mesh.points[support, d - 1].mean()
    shortening = u[d - 1, support].mean() - u[d - 1, load].mean()
    strain = shortening / depth
    if not (math.isfinite(strain) and strain > 0):
        raise ValueError(f"the data show no compression between the loaded and the supported "
                         f"boundary (mean axial strain {strain:.3g}): check the sign of the axial "
                         "displacement (positive away from the probe) and the depth axis")
    return float(strain)


def _check_noise_floor(sigma, u_mm: np.ndarray, how: str) -> None:
    """Refuse a noise level below double precision's round-off of the data (the data set's own
    check, :data:`fenics_red.data.NOISE_FLOOR`), before a data set that no method takes is
    written."""
    from .data import NOISE_FLOOR

    largest = float(np.abs(u_mm).max()) if u_mm.size else 0.0
    if min(sigma) < NOISE_FLOOR * largest:
        raise ValueError(f"the noise level {min(sigma):.3g} mm ({how}) is below {NOISE_FLOOR:g} "
                         f"of the largest displacement ({largest:.3g} mm), where double "
                         "precision's round-off dominates: give the measurement's real noise "
                         "level")


#: An SNR estimated below this (dB) is warned about: ultrasound displacements have 20-50 dB.
LOW_SNR_DB = 10.0


def _noise(s: ImportSettings, mesh: MeshArrays, u: np.ndarray, valid: np.ndarray, u_to_mm: float,
           sampled: list[float] | None = None) -> tuple[tuple[float, ...], str]:
    """The noise ``σ`` per component in mm and how it was found: given, from the SNR, from
    images sampled at a mesh's nodes (``sampled``, in the images' unit), or estimated."""
    from .measurements import estimate_noise_std, noise_std_from_energy

    d = mesh.dim
    free = valid.copy()
    free[_support_nodes(mesh)] = False
    if s.noise_std is not None:
        if len(s.noise_std) != d:
            raise ValueError(f"the noise sigma needs {d} values (one per component), got "
                             f"{len(s.noise_std)}")
        return tuple(v * u_to_mm for v in s.noise_std), "given (sigma)"
    if s.snr_db is not None:
        energy = float(np.sum(u[:, free] ** 2))
        return (noise_std_from_energy(energy, [int(free.sum())] * d, s.snr_db, s.noise_ratio,
                                      noisy=True), f"given ({s.snr_db:g} dB)")
    if sampled is not None and all(v > 0 for v in sampled):
        return (tuple(v * u_to_mm for v in sampled),
                "estimated on the images' pixels, as sampled at the mesh's nodes")
    sigma = estimate_noise_std(mesh, u, valid=valid)
    if not all(v > 0 for v in sigma):
        raise ValueError(f"the noise level estimated from the data is {sigma}: the displacement is "
                         "noise-free or piecewise linear; give it with --snr or --noise-std")
    if d == 3:
        warnings.warn("the noise level estimated from a 3-D mesh's data runs high (1.1-1.8 times "
                      "the true one at 35 dB, 1.5-6.4 times at 45 dB on the 856-node box of "
                      "meshes/: the field bends over one node spacing), and a noise level too "
                      "high stops the estimates early; give --snr or --noise-std if you know it",
                      UserWarning, stacklevel=2)
    return sigma, "estimated from the data (local linear fits, robust scale)"


def _check_size(u_mm: np.ndarray, mesh: MeshArrays, s: ImportSettings) -> None:
    """Refuse a displacement larger than the mesh, warn at 10 % of it: elastography measures
    strains of about 1 %, so such sizes are a unit mistake (or not a small-strain measurement)."""
    extent = float(np.max(np.ptp(mesh.points, axis=0)))
    largest = float(np.max(np.abs(u_mm))) if u_mm.size else 0.0
    units = (f"--displacement-unit {s.displacement_unit} and --length-unit {s.length_unit}")
    if largest > extent:
        raise ValueError(f"the displacement reaches {largest:.3g} mm on a mesh {extent:.3g} mm "
                         f"across: check {units}")
    if largest > 0.1 * extent:
        warnings.warn(f"the displacement reaches {largest:.3g} mm, {100 * largest / extent:.0f} % "
                      f"of the mesh's {extent:.3g} mm: far above the strains of elastography "
                      f"(about 1 %) and of the linear model; check {units}", UserWarning,
                      stacklevel=3)


def _snr_db(u: np.ndarray, free: np.ndarray, sigma) -> float:
    noise = sum(float(free.sum()) * v**2 for v in sigma)
    signal = float(np.sum(u[:, free] ** 2)) - noise
    return float(10 * np.log10(max(signal, 1e-3 * noise) / noise))


def import_measurement(path: str | os.PathLike, out: str | os.PathLike, settings: ImportSettings,
                       comm: MPI.Comm = MPI.COMM_WORLD, overwrite: bool = False) -> dict:
    """Read the measurement ``path`` and write the data set ``out`` (format 2, no truth).

    Rank 0 reads and writes (atomically: a failure leaves no output and an existing one intact);
    every rank raises its error. Returns a summary (noise, force, index base, counts).
    """
    settings.check_flags()
    return on_root(comm, lambda: _import(Path(path), Path(out), settings, overwrite))


def _import(path: Path, out: Path, s: ImportSettings, overwrite: bool) -> dict:
    import h5py

    from . import __version__
    from .data import FORMAT, FORMAT_VERSION, SimulationSettings, mesh_digest
    from .raster import ImageGrid

    check_output_path(out, overwrite)
    m = read_measurement(path, s)
    mesh, u, valid = m.mesh, m.displacement.copy(), m.valid
    d = mesh.dim
    validation.plane_in(s.plane, d)
    support = _support_nodes(mesh)
    held = _held(s.support, d)
    offset = [0.0] * d
    ok = support[valid[support]]
    if held and not len(ok):
        warnings.warn("no measured node on the supported boundary: the displacement there is "
                      "extrapolated from the measured nodes and its offset cannot be removed, so "
                      "the estimate next to the support is unreliable; measure down to the "
                      "support, or " + ("cut the images to the measured rows with --roi"
                                        if s.image and s.mesh is None else
                                        "give a mesh of the measured region (--mesh) whose "
                                        "bottom is measured" if s.image else
                                        "name the measured deepest facets with --support-facets"),
                      UserWarning, stacklevel=2)
    for c in held:  # the support holds these components: measure them relative to it
        if len(ok):
            offset[c] = float(u[c, ok].mean())
            u[c] -= offset[c]
    u_to_mm = LENGTH_UNITS[s.displacement_unit]
    _check_size(u[:, valid], mesh, s)  # u in mm (read_measurement converted it)
    sigma, noise_how = _noise(s, mesh, u, valid, u_to_mm, m.layout.get("sampled_noise_std"))
    _check_noise_floor(sigma, u[:, valid], noise_how)
    free = valid.copy()
    free[support] = False
    snr = _snr_db(u, free, sigma)
    if s.snr_db is None and s.noise_std is None and snr < LOW_SNR_DB:
        warnings.warn(f"the noise estimated from the data is as large as the displacement (SNR "
                      f"{snr:.1f} dB, below {LOW_SNR_DB:g}): the values may not belong to these "
                      "nodes (another node order or mesh), or be mostly noise; check them, or "
                      "give the noise level with --snr or --noise-std", UserWarning, stacklevel=2)
    if s.force is not None:
        traction, force = 0.0, "known (nodal forces)"
    elif s.known_force:
        traction = s.traction * MODULUS_UNITS["Pa"] / KPA  # Pa -> the package's unit
        force = "known"
    else:
        traction = _nominal_traction(mesh, u, valid)
        force = "unknown"
    grid = ImageGrid.covering(mesh.points.min(axis=0), mesh.points.max(axis=0),
                              mesh.mean_spacing())
    data = SimulationSettings(grid, s.forward_settings(traction), snr_db=snr,
                              noise_ratio=float(sigma[0] / sigma[-1]), mesh=mesh)
    measurement = {"settings": s.to_dict(), "source": m.layout, "force": force,
                   "noise": noise_how, "support_offset_mm": offset,
                   "output": describe_output(s)}
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION,
             "fenics_red_version": __version__, "n_samples": 1, "source": "measurement",
             **data.to_attrs(), "mesh_sha256": mesh_digest(mesh), "masks_dir": "", "n_masks": 0,
             "masks_sha256": "", "measurement": to_json(measurement),
             "image_convention": "(N,) nodal values in the node order of /mesh/points",
             "units": "lengths and displacements in mm; modulus normalised (1 = 100 kPa); "
                      "traction in the modulus unit"}
    for key in ("seed", "phantoms"):
        attrs.pop(key, None)
    with atomic_output(out, overwrite) as tmp, h5py.File(tmp, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        f["ux_noisy"] = u[0][None]
        f["uy_noisy"] = u[1][None]
        if d == 3:
            f["uz_noisy"] = u[2][None]
        f["noise_std"] = np.asarray([sigma], dtype=np.float64)
        f["force_std"] = np.zeros(1)
        f["valid"] = valid[None].astype(np.uint8)
        if m.reference is not None:
            f["reference"] = m.reference[None].astype(np.uint8)
        f["done"] = np.ones(1, dtype=np.uint8)
        group = f.create_group("mesh")
        for name in ("points", "cells", "load", "support", "force"):
            if getattr(mesh, name) is not None:
                group[name] = getattr(mesh, name)
    return {"nodes": len(mesh.points), "valid": int(valid.sum()), "noise_std_mm": list(sigma),
            "noise": noise_how, "snr_db": snr, "force": force, "layout": m.layout}


# -- what the modulus is, and writing it back ----------------------------------------------------

def describe_output(s: ImportSettings) -> dict:
    """What the reported modulus is: its unit (for the file and the colour bar) and meaning."""
    if s.known_force:
        load = (f"known traction {s.traction:g} Pa" if s.force is None
                else f"known nodal forces {s.force!r}")
        return {"unit": s.modulus_unit, "label": f"E [{s.modulus_unit}]", "short": "known force",
                "meaning": f"absolute Young's modulus in {s.modulus_unit} ({load})"}
    where = ("the median over the measured nodes (background)" if s.normalise == "background"
             else "the median over the reference region")
    if s.reference_modulus is None:
        return {"unit": "1", "label": "E / E_ref", "short": f"relative to {s.normalise}",
                "meaning": f"relative modulus: E divided by {where} (unknown force)"}
    return {"unit": s.modulus_unit, "label": f"E [{s.modulus_unit}]",
            "short": f"{s.normalise} = {s.reference_modulus:g} {s.modulus_unit}",
            "meaning": f"Young's modulus in {s.modulus_unit}, scaled so that {where} is "
                       f"{s.reference_modulus:g} {s.modulus_unit} (unknown force)"}


def output_scale(estimate: np.ndarray, measurement: Mapping, valid: np.ndarray,
                 reference: np.ndarray | None) -> float:
    """The factor that turns an estimate in the package's unit into the user's modulus (see
    :func:`describe_output`): a unit's, or one over the estimate's median over the background
    or the reference region (times the reference modulus when given)."""
    s = ImportSettings.from_dict(measurement["settings"])
    if s.known_force:
        return KPA / MODULUS_UNITS[s.modulus_unit]
    region = valid if s.normalise == "background" else valid & reference
    level = float(np.median(np.asarray(estimate, dtype=np.float64)[region]))
    return (1.0 if s.reference_modulus is None else s.reference_modulus) / level


def output_modulus(estimate: np.ndarray, measurement: Mapping, valid: np.ndarray,
                   reference: np.ndarray | None) -> np.ndarray:
    """The user's modulus of an estimate in the package's unit (see :func:`describe_output`)."""
    return (np.asarray(estimate, dtype=np.float64)
            * output_scale(estimate, measurement, valid, reference))


def export_estimates(data_path: str | os.PathLike, reconstruction: str | os.PathLike,
                     comm: MPI.Comm, overwrite: bool = False, method: str = "") -> list[Path]:
    """Write a reconstruction of an imported measurement in the user's layout and units.

    Beside ``reconstruction`` (``OUT.h5``): ``OUT-modulus.<suffix of the measurement file>`` (the
    same variable names, node order or image shape, and units as the input; the modulus as
    ``E`` with ``E_unit`` and ``E_meaning``), ``OUT-modulus-mesh.xdmf`` (+ ``.h5``, the mesh in
    the input's length unit) and ``OUT-modulus.png``. Collective (the XDMF is written by all
    ranks). Returns the paths.
    """
    from .data import load_dataset
    from .reconstruction import load_reconstructions
    from .visualise import plot_comparison, write_xdmf

    reconstruction = Path(reconstruction)

    def prepare():
        with load_dataset(data_path) as dataset:
            measurement = dataset.measurement
            if measurement is None:
                raise ValueError(f"data set {str(data_path)!r} is not an imported measurement")
            valid, reference = dataset.valid(0), dataset.reference(0)
            mesh = dataset.mesh
        result = load_reconstructions(reconstruction)
        values = [output_modulus(e, measurement, valid, reference) for e in result.estimates]
        return measurement, valid, mesh, values

    measurement, valid, mesh, values = on_root(comm, prepare)
    source, s = measurement["source"], ImportSettings.from_dict(measurement["settings"])
    info = measurement["output"]
    layout_path, xdmf, png = export_paths(reconstruction, measurement)
    to_mm = LENGTH_UNITS[s.length_unit]
    user_mesh = MeshArrays(mesh.points / to_mm, mesh.cells, mesh.load, mesh.support)
    def check():  # an earlier run's files go first: a failed export leaves none beside this one
        paths = export_paths(reconstruction, measurement, heavy=True)
        for path in paths:
            check_output_path(path, overwrite)
        for path in paths:
            path.unlink(missing_ok=True)

    on_root(comm, check)
    on_root(comm, lambda: _write_layout(layout_path, values, valid, source, info, user_mesh,
                                         overwrite))
    write_xdmf({"E": values[0]}, xdmf, user_mesh, comm, overwrite=overwrite)

    def figure():
        shown = np.where(valid, values[0], np.nan)
        finite = shown[np.isfinite(shown)]
        name = method or "estimate"
        plot_comparison(None, {name: values[0]}, png, user_mesh, units=info["label"],
                        clim=(0.0, float(np.percentile(finite, 99.5))),
                        labels={name: info["short"]}, overwrite=overwrite)

    on_root(comm, figure)
    return [layout_path, xdmf, png]


def export_paths(reconstruction: str | os.PathLike, measurement: Mapping,
                 heavy: bool = False) -> list[Path]:
    """``[OUT-modulus.<suffix of the measurement>, OUT-modulus-mesh.xdmf, OUT-modulus.png]``
    beside the reconstruction ``OUT.h5``; with ``heavy`` also the ``.h5`` files of the XDMFs."""
    stem = Path(reconstruction).with_suffix("")
    suffix = Path(measurement["source"]["file"]).suffix.lower()
    paths = [stem.with_name(f"{stem.name}-modulus{suffix}"),
             stem.with_name(f"{stem.name}-modulus-mesh.xdmf"),
             stem.with_name(f"{stem.name}-modulus.png")]
    if heavy:
        paths += [p.with_suffix(".h5") for p in paths if p.suffix == ".xdmf"]
    return paths


def _write_layout(path: Path, values: list[np.ndarray], valid: np.ndarray, source: Mapping,
                  info: Mapping, mesh: MeshArrays, overwrite: bool) -> None:
    """One file in the user's format: the modulus in the node order / image shape of the input;
    nodes and pixels without data are empty (NaN)."""
    arrays = [np.where(valid, v, np.nan) for v in values]
    if source["layout"] == "image" and "mesh_file" not in source:
        rows, cols = source["shape"]
        r0, r1, c0, c1 = source["window"]
        images = []
        for v in arrays:
            image = np.full((rows, cols), np.nan)
            image[r0:r1 + 1, c0:c1 + 1] = v.reshape(r1 - r0 + 1, c1 - c0 + 1)
            images.append(image)
        arrays = images
    E = arrays[0] if len(arrays) == 1 else np.stack(arrays)
    variables = {"E": E, "E_unit": info["unit"], "E_meaning": info["meaning"]}
    if source["layout"] == "nodal" and "nodes" in source:  # the user's mesh, under its names
        base = int(source.get("index_base", 0))
        variables[source["nodes"]] = (mesh.points if "z" not in source else np.column_stack(
            [mesh.points, np.full(len(mesh.points), source["z"])]))
        variables[source["cells"]] = mesh.cells + base
    elif source["layout"] == "nodal" or "mesh_file" in source:
        variables["nodes"], variables["cells"] = mesh.points, mesh.cells
    suffix = path.suffix.lower()
    with atomic_output(path, overwrite) as tmp:
        if suffix == ".mat":
            import scipy.io

            with open(tmp, "wb") as f:
                scipy.io.savemat(f, variables, oned_as="column")  # per-node data: columns
        elif suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, **variables)
        elif suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(E))
        elif suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(tmp, "w") as f:
                for key, value in variables.items():
                    f[key] = value
        else:  # XDMF (meshio writes the .xdmf and its .h5 beside it), VTK
            _write_meshio(path, tmp, mesh, variables, overwrite)


def _write_meshio(path: Path, tmp: Path, mesh: MeshArrays, variables: Mapping,
                  overwrite: bool) -> None:
    import meshio

    kind = "triangle" if mesh.dim == 2 else "tetra"
    suffix = path.suffix.lower()
    work = tmp.with_name(tmp.name + suffix)
    point_data = {"E": np.asarray(variables["E"], dtype=np.float64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meshio.write(work, meshio.Mesh(mesh.points, [(kind, mesh.cells)], point_data=point_data))
    if suffix != ".xdmf":
        os.replace(work, tmp)
        return
    h5 = work.with_suffix(".h5")
    final_h5 = path.with_suffix(".h5")
    text = work.read_text().replace(h5.name, final_h5.name)
    with atomic_output(final_h5, overwrite) as heavy:
        os.replace(h5, heavy)
    work.unlink()
    tmp.write_text(text)


def summary_line(summary: Mapping) -> str:
    """One line about an import for the command line."""
    source = summary["layout"]
    base = (f", cells {source['index_base']}-based ({source['index_base_found']})"
            if "index_base" in source else "")
    sigma = ", ".join(f"{v:.3g}" for v in summary["noise_std_mm"])
    return (f"{summary['nodes']} nodes ({summary['valid']} measured){base}; noise sigma {sigma} mm "
            f"({summary['noise']}), SNR {summary['snr_db']:.1f} dB; force {summary['force']}")

