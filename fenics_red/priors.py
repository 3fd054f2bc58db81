"""The learned prior of RED (paper, equations 10-12) and rules for its weight ``λ``.

:class:`RedPrior` is the regulariser of the fixed-point loop
(:class:`fenics_red.solvers.FixedPointSolver`, the :class:`~fenics_red.solvers.Prior` protocol)::

    ∇R(E) = E − C_w(E)                      (equation 10)
    R(E)  = ½ Eᵀ (E − C_w(E))               (equation 11)

The solver's ``E`` is a PETSc vector of nodal moduli distributed over the ranks; the denoiser sees
an image. Each evaluation gathers ``E`` to the full image on every rank
(:meth:`StatisticalLikelihood.to_image <fenics_red.likelihood.StatisticalLikelihood.to_image>`,
an exact ``Allreduce``), runs the denoiser ONCE, on rank 0, broadcasts the residual image, and
every rank fills its owned nodal values from it (``from_image``: no scatter). Why rank 0 and a
broadcast rather than the same call on every rank: the result is then identical on every rank by
construction (a torch call on several processes need not agree to the last bit when thread
counts or kernels differ, and ranks that disagree on shared nodes make the iteration rank
dependent); an error in the network call is raised on every rank (:func:`fenics_red.parallel.
on_root`); and on a machine with few cores the other ranks do not compete with rank 0 for them.
Every torch call goes through :meth:`RedPrior._on_root`, which also gives rank 0 the waiting
ranks' cores for it. The cost is one broadcast of an image (34 kB at 64²), negligible next to the
denoiser.

``R(E)`` is computed as ``½ Σ_pixels E (E − C(E))`` on the gathered image, the same on every rank
and for any number of ranks. The RED identities (10)-(11) hold exactly only for a denoiser that is
locally homogeneous (``C(aE) = aC(E)``: :class:`fenics_red.denoiser.DenoiserNet` is, by
construction) with a symmetric Jacobian (a UNet is not, exactly); the value is therefore reported
(history, FISTA's monotone test), and the step size uses :attr:`RedPrior.lipschitz`, a bound on
the Lipschitz constant of ``E ↦ E − C(E)`` (1 for a denoiser whose Jacobian has eigenvalues in
``[0, 1]``, RED's "strong passivity"; at most 2 when ``‖∇C‖ ≤ 1``).

λ rules (callables ``rule(state) -> λ``, evaluated by the solver at every refresh of ``Γ`` with
the :class:`~fenics_red.solvers.IterationState` of the current iterate, whose ``grad_norm`` is
``‖∇g(E)‖``):

* :class:`FixedLambda`: a number.
* :class:`GradientNormLambda`: the paper's rule (12), ``λ = c ‖∇g(E)‖`` with ``c ≥ 1``. The paper
  derives it from the stationarity of (6)-(7), ``∇g(E) + λ(E − C(E)) = 0``, with the passivity of
  the denoiser: the bound ``λ ≥ ‖∇g(E)‖`` is the balance below for ``‖E − C(E)‖ ≤ 1``. Note that it
  is not scale-free: ``∇g`` scales like ``1/E`` (``g`` is scale-free in ``E`` up to ``Γ``), so λ
  depends on the units of the modulus (the paper's are normalised).
* :class:`BalanceLambda`: ``λ = c ‖∇g(E)‖ / ‖E − C(E)‖``, the stationarity balance itself: at a
  fixed point of the RED iteration with ``c = 1`` the data and prior gradients have equal norms.
  Unlike (12) it does not depend on the units (``λ`` scales like ``1/E²``, as ``L_g`` does), and
  like (12) it follows the noise level through ``‖∇g‖``.
* :class:`LipschitzFractionLambda`: ``λ = c L_g``, a fixed fraction of the data term's Lipschitz
  constant (the step stays ``ε ≈ 1/((1 + c) L_g)``); does not follow the noise level.

:func:`parse_lambda_rule` turns a command-line string (``"0.01"``, ``"paper:1"``,
``"balance:0.5"``, ``"lipschitz:0.005"``) into a rule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from petsc4py import PETSc

import numpy as np

from . import validation
from .parallel import on_root
from .threads import root_call_threads, torch_threads

__all__ = ["RedPrior", "FixedLambda", "GradientNormLambda", "BalanceLambda",
           "LipschitzFractionLambda", "parse_lambda_rule", "LAMBDA_RULES"]


class RedPrior:
    """Regularisation by denoising: ``∇R(E) = E − C(E)`` (eq. 10), ``R(E) = ½ Eᵀ(E − C(E))``
    (eq. 11), for :class:`fenics_red.solvers.FixedPointSolver`.

    Args:
        denoiser: a :class:`fenics_red.denoiser.Denoiser` (its ``residual(image)`` gives
            ``E − C(E)`` without cancellation), or any callable ``C(image) -> image``. Needed on
            rank 0 only (other ranks may pass the same object; it is not called there).
        fidelity: the data term (:class:`~fenics_red.likelihood.StatisticalLikelihood`): its
            communicator, vector layout and image conversions are used.
        lipschitz: bound on the Lipschitz constant of ``∇R`` for the step size (default 1).

    Attributes ``calls`` and ``seconds`` count the denoiser evaluations and their time (rank 0's
    time, broadcast: the denoiser's share of a RED step). The last image and its residual are
    kept, so evaluating the same ``E`` twice (a λ rule, then the step) calls the network once.
    All methods are collective.
    """

    def __init__(self, denoiser, fidelity, lipschitz: float = 1.0):
        if not (hasattr(denoiser, "residual") or callable(denoiser)):
            raise TypeError("denoiser must be a fenics_red Denoiser or a callable image -> image")
        lipschitz = float(lipschitz)
        if not (math.isfinite(lipschitz) and lipschitz >= 0):
            raise ValueError(f"the Lipschitz bound of the RED gradient must be finite and >= 0, "
                             f"got {lipschitz!r}")
        self.denoiser = denoiser
        self.fidelity = fidelity
        #: torch's threads on rank 0 for the call, the waiting ranks' cores included
        self.root_threads = root_call_threads(fidelity.comm)
        self.comm = fidelity.comm
        self.lipschitz = lipschitz
        self.calls = 0
        self.seconds = 0.0
        self._image: np.ndarray | None = None
        self._residual: np.ndarray | None = None

    # -- the one place where the network runs ------------------------------------------------

    def _on_root(self, call):
        """``call()`` on rank 0 with torch's threads for it (the waiting ranks' cores included),
        its result broadcast to every rank; an error on rank 0 ends every rank. Collective."""
        def threaded():
            with torch_threads(self.root_threads):
                return call()

        return on_root(self.comm, threaded)

    @staticmethod
    def _checked(out: np.ndarray, image: np.ndarray) -> np.ndarray:
        if out.shape != image.shape:
            raise ValueError(f"the denoiser returned shape {out.shape} for an image of "
                             f"shape {image.shape}")
        if not np.isfinite(out).all():
            raise ValueError("the denoiser returned non-finite values: is the model file "
                             "the right one for these moduli?")
        return out

    def denoise(self, image: np.ndarray) -> np.ndarray:
        """``C(image)`` on rank 0, broadcast (one pass, not counted in ``calls``). Collective."""
        return self._on_root(lambda: self._checked(
            np.asarray(self.denoiser(image), dtype=np.float64), image))

    def _residual_on_root(self, image: np.ndarray) -> np.ndarray:
        """``image − C(image)`` on rank 0 (the torch call), broadcast to every rank."""
        def residual():
            tic = time.perf_counter()
            if hasattr(self.denoiser, "residual"):
                out = self._checked(np.asarray(self.denoiser.residual(image), np.float64), image)
            else:
                out = image - self._checked(np.asarray(self.denoiser(image), np.float64), image)
            return out, time.perf_counter() - tic

        out, seconds = self._on_root(residual)
        self.calls += 1
        self.seconds += seconds
        return out

    # -- images --------------------------------------------------------------------------------

    def residual_image(self, E: PETSc.Vec) -> tuple[np.ndarray, np.ndarray]:
        """``(image of E, image of E − C(E))``, the same on every rank. Collective."""
        image = self.fidelity.to_image(E)
        # Every rank holds the same image (exact Allreduce), so every rank takes the same branch.
        if self._image is None or not np.array_equal(image, self._image):
            self._residual = self._residual_on_root(image)
            self._image = image
        return self._image, self._residual

    def residual_norm(self, E: PETSc.Vec) -> float:
        """``‖E − C(E)‖`` over the pixels of the image (the nodes on a grid): the norm of the RED
        gradient. Collective."""
        return float(np.linalg.norm(self.residual_image(E)[1]))

    # -- the Prior protocol --------------------------------------------------------------------

    def gradient(self, E: PETSc.Vec, out: PETSc.Vec) -> float:
        """``out = E − C(E)`` (eq. 10); returns ``R(E) = ½ Eᵀ(E − C(E))`` (eq. 11).

        On a mesh the residual image comes back to the nodes by the raster's bilinear way back
        (not the transpose of the sampling), so ``R`` is reported, not differentiated."""
        image, residual = self.residual_image(E)
        self.fidelity.from_image(residual, out, name="RED gradient E - C(E)")
        return self._value(image, residual)

    def value(self, E: PETSc.Vec) -> float:
        """``R(E) = ½ Eᵀ(E − C(E))`` (eq. 11), over the pixels inside the tissue."""
        return self._value(*self.residual_image(E))

    def known_value(self, E: PETSc.Vec) -> float:
        """``R(E)`` when ``C(E)`` is known already (the last image evaluated), ``nan`` otherwise:
        a report that never costs a denoiser call. Collective."""
        image = self.fidelity.to_image(E)
        if self._image is None or not np.array_equal(image, self._image):
            return math.nan
        return self._value(self._image, self._residual)

    def _value(self, image: np.ndarray, residual: np.ndarray) -> float:
        inside = self.fidelity.model.images("Q").mask
        if inside.all():
            return 0.5 * float(np.dot(image.ravel(), residual.ravel()))
        return 0.5 * float(np.dot(image[inside], residual[inside]))

    def __repr__(self) -> str:
        return f"RedPrior({self.denoiser!r}, lipschitz={self.lipschitz})"


# -- λ rules -------------------------------------------------------------------------------------

class _Rule:
    """Base of the λ rules: records every value it returns in :attr:`values`."""

    name = ""

    def __init__(self):
        self.values: list[float] = []

    def _record(self, lam: float) -> float:
        lam = float(lam)
        self.values.append(lam)
        return lam

    def to_dict(self) -> dict:
        return {"rule": self.name, **{k: v for k, v in vars(self).items()
                                      if isinstance(v, int | float) and not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "rule")
        return f"{type(self).__name__}({args})"


class FixedLambda(_Rule):
    """``λ`` fixed."""

    name = "fixed"

    def __init__(self, value: float):
        super().__init__()
        self.value = validation.non_negative(value, "λ")

    def __call__(self, state) -> float:
        return self._record(self.value)


class GradientNormLambda(_Rule):
    """The paper's rule (12): ``λ = factor · ‖∇g(E)‖`` (``factor ≥ 1`` meets ``λ ≥ ‖∇g(E)‖``).

    ``‖∇g(E)‖`` is ``state.grad_norm``, the norm of the data term's gradient at the refresh.
    Depends on the units of the modulus (see the module docstring).
    """

    name = "paper"

    def __init__(self, factor: float = 1.0):
        super().__init__()
        self.factor = validation.non_negative(factor, "the factor of rule (12)")

    def __call__(self, state) -> float:
        return self._record(self.factor * float(state.grad_norm))


class BalanceLambda(_Rule):
    """``λ = factor · ‖∇g(E)‖ / ‖E − C(E)‖``: the stationarity balance behind rule (12).

    At a fixed point of ``E ← [E − ε(∇g + λ(E − C(E)))]₊`` (without an active bound)
    ``∇g(E) = −λ(E − C(E))``, so ``λ = ‖∇g‖/‖E − C(E)‖`` there; evaluated at each refresh with
    ``factor = 1`` it weighs the prior's pull as strongly as the data's. Scale-free (λ scales like
    ``L_g``) and follows the noise through ``‖∇g‖``. Returns 0 where the denoiser leaves ``E``
    unchanged (the prior has no effect there), and at most ``max_value`` when given.
    """

    name = "balance"

    def __init__(self, prior: RedPrior, factor: float = 1.0, max_value: float = math.inf):
        super().__init__()
        self._prior = prior
        self.factor = validation.non_negative(factor, "the factor of the balance rule")
        self.max_value = float(max_value)

    def __call__(self, state) -> float:
        residual = self._prior.residual_norm(state.E)
        if residual == 0.0:
            return self._record(0.0)
        return self._record(min(self.factor * float(state.grad_norm) / residual, self.max_value))


class LipschitzFractionLambda(_Rule):
    """``λ = fraction · L_g``, ``L_g`` the Lipschitz constant of ``∇g`` (largest eigenvalue of
    ``Dᵀ Γ⁻¹ D`` at the refresh).

    Uses ``state.lipschitz`` when the solver provides it; otherwise estimates ``L_g`` with a few
    warm-started power iterations on ``fidelity`` (collective; ``Γ`` is already frozen at the
    refresh, so this adds ``iterations`` Hessian products per refresh).
    """

    name = "lipschitz"

    def __init__(self, fraction: float, fidelity=None, iterations: int = 30):
        super().__init__()
        self.fraction = validation.non_negative(fraction, "the fraction of L")
        self._fidelity = fidelity
        self._iterations = int(iterations)
        self._vector = None
        self.lipschitz = math.nan

    def __call__(self, state) -> float:
        L = getattr(state, "lipschitz", None)
        if L is None or not math.isfinite(L):
            if self._fidelity is None:
                raise ValueError("LipschitzFractionLambda needs the fidelity to estimate L_g "
                                 "(the solver's state does not carry it)")
            iterations = self._iterations if self._vector is None else 5
            L, self._vector = self._fidelity.lipschitz(iterations, v=self._vector)
        self.lipschitz = float(L)
        return self._record(self.fraction * self.lipschitz)

    def destroy(self) -> None:
        if self._vector is not None:
            self._vector.destroy()
            self._vector = None


LAMBDA_RULES = ("fixed", "paper", "balance", "lipschitz")


def parse_lambda_rule(text: str | float, prior: RedPrior | None = None, fidelity=None
                      ) -> Callable:
    """A λ rule from a command-line spelling.

    ``"0.01"`` or ``"fixed:0.01"``: fixed λ; ``"paper"`` / ``"paper:2"``: rule (12) with a
    factor; ``"balance"`` / ``"balance:0.5"``: :class:`BalanceLambda` (needs ``prior``);
    ``"lipschitz:0.005"``: a fraction of ``L_g`` (needs ``fidelity`` unless the solver passes
    ``L_g`` in its state).
    """
    if isinstance(text, int | float):
        return FixedLambda(text)
    name, colon, arg = str(text).strip().partition(":")
    name = name.strip().lower()
    if name not in LAMBDA_RULES and not colon:
        name, arg = "fixed", name
    try:
        if name not in LAMBDA_RULES:
            raise ValueError
        number = float(arg) if arg.strip() else None
    except ValueError:
        raise ValueError(f"λ rule {text!r} not understood: give a number or one of "
                         f"{', '.join(r + ':VALUE' for r in LAMBDA_RULES)}") from None
    if name == "fixed":
        if number is None:
            raise ValueError("the fixed λ rule needs a value: fixed:0.01")
        return FixedLambda(number)
    if name == "paper":
        return GradientNormLambda(1.0 if number is None else number)
    if name == "balance":
        if prior is None:
            raise ValueError("the balance λ rule needs the RED prior")
        return BalanceLambda(prior, 1.0 if number is None else number)
    if number is None:
        raise ValueError("the lipschitz λ rule needs a fraction: lipschitz:0.005")
    return LipschitzFractionLambda(number, fidelity)
