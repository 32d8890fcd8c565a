"""Backend registry: names -> lazily imported backend modules.

A *backend* is a module that computes the kernel layer's three array functions for
one kind of hardware or compiler. The public functions in :mod:`iif_ref.kernels`
validate their arguments once and then call the backend named by ``backend=``;
backends receive clean arrays and never validate user input again.

Backend protocol
----------------
Every backend module exposes exactly these names (and may have private helpers):

``NAME : str``
    The registry name (``"numpy"``, ``"numba"``, ``"cupy"``).

``available() -> tuple[bool, str]``
    ``(True, "")`` when the backend can run here, else ``(False, reason)`` with a
    one-line human-readable reason (missing package, no CUDA device, ...). It must
    not raise and must be cheap enough to call from test collection.

``generate(seed, row_start, n_rows, proj_dim, kind, dtype) -> ndarray``
    The block ``A[row_start : row_start + n_rows, :proj_dim]`` of the projection
    matrix of ``docs/rng.md`` as a host NumPy array of shape ``(n_rows, proj_dim)`` and
    dtype ``dtype`` (float32 or float64). ``seed`` is an int in ``[0, 2**64)``,
    ``row_start + n_rows <= 2**64``, ``kind`` is ``"rademacher"``, ``"gaussian"``,
    ``"countsketch"`` (one ``±1`` per row) or a Kronecker factor stream
    (``"kronecker_in"``, ``"kronecker_out"``: ``±1`` entries). All but Gaussian blocks are
    bit-for-bit identical on every backend; Gaussian blocks agree to a few float64 ulp
    before the cast to ``dtype``.

``project(G, proj_dim, *, seed, kind, chunk_rows) -> ndarray``
    ``Phi = G @ A`` (Eq. 17, 31) for ``G`` of shape ``(n, n_params)``, float32 or
    float64, C- or F-ordered, finite, ``n >= 1``. Returns ``(n, proj_dim)`` in ``G``'s
    dtype, accumulated in that dtype; ``kind`` is ``"rademacher"``, ``"gaussian"`` or
    ``"countsketch"`` (whose product follows the order of ``kernels/countsketch.cuh``,
    so it is the same bytes on every backend). At most ``chunk_rows`` rows of ``A`` may
    exist at once (the caller derived ``chunk_rows`` from its memory budget). A device backend
    may also accept its own device array for ``G`` and then returns the same kind of
    array; given a NumPy array it returns a NumPy array.

``projected_scores(Phi, Psi, Gamma, *, damping, reduce) -> ndarray``
    ``Phi`` and ``Psi`` of shape ``(B, N, P)``, ``Gamma`` of shape ``(B, T, P)``
    (float32 or float64, finite, shapes already checked to agree), ``damping`` a
    float64 NumPy array of shape ``(B,)`` holding the *absolute* damping ``lam_d >= 0``
    of each slice (the front end resolves the default, ``RELATIVE_DAMPING`` times the
    mean diagonal of each Gram, with ``iif_ref.kernels.resolve_damping``). With
    ``F_b = Phi_b^T Phi_b + damping[b] I`` (Gram accumulated in float64), returns the
    float64 array ``-sum_b Gamma_b F_b^{-1} Psi_b^T`` of shape ``(T, N)`` when ``reduce``
    is true, else the per-slice terms ``-Gamma_b F_b^{-1} Psi_b^T`` of shape
    ``(B, T, N)``. A slice whose ``F_b`` is not (numerically) positive definite raises
    :class:`iif_ref.errors.NotPositiveDefiniteError` naming every failing ``b`` and a
    damping that fixes it (build it with
    :func:`iif_ref.kernels._fisher.not_positive_definite_error` and
    :func:`iif_ref.kernels._fisher.suggest_damping`, so every backend says the same);
    never NaN. A slice is "not positive definite" when its Cholesky factorisation fails
    or its reciprocal condition estimate is below ``n * eps64`` (``n`` the order of
    the factored matrix); for ``N < P`` the ``N x N`` Woodbury form may be used and
    then needs ``damping[b] > 0``.

The NumPy backend is the float64 oracle every other backend is tested against; the
backend-agnostic tests are parametrised over :func:`backend_names`, so a module
registered here is tested automatically (skipped, with its reason, where unavailable);
:func:`backend_status` gives that reason.

Importing this module imports no backend: ``import iif_ref.kernels`` needs neither
numba nor cupy.
"""
from __future__ import annotations

import importlib

__all__ = ["BACKENDS", "backend_names", "backend_status", "available_backends", "get_backend"]

#: Registry name -> module path. Order is the order of preference for listings.
BACKENDS = {
    "numpy": "iif_ref.kernels._numpy_backend",
    "numba": "iif_ref.kernels._numba_backend",
    "cupy": "iif_ref.kernels._cupy_backend",
}

_loaded = {}


def backend_names():
    """All registered backend names, available here or not."""
    return tuple(BACKENDS)


def _import(name):
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKENDS[name])
        except ImportError as exc:  # module itself absent or its import failed
            _loaded[name] = exc
    return _loaded[name]


def backend_status(name):
    """``(True, "")`` if backend ``name`` can run here, else ``(False, reason)``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(BACKENDS)}")
    return _status(name)


def _status(name):
    module = _import(name)
    if isinstance(module, ImportError):
        return False, f"cannot import {BACKENDS[name]}: {module}"
    try:
        ok, reason = module.available()
    except Exception as exc:  # noqa: BLE001 -- a broken probe means "unavailable", with why
        return False, f"availability check failed: {type(exc).__name__}: {exc}"
    return bool(ok), str(reason)


def available_backends():
    """Names of the backends that can run on this machine, in registry order.

    Returns
    -------
    tuple of str
    """
    return tuple(name for name in BACKENDS if _status(name)[0])


def get_backend(name):
    """Return the backend module registered as ``name``.

    Raises
    ------
    TypeError
        ``name`` is not a string.
    ValueError
        ``name`` is not registered, or the backend cannot run here; the message gives
        the reason and the available backends.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(BACKENDS)}; "
                         f"available: {', '.join(available_backends())}")
    ok, reason = _status(name)
    if not ok:
        raise ValueError(f"backend {name!r} is unavailable: {reason}; "
                         f"available: {', '.join(available_backends())}")
    return _import(name)
