"""Damped projected-Fisher solves on the host: ``-Gamma_b F_b^{-1} Psi_b^T``.

Shared by the host backends (NumPy, Numba), whose work here is all LAPACK/BLAS, and
by the device backends for the damping default and the error they raise. One
Cholesky factorisation per batch slice ``b`` serves every right-hand side.

Precision: each slice is promoted to float64 before the Gram product, so the Gram of
float32 data is the exact products of the float32 values summed in float64.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import lapack

from iif_ref.errors import NotPositiveDefiniteError

__all__ = ["RELATIVE_DAMPING", "relative_damping", "suggest_damping",
           "not_positive_definite_error", "projected_scores_host"]

#: Default damping relative to the mean eigenvalue ``tr(Phi_b^T Phi_b) / P`` of each
#: slice's Gram. It caps ``cond(F_b) <= 1 + P / RELATIVE_DAMPING`` (docs/kernels.md).
RELATIVE_DAMPING = 1e-3

_EPS64 = np.finfo(np.float64).eps


def relative_damping(Phi, factor=RELATIVE_DAMPING):
    """Per-slice damping ``factor * tr(Phi_b^T Phi_b) / P``.

    Parameters
    ----------
    Phi : ndarray, shape (B, N, P)
    factor : float

    Returns
    -------
    ndarray, shape (B,), float64
    """
    B, _, P = Phi.shape
    traces = np.array([np.sum(np.square(Phi[b], dtype=np.float64)) for b in range(B)])
    return factor * traces / P


def not_positive_definite_error(slices, damping, suggested_damping, detail=""):
    """The error for slices whose damped Fisher is not numerically positive definite.

    Parameters
    ----------
    slices : sequence of int
        Failing batch indices ``b``.
    damping : ndarray, shape (B,)
        Absolute damping that was used per slice.
    suggested_damping : float
        An absolute damping that makes every failing slice positive definite.
    detail : str
        Optional extra sentence (e.g. why the slice is singular).
    """
    slices = [int(b) for b in slices]
    shown = ", ".join(map(str, slices[:20])) + (", ..." if len(slices) > 20 else "")
    used = sorted({float(damping[b]) for b in slices})
    used_text = (f"{used[0]:.3g}" if len(used) == 1
                 else f"{used[0]:.3g}..{used[-1]:.3g}")
    message = (f"F_b = Phi_b^T Phi_b + damping*I is not positive definite (to float64 "
               f"working precision) for {len(slices)} batch slice(s) b = [{shown}] with "
               f"damping = {used_text}; damping={suggested_damping:.3g} (absolute) makes "
               f"them positive definite.{(' ' + detail) if detail else ''}")
    return NotPositiveDefiniteError(message, slices=slices,
                                    damping=float(max(used)),
                                    suggested_damping=float(suggested_damping))


def _factor(matrix):
    """Lower Cholesky factor of ``matrix`` (overwritten), or None if it is not
    positive definite to working precision (LAPACK potrf fails, or the reciprocal
    condition estimate from pocon is below ``n * eps``)."""
    n = matrix.shape[0]
    anorm = np.max(np.sum(np.abs(matrix), axis=0))
    factor, info = lapack.dpotrf(matrix, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        return None
    rcond, info = lapack.dpocon(factor, anorm, uplo="L")
    if info != 0 or not rcond >= n * _EPS64:
        return None
    return factor


def _solve(factor, rhs):
    x, info = lapack.dpotrs(factor, rhs, lower=1)
    if info != 0:  # only for an illegal argument, i.e. a bug here
        raise RuntimeError(f"LAPACK dpotrs failed with info={info}")
    return x


def _slice_term(phi, psi, gamma, lam):
    """``-gamma F^{-1} psi^T`` (T, N) for one slice, or None when F is not PD.

    ``F^{-1}`` is applied to whichever of ``gamma^T`` (T columns) or ``psi^T``
    (N columns) has fewer columns, with one Cholesky factor.
    """
    n, p = phi.shape
    gamma_is_rhs = gamma.shape[0] <= n
    rhs = np.asarray(gamma if gamma_is_rhs else psi, dtype=np.float64).T   # (P, R)
    phi = np.asarray(phi, dtype=np.float64)
    if n >= p:
        # Direct form: Z = F^{-1} rhs with F = Phi^T Phi + lam I (P x P).
        fisher = phi.T @ phi
        fisher[np.diag_indices(p)] += lam
        factor = _factor(fisher)
        if factor is None:
            return None
        z = _solve(factor, np.ascontiguousarray(rhs))
    else:
        # N < P, push-through (Woodbury) form with the N x N kernel K = Phi Phi^T:
        # F^{-1} = (I - Phi^T (K + lam I)^{-1} Phi) / lam, which needs lam > 0.
        if lam <= 0.0:
            return None
        kernel = phi @ phi.T
        kernel[np.diag_indices(n)] += lam
        factor = _factor(kernel)
        if factor is None:
            return None
        z = (rhs - phi.T @ _solve(factor, phi @ rhs)) / lam
    if gamma_is_rhs:
        return -(np.asarray(psi, dtype=np.float64) @ z).T
    return -(np.asarray(gamma, dtype=np.float64) @ z)


def suggest_damping(Phi, damping, failed):
    """A damping that makes every failing slice positive definite.

    The largest relative default ``1e-3 tr(Phi_b^T Phi_b) / P`` over the failing slices
    (which caps ``cond(F_b) <= 1 + 1000 P``); if that is not above the damping already
    used (a zero ``Phi_b``), ``max(1, 10 * damping)``.

    Parameters
    ----------
    Phi : ndarray, shape (B, N, P)
    damping : ndarray, shape (B,)
    failed : sequence of int
    """
    rel = relative_damping(Phi[np.asarray(failed)])
    best = float(np.max(rel))
    if not best > float(np.max(damping[failed])):
        best = max(1.0, 10.0 * float(np.max(damping[failed])))
    return best


_suggest = suggest_damping  # name used by the device backend


def projected_scores_host(Phi, Psi, Gamma, *, damping, reduce):
    """Backend-protocol ``projected_scores`` on the host (see ``_registry``).

    Implements the inner update of Algorithm 1 with Eq. (17)/(31):
    ``I -= Gamma_b (Phi_b^T Phi_b + lam_d I)^{-1} Psi_b^T``.
    """
    B, N, _ = Phi.shape
    T = Gamma.shape[1]
    out = np.zeros((T, N)) if reduce else np.empty((B, T, N))
    failed = []
    for b in range(B):
        term = _slice_term(Phi[b], Psi[b], Gamma[b], float(damping[b]))
        if term is None:
            failed.append(b)  # keep going: the error names every failing slice
        elif failed:
            continue
        elif reduce:
            out += term
        else:
            out[b] = term
    if failed:
        detail = ""
        if Phi.shape[1] < Phi.shape[2]:
            detail = ("With N < P the Gram Phi_b^T Phi_b has rank <= N < P, so damping "
                      "must be > 0 (the N x N Woodbury form is used).")
        raise not_positive_definite_error(failed, damping, suggest_damping(Phi, damping, failed),
                                          detail)
    return out
