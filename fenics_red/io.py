"""File helpers shared by every command: safe output writing and input checks.

Outputs are written to a temporary file beside the target and moved into place only when
complete, so an interrupted or failed run never leaves a half-written file over a good one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output", "check_input_file", "check_output_path"]


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
