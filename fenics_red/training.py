"""Training of the RED denoiser ``C_w`` on pairs (maximum-likelihood estimate Ẽ, truth E).

The paper trains ``C_w`` supervisedly on pairs of clean modulus maps ``E`` and unregularised
(maximum-likelihood) estimates ``Ẽ`` (section 4), and then uses ``E − C_w(E)`` as the regulariser's
gradient (equation 10) inside gradient descent, with the explicit regulariser
``½ Eᵀ(E − C_w(E))`` (equation 11) and ``λ ≥ ‖∇g(E)‖`` (equation 12). RED needs more of the
denoiser than the paper's one-shot mapping ``Ẽ → E``: the iteration meets the denoiser at every
point between ``Ẽ`` and the truth, and stops where ``∇g(E) + λ(E − C(E)) = 0``. A denoiser that
moves clean maps (the prototype's moved them by 30 %) pulls that point away from the truth. So the
recipe here, beyond the paper's:

* **Inputs along the degradation path.** Each training input is ``E + t (Ẽ − E)`` with
  ``t ~ U[0, t_max]``, and a fraction ``clean_fraction`` of exactly clean inputs (``t = 0``), whose
  target is the input itself: clean maps become near fixed points, ``C(E) ≈ E``.
* **Optional penalties.** ``idempotence_weight`` adds ``‖C(y) − y‖² / ‖y‖²`` for the (detached)
  outputs ``y = C(x)``: the denoiser's own outputs, which are near-clean maps, are trained to be
  fixed points, which is what repeated application (and RED's loop) asks for.
  ``fixed_point_weight`` adds ``‖C(E) − E‖² / ‖E‖²`` on every clean map of the batch.
* **Physical augmentation only.** Left-right flips (the load is vertical and the bottom edge is
  supported, so up-down flips or rotations would produce estimates whose error pattern is not
  physical). For volumes ``(nz+1, ny+1, nx+1)`` (axis 0 the depth, along the load) the flips of
  ``x`` and of ``y``, each with probability ½ (so uniformly over the group of four that the 3-D
  :class:`~fenics_red.denoiser.Denoiser` averages over). Optionally (``exchange``) also the
  exchange ``x ↔ y`` of volumes with ``ny = nx``: the simulated data treat the two lateral axes
  alike (the load is axial, the lateral noise levels equal), so an exchanged pair is another
  pair of the same distribution, twice the shapes for the same estimates.
* **Images or volumes.** The network follows the pairs: pairs of images ``(n, ny+1, nx+1)``
  train a 2-D UNet, pairs of volumes ``(n, nz+1, ny+1, nx+1)`` a 3-D one (``dims`` of
  :class:`~fenics_red.denoiser.UNetConfig`; a 2-D architecture in the settings becomes 3-D with
  the same channels and depth, see :func:`train_denoiser`). Whole images or volumes are used, no
  patches.
* **Loss** ``‖C(x) − E‖² / ‖E‖²`` per image (scale-free, the square of the relative RMSE of
  :mod:`fenics_red.metrics`), averaged over the batch.

Reproducibility: the network is initialised from ``torch.manual_seed(seed)``; the split, the order,
the flips and the mixing of epoch ``k`` come from ``numpy.random.default_rng((seed, 0, k))``, so
they do not depend on where a run was interrupted; CPU kernels are deterministic
(``torch.use_deterministic_algorithms``). A run resumed from its ``last`` checkpoint therefore ends
with the same weights, bit for bit, as an uninterrupted one (on the same machine and thread count).

Files: ``MODEL.pt`` (best weights by validation loss, architecture and model card; read by
:meth:`fenics_red.denoiser.Denoiser.load`), ``MODEL.json`` (the model card), and
``MODEL.last.pt`` (training checkpoint after the latest epoch: weights, optimizer, RNG state,
history and the best weights so far; used by ``resume``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .denoiser import (
    CHECKPOINT_FORMAT,
    Denoiser,
    DenoiserNet,
    UNetConfig,
    _read_torch_file,
    count_parameters,
)
from .io import (
    OutputLock,
    atomic_output,
    check_input_file,
    check_output_path,
    file_sha256,
    progress_bar,
)
from .validation import SEED_MAX

__all__ = ["TrainingSettings", "train_denoiser", "read_pairs", "checkpoint_path", "card_path",
           "PairsData", "validation_metrics", "settings_for_data", "PAIRS_FORMAT"]

CHECKPOINT_VERSION = 1
#: Settings that may change when a run is resumed (everything else must match the checkpoint).
RESUMABLE_CHANGES = ("epochs", "device", "num_threads")


@dataclass(frozen=True)
class TrainingSettings:
    """Everything that defines a training run (stored in the model card and the checkpoint).

    epochs, batch_size, lr: Adam with a cosine learning-rate decay from ``lr`` to
        ``lr * lr_final_fraction`` over ``epochs``.
    grad_clip: clip the gradient's norm to this value before each Adam step (``None``: off).

    The defaults, except ``epochs``, are the recipe of the shipped model (``make denoiser``). On
    the pairs of three SNRs (25, 35, 45 dB) runs with ``lr = 2e-3`` stalled at the identity map
    (validation error equal to the input's from the first epochs), with or without clipping, and
    with 16 or 24 channels; ``lr = 1e-3`` learned with 16, 24 and 32 channels.
    seed: network initialisation, train/validation split, batch order, flips and input mixing.
    val_fraction: share of the pairs held out for validation (at least one pair).
    clean_fraction: share of training inputs that are exactly clean (``t = 0``).
    t_max: the mixing weight ``t`` of ``E + t(Ẽ − E)`` is uniform in ``[0, t_max]``; values above
        1 extrapolate beyond the estimate (noisier inputs than the data's SNR).
    idempotence_weight, fixed_point_weight: weights of the penalties ``‖C(C(x)) − C(x)‖²`` (inner
        output detached) and ``‖C(E) − E‖²`` (both relative); 0 turns them off.
    flip: left-right flips with probability ½ (the only augmentation that respects the physics;
        for volumes the ``x`` and the ``y`` flip, each with probability ½).
    exchange: volumes only: also exchange the lateral axes ``x ↔ y`` with probability ½ (their
        ``ny`` must equal ``nx``). Not averaged over at inference (see
        :mod:`fenics_red.denoiser`); ``False`` keeps the recipes before it bit for bit.
    architecture: the UNet (see :class:`fenics_red.denoiser.UNetConfig`); its ``dims`` follows
        the pairs (:func:`train_denoiser`).
    device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"`` or ``"cuda"``.
    num_threads: torch CPU threads during training (``None``: leave torch's setting).
    init: a model file whose weights start the training instead of a random initialisation
        (fine-tuning; its architecture must equal :attr:`architecture`, ``None``: random from
        ``seed``). The card records the file's SHA-256.
    """

    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    lr_final_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    val_fraction: float = 0.2
    clean_fraction: float = 0.25
    t_max: float = 1.0
    idempotence_weight: float = 0.5
    fixed_point_weight: float = 0.5
    flip: bool = True
    exchange: bool = False
    architecture: UNetConfig = UNetConfig(channels=32, depth=3)
    device: str = "auto"
    num_threads: int | None = None
    init: str | None = None

    def __post_init__(self):
        def check(name, ok, what):
            value = getattr(self, name)
            if isinstance(value, bool) and name not in ("flip", "exchange") or not ok(value):
                raise ValueError(f"TrainingSettings.{name} must be {what}, got {value!r}")

        def integer(low):
            return lambda v: isinstance(v, int) and v >= low

        def real(low, high=math.inf, strict_low=False):
            return lambda v: (isinstance(v, int | float) and math.isfinite(v)
                              and (v > low if strict_low else v >= low) and v <= high)

        check("epochs", integer(1), "an integer >= 1")
        check("batch_size", integer(1), "an integer >= 1")
        check("lr", real(0, strict_low=True), "a positive number")
        check("lr_final_fraction", real(0, 1), "a number in [0, 1]")
        check("weight_decay", real(0), "a number >= 0")
        if self.grad_clip is not None:
            check("grad_clip", real(0, strict_low=True), "None or a positive number")
        check("seed", lambda v: integer(0)(v) and v <= SEED_MAX, "an integer in [0, 2^63 - 1]")
        check("val_fraction", real(0, 1, strict_low=True), "a number in (0, 1)")
        check("clean_fraction", real(0, 1), "a number in [0, 1]")
        check("t_max", real(0, strict_low=True), "a positive number")
        check("idempotence_weight", real(0), "a number >= 0")
        check("fixed_point_weight", real(0), "a number >= 0")
        check("flip", lambda v: isinstance(v, bool), "True or False")
        check("exchange", lambda v: isinstance(v, bool), "True or False")
        if self.val_fraction >= 1:
            raise ValueError("TrainingSettings.val_fraction must be below 1")
        if isinstance(self.architecture, dict):
            object.__setattr__(self, "architecture", UNetConfig.from_dict(self.architecture))
        if not isinstance(self.architecture, UNetConfig):
            raise ValueError("TrainingSettings.architecture must be a UNetConfig")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"TrainingSettings.device must be 'auto', 'cpu' or 'cuda', "
                             f"got {self.device!r}")
        if self.num_threads is not None:
            check("num_threads", integer(1), "None or an integer >= 1")
        if self.init is not None:
            check("init", lambda v: isinstance(v, str) and v != "", "None or a model file path")

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["architecture"] = self.architecture.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> TrainingSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**values)

    def replace(self, **changes) -> TrainingSettings:
        return dataclasses.replace(self, **changes)

    def learning_rate(self, epoch: int) -> float:
        """Learning rate of epoch ``epoch`` (0-based): cosine from ``lr`` to the final fraction."""
        progress = epoch / max(self.epochs - 1, 1)
        final = self.lr * self.lr_final_fraction
        return final + 0.5 * (self.lr - final) * (1 + math.cos(math.pi * min(progress, 1.0)))


# -- data -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairsData:
    """The pairs of a training file: ``truth`` E and ``estimate`` Ẽ, float64 ``(n, H, W)``
    (images) or ``(n, D, H, W)`` (volumes).

    ``sha256`` is the checksum of the pairs' values (not of the file's bytes).
    """

    truth: np.ndarray
    estimate: np.ndarray
    recipe: dict
    sha256: str
    path: str

    @property
    def n(self) -> int:
        return self.truth.shape[0]

    @property
    def dims(self) -> int:
        """2 for pairs of images, 3 for pairs of volumes."""
        return self.truth.ndim - 1


#: ``format`` attribute of the reconstruction files of ``fenics-red reconstruct`` (the pairs).
PAIRS_FORMAT = "fenics-red reconstructions"
#: Versions of that layout :func:`read_pairs` understands.
PAIRS_FORMAT_VERSIONS = (1,)


def read_pairs(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> PairsData:
    """The training pairs of one pairs file, or of several concatenated in the given order.

    Several files (e.g. the same phantom recipe at several SNRs) let one denoiser learn the ML
    estimate's errors at every noise level it will meet. They must share the image shape and may
    not repeat. The recipe of a concatenation is ``{"sources": [recipe of each file, with its
    path, sha256 and number of pairs]}`` and its checksum is that of the files' checksums. Each
    file is checked as :func:`read_pairs_file` says.
    """
    if isinstance(paths, (str, os.PathLike)):
        return read_pairs_file(paths)
    paths = list(paths)
    if not paths:
        raise ValueError("no pairs file given; make one with `fenics-red reconstruct DATA.h5 "
                         "--method ml --all --out PAIRS.h5`")
    if len(paths) == 1:
        return read_pairs_file(paths[0])
    resolved = [str(Path(p).resolve()) for p in paths]
    repeated = sorted({p for p in resolved if resolved.count(p) > 1})
    if repeated:
        raise ValueError(f"pairs file(s) {repeated} given more than once; name each file once")
    parts = [read_pairs_file(p) for p in paths]
    digests = [part.sha256 for part in parts]
    copies = [(resolved[i], resolved[digests.index(d)]) for i, d in enumerate(digests)
              if digests.index(d) != i]
    if copies:  # a copy's pairs would sit in training and validation at once
        raise ValueError(f"pairs file {copies[0][0]!r} holds the same pairs as {copies[0][1]!r}; "
                         "give each pairs file once")
    shapes = {part.truth.shape[1:] for part in parts}
    if len(shapes) > 1:
        detail = ", ".join(f"{part.path!r}: {part.truth.shape[1:]}" for part in parts)
        raise ValueError(f"the pairs files hold images of different shapes ({detail}); train on "
                         "files of one grid")
    sources = [{"path": where, "sha256": part.sha256, "pairs": part.n, **part.recipe}
               for where, part in zip(resolved, parts, strict=True)]
    digest = hashlib.sha256("".join(part.sha256 for part in parts).encode()).hexdigest()
    return PairsData(np.concatenate([part.truth for part in parts]),
                     np.concatenate([part.estimate for part in parts]),
                     {"sources": sources}, digest, os.pathsep.join(resolved))


def read_pairs_file(path: str | os.PathLike) -> PairsData:
    """Read the training pairs: the output of ``fenics-red reconstruct DATA.h5 --method ml --all``.

    Layout (format ``"fenics-red reconstructions"``, version 1): datasets ``truth`` (E) and
    ``estimate`` (the ML estimate Ẽ), float64 ``(n, ny+1, nx+1)`` (or ``(n, nz+1, ny+1, nx+1)``
    for volumes, axis 1 the depth), ``index`` (n,) and ``done``
    (n,); attributes ``method`` (must be ``"ml"``: the denoiser learns the ML estimate's errors),
    ``settings`` (JSON: the estimator, i.e. the data recipe), ``data_path`` and ``data_attrs``
    (JSON: the simulated data set's attributes, SNR, grid and seed). All attributes, JSON parsed,
    become :attr:`PairsData.recipe`, which the model card records.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (saying what to do) for one
    that is not HDF5 or not a reconstruction file, was made by another method, is unfinished
    (``done`` not all set), has mismatched shapes, fewer than 2 pairs, non-finite values or a
    non-positive truth.
    """
    import h5py

    path = check_input_file(path, "pairs file")
    where = f"pairs file {str(path)!r}"
    make = ("make one with `fenics-red reconstruct DATA.h5 --method ml --all --out PAIRS.h5`")
    try:
        with h5py.File(path, "r") as f:
            recipe = {key: _plain(value) for key, value in f.attrs.items()}
            fmt = recipe.get("format")
            if fmt != PAIRS_FORMAT:
                hint = (" (it looks like a simulated data set, not its reconstructions)"
                        if "ux_noisy" in f else "")
                raise ValueError(f"{where} is not a fenics-red reconstruction file (format "
                                 f"attribute {fmt!r}, expected {PAIRS_FORMAT!r}){hint}; {make}")
            version = recipe.get("format_version")
            if version not in PAIRS_FORMAT_VERSIONS:
                raise ValueError(f"{where} has format version {version!r}; this fenics-red "
                                 f"reads {list(PAIRS_FORMAT_VERSIONS)}")
            method = recipe.get("method")
            if method != "ml":
                raise ValueError(f"{where} holds {method!r} reconstructions; the denoiser is "
                                 f"trained on maximum-likelihood estimates (method 'ml'); {make}")
            missing = [name for name in ("truth", "estimate", "done") if name not in f]
            if missing:
                raise ValueError(f"{where} has no dataset(s) {missing} (it holds "
                                 f"{sorted(f.keys())}); {make}")
            done = np.asarray(f["done"][...])
            truth = np.asarray(f["truth"][...], dtype=np.float64)
            estimate = np.asarray(f["estimate"][...], dtype=np.float64)
    except OSError as error:
        raise ValueError(f"{where} is not a readable HDF5 file: {error}") from None
    if truth.ndim == 2 and truth.shape == estimate.shape:
        raise ValueError(f"{where} holds 2-D arrays {truth.shape}: estimates per mesh node "
                         "(or images without their sample axis)? The denoiser trains on images "
                         "(n, ny+1, nx+1): make its pairs on a grid (simulate --grid, then "
                         "reconstruct --method ml --all)")
    if truth.ndim not in (3, 4) or truth.shape != estimate.shape:
        raise ValueError(f"{where}: 'truth' and 'estimate' must both have shape (n, ny+1, nx+1) "
                         f"(images) or (n, nz+1, ny+1, nx+1) (volumes); got {truth.shape} and "
                         f"{estimate.shape}")
    if done.shape != truth.shape[:1] or not done.all():
        n_done = int(np.count_nonzero(done))
        raise ValueError(f"{where} is unfinished: {n_done} of {truth.shape[0]} estimates done; "
                         "run the same `fenics-red reconstruct` command again to complete it")
    if truth.shape[0] < 2:
        raise ValueError(f"{where} holds {truth.shape[0]} pair(s); training needs at least 2")
    for name, array in (("truth", truth), ("estimate", estimate)):
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: dataset {name!r} has non-finite values")
    if (truth <= 0).any():
        raise ValueError(f"{where}: the truth must be strictly positive")
    empty = np.flatnonzero(~(estimate > 0).reshape(len(estimate), -1).any(axis=1))
    if empty.size:
        raise ValueError(f"{where}: estimate(s) {empty[:5].tolist()} have no positive value "
                         "(all zero: a failed reconstruction or a lost write); make the pairs "
                         "file again")
    return PairsData(truth, estimate, recipe, _content_sha256(truth, estimate), str(path))


def _plain(value):
    """HDF5 attribute -> JSON-compatible value (JSON strings are parsed)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _content_sha256(truth: np.ndarray, estimate: np.ndarray) -> str:
    """Checksum of the pairs themselves (shape and float64 values of truth, then estimate).

    It names the data, not the file: a copy with other chunking, compression or attributes (say
    a slimmed file carried to a GPU machine) has the same checksum, so its model card and its
    checkpoint match those of the original.
    """
    digest = hashlib.sha256(repr(truth.shape).encode())
    for array in (truth, estimate):
        digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
    return digest.hexdigest()


def split_indices(n: int, settings: TrainingSettings) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices (sorted) of ``n`` pairs, drawn from the seed."""
    n_val = min(max(1, round(settings.val_fraction * n)), n - 1)
    order = np.random.default_rng((settings.seed, 1)).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def checkpoint_path(out_path: str | os.PathLike) -> Path:
    """``MODEL.last.pt`` beside ``MODEL.pt``: the resumable state after the latest epoch."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".last" + (out_path.suffix or ".pt"))


def card_path(out_path: str | os.PathLike) -> Path:
    """``MODEL.json`` beside ``MODEL.pt``: the model card."""
    return Path(out_path).with_suffix(".json")


# -- the loop -------------------------------------------------------------------------------------

def _relative_sq(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖output − target‖² / ‖target‖²`` per image of a ``(B, 1, H, W)`` batch (or volume of a
    ``(B, 1, D, H, W)`` one)."""
    return ((output - target) ** 2).flatten(1).sum(1) / (target ** 2).flatten(1).sum(1)


class _Batches:
    """Inputs, targets of one pass over ``indices``; all randomness from ``rng``."""

    def __init__(self, data: PairsData, settings: TrainingSettings, device):
        self.data, self.settings, self.device = data, settings, device

    def mixed(self, indices: np.ndarray, rng: np.random.Generator, flip: bool,
              exchange: bool = False):
        s = self.settings
        truth = self.data.truth[indices]
        estimate = self.data.estimate[indices]
        t = rng.uniform(0.0, s.t_max, len(indices))
        t[rng.random(len(indices)) < s.clean_fraction] = 0.0
        if flip:  # x (the last axis); for volumes then y (the one before)
            for axis in (-1,) if truth.ndim == 3 else (-1, -2):
                flips = rng.random(len(indices)) < 0.5
                truth[flips] = np.flip(truth[flips], axis)
                estimate[flips] = np.flip(estimate[flips], axis)
        if exchange:  # x <-> y of volumes (ny = nx, checked by train_denoiser)
            swaps = rng.random(len(indices)) < 0.5
            truth[swaps] = np.swapaxes(truth[swaps], -1, -2)
            estimate[swaps] = np.swapaxes(estimate[swaps], -1, -2)
        inputs = truth + t.reshape(-1, *[1] * (truth.ndim - 1)) * (estimate - truth)
        return self.tensor(inputs), self.tensor(truth)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[:, None].to(
            self.device)


def _objective(network, inputs, truth, settings: TrainingSettings):
    """Loss of a batch: data term plus the optional penalties (each a batch mean)."""
    outputs = network(inputs)
    loss = _relative_sq(outputs, truth).mean()
    if settings.idempotence_weight > 0:
        fixed = outputs.detach()
        loss = loss + settings.idempotence_weight * _relative_sq(network(fixed), fixed).mean()
    if settings.fixed_point_weight > 0:
        loss = loss + settings.fixed_point_weight * _relative_sq(network(truth), truth).mean()
    return loss


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use "
                           "--device auto or cpu")
    return device


def train_denoiser(pairs_path: str | os.PathLike | Sequence[str | os.PathLike],
                   out_path: str | os.PathLike,
                   settings: TrainingSettings = TrainingSettings(), progress: bool = True, *,
                   resume: bool = False, overwrite: bool = False, command: str | None = None,
                   callback: Callable[[int, dict], None] | None = None) -> dict:
    """Train a denoiser on the pairs and write ``out_path``, its card and its checkpoint.

    ``pairs_path``: one pairs file or a list of them (concatenated, see :func:`read_pairs`).

    The network's ``dims`` follows the pairs: on volumes a 2-D ``settings.architecture`` (the
    default) is trained as the 3-D UNet of the same channels and depth (a 3-D one stays), and
    the card and checkpoint record the 3-D architecture; a 3-D architecture on images is an
    error. A 3-D convolution has 3 times the weights of a 2-D one: choose a narrower network
    for volumes (:data:`fenics_red.denoiser.DEFAULT_3D_CONFIG`).

    ``resume``: continue from ``MODEL.last.pt`` when it exists (its settings must equal
    ``settings`` apart from epochs, device and threads; more epochs extend the run, which changes
    the rest of the cosine schedule), otherwise start afresh. ``overwrite``: replace an existing
    model and discard an existing checkpoint. ``command`` is recorded in the card (default: the
    Python call). ``callback(epoch, record)`` runs after each epoch's checkpoint is written (an
    exception from it stops the run, which can be resumed). Returns the model card.

    Serial: under MPI call it on one rank (the ``train`` command does).
    """
    started = time.perf_counter()
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the run of "
                         "MODEL.last.pt, --overwrite discards it and starts over")
    out_path = Path(out_path)
    if out_path.suffix == ".json":
        raise ValueError(f"the model file {str(out_path)!r} must not end in .json (the model "
                         "card is written beside it as .json)")
    last_path = checkpoint_path(out_path)
    resuming = resume and last_path.exists()
    if last_path.exists() and not resume and not overwrite:
        raise FileExistsError(f"checkpoint {str(last_path)!r} of an earlier run exists; pass "
                              "--resume to continue it (or extend it with more --epochs) or "
                              "--overwrite to start over")
    # A resumed run replaces the model that the same run wrote (e.g. when extending epochs).
    out_path = check_output_path(out_path, overwrite or resuming)
    card = card_path(out_path)
    if card.exists() and not (overwrite or resuming or out_path.exists()):
        raise FileExistsError(f"{str(card)!r} exists without its model {str(out_path)!r}; the "
                              "run would write its model card there: remove it, pass "
                              "--overwrite, or choose another --out")
    inputs = [Path(p) for p in ([pairs_path] if isinstance(pairs_path, str | os.PathLike)
                                else pairs_path)] + ([Path(settings.init)] if settings.init
                                                     else [])
    for side in (card, last_path):
        for given in inputs:
            if side.exists() and given.exists() and os.path.samefile(side, given):
                raise ValueError(f"{str(side)!r}, which this run writes beside the model, is its "
                                 f"input {str(given)!r}; choose another --out")
    data = read_pairs(pairs_path)
    if command is None:
        command = f"train_denoiser({str(pairs_path)!r}, {str(out_path)!r}, {settings!r})"
    settings = settings_for_data(settings, data)
    device = _resolve_device(settings.device)
    train_idx, val_idx = split_indices(data.n, settings)

    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    saved_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    # CPU kernels are deterministic; on CUDA some (reflection padding's backward) have no
    # deterministic version, so there it only warns.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    try:
        with OutputLock(out_path):  # one run at a time on MODEL.pt (and its card, checkpoint)
            return _train(data, out_path, last_path, settings, device, train_idx, val_idx,
                          progress, resuming, command, callback, started)
    finally:
        torch.use_deterministic_algorithms(saved_deterministic, warn_only=saved_warn_only)
        torch.set_num_threads(saved_threads)


def settings_for_data(settings: TrainingSettings, data: PairsData) -> TrainingSettings:
    """``settings`` with the architecture's ``dims`` of the pairs (2: images, 3: volumes).

    A 2-D architecture on volumes becomes 3-D with the same channels and depth; a 3-D one on
    images is a ``ValueError``, and so is ``exchange`` on images or on volumes with ``ny ≠ nx``.
    """
    if settings.exchange and (data.dims != 3 or data.truth.shape[-1] != data.truth.shape[-2]):
        what = ("images" if data.dims == 2 else
                f"volumes of {data.truth.shape[-2]} nodes along y and {data.truth.shape[-1]} "
                "along x")
        raise ValueError(f"the exchange x <-> y (--exchange) needs volumes with as many nodes "
                         f"along y as along x, but the pairs hold {what}; leave it out")
    architecture = settings.architecture
    if architecture.dims == data.dims:
        return settings
    if architecture.dims == 3:
        raise ValueError(f"a 3-D architecture cannot be trained on images: the pairs hold "
                         f"images of shape {data.truth.shape[1:]}; use a 2-D architecture "
                         "(dims 2) or pairs of volumes")
    return settings.replace(architecture=dataclasses.replace(architecture, dims=data.dims))


def _train(data, out_path, last_path, settings, device, train_idx, val_idx, progress, resuming,
           command, callback, started) -> dict:
    torch.manual_seed(settings.seed)
    network = DenoiserNet(settings.architecture).to(device)
    init = None  # the initial model's card entry: read before training, so a missing file fails
    if settings.init is not None:  # now (also on resume), not after the last epoch
        model, init = initial_model(settings.init, settings.architecture)
        if not resuming:
            network.load_state_dict(model)
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.lr,
                                 weight_decay=settings.weight_decay)
    history: list[dict] = []
    best = {"epoch": -1, "val_loss": math.inf, "state_dict": None}
    start_epoch = 0
    legs = []  # each call's planned epochs and where it started: an extended run's schedule
    if resuming:
        state = _read_checkpoint(last_path, settings, data, init)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        legs = list(state.get("legs") or [])
        if progress:
            print(f"resuming {str(last_path)!r} after epoch {start_epoch}", file=sys.stderr)
    legs.append({"start_epoch": start_epoch, "epochs": settings.epochs})

    batches = _Batches(data, settings, device)
    # Fixed validation inputs: the same mixing recipe, drawn once from the seed.
    val_inputs, val_truth = batches.mixed(val_idx, np.random.default_rng((settings.seed, 2)),
                                          flip=False)
    val_estimate = batches.tensor(data.estimate[val_idx])

    n_batches = math.ceil(len(train_idx) / settings.batch_size)
    bar = progress_bar(settings.epochs, initial=min(start_epoch, settings.epochs), unit="epoch",
                       disable=not progress, desc="train")
    try:
        for epoch in range(start_epoch, settings.epochs):
            tic = time.perf_counter()
            lr = settings.learning_rate(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rng = np.random.default_rng((settings.seed, 0, epoch))
            order = rng.permutation(train_idx)
            network.train()
            total = 0.0
            for b in range(n_batches):
                chosen = order[b * settings.batch_size:(b + 1) * settings.batch_size]
                inputs, truth = batches.mixed(chosen, rng, flip=settings.flip,
                                              exchange=settings.exchange)
                loss = _objective(network, inputs, truth, settings)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(network.parameters(), settings.grad_clip)
                optimizer.step()
                total += loss.item() * len(chosen)
            record = {"epoch": epoch + 1, "lr": lr, "train_loss": total / len(train_idx)}
            record.update(_validate(network, val_inputs, val_truth, val_estimate, settings))
            record["seconds"] = time.perf_counter() - tic
            _check_converging(record, settings)
            history.append(record)
            if record["val_loss"] < best["val_loss"]:
                best = {"epoch": epoch + 1, "val_loss": record["val_loss"],
                        "state_dict": _cpu_state(network)}
            _write_checkpoint(last_path, network, optimizer, settings, data, epoch + 1, history,
                              best, legs, init)
            bar.set_postfix(train=f"{record['train_loss']:.4g}", val=f"{record['val_loss']:.4g}",
                            err=f"{record['val_rel_error']:.3f}", best=best["epoch"])
            bar.update(1)
            if callback is not None:
                callback(epoch + 1, record)
    finally:
        bar.close()

    if best["state_dict"] is None:
        raise ValueError("training found no epoch with a finite validation loss; no model was "
                         "written")
    network.load_state_dict(best["state_dict"])
    network.eval()
    metrics = validation_metrics(network, data.truth[val_idx], data.estimate[val_idx], device)
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise ValueError(f"the trained model's validation metrics {bad} are not finite; no "
                         "model was written")
    card = {
        "format": "fenics-red-model-card", "trained": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "seed": settings.seed,
        "epochs": settings.epochs,
        "best_epoch": best["epoch"],
        # the learning-rate schedule follows each call's planned epochs (cosine decay): a run
        # resumed with more epochs lists each call here, so the card says how it was trained
        "legs": legs,
        "settings": settings.to_dict(),
        "architecture": settings.architecture.to_dict(),
        "parameters": count_parameters(settings.architecture),
        "prediction": "residual: C(E) = E - s N(E/s), s = median |E| (scale-equivariant)",
        "data": {"path": _card_path(data), "sha256": data.sha256, "pairs": data.n,
                 "image_shape": list(data.truth.shape[1:]),
                 "snr_db": _data_attr(data.recipe, "snr_db"), "recipe": data.recipe},
        "init": init,
        "split": {"train": len(train_idx), "validation": len(val_idx),
                  "validation_indices": val_idx.tolist()},
        "validation": metrics,
        "history": history,
        "environment": {"fenics_red": _version(), "torch": torch.__version__,
                        "python": platform.python_version(), "device": str(device),
                        "threads": torch.get_num_threads()},
        "train_seconds": sum(r["seconds"] for r in history),
        "wall_seconds_this_call": time.perf_counter() - started,
    }
    card = json.loads(json.dumps(card))
    Denoiser(network.cpu(), card).save(out_path, card, overwrite=True)  # checked on entry
    with atomic_output(card_path(out_path), overwrite=True) as tmp:
        tmp.write_text(json.dumps(card, indent=1) + "\n")
    return card


#: What a fine-tuned model's card keeps of its initial model's card (its provenance).
_INIT_CARD_KEYS = ("created", "command", "epochs", "best_epoch", "validation", "init")


def initial_model(path: str | os.PathLike, architecture) -> tuple[dict, dict]:
    """The weights of the model file ``path`` (float32) for a run that starts from them
    (:attr:`TrainingSettings.init`), and its card entry: path, SHA-256 and the provenance part of
    its own card (command, epochs, pairs, validation, and its own initial model), so that a
    fine-tuned model's card tells its whole recipe. A ``ValueError`` when its architecture
    differs."""
    model = Denoiser.load(path)
    if model.config.dims != architecture.dims:
        raise ValueError(f"the initial model {str(path)!r} is a {model.config.dims}-D model and "
                         f"the pairs hold {'volumes' if architecture.dims == 3 else 'images'} "
                         f"({architecture.dims}-D); give an --init of the pairs' dimension")
    if model.config != architecture:
        raise ValueError(f"the initial model {str(path)!r} has the architecture {model.config}, "
                         f"the run trains {architecture}; pass matching --channels/--depth or "
                         "another --init")
    weights = {k: v.float() if v.is_floating_point() else v
               for k, v in model.network.state_dict().items()}
    data = model.card.get("data") or {}
    summary = {k: model.card[k] for k in _INIT_CARD_KEYS if k in model.card}
    summary["data"] = {k: data[k] for k in ("pairs", "sha256", "snr_db") if k in data}
    record = {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "card": summary}
    return weights, record


def _check_converging(record: dict, settings: TrainingSettings) -> None:
    """Stop a diverged run: a non-finite training or validation loss is an error (before the
    epoch's checkpoint is written, so the model and checkpoint of the last good epoch stay)."""
    bad = [k for k in ("train_loss", "val_loss", "val_rel_error") if not math.isfinite(record[k])]
    if bad:
        clip = ("" if settings.grad_clip is None else
                f" (--grad-clip is {settings.grad_clip:g})")
        raise ValueError(f"training diverged in epoch {record['epoch']}: {', '.join(bad)} "
                         f"{'is' if len(bad) == 1 else 'are'} not finite; lower --lr "
                         f"({settings.lr:g}) or clip the gradient with --grad-clip{clip}; no model "
                         "was written")


@torch.no_grad()
def _validate(network, val_inputs, val_truth, val_estimate, settings) -> dict:
    network.eval()
    loss = _objective(network, val_inputs, val_truth, settings).item()
    denoised = network(val_estimate)
    error = _relative_sq(denoised, val_truth).sqrt().mean().item()
    drift = _relative_sq(network(val_truth), val_truth).sqrt().mean().item()
    return {"val_loss": loss, "val_rel_error": error, "val_clean_drift": drift}


@torch.no_grad()
def validation_metrics(network, truth: np.ndarray, estimate: np.ndarray, device="cpu") -> dict:
    """Mean relative errors ``‖x − E‖/‖E‖`` over validation pairs, in float64.

    ``input_rel_error`` of Ẽ itself, ``denoised_rel_error`` of ``C(Ẽ)``, and the drift of clean
    maps ``clean_drift_k = ‖Cᵏ(E) − E‖/‖E‖`` after ``k = 1`` and ``5`` applications (how far a RED
    iteration started at the truth would be pushed by the prior alone). Also
    ``denoised_twice_rel_error`` of ``C(C(Ẽ))``. ``C`` is the network itself, without the
    left-right flip average that :class:`~fenics_red.denoiser.Denoiser` applies at inference
    (which did better on every validation set measured). ``truth`` and ``estimate``: ``(n, H,
    W)`` images for a 2-D network, ``(n, D, H, W)`` volumes for a 3-D one; all in one batch.
    """
    network = network.eval().to(device)
    E = torch.from_numpy(np.asarray(truth, np.float64))[:, None].to(device)
    x = torch.from_numpy(np.asarray(estimate, np.float64))[:, None].to(device)

    def rel(a):
        return _relative_sq(a, E).sqrt().mean().item()

    once = network(x)
    clean = [E]
    for _ in range(5):
        clean.append(network(clean[-1]))
    return {"input_rel_error": rel(x), "denoised_rel_error": rel(once),
            "denoised_twice_rel_error": rel(network(once)),
            "clean_drift_1": rel(clean[1]), "clean_drift_5": rel(clean[5]),
            "pairs": int(E.shape[0])}


def _cpu_state(network) -> dict:
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}


def _write_checkpoint(path, network, optimizer, settings, data, epoch, history, best, legs=(),
                      init=None) -> None:
    optimizer_state = optimizer.state_dict()
    optimizer_state = {"state": {k: {n: (t.cpu() if torch.is_tensor(t) else t)
                                     for n, t in v.items()}
                                 for k, v in optimizer_state["state"].items()},
                       "param_groups": optimizer_state["param_groups"]}
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
               "settings": settings.to_dict(), "data_sha256": data.sha256, "epoch": epoch,
               "model": _cpu_state(network), "optimizer": optimizer_state,
               "torch_rng": torch.get_rng_state(), "history": history, "best": best,
               "legs": list(legs), "init_sha256": None if init is None else init["sha256"]}
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(payload, tmp)


def _read_checkpoint(path: Path, settings: TrainingSettings, data: PairsData,
                     init: dict | None = None) -> dict:
    state = _read_torch_file(path, "training checkpoint")
    where = f"training checkpoint {str(path)!r}"
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where} is not a fenics-red training checkpoint")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{where} has version {state.get('format_version')!r}; this fenics-red "
                         f"resumes version {CHECKPOINT_VERSION}; start over with --overwrite")
    old = dict(state["settings"])
    new = settings.to_dict()
    changed = sorted(k for k in set(old) | set(new)
                     if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {where}: settings differ ({detail}); use the same "
                         "settings or start over with --overwrite")
    if state["data_sha256"] != data.sha256:
        raise ValueError(f"cannot resume {where}: it was trained on another pairs file "
                         "(checksum differs); start over with --overwrite")
    if settings.epochs < state["epoch"]:
        raise ValueError(f"cannot resume {where}: it has run {state['epoch']} epochs, more than "
                         f"--epochs {settings.epochs}; give --epochs {state['epoch']} or more")
    started_from = state.get("init_sha256")
    if started_from is not None and (init is None or init["sha256"] != started_from):
        raise ValueError(f"cannot resume {where}: its initial model (--init) has changed since "
                         "the run started (checksum differs); restore it or start over with "
                         "--overwrite")
    return state


def _data_attr(recipe: dict, name: str):
    """An attribute of the simulated data set behind the pairs (``None`` when not recorded).

    For several pairs files (``recipe["sources"]``) the list of each file's value.
    """
    if isinstance(recipe.get("sources"), list):
        return [_data_attr(source, name) for source in recipe["sources"]]
    attrs = recipe.get("data_attrs")
    return attrs.get(name) if isinstance(attrs, dict) else None


def _card_path(data: PairsData) -> str | list[str]:
    """The pairs file (resolved) for the card; the list of files for a concatenation."""
    if isinstance(data.recipe.get("sources"), list):
        return [source["path"] for source in data.recipe["sources"]]
    return str(Path(data.path).resolve())


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"
