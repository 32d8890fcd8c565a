"""Damped projected-Fisher solves on the host: ``-Gamma_b F_b^{-1} Psi_b^T``.

Shared by the host backends (NumPy, Numba), whose work here is all LAPACK/BLAS, by
the device backends for the damping suggestion and the error they raise, by the
public factor/solve layer (:class:`FisherFactor`, built by
:func:`iif_ref.kernels.factor_fisher`, applied by :func:`solve_factored`), which factors
with the same per-slice code (:func:`factor_slice`, :meth:`SliceFactor.apply_inverse`) as
``projected_scores``, and by the torch side's per-step solve (:func:`solve_step`). One
Cholesky factorisation per batch slice ``b`` serves every right-hand side and gives the
slice's condition estimate. The damping rule itself is
:func:`iif_ref._defaults.absolute_damping`.

Precision: each slice is promoted to float64 before the Gram product, so the Gram of
float32 data is the exact products of the float32 values summed in float64.
"""
from __future__ import annotations

import contextlib
import numbers

import numpy as np
from scipy.linalg import lapack

from iif_ref._defaults import RELATIVE_DAMPING, absolute_damping
from iif_ref._threads import blas_one_thread
from iif_ref._validation import as_float_array
from iif_ref.errors import NotPositiveDefiniteError

__all__ = ["RELATIVE_DAMPING", "FisherFactor", "relative_damping", "slice_traces",
           "damping_from_traces", "suggest_damping", "suggest_damping_from_traces",
           "not_positive_definite_error", "factor_slice", "factor_gram", "factor_stack",
           "projected_scores_host", "solve_factored", "solve_step"]

_EPS64 = np.finfo(np.float64).eps


def slice_traces(Phi):
    """``tr(Phi_b^T Phi_b) = ||Phi_b||_F^2`` per slice, summed in float64.

    Parameters
    ----------
    Phi : ndarray, shape (B, N, P)

    Returns
    -------
    ndarray, shape (B,), float64
    """
    return np.array([np.sum(np.square(Phi[b], dtype=np.float64)) for b in range(Phi.shape[0])])


def damping_from_traces(traces, P, damping):
    """Absolute damping per slice from the Gram traces and the user's ``damping``.

    Parameters
    ----------
    traces : ndarray, shape (B,)
        ``tr(Phi_b^T Phi_b)`` of each slice.
    P : int
        Order of the Fisher.
    damping : None, float or callable
        None: the relative default ``RELATIVE_DAMPING * tr_b / P``; a float: that
        absolute value for every slice (already checked finite and >= 0 by the caller);
        a callable: ``damping(tr_b, P) -> lam_b`` per slice, whose results must be
        finite and >= 0.

    Returns
    -------
    ndarray, shape (B,), float64
        :func:`iif_ref._defaults.absolute_damping` of each trace (the one rule).
    """
    return absolute_damping(damping, np.atleast_1d(np.asarray(traces, dtype=np.float64)), P)


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
    return factor * slice_traces(Phi) / Phi.shape[2]


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


#: Largest matrix order whose Cholesky factorisation and solves run on one BLAS thread.
SINGLE_THREAD_ORDER = 2048


def _blas_threads(n):
    """One BLAS thread for LAPACK work on a matrix of order ``n <= SINGLE_THREAD_ORDER``
    (where threadpoolctl is installed; else the BLAS's own setting).

    A multi-threaded ``potrf`` of order 512 takes about 3 ms on one thread; on a loaded
    2-core machine, two OpenBLAS threads took 0.5-1.6 s for it (their hand-offs wait
    for descheduled threads), so small factorisations gain nothing from threads and can
    lose 100x. Larger ones keep the BLAS's setting.
    """
    return blas_one_thread() if n <= SINGLE_THREAD_ORDER else contextlib.nullcontext()


def _factor(matrix):
    """``(L, rcond)``: lower Cholesky factor of ``matrix`` (overwritten) and LAPACK's
    reciprocal 1-norm condition estimate from it (``pocon``), or None if the matrix is
    not positive definite to working precision (potrf fails, or ``rcond < n eps``)."""
    n = matrix.shape[0]
    anorm = np.max(np.sum(np.abs(matrix), axis=0))
    with _blas_threads(n):
        factor, info = lapack.dpotrf(matrix, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            return None
        rcond, info = lapack.dpocon(factor, anorm, uplo="L")
    if info != 0 or not rcond >= n * _EPS64:
        return None
    return factor, float(rcond)


def _solve(factor, rhs):
    with _blas_threads(factor.shape[0]):
        x, info = lapack.dpotrs(factor, rhs, lower=1)
    if info != 0:  # only for an illegal argument, i.e. a bug here
        raise RuntimeError(f"LAPACK dpotrs failed with info={info}")
    return x


class SliceFactor:
    """One slice's factored damped Fisher, in the direct or the push-through form.

    ``form == "direct"``: ``chol`` is the lower Cholesky factor of
    ``F = Phi^T Phi + lam I`` (P x P). ``form == "woodbury"``: ``chol`` factors
    ``K = Phi Phi^T + lam I`` (N x N) and ``phi`` (float64, N x P) is kept, since
    ``F^{-1} = (I - Phi^T K^{-1} Phi) / lam``. ``rcond`` is LAPACK's reciprocal
    1-norm condition estimate of the factored matrix, from the same factor.
    """

    __slots__ = ("form", "chol", "phi", "lam", "rcond")

    def __init__(self, form, chol, phi, lam, rcond):
        self.form, self.chol, self.phi, self.lam, self.rcond = form, chol, phi, lam, rcond

    def apply_inverse(self, rhs):
        """``F^{-1} rhs`` for float64 ``rhs`` of shape (P, R)."""
        rhs = np.ascontiguousarray(rhs, dtype=np.float64)
        if self.form == "direct":
            return _solve(self.chol, rhs)
        return (rhs - self.phi.T @ _solve(self.chol, self.phi @ rhs)) / self.lam


def factor_gram(gram, lam, *, overwrite=False):
    """:class:`SliceFactor` of ``gram + lam I`` (P x P), or None when it is not positive
    definite to working precision. ``gram`` is left unchanged unless ``overwrite`` (then
    it must be a float64 array the caller no longer needs)."""
    fisher = gram if overwrite else np.array(gram, dtype=np.float64, copy=True)
    fisher[np.diag_indices(fisher.shape[0])] += lam
    factored = _factor(fisher)
    return None if factored is None else SliceFactor("direct", factored[0], None, lam,
                                                     factored[1])


def factor_slice(phi, lam):
    """:class:`SliceFactor` of ``F = phi^T phi + lam I`` for ``phi`` (N, P), or None when
    ``F`` (or, for N < P, ``phi phi^T + lam I`` with ``lam > 0`` required) is not
    positive definite to working precision.

    The Gram is formed from ``phi`` promoted to float64. For ``N >= P`` the P x P
    Fisher is factored; for ``N < P`` the N x N push-through (Woodbury) kernel, since
    the Gram has rank <= N < P and the smaller factorisation is cheaper.
    """
    n, p = phi.shape
    phi = np.asarray(phi, dtype=np.float64)
    if n >= p:
        return factor_gram(phi.T @ phi, lam, overwrite=True)
    if lam <= 0.0:
        return None
    kernel = phi @ phi.T
    kernel[np.diag_indices(n)] += lam
    factored = _factor(kernel)
    return None if factored is None else SliceFactor("woodbury", factored[0], phi, lam,
                                                     factored[1])


WOODBURY_DETAIL = ("With N < P the Gram Phi_b^T Phi_b has rank <= N < P, so damping "
                   "must be > 0 (the N x N Woodbury form is used).")


def _slice_term(phi, psi, gamma, lam):
    """``-gamma F^{-1} psi^T`` (T, N) for one slice, or None when F is not PD.

    ``F^{-1}`` is applied to whichever of ``gamma^T`` (T columns) or ``psi^T``
    (N columns) has fewer columns, with one Cholesky factor.
    """
    factor = factor_slice(phi, lam)
    return None if factor is None else _term(factor, psi, gamma)


def _term(factor, psi, gamma):
    """``-gamma F^{-1} psi^T`` (T, N) with a :class:`SliceFactor` of ``F``.

    ``F^{-1}`` is applied to whichever of ``gamma^T`` (T columns) or ``psi^T``
    (N columns) has fewer columns.
    """
    gamma_is_rhs = gamma.shape[0] <= psi.shape[0]
    z = factor.apply_inverse(np.asarray(gamma if gamma_is_rhs else psi,
                                        dtype=np.float64).T)            # (P, R)
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
    failed = np.asarray(failed)
    return suggest_damping_from_traces(slice_traces(Phi[failed]), Phi.shape[2],
                                       np.asarray(damping)[failed])


def suggest_damping_from_traces(traces, P, used):
    """:func:`suggest_damping` from the failing slices' Gram traces and used dampings.

    Parameters
    ----------
    traces, used : ndarray, shape (n_failed,)
    P : int
    """
    best = float(np.max(absolute_damping(None, np.asarray(traces, dtype=np.float64), P)))
    if not best > float(np.max(used)):
        best = max(1.0, 10.0 * float(np.max(used)))
    return best


_suggest = suggest_damping  # name used by the device backend


class FisherFactor:
    """Factored damped projected Fishers ``F_b = Phi_b^T Phi_b + lam_b I``, one per slice.

    Built by :func:`iif_ref.kernels.factor_fisher`; apply ``F_b^{-1}`` with
    :meth:`solve`. Each slice holds one float64 Cholesky factor: of the ``P x P`` Fisher,
    or, when it was built from ``Phi_b`` with ``N < P``, of the ``N x N`` push-through
    kernel ``Phi_b Phi_b^T + lam_b I`` (see ``docs/kernels.md``).

    Attributes
    ----------
    damping : ndarray, shape (B,), float64
        Absolute damping ``lam_b`` of each slice.
    proj_dim : int
        ``P``, the order of each ``F_b``.
    forms : tuple of str
        ``"direct"`` or ``"woodbury"`` per slice.
    condition : ndarray, shape (B,), float64
        LAPACK's 1-norm condition estimate ``1 / rcond`` of each factored matrix
        (``F_b``, or the push-through kernel for a ``"woodbury"`` slice), taken from the
        Cholesky factor that solves with it: no second factorisation.
    """

    def __init__(self, slices, damping, proj_dim):
        self._slices = tuple(slices)
        self.damping = np.array(damping, dtype=np.float64)
        self.damping.flags.writeable = False  # it describes the factors held here
        self.proj_dim = int(proj_dim)
        self.forms = tuple(f.form for f in self._slices)
        self.condition = np.array([1.0 / f.rcond for f in self._slices])
        self.condition.flags.writeable = False

    def __len__(self):
        return len(self._slices)

    def __repr__(self):
        return (f"FisherFactor(B={len(self)}, P={self.proj_dim}, "
                f"forms={sorted(set(self.forms))})")

    def lower(self, b):
        """Lower Cholesky factor ``L`` of slice ``b``: ``F_b = L L^T`` (direct form) or
        ``Phi_b Phi_b^T + lam_b I = L L^T`` (Woodbury form); a read-only view."""
        view = self._slices[b].chol.view()
        view.flags.writeable = False
        return view

    def solve(self, rhs, *, index=None):
        """``F_b^{-1} rhs`` for every slice, or for slice ``index`` only.

        See :func:`iif_ref.kernels.solve_factored` for shapes and validation.
        """
        return solve_factored(self, rhs, index=index)

    def _apply(self, b, rhs):
        """Unvalidated ``F_b^{-1} rhs`` for float64 ``rhs`` of shape (P, R)."""
        return self._slices[b].apply_inverse(rhs)


def factor_stack(*, damping, Phi=None, gram=None):
    """Factor every slice of ``Phi`` (B, N, P) or of ``gram`` (B, P, P); validated input.

    ``damping`` is the absolute float64 damping per slice, shape (B,). Raises
    :class:`iif_ref.errors.NotPositiveDefiniteError` naming every failing slice and a
    damping that fixes them (the same test and suggestion as :func:`projected_scores_host`).
    """
    source = Phi if gram is None else gram
    B, P = source.shape[0], source.shape[2]
    slices, failed = [], []
    for b in range(B):
        f = factor_slice(Phi[b], float(damping[b])) if gram is None \
            else factor_gram(gram[b], float(damping[b]))
        if f is None:
            failed.append(b)
        elif not failed:
            slices.append(f)
    if failed:
        if gram is None:
            suggestion = suggest_damping(Phi, damping, failed)
            detail = WOODBURY_DETAIL if Phi.shape[1] < P else ""
        else:
            traces = np.trace(gram[np.asarray(failed)], axis1=1, axis2=2)
            suggestion = suggest_damping_from_traces(traces, P, damping[np.asarray(failed)])
            detail = ""
        raise not_positive_definite_error(failed, damping, suggestion, detail)
    return FisherFactor(slices, damping, P)


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
        detail = WOODBURY_DETAIL if Phi.shape[1] < Phi.shape[2] else ""
        raise not_positive_definite_error(failed, damping, suggest_damping(Phi, damping, failed),
                                          detail)
    return out


def solve_factored(factor, rhs, *, index=None):
    """Apply ``F_b^{-1}`` from a :class:`FisherFactor` to right-hand sides.

    Parameters
    ----------
    factor : FisherFactor
        From :func:`factor_fisher`.
    rhs : array_like
        With ``index=None``: shape (B, P) (one vector per slice) or (B, P, K).
        With an integer ``index``: shape (P,) or (P, K), for slice ``index`` only.
        Real, finite; used in float64.
    index : int, optional
        Solve with slice ``index`` (``0 <= index < B``) only.

    Returns
    -------
    x : ndarray, float64, shape of ``rhs``
        ``x[b] = F_b^{-1} rhs[b]`` (or ``F_index^{-1} rhs``).

    Notes
    -----
    With the Cholesky factor ``L_b`` of Eq. (31)'s Fisher (LAPACK ``potrs``), or the
    push-through form ``(rhs - Phi_b^T K_b^{-1} Phi_b rhs) / lam_b``. Forward error
    ``<= c P eps64 cond(F_b) ||F_b^{-1}|| ||rhs||`` (docs/kernels.md).
    """
    if not isinstance(factor, FisherFactor):
        raise TypeError(f"factor must be a FisherFactor from factor_fisher, got "
                        f"{type(factor).__name__}")
    B, P = len(factor), factor.proj_dim
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 0 <= int(index) < B:
            raise ValueError(f"index must satisfy 0 <= index < B={B}, got {index}")
        rhs = as_float_array(rhs, "rhs", ndim=(1, 2))
        if rhs.shape[0] != P:
            raise ValueError(f"rhs must have P={P} rows for slice {index}, got shape "
                             f"{rhs.shape}")
        if rhs.ndim == 2 and rhs.shape[1] == 0:
            raise ValueError(f"rhs is empty (shape {rhs.shape})")
        x = factor._apply(int(index), rhs.reshape(P, -1))
        return x.reshape(rhs.shape)
    rhs = as_float_array(rhs, "rhs", ndim=(2, 3))
    if rhs.shape[0] != B or rhs.shape[1] != P:
        raise ValueError(f"rhs must have shape (B, P) or (B, P, K) with B={B}, P={P}, got "
                         f"{rhs.shape}; pass index= to solve with one slice")
    if rhs.ndim == 3 and rhs.shape[2] == 0:
        raise ValueError(f"rhs is empty (shape {rhs.shape})")
    out = np.empty(rhs.shape)
    for b in range(B):
        out[b] = factor._apply(b, rhs[b].reshape(P, -1)).reshape(rhs.shape[1:])
    return out


def solve_step(gram, Psi, Gamma, *, damping, step=None):
    """One path step's term ``-Gamma (gram + damping I)^{-1} Psi^T`` and its condition.

    The single step solve of the package: the projected Fisher (``gram = Phi^T Phi``,
    P x P) and the dense unprojected curvature (n_params x n_params) both go through it.

    Parameters
    ----------
    gram : ndarray, shape (D, D)
        Undamped symmetric curvature ``C``, float64 (not modified).
    Psi : ndarray, shape (N, D)
        Directions ``J_i Delta y`` (projected or not).
    Gamma : ndarray, shape (T, D)
        Test gradients.
    damping : float
        Absolute ``lam_d >= 0`` (see :func:`iif_ref._defaults.absolute_damping`).
    step : int, optional
        Path step, named in the error.

    Returns
    -------
    scores : ndarray, shape (T, N), float64
    cond : float
        LAPACK's 1-norm condition estimate of ``C + lam_d I`` from the Cholesky factor
        that solves the step (no second factorisation).

    Raises
    ------
    iif_ref.errors.NotPositiveDefiniteError
        ``C + lam_d I`` is not positive definite to float64 working precision; the
        error names the step and a damping that fixes it.

    Notes
    -----
    Implements the update of Algorithm 1 with Eq. (17)/(31) (``-G_k F_k^{-1} (J Delta
    y)_k^T``) with the code of :func:`projected_scores_host`.
    """
    lam = float(damping)
    factor = factor_gram(gram, lam)
    if factor is None:
        where = "" if step is None else f" at path step k={step}"
        # C may be indefinite (a Hessian), so the suggestion also lifts the smallest
        # eigenvalue; eigenvalues are computed only on this failure path.
        evals = np.linalg.eigvalsh(np.asarray(gram, dtype=np.float64))
        lift = -float(evals[0]) + 1e-8 * max(abs(float(evals[-1])), 1.0)
        suggested = max(suggest_damping_from_traces(np.array([np.trace(gram)]),
                                                    gram.shape[0], np.array([lam])), lift)
        raise NotPositiveDefiniteError(
            f"C + damping*I{where} is not positive definite (to float64 working precision) "
            f"with damping = {lam:.3g}; damping={suggested:.3g} (absolute) makes it so",
            slices=(0 if step is None else step,), damping=lam,
            suggested_damping=suggested)
    return _term(factor, Psi, Gamma), 1.0 / factor.rcond
