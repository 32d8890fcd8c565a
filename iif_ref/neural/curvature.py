"""Unprojected curvature and the dense float64 solve (the exact twin of the projected path).

For small models, ``C(θ_k)`` is formed in parameter space, shape ``(n_params, n_params)``:

* ``"fisher"``: ``Σ_i u_i u_iᵀ`` with ``u_i = ∇θ l(f(x_i; θ_k), ρ_i(t_k))`` (Eq. 31);
* ``"gauss_newton"``: ``Σ_i J_iᵀ ∇²_f l(f_i, ρ_i(t_k)) J_i`` (equals the exact Hessian for
  MSE and a model linear in θ);
* ``"hessian"``: ``∇²_θ L_train(Γ(t_k))`` by ``torch.func.hessian``.

All use the summed training loss (docs/conventions.md). The solve
``−Γ (C + λ_d I)⁻¹ Ψᵀ`` (:func:`dense_scores`) is the kernel layer's single step solve,
:func:`iif_ref.kernels.solve_step`, which the projected Fisher ``C = ΦᵀΦ`` goes through
too: one float64 Cholesky factor gives the scores and the condition estimate, and a
matrix that is not positive definite is refused, naming the step and a damping that
would fix it. The damping rule is :func:`iif_ref._defaults.absolute_damping`.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch.func import hessian, vmap

from iif_ref._defaults import RELATIVE_DAMPING, absolute_damping
from iif_ref.kernels import solve_step
from iif_ref.neural.functional import chunks

__all__ = ["dense_curvature", "dense_scores", "projected_gram", "resolve_damping",
           "condition_estimate", "RELATIVE_DAMPING", "FLOAT64_BLOCK_ROWS"]

#: Largest ``n_params`` for which the dense ``(n_params, n_params)`` path is allowed.
MAX_DENSE_PARAMS = 5_000


#: Rows of the float32 ``(n, P)`` features promoted to float64 at a time by
#: :func:`projected_gram` and :func:`dense_scores` (32 MiB at P = 512): a float64 copy of
#: the whole ``Φ`` and of the whole ``Ψ`` took 2 × 234 MiB at n = 60,000, twice the
#: features themselves.
FLOAT64_BLOCK_ROWS = 8192

#: Largest curvature order solved block by block (each block refactors ``C``, ``D³/3``
#: flops: negligible next to the block's ``2 · 8192 · D · n_test`` for the projected
#: Fisher, not for a dense ``n_params × n_params`` curvature).
_MAX_BLOCKED_ORDER = 2048


def projected_gram(Phi):
    """The projected Fisher's Gram ``ΦᵀΦ`` (Eq. 31), accumulated in float64.

    Parameters
    ----------
    Phi : ndarray, shape (n, P), float32 or float64

    Returns
    -------
    ndarray, shape (P, P), float64

    Notes
    -----
    Row blocks of :data:`FLOAT64_BLOCK_ROWS` are promoted to float64 and their Grams
    summed in torch's thread pool (the NumPy BLAS runs single-threaded inside torch
    work, iif_ref._threads), so no float64 copy of ``Φ`` exists. Every product is exact
    in float64 and only the summation order depends on the blocking: for
    ``n <= FLOAT64_BLOCK_ROWS`` it is the one GEMM of the whole matrix.
    """
    Phi = torch.from_numpy(np.ascontiguousarray(Phi))
    C = None
    for start, stop in chunks(Phi.shape[0], FLOAT64_BLOCK_ROWS):
        block = Phi[start:stop].to(torch.float64)
        C = block.T @ block if C is None else C.addmm_(block.T, block)
    return C.numpy()


#: Absolute λ_d from ``(damping, tr(C), dim)``: the package's one damping rule,
#: :func:`iif_ref._defaults.absolute_damping` itself (not a copy of it).
resolve_damping = absolute_damping


def condition_estimate(F):
    """LAPACK's 1-norm condition estimate of an SPD matrix (Cholesky + ``pocon``).

    ``O(P³/3)`` for the factor and ``O(P²)`` for the estimate, cheaper than eigenvalues;
    the estimate is within a small factor of the true 1-norm condition number. Returns
    ``inf`` when ``F`` is not numerically positive definite. A second factorisation:
    the step solve (:func:`dense_scores`) returns the same estimate from its own factor,
    so this is for diagnostics of matrices that are not solved with.
    """
    F = np.asarray(F, dtype=np.float64)
    anorm = float(np.max(np.sum(np.abs(F), axis=0)))
    c, info = scipy.linalg.lapack.dpotrf(F, lower=1, clean=0)
    if info != 0:
        return float("inf")
    rcond, info = scipy.linalg.lapack.dpocon(c, anorm, uplo="L")
    return float("inf") if info != 0 or rcond <= 0 else 1.0 / float(rcond)


def dense_curvature(fm, loss, params, X, rho, *, kind, U=None, chunk_size=256):
    """The ``(n_params, n_params)`` float64 curvature at θ_k on ``Γ(t_k)``.

    Parameters
    ----------
    fm : FunctionalModel
    loss : TargetLinearLoss
    params : dict of tensors (θ_k)
    X, rho : tensors, shapes (n_train, ...), (n_train, n_out)
    kind : {"fisher", "gauss_newton", "hessian"}
    U : ndarray, shape (n_train, n_params), optional
        Unprojected per-sample gradients, reused for ``"fisher"``.
    chunk_size : int
    """
    M = fm.n_params
    if M > MAX_DENSE_PARAMS:
        raise ValueError(f"the unprojected path forms a {M} x {M} float64 matrix; n_params={M} "
                         f"exceeds {MAX_DENSE_PARAMS}: pass proj_dim (e.g. 512), or for the "
                         "influence function solver='projected' or solver='cg'")
    if kind == "fisher":
        U = np.asarray(U, dtype=np.float64)
        return U.T @ U
    C = np.zeros((M, M))
    if kind == "gauss_newton":
        for s, e in chunks(X.shape[0], chunk_size):
            with torch.no_grad():
                F = fm.forward(params, X[s:e])
            Hl = vmap(hessian(loss.fn, argnums=0))(F, rho[s:e]).double()
            # A symmetric square root S of ∇²_f l, so Σ_r (Jᵀs_r)(Jᵀs_r)ᵀ = Jᵀ ∇²_f l J.
            lam, V = torch.linalg.eigh(0.5 * (Hl + Hl.transpose(1, 2)))
            S = V @ torch.diag_embed(torch.sqrt(torch.clamp(lam, min=0.0))) @ V.transpose(1, 2)
            R = fm.per_sample_vjp(params, X[s:e], S.to(fm.dtype))
            R = R.reshape(-1, M).double().numpy()
            C += R.T @ R
        return C
    if kind == "hessian":
        theta = fm.flatten(params).detach()
        for s, e in chunks(X.shape[0], chunk_size):
            Xc, Rc = X[s:e], rho[s:e]

            def total(vec):
                return vmap(loss.fn)(fm.forward(fm.unflatten(vec), Xc), Rc).sum()

            C += hessian(total)(theta).double().numpy()
        return 0.5 * (C + C.T)
    raise ValueError(f"curvature must be 'fisher', 'gauss_newton' or 'hessian', got {kind!r}")


def dense_scores(C, Psi, Gamma, *, damping, step):
    """``−Γ (C + λ_d I)⁻¹ Ψᵀ`` in float64, with the condition estimate of ``C + λ_d I``.

    Parameters
    ----------
    C : ndarray, shape (D, D)
        Undamped curvature: dense ``(n_params, n_params)``, or the projected Fisher
        ``ΦᵀΦ`` ``(P, P)``.
    Psi : ndarray, shape (n_train, D)
    Gamma : ndarray, shape (n_test, D)
    damping : float
        Absolute λ_d ≥ 0.
    step : int
        Path step, named in errors.

    Returns
    -------
    scores : ndarray, shape (n_test, n_train)
    cond : float
        LAPACK's 1-norm condition estimate of the damped matrix, from the Cholesky
        factor that solves the step (equal to :func:`condition_estimate` of it).

    Raises
    ------
    NotPositiveDefiniteError
        The damped matrix is not positive definite to float64 working precision;
        ``suggested_damping`` is one that makes it so.

    Notes
    -----
    The step term of Eq. (10) with the curvature of Eq. (31) (projected, Eq. 17) or its
    unprojected twin; :func:`iif_ref.kernels.solve_step`. A projected step with more than
    :data:`FLOAT64_BLOCK_ROWS` rows of float32 ``Ψ`` is solved block by block (the same
    damped ``C``, factored again per block: identical factors), so that the solve's
    float64 copy of ``Ψ`` is one block, not the whole matrix.
    """
    C = np.asarray(C, dtype=np.float64)
    n = Psi.shape[0]
    if (n <= FLOAT64_BLOCK_ROWS or C.shape[0] > _MAX_BLOCKED_ORDER
            or Psi.dtype == np.float64):
        return solve_step(C, Psi, Gamma, damping=damping, step=step)
    scores, cond = np.empty((Gamma.shape[0], n)), None
    for start, stop in chunks(n, FLOAT64_BLOCK_ROWS):
        scores[:, start:stop], cond = solve_step(C, Psi[start:stop], Gamma, damping=damping,
                                                 step=step)
    return scores, cond
