"""Dense copies of distributed PETSc vectors and operators, for checks against numpy (tests)."""

import numpy as np


def gather(comm, local) -> np.ndarray:
    """The global vector (PETSc order: the ranks' owned blocks in rank order) on every rank."""
    return np.concatenate(comm.allgather(np.asarray(local).copy()))


def dense_matrix(apply, template) -> np.ndarray:
    """The matrix of ``apply(x, y)`` from its products with the unit vectors of ``template``'s
    layout (PETSc order), gathered on every rank. Collective."""
    comm = template.getComm().tompi4py()
    n = template.getSize()
    start, end = template.getOwnershipRange()
    x, y = template.duplicate(), template.duplicate()
    columns = []
    for j in range(n):
        x.set(0.0)
        if start <= j < end:
            x.array[j - start] = 1.0
        apply(x, y)
        columns.append(gather(comm, y.array_r))
    x.destroy()
    y.destroy()
    return np.array(columns).T
