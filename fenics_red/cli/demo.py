"""``fenics-red demo``: the main job on a built-in phantom, every method, results in one folder.

The demo makes a one-sample data set from a built-in two-inclusion mask at 35 dB (the paper's
setting), runs every registered method (:data:`fenics_red.methods.METHODS`, in the order of the
paper's comparison) through :func:`fenics_red.evaluation.evaluate`, and writes the comparison
figure, the profile plot, the metrics table and ParaView files to the output folder.
"""

from __future__ import annotations

from pathlib import Path

from mpi4py import MPI

import numpy as np

from ..methods import METHODS
from ..metrics import SSIM_WINDOW
from ..parallel import on_root
from ..raster import ImageGrid
from . import add_method_arguments, method_options

#: Every registered method, in the order of the paper's comparison.
DEMO_METHODS = tuple(METHODS)


def builtin_mask(grid: ImageGrid) -> np.ndarray:
    """Two inclusions: a circle near the transducer and a rotated ellipse deeper down."""
    rows, cols = np.mgrid[0: grid.ny + 1, 0: grid.nx + 1]
    y = grid.height - rows * grid.spacing[1]
    x = cols * grid.spacing[0]
    w, h = grid.width, grid.height
    circle = (x - 0.32 * w) ** 2 + (y - 0.66 * h) ** 2 < (0.13 * min(w, h)) ** 2
    c, s = np.cos(0.6), np.sin(0.6)
    u, v = c * (x - 0.66 * w) + s * (y - 0.33 * h), -s * (x - 0.66 * w) + c * (y - 0.33 * h)
    ellipse = (u / (0.17 * w)) ** 2 + (v / (0.09 * h)) ** 2 < 1.0
    return circle | ellipse


#: The demo's own mask file in ``OUT/masks``.
DEMO_MASK = "two_inclusions.npy"


def _check_own_data(data: Path, masks: Path) -> None:
    """Refuse to replace a ``data.h5`` that an earlier demo did not make: a demo's data set was
    simulated from the masks beside it (that folder, or, once the output folder was moved or
    copied, the same masks), so a user's data set is never overwritten."""
    if not data.exists():
        return
    from ..data import load_dataset
    from ..phantoms import load_mask_folder

    try:
        with load_dataset(data, check_data=False) as dataset:
            attrs, grid = dataset.attrs, dataset.grid
        made_here = (Path(str(attrs.get("masks_dir", ""))).resolve() == masks.resolve()
                     or (masks.is_dir()
                         and attrs.get("masks_sha256") == load_mask_folder(masks, grid)[2]))
    except (OSError, ValueError):
        made_here = False
    if not made_here:
        raise FileExistsError(f"{str(data)!r} is not the data set of an earlier demo; the demo "
                              "would replace it: choose another --out folder")


def _check_own_masks(masks: Path) -> None:
    """Refuse a ``masks`` folder that holds mask files the demo did not write: the demo
    simulates from every mask there (a user's became its sample 0) and writes its own."""
    from ..phantoms import mask_files

    if not masks.is_dir():
        return
    others = [p.name for p in mask_files(masks) if p.name != DEMO_MASK]
    if others:
        raise FileExistsError(f"{str(masks)!r} holds mask files the demo did not write "
                              f"({', '.join(others)}); the demo simulates from every mask there: "
                              "choose another --out folder, or move them")


def _check_options(methods: tuple, options: dict) -> None:
    """Each method's options as its settings check them, and the denoiser the methods that use
    one will load, before the demo writes its data set (a mistyped ``--denoiser`` used to
    surface after it)."""
    from ..io import check_input_file
    from ..methods import DENOISER, check_options, flag_users

    for method, overrides in options.items():
        check_options(method, overrides)
    models = {options.get(m, {}).get("denoiser") for m in methods if m in flag_users()[DENOISER]}
    if models:
        from ..red import load_denoiser

        for path in models:  # each model once (red and denoised-ml share the shipped one)
            load_denoiser(path if path is None else check_input_file(path, "--denoiser model"))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="reconstruct a built-in phantom with every method (the main job)",
        description="Simulate the built-in two-inclusion phantom at 35 dB, reconstruct it with "
                    "every registered method (" + "; ".join(
                        f"{name}: {method.description}" for name, method in METHODS.items())
                    + "), and write figures, metrics and ParaView files. A method's options are "
                    "in the groups that name it; each goes to every method in --methods that "
                    "takes it.")
    parser.add_argument("--out", default="demo-output", help="output folder (default %(default)s)")
    parser.add_argument("--grid", type=int, default=64, help="cells per side (default %(default)s)")
    parser.add_argument("--snr", type=float, default=35.0,
                        help="SNR of the simulated noise in dB (default %(default)s)")
    parser.add_argument("--seed", type=int, default=2026, help="noise seed (default %(default)s)")
    parser.add_argument("--methods", default=",".join(DEMO_METHODS),
                        help="comma-separated methods (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_method_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..data import SimulationSettings, simulate_dataset
    from ..evaluation import EvaluationSettings, check_evaluation_folder, evaluate, summary_table

    comm = MPI.COMM_WORLD
    if args.grid < SSIM_WINDOW - 1:
        raise ValueError(f"--grid must be at least {SSIM_WINDOW - 1} cells (SSIM's window is "
                         f"{SSIM_WINDOW} pixels across), got {args.grid}")
    # every setting is checked before anything is written
    out = Path(args.out)
    grid = ImageGrid(args.grid, args.grid)
    masks = out / "masks"
    data = out / "data.h5"
    settings = SimulationSettings(grid, snr_db=args.snr, seed=args.seed)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    options = method_options(args, methods, strict=False)  # as before: unused flags are ignored
    evaluation = EvaluationSettings(methods, options, xdmf=True)

    def prepare():
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--out {str(out)!r} is a file; the demo writes a folder")
        _check_options(methods, options)
        _check_own_data(data, masks)
        _check_own_masks(masks)
        check_evaluation_folder(out / "results", overwrite=True)
        masks.mkdir(parents=True, exist_ok=True)
        np.save(masks / DEMO_MASK, builtin_mask(grid))

    on_root(comm, prepare)
    simulate_dataset(data, 1, settings, comm, masks_dir=masks, overwrite=True,
                     progress=False)
    summary = evaluate(data, out / "results", evaluation, comm, overwrite=True,
                       progress=not args.quiet)
    if comm.rank == 0:
        print(summary_table(summary, methods), end="")
        results = (out / "results").resolve()
        print(f"demo results in {results}/:\n  figures/sample_0.png (truth and estimates), "
              "figures/profile_0.png (cross-section),\n  summary.md, metrics.csv, "
              "metrics.json, xdmf/sample_0.xdmf (ParaView)")
    return 0
