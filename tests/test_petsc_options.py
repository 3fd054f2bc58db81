"""The one way of giving options to PETSc objects: defaults < command line < overrides, and the
global database left as it was."""

from petsc4py import PETSc

from fenics_red.petsc_options import set_options


def test_defaults_overrides_and_a_clean_database(comm):
    db = PETSc.Options()
    ksp = PETSc.KSP().create(comm)
    set_options(ksp, "fenics_red_test_a_", {"ksp_type": "cg", "ksp_rtol": 1e-3},
                {"ksp_max_it": 7})
    assert ksp.getOptionsPrefix() == "fenics_red_test_a_"
    assert ksp.getType() == "cg"
    rtol, _, _, max_it = ksp.getTolerances()
    assert rtol == 1e-3 and max_it == 7
    assert not any(key.startswith("fenics_red_test_a_") for key in db.getAll())
    ksp.destroy()


def test_command_line_options_beat_defaults_and_lose_to_overrides(comm):
    db = PETSc.Options()
    db["fenics_red_test_b_ksp_type"] = "gmres"       # as if given on the command line
    db["fenics_red_test_b_ksp_max_it"] = 11
    try:
        ksp = PETSc.KSP().create(comm)
        set_options(ksp, "fenics_red_test_b_", {"ksp_type": "cg", "ksp_max_it": 3},
                    {"ksp_max_it": 5})
        assert ksp.getType() == "gmres"               # the default did not replace it
        assert ksp.getTolerances()[3] == 5            # the override did
        # ... and the command-line entries are back as they were
        assert db.getString("fenics_red_test_b_ksp_type") == "gmres"
        assert db.getInt("fenics_red_test_b_ksp_max_it") == 11
        ksp.destroy()
    finally:
        db.delValue("fenics_red_test_b_ksp_type")
        db.delValue("fenics_red_test_b_ksp_max_it")


def test_mumps_options_given_in_code_reach_the_factorisation(comm):
    """MUMPS reads ``mat_mumps_*`` at its first factorisation, after the database is restored:
    they are set on the factor matrix, and the database stays clean."""
    from fenics_red import ElasticityModel, ForwardSettings, ImageGrid

    model = ElasticityModel.on_grid(ImageGrid(6, 5), comm, ForwardSettings(
        solver="lu", petsc_options={"mat_mumps_icntl_14": 77, "mat_mumps_cntl_1": 0.02}))
    model.solve()
    factor = model.ksp.getPC().getFactorMatrix()
    assert factor.getMumpsIcntl(14) == 77
    assert abs(factor.getMumpsCntl(1) - 0.02) < 1e-15
    assert not any("mat_mumps" in key for key in PETSc.Options().getAll())
    model.destroy()
