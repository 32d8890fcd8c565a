"""ctypes bindings of the C++ host library built from the CUDA headers in ``kernels/``.

``libiif_host.so`` is compiled by CMake (``cmake -S . -B build && cmake --build build``)
from ``kernels/host/iif_host.cpp``, which includes the very ``__host__ __device__``
functions the CUDA kernels use (``philox.cuh``, ``projection.cuh``, ``gram.cuh``). It is a
cross-check, not a backend: it evaluates the kernels' arithmetic in the kernels' order on
the CPU, so that

* its ``A`` can be compared with the NumPy oracle's on every CI run (the sign pattern bit
  for bit, Gaussian entries to a few ulp), and
* a GPU run can compare the CUDA results with it bit for bit (Rademacher projection and
  Gram), which separates "the kernel's arithmetic is wrong" from "the kernel's tiling is
  wrong".

The library is found at ``$IIF_REF_HOST_LIB`` if set, else in the installed package
(``iif_ref/_lib/``, put there by ``pip install .``), else, in a source checkout, in the
developer build ``build/`` (see :mod:`iif_ref._resources`).

Beside it, ``libiif_cuda_emulation.so`` runs the CUDA kernels themselves, compiled unchanged
for the CPU with one OS thread per CUDA thread (``kernels/host/cuda_emulation.h``); the
``emulate_*`` functions launch them with the CuPy backend's grid (or any other), so the
kernels' tiling, indexing and boundary guards are tested on machines without a GPU.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np

from iif_ref import _resources
from iif_ref._validation import as_float_array, check_nonnegative_real, check_positive_int
from iif_ref.kernels._philox import (COL_LIMIT, FACTOR_KINDS, KINDS, ROW_LIMIT, STREAMS,
                                     check_kind, check_seed)

__all__ = ["ENV_VAR", "KIND_CODES", "HostLibraryError", "library_path", "load", "available",
           "philox4x32_10", "generate_block", "project", "countsketch", "gram",
           "emulation_library_path", "load_emulation", "emulate_generate", "emulate_project",
           "emulate_countsketch", "emulate_gram"]

#: Environment variable naming the library file explicitly.
ENV_VAR = "IIF_REF_HOST_LIB"
#: The ``kind`` codes of ``kernels/philox.cuh`` (IIF_KIND_*): each kind's Philox stream word.
KIND_CODES = dict(STREAMS)
_GENERATE_KINDS = KINDS + FACTOR_KINDS
_ABI_VERSION = 2
_SUFFIX = ".dylib" if sys.platform == "darwin" else ".so"
_LIB_NAME = "libiif_host" + _SUFFIX
_EMULATION_LIB_NAME = "libiif_cuda_emulation" + _SUFFIX
_EINVAL = -22

_lib = None
_emulation_lib = None


class HostLibraryError(OSError):
    """The host library is missing, cannot be loaded, or has another ABI version."""


def library_path():
    """Where the host library is: ``$IIF_REF_HOST_LIB``, else the package's ``_lib/``.

    In a source checkout without an installed build, the developer build ``build/`` is used.

    Returns
    -------
    pathlib.Path
        The file to load; where it should be when it is missing.
    """
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else _resources.find("_lib", _LIB_NAME, checkout_dir="build")


def _how_to_build():
    root = _resources.source_checkout()
    if root is None:
        return ("reinstall the package: `pip install .` from a source checkout runs "
                "`cmake --build` and puts the library into the package")
    return (f"build it with `cmake -S {root} -B {root / 'build'} && "
            f"cmake --build {root / 'build'}` or `pip install .`")


def _declare(lib):
    u32p = ctypes.POINTER(ctypes.c_uint32)
    dp = ctypes.c_void_p  # array data pointers, passed as addresses
    i64, u64, c_int = ctypes.c_int64, ctypes.c_uint64, ctypes.c_int
    signatures = {
        "iif_host_abi_version": (c_int, []),
        "iif_philox4x32_10": (None, [u32p, u32p, u32p]),
        "iif_generate_block": (c_int, [u64, u64, i64, i64, c_int, dp]),
        "iif_generate_block_f32": (c_int, [u64, u64, i64, i64, c_int, dp]),
        "iif_project_f64": (c_int, [dp, i64, i64, u64, u64, i64, c_int, dp]),
        "iif_project_f32": (c_int, [dp, i64, i64, u64, u64, i64, c_int, dp]),
        "iif_countsketch_f64": (c_int, [dp, i64, i64, u64, u64, i64, dp]),
        "iif_countsketch_f32": (c_int, [dp, i64, i64, u64, u64, i64, dp]),
        "iif_gram_f64": (c_int, [dp, i64, i64, i64, ctypes.c_double, dp]),
        "iif_gram_f32": (c_int, [dp, i64, i64, i64, ctypes.c_double, dp]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def load():
    """Load (once) and return the host library.

    Raises
    ------
    HostLibraryError
        The file does not exist (the message says how to build it), cannot be loaded,
        or was built from another version of ``kernels/host/iif_host.cpp``.
    """
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    if not path.is_file():
        how = (f"set {ENV_VAR} to its path" if os.environ.get(ENV_VAR) is None
               else f"{ENV_VAR} points to a missing file")
        raise HostLibraryError(f"host library not found at {path}; {_how_to_build()}, or {how}")
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as exc:
        raise HostLibraryError(f"cannot load host library {path}: {exc}") from exc
    version = lib.iif_host_abi_version()
    if version != _ABI_VERSION:
        raise HostLibraryError(f"host library {path} has ABI version {version}, expected "
                               f"{_ABI_VERSION}; rebuild it with cmake")
    _lib = lib
    return lib


def available():
    """``(True, "")`` when the host library loads, else ``(False, reason)``."""
    try:
        load()
    except HostLibraryError as exc:
        return False, str(exc)
    return True, ""


def _check(code, what):
    if code == _EINVAL:  # the Python side validates first, so this is a bug, not user error
        raise RuntimeError(f"host library rejected the arguments of {what}")
    if code != 0:
        raise RuntimeError(f"host library {what} returned {code}")


def _check_words(value, name, count):
    try:
        words = [int(w) for w in value]
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of {count} integers") from exc
    if len(words) != count or not all(0 <= w < 2**32 for w in words):
        raise ValueError(f"{name} must hold {count} integers in [0, 2**32), got {value!r}")
    return (ctypes.c_uint32 * count)(*words)


def philox4x32_10(counter, key):
    """One Philox4x32-10 block, computed by the C++ code the CUDA kernels use.

    Parameters
    ----------
    counter : sequence of 4 int in [0, 2**32)
    key : sequence of 2 int in [0, 2**32)

    Returns
    -------
    tuple of 4 int
    """
    ctr = _check_words(counter, "counter", 4)
    k = _check_words(key, "key", 2)
    out = (ctypes.c_uint32 * 4)()
    load().iif_philox4x32_10(ctr, k, out)
    return tuple(int(w) for w in out)


def _check_dtype(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _check_proj_dim(proj_dim):
    proj_dim = check_positive_int(proj_dim, "proj_dim")
    if proj_dim >= COL_LIMIT:
        raise ValueError(f"proj_dim must be < 2**32 (docs/rng.md), got {proj_dim}")
    return proj_dim


def _check_row_range(row_start, n_rows, start_name, count_name):
    if isinstance(row_start, bool) or not isinstance(row_start, (int, np.integer)):
        raise TypeError(f"{start_name} must be an integer, got {type(row_start).__name__}")
    n_rows = check_positive_int(n_rows, count_name)
    row_start = int(row_start)
    if row_start < 0 or row_start + n_rows > ROW_LIMIT:
        raise ValueError(f"rows {start_name} .. {start_name} + {count_name} must lie in "
                         f"[0, 2**64), got {start_name}={row_start}, {count_name}={n_rows}")
    return row_start, n_rows


def generate_block(seed, row_start, n_rows, proj_dim, *, kind="rademacher",
                   dtype=np.float64):
    """Rows ``row_start .. row_start + n_rows - 1`` of ``A``, from the C++ entry function.

    Parameters
    ----------
    seed : int in [0, 2**64)
    row_start : int
        First row ``m``; ``row_start + n_rows <= 2**64``.
    n_rows : int >= 1
    proj_dim : int, 1 <= proj_dim < 2**32
    kind : {"rademacher", "gaussian", "countsketch", "kronecker_in", "kronecker_out"}
    dtype : {numpy.float64, numpy.float32}

    Returns
    -------
    ndarray, shape (n_rows, proj_dim)

    Notes
    -----
    Implements ``A`` of Eq. (17) as specified in ``docs/rng.md`` through
    ``kernels/philox.cuh``; each entry is formed in float64 and rounded once to ``dtype``.
    """
    seed = check_seed(seed)
    row_start, n_rows = _check_row_range(row_start, n_rows, "row_start", "n_rows")
    proj_dim = _check_proj_dim(proj_dim)
    kind = check_kind(kind, _GENERATE_KINDS)
    dtype = _check_dtype(dtype)
    out = np.empty((n_rows, proj_dim), dtype=dtype)
    fn = load().iif_generate_block if dtype == np.float64 else load().iif_generate_block_f32
    _check(fn(seed, row_start, n_rows, proj_dim, KIND_CODES[kind], out.ctypes.data),
           "generate_block")
    return out


def project(G, proj_dim, *, seed=0, kind="rademacher", m_offset=0):
    """``Phi = G A[m_offset : m_offset + M]`` summed in the CUDA kernel's order.

    Parameters
    ----------
    G : array_like, shape (n, M)
        float32 and float64 are kept, other real dtypes become float64.
    proj_dim : int
    seed : int, optional
    kind : {"rademacher", "gaussian", "countsketch", "kronecker_in", "kronecker_out"}, optional
        For the structured kinds, the dense product with the materialised matrix in this
        order (:func:`countsketch` is the CountSketch kernel's own order).
    m_offset : int, optional
        Column ``m`` of ``G`` multiplies row ``m_offset + m`` of ``A``.

    Returns
    -------
    Phi : ndarray, shape (n, proj_dim), dtype of ``G``

    Notes
    -----
    Implements ``Phi = U A`` (Eq. 31 with Eq. 17) in the summation order of
    ``kernels/projection.cuh``: fma chains over 16 consecutive ``m`` in ``G``'s dtype,
    tiles summed in float64. Makes ``M`` Philox calls per entry: for small sizes only.
    """
    G = as_float_array(G, "G", ndim=2, allow_dtypes=(np.float32, np.float64))
    G = np.ascontiguousarray(G)
    n, M = G.shape
    if M < 1:
        raise ValueError(f"G has no columns (shape {G.shape}); n_params must be >= 1")
    proj_dim = _check_proj_dim(proj_dim)
    seed = check_seed(seed)
    kind = check_kind(kind, _GENERATE_KINDS)
    m_offset, M = _check_row_range(m_offset, M, "m_offset", "n_params")
    out = np.empty((n, proj_dim), dtype=G.dtype)
    fn = load().iif_project_f64 if G.dtype == np.float64 else load().iif_project_f32
    _check(fn(G.ctypes.data, n, M, seed, m_offset, proj_dim, KIND_CODES[kind],
              out.ctypes.data), "project")
    return out


def _countsketch_args(G, proj_dim, seed, m_offset):
    G = np.ascontiguousarray(as_float_array(G, "G", ndim=2,
                                            allow_dtypes=(np.float32, np.float64)))
    if G.shape[1] < 1:
        raise ValueError(f"G has no columns (shape {G.shape}); n_params must be >= 1")
    m_offset, M = _check_row_range(m_offset, G.shape[1], "m_offset", "n_params")
    return G, M, _check_proj_dim(proj_dim), check_seed(seed), m_offset


def countsketch(G, proj_dim, *, seed=0, m_offset=0):
    """CountSketch ``Phi = G A[m_offset : m_offset + M]`` in the order of the CUDA kernel.

    Parameters as :func:`project`. Returns ``(n, proj_dim)`` in ``G``'s dtype.

    Notes
    -----
    ``kernels/countsketch.cuh``: per row, ascending ``m``, one add per nonzero in ``G``'s
    dtype -- the order of every backend, so the results agree bit for bit.
    """
    G, M, proj_dim, seed, m_offset = _countsketch_args(G, proj_dim, seed, m_offset)
    out = np.empty((G.shape[0], proj_dim), dtype=G.dtype)
    fn = load().iif_countsketch_f64 if G.dtype == np.float64 else load().iif_countsketch_f32
    _check(fn(G.ctypes.data, G.shape[0], M, seed, m_offset, proj_dim, out.ctypes.data),
           "countsketch")
    return out


def gram(Phi, *, damping=0.0):
    """Stacked ``F_b = Phi_b^T Phi_b + damping I`` in float64, in the CUDA kernel's order.

    Parameters
    ----------
    Phi : array_like, shape (B, N, P)
        float32 or float64.
    damping : float >= 0, optional

    Returns
    -------
    F : ndarray, shape (B, P, P), float64

    Notes
    -----
    Implements the projected Fisher of Eq. (31): a float64 fma chain over samples in
    ascending order (``kernels/gram.cuh``), exactly symmetric.
    """
    Phi = np.ascontiguousarray(
        as_float_array(Phi, "Phi", ndim=3, allow_dtypes=(np.float32, np.float64)))
    damping = check_nonnegative_real(damping, "damping")
    B, N, P = Phi.shape
    if N < 1 or P < 1:
        raise ValueError(f"Phi must have N >= 1 samples and P >= 1 columns, got {Phi.shape}")
    out = np.empty((B, P, P))
    fn = load().iif_gram_f64 if Phi.dtype == np.float64 else load().iif_gram_f32
    _check(fn(Phi.ctypes.data, B, N, P, damping, out.ctypes.data), "gram")
    return out


# --------------------------------------------------------------------------- CUDA emulation

def emulation_library_path():
    """``libiif_cuda_emulation.so``, in the directory of :func:`library_path`."""
    return library_path().parent / _EMULATION_LIB_NAME


def load_emulation():
    """Load (once) and return the CPU emulation of the CUDA kernels.

    Raises
    ------
    HostLibraryError
        The file does not exist (the message says how to build it) or cannot be loaded.
    """
    global _emulation_lib
    if _emulation_lib is not None:
        return _emulation_lib
    path = emulation_library_path()
    if not path.is_file():
        raise HostLibraryError(f"CUDA emulation library not found at {path}; {_how_to_build()}")
    try:
        lib = ctypes.CDLL(str(path))
        dp, i64, u64, c_int, c_uint = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64,
                                       ctypes.c_int, ctypes.c_uint)
        lib.iif_emulate_project.restype = c_int
        lib.iif_emulate_project.argtypes = [c_int, c_uint, c_uint, c_uint, dp, i64, i64, i64,
                                            u64, u64, i64, c_int, dp, i64]
        lib.iif_emulate_generate.restype = c_int
        lib.iif_emulate_generate.argtypes = [c_int, c_uint, c_uint, u64, u64, i64, i64, c_int,
                                             dp]
        lib.iif_emulate_countsketch.restype = c_int
        lib.iif_emulate_countsketch.argtypes = [c_int, c_uint, c_uint, dp, i64, i64, i64, u64,
                                                u64, i64, dp, i64]
        lib.iif_emulate_gram.restype = c_int
        lib.iif_emulate_gram.argtypes = [c_int, c_uint, c_uint, c_uint, c_uint, dp, i64, i64,
                                         i64, i64, i64, dp, dp]
    except (OSError, AttributeError) as exc:
        raise HostLibraryError(f"cannot load CUDA emulation library {path}: {exc}") from exc
    _emulation_lib = lib
    return lib


def _dtype_code(dtype):
    return 0 if np.dtype(dtype) == np.float32 else 1


def _launch_shape(launch, default):
    grid, block = default if launch is None else launch
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
    if block[1:] != (1, 1):
        raise ValueError(f"the emulation launches 1-D blocks only, got block {block}")
    if min(grid) < 1 or not 1 <= block[0] <= 1024:
        raise ValueError(f"grid must be >= 1 and block in [1, 1024], got {grid}, {block}")
    return grid, block


def emulate_generate(seed, row_start, n_rows, proj_dim, *, kind="rademacher",
                     dtype=np.float64, launch=None):
    """``iif_generate_*`` of ``kernels/projection.cu`` run on the CPU emulation.

    Parameters as :func:`generate_block`; ``launch = (grid, block)`` overrides the CuPy
    backend's launch. Returns ``(n_rows, proj_dim)``.
    """
    from iif_ref.kernels._cupy_backend import generate_launch
    seed = check_seed(seed)
    row_start, n_rows = _check_row_range(row_start, n_rows, "row_start", "n_rows")
    proj_dim = _check_proj_dim(proj_dim)
    kind = check_kind(kind, _GENERATE_KINDS)
    dtype = _check_dtype(dtype)
    grid, block = _launch_shape(launch, generate_launch(n_rows, proj_dim))
    out = np.zeros((n_rows, proj_dim), dtype=dtype)
    _check(load_emulation().iif_emulate_generate(
        _dtype_code(dtype), grid[0], block[0], seed, row_start, n_rows, proj_dim,
        KIND_CODES[kind], out.ctypes.data), "emulate_generate")
    return out


def emulate_project(G, proj_dim, *, seed=0, kind="rademacher", m_offset=0, launch=None,
                    fill=0.0):
    """``iif_project_*`` of ``kernels/projection.cu`` run on the CPU emulation.

    Parameters as :func:`project`; ``launch = (grid, block)`` overrides the CuPy backend's
    launch; the output starts filled with ``fill`` so that entries a launch does not write
    are visible. Returns ``(n, proj_dim)`` in ``G``'s dtype.
    """
    from iif_ref.kernels._cupy_backend import projection_launch
    G = np.ascontiguousarray(as_float_array(G, "G", ndim=2,
                                            allow_dtypes=(np.float32, np.float64)))
    n, M = G.shape
    proj_dim = _check_proj_dim(proj_dim)
    seed = check_seed(seed)
    kind = check_kind(kind, _GENERATE_KINDS)
    m_offset, M = _check_row_range(m_offset, M, "m_offset", "n_params")
    grid, block = _launch_shape(launch, projection_launch(n, proj_dim))
    out = np.full((n, proj_dim), fill, dtype=G.dtype)
    _check(load_emulation().iif_emulate_project(
        _dtype_code(G.dtype), grid[0], grid[1], block[0], G.ctypes.data, n, M, M, seed,
        m_offset, proj_dim, KIND_CODES[kind], out.ctypes.data, proj_dim), "emulate_project")
    return out


def emulate_countsketch(G, proj_dim, *, seed=0, m_offset=0, launch=None, fill=0.0):
    """``iif_countsketch_*`` of ``kernels/countsketch.cu`` run on the CPU emulation.

    Parameters as :func:`countsketch`; ``launch`` and ``fill`` as in :func:`emulate_project`.
    """
    from iif_ref.kernels._cupy_backend import countsketch_launch
    G, M, proj_dim, seed, m_offset = _countsketch_args(G, proj_dim, seed, m_offset)
    n = G.shape[0]
    grid, block = _launch_shape(launch, countsketch_launch(n))
    out = np.full((n, proj_dim), fill, dtype=G.dtype)
    _check(load_emulation().iif_emulate_countsketch(
        _dtype_code(G.dtype), grid[0], block[0], G.ctypes.data, n, M, M, seed, m_offset,
        proj_dim, out.ctypes.data, proj_dim), "emulate_countsketch")
    return out


def emulate_gram(Phi, damping, *, launch=None, fill=0.0):
    """``iif_gram_*`` of ``kernels/gram.cu`` run on the CPU emulation.

    Parameters
    ----------
    Phi : array_like, shape (B, N, P), float32 or float64
    damping : array_like, shape (B,)
    launch : (grid, block), optional
        Overrides the CuPy backend's launch.
    fill : float
        Initial value of the output, so that unwritten entries are visible.

    Returns
    -------
    F : ndarray, shape (B, P, P), float64
    """
    from iif_ref.kernels._cupy_backend import gram_launch
    Phi = np.ascontiguousarray(
        as_float_array(Phi, "Phi", ndim=3, allow_dtypes=(np.float32, np.float64)))
    B, N, P = Phi.shape
    damping = np.ascontiguousarray(as_float_array(damping, "damping", ndim=1))
    if damping.shape != (B,):
        raise ValueError(f"damping must have shape ({B},), got {damping.shape}")
    grid, block = _launch_shape(launch, gram_launch(B, P))
    out = np.full((B, P, P), fill)
    _check(load_emulation().iif_emulate_gram(
        _dtype_code(Phi.dtype), grid[0], grid[1], grid[2], block[0], Phi.ctypes.data, B, N, P,
        N * P, P, damping.ctypes.data, out.ctypes.data), "emulate_gram")
    return out
