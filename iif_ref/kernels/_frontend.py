"""Public kernel functions: validate once, then dispatch to a backend.

The backends (``_registry``) receive clean arrays and resolved options only.
"""
from __future__ import annotations

import numbers

import numpy as np

from iif_ref._validation import as_float_array, check_nonnegative_real, check_positive_int
from iif_ref.kernels import _fisher
from iif_ref.kernels._philox import COL_LIMIT, ROW_LIMIT, check_kind, check_seed
from iif_ref.kernels._registry import get_backend

__all__ = ["DEFAULT_MEMORY_BUDGET", "project", "projection_matrix", "projected_scores"]

#: Bytes of ``A`` that :func:`project` may hold at once by default (64 MiB).
DEFAULT_MEMORY_BUDGET = 64 * 2**20

_KERNEL_DTYPES = (np.float32, np.float64)


def _check_proj_dim(proj_dim):
    proj_dim = check_positive_int(proj_dim, "proj_dim")
    if proj_dim >= COL_LIMIT:
        raise ValueError(f"proj_dim must be < 2**32 (docs/rng.md), got {proj_dim}")
    return proj_dim


def _check_float_dtype(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if dtype not in tuple(np.dtype(d) for d in _KERNEL_DTYPES):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def projection_matrix(n_params, proj_dim, *, seed=0, kind="rademacher", dtype=np.float64,
                      rows=None, backend="numpy"):
    """Materialise the projection matrix ``A`` (or a block of its rows).

    For tests and small problems; :func:`project` never holds ``A`` whole.

    Parameters
    ----------
    n_params : int
        ``M``, the number of rows of ``A`` (parameters).
    proj_dim : int
        ``P``, the number of columns (projected dimension), ``1 <= P < 2**32``.
    seed : int, optional
        In ``[0, 2**64 - 1]``; the key of the counter-based generator.
    kind : {"rademacher", "gaussian"}, optional
        Entries ``±1/√P`` (default) or ``N(0, 1)/√P``.
    dtype : {numpy.float64, numpy.float32}, optional
    rows : tuple (start, stop), optional
        Only rows ``start <= m < stop`` (``0 <= start < stop <= n_params``).
    backend : str, optional
        Which backend generates it (default the NumPy oracle).

    Returns
    -------
    A : ndarray, shape (stop - start, proj_dim)

    Notes
    -----
    Implements the ``A`` of Eq. (17) exactly as specified in ``docs/rng.md``: entry
    ``A[m, p]`` depends only on ``(seed, m, p)``, so any row block equals the same rows
    of the whole matrix.

    Examples
    --------
    >>> A = projection_matrix(1000, 64, seed=3)
    >>> bool(np.all(projection_matrix(1000, 64, seed=3, rows=(10, 20)) == A[10:20]))
    True
    """
    if isinstance(n_params, numbers.Integral) and not isinstance(n_params, bool) \
            and n_params >= ROW_LIMIT:
        raise ValueError(f"n_params must be < 2**64, got {n_params}")
    n_params = check_positive_int(n_params, "n_params")
    proj_dim = _check_proj_dim(proj_dim)
    seed = check_seed(seed)
    kind = check_kind(kind)
    dtype = _check_float_dtype(dtype)
    if rows is None:
        start, stop = 0, n_params
    else:
        try:
            start, stop = rows
        except (TypeError, ValueError) as exc:
            raise TypeError(f"rows must be a (start, stop) pair, got {rows!r}") from exc
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                   for v in (start, stop)):
            raise TypeError(f"rows must hold integers, got {rows!r}")
        start, stop = int(start), int(stop)
        if not 0 <= start < stop <= n_params:
            raise ValueError(f"rows must satisfy 0 <= start < stop <= n_params={n_params}, "
                             f"got {rows!r}")
    return get_backend(backend).generate(seed, start, stop - start, proj_dim, kind, dtype)


def project(G, proj_dim, *, seed=0, kind="rademacher", backend="numba",
            memory_budget=DEFAULT_MEMORY_BUDGET):
    """Project rows of ``G`` with the counter-based random matrix: ``Phi = G A``.

    Parameters
    ----------
    G : array_like, shape (n, n_params)
        Gradients (or any row vectors) to project; float32 or float64 are kept (other
        real dtypes become float64); C- or F-ordered. A single vector must be passed
        as ``G[None, :]``.
    proj_dim : int
        ``P``, ``1 <= P < 2**32``.
    seed : int, optional
        In ``[0, 2**64 - 1]``.
    kind : {"rademacher", "gaussian"}, optional
    backend : str, optional
        ``"numba"`` (default), ``"numpy"`` (oracle) or ``"cupy"``; see
        :func:`available_backends`.
    memory_budget : int, optional
        Bytes of ``A`` that may exist at once (default 64 MiB). ``A`` is generated in
        blocks of ``memory_budget // (P * itemsize)`` rows; the output and ``G`` are not
        counted.

    Returns
    -------
    Phi : ndarray, shape (n, proj_dim), dtype of ``G``

    Notes
    -----
    Implements ``Phi = U A`` of Eq. (31) (and ``Gamma = G A``, ``Psi`` of Eq. 17) with
    ``A`` from ``docs/rng.md``. Accumulation is in the input dtype: for float32 the
    relative error of each entry, measured against ``‖g‖ ‖a_p‖``, is of order
    ``sqrt(M) * eps32`` (rounding errors of a length-M dot product add like a random
    walk; the worst case is ``M * eps32``). The result does not depend on
    ``memory_budget`` beyond that rounding.

    Examples
    --------
    >>> G = np.random.default_rng(0).standard_normal((5, 300))
    >>> Phi = project(G, 16, seed=1, backend="numpy")
    >>> bool(np.allclose(Phi, G @ projection_matrix(300, 16, seed=1)))
    True
    """
    if np.ndim(G) == 1:
        raise ValueError(f"G must be 2-D (n, n_params), got a 1-D array of shape "
                         f"{np.shape(G)}; pass a single vector as G[None, :]")
    G = as_float_array(G, "G", ndim=2, allow_dtypes=_KERNEL_DTYPES)
    if G.shape[1] < 1:
        raise ValueError(f"G has no columns (shape {G.shape}); n_params must be >= 1")
    proj_dim = _check_proj_dim(proj_dim)
    seed = check_seed(seed)
    kind = check_kind(kind)
    memory_budget = check_positive_int(memory_budget, "memory_budget")
    row_bytes = proj_dim * G.dtype.itemsize
    if memory_budget < row_bytes:
        raise ValueError(f"memory_budget={memory_budget} bytes cannot hold one row of A: "
                         f"proj_dim={proj_dim} entries of {G.dtype} need {row_bytes} bytes")
    chunk_rows = min(memory_budget // row_bytes, G.shape[1])
    return get_backend(backend).project(G, proj_dim, seed=seed, kind=kind,
                                        chunk_rows=chunk_rows)


def projected_scores(Phi, Psi, Gamma, *, damping=None, backend="numba", reduce=True):
    """Scores from projected Fisher solves: ``-sum_b Gamma_b F_b^{-1} Psi_b^T``.

    Parameters
    ----------
    Phi : array_like, shape (B, N, P) or (N, P)
        Projected per-sample gradients ``U A`` of each batch slice ``b`` (path step, or
        step × test); the Fisher is ``F_b = Phi_b^T Phi_b + damping_b I``.
    Psi : array_like, shape (B, N, P) or (N, P)
        Projected directions ``(J_i Δy)^T A``.
    Gamma : array_like, shape (B, T, P) or (T, P)
        Projected test gradients ``G A``.
    damping : float or None, optional
        Absolute ``lam_d >= 0`` used for every slice, or None (default) for the
        relative default ``1e-3 * tr(Phi_b^T Phi_b) / P`` per slice, which bounds
        ``cond(F_b) <= 1 + 1000 P`` and scales with the data (docs/kernels.md).
    backend : str, optional
    reduce : bool, optional
        Sum over ``b`` (default) or return every slice's term.

    Returns
    -------
    scores : ndarray, float64, shape (T, N) if ``reduce`` else (B, T, N)
        For 2-D inputs ``B = 1``.

    Raises
    ------
    iif_ref.errors.NotPositiveDefiniteError
        Some ``F_b`` is not positive definite to float64 working precision; the error's
        ``slices`` lists every failing ``b`` and ``suggested_damping`` a damping that
        fixes them. When ``N < P`` the Gram has rank ``< P`` and damping must be > 0.

    Notes
    -----
    Implements the update of Algorithm 1 with Eq. (17) and the Fisher of Eq. (31):
    ``I[t, i] -= Gamma_b[t] F_b^{-1} Psi_b[i]^T``. Grams are accumulated in float64 for
    float32 input; one Cholesky factor per slice serves all right-hand sides. For
    ``N < P`` the ``N × N`` Woodbury form
    ``F^{-1} = (I - Phi^T (Phi Phi^T + lam_d I)^{-1} Phi) / lam_d`` is used.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> Phi, Psi, Gamma = rng.standard_normal((3, 40, 8)), rng.standard_normal((3, 40, 8)), rng.standard_normal((3, 2, 8))
    >>> S = projected_scores(Phi, Psi, Gamma, damping=0.1, backend="numpy")
    >>> F0 = Phi[0].T @ Phi[0] + 0.1 * np.eye(8)
    >>> per = projected_scores(Phi, Psi, Gamma, damping=0.1, backend="numpy", reduce=False)
    >>> bool(np.allclose(per[0], -Gamma[0] @ np.linalg.solve(F0, Psi[0].T)))
    True
    >>> bool(np.allclose(S, per.sum(axis=0)))
    True
    """
    arrays = {}
    for name, value in (("Phi", Phi), ("Psi", Psi), ("Gamma", Gamma)):
        arrays[name] = as_float_array(value, name, ndim=(2, 3), allow_dtypes=_KERNEL_DTYPES)
    ndims = {a.ndim for a in arrays.values()}
    if len(ndims) != 1:
        raise ValueError("Phi, Psi and Gamma must all be 2-D or all be 3-D, got shapes "
                         + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))
    if ndims == {2}:
        arrays = {k: v[None] for k, v in arrays.items()}
    Phi, Psi, Gamma = arrays["Phi"], arrays["Psi"], arrays["Gamma"]
    for name, arr in arrays.items():
        if 0 in arr.shape:
            raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not (Phi.shape[0] == Psi.shape[0] == Gamma.shape[0]):
        raise ValueError(f"Phi, Psi and Gamma must have the same batch size B, got shapes "
                         f"{Phi.shape}, {Psi.shape}, {Gamma.shape}")
    if not (Phi.shape[2] == Psi.shape[2] == Gamma.shape[2]):
        raise ValueError(f"Phi, Psi and Gamma must have the same proj_dim P (last axis), "
                         f"got shapes {Phi.shape}, {Psi.shape}, {Gamma.shape}")
    if Phi.shape[1] != Psi.shape[1]:
        raise ValueError(f"Phi and Psi must have the same number of samples N, got shapes "
                         f"{Phi.shape} and {Psi.shape}")
    if not isinstance(reduce, (bool, np.bool_)):
        raise TypeError(f"reduce must be a bool, got {type(reduce).__name__}")
    if damping is None:
        lam = _fisher.relative_damping(Phi)
    else:
        lam = np.full(Phi.shape[0], check_nonnegative_real(damping, "damping"))
    return get_backend(backend).projected_scores(Phi, Psi, Gamma, damping=lam,
                                                 reduce=bool(reduce))
