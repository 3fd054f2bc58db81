"""File helpers shared by every command: safe output writing, input checks, plain values.

Outputs are written to a temporary file beside the target and moved into place only when
complete, so an interrupted or failed run never leaves a half-written file over a good one
(:func:`atomic_output`; the one exception is the resumable HDF5 file of :mod:`fenics_red.jobs`,
which keeps its ``.partial`` name between runs on purpose). Values read from or written to files
(HDF5 attributes, JSON records) go through :func:`plain` and :func:`to_json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["atomic_output", "check_input_file", "check_output_path", "plain", "to_json"]


def plain(value, *, for_json: bool = False):
    """A value from numpy, h5py or a settings object as plain Python, recursively.

    Numpy scalars become Python numbers, bytes (HDF5 strings) ``str``, arrays, tuples and lists
    ``list``, mappings ``dict`` with ``str`` keys and paths ``str``; anything else is returned as
    it is. ``for_json``: also make the value valid JSON: non-finite floats (NaN, ±inf) become
    ``None`` and objects JSON cannot hold become their ``str``.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(k): plain(v, for_json=for_json)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, for_json=for_json) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not for_json or value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def to_json(value, *, indent: int | None = None, sort_keys: bool = True) -> str:
    """``value`` as strict JSON text (:func:`plain` with ``for_json``; keys sorted by default)."""
    return json.dumps(plain(value, for_json=True), indent=indent, sort_keys=sort_keys)


def check_input_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """Return ``path`` as a Path, or raise ``FileNotFoundError`` saying which file is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a file")
    return path


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that ``path`` can be written: its folder exists and it is new (or ``overwrite``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"output {str(path)!r} already exists; remove it or pass --overwrite to replace it")
    if not path.parent.exists():
        raise FileNotFoundError(f"the folder of output {str(path)!r} does not exist")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it to ``path``, else delete it.

    Serial: under MPI let one rank write (or give each rank its own file).
    """
    path = check_output_path(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates the file readable by its owner only; give the output the permissions
        # of any new file (the umask's), so results can be shared with a group or a container
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
