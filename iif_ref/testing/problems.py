"""Least-squares problems with a chosen condition number and leverage, for conformance checks.

``X = U diag(s) Vᵀ`` with ``U`` (n_train × d) orthonormal and ``V`` (d × d) orthogonal, so
that the condition number of ``X`` is exactly ``s_max / s_min`` and the leverages
``h_i = x_iᵀ(XᵀX)⁻¹x_i = ‖U_i‖²`` do not depend on ``s``: the two are drawn
independently. Targets are ``y = Xw + σ ε`` with ``w, ε ~ N(0, I)``.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from iif_ref._validation import (
    check_nonnegative_real,
    check_positive_int,
    check_positive_real,
)
from iif_ref.errors import IndefiniteObjectiveError
from iif_ref.testing.protocol import AttributionProblem

__all__ = ["make_problem", "default_problems", "hessian_condition", "max_test_leverage"]


def _orthonormal_rows(rng, n, d, leverage):
    """Orthonormal ``U`` (n × d) whose row 0 has squared norm ``leverage`` (if given).

    Scaling row 0 of a Gaussian ``Z`` by ``a`` gives, after orthonormalisation, the
    leverage ``h_0 = a²q / (1 + a²q)`` with ``q = z_0ᵀ(Z_restᵀZ_rest)⁻¹z_0``; solving
    for ``a`` sets ``h_0`` exactly.
    """
    Z = rng.standard_normal((n, d))
    if leverage is not None:
        rest = Z[1:]
        q = float(Z[0] @ np.linalg.solve(rest.T @ rest, Z[0]))
        Z[0] *= math.sqrt(leverage / (q * (1.0 - leverage)))
    U, _ = np.linalg.qr(Z)
    return U


def make_problem(n_train=24, d=3, n_test=4, *, condition_number=1.0, leverage=None,
                 noise=0.3, test_noise=None, lam=1.0, K=4, n_checkpoints=3, seed,
                 name=None):
    """Draw a least-squares problem with condition number κ(X) and a chosen leverage.

    Parameters
    ----------
    n_train, d, n_test : int
        Sizes; ``n_train > d`` (so θ* is unique and leave-one-out is defined).
    condition_number : float
        κ(X) ≥ 1; singular values are log-spaced from ``√n_train`` down to
        ``√n_train / κ``. The Hessian ``2XᵀX`` has condition number κ².
        Must be 1 when ``d = 1``.
    leverage : float, optional
        Leverage of training sample 0, in ``[d/n_train, 1)``; the other samples share the
        remaining ``d − leverage``. ``None``: not controlled (all ≈ d/n_train).
    noise : float
        Standard deviation of the training-target noise (≥ 0). With 0 the fit is exact,
        residuals and therefore IF/TracIn/IIF scores are rounding noise, and the
        tolerances (relative to the scores) no longer apply.
    test_noise : float, optional
        Standard deviation of the test-target noise (default: ``noise``).
    lam : float
        λ of Eq. (12). Must exceed every test leverage ``x̂ᵀ(XᵀX)⁻¹x̂`` (otherwise the
        unlearning objective is indefinite: :class:`~iif_ref.errors.IndefiniteObjectiveError`).
    K : int or None
        Path steps for IIF attributors.
    n_checkpoints : int
        TracIn checkpoints, at gradient-descent iterations ``1, 2, 4, …, 2^(n−1)``.
    seed : int
        Seed of ``numpy.random.default_rng``.
    name : str, optional

    Returns
    -------
    AttributionProblem
        With ``lr = 1/λ_max(H)`` (half the largest stable step) for TracIn.

    Notes
    -----
    Test points are drawn like training points: ``x̂ = z diag(s) Vᵀ / √n_train`` with
    ``z ~ N(0, I_d)``, so their leverage ``‖z‖²/n_train`` averages ``d/n_train``.
    """
    n_train = check_positive_int(n_train, "n_train")
    d = check_positive_int(d, "d")
    n_test = check_positive_int(n_test, "n_test")
    if n_train <= d + 1:
        raise ValueError(f"n_train must exceed d + 1 = {d + 1} (a unique fit whose "
                         f"leave-one-out refits are defined), got {n_train}")
    kappa = check_positive_real(condition_number, "condition_number")
    if kappa < 1:
        raise ValueError(f"condition_number must be >= 1, got {kappa}")
    if d == 1 and kappa != 1:
        raise ValueError(f"condition_number must be 1 when d = 1, got {kappa}")
    if leverage is not None:
        leverage = check_positive_real(leverage, "leverage")
        if not d / n_train <= leverage < 1:
            raise ValueError(f"leverage must be in [d/n_train, 1) = [{d / n_train:.3g}, 1), "
                             f"got {leverage}")
    noise = check_nonnegative_real(noise, "noise")
    test_noise = noise if test_noise is None else check_nonnegative_real(test_noise,
                                                                          "test_noise")
    lam = check_positive_real(lam, "lam")
    K = check_positive_int(K, "K", allow_none=True)
    n_checkpoints = check_positive_int(n_checkpoints, "n_checkpoints")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

    rng = np.random.default_rng(int(seed))
    U = _orthonormal_rows(rng, n_train, d, leverage)
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = math.sqrt(n_train) * np.geomspace(1.0, 1.0 / kappa, d)
    X = (U * s) @ V.T
    X_test = (rng.standard_normal((n_test, d)) * s / math.sqrt(n_train)) @ V.T
    w = rng.standard_normal(d)
    y = X @ w + noise * rng.standard_normal(n_train)
    y_test = X_test @ w + test_noise * rng.standard_normal(n_test)

    h_test = _test_leverages(X, X_test)
    if np.max(h_test) >= lam:
        t = int(np.argmax(h_test))
        raise IndefiniteObjectiveError(
            f"lam = {lam} <= test leverage {h_test[t]:.4g} of test point {t}: the unlearning "
            f"objective (Eq. 12) has no minimiser; pass a larger lam or another seed",
            test_indices=np.flatnonzero(h_test >= lam), min_eigenvalues=())
    lr = 1.0 / (2.0 * s[0] ** 2)               # λ_max(H) = 2 s_max²
    checkpoints = tuple(2 ** c for c in range(n_checkpoints))
    if name is None:
        name = (f"n{n_train}_d{d}_kappa{kappa:g}"
                + (f"_lev{leverage:g}" if leverage is not None else "") + f"_seed{seed}")
    return AttributionProblem(name=name, X=X, y=y, X_test=X_test, y_test=y_test, lam=lam,
                              K=K, lr=lr, checkpoints=checkpoints, condition_number=kappa,
                              seed=int(seed))


def _test_leverages(X, X_test):
    Q, R = np.linalg.qr(X)
    W = np.linalg.solve(R.T, X_test.T)
    return np.einsum("dt,dt->t", W, W)


def max_test_leverage(problem):
    """Largest ``x̂ᵀ(XᵀX)⁻¹x̂`` over the test points (λ must exceed it, Eq. 12)."""
    return float(np.max(_test_leverages(problem.X, problem.X_test)))


def hessian_condition(problem):
    """Condition number of ``H = 2XᵀX`` (= κ(X)²), computed from the data."""
    sv = np.linalg.svd(problem.X, compute_uv=False)
    return float((sv[0] / sv[-1]) ** 2)


def default_problems():
    """The problems :func:`~iif_ref.testing.check_attributor` uses by default.

    Returns
    -------
    list of AttributionProblem
        ``well_conditioned`` (κ(X) = 2), ``ill_conditioned`` (κ(X) = 100, so κ(H) = 10⁴)
        and ``high_leverage`` (one training sample of leverage 0.8). Small (≤ 30 samples,
        ≤ 5 features) so that a torch or peer attributor runs them in seconds.
    """
    return [
        make_problem(24, 3, 4, condition_number=2.0, noise=0.5, seed=1,
                     name="well_conditioned"),
        make_problem(30, 5, 4, condition_number=100.0, noise=0.3, lam=2.0, seed=2,
                     name="ill_conditioned"),
        make_problem(20, 3, 4, condition_number=3.0, leverage=0.8, noise=0.5, lam=2.0,
                     seed=3, name="high_leverage"),
    ]
