"""The method of manufactured solutions for the forward model, in any dimension (test helper).

A smooth modulus ``E_exact`` and displacement ``u_exact`` (UFL expressions on the mesh) define the
body force ``-div σ(E_exact, u_exact)``; with ``u_exact`` as Dirichlet data on the whole boundary
the model's ``u`` converges to ``u_exact`` at second order in L2 for P1 elements.
"""

from mpi4py import MPI

import numpy as np

import ufl
from dolfinx import fem, mesh
from fenics_red.forward import ElasticityModel, stress


def manufactured_l2_error(msh, E_exact, u_exact, settings, grid=None,
                          quadrature_degree: int = 6) -> float:
    """``‖u − u_exact‖_L2`` of the forward model on ``msh`` (the same value on every rank)."""
    tdim = msh.topology.dim
    body_force = -ufl.div(stress(E_exact, u_exact, settings.nu, settings.plane))

    def boundary(V):
        msh.topology.create_connectivity(tdim - 1, tdim)
        facets = mesh.exterior_facet_indices(msh.topology)
        g = fem.Function(V)
        g.interpolate(fem.Expression(u_exact, V.element.interpolation_points()))
        return [fem.dirichletbc(g, fem.locate_dofs_topological(V, tdim - 1, facets))]

    model = ElasticityModel(msh, settings, grid, body_force=body_force, bcs=boundary)
    model.E.interpolate(fem.Expression(E_exact, model.Q.element.interpolation_points()))
    model.modulus_changed()
    u = model.solve()
    error = fem.form(ufl.inner(u - u_exact, u - u_exact)
                     * ufl.dx(metadata={"quadrature_degree": quadrature_degree}))
    result = np.sqrt(msh.comm.allreduce(fem.assemble_scalar(error), op=MPI.SUM))
    model.destroy()
    return result
