"""Exact float64 reference for Integrated Influence on least-squares linear regression.

For the linear model ``f(x; θ) = xᵀθ`` with scalar targets and the summed, ½-free squared
error (``docs/conventions.md``)::

    L_train(θ) = Σ_i (x_iᵀθ − y_i)² + ridge · ‖θ‖²        (ridge ≥ 0, default 0)
    L_test(θ)  = (x̂ᵀθ − ŷ)²

every object of the paper's Section 2 has a closed form: the unlearned parameters of
Eq. (12), the path models of Eq. (2) along the linear target path of Eq. (14) (affine in
``t``), and the integral of Eq. (9) itself (its integrand is affine in ``t``). This module
evaluates them in float64, vectorised over training samples and test points, and is the
oracle the projected and neural implementations are tested against. The derivations are
in ``docs/theory.md``.

Notation used throughout: ``M = XᵀX + ridge·I`` (so the training Hessian is ``H = 2M``),
``r(t) = x̂ᵀθ(t) − ŷ`` the test residual along the path, ``C[t, i] = x̂_tᵀ M⁻¹ x_i``.

Linear algebra goes through one thin QR factorisation ``[X; √ridge·I] = Q R``, so that
``M = RᵀR``, ``Xᵀ = RᵀQ_Nᵀ`` with ``Q_N`` the first ``N`` rows of ``Q``, fits are
backward stable (error ∝ κ(X), not κ(X)²), and leverages are squared row norms. Only
:func:`subset_test_losses` forms Gram matrices, because it solves thousands of small
systems at once.

Only scalar targets (one output, ``d_out = 1``) are supported: ``y`` of shape
``(n_train,)`` or ``(n_train, 1)``.
"""
# The public namespace is __all__ alone (dir(), tab completion): every import is private.
import math as _math
import numbers as _numbers
from dataclasses import dataclass as _dataclass

import numpy as _np
from scipy.linalg import solve_triangular as _solve_triangular

from iif_ref import _validation
from iif_ref.errors import IndefiniteObjectiveError as _IndefiniteObjectiveError

__all__ = [
    "fit",
    "test_losses",
    "unlearned_params",
    "integrated_influence",
    "delta",
    "path_params",
    "path_derivative",
    "influence_function",
    "tracin",
    "leave_one_out",
    "subset_test_losses",
]

_EPS = _np.finfo(_np.float64).eps

# Gradient descent in `tracin` is run, by default, until the worst-case contraction of
# its error ‖θ_s − θ*‖ / ‖θ*‖ falls below this (see `_default_n_steps`).
_GD_CONVERGED = 1e-6


# --------------------------------------------------------------------------------------
# Validation and the shared factorisation
# --------------------------------------------------------------------------------------

@_dataclass(frozen=True)
class _Problem:
    """A validated training set and its QR factorisation (private core state)."""

    X: _np.ndarray          # (n_train, d)
    y: _np.ndarray          # (n_train,)
    ridge: float
    Q_N: _np.ndarray        # (n_train, d): X R⁻¹, the training rows of Q
    R: _np.ndarray          # (d, d) upper triangular, RᵀR = XᵀX + ridge·I
    sv: _np.ndarray         # (d,) singular values of [X; √ridge I], descending
    theta_star: _np.ndarray  # (d,)

    @property
    def n_train(self):
        return self.X.shape[0]

    @property
    def d(self):
        return self.X.shape[1]

    @property
    def cond_M(self):
        """Condition number of ``M = XᵀX + ridge·I`` (κ of the Hessian)."""
        return float((self.sv[0] / self.sv[-1]) ** 2)

    def whiten(self, V):
        """Rows of ``V R⁻¹`` for ``V`` of shape (k, d); ``(V R⁻¹)(W R⁻¹)ᵀ = V M⁻¹ Wᵀ``."""
        return _solve_triangular(self.R, V.T, trans="T", check_finite=False).T

    def minv(self, V):
        """Rows of ``V M⁻¹`` (= ``(M⁻¹ Vᵀ)ᵀ``, M symmetric) for ``V`` of shape (k, d)."""
        Z = _solve_triangular(self.R, V.T, trans="T", check_finite=False)
        return _solve_triangular(self.R, Z, check_finite=False).T

    def solve_targets(self, targets):
        """Least-squares fits ``argmin Σ_i (x_iᵀθ − ρ_i)² + ridge‖θ‖²`` for each row of ``targets``.

        ``targets`` has shape (..., n_train); returns (..., d). Backward stable: it uses
        ``θ = R⁻¹ Q_Nᵀ ρ`` (the √ridge rows of the augmented system have target 0).
        """
        lead = targets.shape[:-1]
        T = targets.reshape(-1, self.n_train)
        theta = _solve_triangular(self.R, self.Q_N.T @ T.T, check_finite=False).T
        return theta.reshape(lead + (self.d,))


def _as_targets(y, name, n_rows):
    """Scalar targets as a 1-D array: (n,) or (n, 1) accepted."""
    y = _validation.as_float_array(y, name, ndim=(1, 2))
    if y.ndim == 2:
        if y.shape[1] != 1:
            raise ValueError(
                f"{name} must hold scalar targets, shape ({n_rows},) or ({n_rows}, 1); got "
                f"shape {y.shape} (multi-output regression is not supported by iif_ref.linear)")
        y = y[:, 0]
    if y.shape[0] != n_rows:
        raise ValueError(f"{name} must have {n_rows} entries (one per row of the features), "
                         f"got shape {y.shape}")
    return y


def _prepare(X, y, ridge):
    """Validate the training data and factorise it once."""
    X = _validation.as_float_array(X, "X", ndim=2)
    if X.shape[1] < 1:
        raise ValueError(f"X must have at least one column (feature), got shape {X.shape}")
    y = _as_targets(y, "y", X.shape[0])
    ridge = _validation.check_nonnegative_real(ridge, "ridge")
    n, d = X.shape
    A = _np.vstack([X, _math.sqrt(ridge) * _np.eye(d)]) if ridge > 0 else X
    # Scale the rank test with the data, so that X and 1e6·X are judged alike; the
    # threshold is NumPy's matrix_rank default (σ_max · max(rows, cols) · eps).
    scale = _np.max(_np.abs(A))
    if scale == 0.0:
        raise ValueError("X is all zeros and ridge is 0: the least-squares fit is undetermined")
    Q, R = _np.linalg.qr(A / scale)
    R = R * scale
    sv = _np.linalg.svd(R, compute_uv=False)
    if sv.size < d:                      # fewer rows than columns: rank ≤ n_train < d
        sv = _np.concatenate([sv, _np.zeros(d - sv.size)])
    if sv[-1] <= sv[0] * max(A.shape) * _EPS:
        rank = int(_np.sum(sv > sv[0] * max(A.shape) * _EPS))
        hint = (f"n_train = {n} <= d = {d}" if n <= d
                else f"its columns are (numerically) linearly dependent, "
                     f"condition number {sv[0] / max(sv[-1], _np.finfo(float).tiny):.3g}")
        raise ValueError(
            f"X has numerical rank {rank} < d = {d} ({hint}), so XᵀX + ridge·I with "
            f"ridge = {ridge} is singular and the least-squares fit is not unique; "
            f"pass ridge > 0 or more samples")
    Q_N = Q[:n]
    theta_star = _solve_triangular(R, Q_N.T @ y, check_finite=False)
    return _Problem(X=X, y=y, ridge=ridge, Q_N=Q_N, R=R, sv=sv, theta_star=theta_star)


def _prepare_test(X_test, y_test, d):
    X_test = _validation.as_float_array(X_test, "X_test", ndim=2)
    if X_test.shape[1] != d:
        raise ValueError(f"X_test must have d = {d} columns like X, got shape {X_test.shape}")
    y_test = _as_targets(y_test, "y_test", X_test.shape[0])
    return X_test, y_test


def _prepare_with_test(X, y, X_test, y_test, ridge):
    """:func:`_prepare` on the training data, then :func:`_prepare_test` against its ``d``."""
    p = _prepare(X, y, ridge)
    X_test, y_test = _prepare_test(X_test, y_test, p.d)
    return p, X_test, y_test


def _baseline_array(baseline_targets, n_train, n_test):
    """Validate ``baseline_targets``: (n_train,) shared, or (n_test, n_train) per test point."""
    b = _validation.as_float_array(baseline_targets, "baseline_targets", ndim=(1, 2))
    if b.shape[-1] != n_train or (b.ndim == 2 and n_test is not None and b.shape[0] != n_test):
        want = f"({n_train},)" + (f" or ({n_test}, {n_train})" if n_test is not None
                                  else f" or (n_test, {n_train})")
        raise ValueError(f"baseline_targets must have shape {want}, got {b.shape}")
    return b


def _residuals(theta, X_test, y_test):
    """Test residuals ``x̂ᵀθ − ŷ`` for θ of shape (d,) or (n_test, d)."""
    if theta.ndim == 1:
        return X_test @ theta - y_test
    return _np.einsum("td,td->t", X_test, theta) - y_test


# --------------------------------------------------------------------------------------
# Fit, losses, unlearning
# --------------------------------------------------------------------------------------

def fit(X, y, *, ridge=0.0):
    """Least-squares parameters θ* of the summed training loss.

    Parameters
    ----------
    X : array_like, shape (n_train, d)
        Training features.
    y : array_like, shape (n_train,) or (n_train, 1)
        Scalar training targets.
    ridge : float, optional
        Non-negative ridge weight; ``L_train(θ) = Σ_i (x_iᵀθ − y_i)² + ridge‖θ‖²``.

    Returns
    -------
    theta_star : ndarray, shape (d,)

    Raises
    ------
    ValueError
        Non-finite or mis-shaped input, ``ridge < 0``, or ``XᵀX + ridge·I`` numerically
        singular (fewer independent samples than features and ``ridge = 0``).

    Notes
    -----
    Implements Eq. (2) at ``t = 1`` for the linear model. Solved through a thin QR
    factorisation of ``[X; √ridge·I]`` (backward stable: relative error ∝ κ(X)·eps).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); y = X @ np.array([2.0, -1.0])
    >>> np.allclose(fit(X, y), [2.0, -1.0])
    True
    """
    return _prepare(X, y, ridge).theta_star.copy()


def test_losses(theta, X_test, y_test):
    """Test losses ``(x̂ᵀθ − ŷ)²``.

    Parameters
    ----------
    theta : array_like, shape (d,) or (n_test, d)
        One parameter vector shared by every test point, or one per test point (row
        ``t`` is used for test point ``t``, as returned by :func:`unlearned_params`).
    X_test : array_like, shape (n_test, d)
    y_test : array_like, shape (n_test,) or (n_test, 1)

    Returns
    -------
    losses : ndarray, shape (n_test,)

    Notes
    -----
    The per-sample squared error without ½ (``docs/conventions.md``).
    """
    theta = _validation.as_float_array(theta, "theta", ndim=(1, 2))
    d = theta.shape[-1]
    X_test, y_test = _prepare_test(X_test, y_test, d)
    if theta.ndim == 2 and theta.shape[0] != X_test.shape[0]:
        raise ValueError(f"theta must have shape ({d},) or ({X_test.shape[0]}, {d}) "
                         f"(one row per test point), got {theta.shape}")
    return _residuals(theta, X_test, y_test) ** 2


# Not a pytest test, whatever module imports it by name.
test_losses.__test__ = False


def _unlearned(p, X_test, y_test, lam):
    """Closed-form minimisers of Eq. (12), one per test point; shape (n_test, d)."""
    W = p.whiten(X_test)                      # rows x̂ᵀR⁻¹
    h = _np.einsum("td,td->t", W, W)           # test leverages x̂ᵀM⁻¹x̂
    # The triangular solves give h with relative error of order d·κ(X)·eps, so a margin
    # lam − h below that is indistinguishable from an indefinite Hessian.
    margin = 16.0 * p.d * _math.sqrt(p.cond_M) * _EPS * lam
    bad = _np.flatnonzero(lam - h <= margin)
    if bad.size:
        M = p.R.T @ p.R
        Hs = 2.0 * (lam * M[None] - _np.einsum("ti,tj->tij", X_test[bad], X_test[bad]))
        eig = _np.linalg.eigvalsh(Hs)[:, 0]
        shown = ", ".join(f"{int(t)} (leverage {h[t]:.6g}, min eigenvalue {e:.3g})"
                          for t, e in zip(bad[:10], eig[:10]))
        more = f" and {bad.size - 10} more" if bad.size > 10 else ""
        raise _IndefiniteObjectiveError(
            f"the unlearning objective −L_test + lam·L_train (Eq. 12) with lam = {lam} has "
            f"no minimiser for {bad.size} test point(s): its Hessian "
            f"2(lam(XᵀX + ridge I) − x̂x̂ᵀ) is not positive definite, which needs "
            f"lam > x̂ᵀ(XᵀX + ridge I)⁻¹x̂; test indices: {shown}{more}. Increase lam above "
            f"{float(_np.max(h[bad])):.6g}",
            test_indices=bad, min_eigenvalues=eig)
    r_star = X_test @ p.theta_star - y_test
    # Sherman–Morrison: (lam M − x̂x̂ᵀ)⁻¹ is a rank-one update of M⁻¹/lam, and the
    # stationarity condition collapses to θ' = θ* + M⁻¹x̂ · r*/(lam − h).
    A = _solve_triangular(p.R, W.T, check_finite=False).T   # rows M⁻¹x̂
    return p.theta_star[None, :] + A * (r_star / (lam - h))[:, None]


def unlearned_params(X, y, X_test, y_test, *, lam=1.0, ridge=0.0):
    """Unlearned parameters θ'_t, the minimiser of Eq. (12), for each test point.

    Parameters
    ----------
    X : array_like, shape (n_train, d)
    y : array_like, shape (n_train,) or (n_train, 1)
    X_test : array_like, shape (n_test, d)
    y_test : array_like, shape (n_test,) or (n_test, 1)
    lam : float, optional
        λ of Eq. (12), multiplying the **summed** training loss; > 0.
    ridge : float, optional
        Ridge weight inside ``L_train``; ≥ 0.

    Returns
    -------
    theta_prime : ndarray, shape (n_test, d)
        Row ``t`` minimises ``−(x̂_tᵀθ − ŷ_t)² + lam·L_train(θ)``.

    Raises
    ------
    iif_ref.errors.IndefiniteObjectiveError
        For test points whose objective Hessian ``2(lam·(XᵀX + ridge I) − x̂x̂ᵀ)`` is not
        (numerically) positive definite, i.e. ``lam ≤ x̂ᵀ(XᵀX + ridge I)⁻¹x̂``; the error
        lists their indices and smallest Hessian eigenvalues.

    Notes
    -----
    Implements Eq. (12) in closed form. Stationarity reads
    ``(lam·M − x̂x̂ᵀ) θ' = lam·Xᵀy − ŷ x̂``; by Sherman–Morrison its solution is
    ``θ' = θ* + M⁻¹x̂ · r*/(lam − h)`` with ``r* = x̂ᵀθ* − ŷ`` and leverage
    ``h = x̂ᵀM⁻¹x̂``. The baseline targets of Eq. (13) are ``X θ'``.
    """
    p, X_test, y_test = _prepare_with_test(X, y, X_test, y_test, ridge)
    lam = _validation.check_positive_real(lam, "lam")
    return _unlearned(p, X_test, y_test, lam)


# --------------------------------------------------------------------------------------
# Path (Eq. 2, 4, 14) and the integrated influence (Eq. 9, 10)
# --------------------------------------------------------------------------------------

def _baseline_targets(p, X_test, y_test, lam, baseline_targets):
    """Per-test baseline targets ȳ, shape (n_test, n_train): Eq. (13) or the user's."""
    n_test = X_test.shape[0]
    if baseline_targets is None:
        return _unlearned(p, X_test, y_test, lam) @ p.X.T
    b = _baseline_array(baseline_targets, p.n_train, n_test)
    return _np.broadcast_to(b, (n_test, p.n_train))


def _endpoint_residuals(p, X_test, y_test, Ybar):
    """Test residuals r(0), r(1) at the path ends; r(0) uses the fit θ̄ to ȳ (Eq. 2, t = 0)."""
    theta_bar = p.solve_targets(Ybar)                      # (n_test, d)
    r0 = _residuals(theta_bar, X_test, y_test)
    r1 = X_test @ p.theta_star - y_test
    return r0, r1


def integrated_influence(X, y, X_test, y_test, *, lam=1.0, K=None, baseline_targets=None,
                         ridge=0.0):
    """Integrated Influence scores ``I[t, i]`` of every training sample on every test point.

    Parameters
    ----------
    X : array_like, shape (n_train, d)
    y : array_like, shape (n_train,) or (n_train, 1)
    X_test : array_like, shape (n_test, d)
    y_test : array_like, shape (n_test,) or (n_test, 1)
    lam : float, optional
        λ of the unlearning objective Eq. (12) (summed training loss); > 0. Used only when
        ``baseline_targets`` is None.
    K : int or None, optional
        ``None`` (default): the exact integral of Eq. (9). An integer ``K ≥ 1``: the
        right-endpoint Euler sum of Eq. (10) on the grid ``t_k = k/K``, ``k = 1..K``.
    baseline_targets : array_like, shape (n_train,) or (n_test, n_train), optional
        Baseline targets ȳ, shared by all test points or one row per test point. Default:
        ``ȳ = X θ'_t`` from :func:`unlearned_params` (Eq. 13), per test point.
    ridge : float, optional
        Ridge weight inside ``L_train``; ≥ 0.

    Returns
    -------
    I : ndarray, shape (n_test, n_train)
        ``I > 0``: the sample pushes the test loss up (opponent); ``I < 0``: proponent.
        For ``K=None``, ``I.sum(axis=1)`` equals :func:`delta` (completeness).

    Raises
    ------
    ValueError
        Bad input, ``K < 1``, ``lam ≤ 0``, ``ridge < 0``, singular ``XᵀX + ridge I``.
    TypeError
        ``K`` not an integer.
    iif_ref.errors.IndefiniteObjectiveError
        Default baseline and an indefinite Eq. (12) objective (see :func:`unlearned_params`).

    Notes
    -----
    Implements Eq. (9) (``K=None``) and Eq. (10) (integer ``K``) along the linear path
    Eq. (14), with ``G(t) = 2 r(t) x̂ᵀ`` (Eq. 7), ``J_i = −2x_i`` (Eq. 8) and
    ``H = 2(XᵀX + ridge I)``. The path model ``θ(t)`` is affine in ``t``, hence so are
    ``r(t)`` and the integrand, and::

        I[t, i] = 2 · x̂ᵀM⁻¹x_i · (y_i − ȳ_i) · r̄,

    with ``r̄ = (r(0) + r(1))/2`` for the exact integral and ``r̄ = (1/K) Σ_k r(t_k)
    = r(0) + (r(1) − r(0))(K + 1)/(2K)`` for the Euler sum, whose error is therefore
    exactly ``(r(1) − r(0))/(2K)`` times the same factor. ``r(0)`` is the residual of the
    fit to ȳ (Eq. 2 at ``t = 0``); without ridge and with the default baseline it is the
    residual of θ'. See ``docs/theory.md``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.standard_normal((30, 3)), rng.standard_normal(30)
    >>> Xt, yt = rng.standard_normal((4, 3)), rng.standard_normal(4)
    >>> I = integrated_influence(X, y, Xt, yt)
    >>> np.allclose(I.sum(axis=1), delta(X, y, Xt, yt))   # completeness
    True
    """
    p, X_test, y_test = _prepare_with_test(X, y, X_test, y_test, ridge)
    lam = _validation.check_positive_real(lam, "lam")
    K = _validation.check_positive_int(K, "K", allow_none=True)
    Ybar = _baseline_targets(p, X_test, y_test, lam, baseline_targets)
    r0, r1 = _endpoint_residuals(p, X_test, y_test, Ybar)
    if K is None:
        r_mean = 0.5 * (r0 + r1)
    else:
        # Mean of the affine r(t) over t_k = k/K, k = 1..K: mean t_k = (K + 1)/(2K).
        r_mean = r0 + (r1 - r0) * ((K + 1) / (2.0 * K))
    C = p.whiten(X_test) @ p.Q_N.T                        # x̂ᵀM⁻¹x_i
    return 2.0 * C * (p.y[None, :] - Ybar) * r_mean[:, None]


def delta(X, y, X_test, y_test, *, lam=1.0, baseline_targets=None, ridge=0.0):
    """Loss difference ``Δ_t = L_test(θ*) − L_test(θ(0))`` that the scores decompose.

    Parameters
    ----------
    X, y, X_test, y_test, lam, baseline_targets, ridge
        As in :func:`integrated_influence`.

    Returns
    -------
    delta : ndarray, shape (n_test,)

    Notes
    -----
    Implements Eq. (1). ``θ(0)`` is the fit to the baseline targets (Eq. 2 at ``t = 0``);
    with ``ridge = 0`` and the default baseline it equals θ' of Eq. (12), with ridge it
    does not (``θ(0) = M⁻¹XᵀXθ'``), and completeness holds for ``θ(0)``.
    """
    p, X_test, y_test = _prepare_with_test(X, y, X_test, y_test, ridge)
    lam = _validation.check_positive_real(lam, "lam")
    Ybar = _baseline_targets(p, X_test, y_test, lam, baseline_targets)
    r0, r1 = _endpoint_residuals(p, X_test, y_test, Ybar)
    return r1 ** 2 - r0 ** 2


def _path_inputs(X, y, baseline_targets, t, ridge):
    p = _prepare(X, y, ridge)
    b = _baseline_array(baseline_targets, p.n_train, None)
    t = _validation.as_float_array(t, "t", ndim=(0, 1), min_rows=0)
    return p, b, t


def path_params(X, y, baseline_targets, t, *, ridge=0.0):
    """Path models θ(t): least-squares fits to the targets ``ρ(t) = t·y + (1 − t)·ȳ``.

    Parameters
    ----------
    X : array_like, shape (n_train, d)
    y : array_like, shape (n_train,) or (n_train, 1)
    baseline_targets : array_like, shape (n_train,) or (n_test, n_train)
        Baseline targets ȳ (one path, or one path per test point).
    t : float or array_like, shape (n_t,)
        Path positions; any finite real (``t`` outside [0, 1] extrapolates the path).
    ridge : float, optional

    Returns
    -------
    theta : ndarray, shape ``t.shape + baseline_targets.shape[:-1] + (d,)``

    Notes
    -----
    Implements Eq. (2) on the dataset path of Eq. (14), by refitting at each ``t`` (not by
    the affine shortcut ``θ(t) = (1 − t)θ(0) + tθ*`` that the fit implies).
    """
    p, b, t = _path_inputs(X, y, baseline_targets, t, ridge)
    tt = t.reshape(t.shape + (1,) * b.ndim)
    rho = tt * p.y + (1.0 - tt) * b                        # t.shape + b.shape
    return p.solve_targets(rho)


def path_derivative(X, y, baseline_targets, t, *, ridge=0.0):
    """Derivative dθ(t)/dt of the path models, by the implicit-function formula Eq. (4).

    Parameters
    ----------
    X, y, baseline_targets, t, ridge
        As in :func:`path_params`.

    Returns
    -------
    dtheta_dt : ndarray, shape ``t.shape + baseline_targets.shape[:-1] + (d,)``

    Notes
    -----
    Implements Eq. (4)–(5) and (8): ``dθ/dt = −H⁻¹ Σ_i J_i ρ_i'(t)`` with
    ``H = 2(XᵀX + ridge I)``, ``J_i = ∂²l_i/∂θ∂ρ_i = −2x_i`` and ``ρ_i'(t) = y_i − ȳ_i``.
    For the linear model and linear path none of these depend on ``t``; ``t`` only sets
    the output shape.
    """
    p, b, t = _path_inputs(X, y, baseline_targets, t, ridge)
    J = -2.0 * p.X                                         # (n_train, d), rows J_i
    cross = (p.y - b) @ J                                  # Σ_i J_i ρ_i', shape b.shape[:-1] + (d,)
    flat = cross.reshape(-1, p.d)
    # H⁻¹v = M⁻¹v / 2, with M = RᵀR.
    dtheta = -0.5 * p.minv(flat)
    dtheta = dtheta.reshape(cross.shape)
    return _np.broadcast_to(dtheta, t.shape + dtheta.shape).copy()


# --------------------------------------------------------------------------------------
# Comparison attributors: influence function, TracIn, leave-one-out, subset refits
# --------------------------------------------------------------------------------------

def influence_function(X, y, X_test, y_test, *, ridge=0.0):
    """Influence function ``IF[t, i] = −∇L_test(θ*) H⁻¹ ∇l_i(θ*)``.

    Parameters
    ----------
    X, y, X_test, y_test, ridge
        As in :func:`integrated_influence`.

    Returns
    -------
    IF : ndarray, shape (n_test, n_train)
        Same sign as IIF: > 0 means upweighting sample ``i`` raises the test loss.

    Notes
    -----
    Koh–Liang upweighting influence with ``H = ∇²L_train = 2(XᵀX + ridge I)`` of the
    **summed** loss and ``∇l_i`` the per-sample loss gradient (no ridge term). By
    Corollary 2.6 it equals ``integrated_influence(..., K=1, baseline_targets=X @ θ*)``
    exactly (factor 1 under the sum / no-½ convention). Koh–Liang's mean-loss IF is
    ``n_train`` times this; Eq. (11) as printed is half of it (``docs/theory.md``).
    """
    p, X_test, y_test = _prepare_with_test(X, y, X_test, y_test, ridge)
    G = 2.0 * (X_test @ p.theta_star - y_test)[:, None] * X_test     # ∇L_test(θ*)
    U = 2.0 * (p.X @ p.theta_star - p.y)[:, None] * p.X              # ∇l_i(θ*)
    # G H⁻¹ Uᵀ = ½ (G R⁻¹)(U R⁻¹)ᵀ.
    return -0.5 * (p.whiten(G) @ p.whiten(U).T)


def _default_n_steps(mu, lr):
    """Steps until the worst-case GD error contraction max_j |1 − lr·μ_j|^s ≤ _GD_CONVERGED."""
    rate = float(_np.max(_np.abs(1.0 - lr * mu)))
    if rate == 0.0:
        return 1
    if rate >= 1.0:
        # lr·μ_min below the float64 resolution of 1: the slowest mode never moves.
        raise ValueError(f"lr = {lr} is too small for gradient descent to converge in float64 "
                         f"(1 − lr·λ_min(H) rounds to 1); pass n_steps explicitly or a larger lr")
    return max(1, _math.ceil(_math.log(_GD_CONVERGED) / _math.log(rate)))


def _checkpoint_iterations(checkpoints, n_steps, mu, lr):
    if isinstance(checkpoints, _numbers.Integral) and not isinstance(checkpoints, bool):
        n = _validation.check_positive_int(checkpoints, "checkpoints")
        if n_steps is None:
            steps = max(n, _default_n_steps(mu, lr))
        else:
            steps = _validation.check_positive_int(n_steps, "n_steps")
            if n > steps:
                raise ValueError(f"checkpoints = {n} evenly spaced checkpoints need "
                                 f"n_steps >= {n}, got n_steps = {steps}")
        c = _np.arange(1, n + 1, dtype=_np.int64)
        return -((-c * steps) // n)                       # ceil(c · steps / n)
    if n_steps is not None:
        raise ValueError("n_steps is used only when checkpoints is an int; "
                         "got explicit checkpoint iterations and n_steps")
    it = _np.asarray(checkpoints)
    if it.ndim != 1 or it.size == 0:
        raise ValueError(f"checkpoints must be an int or a non-empty 1-D sequence of "
                         f"iteration indices, got shape {it.shape}")
    if not _np.issubdtype(it.dtype, _np.integer):
        raise TypeError(f"checkpoints must hold integer iteration indices, got dtype {it.dtype}")
    if _np.any(it < 0) or _np.any(_np.diff(it) <= 0):
        raise ValueError(f"checkpoints must be strictly increasing non-negative iteration "
                         f"indices, got {it.tolist()}")
    return it.astype(_np.int64)


def tracin(X, y, X_test, y_test, *, lr, checkpoints, n_steps=None, ridge=0.0):
    """TracInCP scores along full-batch gradient descent on ``L_train`` from θ = 0.

    Parameters
    ----------
    X, y, X_test, y_test
        As in :func:`integrated_influence`.
    lr : float
        Gradient-descent step; must satisfy ``0 < lr < 2/λ_max(H)``,
        ``H = 2(XᵀX + ridge I)``, otherwise gradient descent does not converge.
    checkpoints : int or sequence of int
        Either strictly increasing iteration indices ``s`` (θ_s is the iterate after ``s``
        steps; ``s = 0`` is θ = 0), or an int ``n``: the ``n`` checkpoints
        ``s_c = ⌈c · n_steps / n⌉``, ``c = 1..n``, evenly spaced over the run.
    n_steps : int, optional
        Length of the run for an int ``checkpoints``. Default: ``max(n, S)`` with ``S``
        the number of steps after which the worst-case error contraction
        ``max_j |1 − lr·μ_j|^S`` of gradient descent is ≤ 1e-6 (``μ_j`` the eigenvalues
        of ``H``), so that the checkpoints cover the trajectory up to convergence.
    ridge : float, optional
        Ridge weight in ``L_train`` (it shapes the trajectory; the per-sample gradients
        ``∇l_i`` do not include it).

    Returns
    -------
    scores : ndarray, shape (n_test, n_train)
        ``−Σ_c lr · ∇L_test(θ_c) · ∇l_i(θ_c)``.

    Notes
    -----
    Sign: one gradient step on sample ``i`` alone, ``θ ← θ − lr∇l_i``, changes the test
    loss by ``≈ −lr ∇L_test·∇l_i`` to first order, so a positive score means the sample's
    steps pushed the test loss up — the IIF sign convention (opponent > 0). The original
    TracIn score is the negative of this. The iterates have the closed form
    ``θ_s = θ* − (I − lr·H)^s θ*``, evaluated through the eigendecomposition of ``H``.
    """
    p, X_test, y_test = _prepare_with_test(X, y, X_test, y_test, ridge)
    lr = _validation.check_positive_real(lr, "lr")
    _, s, Vt = _np.linalg.svd(p.R)                         # M = RᵀR = V s² Vᵀ
    mu = 2.0 * s ** 2                                     # eigenvalues of H
    if lr >= 2.0 / mu[0]:
        raise ValueError(f"lr = {lr} >= 2/λ_max(H) = {2.0 / mu[0]:.6g}: gradient descent on "
                         f"L_train diverges (or oscillates without converging); choose a "
                         f"smaller lr")
    steps = _checkpoint_iterations(checkpoints, n_steps, mu, lr)
    # θ_s − θ* = (I − lr H)^s (θ_0 − θ*) with θ_0 = 0.
    decay = _np.power((1.0 - lr * mu)[None, :], steps[:, None].astype(_np.float64))
    theta_c = p.theta_star[None, :] - (decay * (Vt @ p.theta_star)[None, :]) @ Vt
    R_test = theta_c @ X_test.T - y_test[None, :]          # (n_ckpt, n_test) residuals
    E_train = theta_c @ p.X.T - p.y[None, :]               # (n_ckpt, n_train)
    # ∇L_test(θ_c)·∇l_i(θ_c) = 4 r_c e_c x̂ᵀx_i; sum over checkpoints first.
    return -4.0 * lr * (X_test @ p.X.T) * (R_test.T @ E_train)


def leave_one_out(X, y, X_test, y_test, *, ridge=0.0):
    """Exact leave-one-out effects ``L_test(θ*) − L_test(θ_{−i})`` without refitting.

    Parameters
    ----------
    X, y, X_test, y_test, ridge
        As in :func:`integrated_influence`.

    Returns
    -------
    loo : ndarray, shape (n_test, n_train)
        > 0: removing sample ``i`` lowers the test loss (the sample was an opponent).

    Raises
    ------
    ValueError
        If some training sample has leverage ``h_ii = 1`` (only possible with
        ``ridge = 0``): removing it leaves XᵀX singular. The samples are named.

    Notes
    -----
    Sherman–Morrison on ``M − x_ix_iᵀ``: ``θ_{−i} = θ* − M⁻¹x_i e_i/(1 − h_ii)`` with
    residual ``e_i = y_i − x_iᵀθ*`` and leverage ``h_ii = x_iᵀM⁻¹x_i`` (hat matrix
    diagonal); exact with ridge too.
    """
    p, X_test, y_test = _prepare_with_test(X, y, X_test, y_test, ridge)
    h = _np.einsum("id,id->i", p.Q_N, p.Q_N)
    # h has relative error of order d·eps (row norms of an orthonormal Q); 1 − h below a
    # few hundred eps cannot be told from 0.
    bad = _np.flatnonzero(1.0 - h <= 64.0 * p.d * _EPS)
    if bad.size:
        raise ValueError(
            f"training sample(s) {bad[:20].tolist()}{' ...' if bad.size > 20 else ''} have "
            f"leverage h_ii = 1: removing any of them leaves XᵀX + ridge·I singular, so "
            f"leave-one-out is undefined; add samples or pass ridge > 0")
    e = p.y - p.X @ p.theta_star
    r_star = X_test @ p.theta_star - y_test
    C = p.whiten(X_test) @ p.Q_N.T
    shift = C * (e / (1.0 - h))[None, :]                  # r* − r_{−i}
    # r*² − r_{−i}² = shift · (2r* − shift), without cancellation.
    return shift * (2.0 * r_star[:, None] - shift)


def subset_test_losses(X, y, X_test, y_test, masks, *, ridge=0.0):
    """Test losses of least-squares models refitted on many training subsets at once.

    Parameters
    ----------
    X, y, X_test, y_test
        As in :func:`integrated_influence`.
    masks : array_like of bool, shape (n_subsets, n_train)
        Row ``s`` selects the training samples of subset ``s``.
    ridge : float, optional

    Returns
    -------
    losses : ndarray, shape (n_subsets, n_test)
        ``(x̂ᵀθ_S − ŷ)²`` with ``θ_S = argmin Σ_{i∈S}(x_iᵀθ − y_i)² + ridge‖θ‖²``.

    Raises
    ------
    TypeError
        ``masks`` is not boolean.
    ValueError
        Wrong shape, an empty subset, or a subset whose Gram matrix is numerically
        singular (the mask rows are named).

    Notes
    -----
    The ground truth of the LDS evaluation (Sec. 3.1). Gram matrices of all subsets come
    from one matrix product ``masks @ (x_i ⊗ x_i)`` and are solved in a batch. Solving
    normal equations costs accuracy ∝ κ(X_S)²·eps, so a subset with
    ``λ_min(G_S) ≤ λ_max(G_S) · max(n_train, d) · eps`` is rejected as singular.
    """
    p, X_test, y_test = _prepare_with_test(X, y, X_test, y_test, ridge)
    if isinstance(masks, (str, bytes)) or masks is None:
        raise TypeError(f"masks must be a boolean array, got {type(masks).__name__}")
    masks = _np.asarray(masks)
    if masks.dtype != _np.bool_:
        raise TypeError(f"masks must be a boolean array, got dtype {masks.dtype}")
    if masks.ndim != 2 or masks.shape[1] != p.n_train or masks.shape[0] < 1:
        raise ValueError(f"masks must have shape (n_subsets >= 1, {p.n_train}), "
                         f"got {masks.shape}")
    empty = _np.flatnonzero(~masks.any(axis=1))
    if empty.size:
        raise ValueError(f"masks rows {empty[:20].tolist()}{' ...' if empty.size > 20 else ''} "
                         f"select no training sample")
    n, d = p.X.shape
    m = masks.astype(_np.float64)
    outer = (p.X[:, :, None] * p.X[:, None, :]).reshape(n, d * d)
    G = (m @ outer).reshape(-1, d, d)
    if p.ridge > 0:
        G += p.ridge * _np.eye(d)
    b = m @ (p.X * p.y[:, None])
    ev = _np.linalg.eigvalsh(G)
    singular = _np.flatnonzero(ev[:, 0] <= ev[:, -1] * max(n, d) * _EPS)
    if singular.size:
        raise ValueError(
            f"masks rows {singular[:20].tolist()}{' ...' if singular.size > 20 else ''} "
            f"select subsets whose Gram matrix XᵀX + ridge·I is numerically singular "
            f"(fewer independent samples than d = {d}); their fits are not unique")
    theta = _np.linalg.solve(G, b[:, :, None])[:, :, 0]
    return (theta @ X_test.T - y_test[None, :]) ** 2
