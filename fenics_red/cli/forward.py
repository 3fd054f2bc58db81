"""``fenics-red forward``: displacement images of a modulus image (paper, equation 1)."""

from __future__ import annotations

import json

import numpy as np
from mpi4py import MPI

from ..forward import ElasticityModel, ForwardSettings
from ..grid import ImageGrid, validate_image
from ..io import atomic_output, check_input_file, check_output_path


def add_forward_arguments(parser) -> None:
    """Options of the forward model shared by every command that simulates."""
    group = parser.add_argument_group("forward model")
    group.add_argument("--width", type=float, default=None,
                       help="width W of the field (default 1; height from square cells)")
    group.add_argument("--height", type=float, default=None, help="height H (depth) of the field")
    group.add_argument("--nu", type=float, default=ForwardSettings.nu,
                       help="Poisson ratio (default %(default)s)")
    group.add_argument("--plane-strain", action="store_true",
                       help="plane strain instead of plane stress")
    group.add_argument("--traction", type=float, default=ForwardSettings.traction,
                       help="downward pressure on the top edge (default %(default)s)")
    group.add_argument("--support", choices=["fixed", "sliding"], default="fixed",
                       help="bottom edge clamped (fixed) or vertically supported (sliding)")
    group.add_argument("--solver", choices=["lu", "gamg"], default="lu",
                       help="MUMPS LU (default) or CG + GAMG for large meshes")


def forward_settings(args) -> ForwardSettings:
    return ForwardSettings(nu=args.nu, plane="strain" if args.plane_strain else "stress",
                           traction=args.traction, support=args.support, solver=args.solver)


def load_image(path, name: str) -> np.ndarray:
    """Read a 2-D ``.npy`` image with a clear error for missing or unreadable files."""
    path = check_input_file(path, name)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"cannot read {name} {str(path)!r} as a .npy array: {error}") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} {str(path)!r} holds an archive, expected one .npy array")
    return array


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "forward", help="simulate displacement images from a modulus image",
        description="Solve K(E) u = f for a modulus image E.npy of shape (ny+1, nx+1) (row 0 at "
                    "the transducer) and write the displacement images ux, uy to an .npz file.")
    parser.add_argument("--modulus", required=True, help="modulus image (.npy, shape (ny+1, nx+1))")
    parser.add_argument("--out", required=True, help="output .npz with ux, uy and the settings")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_forward_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    comm = MPI.COMM_WORLD
    settings = forward_settings(args)
    check_output_path(args.out, args.overwrite)  # on every rank, so all fail together
    modulus = validate_image(load_image(args.modulus, "modulus image"), name="modulus image",
                             positive=True)
    grid = ImageGrid.from_shape(modulus.shape, args.width, args.height)
    model = ElasticityModel.on_grid(grid, comm, settings)
    model.solve(modulus)
    ux, uy = model.displacement_images()
    model.destroy()
    if comm.rank == 0:
        meta = {"grid": {"nx": grid.nx, "ny": grid.ny, "width": grid.width,
                         "height": grid.height}, "forward": settings.to_dict()}
        with atomic_output(args.out, args.overwrite) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, ux=ux, uy=uy, settings=np.array(json.dumps(meta)))
        print(f"wrote {args.out}: ux, uy of shape {ux.shape}")
    comm.Barrier()
    return 0
