"""One atomic, durable file write and one array digest, shared by every module that persists.

Benchmark results (:mod:`iif_ref.bench`), resumable neural steps
(:mod:`iif_ref.neural.cache`), retraining ground truth (:mod:`iif_ref.retraining`) and the
distributed feature store (:mod:`iif_ref.distributed.store`) all write through
:func:`atomic_write` and key their caches with :func:`array_digest`.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

import numpy as np

__all__ = ["atomic_write", "array_digest"]


def atomic_write(path, data):
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one.

    Parameters
    ----------
    path : str or path-like
        Destination; missing parent directories are created.
    data : bytes-like or callable
        The content, or ``data(fh)`` writing it to a binary file object (for writers such
        as :func:`numpy.savez` that stream).

    Returns
    -------
    pathlib.Path

    Notes
    -----
    The content goes to a temporary file ``.<name>.<random>.tmp`` in the destination
    directory, is flushed and ``fsync``-ed, and is renamed over ``path`` with
    :func:`os.replace` (atomic on one POSIX file system); the directory is then
    ``fsync``-ed so that the rename itself survives a power loss. On any error the
    temporary file is removed and the error propagates; ``path`` is untouched. The file
    gets the permissions of a new file made by :func:`open` (``0o666`` less the umask).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "sub" / "x.txt"
    >>> atomic_write(target, b"complete").read_bytes()
    b'complete'
    >>> sorted(p.name for p in target.parent.iterdir())  # no temporary file left behind
    ['x.txt']
    """
    path = Path(path)
    if not (callable(data) or isinstance(data, (bytes, bytearray, memoryview))):
        raise TypeError(f"data must be bytes-like or a callable, got {type(data).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temporary(path)
    try:
        if callable(data):
            with os.fdopen(fd, "wb") as fh:
                data(fh)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            try:  # straight to the descriptor: no copy into a file object's buffer
                view = memoryview(data).cast("B")
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _open_temporary(path):
    """``(fd, tmp)``: a new, exclusively created temporary file beside ``path``.

    Created with mode ``0o666``, which the kernel reduces by the umask as for a plain
    :func:`open`; :func:`tempfile.mkstemp`'s fixed ``0o600`` would make every result
    private to its owner, unlike the figures written beside it.
    """
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
             | getattr(os, "O_CLOEXEC", 0))
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path} after 100 tries")


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms (Windows) that cannot open a directory: rename is enough
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the data is synced
        pass
    finally:
        os.close(fd)


def array_digest(*arrays, extra=None):
    """SHA-256 hex digest of arrays' shapes, dtypes and C-order bytes (and ``extra``).

    Parameters
    ----------
    *arrays : array_like
    extra : JSON-serialisable, optional
        Further context hashed after the arrays (keys sorted; other objects by ``str``).

    Returns
    -------
    str
        64 hex characters. Equal for equal values, shapes and dtypes; the memory layout of
        an input (C, Fortran, strided) does not matter.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.arange(6.0).reshape(2, 3)
    >>> array_digest(a) == array_digest(np.asfortranarray(a))
    True
    >>> array_digest(a) == array_digest(a.astype(np.float32))
    False
    """
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(json.dumps([list(a.shape), a.dtype.str]).encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()
