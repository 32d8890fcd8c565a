"""Public kernel functions: validate once, then dispatch to a backend.

The backends (``_registry``) receive clean arrays and resolved options only.

Device arrays (CuPy arrays, torch CUDA tensors, any array whose DLPack device is not the
CPU) are validated on their own device -- shape and dtype from their attributes,
finiteness and Gram traces as on-device reductions of which only a scalar per slice
comes back -- and are handed to the ``"cupy"`` backend unchanged, never copied to the
host. Host arrays are validated with NumPy exactly as before.
"""
from __future__ import annotations

import numbers

import numpy as np

from iif_ref._validation import as_float_array, check_nonnegative_real, check_positive_int
from iif_ref.kernels import _fisher
from iif_ref.kernels._fisher import solve_factored
from iif_ref.kernels import _kronecker
from iif_ref.kernels._kronecker import KroneckerLayout, LinearBlock
from iif_ref.kernels._philox import (COL_LIMIT, FACTOR_KINDS, KINDS, ROW_LIMIT, check_kind,
                                     check_seed)
from iif_ref.kernels._registry import get_backend

__all__ = ["DEFAULT_MEMORY_BUDGET", "PROJECTOR_KINDS", "LinearBlock", "Projector", "project",
           "projection_matrix",
           "projected_scores",
           "resolve_damping", "factor_fisher", "solve_factored", "is_device_array"]

#: Bytes of ``A`` that :func:`project` may hold at once by default (64 MiB).
DEFAULT_MEMORY_BUDGET = 64 * 2**20

_KERNEL_DTYPES = (np.float32, np.float64)
#: What a :class:`Projector` can be: a flat ``A`` (:data:`KINDS`) or the Kronecker-factored
#: projection of Linear layers (``"kronecker"``, which needs ``layers=``).
PROJECTOR_KINDS = KINDS + ("kronecker",)
#: Backends that accept device arrays (the backend protocol's "device backend").
_DEVICE_BACKENDS = ("cupy",)
_DLPACK_CPU = 1  # DLDeviceType kDLCPU


# --------------------------------------------------------------------------- device arrays
def is_device_array(value):
    """Whether ``value`` lives in accelerator memory (and must not go through NumPy).

    True for arrays with ``__cuda_array_interface__`` or whose ``__dlpack_device__`` is
    not the CPU (CuPy arrays, torch CUDA tensors); False for NumPy arrays, CPU tensors,
    lists and scalars.
    """
    if isinstance(value, np.ndarray):
        return False
    probe = getattr(value, "__dlpack_device__", None)
    if probe is not None:
        try:
            return int(probe()[0]) != _DLPACK_CPU
        except Exception:  # noqa: BLE001 -- an unusable probe: treat as a host array
            return False
    try:
        return getattr(value, "__cuda_array_interface__", None) is not None
    except Exception:  # noqa: BLE001 -- torch raises for CPU tensors
        return False


def _namespace(x, name):
    """The array library of device array ``x``: its ``__array_namespace__``, else the
    module it comes from (torch, cupy), each of which has ``sum(x, dtype=)``,
    ``isfinite``, ``all``, ``asarray(x, dtype=)`` and ``float64`` acting on the device."""
    root = type(x).__module__.split(".")[0]
    if root == "torch":
        import torch
        return torch
    if hasattr(x, "__array_namespace__"):
        return x.__array_namespace__()
    if root == "cupy":
        import cupy
        return cupy.get_array_module(x)
    raise TypeError(f"{name} is a device array of type {type(x).__name__} whose array "
                    f"library is unknown (it has no __array_namespace__); pass a CuPy "
                    f"array or a torch tensor")


def _device_all_finite(x, xp):
    # As _validation: a float64 sum is finite iff every entry is and the sum does not
    # overflow; only on overflow is the element-wise test (a device-sized mask) needed.
    if np.isfinite(float(xp.sum(x, dtype=xp.float64))):
        return True
    return bool(xp.all(xp.isfinite(x)))


def _device_float_array(x, name, *, ndim, backend):
    """Validate device array ``x`` without moving it; returns it unchanged.

    Raises ``TypeError`` unless ``backend`` accepts device arrays and the dtype is
    float32 or float64 (device data is not converted), ``ValueError`` for a wrong number
    of dimensions, an empty array or a NaN/Inf entry.
    """
    if backend not in _DEVICE_BACKENDS:
        raise TypeError(f"{name} is a device array ({type(x).__module__}."
                        f"{type(x).__name__}); pass backend=\"cupy\" to compute on its "
                        f"device, or copy it to the host first (backend {backend!r} runs "
                        f"on the host)")
    xp = _namespace(x, name)
    dtype = str(x.dtype).rsplit(".", 1)[-1]  # "float32", or "torch.float32"
    if dtype not in ("float32", "float64"):
        raise TypeError(f"{name} must be float32 or float64 (device arrays are not "
                        f"converted), got {x.dtype}")
    shape = tuple(int(d) for d in x.shape)
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if len(shape) not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimension(s), "
                         f"got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {shape})")
    if not _device_all_finite(x, xp):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf)")
    return x


def _kernel_array(value, name, *, ndim, backend):
    """A validated float32/float64 array: device arrays as they are (``backend`` must
    accept them), everything else through NumPy as :func:`as_float_array`."""
    if is_device_array(value):
        return _device_float_array(value, name, ndim=ndim, backend=backend)
    return as_float_array(value, name, ndim=ndim, allow_dtypes=_KERNEL_DTYPES)


def _traces(Phi):
    """``tr(Phi_b^T Phi_b)`` per slice (float64, host) of a validated (B, N, P) array."""
    if not is_device_array(Phi):
        return _fisher.slice_traces(Phi)
    xp = _namespace(Phi, "Phi")
    out = np.empty(Phi.shape[0])
    for b in range(Phi.shape[0]):  # one float64 slice at a time on the device
        slab = xp.asarray(Phi[b], dtype=xp.float64)
        out[b] = float(xp.sum(slab * slab))
    return out


def _resolve(Phi, B, P, damping):
    """Absolute damping (B,) for a checked ``damping``; the traces (device reductions for
    a device ``Phi``) are computed only when the rule needs them."""
    if damping is None or callable(damping):
        return _fisher.damping_from_traces(_traces(Phi), P, damping)
    return np.full(B, float(damping))


def _check_damping(damping):
    """None, a callable ``damping(trace, P)``, or a finite float >= 0."""
    if damping is None or callable(damping):
        return damping
    return check_nonnegative_real(damping, "damping")


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
                      rows=None, backend="numpy", layers=None):
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
    kind : {"rademacher", "gaussian", "countsketch", "kronecker", "kronecker_in", "kronecker_out"}
        Entries ``±1/√P`` (default) or ``N(0, 1)/√P``; ``"countsketch"``: one ``±1`` per
        row, in column ``h(m)``; ``"kronecker"``: the materialised Kronecker-factored
        projection of ``layers`` (the slow exact twin of :class:`Projector`'s);
        ``"kronecker_in"``/``"kronecker_out"``: the ``±1`` factor streams (docs/rng.md).
    dtype : {numpy.float64, numpy.float32}, optional
    rows : tuple (start, stop), optional
        Only rows ``start <= m < stop`` (``0 <= start < stop <= n_params``).
    backend : str, optional
        Which backend generates it (default the NumPy oracle).
    layers : sequence of LinearBlock, optional
        For ``kind="kronecker"`` only: the Linear layers in the flat parameter index.

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
    kind = check_kind(kind, PROJECTOR_KINDS + FACTOR_KINDS)
    dtype = _check_float_dtype(dtype)
    layout = _check_layers(kind, layers, n_params, proj_dim)
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
    generate = get_backend(backend).generate
    if layout is not None:
        return layout.matrix(generate, seed, dtype)[start:stop]
    return generate(seed, start, stop - start, proj_dim, kind, dtype)


def _check_layers(kind, layers, n_params, proj_dim):
    """The :class:`KroneckerLayout` for ``kind="kronecker"`` (``layers`` required), else
    None (``layers`` must then be None)."""
    if kind != "kronecker":
        if layers is not None:
            raise ValueError(f"layers= is only used by kind='kronecker', got kind={kind!r}")
        return None
    if layers is None:
        raise ValueError("kind='kronecker' needs layers=: the LinearBlock of every Linear "
                         "layer in the flat parameter index")
    try:
        layers = list(layers)
    except TypeError as exc:
        raise TypeError(f"layers must be a sequence of LinearBlock, got "
                        f"{type(layers).__name__}") from exc
    return KroneckerLayout(n_params, layers, proj_dim)


def project(G, proj_dim, *, seed=0, kind="rademacher", backend="numba",
            memory_budget=DEFAULT_MEMORY_BUDGET):
    """Project rows of ``G`` with the counter-based random matrix: ``Phi = G A``.

    Parameters
    ----------
    G : array_like, shape (n, n_params)
        Gradients (or any row vectors) to project; float32 or float64 are kept (other
        real dtypes become float64); C- or F-ordered. A single vector must be passed
        as ``G[None, :]``.
        With ``backend="cupy"``, ``G`` may be a CuPy array or a torch CUDA tensor
        (float32 or float64): it is validated on its device, never copied to the host,
        and ``Phi`` is returned as the same kind of array.
    proj_dim : int
        ``P``, ``1 <= P < 2**32``.
    seed : int, optional
        In ``[0, 2**64 - 1]``.
    kind : {"rademacher", "gaussian", "countsketch"}, optional
        ``"countsketch"`` costs ``O(n M)`` instead of ``O(n M P)`` (docs/rng.md).
    backend : str, optional
        ``"numba"`` (default), ``"numpy"`` (oracle) or ``"cupy"``; see
        :func:`available_backends`.
    memory_budget : int, optional
        Bytes of ``A`` that may exist at once (default 64 MiB). ``A`` is generated in
        blocks of ``memory_budget // (P * itemsize)`` rows; the output and ``G`` are not
        counted.

    Returns
    -------
    Phi : ndarray (or the device array kind of ``G``), shape (n, proj_dim), dtype of ``G``

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
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    device = is_device_array(G)
    shape = tuple(G.shape) if device else np.shape(G)
    if len(shape) == 1:
        raise ValueError(f"G must be 2-D (n, n_params), got a 1-D array of shape "
                         f"{shape}; pass a single vector as G[None, :]")
    G = _kernel_array(G, "G", ndim=2, backend=backend)
    if int(G.shape[1]) < 1:
        raise ValueError(f"G has no columns (shape {tuple(G.shape)}); n_params must be >= 1")
    proj_dim = _check_proj_dim(proj_dim)
    seed = check_seed(seed)
    kind = check_kind(kind)
    memory_budget = check_positive_int(memory_budget, "memory_budget")
    # Device dtypes (torch.float32, ...) are matched by name; validation allowed only two.
    itemsize = 4 if str(G.dtype).endswith("float32") else 8
    row_bytes = proj_dim * itemsize
    if memory_budget < row_bytes:
        raise ValueError(f"memory_budget={memory_budget} bytes cannot hold one row of A: "
                         f"proj_dim={proj_dim} entries of {G.dtype} need {row_bytes} bytes")
    chunk_rows = min(memory_budget // row_bytes, int(G.shape[1]))
    return get_backend(backend).project(G, proj_dim, seed=seed, kind=kind,
                                        chunk_rows=chunk_rows)


class Projector:
    """``G -> G A`` for one projection ``(n_params, P, seed, kind, dtype)``, called many times.

    ``kind`` picks the matrix: dense Rademacher (default) or Gaussian, the sparse
    CountSketch (one ``±1`` per row of ``A``, cost ``O(n M)``), or the Kronecker-factored
    projection of Linear layers (``layers=``; cost ``O(d_in p_in + d_out p_out)`` per
    sample and layer from the per-sample factors, :meth:`project_factors`); all are drawn
    from the Philox streams of docs/rng.md and identical on every backend.

    A dense ``A`` that fits ``memory_budget`` on a host backend is generated once, here,
    and every call is one GEMM with it; else each call streams ``A`` in row blocks through
    :func:`project`. The CountSketch holds its ``M`` buckets and signs, the Kronecker
    projection its factor matrices. Build one per attribution call and reuse it across
    training chunks, test rows and path steps.

    Parameters
    ----------
    n_params : int
        ``M``, rows of ``A``.
    proj_dim : int
        ``P``, ``1 <= P < 2**32``.
    seed : int, optional
    kind : {"rademacher", "gaussian", "countsketch", "kronecker"}, optional
    dtype : {numpy.float32, numpy.float64}, optional
        Dtype of ``A`` and of the ``G`` this projector takes whole; other inputs are
        streamed through :func:`project` in their own dtype.
    backend : str, optional
        As in :func:`project`; for ``"kronecker"`` the backend generates the factors.
    memory_budget : int, optional
        Bytes ``A`` may take (default 64 MiB); ``A`` is held whole only if
        ``n_params * P * itemsize`` fits, else ``project`` streams it with this budget.
    layers : sequence of LinearBlock, optional
        ``kind="kronecker"`` only: where each Linear layer's weight and bias sit in the
        flat parameter index; the other parameters are projected by a dense Rademacher
        block (docs/kernels.md, "Structured projections").

    Attributes
    ----------
    A : ndarray, shape (n_params, proj_dim), or None
        The dense matrix held (read-only), or None when it is streamed or structured.
    layout : KroneckerLayout or None
        The column blocks of a Kronecker projection.

    Notes
    -----
    ``A`` of Eq. (17), (31) exactly as :func:`projection_matrix` gives it (docs/rng.md);
    a call with ``A`` held is the same product as :func:`project` makes when its budget
    holds all of ``A`` (one block), so the two agree bit for bit.

    Examples
    --------
    >>> G = np.random.default_rng(0).standard_normal((5, 300))
    >>> proj = Projector(300, 16, seed=1, dtype=np.float64, backend="numpy")
    >>> bool(np.array_equal(proj(G), project(G, 16, seed=1, backend="numpy")))
    True
    >>> kron = Projector(300, 16, seed=1, kind="kronecker", dtype=np.float64,
    ...                  backend="numpy", layers=[LinearBlock(0, 20, 14, bias=280)])
    >>> A = projection_matrix(300, 16, seed=1, kind="kronecker",
    ...                       layers=[LinearBlock(0, 20, 14, bias=280)])
    >>> bool(np.allclose(kron(G), G @ A))
    True
    """

    def __init__(self, n_params, proj_dim, *, seed=0, kind="rademacher", dtype=np.float32,
                 backend="numba", memory_budget=DEFAULT_MEMORY_BUDGET, layers=None):
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        self.n_params = check_positive_int(n_params, "n_params")
        self.proj_dim = _check_proj_dim(proj_dim)
        self.seed, self.kind = check_seed(seed), check_kind(kind, PROJECTOR_KINDS)
        self.dtype = _check_float_dtype(dtype)
        self.backend = backend
        self.memory_budget = check_positive_int(memory_budget, "memory_budget")
        self.layout = _check_layers(self.kind, layers, self.n_params, self.proj_dim)
        self.A = None
        self.factor_pairs = self.rest_rows = None
        if self.layout is not None:
            self.factor_pairs, self.rest_rows = self.layout.factors(
                get_backend(backend).generate, self.seed, self.dtype)
            return
        whole = self.n_params * self.proj_dim * self.dtype.itemsize
        if kind == "rademacher" or kind == "gaussian":
            if backend not in _DEVICE_BACKENDS and whole <= self.memory_budget:
                self.A = projection_matrix(self.n_params, self.proj_dim, seed=self.seed,
                                           kind=self.kind, dtype=self.dtype, backend=backend)
                self.A.flags.writeable = False

    def __repr__(self):
        return (f"Projector(n_params={self.n_params}, proj_dim={self.proj_dim}, "
                f"seed={self.seed}, kind={self.kind!r}, dtype={self.dtype}, "
                f"backend={self.backend!r}, held={self.A is not None}"
                + ("" if self.layout is None else f", layout={self.layout!r}") + ")")

    def _checked(self, G):
        G = as_float_array(G, "G", ndim=2, allow_dtypes=_KERNEL_DTYPES)
        if G.shape[1] != self.n_params:
            raise ValueError(f"G must have n_params={self.n_params} columns, got shape "
                             f"{G.shape}")
        return G

    def __call__(self, G):
        """``Phi = G A`` for ``G`` of shape (n, n_params); as :func:`project`."""
        if self.layout is not None:
            if is_device_array(G):
                raise TypeError("the Kronecker projection runs on the host: G is a device "
                                "array")
            G = self._checked(G)
            out = np.zeros((G.shape[0], self.proj_dim), dtype=G.dtype)
            pairs, rest = self.factor_pairs, self.rest_rows
            if G.dtype != self.dtype:
                pairs = [(a.astype(G.dtype), b.astype(G.dtype)) for a, b in pairs]
                rest = None if rest is None else rest.astype(G.dtype)
            return self.layout.project_flat(G, pairs, rest, out)
        if self.A is None or is_device_array(G):
            return project(G, self.proj_dim, seed=self.seed, kind=self.kind,
                           backend=self.backend, memory_budget=self.memory_budget)
        G = self._checked(G)
        if G.dtype != self.dtype:
            return project(G, self.proj_dim, seed=self.seed, kind=self.kind,
                           backend=self.backend, memory_budget=self.memory_budget)
        out = np.empty((G.shape[0], self.proj_dim), dtype=G.dtype)
        return np.matmul(G, self.A, out=out)


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
    damping : float, None or callable, optional
        Absolute ``lam_d >= 0`` used for every slice, or None (default) for the
        relative default ``1e-3 * tr(Phi_b^T Phi_b) / P`` per slice, which bounds
        ``cond(F_b) <= 1 + 1000 P`` and scales with the data (docs/kernels.md), or
        ``damping(trace, P) -> lam_d`` per slice (see :func:`resolve_damping`).
    backend : str, optional
        ``"numba"`` (default), ``"numpy"`` or ``"cupy"``. With ``"cupy"`` the inputs may
        be CuPy arrays or torch CUDA tensors; they are validated on their device and
        never copied to the host, and the result is of the same kind as ``Phi``.
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
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    arrays = {}
    for name, value in (("Phi", Phi), ("Psi", Psi), ("Gamma", Gamma)):
        arrays[name] = _kernel_array(value, name, ndim=(2, 3), backend=backend)
    shapes = {k: tuple(int(d) for d in v.shape) for k, v in arrays.items()}
    if len({len(sh) for sh in shapes.values()}) != 1:
        raise ValueError("Phi, Psi and Gamma must all be 2-D or all be 3-D, got shapes "
                         + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    if len(shapes["Phi"]) == 2:
        arrays = {k: v[None, ...] for k, v in arrays.items()}
        shapes = {k: (1,) + v for k, v in shapes.items()}
    Phi, Psi, Gamma = arrays["Phi"], arrays["Psi"], arrays["Gamma"]
    for name, shape in shapes.items():
        if 0 in shape:
            raise ValueError(f"{name} is empty (shape {shape})")
    sPhi, sPsi, sGamma = shapes["Phi"], shapes["Psi"], shapes["Gamma"]
    if not (sPhi[0] == sPsi[0] == sGamma[0]):
        raise ValueError(f"Phi, Psi and Gamma must have the same batch size B, got shapes "
                         f"{sPhi}, {sPsi}, {sGamma}")
    if not (sPhi[2] == sPsi[2] == sGamma[2]):
        raise ValueError(f"Phi, Psi and Gamma must have the same proj_dim P (last axis), "
                         f"got shapes {sPhi}, {sPsi}, {sGamma}")
    if sPhi[1] != sPsi[1]:
        raise ValueError(f"Phi and Psi must have the same number of samples N, got shapes "
                         f"{sPhi} and {sPsi}")
    if not isinstance(reduce, (bool, np.bool_)):
        raise TypeError(f"reduce must be a bool, got {type(reduce).__name__}")
    lam = _resolve(Phi, sPhi[0], sPhi[2], _check_damping(damping))
    return get_backend(backend).projected_scores(Phi, Psi, Gamma, damping=lam,
                                                 reduce=bool(reduce))


def resolve_damping(Phi, damping=None, *, backend="numpy"):
    """The absolute damping ``lam_b`` of every slice that :func:`projected_scores` and
    :func:`factor_fisher` use for ``damping``.

    Parameters
    ----------
    Phi : array_like, shape (B, N, P) or (N, P)
        Projected per-sample gradients; a device array needs ``backend="cupy"`` (the
        traces are then reduced on its device).
    damping : None, float or callable, optional
        None (default): the relative default
        ``RELATIVE_DAMPING * tr(Phi_b^T Phi_b) / P`` per slice; a float ``>= 0``: that
        absolute value for every slice; a callable ``damping(trace, P) -> lam``: called
        with each slice's ``tr(Phi_b^T Phi_b)`` (its results must be finite and >= 0).
    backend : str, optional
        Only decides whether device arrays are accepted (``"cupy"``).

    Returns
    -------
    lam : ndarray, shape (B,), float64 (``B = 1`` for 2-D ``Phi``)

    Notes
    -----
    The damping of the Fisher of Eq. (31); the relative default bounds
    ``cond(F_b) <= 1 + P / RELATIVE_DAMPING`` (docs/kernels.md).

    Examples
    --------
    >>> Phi = np.ones((2, 4, 3))
    >>> resolve_damping(Phi)             # 1e-3 * tr / P = 1e-3 * 12 / 3
    array([0.004, 0.004])
    >>> resolve_damping(Phi, 0.5).tolist()
    [0.5, 0.5]
    """
    Phi = _kernel_array(Phi, "Phi", ndim=(2, 3), backend=backend)
    if len(Phi.shape) == 2:
        Phi = Phi[None, ...]
    return _resolve(Phi, int(Phi.shape[0]), int(Phi.shape[2]), _check_damping(damping))


def factor_fisher(Phi=None, *, gram=None, damping=None):
    """Factor the damped projected Fishers ``F_b = Phi_b^T Phi_b + lam_b I`` once.

    Exactly one of ``Phi`` and ``gram`` is given.

    Parameters
    ----------
    Phi : array_like, shape (B, N, P) or (N, P), optional
        Projected per-sample gradients; float32 or float64 (other real dtypes become
        float64), promoted to float64 before the Gram product.
    gram : array_like, shape (B, P, P) or (P, P), optional
        Undamped Grams ``Phi_b^T Phi_b`` already accumulated (e.g. by a distributed
        reduction); float64, symmetric to within ``1e-8 tr(gram_b)``.
    damping : None, float or callable, optional
        As in :func:`resolve_damping`; for ``gram`` the trace is ``tr(gram_b)``, the same
        number as ``tr(Phi_b^T Phi_b)``.

    Returns
    -------
    FisherFactor
        ``len(factor) == B``; ``factor.damping`` the absolute ``lam_b``; apply
        ``F_b^{-1}`` with ``factor.solve(rhs)`` (:func:`solve_factored`).

    Raises
    ------
    iif_ref.errors.NotPositiveDefiniteError
        Some ``F_b`` is not positive definite to float64 working precision (LAPACK
        ``potrf`` fails or the ``pocon`` reciprocal condition estimate is below
        ``n eps64``); ``slices`` names every failing ``b`` and ``suggested_damping`` a
        damping that fixes them. Never returns a factor that would give NaN.

    Notes
    -----
    The Fisher of Eq. (31) in the projected space of Eq. (17), factored exactly as
    :func:`projected_scores` factors it (the same code): from ``Phi`` with ``N < P`` the
    ``N x N`` push-through kernel ``Phi_b Phi_b^T + lam_b I`` is factored instead, which
    needs ``lam_b > 0``. Only host (NumPy) input is accepted.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> Phi, Psi, Gamma = rng.standard_normal((2, 30, 5)), rng.standard_normal((2, 30, 5)), rng.standard_normal((2, 3, 5))
    >>> W = factor_fisher(Phi, damping=0.1).solve(Gamma.transpose(0, 2, 1))   # (2, 5, 3)
    >>> S = -np.einsum("bpt,bnp->tn", W, Psi)
    >>> bool(np.allclose(S, projected_scores(Phi, Psi, Gamma, damping=0.1, backend="numpy")))
    True
    """
    if (Phi is None) == (gram is None):
        raise TypeError("factor_fisher needs exactly one of Phi and gram=")
    damping = _check_damping(damping)
    if gram is None:
        if is_device_array(Phi):
            raise TypeError("factor_fisher runs on the host: Phi is a device array; use "
                            "projected_scores(..., backend=\"cupy\") or copy Phi to the "
                            "host")
        Phi = as_float_array(Phi, "Phi", ndim=(2, 3), allow_dtypes=_KERNEL_DTYPES)
        if Phi.ndim == 2:
            Phi = Phi[None]
        if 0 in Phi.shape:
            raise ValueError(f"Phi is empty (shape {Phi.shape})")
        lam = _fisher.damping_from_traces(_fisher.slice_traces(Phi), Phi.shape[2], damping)
        return _fisher.factor_stack(damping=lam, Phi=Phi)
    if is_device_array(gram):
        raise TypeError("factor_fisher runs on the host: gram is a device array")
    gram = as_float_array(gram, "gram", ndim=(2, 3))
    if gram.ndim == 2:
        gram = gram[None]
    if 0 in gram.shape:
        raise ValueError(f"gram is empty (shape {gram.shape})")
    if gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must hold square (P, P) matrices, got shape {gram.shape}")
    traces = np.trace(gram, axis1=1, axis2=2)
    # A Gram's rounding asymmetry is <= N eps64 tr (each entry is a length-N float64
    # sum of products bounded by the diagonal), far below 1e-8 tr for any N < 4e7;
    # more than that means the input is not a Gram.
    asym = np.max(np.abs(gram - gram.transpose(0, 2, 1)), axis=(1, 2))
    bad = np.flatnonzero(asym > 1e-8 * np.abs(traces))
    if bad.size:
        raise ValueError(f"gram must be symmetric: slice(s) {bad[:10].tolist()} differ from "
                         f"their transpose by up to {float(np.max(asym[bad])):.3g}")
    lam = _fisher.damping_from_traces(traces, gram.shape[1], damping)
    return _fisher.factor_stack(damping=lam, gram=gram)
