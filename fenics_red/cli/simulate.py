"""``fenics-red simulate``: a synthetic data set of phantoms and noisy displacements (paper, §5)."""

from __future__ import annotations

from mpi4py import MPI

import numpy as np

from ..data import SimulationSettings, mesh_settings, simulate_dataset
from ..domain import MeshArrays, read_domain
from ..forward import solve_memory
from ..phantoms import FAMILIES, SHAPES, PhantomSettings
from ..raster import ImageGrid
from ..threads import ranks_on_node
from ..validation import check_memory, plane_in
from .forward import add_facets_argument, add_forward_arguments, check_facets_flag, forward_settings

#: Memory of one rank's forward solves: measured 150 MB on a 64² grid and 430 MB on 256² (about
#: 4.4 kB per node with a direct solver; 6 kB allows for the fill-in of larger grids).


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate", help="simulate a synthetic data set (phantoms, clean and noisy displacements)",
        description="Draw phantoms (random inclusions, or the connected components of the mask "
                    "images of --masks), solve the forward model and add Gaussian noise at the "
                    "target SNR; write everything to an HDF5 file. The same seed gives the same "
                    "file on any number of MPI ranks; an interrupted run resumes from "
                    "OUT.partial when started again with the same options.")
    parser.add_argument("--samples", type=int, required=True, help="number of samples")
    parser.add_argument("--mesh", default=None, metavar="FILE",
                        help="simulate on this mesh (gmsh .msh with physical groups 'load' and "
                             "'support', XDMF, VTK, ...) instead of a grid; writes a data set of "
                             "format 2 (one value per mesh node)")
    add_facets_argument(parser)
    parser.add_argument("--pixel", type=float, default=None,
                        help="with --mesh: pixel size of the raster the phantoms are drawn on, "
                             "in the mesh's length unit (default: its mean node spacing)")
    parser.add_argument("--grid", type=int, default=None,
                        help="cells along x (default 64)")
    parser.add_argument("--grid-y", type=int, default=None,
                        help="cells along y (default: square cells, i.e. --grid for a square)")
    parser.add_argument("--grid-z", type=int, default=None,
                        help="cells along z: a 3-D box of tetrahedra with depth along z (load on "
                             "the top face, support on the bottom) and cubic cells; images are "
                             "volumes (nz+1, ny+1, nx+1); --height is then the y extent")
    parser.add_argument("--snr", type=float, default=35.0,
                        help="SNR of the displacement noise in dB (default %(default)s)")
    parser.add_argument("--noise-ratio", type=float, default=1.0,
                        help="lateral-to-axial noise ratio sigma_x / sigma_y (default "
                             "%(default)s)")
    parser.add_argument("--force-noise", type=float, default=0.0,
                        help="standard deviation of the nodal force noise (default 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--out", required=True, help="output HDF5 file")
    parser.add_argument("--masks", default=None, metavar="DIR",
                        help="folder of PNG/.npy mask images; each connected component becomes "
                             "an inclusion (sample i uses the (i mod n)-th mask by name)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (an unfinished run of other settings is "
                             "discarded; one of these settings is continued)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="samples per rank between two writes of the file (default "
                             "%(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("phantoms")
    defaults = PhantomSettings()
    group.add_argument("--family", choices=list(FAMILIES), default=defaults.family,
                       help="what random phantoms look like (default %(default)s, the paper's); "
                            + "; ".join(f"{name}: {text}" for name, text in FAMILIES.items()
                                        if name != "inclusions").replace("%", "%%"))
    group.add_argument("--inclusions", type=int, nargs=2, metavar=("MIN", "MAX"),
                       default=defaults.n_inclusions,
                       help="number of inclusions of random phantoms (default %(default)s); "
                            "fewer than MAX when no more fit, and an error saying how many fit "
                            "when fewer than MIN do")
    group.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(defaults.shapes),
                       help="inclusion shapes to draw from (default: all)")
    group.add_argument("--min-size", type=float, default=defaults.min_size,
                       help="smallest inclusion diameter in cells (default %(default)s)")
    group.add_argument("--max-size", type=float, default=defaults.max_size,
                       help="largest inclusion diameter as a fraction of the field "
                            "(default 1/3)")
    group.add_argument("--soft-edge", type=float, default=defaults.soft_edge,
                       help="width of a smooth inclusion edge in cells (default 0: sharp)")
    add_forward_arguments(parser)
    parser.set_defaults(func=run)


def grid_from_args(args) -> ImageGrid:
    """The grid of ``--grid``, ``--grid-y``, ``--width`` and ``--height`` (square cells by
    default); with ``--grid-z`` a box whose z extent keeps the cells of ``--grid`` cubic."""
    nx = 64 if args.grid is None else args.grid
    if nx < 1:
        raise ValueError(f"--grid must be a positive number of cells, got {nx}")
    width = 1.0 if args.width is None else args.width
    ny = args.grid_y
    if ny is None:
        ny = nx if args.height is None else max(1, round(nx * args.height / width))
    if ny < 1:
        raise ValueError(f"--grid-y must be a positive number of cells, got {ny}")
    height = width * ny / nx if args.height is None else args.height
    nz = getattr(args, "grid_z", None)
    if nz is None:
        return ImageGrid(nx, ny, width, height)
    if nz < 1:
        raise ValueError(f"--grid-z must be a positive number of cells, got {nz}")
    return ImageGrid(nx, ny, width, height, nz=nz, depth=width * nz / nx)


def run(args) -> int:
    comm = MPI.COMM_WORLD
    phantoms = PhantomSettings(n_inclusions=tuple(args.inclusions), shapes=tuple(args.shapes),
                               min_size=args.min_size, max_size=args.max_size,
                               soft_edge=args.soft_edge, family=args.family)
    if args.masks is not None and args.family != "inclusions":
        raise ValueError("--family draws random phantoms and --masks gives them: choose one")
    drawn = [flag for flag, value, default in (
        ("--inclusions", tuple(args.inclusions), PhantomSettings().n_inclusions),
        ("--shapes", tuple(args.shapes), PhantomSettings().shapes),
        ("--min-size", args.min_size, PhantomSettings().min_size),
        ("--max-size", args.max_size, PhantomSettings().max_size)) if value != default]
    if args.masks is not None and drawn:
        raise ValueError(f"{', '.join(drawn)} shape{'s' if len(drawn) == 1 else ''} the random "
                         "phantoms, and --masks gives the inclusions instead: leave "
                         f"{'it' if len(drawn) == 1 else 'them'} out")
    common = dict(forward=forward_settings(args), snr_db=args.snr, noise_ratio=args.noise_ratio,
                  force_noise=args.force_noise, seed=args.seed, phantoms=phantoms)
    check_facets_flag(args)
    if args.mesh is None:
        if args.pixel is not None:
            raise ValueError("--pixel sizes the phantom raster of a mesh; give --mesh too")
        settings = SimulationSettings(grid_from_args(args), **common)
    else:
        for flag, value in (("--grid", args.grid), ("--grid-y", args.grid_y),
                            ("--grid-z", args.grid_z), ("--width", args.width),
                            ("--height", args.height)):
            if value is not None:
                raise ValueError(f"{flag} sizes a grid; a mesh (--mesh) has its own size")
        settings = mesh_settings(read_domain(args.mesh, comm, args.facets).to_arrays(),
                                 args.pixel, **common)
    plane_in(settings.forward.plane, settings.dim)
    check_raster_memory(settings.grid, settings.mesh, settings.forward, comm,
                        f"simulating on {settings.grid.label()} cells")
    path = simulate_dataset(args.out, args.samples, settings, comm, masks_dir=args.masks,
                            overwrite=args.overwrite, progress=not args.quiet,
                            batch_size=args.batch_size)
    if comm.rank == 0:
        g = settings.grid
        where = (f"a {g.label()} grid" if settings.mesh is None else
                 f"the {settings.mesh.shape[0]}-node mesh {args.mesh} (phantom raster "
                 f"{g.label()})")
        print(f"wrote {path}: {args.samples} samples on {where} at {settings.snr_db:g} dB")
    return 0


def check_raster_memory(grid: ImageGrid, mesh: MeshArrays | None, forward, comm: MPI.Comm,
                        what: str) -> None:
    """Refuse, before anything is allocated, work on the image ``grid`` (with ``mesh``: the
    raster over that mesh) above this machine's memory: every rank on it holds whole samples
    and a whole raster. ``what`` names the work in the message."""
    nodes = int(np.prod(grid.shape))
    if mesh is not None:
        nodes = max(nodes // 4, mesh.shape[0])
    here = min(ranks_on_node(), comm.size)
    check_memory(solve_memory(nodes, grid.dim, forward, here, here), what)


def check_pixel_memory(data, pixels, comm: MPI.Comm) -> None:
    """:func:`check_raster_memory` of the denoiser's raster over a mesh data set for each
    ``--pixel`` given (``None``: the default, the mean node spacing), before any work."""
    pixels = sorted({p for p in pixels if p is not None})
    if not pixels:
        return
    from ..data import load_dataset

    with load_dataset(data, check_data=False) as dataset:
        mesh, forward = dataset.mesh, dataset.settings.forward
    if mesh is None:  # a grid data set is its own raster: the option would be recorded only
        raise ValueError(f"--pixel sets the denoiser's raster over a mesh data set, and "
                         f"{str(data)!r} is on a grid whose nodes are its pixels: leave it out")
    for pixel in pixels:
        grid = ImageGrid.covering(mesh.points.min(axis=0), mesh.points.max(axis=0), pixel)
        check_raster_memory(grid, mesh, forward, comm,
                            f"a raster of {grid.label()} pixels (--pixel {pixel:g})")
