"""``fenics-red import``: a measurement in physical units as a data set (see
:mod:`fenics_red.measured`)."""

from __future__ import annotations

from mpi4py import MPI

from ..measured import LENGTH_UNITS, MODULUS_UNITS, ImportSettings, import_measurement, summary_line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import", help="import a measured displacement (nodal on a mesh, or images) as a data set",
        description="Read a displacement measurement (.npy, .npz, MATLAB .mat v5 or v7.3, .h5, "
                    "XDMF) in physical units and write a data set (format 2, no truth) that "
                    "'reconstruct' and 'evaluate' take. Nodal data: node coordinates, cells (0- or "
                    "1-based, detected) and the displacement per node. Images (--spacing): axial "
                    "and lateral displacement with the depth along the first axis (row 0 at the "
                    "probe, axial displacement positive away from it); NaN or a validity mask "
                    "marks pixels without data. Without --traction the force is unknown and "
                    "'reconstruct' reports the modulus relative to the background (or to "
                    "--reference), or scaled to --reference-modulus.")
    parser.add_argument("measurement", metavar="MEASUREMENT", help="the measurement file")
    parser.add_argument("--out", required=True, metavar="DATA.h5", help="output data set")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    names = parser.add_argument_group("variables (default: the usual names in the file)")
    for flag, what in (("nodes", "node coordinates (N, 2) or (N, 3)"),
                       ("cells", "cells: triangles (M, 3) or tetrahedra (M, 4)"),
                       ("displacement", "every component: (N, d), (d, N), interleaved (d N,), or "
                                        "images (2, rows, cols) as axial, lateral"),
                       ("ux", "nodal x displacement"), ("uy", "nodal y displacement (depth axis "
                                                              "in 2-D, up)"),
                       ("uz", "nodal z displacement (3-D)"),
                       ("axial", "axial displacement image"),
                       ("lateral", "lateral displacement image"),
                       ("valid", "validity mask: nonzero where the displacement was measured"),
                       ("reference", "reference-region mask (with --normalise reference)"),
                       ("load-facets", "loaded boundary facets: node lists (F, 2) or (F, 3), "
                                       "numbered as the cells (default: the top, largest y/z)"),
                       ("support-facets", "supported boundary facets (default: the bottom)")):
        names.add_argument(f"--{flag}", metavar="NAME", help=what)
    names.add_argument("--interleaved", action="store_true",
                       help="a 1-D --displacement is [ux0, uy0, ux1, uy1, ...]")
    names.add_argument("--index-base", type=int, choices=[0, 1], default=None,
                       help="cells are 0- or 1-based (default: detected, and said)")
    names.add_argument("--mesh", metavar="FILE",
                       help="a mesh file (gmsh .msh, XDMF, VTK, ...): nodal data in its node "
                            "order, or the mesh the images are sampled on (in --length-unit)")
    names.add_argument("--facets", metavar="FILE", default=None,
                       help="with --mesh: its load and support facets from a second file "
                            "(fenics-red forward --help says how they are read)")
    image = parser.add_argument_group("displacement images")
    image.add_argument("--spacing", type=float, nargs=2, metavar=("AXIAL", "LATERAL"),
                       help="pixel size along depth and across, in --length-unit (images)")
    image.add_argument("--roi", type=float, nargs=4,
                       metavar=("DEPTH_FROM", "DEPTH_TO", "LATERAL_FROM", "LATERAL_TO"),
                       help="region of interest in --length-unit (default: the whole image)")
    units = parser.add_argument_group("units")
    units.add_argument("--length-unit", choices=list(LENGTH_UNITS), default="mm",
                       help="unit of coordinates and spacing (default %(default)s)")
    units.add_argument("--displacement-unit", choices=list(LENGTH_UNITS), default="mm",
                       help="unit of the displacement (default %(default)s)")
    units.add_argument("--modulus-unit", choices=list(MODULUS_UNITS), default="kPa",
                       help="unit of the reported modulus and of --reference-modulus (default "
                            "%(default)s)")
    load = parser.add_argument_group("load, support and material")
    load.add_argument("--traction", type=float, metavar="PA",
                      help="known probe pressure on the loaded boundary in Pa (default: unknown "
                           "force, relative modulus)")
    load.add_argument("--support", choices=["fixed", "sliding"], default="fixed",
                      help="the supported boundary clamped, or held along depth only (default "
                           "%(default)s)")
    load.add_argument("--plane-strain", action="store_true",
                      help="plane strain instead of plane stress")
    load.add_argument("--nu", type=float, default=0.495, help="Poisson ratio (default %(default)s)")
    load.add_argument("--force", metavar="NAME",
                      help="instead of --traction: known nodal forces, shaped as the "
                           "displacement, in Pa x (length unit)^(d-1) (N/m per unit thickness "
                           "in 2-D with --length-unit m)")
    scale = parser.add_argument_group("unknown force")
    scale.add_argument("--normalise", choices=["background", "reference"], default="background",
                       help="divide the modulus by its median over the measured nodes "
                            "(background) or over --reference (default %(default)s)")
    scale.add_argument("--reference-modulus", type=float, metavar="VALUE",
                       help="the known modulus of that background or region, in --modulus-unit")
    noise = parser.add_argument_group("noise (default: estimated from the data)")
    noise.add_argument("--snr", type=float, metavar="DB", help="SNR of the measurement in dB")
    noise.add_argument("--noise-std", type=float, nargs="+", metavar="SIGMA",
                       help="noise standard deviation per component (x, y[, z]) in "
                            "--displacement-unit")
    noise.add_argument("--noise-ratio", type=float, default=1.0,
                       help="lateral-to-axial noise ratio with --snr (default %(default)s)")
    parser.set_defaults(func=run)


def settings_from_args(args) -> ImportSettings:
    return ImportSettings(
        layout="image" if args.spacing is not None else "nodal", nodes=args.nodes,
        cells=args.cells, displacement=args.displacement, ux=args.ux, uy=args.uy, uz=args.uz,
        axial=args.axial, lateral=args.lateral, interleaved=args.interleaved,
        index_base=args.index_base, mesh=args.mesh, mesh_facets=args.facets,
        spacing=None if args.spacing is None else tuple(args.spacing),
        roi=None if args.roi is None else tuple(args.roi), valid=args.valid,
        reference=args.reference, load_facets=args.load_facets,
        support_facets=args.support_facets, length_unit=args.length_unit,
        displacement_unit=args.displacement_unit, modulus_unit=args.modulus_unit,
        traction=args.traction, force=args.force, normalise=args.normalise,
        reference_modulus=args.reference_modulus, support=args.support,
        plane="strain" if args.plane_strain else "stress", nu=args.nu, snr_db=args.snr,
        noise_std=None if args.noise_std is None else tuple(args.noise_std),
        noise_ratio=args.noise_ratio)


def run(args) -> int:
    comm = MPI.COMM_WORLD
    summary = import_measurement(args.measurement, args.out, settings_from_args(args), comm,
                                 overwrite=args.overwrite)
    if comm.rank == 0:
        print(f"wrote {args.out}: {summary_line(summary)}")
    return 0
