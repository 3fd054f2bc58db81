"""Specification of the nodal bulk integration (``ForwardSettings.volumetric``): P1 elements that
do not lock near ``nu = 1/2`` in 3-D and plane strain, with ``D(u) E = K(E) u`` kept exact.

Every test runs serially and under ``mpirun -n 2``.
"""

import json

from mpi4py import MPI

import numpy as np
import pytest

from dolfinx import fem
from fenics_red.data import SimulationSettings
from fenics_red.forward import ElasticityModel, ForwardSettings, reference_displacement
from fenics_red.raster import ImageGrid


def _inclusion(dim):
    """A stiff ball (contrast 3, radius 0.2) in the middle of the unit square or cube."""
    return lambda x: np.where(sum((x[i] - 0.5) ** 2 for i in range(dim)) <= 0.04, 3.0, 1.0)


def _model(comm, grid, **settings):
    model = ElasticityModel.on_grid(grid, comm, ForwardSettings(**settings))
    model.E.interpolate(_inclusion(grid.dim))
    model.modulus_changed()
    return model


def _errors(model, reference):
    """Relative L2 errors of the model's axial and lateral displacement against ``reference``."""
    u = model.to_values(model.solve().x.array, "V").reshape(model.dim, -1)

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    return rel(u[-1], reference[-1]), rel(u[:-1], reference[:-1])


def test_auto_is_nodal_in_3d_and_plane_strain_and_the_plain_element_in_plane_stress(comm):
    settings = ForwardSettings()
    assert settings.resolve_volumetric(3) == "nodal"
    assert settings.resolve_volumetric(2) == "element"  # plane stress: nothing locks
    assert ForwardSettings(plane="strain").resolve_volumetric(2) == "nodal"
    assert ForwardSettings(volumetric="element").resolve_volumetric(3) == "element"
    model = _model(comm, ImageGrid(4, 4, nz=4))
    assert model.settings.volumetric == "nodal"
    model.destroy()
    with pytest.raises(ValueError, match="volumetric must be"):
        ForwardSettings(volumetric="bbar")


@pytest.mark.parametrize("grid, plane", [(ImageGrid(6, 5, 1.0, 0.8), "strain"),
                                         (ImageGrid(4, 3, nz=3), "stress")])
def test_D_times_E_equals_K_times_u_to_round_off_with_the_nodal_bulk_part(comm, grid, plane):
    """``D(u) E = K(E) u`` for the full matrices, and ``D(u)`` with Dirichlet rows zero gives
    the free rows of the full ``K(E) u``, at a displacement that is not the model's solution
    (nonzero on the supports too)."""
    model = _model(comm, grid, plane=plane, volumetric="nodal", nu=0.49)
    u = fem.Function(model.V)
    u.interpolate(lambda x: np.array([np.sin(3 * x[i] + x[0] * x[-1]) for i in range(grid.dim)]))
    K = model.assemble_K(apply_bcs=False)
    Ku = K.createVecLeft()
    K.mult(u.x.petsc_vec, Ku)
    scale = comm.allreduce(np.abs(Ku.array_r).max(), op=MPI.MAX)
    for apply_bcs, rows in ((False, slice(None)), (True, model.free_dofs)):
        D = model.assemble_D(u, apply_bcs)
        DE = D.createVecLeft()
        D.mult(model.E.x.petsc_vec, DE)
        diff = np.abs(DE.array_r - Ku.array_r)[rows].max(initial=0.0)
        assert comm.allreduce(diff, op=MPI.MAX) < 1e-12 * scale
        if apply_bcs:  # and zero on the Dirichlet rows
            assert np.all(DE.array_r[~model.free_dofs] == 0.0)
        DE.destroy()
    Ku.destroy()
    # the constrained K is symmetric with unit Dirichlet rows, as the likelihood needs
    K = model.assemble_K(True)
    assert K.isSymmetric(1e-12 * K.norm())
    model.destroy()


@pytest.mark.parametrize("grid, plane, most", [(ImageGrid(6, 6, nz=6), "stress", 0.4),
                                               (ImageGrid(24, 24), "strain", 0.25)])
def test_the_nodal_bulk_part_removes_the_locking_of_p1_against_a_p2_reference(comm, grid, plane,
                                                                               most):
    """At ``nu = 0.495`` the plain P1 displacement is far from P2's on the same mesh (3-D 6³:
    about 30 % axially, 80 % laterally); the nodal bulk part comes within a fraction of that."""
    errors = {}
    for volumetric in ("element", "nodal"):
        model = _model(comm, grid, plane=plane, volumetric=volumetric, nu=0.495)
        errors[volumetric] = _errors(model, reference_displacement(model))
        model.destroy()
    (plain_axial, plain_lateral), (nodal_axial, nodal_lateral) = (errors["element"],
                                                                  errors["nodal"])
    assert nodal_axial < most * plain_axial and nodal_lateral < most * plain_lateral, errors
    assert nodal_axial < 0.1, errors


def test_data_sets_from_before_the_nodal_bulk_part_are_read_as_plain_p1():
    settings = SimulationSettings(ImageGrid(4, 4, nz=4))
    attrs = settings.to_attrs()
    assert attrs["volumetric"] == "nodal"  # stored resolved: the model the data came from
    assert SimulationSettings.from_attrs(attrs).forward.volumetric == "nodal"
    del attrs["volumetric"]
    assert SimulationSettings.from_attrs(attrs).forward.volumetric == "element"
    assert json.loads(attrs["phantoms"])  # the rest of the attributes untouched


def test_a_model_on_one_and_on_all_ranks_gives_the_same_nodal_displacement(comm):
    """The PETSc products of the bulk part are partition-independent."""
    grid = ImageGrid(5, 4, nz=4)
    values = []
    for c in (MPI.COMM_SELF, comm):
        model = _model(c, grid, nu=0.495)
        values.append(model.to_values(model.solve().x.array, "V"))
        model.destroy()
    np.testing.assert_allclose(values[1], values[0], rtol=0,
                               atol=1e-10 * np.abs(values[0]).max())

