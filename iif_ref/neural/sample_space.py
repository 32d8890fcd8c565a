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

The sample-side Gram comes one of two ways (``gram=`` of :func:`build_solve`):

* ``"factors"`` (the default where it applies: a stack of Linear layers with ``N <
  n_params``): from the layer factors of :mod:`iif_ref.neural.layer_gram`, never ``B``,
  formed in place block by block and factorised in place (LAPACK ``potrf`` through torch
  on the same memory), so the peak is the ``N × N`` Gram plus ``O(N · n_test)`` and one
  block; the Gram is formed again for each damping instead of being kept (forming it is
  ``N² Σ_l out_l`` flops against the factor's ``N³/3``). The test rows ``BΓᵀ`` and, in
  the Woodbury form, ``BΨᵀ`` and ``ΓΨᵀ`` come from the factors the same way.
* ``"rows"``: ``B`` itself (per-sample VJPs), its Gram by BLAS ``syrk``; any model.

A grid of dampings costs one Cholesky factor per damping, or one eigendecomposition of
the Gram for all of them (:meth:`SampleSpaceSolve.scores_grid`), which pays off from
about :data:`EIGH_BREAK_EVEN` dampings.
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
from iif_ref.neural.layer_gram import (BLOCK_BYTES, LayerFactors, cross_products,
                                       fill_gram_upper)
from iif_ref.neural.plan import prepare_problem

__all__ = ["SampleSpaceSolve", "build_solve", "exact_influence", "required_bytes",
           "resolve_memory_budget", "MemoryBudgetError", "DEFAULT_MEMORY_BUDGET",
           "CURVATURES", "GRAM_SOURCES", "EIGH_BREAK_EVEN"]

#: Default cap on the float64 arrays of one solve: ``"auto"`` is
#: :data:`AUTO_BUDGET_FRACTION` of the memory available when the solve starts
#: (:func:`resolve_memory_budget`), so the exact solve runs wherever the machine can
#: hold it and falls back (with a warning) where it cannot.
DEFAULT_MEMORY_BUDGET = "auto"

#: Share of the available memory that ``memory_budget="auto"`` allows: the exact solve
#: of 4,000 MNIST images on the paper's MLP (a 36,000² Gram of 9.7 GiB, 10.8 GiB in all
#: with 1,000 test images) runs where 16.2 GiB are available (a 24 GiB machine), and a
#: third of what is available is left to everything else.
AUTO_BUDGET_FRACTION = 2 / 3

#: Budget where the available memory cannot be read (neither /proc/meminfo nor psutil).
FALLBACK_MEMORY_BUDGET = 4 * 2**30

CURVATURES = ("gauss_newton", "fisher")

GRAM_SOURCES = ("auto", "factors", "rows")

#: Dampings from which one eigendecomposition of the Gram beats a Cholesky factor per
#: damping. Measured with torch's LAPACK on the 2-core reference machine: eigh took
#: 20x a Cholesky factor at g = 9,000 (load ~5; docs/algorithm1.md) and 54-150x at
#: g = 1,000-3,000 under a load of 15.
EIGH_BREAK_EVEN = 20

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


def required_bytes(n_rows, n_params, *, n_test=0, factor_bytes=None):
    """Float64 bytes of a solve with ``n_rows = n_train · r`` rows of ``B``.

    Parameters
    ----------
    n_rows, n_params : int
    n_test : int, keyword-only
        Test rows (counted by the factor path only, whose other terms are smaller).
    factor_bytes : int or None, keyword-only
        Bytes of the layer factors: the Gram from factors (``N < n_params``). None: from
        the rows of ``B``.

    Returns
    -------
    int
        From the rows: ``B`` itself, the Gram of the smaller side and its factor
        (Cholesky or eigenvectors); the Woodbury form (Ψ outside the range of ``Bᵀ``)
        holds ``n_train · n_params`` more. From factors: the ``N × N`` Gram, factorised
        in place, the test rows ``BΓᵀ`` and the two triangular solves with them
        (``3 N n_test``), one block of scratch and the factors.
    """
    if factor_bytes is None:
        g = min(n_rows, n_params)
        return 8 * (n_rows * n_params + 2 * g * g)
    return 8 * (n_rows * n_rows + 3 * n_rows * n_test) + BLOCK_BYTES + int(factor_bytes)


def _available_memory_bytes():
    """MemAvailable of /proc/meminfo, else psutil's, else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def resolve_memory_budget(memory_budget):
    """Bytes of ``memory_budget``: a number as given, ``"auto"`` from the machine.

    ``"auto"`` is :data:`AUTO_BUDGET_FRACTION` of the memory available now (Linux
    ``MemAvailable``, else psutil), or :data:`FALLBACK_MEMORY_BUDGET` where neither
    can be read.

    Raises
    ------
    TypeError
        Neither a number nor ``"auto"``.
    ValueError
        A number that is not finite and positive.
    """
    if isinstance(memory_budget, str):
        if memory_budget != "auto":
            raise ValueError(f"memory_budget must be a number of bytes or 'auto', got "
                             f"{memory_budget!r}")
        available = _available_memory_bytes()
        if available is None:
            return FALLBACK_MEMORY_BUDGET
        return int(AUTO_BUDGET_FRACTION * available)
    if not isinstance(memory_budget, (int, float, np.integer, np.floating)) or isinstance(
            memory_budget, bool):
        raise TypeError(f"memory_budget must be a number of bytes or 'auto', got "
                        f"{type(memory_budget).__name__}")
    if not (np.isfinite(memory_budget) and memory_budget > 0):
        raise ValueError(f"memory_budget must be a positive number of bytes, got "
                         f"{memory_budget!r}")
    return int(memory_budget)


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


class _StoredGram:
    """A Gram held in memory (from the rows of ``B``, either side)."""

    source = "rows"

    def __init__(self, matrix):
        self.matrix = matrix
        self.size = matrix.shape[0]
        self._norm1 = None

    def damped(self, lam_d):
        """A copy of ``K + λ_d I`` in Fortran order and ``‖K‖₁``."""
        if self._norm1 is None:
            self._norm1 = float(np.abs(self.matrix).sum(0).max()) if self.size else 0.0
        F = np.array(self.matrix, order="F")
        F.flat[::self.size + 1] += lam_d
        return F, self._norm1

    def for_eigh(self):
        return self.matrix, "L"


class _FactoredGram:
    """A Gram formed from layer factors whenever it is needed, never kept."""

    source = "factors"

    def __init__(self, factors):
        self.factors = factors
        self.size = factors.n_rows
        self.matrix = None

    def _upper(self):
        K = np.empty((self.size, self.size))
        return K, fill_gram_upper(self.factors, K)

    def damped(self, lam_d):
        """``K + λ_d I`` in the lower triangle of a Fortran-order array (no other copy
        exists) and ``‖K‖₁``."""
        K, norm1 = self._upper()
        K.flat[::self.size + 1] += lam_d
        return K.T, norm1

    def for_eigh(self):
        return self._upper()[0], "U"


class SampleSpaceSolve:
    """``−Γ (C + λ_d I)⁻¹ Ψᵀ`` for any damping, from one Gram (built by :func:`build_solve`).

    Attributes
    ----------
    side : {"sample", "parameter"}
        Which Gram is factorised: ``K = BBᵀ`` (``n_rows²``) or ``C = BᵀB`` (``n_params²``).
    gram_from : {"factors", "rows"}
        Whether the Gram is formed from layer factors (and again for each damping) or
        from the rows of ``B`` (and kept).
    gram : ndarray or None
        The Gram from the rows of ``B``; None when it is formed from factors.
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
    memory_budget : int
        Bytes the solve was allowed (an eigendecomposition must fit it too).
    timings : dict of str -> float
        Seconds for the factors ``B``, the Gram, and each factorisation.
    """

    def __init__(self, gram, left, rhs, direct, *, side, form, trace, n_rows, n_params,
                 n_train, complement, memory_budget, timings):
        self._source = gram if isinstance(gram, (_StoredGram, _FactoredGram)) \
            else _StoredGram(gram)
        self._left, self._rhs, self._direct = left, rhs, direct
        self.side, self.form = side, form
        self.n_rows = int(n_rows)
        self.n_params = int(n_params)
        self.n_test, self.n_train = left.shape[1], int(n_train)
        self.trace = float(trace)
        self.scale = self.trace / self.n_params
        self.complement = float(complement)
        self.memory_budget = int(memory_budget)
        self.timings = dict(timings)
        self._eig = None

    @property
    def gram(self):
        return self._source.matrix

    @property
    def gram_from(self):
        return self._source.source

    @property
    def singular(self):
        """True when ``C = BᵀB`` has rank ``< n_params`` by shape (sample side)."""
        return self.side == "sample"

    def summary(self):
        """What a result records of this solve: side, form, Gram source, sizes, scale,
        budget, timings."""
        return {"side": self.side, "form": self.form, "gram_from": self.gram_from,
                "n_rows": self.n_rows, "n_params": self.n_params,
                "trace_per_param": self.scale, "complement": self.complement,
                "memory_budget": self.memory_budget, "timings": dict(self.timings)}

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
                f"damping 0 on a curvature of rank <= {self._source.size} < n_params="
                f"{self.n_params}: C = BᵀB is singular; pass damping > 0 (e.g. \"auto\" = "
                f"{self.resolve('auto'):.3g})", damping=0.0,
                suggested_damping=self.resolve("auto"))

    def _times_rhs(self, X):
        """``Xᵀ A`` for ``X`` of shape ``(N, c)``: shape ``(c, n_train)``. In the range
        form ``A`` is block diagonal (``a_i`` in the rows of sample ``i``) and kept as
        its ``(n_train, r)`` blocks."""
        if self.form != "range":
            return X.T @ self._rhs
        a = self._rhs
        return np.einsum("irc,ir->ci", X.reshape(a.shape[0], a.shape[1], -1), a)

    def _finish(self, core, lam_d):
        if self._direct is None:
            return -core
        return -(self._direct - core) / lam_d

    def scores(self, damping="auto", *, relative=None):
        """Scores ``(n_test, n_train)`` and the condition number of ``C + λ_d I``.

        Uses the eigendecomposition when :meth:`scores_grid` has computed it, else one
        Cholesky factor of the damped Gram (``g³/3`` flops against eigh's ``~4g³``),
        computed in place of the Gram (from factors) or of one copy of it (from rows).
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
        F, norm1 = self._source.damped(lam_d)
        anorm = norm1 + lam_d
        self.timings["gram_s" if self.gram_from == "factors" else "copy_s"] = \
            time.perf_counter() - t0
        t1 = time.perf_counter()
        # torch's LAPACK factorises the Fortran-order array in place (out= the input:
        # no copy; its Cholesky ran 10x faster than SciPy's dpotrf at g = 4,000 on the
        # 2-core reference machine).
        c = torch.from_numpy(F)
        info = torch.empty((), dtype=torch.int32)
        torch.linalg.cholesky_ex(c, out=(c, info))
        if int(info) != 0:
            raise NotPositiveDefiniteError(
                f"C + {lam_d:.3g} I is not positive definite (Cholesky failed at pivot "
                f"{int(info)}); raise damping (\"auto\" = {self.resolve('auto'):.3g})",
                damping=lam_d, suggested_damping=max(self.resolve("auto"), 2 * lam_d))
        left = torch.from_numpy(self._left)
        X = torch.linalg.solve_triangular(
            c.mT, torch.linalg.solve_triangular(c, left, upper=False), upper=True).numpy()
        scores = self._finish(self._times_rhs(X), lam_d)
        if self.singular:
            cond = anorm / lam_d
        else:
            rcond, _ = scipy.linalg.lapack.dpocon(F, anorm, uplo="L")
            cond = 1.0 / rcond if rcond > 0 else float("inf")
        del c, F
        self.timings["cholesky_s"] = time.perf_counter() - t1
        return scores, float(cond), lam_d

    def eigendecompose(self):
        """Eigendecompose the Gram once (``~4g³`` flops); later calls are cheap."""
        if self._eig is None:
            t0 = time.perf_counter()
            K, uplo = self._source.for_eigh()
            e, V = torch.linalg.eigh(torch.from_numpy(K), UPLO=uplo)
            del K
            e, V = np.clip(e.numpy(), 0.0, None), V.numpy()   # negative: rounding
            P, Q = V.T @ self._left, self._times_rhs(V)
            self._eig = (e, P, Q)
            self.timings["eigh_s"] = time.perf_counter() - t0
        return self._eig

    def _eig_scores(self, lam_d):
        e, P, Q = self._eig
        core = (P / (e + lam_d)[:, None]).T @ Q
        lo = lam_d if self.singular else float(e[0]) + lam_d
        cond = (float(e[-1]) + lam_d) / lo if lo > 0 else float("inf")
        return self._finish(core, lam_d), cond

    def scores_grid(self, dampings, *, method="auto"):
        """Scores for every damping of ``dampings``.

        Parameters
        ----------
        dampings : sequence of float or "auto"
            Absolute λ_d (e.g. ``r * solve.scale`` for relative values ``r``).
        method : {"auto", "eigh", "cholesky"}, keyword-only
            ``"eigh"``: one eigendecomposition of the Gram for all (``~4g³`` flops and
            three ``g × g`` arrays); ``"cholesky"``: :meth:`scores` per damping (``g³/3``
            each, one array); ``"auto"``: ``"eigh"`` from :data:`EIGH_BREAK_EVEN`
            dampings on when the three arrays fit :attr:`memory_budget`.

        Returns
        -------
        list of (scores, cond, lam_d)
            As from :meth:`scores`, one per damping, in order.
        """
        if method not in ("auto", "eigh", "cholesky"):
            raise ValueError(f"method must be 'auto', 'eigh' or 'cholesky', got {method!r}")
        lams = [self.resolve(d) for d in dampings]
        for lam_d in lams:
            self._check(lam_d)
        if method == "auto":
            fits = 3 * 8 * self._source.size ** 2 <= self.memory_budget
            method = "eigh" if (len(lams) >= EIGH_BREAK_EVEN and fits) else "cholesky"
        if method == "eigh" or self._eig is not None:
            self.eigendecompose()
            return [self._eig_scores(lam_d) + (lam_d,) for lam_d in lams]
        return [self.scores(lam_d) for lam_d in lams]


def build_solve(fm, loss, params, X, rho, X_test, Y_test, *, rho_from=None,
                curvature="gauss_newton", memory_budget=DEFAULT_MEMORY_BUDGET,
                gram="auto", chunk_size=256):
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
    memory_budget : int or "auto"
        Bytes allowed for :func:`required_bytes` (``"auto"``: see
        :func:`resolve_memory_budget`).
    gram : {"auto", "factors", "rows"}
        Where the Gram comes from (module notes): ``"auto"`` takes the layer factors
        when the model gives them, ``N < n_params`` and they fit ``memory_budget``,
        else the rows of ``B``; ``"factors"`` refuses a model without them.
    chunk_size : int
        Training samples per batch of vector–Jacobian products.

    Returns
    -------
    SampleSpaceSolve

    Raises
    ------
    ValueError
        Unknown ``curvature`` or ``gram``; ``gram="factors"`` where the model gives no
        layer factors or ``N >= n_params``.
    MemoryBudgetError
        Neither source fits ``memory_budget`` (the message names ``n_train``,
        ``n_out``, the rows per sample, ``n_params`` and the bytes); a ``ValueError``.
    TypeError
        ``memory_budget`` is neither a number nor ``"auto"``.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES} for the sample-space "
                         f"solve, got {curvature!r}")
    if gram not in GRAM_SOURCES:
        raise ValueError(f"gram must be one of {GRAM_SOURCES}, got {gram!r}")
    budget = resolve_memory_budget(memory_budget)
    t0 = time.perf_counter()
    timings = {}
    if fm.dtype != torch.float64:      # the oracle is float64 whatever the model's dtype
        fm = FunctionalModel(fm.model, dtype="float64")
    params = {n: params[n].to(torch.float64) for n in fm.names}
    X, X_test = _as64(X), _as64(X_test)
    rho, Y_test = _as64(rho), _as64(Y_test)
    n, M, T = X.shape[0], fm.n_params, X_test.shape[0]
    with torch.no_grad():
        F = torch.cat([fm.forward(params, X[s:e]) for s, e in chunks(n, chunk_size)])
        L = _output_factors(loss, F, rho, curvature)
        w = output_weights(loss, F, rho)
        if rho_from is not None:
            w = w - output_weights(loss, F, _as64(rho_from))
        Wt = output_weights(loss, fm.forward(params, X_test), Y_test)
    n_out, r = L.shape[1], L.shape[2]
    N = n * r
    # a_i = L_i⁺ w_i; the complement says whether Ψ lies in the range of Bᵀ.
    a = (torch.linalg.pinv(L) @ w[:, :, None])[:, :, 0]
    # Relative to the largest ‖w_i‖: a well-fitted sample's tiny w_i carries the
    # eigensolver's absolute rounding, which is not a part of Ψ outside range(Bᵀ).
    resid = torch.linalg.vector_norm(w - (L @ a[:, :, None])[:, :, 0], dim=1)
    wmax = float(torch.linalg.vector_norm(w, dim=1).max()) if n else 0.0
    complement = float(resid.max()) / wmax if wmax > 0 else 0.0
    # S_i and w_i come from autodiff with absolute rounding ~eps; on a well-fitted sample
    # (p_y ≈ 1, cancellation in p − p²) their ranges then disagree at ~1e-12 of max‖w‖.
    # That is rounding, not a part of Ψ outside range(Bᵀ); an O(1) complement (Fisher
    # with w_i not parallel to ∂_f l) is, and takes the Woodbury form.
    in_range = complement <= _RANGE_TOL
    sizes = dict(n_train=n, n_out=n_out, n_rows=N, n_params=M, memory_budget=budget)

    factors = None
    if gram in ("auto", "factors") and N < M:
        factors = LayerFactors.from_model(fm, params, X, L.transpose(1, 2).contiguous(),
                                          chunk_size=chunk_size)
        test_factors = None if factors is None else LayerFactors.from_model(
            fm, params, X_test, Wt[:, None, :], chunk_size=chunk_size)
        if factors is None or test_factors is None:
            if gram == "factors":
                raise ValueError("gram='factors' needs a model whose parameters are all "
                                 "Linear layers in nn.Sequential stacks (per-sample VJP "
                                 "factors); use gram='rows'")
            factors = None
    elif gram == "factors":
        raise ValueError(f"gram='factors' forms the sample-side Gram (N = {N} rows < "
                         f"n_params = {M}); here N >= n_params, use gram='rows'")
    need_rows = required_bytes(N, M)
    if factors is not None:
        extra = 8 * N * n if not in_range else 0       # BΨᵀ of the Woodbury form
        need = required_bytes(N, M, n_test=T,
                              factor_bytes=factors.nbytes + test_factors.nbytes) + extra
        if need > budget and gram == "auto" and need_rows <= budget:
            factors = None
        elif need > budget:
            raise MemoryBudgetError(
                f"the exact {curvature} solve needs {need / 2**30:.2f} GiB from layer "
                f"factors (a {N}^2 float64 Gram of n_train={n} x {r} rows of n_out="
                f"{n_out}, plus test rows and factors: {need} bytes; {need_rows} bytes "
                f"from the rows of B, n_params={M}) but memory_budget={budget} bytes"
                f"{_budget_note(memory_budget)}; raise memory_budget, use fewer training "
                "samples, or project (proj_dim / solver='projected')",
                bytes_needed=need, **sizes)
    if factors is None and need_rows > budget:
        raise MemoryBudgetError(
            f"the exact {curvature} solve needs {need_rows / 2**30:.2f} GiB (float64 B of "
            f"{N} x {M} rows = n_train={n} x {r} of n_out={n_out}, by n_params={M}, plus "
            f"a {min(N, M)}^2 Gram and its factor: {need_rows} bytes) but memory_budget="
            f"{budget} bytes{_budget_note(memory_budget)}; raise memory_budget, use "
            "fewer training samples, or project (proj_dim / solver='projected')",
            bytes_needed=need_rows, **sizes)
    common = dict(n_rows=N, n_params=M, n_train=n, complement=complement,
                  memory_budget=budget, timings=timings)
    a_blocks = a.numpy()
    if factors is not None:
        left = cross_products(factors, test_factors)
        trace = float(factors.squared_norms().sum())
        _check_finite(trace, left, test_factors.squared_norms())
        if in_range:
            form, rhs, direct = "range", a_blocks, None
        else:
            psi = LayerFactors.from_model(fm, params, X, w[:, None, :],
                                          chunk_size=chunk_size)
            form, rhs, direct = ("woodbury", cross_products(factors, psi),
                                 cross_products(test_factors, psi))
        timings["factors_s"] = time.perf_counter() - t0
        return SampleSpaceSolve(_FactoredGram(factors), left, rhs, direct, side="sample",
                                form=form, trace=trace, **common)
    B = np.empty((N, M))
    for s, e in chunks(n, chunk_size):
        B[s * r:e * r] = fm.per_sample_vjp(params, X[s:e], L[s:e].transpose(1, 2)) \
            .reshape((e - s) * r, M).numpy()
    Gamma = _psi_rows(fm, params, X_test, Wt, chunk_size)
    timings["factors_s"] = time.perf_counter() - t0
    trace = float(np.einsum("ij,ij->", B, B))
    _check_finite(trace, Gamma)
    if N < M:
        side = "sample"
        K = _syrk(B, side=side)
        left = B @ Gamma.T
        if in_range:
            form, rhs, direct = "range", a_blocks, None
        else:
            Psi = _psi_rows(fm, params, X, w, chunk_size)
            form, rhs, direct = "woodbury", B @ Psi.T, Gamma @ Psi.T
    else:
        side, form, direct = "parameter", "parameter", None
        K = _syrk(B, side=side)
        left = np.ascontiguousarray(Gamma.T)
        if in_range:   # Bᵀ A with A's blocks a_i: Σ_j a_ij B_(i r + j)
            rhs = np.ascontiguousarray(
                np.einsum("irm,ir->mi", B.reshape(n, r, M), a_blocks))
        else:
            rhs = _psi_rows(fm, params, X, w, chunk_size).T
    timings["gram_s"] = time.perf_counter() - t0 - timings["factors_s"]
    return SampleSpaceSolve(K, left, rhs, direct, side=side, form=form, trace=trace,
                            **common)


def _budget_note(memory_budget):
    if isinstance(memory_budget, str):
        return (f" (memory_budget='auto': {AUTO_BUDGET_FRACTION:.3g} of the memory "
                "available now)")
    return ""


def _check_finite(trace, *arrays):
    if not (np.isfinite(trace) and all(bool(np.isfinite(np.asarray(x)).all())
                                       for x in arrays)):
        raise ValueError("non-finite per-sample Jacobian rows or test-loss gradients at "
                         "these parameters (check the model and data for inf/NaN)")


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
                    gram="auto", chunk_size=256):
    """The exact influence function at θ* as a solve for any damping.

    ``IF[t, i] = −∇l(ẑ_t; θ*) (C + λ_d I)⁻¹ ∇l(z_i; θ*)`` with ``C`` the Gauss–Newton
    matrix or the empirical Fisher of the summed training loss, float64.

    Parameters
    ----------
    model, loss, X_train, y_train, X_test, y_test
        As in :func:`~iif_ref.neural.integrated_influence`.
    curvature : {"gauss_newton", "fisher"}
    memory_budget : int or "auto"
        Bytes (default ``"auto"``: :data:`AUTO_BUDGET_FRACTION` of the memory available,
        :func:`resolve_memory_budget`).
    gram : {"auto", "factors", "rows"}
        Where the Gram comes from (:func:`build_solve`).
    chunk_size : int

    Returns
    -------
    SampleSpaceSolve
        ``.scores(damping)`` (one Cholesky factor) and ``.scores_grid(dampings)``;
        ``.scale = tr(C)/n_params`` for relative dampings.

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
                           memory_budget=memory_budget, gram=gram, chunk_size=chunk_size)
