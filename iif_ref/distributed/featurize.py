"""Sharded featurisation: workers compute projected per-sample features into the store.

The *feature function protocol* is what a worker needs to featurise a shard of the
training set. A feature function is a picklable object with

``__call__(shard_id, X_shard, y_shard) -> {step: (Phi, Psi)}``
    For every path step, the projected gradients ``Phi = U A`` (Eq. 31) and projected
    directions ``Psi = (J Δy)ᵀ A`` (Eq. 17) of the shard's samples, each of shape
    ``(len(X_shard), proj_dim)``. Row ``r`` must depend only on sample ``r`` of the shard
    (true of per-sample gradients projected with the counter-based ``A`` of
    ``docs/rng.md``), so features of a shard are the rows of the features of the whole
    training set.
``steps`` : tuple
    The path-step keys (JSON-serialisable, e.g. ``k = 1..K``), in order.
``proj_dim`` : int
``fingerprint()`` -> dict
    JSON-serialisable description of everything the features depend on besides the
    data: model parameters (a digest), loss, path, baseline, projection seed and kind.
    It keys the feature store; two functions with equal fingerprints must compute
    equal features. Without it the digest of the pickled function is used.
``dtype`` : numpy dtype, optional
    Stored feature dtype (default float64).
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np

from iif_ref._validation import as_float_array, check_positive_int, check_same_length
from iif_ref.distributed import _executor
from iif_ref.distributed.store import FeatureStore, StoreWriteError, array_digest

__all__ = ["FeaturizationError", "FeaturizeReport", "describe_feature_function",
           "open_store", "featurize", "read_rows"]


class FeaturizationError(RuntimeError):
    """Some chunks could not be featurised; every other chunk is stored.

    Attributes
    ----------
    errors : dict
        ``chunk -> exception`` for each failed chunk.
    """

    def __init__(self, message, *, errors):
        super().__init__(message)
        self.errors = dict(errors)


@dataclass(frozen=True)
class FeaturizeReport:
    """What :func:`featurize` did.

    Attributes
    ----------
    computed : tuple of int
        Chunks computed in this call.
    reused : tuple of int
        Chunks found stored and verified (not recomputed).
    corrupt : tuple of int
        Stored chunks that failed verification and were recomputed (subset of
        ``computed``).
    """

    computed: tuple
    reused: tuple
    corrupt: tuple


def describe_feature_function(feature_fn):
    """Check the protocol and return ``(steps, proj_dim, dtype, fingerprint_dict)``."""
    if not callable(feature_fn):
        raise TypeError(f"feature_fn must be callable, got {type(feature_fn).__name__}")
    try:
        steps = tuple(feature_fn.steps)
    except (AttributeError, TypeError) as exc:
        raise TypeError("feature_fn must have a 'steps' attribute (sequence of path-step "
                        "keys)") from exc
    if not steps:
        raise ValueError("feature_fn.steps is empty; at least one path step is needed")
    if len(set(map(repr, steps))) != len(steps):
        raise ValueError(f"feature_fn.steps has duplicates: {steps!r}")
    proj_dim = check_positive_int(getattr(feature_fn, "proj_dim", None), "feature_fn.proj_dim")
    dtype = np.dtype(getattr(feature_fn, "dtype", np.float64))
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"feature_fn.dtype must be float32 or float64, got {dtype}")
    if hasattr(feature_fn, "fingerprint"):
        fp = feature_fn.fingerprint()
        if not isinstance(fp, dict):
            raise TypeError(f"feature_fn.fingerprint() must return a dict, "
                            f"got {type(fp).__name__}")
    else:
        import cloudpickle
        fp = {"pickle_sha256": hashlib.sha256(cloudpickle.dumps(feature_fn)).hexdigest()}
    return steps, proj_dim, dtype, fp


def open_store(path, feature_fn, X, y, *, chunk_rows):
    """Open (or create) the feature store for ``feature_fn`` on data ``(X, y)``.

    The fingerprint covers the function's fingerprint, ``steps``, ``proj_dim``, dtype,
    ``chunk_rows`` and a SHA-256 of ``X`` and ``y`` (shapes, dtypes, bytes).

    Raises
    ------
    StoreMismatchError
        ``path`` holds features of another configuration.
    """
    steps, proj_dim, dtype, fp = describe_feature_function(feature_fn)
    chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
    config = {"feature_fn": fp, "data_sha256": array_digest(X, y),
              "n_features_in": list(X.shape[1:]), "y_shape": list(y.shape[1:])}
    return FeatureStore.open(path, n_train=X.shape[0], chunk_rows=chunk_rows,
                             proj_dim=proj_dim, steps=steps, dtype=dtype, config=config)


# --------------------------------------------------------------------------- tasks
def _featurize_chunk(store, feature_fn, chunk, X_shard, y_shard):
    """Worker task: features of one chunk, validated, then written atomically."""
    out = feature_fn(chunk, X_shard, y_shard)
    if not isinstance(out, dict):
        raise TypeError(f"feature_fn returned {type(out).__name__}, expected a dict "
                        f"step -> (Phi, Psi)")
    missing = [s for s in store.steps if s not in out]
    if missing:
        raise ValueError(f"feature_fn output for chunk {chunk} lacks steps {missing!r}")
    n = X_shard.shape[0]
    pairs = []
    for step in store.steps:
        try:
            phi, psi = out[step]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"feature_fn output for step {step!r} must be a pair "
                            f"(Phi, Psi)") from exc
        checked = []
        for name, arr in (("Phi", phi), ("Psi", psi)):
            arr = as_float_array(arr, f"{name} (step {step!r}, chunk {chunk})", ndim=2,
                                 allow_dtypes=(np.float32, np.float64))
            if arr.shape != (n, store.proj_dim):
                raise ValueError(f"{name} (step {step!r}, chunk {chunk}) has shape "
                                 f"{arr.shape}, expected {(n, store.proj_dim)}")
            checked.append(arr)
        pairs.append(checked)
    return store.write_chunk(chunk, pairs)


def _chunk_status(store, chunk):
    return store.chunk_status(chunk)


# --------------------------------------------------------------------------- driver
def featurize(client, store, feature_fn, X, y):
    """Compute every chunk of ``store`` that is missing or corrupt; reuse the rest.

    Parameters
    ----------
    client : distributed.Client or None
        None runs the chunks one after another in this process.
    store : FeatureStore
        From :func:`open_store` with the same ``feature_fn``, ``X`` and ``y``.
    feature_fn : feature function
        See the module docstring.
    X : ndarray, shape (n_train, ...)
    y : ndarray, shape (n_train, ...)

    Returns
    -------
    FeaturizeReport

    Raises
    ------
    StoreWriteError
        A chunk could not be written (disk full, ...); the other chunks are stored.
    FeaturizationError
        The feature function failed on some chunks; the other chunks are stored and a
        rerun computes only the failed ones.

    Notes
    -----
    Stored chunks are verified (length and CRC32C of every file) on the workers before
    they are reused; a corrupt one is recomputed and reported with a warning, never used.
    A worker that dies mid-chunk leaves no partial chunk file (writes are atomic);
    the scheduler reruns the task elsewhere.
    """
    check_same_length(X, "X_train", y, "y_train")
    if X.shape[0] != store.n_train:
        raise ValueError(f"store holds {store.n_train} samples, X_train has {X.shape[0]}")
    store.remove_stale_tmp()
    present = store.present_chunks()
    checks = {c: _executor.submit(client, _chunk_status, store, c, name=f"verify-{c}")
              for c in present}
    status, errors = _executor.settle(client, checks)
    if errors:
        chunk, exc = next(iter(errors.items()))
        raise RuntimeError(f"could not verify stored chunk {chunk}: {exc}") from exc
    corrupt = sorted(c for c, s in status.items() if s == "corrupt")
    reused = sorted(c for c, s in status.items() if s == "ok")
    todo = sorted(set(range(store.n_chunks)) - set(reused))
    if corrupt:
        warnings.warn(f"feature store {store.root}: chunk(s) {corrupt} failed their "
                      f"checksum and are recomputed", RuntimeWarning, stacklevel=2)
    fn = _executor.scatter(client, feature_fn) if client is not None else feature_fn
    futures = {}
    for c in todo:
        rows = store.chunk_slice(c)
        futures[c] = _executor.submit(client, _featurize_chunk, store, fn, c,
                                      X[rows], y[rows], name=f"featurize-{c}")
    _, errors = _executor.settle(client, futures)
    del futures
    if errors:
        failed = sorted(errors)
        done = store.n_chunks - len(failed)
        first = errors[failed[0]]
        write_errors = [e for e in errors.values() if isinstance(e, OSError)]
        summary = (f"{len(failed)} of {store.n_chunks} chunk(s) failed ({failed[:20]}"
                   f"{'...' if len(failed) > 20 else ''}); {done} are stored in "
                   f"{store.root} and a rerun computes only the missing ones")
        if write_errors:
            exc = write_errors[0]
            raise StoreWriteError(getattr(exc, "errno", None),
                                  f"{summary}. First write error: {exc}") from exc
        raise FeaturizationError(f"{summary}. First error (chunk {failed[0]}): "
                                 f"{type(first).__name__}: {first}", errors=errors) from first
    return FeaturizeReport(computed=tuple(todo), reused=tuple(reused), corrupt=tuple(corrupt))


def read_rows(store, step_index, name, chunks=None):
    """Concatenate stored chunks of one array (for tests and small stores).

    Raises :class:`ChunkCorruptError` on a bad chunk.
    """
    chunks = range(store.n_chunks) if chunks is None else chunks
    return np.concatenate([store.read(step_index, name, c) for c in chunks], axis=0)

