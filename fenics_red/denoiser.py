"""The learned denoiser ``C_w`` of regularisation by denoising (paper, equations 10-12).

RED uses the denoiser's residual as the gradient of the regulariser, ``∇R(E) = E − C_w(E)``
(equation 10), with the explicit regulariser ``R(E) = ½ Eᵀ(E − C_w(E))`` (equation 11) and the
regularisation weight chosen from ``λ ≥ ‖∇g(E)‖`` (equation 12). Both identities assume what the
RED papers (Romano, Elad & Milanfar 2017; Reehorst & Schniter 2019) call *local homogeneity*,
``C(sE) = s C(E)``, and a well-behaved Jacobian. This module builds a denoiser with those
properties by construction:

* **Scale equivariance, exactly.** The image is divided by its scale ``s(E)`` (the median of
  ``|E|``, which is the background modulus of a phantom whose inclusions cover less than half the
  field), the network acts on ``E / s`` and its output is multiplied back by ``s``. Since
  ``s(aE) = a s(E)`` for ``a > 0``, ``C(aE) = a C(E)``: modulus maps in kPa, in Pa or normalised
  to a background of 1 go through the same network. The division and multiplication are done in
  float64, so the property holds to round-off, not only approximately.
* **Residual prediction.** The network predicts the *error* ``N(E/s)`` and
  ``C(E) = E − s N(E/s)``. Then ``∇R(E) = E − C(E) = s N(E/s)`` is the network output itself (no
  cancellation between two nearly equal images), a clean map is a fixed point exactly where the
  network outputs zero (the easiest function for it to learn: training on clean inputs, see
  :mod:`fenics_red.training`, pushes clean maps towards fixed points), and the last layer starts
  at zero, so an untrained denoiser *is* the identity and RED with it reduces to the unregularised
  estimate. Predicting the clean image instead would make the identity (and hence fixed points) a
  function the network has to learn through all its layers.
* **Any image size.** The UNet halves the image ``depth`` times, so the input is padded by
  reflection to a multiple of ``2**depth`` and the output cropped back: 65 × 65 nodal images of a
  64² grid work as well as 17 × 21.
* **Smoothness.** SiLU activations and average pooling make ``C`` a smooth map, so the RED
  gradient ``E − C(E)`` has a Lipschitz Jacobian, which the gradient-descent step needs.
* **Left-right symmetry, exactly.** The problem is symmetric under a left-right flip ``F`` (the
  load is vertical, the supports symmetric), and training uses such flips as its only
  augmentation, but a network is only approximately equivariant. :class:`Denoiser` averages the
  two: ``C(E) = ½ [Ĉ(E) + F Ĉ(F E)]`` (one call on a batch of two; ``flip_average=False`` turns
  it off; its measured effect is in ``docs/studies.md``). Scale equivariance and the identity of
  an untrained network are kept.

**Volumes (3-D elastography).** ``UNetConfig(dims=3)`` builds the same network with 3 × 3 × 3
convolutions, 3-D average pooling and 2 × 2 × 2 transposed convolutions, padded by reflection on
all three axes, so every property above carries over. A volume has shape ``(nz+1, ny+1, nx+1)``:
axis 0 is the depth (from the transducer face, the direction of the load), axis 1 the elevation
``y``, axis 2 the lateral ``x``. The physically allowed flips are ``x → −x`` and ``y → −y`` (and
both); the 3-D :class:`Denoiser` averages over that group of four, as
``¼ [(r₀ + Fₓ r₁) + (F_y r₂ + FₓF_y r₃)]`` where ``r_g`` is the network's residual of ``g E``
(one call on a batch of four): any of the flips only permutes the terms within the brackets or
swaps the brackets, so the result is equivariant under both flips to the last bit, up to how the
network's kernels treat the positions in a batch. The exchange ``x ↔ y`` (allowed when
``ny = nx``) is not averaged over: the lateral and elevational axes of a probe are not equivalent
in measured data, and it would double the cost for half a per cent of error on the simulated
validation volumes (``docs/studies.md``); training may use it (``TrainingSettings.exchange``).
A 2-D model can also denoise a volume slice by slice (:class:`SliceWiseDenoiser`,
:meth:`Denoiser.slicewise`): each axial-lateral plane ``volume[:, j, :]`` is an image like the
2-D training images. Files written before ``dims`` existed hold no ``dims`` and load as 2-D
models, unchanged.

The network runs in float32; images enter and leave as float64 NumPy arrays. torch is imported by
this module (and :mod:`fenics_red.training`) only: ``import fenics_red`` stays free of it.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .io import atomic_output, check_input_file

__all__ = ["Denoiser", "DenoiserNet", "SliceWiseDenoiser", "UNet", "UNetConfig",
           "count_parameters", "image_scale", "save_identity", "DEFAULT_3D_CONFIG",
           "MODEL_FORMAT", "MODEL_FORMAT_VERSION"]

#: Value of the ``format`` key of a denoiser file: tells a fenics-red model from other torch files.
MODEL_FORMAT = "fenics-red-denoiser"
#: Version of the file layout; :meth:`Denoiser.load` refuses other versions with a clear message.
MODEL_FORMAT_VERSION = 1
#: ``format`` of the training checkpoints written by :mod:`fenics_red.training` (not loadable here).
CHECKPOINT_FORMAT = "fenics-red-training-checkpoint"


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the UNet: everything needed to rebuild it before loading its weights.

    ``channels`` feature maps at full resolution, doubled at each of the ``depth`` levels (so the
    bottleneck has ``channels * 2**depth``); two 3 × 3 convolutions per level. The defaults (16, 3)
    have about 0.47 M parameters (1.9 MB) and denoise a 129 × 129 image in a few tens of
    milliseconds on one CPU core (see ``benchmarks/results/denoiser.md``); the receptive field of
    depth 3 spans about 70 pixels, the size of a 64² phantom.

    ``dims``: 2 for images ``(ny+1, nx+1)``, 3 for volumes ``(nz+1, ny+1, nx+1)`` (3 × 3 × 3
    convolutions; a convolution has 3 times the weights of its 2-D version, so 3-D models are
    narrower: :data:`DEFAULT_3D_CONFIG`).
    """

    channels: int = 16
    depth: int = 3
    dims: int = 2

    def __post_init__(self):
        for name, low in (("channels", 1), ("depth", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"UNetConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.depth > 8:
            raise ValueError(f"UNetConfig.depth must be at most 8, got {self.depth}")
        if isinstance(self.dims, bool) or not isinstance(self.dims, int) or self.dims not in (2, 3):
            raise ValueError(f"UNetConfig.dims must be 2 (images) or 3 (volumes), got "
                             f"{self.dims!r}")

    def to_dict(self) -> dict:
        """``{"name": "unet", "channels", "depth"}``, plus ``"dims": 3`` for a 3-D network.

        A 2-D network's dictionary has no ``dims`` (2 is what its absence means), so 2-D model
        files, cards and checkpoints are the same as before 3-D networks existed, and older
        fenics-red versions still read them.
        """
        values = {"name": "unet", **asdict(self)}
        if self.dims == 2:
            del values["dims"]
        return values

    @classmethod
    def from_dict(cls, values) -> UNetConfig:
        """Rebuild from :meth:`to_dict`; unknown or missing keys raise ``ValueError``.

        A missing ``dims`` means 2 (the files written before 3-D networks existed).
        """
        if not isinstance(values, dict):
            raise ValueError(f"architecture must be a dictionary, got {type(values).__name__}")
        values = dict(values)
        values.setdefault("dims", 2)
        name = values.pop("name", "unet")
        if name != "unet":
            raise ValueError(f"unknown architecture {name!r}; this fenics-red knows 'unet'")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(values) - known), sorted(known - set(values))
        if unknown or missing:
            raise ValueError(f"architecture keys do not match UNetConfig: unknown {unknown}, "
                             f"missing {missing}")
        return cls(**values)


#: The convolution, transposed convolution and average pooling of each dimension.
_LAYERS = {2: (nn.Conv2d, nn.ConvTranspose2d, F.avg_pool2d),
           3: (nn.Conv3d, nn.ConvTranspose3d, F.avg_pool3d)}
#: Names of the spatial axes of a batch, for messages.
_AXES = {2: "height, width", 3: "depth, height, width"}

#: A small 3-D network: 8 feature maps at full resolution, 2 halvings: 85,017 parameters (0.34 MB
#: in float32, 0.17 MB as stored by ``save(half=True)``). On one CPU thread it denoises a 25³
#: volume in about 0.06 s and a 33³ one in about 0.12 s (with the average over the four flips).
#: Its encoder's receptive field spans about 32 voxels (depth 3: about 70, as in 2-D).
DEFAULT_3D_CONFIG = UNetConfig(channels=8, depth=2, dims=3)


def _block(c_in: int, c_out: int, dims: int = 2) -> nn.Sequential:
    conv = _LAYERS[dims][0]
    return nn.Sequential(conv(c_in, c_out, 3, padding=1), nn.SiLU(),
                         conv(c_out, c_out, 3, padding=1), nn.SiLU())


class UNet(nn.Module):
    """UNet on single-channel images or volumes of any size, ``(B, 1, *size) -> (B, 1, *size)``
    with ``len(size) == config.dims``.

    Encoder: a block of two 3 × 3 (× 3) convolutions, then ``depth`` times average pooling and a
    block with twice the channels. Decoder: a 2 × 2 (× 2) transposed convolution (deterministic on
    CUDA, unlike bilinear upsampling's backward pass), concatenation with the encoder's features
    and a block. The input is padded by reflection to a multiple of ``2**depth`` on every spatial
    axis (split evenly between the two sides) and the output cropped back. The final 1 × 1
    convolution starts at zero, so an untrained network outputs zeros.
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        c, d = config.channels, config.depth
        conv, transposed, _ = _LAYERS[config.dims]
        widths = [c * 2**i for i in range(d + 1)]
        self.inc = _block(1, widths[0], config.dims)
        self.down = nn.ModuleList(_block(widths[i], widths[i + 1], config.dims) for i in range(d))
        self.upsample = nn.ModuleList(
            transposed(widths[i + 1], widths[i], 2, stride=2) for i in range(d))
        self.up = nn.ModuleList(_block(2 * widths[i], widths[i], config.dims) for i in range(d))
        self.out = conv(widths[0], 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = self.config.dims
        if x.ndim != dims + 2 or x.shape[1] != 1:
            raise ValueError(f"UNet expects a (batch, 1, {_AXES[dims]}) tensor, got "
                             f"{tuple(x.shape)}")
        size = x.shape[2:]
        pool = _LAYERS[dims][2]
        x, offset = _pad_to_multiple(x, 2**self.config.depth, dims)
        skips = []
        h = self.inc(x)
        for block in self.down:
            skips.append(h)
            h = block(pool(h, 2))
        for upsample, block in zip(reversed(self.upsample), reversed(self.up), strict=True):
            h = block(torch.cat([skips.pop(), upsample(h)], dim=1))
        h = self.out(h)
        return h[(..., *(slice(o, o + n) for o, n in zip(offset, size, strict=True)))]


def _pad_to_multiple(x: torch.Tensor, multiple: int, dims: int = 2
                     ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad the last ``dims`` axes to a multiple of ``multiple`` (reflection; replication where
    the input is too small to reflect); return the padded tensor and the offset of the original
    on each axis."""
    size = x.shape[-dims:]
    extra = [(-n) % multiple for n in size]
    before = [e // 2 for e in extra]
    if not any(extra):
        return x, tuple(before)
    pads = []  # F.pad's order: last axis first
    for e, b in zip(reversed(extra), reversed(before), strict=True):
        pads += [b, e - b]
    reflectable = all(max(b, e - b) < n for n, e, b in zip(size, extra, before, strict=True))
    return F.pad(x, tuple(pads), mode="reflect" if reflectable else "replicate"), tuple(before)


def image_scale(x: torch.Tensor) -> torch.Tensor:
    """Scale ``s`` of each image (or volume) of a ``(B, 1, ...)`` batch, shape ``(B, 1, ..., 1)``
    (as many axes as ``x``), detached.

    The median of ``|x|`` (the lower median for an even number of pixels); where it is zero the
    mean of ``|x|``; where that is zero too (an all-zero image) 1. Positively homogeneous:
    ``image_scale(a x) = a image_scale(x)`` for ``a > 0``, which makes the denoiser
    scale-equivariant.
    """
    flat = x.detach().abs().flatten(1)
    scale = flat.median(dim=1).values
    scale = torch.where(scale > 0, scale, flat.mean(dim=1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.reshape(-1, *[1] * (x.ndim - 1))


class DenoiserNet(nn.Module):
    """``C(x) = x − s(x) N(x / s(x))``: the scale-normalised residual denoiser around a UNet ``N``.

    Accepts ``(B, 1, H, W)`` tensors (``(B, 1, D, H, W)`` for a 3-D config) of any floating
    dtype: the normalisation and the residual are computed in the input's dtype (float64 at
    inference, so scale equivariance holds to round-off) and the UNet in its own (float32).
    :meth:`residual` returns ``x − C(x) = s N(x/s)``, the RED gradient of equation (10).
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        self.unet = UNet(config)

    def residual(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``s N(x/s)`` with ``s = image_scale(x)`` (one scale per batch element), or the given
        ``scale`` (any positive tensor that broadcasts against ``x``, e.g. one scale for several
        slices of a volume; it must be positively homogeneous in ``x`` for scale equivariance)."""
        if scale is None:
            scale = image_scale(x)
        dtype = next(self.unet.parameters()).dtype
        return self.unet((x / scale).to(dtype)).to(x.dtype) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.residual(x)


class Denoiser:
    """A trained (or untrained) denoiser applied to NumPy images: ``denoised = denoiser(image)``.

    ``image`` is a 2-D array of modulus values of any size and scale (shape kept, float64 out), or
    for a 3-D model (:attr:`dims` 3) a volume ``(nz+1, ny+1, nx+1)``; the other kind is refused
    with a message (:meth:`slicewise` applies a 2-D model to a volume). The call runs the network
    in eval mode without autograd. ``flip_average`` averages over the allowed flips: left-right in
    2-D; ``x``, ``y`` and both in 3-D (see the module's documentation). :meth:`save` writes the
    architecture, the weights and a model card to one torch file; :meth:`load` reads it back with
    ``torch.load(weights_only=True)`` (no code is unpickled) and explains any problem.

    >>> denoiser = Denoiser.load("model.pt")            # doctest: +SKIP
    >>> gradient = image - denoiser(image)               # ∇R(E), equation (10)  # doctest: +SKIP
    """

    def __init__(self, network: DenoiserNet | None = None, card: dict | None = None,
                 device: str | torch.device = "cpu", flip_average: bool = True):
        self.network = (network if network is not None else DenoiserNet()).to(device).eval()
        self.card = dict(card or {})
        self.device = torch.device(device)
        self.flip_average = bool(flip_average)

    @classmethod
    def untrained(cls, config: UNetConfig = UNetConfig(), seed: int = 0,
                  device: str | torch.device = "cpu") -> Denoiser:
        """A freshly initialised denoiser (the identity map, since its last layer is zero)."""
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            network = DenoiserNet(config)
        finally:
            torch.random.set_rng_state(generator_state)
        return cls(network, {"trained": False, "seed": seed}, device)

    @property
    def config(self) -> UNetConfig:
        return self.network.config

    @property
    def dims(self) -> int:
        """2: the denoiser takes images ``(ny+1, nx+1)``; 3: volumes ``(nz+1, ny+1, nx+1)``."""
        return self.config.dims

    def __repr__(self) -> str:
        trained = "trained" if self.card.get("trained", True) else "untrained"
        return f"Denoiser({self.config}, {trained}, device={self.device})"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = _check_image(image, self.dims)
        return x - self._residual(x)

    def residual(self, image: np.ndarray) -> np.ndarray:
        """``image − C(image)``, the RED gradient ``∇R(E)`` of equation (10), computed directly."""
        return self._residual(_check_image(image, self.dims))

    def slicewise(self, scale: str = "volume") -> SliceWiseDenoiser:
        """This 2-D denoiser applied to volumes slice by slice (see :class:`SliceWiseDenoiser`)."""
        return SliceWiseDenoiser(self, scale)

    def _residual(self, x: np.ndarray) -> np.ndarray:
        """The network's residual on one checked image, averaged over the allowed flips when
        :attr:`flip_average` is set; ``ValueError`` when it is not finite (a diverged model)."""
        with torch.inference_mode():
            tensor = torch.from_numpy(x).to(self.device)[None, None]
            residual = self._batch_residual(tensor)[0, 0].cpu().numpy()
        return _check_finite(residual)

    def _batch_residual(self, batch: torch.Tensor, scale: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """The residual of each element of a ``(B, 1, *size)`` batch, averaged over the group of
        allowed flips when :attr:`flip_average` is set (one network call on ``B`` times the
        group's size). ``scale``: see :meth:`DenoiserNet.residual` (it must be invariant under
        the flips, as ``image_scale`` and one scalar are)."""
        residual = self.network.residual
        if not self.flip_average:
            return residual(batch, scale)
        n = batch.shape[0]
        if self.dims == 2:
            both = residual(torch.cat([batch, batch.flip(-1)]), scale)
            return 0.5 * (both[:n] + both[n:].flip(-1))
        # x (axis -1), y (axis -2): each flip permutes the terms within the brackets or swaps
        # the brackets, and floating-point addition is commutative, so the average is exactly
        # equivariant (see the module's documentation)
        group = ((), (-1,), (-2,), (-2, -1))
        out = residual(torch.cat([batch.flip(g) if g else batch for g in group]), scale)
        r = [out[k * n:(k + 1) * n].flip(g) if g else out[:n] for k, g in enumerate(group)]
        return 0.25 * ((r[0] + r[1]) + (r[2] + r[3]))

    def save(self, path: str | os.PathLike, card: dict | None = None, *,
             overwrite: bool = True, half: bool = False) -> Path:
        """Write architecture, weights and ``card`` (JSON-serialisable; default: ``self.card``)
        to ``path`` atomically. Returns the path.

        ``half`` stores the weights in float16 (half the file; the shipped model is stored so):
        :meth:`load` casts them back and the network still computes in float32.
        """
        card = self.card if card is None else card
        if half:
            card = {**card, "stored_weights": "float16"}
        try:
            card = json.loads(json.dumps(card))  # plain types only, as weights_only loading needs
        except (TypeError, ValueError) as error:
            raise ValueError(f"the model card must be JSON-serialisable: {error}") from None
        state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        bad = _non_finite(state)
        if bad:
            raise ValueError(f"the denoiser's weights {bad} are not finite (a diverged training "
                             "run?); nothing was written")
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        payload = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
                   "architecture": self.config.to_dict(), "state_dict": state, "card": card}
        path = Path(path)
        with atomic_output(path, overwrite) as tmp:
            torch.save(payload, tmp)
        self.card = card
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             flip_average: bool = True) -> Denoiser:
        """Read a file written by :meth:`save`.

        Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file and
        the problem) for one that is not a torch file, is corrupt, is a torch file of something
        else (including a training checkpoint), has another format version, or whose weights do
        not match its architecture.
        """
        path = check_input_file(path, "denoiser model")
        payload = _read_torch_file(path, "denoiser model")
        where = f"denoiser model {str(path)!r}"
        if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
            if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
                raise ValueError(f"{where} is a training checkpoint, not a model; give the model "
                                 "file that `fenics-red train --out` wrote")
            raise ValueError(f"{where} is not a fenics-red denoiser file (no format "
                             f"{MODEL_FORMAT!r} marker)")
        version = payload.get("format_version")
        if version != MODEL_FORMAT_VERSION:
            raise ValueError(f"{where} has format version {version!r}; this fenics-red reads "
                             f"version {MODEL_FORMAT_VERSION}")
        missing = [k for k in ("architecture", "state_dict", "card") if k not in payload]
        if missing:
            raise ValueError(f"{where} is incomplete: missing {missing}")
        try:
            config = UNetConfig.from_dict(payload["architecture"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten below
            network = DenoiserNet(config)
        try:
            network.load_state_dict(payload["state_dict"], strict=True)
        except (RuntimeError, TypeError, AttributeError) as error:
            first = str(error).strip().splitlines()
            raise ValueError(f"{where}: the weights do not match its architecture {config}: "
                             f"{' '.join(line.strip() for line in first[:4])}") from None
        bad = _non_finite(network.state_dict())
        if bad:
            raise ValueError(f"{where} has non-finite weights (NaN or inf) in {bad}: the model "
                             "of a diverged training run; retrain it")
        card = payload["card"] if isinstance(payload["card"], dict) else {}
        return cls(network, card, device, flip_average)


def _non_finite(state: dict) -> list[str]:
    """The names of the floating-point tensors of a state dict holding NaN or inf (first 3)."""
    names = [name for name, value in state.items()
             if torch.is_tensor(value) and value.is_floating_point()
             and not bool(torch.isfinite(value).all())]
    return names[:3] + (["..."] if len(names) > 3 else [])


def _read_torch_file(path: Path, what: str):
    """``torch.load(weights_only=True)`` with one clear ``ValueError`` for anything unreadable.

    ``torch.save`` writes a zip archive; anything else (random bytes, a truncated copy whose
    central directory is gone, an empty file, another kind of file) is refused before torch sees
    it, so the message names the problem instead of torch's advice about ``weights_only``.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{what} {str(path)!r} is not a torch file (not a zip archive: corrupt, "
                         "truncated or another kind of file); give a file written by "
                         "`fenics-red train`")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{what} {str(path)!r} is not a fenics-red file or holds objects that "
                         f"are not safe to load: {str(error).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError,
            AttributeError, ImportError, TypeError) as error:
        message = str(error).strip().splitlines()
        raise ValueError(f"{what} {str(path)!r} is not a readable torch file (corrupt or "
                         f"truncated?): {message[0] if message else type(error).__name__}"
                         ) from None


class SliceWiseDenoiser:
    """A 2-D denoiser applied to a volume ``(nz+1, ny+1, nx+1)`` slice by slice.

    Each axial-lateral plane ``volume[:, j, :]`` (depth × x, the plane of the 2-D training images)
    is denoised, all ``ny+1`` of them as one batch (times two for the left-right flip average).
    Same interface as a 3-D :class:`Denoiser`: ``denoiser(volume)``, :meth:`residual`,
    :attr:`dims` (3), :attr:`card` and :attr:`config` (those of the 2-D model).

    ``scale``: ``"volume"`` (default) divides every slice by ONE scale, the median of ``|E|`` over
    the whole volume, and multiplies back by it; ``"slice"`` uses each slice's own median, which
    is exactly the 2-D denoiser applied to each slice. Both are exactly scale-equivariant
    (``C(aE) = aC(E)``: every median is positively homogeneous). One scale is the better choice:
    the median over a volume is its background modulus whenever the inclusions fill less than
    half of it, while a slice through the middle of a large inclusion may be more than half
    inclusion, and would then be normalised as if the inclusion were the background (the contrast
    the network sees would change from slice to slice).

    Symmetries: equivariant under ``x → −x`` exactly when the 2-D model averages over its flip
    (:attr:`flip_average`), and under ``y → −y`` by construction (the flip only reverses the
    order of the slices, and the volume's median does not change), to the round-off of how the
    network's kernels treat the positions in a batch. The slices are denoised independently, so
    nothing couples neighbouring planes: a 3-D model (``UNetConfig(dims=3)``) can use the
    elevational structure, this one cannot.
    """

    dims = 3

    def __init__(self, denoiser: Denoiser, scale: str = "volume"):
        if not isinstance(denoiser, Denoiser) or denoiser.dims != 2:
            raise ValueError(f"slice-wise denoising needs a 2-D Denoiser, got {denoiser!r}")
        if scale not in ("volume", "slice"):
            raise ValueError(f"scale must be 'volume' or 'slice', got {scale!r}")
        self.denoiser = denoiser
        self.scale = scale

    @property
    def card(self) -> dict:
        return self.denoiser.card

    @property
    def config(self) -> UNetConfig:
        return self.denoiser.config

    @property
    def flip_average(self) -> bool:
        return self.denoiser.flip_average

    def __repr__(self) -> str:
        return f"SliceWiseDenoiser({self.denoiser!r}, scale={self.scale!r})"

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        x = _check_image(volume, 3)
        return x - self._residual(x)

    def residual(self, volume: np.ndarray) -> np.ndarray:
        """``volume − C(volume)``, the RED gradient, computed directly."""
        return self._residual(_check_image(volume, 3))

    def _residual(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            volume = torch.from_numpy(x).to(self.denoiser.device)
            slices = volume.permute(1, 0, 2).contiguous()[:, None]  # (ny+1, 1, nz+1, nx+1)
            scale = (image_scale(volume[None, None]).reshape(1, 1, 1, 1)
                     if self.scale == "volume" else None)
            residual = self.denoiser._batch_residual(slices, scale)[:, 0].permute(1, 0, 2)
            residual = residual.contiguous().cpu().numpy()
        return _check_finite(residual)


def _check_finite(residual: np.ndarray) -> np.ndarray:
    if not np.isfinite(residual).all():
        raise ValueError(f"the denoiser gave {int((~np.isfinite(residual)).sum())} "
                         "non-finite value(s) (NaN or inf) on a finite image: the model is "
                         "broken (a diverged training run?); retrain it")
    return residual


def _check_image(image, dims: int = 2) -> np.ndarray:
    x = np.asarray(image)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"the denoiser takes real images, got dtype {x.dtype}")
    if x.ndim != dims or x.size == 0:
        if dims == 2:
            hint = ("; denoise a volume with a 3-D model or slice by slice "
                    "(Denoiser.slicewise)" if x.ndim == 3 else "")
            raise ValueError(f"a 2-D denoiser takes one non-empty 2-D image of shape "
                             f"(ny+1, nx+1), got shape {x.shape}{hint}")
        hint = "; denoise a 2-D image with a 2-D model" if x.ndim == 2 else ""
        raise ValueError(f"a 3-D denoiser takes non-empty volumes of shape (nz+1, ny+1, nx+1), "
                         f"got shape {x.shape}{hint}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"the image has {int((~np.isfinite(x)).sum())} non-finite value(s)")
    return x


def count_parameters(config: UNetConfig) -> int:
    """Number of trainable parameters of the UNet of ``config`` (2-D or 3-D).

    The 2-D default (16, 3) has 481,745; the shipped (32, 3) 1,925,025;
    :data:`DEFAULT_3D_CONFIG` (8, 2, dims 3) 85,017.
    """
    return sum(p.numel() for p in UNet(config).parameters())


def save_identity(path: str | os.PathLike, comm) -> Path:
    """A small untrained denoiser (the identity map) in the file ``path``, written by rank 0 of
    ``comm`` unless it exists, then a barrier: what small runs (tests, demos at a tiny size) use
    in place of a trained model. Collective."""
    path = Path(path)
    if comm.rank == 0 and not path.exists():
        Denoiser.untrained(UNetConfig(channels=4, depth=1)).save(path)
    comm.Barrier()
    return path

