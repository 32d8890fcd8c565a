"""NumPy backend: the float64 oracle of the kernel layer.

Everything here is plain vectorised NumPy (Philox in uint64 lanes, BLAS through
``@``), written for clarity first; the other backends are tested against it.
See :mod:`iif_ref.kernels._registry` for the protocol these functions implement.
"""
from __future__ import annotations

import numpy as np

from iif_ref.kernels import _fisher
from iif_ref.kernels._philox import MASK32, STREAMS, philox4x32_10, split_seed

NAME = "numpy"

_TWO_PI = 2.0 * np.pi
_TWO_POW_26 = 67108864.0
_TWO_POW_53 = 9007199254740992.0


def available():
    """The oracle needs only NumPy: always available."""
    return True, ""


def _row_words(row_start, n_rows):
    rows = np.uint64(row_start) + np.arange(n_rows, dtype=np.uint64)
    return (rows & MASK32)[:, None], (rows >> np.uint64(32))[:, None]


def rademacher_signs(seed, row_start, n_rows, proj_dim, stream=0):
    """Sign bits of ``A[row_start:row_start+n_rows, :proj_dim]``: uint8, 1 means −1.

    One Philox call per row and 128 columns; column ``p`` is bit ``p mod 32`` of word
    ``(p mod 128) // 32`` of the call with ``c2 = p // 128`` and ``c3 = stream``
    (docs/rng.md: 0 for the Rademacher ``A``, 3 and 4 for the Kronecker factors).
    """
    k0, k1 = split_seed(seed)
    m_lo, m_hi = _row_words(row_start, n_rows)
    groups = np.arange((proj_dim + 127) // 128, dtype=np.uint64)[None, :]
    words = philox4x32_10(m_lo, m_hi, groups, np.uint64(stream), k0, k1)
    # (n, groups, 4) little-endian uint32 words -> bytes -> bits, least significant first,
    # which is exactly the order p = 128 g + 32 w + b.
    stacked = np.stack(words, axis=-1).astype("<u4")
    bits = np.unpackbits(stacked.view(np.uint8), axis=-1, bitorder="little")
    return bits.reshape(n_rows, -1)[:, :proj_dim]


def countsketch_hash(seed, row_start, n_rows, proj_dim):
    """CountSketch rows ``m = row_start .. row_start + n_rows - 1``: ``(bucket, negative)``.

    ``bucket`` (int64) is ``h(m) = floor(r0 P / 2**32)`` and ``negative`` (uint8) bit 0 of
    ``r1`` of the call with counter ``(m_lo, m_hi, 0, 2)`` (docs/rng.md, "CountSketch").
    """
    k0, k1 = split_seed(seed)
    m_lo, m_hi = _row_words(row_start, n_rows)
    r0, r1, _, _ = philox4x32_10(m_lo[:, 0], m_hi[:, 0], np.uint64(0),
                                 np.uint64(STREAMS["countsketch"]), k0, k1)
    bucket = (r0 * np.uint64(proj_dim)) >> np.uint64(32)   # < 2**64: r0, P < 2**32
    return bucket.astype(np.int64), (r1 & np.uint64(1)).astype(np.uint8)


def gaussian_values(seed, row_start, n_rows, proj_dim):
    """Standard normal ``z`` of ``A[rows, :proj_dim] = z / sqrt(P)``, float64 (docs/rng.md)."""
    k0, k1 = split_seed(seed)
    m_lo, m_hi = _row_words(row_start, n_rows)
    pairs = np.arange((proj_dim + 1) // 2, dtype=np.uint64)[None, :]
    r0, r1, r2, r3 = philox4x32_10(m_lo, m_hi, pairs, np.uint64(1), k0, k1)
    u1 = ((r0 >> np.uint64(5)).astype(np.float64) * _TWO_POW_26
          + (r1 >> np.uint64(6)).astype(np.float64) + 0.5) / _TWO_POW_53
    u2 = ((r2 >> np.uint64(5)).astype(np.float64) * _TWO_POW_26
          + (r3 >> np.uint64(6)).astype(np.float64) + 0.5) / _TWO_POW_53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = _TWO_PI * u2
    z = np.empty((n_rows, 2 * pairs.shape[1]))
    z[:, 0::2] = radius * np.cos(angle)
    z[:, 1::2] = radius * np.sin(angle)
    return z[:, :proj_dim]


def generate(seed, row_start, n_rows, proj_dim, kind, dtype):
    """Block ``A[row_start : row_start + n_rows, :proj_dim]`` in ``dtype`` (protocol)."""
    dtype = np.dtype(dtype)
    if kind in ("rademacher", "kronecker_in", "kronecker_out"):
        # ±1/√P rounded once to the output dtype (docs/rng.md); the factors are ±1.
        value = dtype.type(1.0 / np.sqrt(proj_dim) if kind == "rademacher" else 1.0)
        signs = rademacher_signs(seed, row_start, n_rows, proj_dim, STREAMS[kind])
        return np.where(signs == 0, value, -value).astype(dtype, copy=False)
    if kind == "countsketch":
        bucket, negative = countsketch_hash(seed, row_start, n_rows, proj_dim)
        out = np.zeros((n_rows, proj_dim), dtype=dtype)
        out[np.arange(n_rows), bucket] = np.where(negative == 0, 1.0, -1.0)
        return out
    z = gaussian_values(seed, row_start, n_rows, proj_dim)
    return (z / np.sqrt(proj_dim)).astype(dtype, copy=False)


def project(G, proj_dim, *, seed, kind, chunk_rows):
    """``G @ A`` streamed over blocks of ``chunk_rows`` rows of ``A`` (protocol).

    Implements Eq. (17)/(31)'s ``Phi = U A`` with ``A`` never held whole.
    """
    n, n_params = G.shape
    out = np.zeros((n, proj_dim), dtype=G.dtype)
    if kind == "countsketch":
        # The order of kernels/countsketch.cuh: ufunc.at adds repeated indices one at a
        # time in index order, i.e. each bucket's entries in ascending m, in G's dtype.
        for start in range(0, n_params, chunk_rows):
            stop = min(start + chunk_rows, n_params)
            bucket, negative = countsketch_hash(seed, start, stop - start, proj_dim)
            signed = np.where(negative == 0, G[:, start:stop], -G[:, start:stop])
            np.add.at(out, (slice(None), bucket), signed)
        return out
    for start in range(0, n_params, chunk_rows):
        stop = min(start + chunk_rows, n_params)
        block = generate(seed, start, stop - start, proj_dim, kind, G.dtype)
        out += G[:, start:stop] @ block
    return out


def projected_scores(Phi, Psi, Gamma, *, damping, reduce):
    """``-sum_b Gamma_b F_b^{-1} Psi_b^T`` with float64 Gram and Cholesky (protocol)."""
    return _fisher.projected_scores_host(Phi, Psi, Gamma, damping=damping, reduce=reduce)
