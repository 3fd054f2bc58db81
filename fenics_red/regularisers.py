"""Hand-crafted regularisers ``R(E)`` of the Gauss-Newton baseline, on a nodal modulus (any mesh).

Each regulariser is a UFL functional of the modulus function ``E`` (scalar P1, 2-D or 3-D),
compiled once, with

* :meth:`Regulariser.value`: ``R(E)``;
* :meth:`Regulariser.gradient`: ``∂R/∂E_i`` for the nodal values ``E_i`` (a PETSc vector);
* :meth:`Regulariser.hessian`: a symmetric positive semi-definite matrix ``R''`` (the Hessian of
  ``R``, or an SPD majorant of it), assembled in place.

``E`` is used in place: after changing its values call :meth:`Regulariser.changed`, so that a
Hessian that depends on ``E`` is reassembled when next asked for.

* :class:`Tikhonov`: ``R(E) = ½ ∫ |∇E|² dx`` (penalises roughness; blurs edges). ``R'' = ∫ ∇p·∇q``
  is constant: assembled once.
* :class:`TotalVariation`: smoothed total variation ``R(E) = ∫ sqrt(|∇E|² + δ²) dx`` (keeps
  edges). ``R''`` is the lagged-diffusivity operator ``∫ ∇p·∇q / sqrt(|∇E|² + δ²)``, the SPD
  majorant of the TV Hessian. ``δ`` is set by :meth:`TotalVariation.set_smoothing`.
"""

from __future__ import annotations

from mpi4py import MPI
from petsc4py import PETSc

import ufl
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc

__all__ = ["Regulariser", "Tikhonov", "TotalVariation", "REGULARISERS", "create_regulariser"]


class Regulariser:
    """Base: ``R(E)``, its gradient and Hessian (or majorant) from :meth:`forms`. Collective.

    Args:
        E: the modulus function (scalar P1, with ghosts), used in place.
    """

    name = ""
    #: whether :meth:`hessian` depends on ``E`` (reassembled after :meth:`changed`).
    hessian_depends_on_E = True

    def __init__(self, E: fem.Function):
        self.E = E
        self.comm = E.function_space.mesh.comm
        Q = E.function_space
        q, p = ufl.TestFunction(Q), ufl.TrialFunction(Q)
        R, hessian = self.forms(E, p, q)
        self._value = fem.form(R)
        self._gradient = fem.form(ufl.derivative(R, E, q))
        self._hessian_form = fem.form(hessian)
        self._hessian = fem_petsc.create_matrix(self._hessian_form)
        self._gradient_vec = fem_petsc.create_vector(self._gradient)
        self._hessian_current = False

    def forms(self, E: fem.Function, p, q) -> tuple:
        """``(R, hessian)``: the UFL functional of ``E`` and the bilinear form of ``R''`` in the
        trial function ``p`` and test function ``q``."""
        raise NotImplementedError

    def changed(self) -> None:
        """Declare that :attr:`E` changed (a Hessian that depends on it is reassembled)."""
        if self.hessian_depends_on_E:
            self._hessian_current = False

    def value(self) -> float:
        """``R(E)`` (collective)."""
        return self.comm.allreduce(float(fem.assemble_scalar(self._value)), op=MPI.SUM)

    def gradient(self) -> PETSc.Vec:
        """``∂R/∂E`` at the current ``E``: an internal (ghosted) vector, reassembled on each call;
        its owned values have the layout of the modulus space's owned dofs."""
        with self._gradient_vec.localForm() as local:
            local.set(0.0)
        fem_petsc.assemble_vector(self._gradient_vec, self._gradient)
        self._gradient_vec.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        return self._gradient_vec

    def hessian(self) -> PETSc.Mat:
        """``R''`` at the current ``E`` (assembled in place when out of date)."""
        if not self._hessian_current:
            self._hessian.zeroEntries()
            fem_petsc.assemble_matrix(self._hessian, self._hessian_form)
            self._hessian.assemble()
            self._hessian_current = True
        return self._hessian

    def destroy(self) -> None:
        """Free the PETSc objects (collective)."""
        self._hessian.destroy()
        self._gradient_vec.destroy()


class Tikhonov(Regulariser):
    """``R(E) = ½ ∫ |∇E|² dx``; constant Hessian ``∫ ∇p·∇q dx``."""

    name = "tikhonov"
    hessian_depends_on_E = False

    def forms(self, E, p, q):
        R = 0.5 * ufl.inner(ufl.grad(E), ufl.grad(E)) * ufl.dx
        return R, ufl.inner(ufl.grad(p), ufl.grad(q)) * ufl.dx


class TotalVariation(Regulariser):
    """``R(E) = ∫ sqrt(|∇E|² + δ²) dx``; lagged-diffusivity Hessian majorant.

    Args:
        E: the modulus function.
        delta: the smoothing ``δ`` (absolute, in modulus units per length); changed later with
            :meth:`set_smoothing`.
    """

    name = "tv"

    def __init__(self, E: fem.Function, delta: float = 0.0):
        self._delta2 = fem.Constant(E.function_space.mesh, PETSc.ScalarType(0.0))
        super().__init__(E)
        self.set_smoothing(delta)

    def forms(self, E, p, q):
        s = ufl.sqrt(ufl.inner(ufl.grad(E), ufl.grad(E)) + self._delta2)
        return s * ufl.dx, ufl.inner(ufl.grad(p), ufl.grad(q)) / s * ufl.dx

    @property
    def delta(self) -> float:
        return self._delta

    def set_smoothing(self, delta: float) -> None:
        """Set the smoothing ``δ``."""
        self._delta = float(delta)
        self._delta2.value = self._delta**2
        self._hessian_current = False


#: Regulariser classes by name.
REGULARISERS = {cls.name: cls for cls in (Tikhonov, TotalVariation)}


def create_regulariser(name: str, E: fem.Function) -> Regulariser:
    """The regulariser ``name`` (``"tikhonov"`` or ``"tv"``) on the modulus function ``E``."""
    if name not in REGULARISERS:
        raise ValueError(f"regulariser must be one of {tuple(REGULARISERS)}, got {name!r}")
    return REGULARISERS[name](E)
