"""``fenics-red forward``: displacements of a modulus on a grid or a mesh (paper, equation 1).

On a grid the modulus and the displacements are images ``(ny+1, nx+1)``; on a mesh (``--mesh``,
gmsh, XDMF, VTK, ...) they are one value per node in the mesh file's own node order.
"""

from __future__ import annotations

from mpi4py import MPI

import numpy as np

from ..domain import Domain, read_domain
from ..forward import ElasticityModel, ForwardSettings
from ..io import atomic_output, check_input_file, check_output_path, to_json
from ..raster import ImageGrid, validate_image
from ..validation import check_memory, plane_in
from . import positive_float

#: Smallest modulus taken: the smallest normal float64 (2.2e-308). A subnormal modulus (1e-320)
#: has lost its precision and its displacement overflows to inf.
TINY = float(np.finfo(np.float64).tiny)
#: Largest contrast max(E) / min(E) taken. The stiffness matrix's condition number grows with the
#: contrast (and with the mesh): on a 16^2 grid a soft half 1e-14 times the stiff one gave a
#: displacement 54 % off, 1e-12 times it 0.24 % off; the bound keeps two orders of magnitude from
#: that on finer meshes (not measured there). Tissue spans about 1e3.
MAX_CONTRAST = 1e10


def add_forward_arguments(parser) -> None:
    """Options of the forward model shared by every command that simulates."""
    group = parser.add_argument_group("forward model")
    group.add_argument("--width", type=positive_float, default=None,
                       help="width W of the field (default 1; height from square cells)")
    group.add_argument("--height", type=positive_float, default=None,
                       help="height H (depth) of the field")
    group.add_argument("--nu", type=float, default=ForwardSettings.nu,
                       help="Poisson ratio (default %(default)s)")
    group.add_argument("--plane-strain", action="store_true",
                       help="plane strain instead of plane stress")
    group.add_argument("--traction", type=float, default=ForwardSettings.traction,
                       help="probe pressure on the loaded boundary, normal to it (default "
                            "%(default)s)")
    group.add_argument("--support", choices=["fixed", "sliding"], default="fixed",
                       help="supported boundary clamped (fixed) or held along depth only "
                            "(sliding)")
    group.add_argument("--volumetric", choices=["auto", "nodal", "element"], default="auto",
                       help="bulk part of the stress in 3-D and plane strain: nodal (auto, the "
                            "default) averages the volume change per node, which keeps P1 "
                            "elements from locking near nu = 0.5; element: plain P1 (locks)")
    group.add_argument("--solver", choices=["auto", "lu", "gamg"], default="auto",
                       help="auto (default): MUMPS LU in 2-D and for 3-D meshes up to 50000 "
                            "dofs, CG + GAMG with the rigid-body modes above; or force lu/gamg")


def add_facets_argument(parser) -> None:
    """``--facets FILE``: the boundary of a ``--mesh`` from a second file."""
    parser.add_argument("--facets", default=None, metavar="FILE",
                        help="with --mesh: its load and support facets from a second file read "
                             "by meshio (boundary lines in 2-D, triangles in 3-D, with integer "
                             "cell data 1 = load, 2 = support or in sets named load/support), "
                             "as meshio's conversion writes them beside the cells (mesh.xdmf + "
                             "facets.xdmf), in place of the mesh file's; default: those in the "
                             "mesh file")


def check_facets_flag(args) -> None:
    """Refuse ``--facets`` without ``--mesh`` (before any work)."""
    if args.facets is not None and args.mesh is None:
        raise ValueError("--facets marks the boundary of a mesh file; give --mesh too")


def forward_settings(args) -> ForwardSettings:
    return ForwardSettings(nu=args.nu, plane="strain" if args.plane_strain else "stress",
                           traction=args.traction, support=args.support, solver=args.solver,
                           volumetric=args.volumetric)


def npy_shape(path, name: str) -> tuple[int, ...]:
    """The shape of the array in a ``.npy`` file, from its header alone (nothing else is read).

    A file that does not start with the ``.npy`` header (a text file, a ``.npz`` archive, a
    pickle) is refused as not a ``.npy`` array file.
    """
    path = check_input_file(path, name)
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
            if head[:4] == b"PK\x03\x04":
                raise ValueError(f"{name} {str(path)!r} holds an archive (.npz), expected one "
                                 ".npy array")
            if head != b"\x93NUMPY":
                raise ValueError(f"{name} {str(path)!r} is not a .npy array file (it does not "
                                 "start with the .npy header); write it with numpy.save")
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape  # maps, reads no data
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read {name} {str(path)!r} as a .npy array: {error}") from None
    except ValueError as error:
        if str(path) in str(error):
            raise
        if "Python objects" in str(error):
            raise ValueError(f"{name} {str(path)!r} holds Python objects (pickled data), "
                             "expected an array of numbers") from None
        raise ValueError(f"cannot read {name} {str(path)!r} as a .npy array: {error}") from None
    return tuple(int(n) for n in shape)


def load_image(path, name: str) -> np.ndarray:
    """Read a ``.npy`` array with a clear error for missing, unreadable and non-.npy files."""
    npy_shape(path, name)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"cannot read {name} {str(path)!r} as a .npy array: {error}") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} {str(path)!r} holds an archive, expected one .npy array")
    return array


def check_solve_memory(nodes: int, dim: int, settings: ForwardSettings, comm, what: str
                       ) -> None:
    """Refuse a forward solve on ``nodes`` nodes above this machine's memory limit, before
    building it: the mesh is spread over ``comm``, this machine holds its ranks' share."""
    from ..forward import solve_memory
    from ..threads import ranks_on_node

    here = min(ranks_on_node(), comm.size)
    check_memory(solve_memory(nodes, dim, settings, here / comm.size, here), what)


def check_normal(values: np.ndarray, name: str, where) -> None:
    """Refuse moduli below the smallest normal float (subnormal: the displacement overflows) and
    a contrast above :data:`MAX_CONTRAST` (float64 cannot solve it: a wrong displacement)."""
    small = values < TINY
    if small.any():
        first = np.unravel_index(int(np.flatnonzero(small.ravel())[0]), values.shape)
        at = where(tuple(int(i) for i in first))
        raise ValueError(f"{name} must be at least {TINY:.3g} (the smallest normal number) at "
                         f"every {at.split()[0]}; {at} has {float(values[first])!r}")
    contrast = float(values.max() / values.min())
    if contrast > MAX_CONTRAST:
        raise ValueError(f"{name} spans a contrast of {contrast:.3g} (largest over smallest); "
                         f"above {MAX_CONTRAST:.0e} the solve in double precision is not "
                         "accurate: raise the smallest values (tissue spans about 1e3)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "forward", help="simulate displacements from a modulus (image or per mesh node)",
        description="Solve K(E) u = f. Without --mesh, E.npy is an image of shape (ny+1, nx+1) "
                    "(row 0 at the transducer) and the output holds images ux, uy. With --mesh "
                    "FILE (gmsh .msh with physical groups 'load'/'support', XDMF, VTK, ...), "
                    "E.npy holds one modulus per mesh node in the file's node order, and the "
                    "output holds ux, uy (uz in 3-D) per node in the same order, and the node "
                    "coordinates.")
    parser.add_argument("--modulus", required=True,
                        help="modulus (.npy): an image (ny+1, nx+1), or one value per mesh node")
    parser.add_argument("--mesh", default=None,
                        help="mesh file (.msh, .xdmf, .vtu, .vtk, .inp, .mesh, .med); default: "
                             "the grid of the modulus image")
    add_facets_argument(parser)
    parser.add_argument("--out", required=True, help="output .npz with the displacement and the "
                        "settings")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_forward_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    comm = MPI.COMM_WORLD
    settings = forward_settings(args)
    check_output_path(args.out, args.overwrite)  # on every rank, so all fail together
    check_facets_flag(args)
    if args.mesh is None:  # the image's size from the file's header, before reading it
        shape = npy_shape(args.modulus, "modulus")
        if len(shape) == 2:
            check_solve_memory(int(np.prod(shape)), 2, settings, comm,
                               f"a forward solve on a {shape[0]} x {shape[1]} modulus image")
    modulus = load_image(args.modulus, "modulus")
    if args.mesh is None:
        modulus = validate_image(modulus, name="modulus image", positive=True)
        check_normal(modulus, f"modulus image {str(args.modulus)!r}",
                     lambda i: f"pixel (row {i[0]}, column {i[1]})")
        grid = ImageGrid.from_shape(modulus.shape, args.width, args.height)
        domain = Domain.rectangle(grid, comm)
        meta = {"grid": {"nx": grid.nx, "ny": grid.ny, "width": grid.width,
                         "height": grid.height}}
    else:
        if args.width is not None or args.height is not None:
            raise ValueError("--width/--height size a grid; a mesh (--mesh) has its own size")
        domain = read_domain(args.mesh, comm, args.facets)
        plane_in(settings.plane, domain.dim)
        check_solve_memory(domain.num_file_nodes, domain.dim, settings, comm,
                           f"a forward solve on the {domain.num_file_nodes}-node mesh")
        modulus = _nodal_modulus(modulus, domain.num_file_nodes, args.modulus)
        meta = {"mesh": str(args.mesh), "facets": args.facets,
                "num_nodes": domain.num_file_nodes, "dim": domain.dim}
    model = ElasticityModel(domain, settings)
    try:
        model.solve(model.from_values(modulus, np.empty_like(model.E.x.array), name="modulus"))
        names = ("ux", "uy", "uz")[:domain.dim]
        arrays = dict(zip(names, model.to_values(model.u.x.array, "V"), strict=True))
        if not all(np.isfinite(a).all() for a in arrays.values()):
            raise ValueError("the displacement is not finite (it overflowed): the moduli are too "
                             "small or span too wide a range for the traction; rescale them")
        if args.mesh is not None:  # the node coordinates, in the same order
            coordinates = model.Q.tabulate_dof_coordinates()[:, :domain.dim]
            arrays["points"] = model.node_order("Q").gather_rows(coordinates).T
    finally:
        model.destroy()
    if comm.rank == 0:
        meta["forward"] = settings.to_dict()
        with atomic_output(args.out, args.overwrite) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays, settings=np.array(to_json(meta)))
        shape = arrays["ux"].shape
        print(f"wrote {args.out}: {', '.join(names)} of shape {shape}")
    comm.Barrier()
    return 0


def _nodal_modulus(values: np.ndarray, n_nodes: int, path) -> np.ndarray:
    """Check one finite, positive modulus per mesh node (a flat array of ``n_nodes`` values)."""
    values = np.asarray(values)
    if values.dtype.kind not in "fiu":
        raise ValueError(f"modulus {str(path)!r} must hold real numbers, got dtype {values.dtype}")
    if values.ndim != 1 or values.size != n_nodes:
        raise ValueError(f"modulus {str(path)!r} has shape {values.shape}; the mesh has "
                         f"{n_nodes} nodes: give one value per node, in the file's node order")
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"modulus {str(path)!r} must be finite and strictly positive at every "
                         f"node; node {i} (0-based, file order) has {values[i].item()!r}")
    values = values.astype(np.float64)
    check_normal(values, f"modulus {str(path)!r}", lambda i: f"node {i[0]} (0-based, file order)")
    return values
