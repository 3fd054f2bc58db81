"""``fenics-red train``: train the RED denoiser ``C_w`` on (ML estimate, truth) pairs (eqs. 10-12).

A pairs file is the output of ``fenics-red reconstruct DATA.h5 --method ml --all --out
PAIRS.h5``. Training is serial (one process; a GPU when ``--device`` allows); under ``mpirun`` rank
0 trains and the other ranks wait for its result or its error.

``python -m fenics_red.cli.train [options]`` runs the same command with torch, NumPy, h5py and tqdm
only (no DOLFINx, PETSc or MPI needed): on a GPU node, say, with the pairs file copied there.
"""

from __future__ import annotations

import argparse
import shlex
import sys

#: Mirror of the :class:`fenics_red.training.TrainingSettings` and ``UNetConfig`` defaults, so that
#: building the parser (``fenics-red --help``) does not import torch; a test checks they agree.
DEFAULTS = {"epochs": 60, "batch_size": 32, "lr": 1e-3, "seed": 0, "val_fraction": 0.2,
            "clean_fraction": 0.25, "t_max": 1.0, "idempotence_weight": 0.5,
            "fixed_point_weight": 0.5, "weight_decay": 0.0, "lr_final_fraction": 0.05,
            "grad_clip": 1.0, "channels": 32, "depth": 3}
#: The architecture of volumes (``fenics_red.denoiser.DEFAULT_3D_CONFIG``, checked by a test).
DEFAULTS_3D = {"channels": 8, "depth": 2}


def register(subparsers) -> None:
    d = DEFAULTS
    parser = subparsers.add_parser(
        "train", help="train the denoiser of the RED prior on (ML estimate, truth) pairs",
        description="Train the UNet denoiser C_w of regularisation by denoising on the pairs "
                    "written by `fenics-red reconstruct DATA.h5 --method ml --all --out "
                    "PAIRS.h5`. Inputs are mixed along E + t (E_ml - E), t uniform in "
                    "[0, t_max], with a share of clean inputs, so that clean maps become fixed "
                    "points of the denoiser. Writes MODEL.pt (best epoch by validation loss), "
                    "MODEL.json (model card) and MODEL.last.pt (checkpoint for --resume). The "
                    "same seed gives the same weights on the same machine and thread count.")
    parser.add_argument("--data", required=True, nargs="+", metavar="PAIRS.h5",
                        help="training pairs; several files (e.g. one per SNR, same grid) are "
                             "concatenated")
    parser.add_argument("--out", required=True, metavar="MODEL.pt", help="model file to write")
    parser.add_argument("--epochs", type=int, default=d["epochs"],
                        help="training epochs (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"],
                        help="images per batch (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"],
                        help="seed of initialisation, split, order, flips and mixing "
                             "(default %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=d["val_fraction"],
                        help="share of pairs held out for validation (default %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="where to train: cpu (default), cuda, or auto (a GPU when present)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run of MODEL.last.pt (same settings; more --epochs "
                           "extend it)")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace an existing model and discard its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("recipe")
    group.add_argument("--init", metavar="MODEL.pt", default=None,
                       help="start from this model's weights (fine-tuning; same --channels and "
                            "--depth) instead of a random initialisation")
    group.add_argument("--lr", type=float, default=d["lr"],
                       help="Adam learning rate, decayed by a cosine (default %(default)s)")
    group.add_argument("--lr-final-fraction", type=float, default=d["lr_final_fraction"],
                       help="final learning rate as a fraction of --lr (default %(default)s)")
    group.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                       help="Adam weight decay (default %(default)s)")
    group.add_argument("--grad-clip", type=float, default=d["grad_clip"],
                       help="clip the gradient's norm to this value before each step "
                            "(default %(default)s; 0 turns clipping off)")
    group.add_argument("--t-max", type=float, default=d["t_max"],
                       help="mixing weight t of E + t (E_ml - E) uniform in [0, t_max] "
                            "(default %(default)s)")
    group.add_argument("--clean-fraction", type=float, default=d["clean_fraction"],
                       help="share of exactly clean inputs, target = input (default "
                            "%(default)s)")
    group.add_argument("--idempotence-weight", type=float, default=d["idempotence_weight"],
                       help="weight of ||C(C(x)) - C(x)||^2 (default %(default)s; 0: off)")
    group.add_argument("--fixed-point-weight", type=float, default=d["fixed_point_weight"],
                       help="weight of ||C(E) - E||^2 on clean maps (default %(default)s; 0: off)")
    group.add_argument("--no-flip", action="store_true",
                       help="no flips (the only augmentation used: left-right on images, x and "
                            "y on volumes)")
    group.add_argument("--exchange", action="store_true",
                       help="volumes with ny = nx: also exchange the lateral axes x <-> y with "
                            "probability 1/2 (the simulated data treat them alike)")
    group.add_argument("--channels", type=int, default=None,
                       help=f"UNet width: feature maps at full resolution (default "
                            f"{d['channels']} on images, {DEFAULTS_3D['channels']} on volumes: "
                            "pairs of 3-D data sets train a 3-D UNet)")
    group.add_argument("--depth", type=int, default=None,
                       help=f"UNet depth: number of halvings (default {d['depth']} on images, "
                            f"{DEFAULTS_3D['depth']} on volumes)")
    parser.set_defaults(func=run)


def _pairs_dims(path) -> int:
    """3 when the first pairs file holds volumes, else 2 (a bad file is reported by training)."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return 3 if f["truth"].ndim == 4 else 2
    except (OSError, KeyError, TypeError, ValueError):
        return 2


def settings_from_args(args):
    """The :class:`~fenics_red.training.TrainingSettings` of the parsed options (the
    architecture's defaults follow the data: images or volumes)."""
    from ..denoiser import UNetConfig
    from ..training import TrainingSettings

    defaults = DEFAULTS_3D if _pairs_dims(args.data[0]) == 3 else DEFAULTS
    for name in ("channels", "depth"):  # resolved here, so the recorded command spells them out
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])

    return TrainingSettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_final_fraction=args.lr_final_fraction, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip or None, seed=args.seed,
        val_fraction=args.val_fraction, clean_fraction=args.clean_fraction, t_max=args.t_max,
        idempotence_weight=args.idempotence_weight, fixed_point_weight=args.fixed_point_weight,
        flip=not args.no_flip, exchange=args.exchange,
        architecture=UNetConfig(args.channels, args.depth),
        device=args.device, num_threads=args.threads, init=args.init)


def command_line(args) -> str:
    """The full command that reproduces the run (every recipe option spelled out)."""
    words = ["fenics-red", "train", "--data", *map(str, args.data), "--out", str(args.out)]
    for name in ("epochs", "batch_size", "seed", "val_fraction", "device", "threads", "lr",
                 "lr_final_fraction", "weight_decay", "grad_clip", "t_max", "clean_fraction",
                 "idempotence_weight", "fixed_point_weight", "channels", "depth", "init"):
        value = getattr(args, name)
        if value is not None:
            words += ["--" + name.replace("_", "-"), str(value)]
    words += [flag for flag, on in (("--no-flip", args.no_flip), ("--exchange", args.exchange),
                                    ("--resume", args.resume),
                                    ("--overwrite", args.overwrite)) if on]
    return shlex.join(words)


def run(args) -> int:
    def train():
        from ..training import train_denoiser

        card = train_denoiser(args.data, args.out, settings_from_args(args),
                              progress=not args.quiet, resume=args.resume,
                              overwrite=args.overwrite, command=command_line(args))
        return card["validation"], card["best_epoch"]

    try:
        from mpi4py import MPI
    except ImportError:  # a machine without MPI (python -m fenics_red.cli.train): one process
        rank, (metrics, best) = 0, train()
    else:
        from ..parallel import on_root

        rank = MPI.COMM_WORLD.rank
        metrics, best = on_root(MPI.COMM_WORLD, train)
    if rank == 0:
        print(f"wrote {args.out} (best epoch {best}): validation relative error "
              f"{metrics['input_rel_error']:.4f} (ML estimate) -> "
              f"{metrics['denoised_rel_error']:.4f} (denoised); clean maps changed by "
              f"{metrics['clean_drift_1']:.4f} (1 pass), {metrics['clean_drift_5']:.4f} "
              "(5 passes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fenics_red.cli.train``: the ``train`` command alone, without the FEniCSx
    stack (the full ``fenics-red`` parser imports DOLFINx for the other commands)."""
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    subparsers.choices["train"].prog = "python -m fenics_red.cli.train"
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    from . import USER_ERRORS

    try:
        return run(args)
    except USER_ERRORS as error:
        print(f"fenics-red train: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
