"""Philox4x32-10 and the entry map of the projection matrix ``A`` (docs/rng.md).

This module is the single written-down form of the generator. Its functions use
only ``numpy.uint64`` arithmetic with 32-bit words held in 64-bit lanes, so the same
source runs vectorised over NumPy arrays (the oracle) and, compiled with
``numba.njit``, as scalar code in the Numba backend: one definition, two compilations,
tested against each other and against the Random123 known-answer vectors.

All integers here are ``numpy.uint64``; mixing them with Python ints would make Numba
promote to float64, so every constant is a typed ``numpy.uint64``.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = ["philox4x32_10", "split_seed", "check_seed", "check_kind", "KINDS",
           "FACTOR_KINDS", "STREAMS", "MASK32", "SEED_MAX", "ROW_LIMIT", "COL_LIMIT"]

MASK32 = np.uint64(0xFFFFFFFF)
SHIFT32 = np.uint64(32)
M0 = np.uint64(0xD2511F53)
M1 = np.uint64(0xCD9E8D57)
W0 = np.uint64(0x9E3779B9)
W1 = np.uint64(0xBB67AE85)

SEED_MAX = 2**64 - 1
ROW_LIMIT = 2**64      # rows m in [0, 2**64)
COL_LIMIT = 2**32      # columns p in [0, 2**32)
#: Matrices ``A`` that project a flat vector (docs/rng.md): dense Rademacher, dense Gaussian,
#: CountSketch (one nonzero per row).
KINDS = ("rademacher", "gaussian", "countsketch")
#: The ±1 factor matrices of the Kronecker projection (docs/rng.md, "Kronecker factors"):
#: generated like ``A`` but never a projection of a flat vector on their own.
FACTOR_KINDS = ("kronecker_in", "kronecker_out")
#: Fourth Philox counter word of each kind: its own stream of the one generator (the codes
#: of ``kernels/philox.cuh``).
STREAMS = {"rademacher": 0, "gaussian": 1, "countsketch": 2, "kronecker_in": 3,
           "kronecker_out": 4}


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox4x32 rounds of counter ``(c0..c3)`` under key ``(k0, k1)``.

    Parameters
    ----------
    c0, c1, c2, c3, k0, k1 : numpy.uint64 scalars or broadcastable uint64 arrays
        32-bit words held in uint64 (values below 2**32).

    Returns
    -------
    tuple of four uint64 (arrays)
        The result words ``r0..r3``, each below 2**32.

    Notes
    -----
    Round: ``(hi0, lo0) = M0 * c0``, ``(hi1, lo1) = M1 * c2`` (exact 64-bit products of
    32-bit words), ``c <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; the key is bumped
    by the Weyl constants between rounds (docs/rng.md).
    """
    for r in range(10):
        if r > 0:
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        p0 = M0 * c0
        p1 = M1 * c2
        c0, c1, c2, c3 = ((p1 >> SHIFT32) ^ c1 ^ k0, p1 & MASK32,
                          (p0 >> SHIFT32) ^ c3 ^ k1, p0 & MASK32)
    return c0, c1, c2, c3


def check_seed(seed):
    """Return ``seed`` as a Python int in ``[0, 2**64)``, or raise naming ``seed``."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [0, 2**64 - 1], got {seed}")
    return seed


def split_seed(seed):
    """Key words ``(k0, k1) = (seed mod 2**32, seed // 2**32)`` as numpy.uint64."""
    return np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)


def check_kind(kind, allowed=KINDS):
    """Return ``kind`` if it is one of ``allowed`` (default :data:`KINDS`), or raise
    naming ``kind``."""
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string, got {type(kind).__name__}")
    if kind not in allowed:
        raise ValueError(f"kind must be one of {', '.join(map(repr, allowed))}, got {kind!r}")
    return kind
