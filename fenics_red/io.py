"""File helpers shared by every command: safe output writing, input checks, plain values.

Outputs are written to a temporary file beside the target and moved into place only when
complete, so an interrupted or failed run never leaves a half-written file over a good one
(:func:`atomic_output`; the one exception is the resumable HDF5 file of :mod:`fenics_red.jobs`,
which keeps its ``.partial`` name between runs on purpose). Values read from or written to files
(HDF5 attributes, JSON records) go through :func:`plain` and :func:`to_json`.

All or nothing: a finished output is flushed to the disk (:func:`sync_file`) before it is renamed
into place, and the rename is checked (without ``overwrite`` it never replaces a file that
appeared meanwhile). One run at a time: a run holds :class:`OutputLock` on ``OUT.lock`` while it
writes ``OUT`` (``atomic_output`` and the resumable files do), and a second run is refused with a
message naming the holder, instead of the two writing into one file. The lock is an ``flock``:
the system drops it when its holder dies, however it dies.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["atomic_output", "check_input_file", "check_output_path", "plain", "to_json",
           "OutputLock", "lock_path", "sync_file", "sync_folder", "replace_checked",
           "content_digest", "hdf5_digest", "progress_bar", "write_error", "write_failure"]


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
    """Check that ``path`` can be written: a file name in a folder that exists and can be written,
    new (or ``overwrite``), not a folder."""
    if not str(path).strip():
        raise ValueError("the output file name is empty; give a file name (--out FILE)")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {str(path)!r} is a folder; give a file name in it")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"output {str(path)!r} already exists; remove it or pass --overwrite to replace it")
    if not path.parent.exists():
        raise FileNotFoundError(f"the folder of output {str(path)!r} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"the folder of output {str(path)!r} cannot be written to; choose "
                              "another folder")
    return path


def lock_path(path: str | os.PathLike) -> Path:
    """``OUT.lock``: the lock file of a run writing ``OUT`` (see :class:`OutputLock`)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


class OutputLock:
    """An exclusive lock on writing ``path``: ``flock`` of ``OUT.lock``, removed on release.

    Raises ``FileExistsError`` naming the holder (process id, host, start time) when another run
    holds it. The lock is re-entrant within a process (a run that holds the lock of its model
    may write the model through :func:`atomic_output`). Use as a context manager or call
    :meth:`release`; the system releases it when the process ends, even on ``SIGKILL``.
    """

    _held: dict[str, list] = {}  # resolved lock path -> [fd, count] held by this process

    def __init__(self, path: str | os.PathLike):
        self.target = Path(path)
        self.path = lock_path(self.target)
        self.key = str(self.path.resolve())
        held = OutputLock._held.get(self.key)
        if held is not None:
            held[1] += 1
            self._released = False
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 400).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise FileExistsError(
                    f"output {str(self.target)!r} is being written by another run ({holder}); "
                    f"wait for it to finish or stop it (its lock is {str(self.path)!r})") from None
            except BaseException:
                os.close(fd)
                raise
            # the previous holder may have removed the lock file between our open and flock
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        OutputLock._held[self.key] = [fd, 1]
        self._released = False

    def release(self) -> None:
        """Release the lock (once; the last release of a re-entrant lock removes the file)."""
        if self._released:
            return
        self._released = True
        held = OutputLock._held[self.key]
        held[1] -= 1
        if held[1] == 0:
            del OutputLock._held[self.key]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still holding it: a waiting run retries (above)
            os.close(held[0])

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def sync_file(path: str | os.PathLike) -> None:
    """Flush a written file to the disk (``fsync``): a full disk is an error here, not later."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(path: str | os.PathLike) -> None:
    """``fsync`` a folder, so that a rename in it survives a crash (ignored where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_checked(source: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``source`` to ``target``; without ``overwrite`` never replace a file
    that another process created meanwhile (``FileExistsError``)."""
    if overwrite:
        os.replace(source, target)
    else:
        try:
            os.link(source, target)  # atomic: fails if target exists
        except FileExistsError:
            raise FileExistsError(f"output {str(target)!r} appeared while this run was writing "
                                  "it (another run?); it was left as it is") from None
        except OSError:  # a file system without hard links: check, then rename
            if target.exists():
                raise FileExistsError(f"output {str(target)!r} appeared while this run was "
                                      "writing it (another run?); it was left as it is") from None
            os.replace(source, target)
        else:
            os.unlink(source)
    sync_folder(target.parent)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks (the fingerprint of a source file or model)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hdf5_digest(path: str | os.PathLike) -> str:
    """:func:`content_digest` of every dataset of an HDF5 file (by path inside the file): the
    fingerprint of its values, unchanged by attributes or the file's byte layout."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item)
                     if isinstance(item, h5py.Dataset) else None)
        return content_digest(arrays)


def content_digest(arrays) -> str:
    """SHA-256 of named arrays' shapes, dtypes and values (``{name: array-like}``, in key order;
    h5py datasets are read in blocks): the fingerprint of an input a resumed run must match."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        shape = tuple(getattr(array, "shape", np.shape(array)))
        dtype = np.dtype(getattr(array, "dtype", np.asarray(array).dtype))
        digest.update(f"{name}{shape}{dtype.str}".encode())
        if len(shape) == 0:
            digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
            continue
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        rows = max(1, 2**24 // max(1, row_bytes))
        for start in range(0, shape[0], rows):
            digest.update(np.ascontiguousarray(np.asarray(array[start:start + rows])).tobytes())
    return digest.hexdigest()


def write_error(error: BaseException) -> str:
    """The reason of a failed write in a few words: the system's message inside HDF5's report
    (``"No space left on device"``), else the error's text on one line."""
    import re

    text = str(error)
    found = re.search(r"error message = '([^']*)'", text)
    return found.group(1) if found else " ".join(text.split())


#: What a full disk (or a file size limit) says through the libraries that write the outputs:
#: the system (``ENOSPC``, ``EFBIG``, ``EDQUOT``), HDF5 (its report quotes the system) and
#: torch's zip writer (``file write failed``, ``unexpected pos``: no system message).
_FULL = ("no space left", "file too large", "quota exceeded", "file write failed",
         "unexpected pos")


def write_failure(path: str | os.PathLike, error: BaseException) -> BaseException:
    """``error``, raised while writing ``path``, as one line naming the file and what to do (a
    full disk is named as such; torch and HDF5 do not say which file they were writing).
    ``error`` itself when it already says so, or is about the path itself (exists, missing,
    not permitted)."""
    if getattr(error, "fenics_red_write_failure", False) or isinstance(
            error, FileExistsError | FileNotFoundError | PermissionError):
        return error
    reason = write_error(error)
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(
        word in reason.lower() for word in _FULL)
    advice = ("; the disk is full (or a file size limit was reached): free space and run the "
              "same command again (train: with --resume)" if full else "")
    failure = OSError(f"could not write {str(path)!r} ({reason}){advice}")
    failure.fenics_red_write_failure = True
    return failure


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it to ``path``, else delete it.

    Holds :class:`OutputLock` of ``path`` meanwhile; the finished file is flushed to the disk
    before the (checked: :func:`replace_checked`) rename, so a full disk fails the write, not a
    later reader. Serial: under MPI let one rank write (or give each rank its own file).
    """
    path = check_output_path(path, overwrite)
    with OutputLock(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            # mkstemp creates the file readable by its owner only; give the output the
            # permissions of any new file (the umask's), so results can be shared with a group
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            sync_file(tmp)
            replace_checked(tmp, path, overwrite)
        except (OSError, RuntimeError) as error:  # a writer's error, said with the file's name
            raise write_failure(path, error) from error
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


#: Seconds between two progress lines when stderr is not a terminal (a batch job's log).
PROGRESS_INTERVAL = 60.0


class _LogProgress:
    """A progress report for a log: plain lines, no carriage-return redraws (the API of tqdm that
    the package uses: ``n``, ``update``, ``set_postfix``, ``close``). One line when it starts,
    then at most one per :data:`PROGRESS_INTERVAL` seconds, and the last one when it closes."""

    def __init__(self, total: int, initial: int, desc: str, unit: str, stream):
        self.total, self.n, self.initial, self.desc, self.unit = total, initial, initial, desc, unit
        self.stream, self.postfix, self.start = stream, None, time.monotonic()
        self._shown_n, self._shown_at = None, -math.inf
        self._show()

    def _show(self) -> None:
        from tqdm import tqdm

        self._shown_n, self._shown_at = self.n, time.monotonic()
        line = tqdm.format_meter(
            self.n, self.total, self._shown_at - self.start, prefix=self.desc, unit=self.unit,
            initial=self.initial, postfix=self.postfix,
            bar_format="{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f} %), {elapsed} "
                       "elapsed, {remaining} left{postfix}")
        self.stream.write(line + "\n")
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._shown_at >= PROGRESS_INTERVAL:
            self._show()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if self._shown_n != self.n:
            self._show()


def progress_bar(total: int, *, desc: str, unit: str, initial: int = 0, disable: bool = False):
    """The progress bar of every command, on stderr: tqdm's, redrawn in place, on a terminal (or
    in a notebook); in a log (stderr a file or a pipe, e.g. a Slurm job's) plain lines, one per
    :data:`PROGRESS_INTERVAL` seconds at most, instead of a redraw per update. ``disable``: none
    (an object that does nothing)."""
    import sys

    stream = sys.stderr
    terminal = getattr(stream, "isatty", lambda: False)() or "ipykernel" in sys.modules
    if disable or terminal:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True,
                    disable=disable)
    return _LogProgress(total, initial, desc, unit, stream)
