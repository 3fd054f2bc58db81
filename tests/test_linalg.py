"""The shared PETSc-vector algorithms: power iteration and Taylor test (serial and mpirun -n 2)."""

import math

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np
import pytest

from fenics_red.linalg import convergence_rates, power_iteration, taylor_test


def _diagonal(comm, values):
    """A distributed diagonal PETSc matrix with the given (global) diagonal."""
    n = len(values)
    A = PETSc.Mat().createAIJ((n, n), nnz=1, comm=comm)
    lo, hi = A.getOwnershipRange()
    for i in range(lo, hi):
        A.setValue(i, i, values[i])
    A.assemble()
    return A


def _global(comm, vec):
    return np.concatenate(comm.allgather(vec.array_r.copy()))


def test_power_iteration_finds_the_largest_eigenvalue_of_a_known_spectrum(comm):
    spectrum = np.linspace(0.0, 5.0, 40)
    spectrum[17] = 10.0  # gap 10 -> 5: the error falls by 4 per step
    A = _diagonal(comm, spectrum)
    v = A.createVecRight()
    v.set(1.0)
    estimate = power_iteration(A.mult, v, iterations=100, rtol=0.0)  # 100 steps: no early stop
    assert estimate == pytest.approx(10.0, rel=1e-14)
    # v is the normalised eigenvector (the 18th unit vector), the same on any number of ranks
    expected = np.zeros(40)
    expected[17] = 1.0
    np.testing.assert_allclose(_global(comm, v), expected, atol=1e-10)
    # a few steps from a fresh start: a lower bound, increasing with the steps
    bounds = []
    for steps in (1, 2, 4, 8):
        v.set(1.0)
        bounds.append(power_iteration(A.mult, v, iterations=steps, rtol=0.0))
    assert all(0 < a < b < 10.0 for a, b in zip(bounds, bounds[1:], strict=False))
    # rtol stops early: the estimate converges twice as fast as the vector
    v.set(1.0)
    calls = []
    estimate = power_iteration(lambda x, y: (calls.append(1), A.mult(x, y)), v, iterations=200,
                               rtol=1e-10)
    assert estimate == pytest.approx(10.0, rel=1e-9) and len(calls) < 30
    # a warm start converges at once
    calls = []
    power_iteration(lambda x, y: (calls.append(1), A.mult(x, y)), v, iterations=50, rtol=1e-8)
    assert len(calls) == 2
    v.destroy()
    A.destroy()


def test_power_iteration_of_a_vanishing_operator_returns_zero(comm):
    A = _diagonal(comm, np.zeros(6))
    v = A.createVecRight()
    v.set(1.0)
    assert power_iteration(A.mult, v, iterations=10) == 0.0
    assert v.norm() == pytest.approx(1.0)
    v.destroy()
    A.destroy()


def _functional(comm, rng, gradient_error=0.0):
    """``J(x) = Σ exp(x_i) + ½ Σ d_i x_i²`` with its gradient and Hessian, on a PETSc vector."""
    d = rng.uniform(1.0, 2.0, 30)
    x = PETSc.Vec().createMPI(30, comm=comm)
    lo, hi = x.getOwnershipRange()
    d = d[lo:hi]

    def value(v):
        local = float(np.sum(np.exp(v.array_r) + 0.5 * d * v.array_r**2))
        return comm.allreduce(local, op=MPI.SUM)

    def gradient(v, out):
        out.array[:] = (1.0 + gradient_error) * np.exp(v.array_r) + d * v.array_r

    def hessian_mult(v, w, out):
        out.array[:] = (np.exp(v.array_r) + d) * w.array_r

    x.array[:] = rng.uniform(-1.0, 1.0, 30)[lo:hi]
    direction = x.duplicate()
    direction.array[:] = rng.normal(size=30)[lo:hi]
    return value, gradient, hessian_mult, x, direction


def test_taylor_test_confirms_right_derivatives_at_second_order(comm, rng):
    value, gradient, hessian_mult, x, direction = _functional(comm, rng)
    before = x.copy()
    result = taylor_test(value, gradient, x, direction, hessian_mult=hessian_mult)
    assert np.allclose(result["rates"], 2.0, atol=0.05), result["rates"]
    assert np.allclose(result["hessian_rates"], 2.0, atol=0.05), result["hessian_rates"]
    assert result["objective"] == pytest.approx(value(x))
    assert (x - before).norm() == 0.0  # the point is not changed
    for vec in (x, direction, before):
        vec.destroy()


def test_taylor_test_detects_a_wrong_gradient(comm, rng):
    value, gradient, _, x, direction = _functional(comm, rng, gradient_error=1e-2)
    result = taylor_test(value, gradient, x, direction, steps=[1e-2 * 0.5**k for k in range(10)])
    assert result["rates"][-1] < 1.2, result["rates"]
    x.destroy()
    direction.destroy()


def test_convergence_rates():
    assert convergence_rates([1.0, 0.5, 0.25], [4.0, 1.0, 0.25]) == [2.0, 2.0]
    assert math.isnan(convergence_rates([1.0, 0.5], [0.0, 0.0])[0])
