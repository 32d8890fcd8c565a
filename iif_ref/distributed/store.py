"""Out-of-core feature store: atomic, checksummed chunk files under a fingerprint.

The store holds the projected per-sample features ``Phi`` and ``Psi`` of every path step
(Eq. 17, 31), one pair of 2-D arrays ``(n_train, proj_dim)`` per step, cut along the
training samples into chunks of ``chunk_rows`` rows. Workers write chunks independently;
the driver never holds a whole array.

Layout (a Zarr v3 hierarchy; ``zarr.open_group(root, mode="r")`` reads it)::

    root/zarr.json                      group; attributes["iif_ref"] = store metadata
    root/step_<s>/<name>/zarr.json      array (n_train, proj_dim), chunks (chunk_rows, proj_dim),
                                        codecs [bytes(little), crc32c]
    root/step_<s>/<name>/c/<i>/0        chunk i: rows [i*chunk_rows, (i+1)*chunk_rows)

``<s>`` is the index of the step in ``metadata["steps"]`` and ``<name>`` is ``Phi`` or
``Psi``. Each chunk file is the chunk in C order, little endian, zero-padded to full
``chunk_rows`` rows at the end of the array (as Zarr stores edge chunks), followed by
the 4-byte little-endian CRC32C of those bytes (the Zarr v3 ``crc32c`` codec).

Guarantees
----------
* **Atomic writes.** A chunk is written to a temporary file in its final directory,
  flushed and ``fsync``-ed, then renamed over its key (``os.replace``); a reader sees
  the old file, the new file or no file, never a partial one. A killed writer leaves at
  most a ``.*.tmp`` file, which readers ignore; :meth:`FeatureStore.remove_stale_tmp`
  deletes those older than an hour.
* **Checksums.** Every read checks the length and the CRC32C; a mismatch raises
  :class:`ChunkCorruptError` (never returns the bytes).
* **Fingerprint.** The root metadata records a SHA-256 fingerprint of everything the
  features depend on (feature function and its configuration, training data, chunking,
  dtype). Opening an existing store with a different fingerprint raises
  :class:`StoreMismatchError` and touches nothing.
"""
from __future__ import annotations

import errno
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iif_ref._io import array_digest, atomic_write

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
    "StoreMismatchError",
    "ChunkCorruptError",
    "StoreWriteError",
    "fingerprint_of",
    "array_digest",
]

#: Version of the layout above; part of the fingerprint.
FORMAT_VERSION = 1

#: The two arrays stored per path step.
FEATURE_NAMES = ("Phi", "Psi")

_META_KEY = "iif_ref"


class StoreMismatchError(ValueError):
    """An existing store was written by a different configuration.

    Attributes
    ----------
    path : str
        Root of the store.
    differences : dict
        ``key -> (stored, requested)`` for each differing configuration entry.
    """

    def __init__(self, message, *, path, differences):
        super().__init__(message)
        self.path = str(path)
        self.differences = dict(differences)

    def __reduce__(self):  # keyword-only fields survive pickling (worker -> driver)
        return (_rebuild, (type(self), self.args[0],
                           {"path": self.path, "differences": self.differences}))


class ChunkCorruptError(ValueError):
    """A stored chunk is truncated or its checksum does not match.

    Attributes
    ----------
    path : str
        The chunk file.
    chunk : int
        The chunk index.
    """

    def __init__(self, message, *, path, chunk):
        super().__init__(message)
        self.path = str(path)
        self.chunk = int(chunk)

    def __reduce__(self):
        return (_rebuild, (type(self), self.args[0], {"path": self.path, "chunk": self.chunk}))


def _rebuild(cls, message, fields):
    return cls(message, **fields)


class StoreWriteError(OSError):
    """Writing a chunk failed (disk full, permissions, ...); nothing stored was lost.

    Carries the ``errno`` of the underlying :class:`OSError`.
    """


# --------------------------------------------------------------------------- hashing
def _canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def fingerprint_of(config):
    """SHA-256 hex digest of a JSON-serialisable configuration (key order ignored)."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


# --------------------------------------------------------------------------- crc32c
def _crc32c(buffer):
    # google_crc32c is a dependency of zarr 3 (its crc32c codec), so the "distributed"
    # extra brings it; the C implementation hashes at memory bandwidth.
    import google_crc32c
    # It accepts bytes and NumPy arrays (read-only buffers), not memoryviews.
    if isinstance(buffer, memoryview):
        buffer = np.frombuffer(buffer, dtype=np.uint8)
    return int(google_crc32c.value(buffer))


# --------------------------------------------------------------------------- files
def _atomic_write(path, payload):
    """:func:`iif_ref._io.atomic_write`, its ``OSError`` raised as :class:`StoreWriteError`."""
    try:
        atomic_write(path, memoryview(payload).cast("B"))
    except OSError as exc:
        hint = (" (disk full: free space, then rerun to resume)"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "")
        raise StoreWriteError(
            exc.errno, f"could not write {path}: {exc.strerror or exc}{hint}; chunks "
            f"already stored are intact and a rerun computes only the missing ones") from exc


# --------------------------------------------------------------------------- store
@dataclass(frozen=True)
class FeatureStore:
    """Handle on a feature store directory (picklable; workers receive it).

    Create or reopen one with :meth:`open`. Attributes are the store metadata.

    Attributes
    ----------
    root : str
        Directory of the store.
    n_train : int
    chunk_rows : int
    proj_dim : int
    steps : tuple
        Path-step keys (JSON-serialisable), in order; ``step_<s>`` holds ``steps[s]``.
    dtype : str
        NumPy dtype string of the stored features (``"<f8"`` or ``"<f4"``).
    fingerprint : str
        SHA-256 of ``config``.
    config : dict
        Everything the features depend on (see :meth:`open`).
    """

    root: str
    n_train: int
    chunk_rows: int
    proj_dim: int
    steps: tuple
    dtype: str
    fingerprint: str
    config: dict

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root, *, n_train, chunk_rows, proj_dim, steps, dtype, config):
        """Create the store at ``root``, or reopen it if it holds the same fingerprint.

        Parameters
        ----------
        root : str or path-like
            Directory; created if missing. An existing directory must be empty or a
            store with the same fingerprint.
        n_train, chunk_rows, proj_dim : int
        steps : sequence
            JSON-serialisable path-step keys.
        dtype : numpy dtype
            float32 or float64.
        config : dict
            JSON-serialisable description of the feature function and the data (see
            :func:`iif_ref.distributed.featurize.store_config`). Together with the
            arguments above it forms the fingerprint.

        Returns
        -------
        FeatureStore

        Raises
        ------
        StoreMismatchError
            ``root`` holds a store with another fingerprint, or is a non-empty
            directory that is not a store. Nothing is modified.
        """
        root = Path(root)
        dtype = np.dtype(dtype).newbyteorder("<")
        if dtype not in (np.dtype("<f8"), np.dtype("<f4")):
            raise TypeError(f"feature dtype must be float32 or float64, got {dtype}")
        steps = tuple(steps)
        full = {"format": FORMAT_VERSION, "n_train": int(n_train),
                "chunk_rows": int(chunk_rows), "proj_dim": int(proj_dim),
                "steps": json.loads(_canonical(list(steps))), "dtype": dtype.str,
                **config}
        fp = fingerprint_of(full)
        meta_path = root / "zarr.json"
        if meta_path.exists():
            stored = cls._read_meta(meta_path)
            if stored.get("fingerprint") != fp:
                old = stored.get("config", {})
                diff = {k: (old.get(k), full.get(k)) for k in sorted(set(old) | set(full))
                        if old.get(k) != full.get(k)}
                keys = ", ".join(diff) or "(unknown)"
                raise StoreMismatchError(
                    f"feature store {root} was written by a different configuration "
                    f"(differs in: {keys}); refusing to mix features. Use a new store "
                    f"path, or delete {root} to recompute everything.",
                    path=root, differences=diff)
        else:
            if root.exists() and (not root.is_dir() or any(root.iterdir())):
                raise StoreMismatchError(
                    f"{root} exists and is not an iif_ref feature store (no zarr.json); "
                    f"refusing to write into it", path=root, differences={})
            group = {"zarr_format": 3, "node_type": "group",
                     "attributes": {_META_KEY: {"fingerprint": fp, "config": full}}}
            _atomic_write(meta_path, json.dumps(group, indent=1).encode())
        store = cls(root=str(root), n_train=int(n_train), chunk_rows=int(chunk_rows),
                    proj_dim=int(proj_dim), steps=steps, dtype=dtype.str, fingerprint=fp,
                    config=full)
        store._write_array_metadata()
        return store

    @staticmethod
    def _read_meta(meta_path):
        try:
            doc = json.loads(Path(meta_path).read_text())
            return doc["attributes"][_META_KEY]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreMismatchError(
                f"{meta_path} is not readable iif_ref store metadata ({exc}); refusing "
                f"to write into {Path(meta_path).parent}",
                path=Path(meta_path).parent, differences={}) from exc

    def _write_array_metadata(self):
        for s in range(len(self.steps)):
            group = Path(self.root) / f"step_{s}" / "zarr.json"
            if not group.exists():
                _atomic_write(group, json.dumps(
                    {"zarr_format": 3, "node_type": "group",
                     "attributes": {"step": self.config["steps"][s]}}).encode())
            for name in FEATURE_NAMES:
                meta = Path(self.root) / f"step_{s}" / name / "zarr.json"
                if meta.exists():
                    continue
                doc = {
                    "zarr_format": 3, "node_type": "array",
                    "shape": [self.n_train, self.proj_dim],
                    "data_type": "float64" if self.dtype == "<f8" else "float32",
                    "chunk_grid": {"name": "regular", "configuration": {
                        "chunk_shape": [self.chunk_rows, self.proj_dim]}},
                    "chunk_key_encoding": {"name": "default",
                                           "configuration": {"separator": "/"}},
                    "fill_value": 0.0,
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                               {"name": "crc32c"}],
                    "attributes": {},
                    "dimension_names": ["sample", "proj"],
                }
                _atomic_write(meta, json.dumps(doc, indent=1).encode())

    # ------------------------------------------------------------------ geometry
    @property
    def n_chunks(self):
        """Number of row chunks, ``ceil(n_train / chunk_rows)``."""
        return -(-self.n_train // self.chunk_rows)

    def chunk_slice(self, chunk):
        """Rows ``slice(start, stop)`` of chunk ``chunk``."""
        self._check_chunk(chunk)
        start = chunk * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.n_train))

    def _check_chunk(self, chunk):
        if not 0 <= int(chunk) < self.n_chunks:
            raise IndexError(f"chunk {chunk} out of range [0, {self.n_chunks})")

    def chunk_path(self, step_index, name, chunk):
        """Path of one chunk file."""
        return Path(self.root) / f"step_{step_index}" / name / "c" / str(int(chunk)) / "0"

    def _chunk_files(self, chunk):
        return [(s, name, self.chunk_path(s, name, chunk))
                for s in range(len(self.steps)) for name in FEATURE_NAMES]

    # ------------------------------------------------------------------ I/O
    def write_chunk(self, chunk, features):
        """Atomically write every step's ``Phi`` and ``Psi`` rows of one chunk.

        Parameters
        ----------
        chunk : int
        features : sequence of (Phi, Psi)
            One pair per step (store order), each ``(rows_in_chunk, proj_dim)``.

        Returns
        -------
        dict
            ``{"chunk": chunk, "crc32c": [...]}``, one checksum per file written.
        """
        rows = self.chunk_slice(chunk)
        n_rows = rows.stop - rows.start
        dtype = np.dtype(self.dtype)
        checksums = []
        for s, pair in enumerate(features):
            for name, arr in zip(FEATURE_NAMES, pair):
                arr = np.asarray(arr)
                if arr.shape != (n_rows, self.proj_dim):
                    raise ValueError(
                        f"{name} of step {self.steps[s]!r}, chunk {chunk} has shape "
                        f"{arr.shape}, expected {(n_rows, self.proj_dim)}")
                block = np.zeros((self.chunk_rows, self.proj_dim), dtype=dtype)
                block[:n_rows] = arr
                raw = block.tobytes(order="C")
                crc = _crc32c(raw)
                path = self.chunk_path(s, name, chunk)
                _atomic_write(path, raw + np.uint32(crc).astype("<u4").tobytes())
                checksums.append(crc)
        return {"chunk": int(chunk), "crc32c": checksums}

    def _read_file(self, path, chunk):
        dtype = np.dtype(self.dtype)
        expected = self.chunk_rows * self.proj_dim * dtype.itemsize
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise
        if len(data) != expected + 4:
            raise ChunkCorruptError(
                f"chunk file {path} has {len(data)} bytes, expected {expected + 4} "
                f"(truncated or foreign); it will not be used", path=path, chunk=chunk)
        stored = int(np.frombuffer(data, dtype="<u4", count=1, offset=expected)[0])
        body = memoryview(data)[:expected]
        if _crc32c(body) != stored:
            raise ChunkCorruptError(
                f"chunk file {path} fails its CRC32C checksum (corrupt); it will not "
                f"be used", path=path, chunk=chunk)
        return np.frombuffer(body, dtype=dtype).reshape(self.chunk_rows, self.proj_dim)

    def read(self, step_index, name, chunk):
        """Read and verify one chunk: ``(rows_in_chunk, proj_dim)`` of the stored dtype.

        Raises
        ------
        FileNotFoundError
            The chunk was never written.
        ChunkCorruptError
            Wrong length or checksum mismatch.
        """
        if name not in FEATURE_NAMES:
            raise ValueError(f"name must be one of {FEATURE_NAMES}, got {name!r}")
        rows = self.chunk_slice(chunk)
        block = self._read_file(self.chunk_path(step_index, name, chunk), chunk)
        return block[: rows.stop - rows.start]

    def chunk_status(self, chunk):
        """``"ok"``, ``"missing"`` or ``"corrupt"`` after reading every file of a chunk."""
        status = "ok"
        for _, _, path in self._chunk_files(chunk):
            try:
                self._read_file(path, chunk)
            except FileNotFoundError:
                status = "missing" if status == "ok" else status
            except ChunkCorruptError:
                return "corrupt"
        return status

    def remove_stale_tmp(self, *, older_than=3600.0):
        """Delete temporary files left by killed writers; returns how many.

        Only files older than ``older_than`` seconds: a younger one may belong to a
        writer still running (a task the scheduler duplicated, or another run on the
        same store), whose rename must not fail.
        """
        import time
        cutoff = time.time() - older_than
        removed = 0
        for p in Path(self.root).glob("step_*/*/c/*/.*.tmp"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    def present_chunks(self):
        """Chunks whose every file exists (not verified): a cheap listing."""
        return [c for c in range(self.n_chunks)
                if all(p.exists() for _, _, p in self._chunk_files(c))]
