"""Unprojected curvature and the dense float64 solve (the exact twin of the projected path).

For small models, ``C(θ_k)`` is formed in parameter space, shape ``(n_params, n_params)``:

* ``"fisher"``: ``Σ_i u_i u_iᵀ`` with ``u_i = ∇θ l(f(x_i; θ_k), ρ_i(t_k))`` (Eq. 31);
* ``"gauss_newton"``: ``Σ_i J_iᵀ ∇²_f l(f_i, ρ_i(t_k)) J_i`` (equals the exact Hessian for
  MSE and a model linear in θ);
* ``"hessian"``: ``∇²_θ L_train(Γ(t_k))`` by ``torch.func.hessian``.

All use the summed training loss (docs/conventions.md). The solve
``−Γ (C + λ_d I)⁻¹ Ψᵀ`` uses one Cholesky factor in float64 and refuses a matrix that is
not positive definite, naming the step and a damping that would fix it.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch.func import hessian, vmap

from iif_ref.errors import NotPositiveDefiniteError
from iif_ref.kernels import RELATIVE_DAMPING
from iif_ref.neural.functional import chunks

__all__ = ["dense_curvature", "dense_scores", "resolve_damping", "condition_estimate",
           "RELATIVE_DAMPING"]

#: Largest ``n_params`` for which the dense ``(n_params, n_params)`` path is allowed.
MAX_DENSE_PARAMS = 5_000


def resolve_damping(damping, C_trace, dim):
    """Absolute λ_d: the number itself, or ``RELATIVE_DAMPING · tr(C)/dim`` for "auto"
    (the kernel layer's default, so the projected and unprojected paths agree)."""
    if isinstance(damping, str):
        return RELATIVE_DAMPING * float(C_trace) / dim
    return float(damping)


def condition_estimate(F):
    """LAPACK's 1-norm condition estimate of an SPD matrix (Cholesky + ``pocon``).

    ``O(P³/3)`` for the factor and ``O(P²)`` for the estimate, cheaper than eigenvalues;
    the estimate is within a small factor of the true 1-norm condition number. Returns
    ``inf`` when ``F`` is not numerically positive definite.
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
    """``−Γ (C + λ_d I)⁻¹ Ψᵀ`` in float64, with the condition number of ``C + λ_d I``.

    Parameters
    ----------
    C : ndarray, shape (M, M)
    Psi : ndarray, shape (n_train, M)
    Gamma : ndarray, shape (n_test, M)
    damping : float
        Absolute λ_d ≥ 0.
    step : int
        Path step, named in errors.

    Returns
    -------
    scores : ndarray, shape (n_test, n_train)
    cond : float
        ``λ_max / λ_min`` of the damped matrix (2-norm condition number).

    Raises
    ------
    NotPositiveDefiniteError
        The damped matrix has a non-positive eigenvalue (or one below ``M·eps·λ_max``);
        ``suggested_damping`` lifts the smallest eigenvalue to ``1e-8 · λ_max``.
    """
    M = C.shape[0]
    F = C + damping * np.eye(M)
    evals = np.linalg.eigvalsh(F)
    lo, hi = float(evals[0]), float(evals[-1])
    if not lo > M * np.finfo(float).eps * max(hi, 0.0):
        suggested = damping - lo + 1e-8 * max(abs(hi), 1.0)
        raise NotPositiveDefiniteError(
            f"curvature at path step k={step} is not positive definite with damping "
            f"{damping:.3g} (smallest eigenvalue {lo:.3g}, largest {hi:.3g}); a damping of "
            f"about {suggested:.3g} would make it so",
            slices=(step,), damping=damping, suggested_damping=suggested)
    factor = scipy.linalg.cho_factor(F, lower=True)
    X = scipy.linalg.cho_solve(factor, np.asarray(Gamma, dtype=np.float64).T)
    return -(X.T @ np.asarray(Psi, dtype=np.float64).T), hi / lo
