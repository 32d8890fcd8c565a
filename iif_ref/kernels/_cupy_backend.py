"""CuPy backend: the CUDA kernels of ``kernels/*.cu``, compiled at run time by NVRTC.

Implements the backend protocol of :mod:`iif_ref.kernels._registry` on one CUDA device:

* ``generate`` and ``project`` run ``kernels/projection.cu``: ``A`` is regenerated tile by
  tile in shared memory from ``(seed, m, p)`` and never stored; the CountSketch
  projection runs ``kernels/countsketch.cu`` (one thread per row, ``O(M)`` each);
* ``projected_scores`` forms every ``F_b = Phi_b^T Phi_b + damping_b I`` in float64 with
  ``kernels/gram.cu``, certifies each slice positive definite with cuSOLVER's batched
  Cholesky (``cusolverDnDpotrfBatched``, one ``info`` per slice), and solves with that
  factor by batched triangular solves (``cupyx.scipy.linalg.solve_triangular``, cuBLAS
  ``trsmBatched``).

Inputs may be NumPy arrays (copied to the device; results come back as NumPy), CuPy arrays
(results stay CuPy) or any CUDA array with ``__dlpack__`` such as a torch CUDA tensor
(taken zero-copy through ``cupy.from_dlpack``; ``project`` returns a torch tensor then).

Sources are read from :data:`KERNEL_DIR` (the installed package's ``_kernels/``), their
local ``#include``\\ s expanded in place (so CuPy's on-disk cache key covers the headers
too), and compiled once per process and device with :data:`NVRTC_OPTIONS`.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from iif_ref import _resources
from iif_ref.kernels import _fisher
from iif_ref.kernels._philox import STREAMS

NAME = "cupy"

#: Directory of the CUDA sources: ``$IIF_REF_KERNEL_DIR``, else the ``kernels/`` of the source
#: checkout the package runs from, else the installed package's ``_kernels/``
#: (:mod:`iif_ref._resources`).
KERNEL_DIR = (Path(os.environ[_resources.KERNEL_DIR_ENV])
              if os.environ.get(_resources.KERNEL_DIR_ENV)
              else _resources.find("_kernels", "", checkout_dir="kernels", checkout_first=True))
#: Options every source is compiled with (NVRTC has no standard library: philox.cuh brings
#: its own fixed-width typedefs under ``__CUDACC_RTC__``).
NVRTC_OPTIONS = ("-std=c++17",)
#: Kernel entry points of each source, looked up by their ``extern "C"`` names.
KERNELS = {
    "projection.cu": ("iif_project_f32", "iif_project_f64", "iif_generate_f32",
                      "iif_generate_f64"),
    "gram.cu": ("iif_gram_f32", "iif_gram_f64"),
    "countsketch.cu": ("iif_countsketch_f32", "iif_countsketch_f64"),
}
#: ``kind`` codes of ``kernels/philox.cuh`` (each kind's Philox stream word).
KIND_CODES = dict(STREAMS)

_THREADS = 256          # the kernels require blockDim = (256, 1, 1)
_TILE = 64              # output tile edge of the projection and Gram kernels
_GRID_Y_MAX = 65535     # CUDA's limit on gridDim.y and gridDim.z
_GENERATE_BLOCKS = 4096  # grid of the grid-stride generate kernel (result independent of it)
#: Bytes of float64 workspace per stacked solve chunk (F, its factor, the right-hand sides).
SOLVE_WORKSPACE_BYTES = 2 * 2**30
_EPS64 = np.finfo(np.float64).eps
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def available():
    """``(True, "")`` when CuPy imports and sees a CUDA device, else ``(False, reason)``."""
    try:
        import cupy
    except ImportError as exc:
        return False, f"cupy is not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 -- a broken CUDA install: report why
        return False, f"cupy failed to import: {type(exc).__name__}: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 -- CUDARuntimeError, missing driver, ...
        return False, f"no CUDA device visible to cupy ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "no CUDA device visible to cupy"
    missing = [name for name in KERNELS if not (KERNEL_DIR / name).is_file()]
    if missing:
        return False, f"CUDA sources {', '.join(missing)} not found in {KERNEL_DIR}"
    return True, ""


def kernel_source(name, _seen=None):
    """Text of ``kernels/<name>`` with its local ``#include "..."`` lines expanded in place.

    Each header is inserted once (they also carry include guards). Used both here and by
    the NVRTC compile test, so the text the test compiles is the text the backend runs.
    """
    seen = set() if _seen is None else _seen
    path = (KERNEL_DIR / name).resolve()
    if path in seen:
        return ""
    seen.add(path)
    text = path.read_text()

    def expand(match):
        return kernel_source(str(path.parent.joinpath(match.group(1))
                                 .relative_to(KERNEL_DIR)), seen)

    return _INCLUDE.sub(expand, text)


@functools.lru_cache(maxsize=None)
def _module(name, device_id):
    import cupy
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=kernel_source(name), options=NVRTC_OPTIONS,
                              backend="nvrtc")


def _kernel(source, entry):
    import cupy
    return _module(source, cupy.cuda.Device().id).get_function(entry)


# --------------------------------------------------------------------------- launches
# One definition of each launch configuration, used by this backend and by the CPU emulation
# of the kernels in the tests (iif_ref.kernels._host.emulate_*). The kernels' results do not
# depend on these choices; the functions only say how much grid covers the output.

def projection_launch(n, proj_dim):
    """``(grid, block)`` of ``iif_project_*`` for ``n <= 65535 * 64`` rows."""
    return (-(-proj_dim // _TILE), -(-n // _TILE), 1), (_THREADS, 1, 1)


def generate_launch(n_rows, proj_dim):
    """``(grid, block)`` of the grid-stride ``iif_generate_*``."""
    total = n_rows * proj_dim
    return (max(1, min(_GENERATE_BLOCKS, -(-total // _THREADS))), 1, 1), (_THREADS, 1, 1)


def countsketch_launch(n):
    """``(grid, block)`` of the one-thread-per-row ``iif_countsketch_*`` (grid-stride)."""
    return (max(1, min(_GENERATE_BLOCKS, -(-n // _THREADS))), 1, 1), (_THREADS, 1, 1)


def gram_launch(B, P):
    """``(grid, block)`` of ``iif_gram_*`` (slices beyond 65535 loop inside the kernel)."""
    tiles = -(-P // _TILE)
    return (tiles, tiles, min(B, _GRID_Y_MAX)), (_THREADS, 1, 1)


# --------------------------------------------------------------------------- arrays

def _as_device(x, name):
    """``(cupy array, origin)`` with origin ``"numpy"``, ``"cupy"`` or ``"torch"``."""
    import cupy
    if isinstance(x, cupy.ndarray):
        return x, "cupy"
    if isinstance(x, np.ndarray):
        return cupy.asarray(x), "numpy"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        device_type = int(x.__dlpack_device__()[0])
        if device_type in (2, 13):  # kDLCUDA, kDLCUDAManaged: device memory, zero-copy
            origin = "torch" if type(x).__module__.split(".")[0] == "torch" else "cupy"
            return cupy.from_dlpack(x), origin
        return cupy.asarray(np.asarray(x)), "numpy"
    raise TypeError(f"{name} must be a NumPy, CuPy or CUDA DLPack array, "
                    f"got {type(x).__name__}")


def _to_origin(y, origin):
    import cupy
    if origin == "numpy":
        return cupy.asnumpy(y)
    if origin == "torch":
        import torch
        return torch.from_dlpack(y)
    return y


def _float_kernel_dtype(arr, name):
    if arr.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{name} must be float32 or float64, got {arr.dtype}")
    return arr.dtype


def _suffix(dtype):
    return "f32" if dtype == np.float32 else "f64"


# --------------------------------------------------------------------------- protocol

def generate(seed, row_start, n_rows, proj_dim, kind, dtype):
    """Block ``A[row_start : row_start + n_rows, :proj_dim]`` as a host array (protocol).

    Implements ``A`` of Eq. (17) as specified in ``docs/rng.md`` (``kernels/philox.cuh``).
    """
    import cupy
    dtype = np.dtype(dtype)
    out = cupy.empty((n_rows, proj_dim), dtype=dtype)
    grid, block = generate_launch(n_rows, proj_dim)
    _kernel("projection.cu", f"iif_generate_{_suffix(dtype)}")(
        grid, block,
        (np.uint64(seed), np.uint64(row_start), np.int64(n_rows), np.int64(proj_dim),
         np.int32(KIND_CODES[kind]), out))
    return cupy.asnumpy(out)


def project(G, proj_dim, *, seed, kind, chunk_rows, m_offset=0):
    """``Phi = G A`` on the device, ``A`` regenerated per tile and never stored (protocol).

    Parameters
    ----------
    G : ndarray, cupy.ndarray or CUDA DLPack tensor, shape (n, M), float32 or float64
    proj_dim : int
    seed : int
    kind : {"rademacher", "gaussian", "countsketch"}
    chunk_rows : int
        Part of the protocol (rows of ``A`` allowed at once); the kernel holds only
        16 x 64 tiles of ``A`` per block, so it never needs more and ignores it.
    m_offset : int, optional
        Column ``m`` of ``G`` multiplies row ``m_offset + m`` of ``A``.

    Returns
    -------
    Phi : shape (n, proj_dim), dtype of ``G``; NumPy for NumPy input, CuPy for CuPy input,
        torch for torch CUDA input.

    Notes
    -----
    Implements ``Phi = U A`` (Eq. 31, Eq. 17) in the order of ``kernels/projection.cuh``:
    fma chains over 16 consecutive ``m`` in ``G``'s dtype, tiles summed in float64, so for
    float32 the error is at most ``(16 u32 + (M/16 + 1) u64) sum|G||A| + u32 |Phi|``.
    Rows of ``G`` are processed in slabs of at most 65535 * 64 rows (the grid limit);
    each output row is computed independently, so the slabs do not change the result.
    """
    import cupy
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    Gd, origin = _as_device(G, "G")
    dtype = _float_kernel_dtype(Gd, "G")
    if Gd.ndim != 2:
        raise ValueError(f"G must be 2-D (n, n_params), got shape {Gd.shape}")
    Gd = cupy.ascontiguousarray(Gd)
    n, M = Gd.shape
    out = cupy.empty((n, proj_dim), dtype=dtype)
    if kind == "countsketch":   # O(n M), one thread per row (kernels/countsketch.cu)
        grid, block = countsketch_launch(n)
        _kernel("countsketch.cu", f"iif_countsketch_{_suffix(dtype)}")(
            grid, block, (Gd, np.int64(n), np.int64(M), np.int64(M), np.uint64(seed),
                          np.uint64(m_offset), np.int64(proj_dim), out, np.int64(proj_dim)))
        return _to_origin(out, origin)
    kernel = _kernel("projection.cu", f"iif_project_{_suffix(dtype)}")
    slab = _GRID_Y_MAX * _TILE
    for r0 in range(0, n, slab):
        r1 = min(n, r0 + slab)
        grid, block = projection_launch(r1 - r0, proj_dim)
        kernel(grid, block,
               (Gd[r0:r1], np.int64(r1 - r0), np.int64(M), np.int64(M), np.uint64(seed),
                np.uint64(m_offset), np.int64(proj_dim), np.int32(KIND_CODES[kind]),
                out[r0:r1], np.int64(proj_dim)))
    return _to_origin(out, origin)


def gram(Phi, damping):
    """Stacked ``F_b = Phi_b^T Phi_b + damping_b I`` in float64 on the device.

    Parameters
    ----------
    Phi : cupy.ndarray, shape (B, N, P), float32 or float64, C-contiguous
    damping : cupy.ndarray, shape (B,), float64

    Returns
    -------
    F : cupy.ndarray, shape (B, P, P), float64, exactly symmetric

    Notes
    -----
    Implements the projected Fisher of Eq. (31) in the order of ``kernels/gram.cuh``
    (float64 fma chain over samples): ``|dF_ij| <= N u64 sqrt(F_ii F_jj)``.
    """
    import cupy
    B, N, P = Phi.shape
    F = cupy.empty((B, P, P), dtype=np.float64)
    grid, block = gram_launch(B, P)
    _kernel("gram.cu", f"iif_gram_{_suffix(Phi.dtype)}")(
        grid, block,
        (Phi, np.int64(B), np.int64(N), np.int64(P), np.int64(N * P), np.int64(P),
         damping, F))
    return F


def _cholesky(F):
    """cuSOLVER batched Cholesky of a copy of ``F`` (B, P, P): ``(info, L)``.

    ``info[b] != 0`` when the factorisation of slice ``b`` met a non-positive pivot; the
    lower triangle of ``L[b]`` (row-major) then holds the factor, ``F_b = L_b L_b^T``; its
    strict upper triangle still holds ``F``'s entries and is never read.
    """
    import cupy
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas, cusolver
    B, P, _ = F.shape
    L = F.copy()  # potrf works in place
    ptrs = (cupy.arange(B, dtype=np.uint64) * np.uint64(P * P * 8)
            + np.uint64(L.data.ptr))
    info = cupy.zeros(B, dtype=np.int32)
    # F is symmetric, so its row-major storage is also its column-major storage; the
    # column-major upper factor U (F = U^T U) read row-major is the lower L = U^T.
    cusolver.dpotrfBatched(device.get_cusolver_handle(), cublas.CUBLAS_FILL_MODE_UPPER, P,
                           ptrs.data.ptr, P, info.data.ptr, B)
    return info, L


def _failing_slices(info, L, n_samples, damping_host):
    """Indices (into the chunk) of slices that are not numerically positive definite.

    A slice fails when cuSOLVER's Cholesky reports a non-positive pivot, when
    ``(min_k L_kk / max_k L_kk)^2 < P eps`` -- that ratio is an upper bound on the 2-norm
    ``1/cond(F)``, the GPU's stand-in for the NumPy oracle's LAPACK ``pocon`` test
    ``rcond_1 >= P eps``, which has no batched form; slices whose reciprocal condition is
    within a factor of about ``P`` of that threshold may be classified differently -- or,
    as in the oracle, when ``N < P`` and the damping is 0 (``F`` then has rank ``N``).
    """
    import cupy
    P = L.shape[1]
    d = cupy.asnumpy(cupy.diagonal(L, axis1=1, axis2=2))
    info = cupy.asnumpy(info)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.min(d, axis=1) / np.max(d, axis=1)
        ok = (info == 0) & np.all(np.isfinite(d), axis=1) & (ratio * ratio >= P * _EPS64)
    if n_samples < P:
        ok &= damping_host > 0.0
    return np.flatnonzero(~ok)


def projected_scores(Phi, Psi, Gamma, *, damping, reduce):
    """``-sum_b Gamma_b F_b^{-1} Psi_b^T`` with float64 Gram and batched solves (protocol).

    Parameters
    ----------
    Phi, Psi : shape (B, N, P); Gamma : shape (B, T, P)
        NumPy, CuPy or CUDA DLPack arrays, float32 or float64.
    damping : ndarray, shape (B,), float64
        Absolute damping of each slice.
    reduce : bool

    Returns
    -------
    float64, shape (T, N) if ``reduce`` else (B, T, N); of the same kind as ``Phi``
    (NumPy, CuPy or torch).

    Raises
    ------
    iif_ref.errors.NotPositiveDefiniteError
        Naming every failing slice and a damping that fixes it; never NaN.

    Notes
    -----
    Implements the update of Algorithm 1 with Eq. (17) and (31). The slices are processed
    in chunks whose float64 workspace stays under :data:`SOLVE_WORKSPACE_BYTES`. One
    Cholesky factor per slice both certifies it and serves the solves; each chunk is
    certified (all chunks are, so the error names every failing slice) before its
    solves. The per-slice terms are summed over ``b`` in ascending order of chunks.
    """
    import cupy
    from cupyx.scipy.linalg import solve_triangular
    Phi_d, origin = _as_device(Phi, "Phi")
    Psi_d, _ = _as_device(Psi, "Psi")
    Gamma_d, _ = _as_device(Gamma, "Gamma")
    for name, arr in (("Phi", Phi_d), ("Psi", Psi_d), ("Gamma", Gamma_d)):
        _float_kernel_dtype(arr, name)
    Phi_d = cupy.ascontiguousarray(Phi_d)
    B, N, P = Phi_d.shape
    T = Gamma_d.shape[1]
    damping_host = np.ascontiguousarray(np.asarray(damping, dtype=np.float64).reshape(B))
    damping_d = cupy.asarray(damping_host)

    per_slice_bytes = 8 * (2 * P * P + P * T + T * N)
    chunk = max(1, min(B, SOLVE_WORKSPACE_BYTES // per_slice_bytes))
    out = cupy.zeros((T, N)) if reduce else cupy.empty((B, T, N))
    failed = []
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        info, L = _cholesky(gram(Phi_d[b0:b1], damping_d[b0:b1]))
        bad = _failing_slices(info, L, N, damping_host[b0:b1])
        if bad.size:
            failed.extend(int(b0 + b) for b in bad)
        if failed:
            continue  # keep certifying so that the error names every failing slice
        # X = F^{-1} Gamma^T = L^{-T} (L^{-1} Gamma^T): two batched triangular solves
        # (cuBLAS trsmBatched) against the T test columns, then one batched product with Psi.
        rhs = Gamma_d[b0:b1].astype(np.float64).transpose(0, 2, 1)        # (b, P, T)
        X = solve_triangular(L, rhs, lower=True)
        X = solve_triangular(L, X, trans="T", lower=True, overwrite_b=True)
        terms = -cupy.matmul(X.transpose(0, 2, 1),
                             Psi_d[b0:b1].astype(np.float64).transpose(0, 2, 1))  # (b, T, N)
        if reduce:
            out += terms.sum(axis=0)
        else:
            out[b0:b1] = terms
    if failed:
        failed_arr = np.asarray(failed)
        # The oracle's suggestion (relative default of the failing slices) from their Phi.
        suggestion = _fisher.suggest_damping(cupy.asnumpy(Phi_d[cupy.asarray(failed_arr)]),
                                             damping_host[failed_arr],
                                             np.arange(failed_arr.size))
        detail = ""
        if N < P:
            detail = ("With N < P the Gram Phi_b^T Phi_b has rank <= N < P, so damping "
                      "must be > 0.")
        raise _fisher.not_positive_definite_error(failed, damping_host, suggestion, detail)
    if not bool(cupy.all(cupy.isfinite(out))):
        raise FloatingPointError("projected_scores produced non-finite values although "
                                 "every slice was certified positive definite")
    return _to_origin(out, origin)
