"""Property tests of iif_ref.linear: invariances and structural identities.

Tolerances follow ``test_linear_reference``: ``tol(κ(M), magnitude, n)`` with the
first-order error magnitudes of :func:`test_linear_reference.magnitudes`. Two evaluations
that differ only in summation order (permuted samples, batched vs one test point at a
time) differ by rounding of that size.
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from iif_ref import linear
from test_linear_reference import (
    cond_M,
    fit_twin,
    log_conds,
    magnitudes,
    make_problem,
    noises,
    ridges,
    safe_lam,
    seeds,
    shapes,
    tol,
    unlearned_twins,
)


def _default_magnitudes(X, y, X_test, y_test, lam, ridge):
    theta_p = unlearned_twins(X, y, X_test, y_test, lam, ridge)
    return magnitudes(X, y, X_test, y_test, theta_p @ X.T, ridge, thetas=theta_p)


@settings(max_examples=25)
@given(seed=seeds, shape=shapes, c=log_conds, noise=noises, ridge=ridges)
def test_permuting_training_samples_permutes_score_columns(seed, shape, c, noise, ridge):
    X, y, X_test, y_test = make_problem(seed, *shape, c, noise)
    perm = np.random.default_rng(seed).permutation(len(y))
    lam = safe_lam(X, X_test, ridge)
    kappa = cond_M(X, ridge)
    n = sum(shape)
    I_mag, r_mag, r_abs = _default_magnitudes(X, y, X_test, y_test, lam, ridge)
    for K in (None, 3):
        a = linear.integrated_influence(X, y, X_test, y_test, lam=lam, K=K, ridge=ridge)
        b = linear.integrated_influence(X[perm], y[perm], X_test, y_test, lam=lam, K=K,
                                        ridge=ridge)
        assert np.all(np.abs(a[:, perm] - b) <= tol(2 * kappa, I_mag[:, perm], n))
    d_a = linear.delta(X, y, X_test, y_test, lam=lam, ridge=ridge)
    d_b = linear.delta(X[perm], y[perm], X_test, y_test, lam=lam, ridge=ridge)
    assert np.all(np.abs(d_a - d_b) <= tol(2 * kappa, 2 * r_abs * r_mag, n))
    theta_star = fit_twin(X, y, ridge)
    IF_mag, _, _ = magnitudes(X, y, X_test, y_test, X @ theta_star, ridge)
    a = linear.influence_function(X, y, X_test, y_test, ridge=ridge)
    b = linear.influence_function(X[perm], y[perm], X_test, y_test, ridge=ridge)
    assert np.all(np.abs(a[:, perm] - b) <= tol(kappa, IF_mag[:, perm], n))
    # LOO and TracIn: both sides are computed by the same code, so their difference is
    # pure reordering rounding of the same formula; the IF magnitude (same factors
    # r·C·e) bounds it, with κ of the leave-one-out Gram for LOO.
    a = linear.leave_one_out(X, y, X_test, y_test, ridge=ridge)
    b = linear.leave_one_out(X[perm], y[perm], X_test, y_test, ridge=ridge)
    loo_mag = np.abs(a) + IF_mag
    h = np.einsum("id,id->i", X, np.linalg.solve(X.T @ X + ridge * np.eye(X.shape[1]), X.T).T)
    assert np.all(np.abs(a[:, perm] - b)
                  <= tol(kappa / np.min(1 - h), loo_mag[:, perm], n))


@settings(max_examples=25)
@given(seed=seeds, shape=shapes, c=log_conds, noise=noises, ridge=ridges,
       alpha=st.sampled_from([-3.0, 0.5, 7.0]))
def test_scaling_targets_scales_scores_quadratically(seed, shape, c, noise, ridge, alpha):
    # θ*, θ' (Eq. 12) and hence ȳ (Eq. 13) are linear in (y, ŷ); every score is a product
    # of a target difference and a test residual, so it scales by α².
    X, y, X_test, y_test = make_problem(seed, *shape, c, noise)
    lam = safe_lam(X, X_test, ridge)
    I_mag, r_mag, r_abs = _default_magnitudes(X, y, X_test, y_test, lam, ridge)
    bound = alpha ** 2 * tol(2 * cond_M(X, ridge), I_mag, sum(shape))
    for K in (None, 2):
        base = linear.integrated_influence(X, y, X_test, y_test, lam=lam, K=K, ridge=ridge)
        scaled = linear.integrated_influence(X, alpha * y, X_test, alpha * y_test, lam=lam,
                                             K=K, ridge=ridge)
        assert np.all(np.abs(scaled - alpha ** 2 * base) <= bound)


@settings(max_examples=25)
@given(seed=seeds, shape=shapes, c=log_conds, noise=noises, ridge=ridges,
       K=st.integers(1, 50))
def test_euler_completeness_residual_is_squared_endpoint_gap_over_K(seed, shape, c, noise,
                                                                      ridge, K):
    # Σ_i I_K − Δ = 2(r1 − r0)(r0 + (r1 − r0)(K+1)/(2K)) − (r1² − r0²) = (r1 − r0)²/K:
    # the discrete estimate over-attributes by a non-negative amount that vanishes as 1/K.
    X, y, X_test, y_test = make_problem(seed, *shape, c, noise)
    lam = safe_lam(X, X_test, ridge)
    I = linear.integrated_influence(X, y, X_test, y_test, lam=lam, K=K, ridge=ridge)
    D = linear.delta(X, y, X_test, y_test, lam=lam, ridge=ridge)
    theta_p = unlearned_twins(X, y, X_test, y_test, lam, ridge)
    Ybar = theta_p @ X.T
    r1 = X_test @ fit_twin(X, y, ridge) - y_test
    r0 = np.array([X_test[t] @ fit_twin(X, Ybar[t], ridge) - y_test[t]
                   for t in range(len(y_test))])
    I_mag, r_mag, r_abs = magnitudes(X, y, X_test, y_test, Ybar, ridge, thetas=theta_p)
    bound = tol(2 * cond_M(X, ridge), I_mag.sum(axis=1) + 4 * r_abs * r_mag, sum(shape) + K)
    assert np.all(np.abs(I.sum(axis=1) - D - (r1 - r0) ** 2 / K) <= bound)


@settings(max_examples=25)
@given(seed=seeds, shape=shapes, c=log_conds, noise=noises, ridge=ridges)
def test_baseline_equal_to_targets_attributes_nothing(seed, shape, c, noise, ridge):
    # ȳ = y makes the path constant: ρ' = 0, so every score vanishes exactly (each is a
    # multiple of y_i − ȳ_i = 0), and Δ = r(1)² − r(0)² vanishes up to the rounding of
    # two evaluations of the same fit.
    X, y, X_test, y_test = make_problem(seed, *shape, c, noise)
    for K in (None, 4):
        I = linear.integrated_influence(X, y, X_test, y_test, K=K, baseline_targets=y,
                                        ridge=ridge)
        assert np.array_equal(I, np.zeros_like(I))
    D = linear.delta(X, y, X_test, y_test, baseline_targets=y, ridge=ridge)
    _, r_mag, r_abs = magnitudes(X, y, X_test, y_test, y, ridge)
    assert np.all(np.abs(D) <= tol(cond_M(X, ridge), 2 * r_abs * r_mag, sum(shape)))


@settings(max_examples=15)
@given(seed=seeds, shape=shapes, c=log_conds, noise=noises, ridge=ridges)
def test_batched_test_points_equal_one_at_a_time(seed, shape, c, noise, ridge):
    X, y, X_test, y_test = make_problem(seed, *shape, c, noise, n_test=4)
    lam = safe_lam(X, X_test, ridge)
    I_mag, _, _ = _default_magnitudes(X, y, X_test, y_test, lam, ridge)
    bound = tol(2 * cond_M(X, ridge), I_mag, sum(shape))
    full = linear.integrated_influence(X, y, X_test, y_test, lam=lam, ridge=ridge)
    IF_full = linear.influence_function(X, y, X_test, y_test, ridge=ridge)
    theta_p = linear.unlearned_params(X, y, X_test, y_test, lam=lam, ridge=ridge)
    for t in range(len(y_test)):
        sl = slice(t, t + 1)
        one = linear.integrated_influence(X, y, X_test[sl], y_test[sl], lam=lam, ridge=ridge)
        assert np.all(np.abs(one[0] - full[t]) <= bound[t])
        one_p = linear.unlearned_params(X, y, X_test[sl], y_test[sl], lam=lam, ridge=ridge)
        assert np.allclose(one_p[0], theta_p[t], rtol=1e-12 * cond_M(X, ridge), atol=0)
        IF_one = linear.influence_function(X, y, X_test[sl], y_test[sl], ridge=ridge)
        assert np.all(np.abs(IF_one[0] - IF_full[t]) <= bound[t] + np.abs(IF_full[t]) * 1e-12)


@settings(max_examples=25)
@given(seed=seeds, shape=shapes, c=st.floats(0.0, 3.0), noise=noises, ridge=ridges)
def test_full_subset_mask_reproduces_test_loss_of_fit(seed, shape, c, noise, ridge):
    X, y, X_test, y_test = make_problem(seed, *shape, c, noise)
    masks = np.ones((2, len(y)), dtype=bool)
    got = linear.subset_test_losses(X, y, X_test, y_test, masks, ridge=ridge)
    want = linear.test_losses(linear.fit(X, y, ridge=ridge), X_test, y_test)
    theta_star = fit_twin(X, y, ridge)
    _, r_mag, r_abs = magnitudes(X, y, X_test, y_test, X @ theta_star, ridge)
    assert np.all(np.abs(got - want[None]) <= tol(cond_M(X, ridge), 2 * r_abs * r_mag,
                                                  sum(shape)))


def test_inputs_are_not_modified_and_shapes_are_documented():
    X, y, X_test, y_test = make_problem(1, 20, 3, 1.0, 1.0, n_test=4)
    copies = [a.copy() for a in (X, y, X_test, y_test)]
    baseline = y + 1.0
    masks = np.ones((3, 20), dtype=bool)
    masks[1, :5] = False
    outputs = {
        "fit": linear.fit(X, y),
        "unlearned_params": linear.unlearned_params(X, y, X_test, y_test),
        "integrated_influence": linear.integrated_influence(X, y, X_test, y_test),
        "integrated_influence_K": linear.integrated_influence(X, y, X_test, y_test, K=3,
                                                              baseline_targets=baseline),
        "delta": linear.delta(X, y, X_test, y_test),
        "influence_function": linear.influence_function(X, y, X_test, y_test),
        "tracin": linear.tracin(X, y, X_test, y_test, lr=1e-3, checkpoints=3),
        "leave_one_out": linear.leave_one_out(X, y, X_test, y_test),
        "subset_test_losses": linear.subset_test_losses(X, y, X_test, y_test, masks),
        "path_params": linear.path_params(X, y, np.stack([baseline] * 4), [0.0, 0.5]),
        "path_derivative": linear.path_derivative(X, y, baseline, 0.5),
    }
    shapes_expected = {
        "fit": (3,), "unlearned_params": (4, 3), "integrated_influence": (4, 20),
        "integrated_influence_K": (4, 20), "delta": (4,), "influence_function": (4, 20),
        "tracin": (4, 20), "leave_one_out": (4, 20), "subset_test_losses": (3, 4),
        "path_params": (2, 4, 3), "path_derivative": (3,),
    }
    for name, out in outputs.items():
        assert out.dtype == np.float64, name
        assert out.shape == shapes_expected[name], name
        assert np.all(np.isfinite(out)), name
    for before, after in zip(copies, (X, y, X_test, y_test)):
        assert np.array_equal(before, after)


def test_column_targets_float32_and_lists_match_float64_vectors():
    X, y, X_test, y_test = make_problem(4, 15, 2, 0.5, 1.0)
    ref = linear.integrated_influence(X, y, X_test, y_test)
    col = linear.integrated_influence(X, y[:, None], X_test, y_test[:, None])
    assert np.array_equal(ref, col)
    lists = linear.integrated_influence(X.tolist(), y.tolist(), X_test.tolist(), y_test.tolist())
    assert np.array_equal(ref, lists)
    X32, y32 = X.astype(np.float32), y.astype(np.float32)
    got = linear.integrated_influence(X32, y32, X_test, y_test)
    want = linear.integrated_influence(X32.astype(np.float64), y32.astype(np.float64),
                                       X_test, y_test)
    assert got.dtype == np.float64 and np.array_equal(got, want)


def test_test_losses_accepts_shared_or_per_test_theta():
    X, y, X_test, y_test = make_problem(6, 15, 3, 0.5, 1.0, n_test=5)
    theta = linear.fit(X, y)
    shared = linear.test_losses(theta, X_test, y_test)
    per_test = linear.test_losses(np.tile(theta, (5, 1)), X_test, y_test)
    assert np.allclose(shared, (X_test @ theta - y_test) ** 2, rtol=1e-14, atol=0)
    assert np.allclose(per_test, shared, rtol=1e-14, atol=0)
