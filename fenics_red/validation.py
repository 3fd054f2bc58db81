"""One set of input validators for settings, file attributes and arrays.

Every validator returns the checked value in a canonical type (``float``, ``int``, a tuple, a
float64 array) and raises ``ValueError`` with a message of the form ``"{name} must be {what}, got
{_shown(value)}"``: ``name`` says where the value comes from (``"SimulationSettings.snr_db"``,
``"attribute nx"``, ``"the lateral-to-axial noise ratio"``) and ``what`` what was expected
(derived from the bounds, or given by the caller for a domain-specific wording such as ``"a
finite number of dB"``).

:func:`check_finite` is collective: it raises on every rank of a communicator when any rank holds a
non-finite value, so that no rank is left waiting in a later collective call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["number", "finite", "positive", "non_negative", "integer", "seed", "interval",
           "per_component", "plane_in", "one_of", "mapping", "check_finite", "check_memory",
           "memory_limit"]


def _shown(value) -> str:
    """``value`` as the user wrote it: ``0.0``, not ``np.float64(0.0)`` (numpy scalars and arrays
    as plain Python values)."""
    if isinstance(value, np.generic | np.ndarray):
        value = value.tolist()
    return repr(value)


def _describe(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return (f"a finite number in {'(' if low_open else '['}{low}, {high}"
                f"{')' if high_open else ']'}")
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high}"
    return "a finite number"


def number(value, name: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, what: str | None = None) -> float:
    """A finite real number within optional bounds (closed unless ``low_open``/``high_open``).

    ``what`` replaces the description of the bounds in the message (``"a finite number >= 1"``,
    ``"a finite number in (0, 1]"``).
    """
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {_shown(value)}") from None
    ok = math.isfinite(result)
    if ok and low is not None:
        ok = result > low if low_open else result >= low
    if ok and high is not None:
        ok = result < high if high_open else result <= high
    if not ok:
        what = what or _describe(low, high, low_open, high_open)
        raise ValueError(f"{name} must be {what}, got {_shown(value)}")
    return result


def finite(value, name: str, what: str = "a finite number") -> float:
    """A finite real number."""
    return number(value, name, what=what)


def positive(value, name: str, what: str = "finite and > 0") -> float:
    """A finite, strictly positive number."""
    return number(value, name, 0.0, low_open=True, what=what)


def non_negative(value, name: str, what: str = "finite and >= 0") -> float:
    """A finite number ``>= 0``."""
    return number(value, name, 0.0, what=what)


#: The largest seed: a signed 64-bit integer (HDF5 attributes, torch.manual_seed).
SEED_MAX = 2**63 - 1


def seed(value, name: str) -> int:
    """A random seed: an integer in ``[0, 2^63 - 1]``."""
    return integer(value, name, 0, SEED_MAX, what="an integer in [0, 2^63 - 1]")


#: The largest budget of iterations any method takes: more never ends, and overflows the int64
#: of a stored history.
MAX_BUDGET = 10**9


def budget(value, name: str) -> int:
    """A budget of iterations: a positive integer up to :data:`MAX_BUDGET`."""
    return integer(value, name, low=1, high=MAX_BUDGET,
                   what="a positive integer (at most 1e9 steps)")


def integer(value, name: str, low: int | None = None, high: int | None = None,
            what: str | None = None) -> int:
    """A Python or NumPy integer (not a bool, not a float) within optional closed bounds.

    The default wording is ``"an integer"``, ``"a positive integer"`` (``low=1``), ``"a
    non-negative integer"`` (``low=0``) or ``"an integer in [low, high]"``.
    """
    ok = not isinstance(value, bool) and isinstance(value, int | np.integer)
    if ok and low is not None:
        ok = value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        if what is None:
            if high is not None:
                what = f"an integer in [{'-inf' if low is None else low}, {high}]"
            elif low == 1:
                what = "a positive integer"
            elif low == 0:
                what = "a non-negative integer"
            elif low is not None:
                what = f"an integer >= {low}"
            else:
                what = "an integer"
        raise ValueError(f"{name} must be {what}, got {_shown(value)}")
    return int(value)


def interval(value, name: str, low: float = 0.0, integer: bool = False) -> tuple:
    """A pair ``(lo, hi)`` of finite numbers with ``low <= lo <= hi`` (integers if ``integer``)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {_shown(value)}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and low <= lo <= hi):
        raise ValueError(f"{name} must satisfy {low} <= low <= high (finite), got {_shown(value)}")
    if integer:
        if lo != int(lo) or hi != int(hi):
            raise ValueError(f"{name} must be a pair of integers, got {_shown(value)}")
        return (int(lo), int(hi))
    return (lo, hi)


def per_component(values, name: str, lengths: Sequence[int] = (2, 3), *,
                  shape_hint: str = "one value per displacement component (2 or 3)",
                  allow_zero: bool = False, what: str | None = None) -> tuple[float, ...]:
    """A tuple of finite numbers ``> 0`` (``>= 0`` with ``allow_zero``), of one of ``lengths``.

    ``values``: a number or a sequence (flattened; a string counts as no value). A wrong number
    of values is reported as ``"{name} must be {shape_hint}"``, an element out of range as
    ``"{name}[i] must be {what}"``.
    """
    array = (np.asarray(values, dtype=object).ravel() if not isinstance(values, str | bytes)
             else np.array([]))
    check = non_negative if allow_zero else positive
    kwargs = {} if what is None else {"what": what}
    # each value first: a sigma of 0 is told it must be > 0, not that it needs more values
    checked = tuple(check(v, f"{name}[{i}]", **kwargs) for i, v in enumerate(array))
    if array.size not in tuple(lengths):
        raise ValueError(f"{name} must be {shape_hint}, got {_shown(values)}")
    return checked


def plane_in(plane: str, dim: int) -> str:
    """``plane`` (``"stress"`` or ``"strain"``) of a ``dim``-D problem: plane strain
    (``--plane-strain``) is refused in 3-D, where it does not apply."""
    if plane == "strain" and dim == 3:
        raise ValueError("--plane-strain applies to 2-D problems only; a 3-D mesh or grid is "
                         "solved in 3-D: leave it out")
    return plane


def one_of(value, name: str, choices: Sequence):
    """``value`` if it is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {_shown(value)}")
    return value


def mapping(value, name: str) -> Mapping:
    """``value`` if it is a mapping (``dict``-like)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
    return value


def check_finite(values, name: str, comm=None) -> np.ndarray:
    """Raise on every rank of ``comm`` if any rank's ``values`` holds NaN or inf (collective).

    The message is ``"{name} has non-finite values (NaN or inf)"``; without ``comm`` the check is
    local. Returns ``values`` as an array.
    """
    array = np.asarray(values)
    bad = int(not np.isfinite(array).all())
    if comm is not None:
        from mpi4py import MPI

        bad = comm.allreduce(bad, op=MPI.MAX)
    if bad:
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return array


#: Environment variable that sets the memory a job may plan to use (``16G``, ``500M``; ``none``:
#: no limit). Default: the machine's physical memory.
MEMORY_LIMIT_VARIABLE = "FENICS_RED_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(n: float) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.3g} {unit}B"
    return f"{int(n)} B"


def memory_limit() -> float:
    """The memory a job may plan to use, in bytes (``inf``: none): :data:`MEMORY_LIMIT_VARIABLE`,
    else the machine's physical memory."""
    import os

    text = os.environ.get(MEMORY_LIMIT_VARIABLE, "").strip().upper().removesuffix("B")
    if text in ("NONE", "INF"):
        return math.inf
    if text:
        unit = text[-1] if text[-1] in _UNITS else ""
        try:
            value = float(text[:len(text) - len(unit)]) * _UNITS[unit]
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{MEMORY_LIMIT_VARIABLE} must be a size such as 16G or 'none', "
                             f"got {os.environ[MEMORY_LIMIT_VARIABLE]!r}")
        return value
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not on Linux
        return math.inf


def check_memory(estimate: float, what: str) -> float:
    """Refuse a job whose memory ``estimate`` (bytes) exceeds :func:`memory_limit`, before it
    allocates anything: ``ValueError`` giving the estimate, the limit and how to raise it."""
    limit = memory_limit()
    if estimate > limit:
        source = (f"{MEMORY_LIMIT_VARIABLE}" if MEMORY_LIMIT_VARIABLE in __import__("os").environ
                  else "the machine's memory")
        raise ValueError(f"{what} needs about {_bytes(estimate)} of memory, more than the limit "
                         f"of {_bytes(limit)} ({source}); make it smaller, or set "
                         f"{MEMORY_LIMIT_VARIABLE} (e.g. 64G, or none) to run it anyway")
    return estimate
