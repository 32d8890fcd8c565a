"""Exact Gauss–Newton and empirical-Fisher solves in sample space (no n_params² matrix).

Both curvatures of the summed training loss are Gram matrices of per-sample rows::

    C = Σ_i J_iᵀ S_i J_i = BᵀB,   B_i = L_iᵀ J_i,   S_i = L_i L_iᵀ,

with ``J_i`` the ``(n_out, n_params)`` output Jacobian of sample ``i`` at θ and:

* ``"gauss_newton"``: ``S_i = ∇²_f l(f_i, ρ_i)``; ``L_i = Q V_i Λ_i^{1/2}`` from the
  eigendecomposition of ``QᵀS_iQ``, where ``Q`` spans the complement of the directions
  null for every sample (cross-entropy's ``S_i = (Σρ_i)(diag p_i − p_i p_iᵀ)`` has the
  null vector ``1``, so ``n_out − 1`` rows per sample; MSE's ``2I`` keeps all ``n_out``);
* ``"fisher"``: ``L_i = ∂_f l(f_i, ρ_i)`` (one row per sample, ``B_i = u_iᵀ``, Eq. 31).

The damped inverse is applied through the ``N × N`` Gram ``K = BBᵀ`` (``N = n_train · r``)
when ``N < n_params``, by the push-through identity ``(BᵀB + λI)⁻¹Bᵀ = Bᵀ(BBᵀ + λI)⁻¹``,
or through ``C`` itself when that is the smaller matrix. The right-hand rows
``ψ_i = J_iᵀ w_i`` (``u_i`` for the influence function, ``J_iΔy`` for a path step) are
written as ``B_iᵀ a_i`` with ``a_i = L_i⁺ w_i`` whenever ``w_i`` lies in the range of
``L_i`` up to rounding (``max_i ‖w_i − L_i a_i‖ ≤ sqrt(eps) · max_i ‖w_i‖``: always for
the built-in losses' Gauss–Newton, and for the Fisher when ``w_i ∥ ∂_f l``); then::

    −Γ (C + λI)⁻¹ Ψᵀ = −(BΓᵀ)ᵀ (K + λI)⁻¹ A,

with no cancellation. Otherwise the Woodbury form
``(C + λI)⁻¹ = (I − Bᵀ(K + λI)⁻¹B)/λ`` is used (relative rounding ``~ eps · ‖K‖/λ``, the
order of the solve's own backward error). Everything is float64.

A grid of dampings costs one factorisation: :meth:`SampleSpaceSolve.scores_grid`
eigendecomposes the Gram once, and every damping after that is two small products.
"""
from __future__ import annotations

import time

import numpy as np
import scipy.linalg
import torch
from torch.func import hessian, vmap

from iif_ref.errors import NotPositiveDefiniteError
from iif_ref._defaults import default_relative_damping
from iif_ref.neural.curvature import resolve_damping
from iif_ref.neural.functional import FunctionalModel, chunks, eval_mode, output_weights
from iif_ref.neural.plan import prepare_problem

__all__ = ["SampleSpaceSolve", "build_solve", "exact_influence", "required_bytes",
           "MemoryBudgetError", "DEFAULT_MEMORY_BUDGET", "CURVATURES"]

#: Default cap on the float64 arrays of one solve (``B``, the Gram and its factor), bytes.
DEFAULT_MEMORY_BUDGET = 4 * 2**30

CURVATURES = ("gauss_newton", "fisher")

# Eigenvalues of S_i at or below this fraction of the largest over all samples are zero
# (cross-entropy's null direction comes out at ~eps, not 0).
_RANK_TOL = 1e3 * np.finfo(np.float64).eps


class MemoryBudgetError(ValueError):
    """The sample-space solve would exceed ``memory_budget``.

    Attributes
    ----------
    n_train, n_out, n_rows, n_params, bytes_needed, memory_budget : int
    """

    def __init__(self, message, *, n_train, n_out, n_rows, n_params, bytes_needed,
                 memory_budget):
        super().__init__(message)
        self.n_train, self.n_out, self.n_rows = n_train, n_out, n_rows
        self.n_params, self.bytes_needed = n_params, bytes_needed
        self.memory_budget = memory_budget


# Largest complement (relative to max‖w_i‖) treated as rounding: sqrt(eps).
_RANGE_TOL = float(np.sqrt(np.finfo(np.float64).eps))


def required_bytes(n_rows, n_params):
    """Float64 bytes of a solve with ``n_rows = n_train · r`` rows of ``B``.

    ``B`` itself, the Gram of the smaller side and its factor (Cholesky or eigenvectors).
    The Woodbury form (Ψ outside the range of ``Bᵀ``) holds ``n_train · n_params`` more.
    """
    g = min(n_rows, n_params)
    return 8 * (n_rows * n_params + 2 * g * g)


def _output_factors(loss, F, rho, curvature):
    """``L_i``, shape ``(n, n_out, r)`` with ``S_i = L_i L_iᵀ`` for every sample."""
    if curvature == "fisher":
        return output_weights(loss, F, rho)[:, :, None]
    S = vmap(hessian(loss.fn, argnums=0))(F, rho)
    S = 0.5 * (S + S.transpose(1, 2))
    # Directions null for *every* sample (cross-entropy's 1) are found once, from Σ_i S_i
    # (PSD, so its null space is the common one), and projected out; per-sample
    # eigenvalues are then all kept, however small (a class with p ~ 1e-20 is a real,
    # tiny direction). Not Σ_i S_i/‖S_i‖: a confident sample's S_i ~ 1e-8 carries
    # rounding ~eps in its null direction, which that scaling would blow up to 1e-8.
    mu, Q = torch.linalg.eigh(S.sum(0))
    Q = Q[:, mu > _RANK_TOL * float(mu.max().clamp(min=torch.finfo(S.dtype).tiny))]
    lam, V = torch.linalg.eigh(Q.T @ S @ Q)
    return (Q @ V) * torch.sqrt(torch.clamp(lam, min=0.0))[:, None, :]


class SampleSpaceSolve:
    """``−Γ (C + λ_d I)⁻¹ Ψᵀ`` for any damping, from one Gram (built by :func:`build_solve`).

    Attributes
    ----------
    side : {"sample", "parameter"}
        Which Gram is factorised: ``K = BBᵀ`` (``n_rows²``) or ``C = BᵀB`` (``n_params²``).
    n_rows, n_params, n_test, n_train : int
        ``n_rows = n_train · r``: rows of ``B`` (``r`` per sample).
    trace : float
        ``tr(C) = ‖B‖_F²``.
    scale : float
        ``tr(C) / n_params``, the scale of the relative damping rule.
    form : {"range", "woodbury", "parameter"}
        How ``Ψ`` enters (see the module notes).
    complement : float
        ``max_i ‖w_i − L_i a_i‖ / max_i ‖w_i‖``: the part of ``Ψ`` outside the range of
        ``Bᵀ`` (at most ``sqrt(eps)`` in the ``"range"`` form, where it is dropped).
    timings : dict of str -> float
        Seconds for the factors ``B``, the Gram, and each factorisation.
    """

    def __init__(self, gram, left, rhs, direct, *, side, form, trace, n_rows, n_params,
                 complement, timings):
        self.gram, self._left, self._rhs, self._direct = gram, left, rhs, direct
        self.side, self.form = side, form
        self.n_rows = int(n_rows)
        self.n_params = int(n_params)
        self.n_test, self.n_train = left.shape[1], rhs.shape[1]
        self.trace = float(trace)
        self.scale = self.trace / self.n_params
        self.complement = float(complement)
        self.timings = dict(timings)
        self._eig = None

    @property
    def singular(self):
        """True when ``C = BᵀB`` has rank ``< n_params`` by shape (sample side)."""
        return self.side == "sample"

    def summary(self):
        """What a result records of this solve: side, form, sizes, scale, timings."""
        return {"side": self.side, "form": self.form, "n_rows": self.n_rows,
                "n_params": self.n_params, "trace_per_param": self.scale,
                "complement": self.complement, "timings": dict(self.timings)}

    def resolve(self, damping, *, relative=None):
        """Absolute λ_d for ``damping`` (a number, or "auto": the package's damping rule
        :func:`~iif_ref._defaults.absolute_damping` on ``tr(C)`` and ``n_params`` with
        ``relative``, by default the exact influence function's measured value)."""
        if relative is None:
            relative = default_relative_damping("if", projected=False)
        return resolve_damping(damping, self.trace, self.n_params, relative=relative)

    def _check(self, lam_d):
        if not np.isfinite(lam_d) or lam_d < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {lam_d!r}")
        if self.singular and lam_d == 0:
            raise NotPositiveDefiniteError(
                f"damping 0 on a curvature of rank <= {self.gram.shape[0]} < n_params="
                f"{self.n_params}: C = BᵀB is singular; pass damping > 0 (e.g. \"auto\" = "
                f"{self.resolve('auto'):.3g})", damping=0.0,
                suggested_damping=self.resolve("auto"))

    def _finish(self, core, lam_d):
        if self._direct is None:
            return -core
        return -(self._direct - core) / lam_d

    def scores(self, damping="auto", *, relative=None):
        """Scores ``(n_test, n_train)`` and the condition number of ``C + λ_d I``.

        Uses the eigendecomposition when :meth:`scores_grid` has computed it, else one
        Cholesky factor of the damped Gram (``g³/3`` flops against eigh's ``~4g³``).
        ``relative`` is the ``r`` of ``damping="auto"`` (see :meth:`resolve`).

        Returns
        -------
        scores : ndarray, shape (n_test, n_train)
        cond : float
            Exact 2-norm condition number with the eigendecomposition; otherwise an
            upper bound (sample side: ``(‖K‖₁ + λ_d)/λ_d``) or LAPACK's 1-norm estimate.
        lam_d : float
            The absolute damping used.
        """
        lam_d = self.resolve(damping, relative=relative)
        self._check(lam_d)
        if self._eig is not None:
            return self._eig_scores(lam_d) + (lam_d,)
        t0 = time.perf_counter()
        F = torch.from_numpy(self.gram).clone()
        F.diagonal().add_(lam_d)
        anorm = float(F.abs().sum(0).max())
        # torch's LAPACK: its Cholesky ran 10x faster than SciPy's dpotrf at g = 4,000
        # on the 2-core reference machine.
        c, info = torch.linalg.cholesky_ex(F)
        del F
        if int(info) != 0:
            raise NotPositiveDefiniteError(
                f"C + {lam_d:.3g} I is not positive definite (Cholesky failed at pivot "
                f"{int(info)}); raise damping (\"auto\" = {self.resolve('auto'):.3g})",
                damping=lam_d, suggested_damping=max(self.resolve("auto"), 2 * lam_d))
        X = torch.cholesky_solve(torch.from_numpy(self._left), c).numpy()
        scores = self._finish(X.T @ self._rhs, lam_d)
        if self.singular:
            cond = anorm / lam_d
        else:
            # c.T is the upper factor U = Lᵀ (A = UᵀU) as a Fortran array, no copy.
            rcond, _ = scipy.linalg.lapack.dpocon(c.numpy().T, anorm, uplo="U")
            cond = 1.0 / rcond if rcond > 0 else float("inf")
        self.timings["cholesky_s"] = time.perf_counter() - t0
        return scores, float(cond), lam_d

    def eigendecompose(self):
        """Eigendecompose the Gram once (``~4g³`` flops); later calls are cheap."""
        if self._eig is None:
            t0 = time.perf_counter()
            e, V = torch.linalg.eigh(torch.from_numpy(self.gram))
            e, V = np.clip(e.numpy(), 0.0, None), V.numpy()   # negative: rounding
            P, Q = V.T @ self._left, V.T @ self._rhs
            self._eig = (e, P, Q)
            self.timings["eigh_s"] = time.perf_counter() - t0
        return self._eig

    def _eig_scores(self, lam_d):
        e, P, Q = self._eig
        core = (P / (e + lam_d)[:, None]).T @ Q
        lo = lam_d if self.singular else float(e[0]) + lam_d
        cond = (float(e[-1]) + lam_d) / lo if lo > 0 else float("inf")
        return self._finish(core, lam_d), cond

    def scores_grid(self, dampings):
        """Scores for every damping of ``dampings`` from one eigendecomposition.

        Parameters
        ----------
        dampings : sequence of float or "auto"
            Absolute λ_d (e.g. ``r * solve.scale`` for relative values ``r``).

        Returns
        -------
        list of (scores, cond, lam_d)
            As from :meth:`scores`, one per damping, in order.
        """
        lams = [self.resolve(d) for d in dampings]
        for lam_d in lams:
            self._check(lam_d)
        self.eigendecompose()
        return [self._eig_scores(lam_d) + (lam_d,) for lam_d in lams]


def build_solve(fm, loss, params, X, rho, X_test, Y_test, *, rho_from=None,
                curvature="gauss_newton", memory_budget=DEFAULT_MEMORY_BUDGET,
                chunk_size=256):
    """Build the sample-space solve of one curvature at θ = ``params``.

    Parameters
    ----------
    fm : FunctionalModel
    loss : TargetLinearLoss
    params : dict of str -> tensor
        θ at which ``C``, ``Ψ`` and ``Γ`` are evaluated.
    X : tensor, shape (n_train, ...)
    rho : tensor, shape (n_train, n_out)
        Targets of the curvature and of ``Ψ``: ``C = C(θ; ρ)``.
    X_test, Y_test : tensors, shapes (n_test, ...), (n_test, n_out)
        ``Γ`` rows are the test-loss gradients ``J_tᵀ ∂_f l(f_t, y_t)``.
    rho_from : tensor, shape (n_train, n_out), optional
        ``Ψ`` rows are ``J_iᵀ(∂_f l(f_i, ρ_i) − ∂_f l(f_i, ρ_from,i))`` (``J_iΔy`` of a
        path step, Eq. 23–24); without it the per-sample gradients ``u_i``.
    curvature : {"gauss_newton", "fisher"}
    memory_budget : int
        Bytes allowed for :func:`required_bytes`.
    chunk_size : int
        Training samples per batch of vector–Jacobian products.

    Returns
    -------
    SampleSpaceSolve

    Raises
    ------
    ValueError
        Unknown ``curvature``.
    MemoryBudgetError
        ``B``, the Gram and its factor need more than ``memory_budget`` bytes (the
        message names ``n_train``, ``n_out``, the rows per sample, ``n_params`` and the
        bytes); a ``ValueError``.
    TypeError
        ``memory_budget`` is not a number.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES} for the sample-space "
                         f"solve, got {curvature!r}")
    if not isinstance(memory_budget, (int, float, np.integer, np.floating)) or isinstance(
            memory_budget, bool):
        raise TypeError(f"memory_budget must be a number of bytes, got "
                        f"{type(memory_budget).__name__}")
    t0 = time.perf_counter()
    timings = {}
    if fm.dtype != torch.float64:      # the oracle is float64 whatever the model's dtype
        fm = FunctionalModel(fm.model, dtype="float64")
    params = {n: params[n].to(torch.float64) for n in fm.names}
    X, X_test = _as64(X), _as64(X_test)
    rho, Y_test = _as64(rho), _as64(Y_test)
    n, M = X.shape[0], fm.n_params
    with torch.no_grad():
        F = torch.cat([fm.forward(params, X[s:e]) for s, e in chunks(n, chunk_size)])
        L = _output_factors(loss, F, rho, curvature)
        w = output_weights(loss, F, rho)
        if rho_from is not None:
            w = w - output_weights(loss, F, _as64(rho_from))
    n_out, r = L.shape[1], L.shape[2]
    N = n * r
    need = required_bytes(N, M)
    if need > memory_budget:
        raise MemoryBudgetError(
            f"the exact {curvature} solve needs {need / 2**30:.2f} GiB (float64 B of "
            f"{N} x {M} rows = n_train={n} x {r} of n_out={n_out}, by n_params={M}, plus "
            f"a {min(N, M)}^2 Gram and its factor: {need} bytes) but memory_budget="
            f"{int(memory_budget)} bytes; raise memory_budget, use fewer training samples, "
            "or project (proj_dim / solver='projected')", n_train=n, n_out=n_out, n_rows=N,
            n_params=M, bytes_needed=need, memory_budget=int(memory_budget))
    # a_i = L_i⁺ w_i; the complement says whether Ψ lies in the range of Bᵀ.
    a = (torch.linalg.pinv(L) @ w[:, :, None])[:, :, 0]
    # Relative to the largest ‖w_i‖: a well-fitted sample's tiny w_i carries the
    # eigensolver's absolute rounding, which is not a part of Ψ outside range(Bᵀ).
    resid = torch.linalg.vector_norm(w - (L @ a[:, :, None])[:, :, 0], dim=1)
    wmax = float(torch.linalg.vector_norm(w, dim=1).max()) if n else 0.0
    complement = float(resid.max()) / wmax if wmax > 0 else 0.0
    B = np.empty((N, M))
    for s, e in chunks(n, chunk_size):
        B[s * r:e * r] = fm.per_sample_vjp(params, X[s:e], L[s:e].transpose(1, 2)) \
            .reshape((e - s) * r, M).numpy()
    with torch.no_grad():
        Wt = output_weights(loss, fm.forward(params, X_test), Y_test)
    Gamma = _psi_rows(fm, params, X_test, Wt, chunk_size)
    timings["factors_s"] = time.perf_counter() - t0
    trace = float(np.einsum("ij,ij->", B, B))
    if not (np.isfinite(trace) and np.isfinite(Gamma).all()):
        raise ValueError("non-finite per-sample Jacobian rows or test-loss gradients at "
                         "these parameters (check the model and data for inf/NaN)")
    # S_i and w_i come from autodiff with absolute rounding ~eps; on a well-fitted sample
    # (p_y ≈ 1, cancellation in p − p²) their ranges then disagree at ~1e-12 of max‖w‖.
    # That is rounding, not a part of Ψ outside range(Bᵀ); an O(1) complement (Fisher
    # with w_i not parallel to ∂_f l) is, and takes the Woodbury form.
    in_range = complement <= _RANGE_TOL
    A = None
    if in_range:
        A = np.zeros((N, n))
        A[np.arange(N), np.repeat(np.arange(n), r)] = a.reshape(-1).numpy()
    if N < M:
        side = "sample"
        gram = _syrk(B, side=side)
        left = B @ Gamma.T
        if in_range:
            form, rhs, direct = "range", A, None
        else:
            Psi = _psi_rows(fm, params, X, w, chunk_size)
            form, rhs, direct = "woodbury", B @ Psi.T, Gamma @ Psi.T
    else:
        side, form, direct = "parameter", "parameter", None
        gram = _syrk(B, side=side)
        left = np.ascontiguousarray(Gamma.T)
        rhs = (B.T @ A) if in_range else _psi_rows(fm, params, X, w, chunk_size).T
    timings["gram_s"] = time.perf_counter() - t0 - timings["factors_s"]
    return SampleSpaceSolve(gram, left, rhs, direct, side=side, form=form, trace=trace,
                            n_rows=N, n_params=M, complement=complement, timings=timings)


def _as64(t):
    return torch.as_tensor(t).to(torch.float64)


def _psi_rows(fm, params, X, w, chunk_size):
    """``ψ_i = J_iᵀ w_i``, shape (n_train, n_params), float64."""
    out = [fm.per_sample_vjp(params, X[s:e], w[s:e, None, :])[:, 0].numpy()
           for s, e in chunks(X.shape[0], chunk_size)]
    return np.concatenate(out)


def _syrk(B, *, side):
    """The Gram of ``B`` (rows, cols) with BLAS syrk, half the flops of a GEMM:
    ``B Bᵀ`` for ``side="sample"``, ``Bᵀ B`` for ``side="parameter"``; both triangles."""
    # B is C-contiguous, so B.T is the Fortran array syrk reads without a copy.
    K = scipy.linalg.blas.dsyrk(1.0, B.T, trans=1 if side == "sample" else 0, lower=1)
    return np.tril(K) + np.tril(K, -1).T


def exact_influence(model, loss, X_train, y_train, X_test, y_test, *,
                    curvature="gauss_newton", memory_budget=DEFAULT_MEMORY_BUDGET,
                    chunk_size=256):
    """The exact influence function at θ* as a solve for any damping.

    ``IF[t, i] = −∇l(ẑ_t; θ*) (C + λ_d I)⁻¹ ∇l(z_i; θ*)`` with ``C`` the Gauss–Newton
    matrix or the empirical Fisher of the summed training loss, float64.

    Parameters
    ----------
    model, loss, X_train, y_train, X_test, y_test
        As in :func:`~iif_ref.neural.integrated_influence`.
    curvature : {"gauss_newton", "fisher"}
    memory_budget : int
        Bytes (default :data:`DEFAULT_MEMORY_BUDGET`, 4 GiB).
    chunk_size : int

    Returns
    -------
    SampleSpaceSolve
        ``.scores(damping)`` (Cholesky) and ``.scores_grid(dampings)`` (one
        eigendecomposition); ``.scale = tr(C)/n_params`` for relative dampings.

    Notes
    -----
    Implements the influence function of Lemma 2.5 / Corollary 2.6 (IIF with ``K = 1``
    and baseline ``f(x; θ*)``) with the Gauss–Newton curvature (exact Hessian for MSE
    and a model linear in θ) or the Fisher of Eq. (31), unprojected.

    Examples
    --------
    >>> import torch
    >>> from iif_ref.neural.sample_space import exact_influence
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(20, 3, dtype=torch.float64)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
    ...                           torch.nn.Linear(4, 2)).double()
    >>> ex = exact_influence(net, "mse", X, torch.randn(20, 2, dtype=torch.float64),
    ...                      X[:3], torch.zeros(3, 2, dtype=torch.float64))
    >>> [s.shape for s, _, _ in ex.scores_grid([0.1, 1.0])]
    [(3, 20), (3, 20)]
    """
    with eval_mode(model):
        prob = prepare_problem(model, loss, X_train, y_train, X_test, y_test,
                               dtype="float64")
        return build_solve(prob.fm, prob.loss, prob.fm.theta_star, prob.X, prob.Y,
                           prob.X_test, prob.Y_test, curvature=curvature,
                           memory_budget=memory_budget, chunk_size=chunk_size)
