"""Numba backend: blocks of ``A`` generated in parallel, multiplied by BLAS.

``project`` generates a block of ``chunk_rows`` rows of ``A`` with a ``prange`` over
rows (one Philox call per 128 Rademacher entries, or per 2 Gaussian entries) directly
in the input dtype, then multiplies it with the matching columns of ``G`` through
NumPy's BLAS GEMM called from Python (multithreaded, works on strided column blocks
of ``G`` without a copy, keeps a float32 GEMM in float32; ``np.dot`` inside a jitted
loop needs contiguous copies and is compared in ``validation/bench_kernels.py``) and
accumulates. The
generator source is :func:`iif_ref.kernels._philox.philox4x32_10`, compiled here.

``projected_scores`` is LAPACK/BLAS-bound; it uses the shared host implementation
(:mod:`iif_ref.kernels._fisher`), as a jitted loop would call the same routines.

No ``fastmath``: the kernels only move signs and call log/sqrt/cos/sin, and NaN/Inf
semantics must stay intact. ``cache=True`` keeps compiled code between processes.
"""
from __future__ import annotations

import math

import numpy as np

from iif_ref.kernels import _fisher
from iif_ref.kernels._philox import MASK32, STREAMS, philox4x32_10, split_seed

NAME = "numba"

try:
    import numba
except ImportError as _exc:  # available() reports it; nothing below is defined
    numba = None
    _IMPORT_ERROR = f"numba is not installed ({_exc}); pip install 'iif_ref[fast]'"
else:
    _IMPORT_ERROR = ""


def available():
    """Numba importable: then the backend runs on any CPU."""
    return (numba is not None), _IMPORT_ERROR


if numba is not None:
    _philox = numba.njit(inline="always")(philox4x32_10)
    _U64_32 = np.uint64(32)
    _U64_0 = np.uint64(0)
    _U64_1 = np.uint64(1)
    _U64_5 = np.uint64(5)
    _U64_6 = np.uint64(6)

    @numba.njit(inline="always")
    def _row_counter(row_start, i):
        # Philox counter words 0 and 1 of row m = row_start + i of A: the low and high
        # 32 bits of m (docs/rng.md); inlined, so the prange loops pay no call.
        m = row_start + np.uint64(i)
        return m & MASK32, m >> _U64_32

    @numba.njit(parallel=True, cache=True)
    def _rademacher_block(k0, k1, row_start, stream, value, out):
        # out[i, p] = ±value for row m = row_start + i; bit set -> negative (docs/rng.md);
        # stream 0 is the Rademacher A, 3 and 4 the Kronecker factors.
        n_rows, proj_dim = out.shape
        full_groups = proj_dim // 128
        n_groups = (proj_dim + 127) // 128
        neg = -value
        for i in numba.prange(n_rows):
            m_lo, m_hi = _row_counter(row_start, i)
            for g in range(n_groups):
                r0, r1, r2, r3 = _philox(m_lo, m_hi, np.uint64(g), stream, k0, k1)
                base = g * 128
                if g < full_groups:
                    for b in range(32):
                        sh = np.uint64(b)
                        out[i, base + b] = neg if (r0 >> sh) & _U64_1 else value
                        out[i, base + 32 + b] = neg if (r1 >> sh) & _U64_1 else value
                        out[i, base + 64 + b] = neg if (r2 >> sh) & _U64_1 else value
                        out[i, base + 96 + b] = neg if (r3 >> sh) & _U64_1 else value
                else:  # the ragged last group
                    for j in range(proj_dim - base):
                        w = j // 32
                        word = r0 if w == 0 else (r1 if w == 1 else (r2 if w == 2 else r3))
                        out[i, base + j] = neg if (word >> np.uint64(j % 32)) & _U64_1 \
                            else value

    @numba.njit(parallel=True, cache=True)
    def _gaussian_block(k0, k1, row_start, scale, out):
        # Box–Muller in float64 from two 53-bit uniforms per Philox call (docs/rng.md).
        n_rows, proj_dim = out.shape
        n_pairs = (proj_dim + 1) // 2
        two_pi = 2.0 * math.pi
        for i in numba.prange(n_rows):
            m_lo, m_hi = _row_counter(row_start, i)
            for q in range(n_pairs):
                r0, r1, r2, r3 = _philox(m_lo, m_hi, np.uint64(q), _U64_1, k0, k1)
                u1 = (float(r0 >> _U64_5) * 67108864.0 + float(r1 >> _U64_6) + 0.5) \
                    / 9007199254740992.0
                u2 = (float(r2 >> _U64_5) * 67108864.0 + float(r3 >> _U64_6) + 0.5) \
                    / 9007199254740992.0
                radius = math.sqrt(-2.0 * math.log(u1))
                angle = two_pi * u2
                out[i, 2 * q] = radius * math.cos(angle) / scale
                if 2 * q + 1 < proj_dim:
                    out[i, 2 * q + 1] = radius * math.sin(angle) / scale


    @numba.njit(parallel=True, cache=True)
    def _countsketch_hash(k0, k1, row_start, proj_dim, bucket, negative):
        # h(m) = floor(r0 P / 2**32), sign bit = bit 0 of r1, counter (m_lo, m_hi, 0, 2).
        for i in numba.prange(bucket.shape[0]):
            m_lo, m_hi = _row_counter(row_start, i)
            r0, r1, _, _ = _philox(m_lo, m_hi, _U64_0, _U64_2, k0, k1)
            bucket[i] = (r0 * proj_dim) >> _U64_32
            negative[i] = r1 & _U64_1

    @numba.njit(parallel=True, cache=True)
    def _countsketch_accumulate(G, bucket, negative, out):
        # The order of kernels/countsketch.cuh: per row, ascending m, one add in G's dtype.
        n, width = G.shape
        for i in numba.prange(n):
            for m in range(width):
                g = G[i, m]
                out[i, bucket[m]] += -g if negative[m] else g

    _U64_2 = np.uint64(STREAMS["countsketch"])


def _countsketch(seed, row_start, n_rows, proj_dim):
    k0, k1 = split_seed(seed)
    bucket = np.empty(n_rows, dtype=np.uint64)
    negative = np.empty(n_rows, dtype=np.uint64)
    _countsketch_hash(k0, k1, np.uint64(row_start), np.uint64(proj_dim), bucket, negative)
    return bucket.astype(np.int64), negative.astype(np.uint8)


def _fill(out, seed, row_start, kind):
    k0, k1 = split_seed(seed)
    proj_dim = out.shape[1]
    if kind in ("rademacher", "kronecker_in", "kronecker_out"):
        value = out.dtype.type(1.0 / np.sqrt(proj_dim) if kind == "rademacher" else 1.0)
        _rademacher_block(k0, k1, np.uint64(row_start), np.uint64(STREAMS[kind]), value, out)
    elif kind == "countsketch":
        bucket, negative = _countsketch(seed, row_start, out.shape[0], proj_dim)
        out[...] = 0
        out[np.arange(out.shape[0]), bucket] = np.where(negative == 0, 1.0, -1.0)
    else:
        _gaussian_block(k0, k1, np.uint64(row_start), float(np.sqrt(proj_dim)), out)
    return out


def generate(seed, row_start, n_rows, proj_dim, kind, dtype):
    """Block ``A[row_start : row_start + n_rows, :proj_dim]`` in ``dtype`` (protocol)."""
    return _fill(np.empty((n_rows, proj_dim), dtype=dtype), seed, row_start, kind)


def project(G, proj_dim, *, seed, kind, chunk_rows):
    """``G @ A`` streamed over blocks of ``chunk_rows`` rows of ``A`` (protocol).

    Implements Eq. (17)/(31)'s ``Phi = U A``; one block buffer is reused, so at most
    ``chunk_rows * proj_dim`` entries of ``A`` exist at once.
    """
    n, n_params = G.shape
    if kind == "countsketch":   # O(n M): the hashes of a block of rows, then one pass of G
        out = np.zeros((n, proj_dim), dtype=G.dtype)
        for start in range(0, n_params, chunk_rows):
            stop = min(start + chunk_rows, n_params)
            bucket, negative = _countsketch(seed, start, stop - start, proj_dim)
            _countsketch_accumulate(G[:, start:stop], bucket, negative, out)
        return out
    out = np.empty((n, proj_dim), dtype=G.dtype)
    partial = None
    buffer = np.empty((min(chunk_rows, n_params), proj_dim), dtype=G.dtype)
    for start in range(0, n_params, chunk_rows):
        stop = min(start + chunk_rows, n_params)
        block = _fill(buffer[: stop - start], seed, start, kind)
        if start == 0:  # the first product is written in place: no zero fill, no add
            np.matmul(G[:, start:stop], block, out=out)
            continue
        if partial is None:
            partial = np.empty_like(out)
        np.matmul(G[:, start:stop], block, out=partial)
        out += partial
    return out


def projected_scores(Phi, Psi, Gamma, *, damping, reduce):
    """``-sum_b Gamma_b F_b^{-1} Psi_b^T`` with float64 Gram and Cholesky (protocol)."""
    return _fisher.projected_scores_host(Phi, Psi, Gamma, damping=damping, reduce=reduce)
