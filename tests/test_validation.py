"""The shared validators: canonical values back, messages that say what is wrong."""

import math

from mpi4py import MPI

import numpy as np
import pytest

from fenics_red import validation


def test_numbers_within_bounds():
    assert validation.number("2.5", "x") == 2.5
    assert validation.number(np.float32(0.5), "x", 0.0, 1.0, low_open=True) == 0.5
    assert validation.positive(3, "x") == 3.0 and validation.non_negative(0, "x") == 0.0
    cases = [
        (lambda: validation.number("abc", "the width"), "the width must be a number, got 'abc'"),
        (lambda: validation.finite(math.inf, "snr", what="a finite number of dB"),
         "snr must be a finite number of dB, got inf"),
        (lambda: validation.positive(0.0, "ratio"), "ratio must be finite and > 0, got 0.0"),
        (lambda: validation.non_negative(-1, "sigma_w"), "sigma_w must be finite and >= 0, got -1"),
        (lambda: validation.number(1.5, "f", 0.0, 1.0, low_open=True),
         r"f must be a finite number in \(0.0, 1.0\], got 1.5"),
        (lambda: validation.number(0.5, "size", 1.0), "size must be a finite number >= 1.0"),
        (lambda: validation.number(math.nan, "c", 0.0, 1.0, high_open=True),
         r"c must be a finite number in \[0.0, 1.0\), got nan"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_integers():
    assert validation.integer(np.int64(4), "n", low=1) == 4
    assert type(validation.integer(np.int64(4), "n")) is int
    cases = [
        ((True, "n"), "n must be an integer, got True"),
        ((2.0, "n"), "n must be an integer, got 2.0"),
        ((0, "n samples", 1), "n samples must be a positive integer, got 0"),
        ((-3, "seed", 0), "seed must be a non-negative integer, got -3"),
        ((1, "level", 2), "level must be an integer >= 2, got 1"),
        ((9, "depth", 1, 8), r"depth must be an integer in \[1, 8\], got 9"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            validation.integer(*args)


def test_intervals_and_components():
    assert validation.interval([0.1, 0.2], "range") == (0.1, 0.2)
    assert validation.interval((1.0, 4.0), "count", low=1, integer=True) == (1, 4)
    for value, integer, message in [((0.3,), False, r"range must be a pair \(low, high\)"),
                                    ((0.2, 0.1), False, "range must satisfy 0.0 <= low <= high"),
                                    ((1.5, 2), True, "range must be a pair of integers")]:
        with pytest.raises(ValueError, match=message):
            validation.interval(value, "range", integer=integer)
    assert validation.per_component([1, 2, 3], "sigma") == (1.0, 2.0, 3.0)
    assert validation.per_component((0.0, 1.0), "w", allow_zero=True) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"sigma must be one value per displacement component"):
        validation.per_component([1.0], "sigma")
    with pytest.raises(ValueError, match=r"sigma\[1\] must be finite and > 0, got -1.0"):
        validation.per_component([1.0, -1.0], "sigma")
    # a value out of range is named before a wrong count (import --noise-std 0 was told it
    # needed one value per component)
    with pytest.raises(ValueError, match=r"sigma\[0\] must be finite and > 0, got 0.0"):
        validation.per_component([0.0], "sigma")
    assert validation.one_of("tv", "regulariser", ("tikhonov", "tv")) == "tv"
    with pytest.raises(ValueError, match=r"regulariser must be one of \('tikhonov', 'tv'\)"):
        validation.one_of("l1", "regulariser", ("tikhonov", "tv"))
    with pytest.raises(ValueError, match="options must be a mapping, got list"):
        validation.mapping([], "options")


def test_check_finite_raises_on_every_rank(comm):
    values = np.ones(4)
    assert validation.check_finite(values, "u", comm) is not None
    if comm.rank == comm.size - 1:
        values[2] = np.nan
    with pytest.raises(ValueError, match=r"u has non-finite values \(NaN or inf\)"):
        validation.check_finite(values, "u", comm)
    comm.Barrier()
    assert validation.check_finite(np.ones(2), "u", MPI.COMM_SELF) is not None


def test_messages_show_numpy_values_as_the_user_wrote_them():
    with pytest.raises(ValueError, match=r"got 0\.0$"):
        validation.positive(np.float64(0.0), "the modulus")
    with pytest.raises(ValueError, match=r"got -3$"):
        validation.integer(np.int64(-3), "the seed", low=0)
