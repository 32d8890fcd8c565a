"""Tests of iif_ref.metrics (LDS, its datamodel ceiling, subset masks, AUC) and of the
synthetic problem generator used by the linear reproductions."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ConstantInputWarning, rankdata, spearmanr

from iif_ref.metrics import _average_ranks, auc, lds, lds_ceiling, random_subset_masks, subset_size
from iif_ref.synthetic import make_linear_problem

# Spearman correlations are ratios of sums of O(n_subsets³) integer-valued rank
# products; float64 rounding of those sums is ~1e-16 · n_subsets relative, so 1e-12
# is a safe absolute tolerance for correlations in [-1, 1].
CORR_TOL = 1e-12


def _toy(n_train=15, n_test=4, n_subsets=60, seed=0):
    rng = np.random.default_rng(seed)
    masks = random_subset_masks(n_train, n_subsets, alpha=0.5, seed=seed + 1)
    scores = rng.normal(size=(n_test, n_train))
    losses = masks @ scores.T + rng.normal(scale=2.0, size=(n_subsets, n_test))
    return scores, masks, losses


# --- random_subset_masks -------------------------------------------------------------

@pytest.mark.parametrize("n_train,alpha,size", [(100, 0.5, 50), (101, 0.5, 51), (10, 0.25, 3),
                                                (10, 0.75, 8), (3, 0.5, 2)])
def test_subset_masks_have_exact_rounded_size(n_train, alpha, size):
    masks = random_subset_masks(n_train, 50, alpha=alpha, seed=3)
    assert masks.dtype == np.bool_ and masks.shape == (50, n_train)
    assert subset_size(n_train, alpha) == size
    assert np.all(masks.sum(axis=1) == size)


def test_subset_masks_are_uniform_over_samples():
    # Each sample is in a subset with probability alpha; over 4000 subsets the count per
    # sample is Binomial(4000, 0.5): std ≈ 31.6, so ±6 std = ±190 never fails by chance.
    masks = random_subset_masks(20, 4000, alpha=0.5, seed=7)
    counts = masks.sum(axis=0)
    assert np.all(np.abs(counts - 2000) < 190)
    # Rows are independent draws, not copies: with C(40, 20) ≈ 1.4e11 possible subsets,
    # 2000 independent draws collide with probability ≈ 2000² / 2.8e11 ≈ 1e-5.
    wide = random_subset_masks(40, 2000, alpha=0.5, seed=8)
    assert len({row.tobytes() for row in wide}) == 2000


def test_subset_masks_reproducible_by_seed():
    a = random_subset_masks(30, 10, seed=11)
    b = random_subset_masks(30, 10, seed=11)
    c = random_subset_masks(30, 10, seed=12)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("kwargs,err", [
    (dict(n_train=10, n_subsets=5, alpha=0.0, seed=0), ValueError),
    (dict(n_train=10, n_subsets=5, alpha=1.0, seed=0), ValueError),
    (dict(n_train=10, n_subsets=5, alpha=0.01, seed=0), ValueError),   # rounds to 0
    (dict(n_train=10, n_subsets=5, alpha=0.99, seed=0), ValueError),   # rounds to n_train
    (dict(n_train=1, n_subsets=5, alpha=0.5, seed=0), ValueError),
    (dict(n_train=10, n_subsets=0, alpha=0.5, seed=0), ValueError),
    (dict(n_train=10.0, n_subsets=5, alpha=0.5, seed=0), TypeError),
    (dict(n_train=10, n_subsets=5, alpha="half", seed=0), TypeError),
    (dict(n_train=10, n_subsets=5, alpha=0.5, seed=-1), ValueError),
    (dict(n_train=10, n_subsets=5, alpha=0.5, seed=1.5), TypeError),
])
def test_subset_masks_reject_bad_input(kwargs, err):
    with pytest.raises(err):
        random_subset_masks(**kwargs)


# --- lds --------------------------------------------------------------------------------

def test_lds_equals_loop_of_scipy_spearmanr():
    scores, masks, losses = _toy()
    got = lds(scores, masks, losses)
    predicted = masks @ scores.T
    want = [spearmanr(losses[:, t], predicted[:, t]).statistic for t in range(scores.shape[0])]
    np.testing.assert_allclose(got, want, rtol=0, atol=CORR_TOL)


def test_lds_handles_ties_like_spearmanr():
    # Integer scores make many subsets share a predicted loss: average-rank ties.
    rng = np.random.default_rng(5)
    masks = random_subset_masks(8, 80, alpha=0.5, seed=6)
    scores = rng.integers(-1, 2, size=(3, 8)).astype(float)
    scores[:, 0] = 1.0  # no row is all zero
    losses = np.round(masks @ scores.T + rng.normal(size=(80, 3)), 0)
    got = lds(scores, masks, losses)
    predicted = masks @ scores.T
    want = [spearmanr(losses[:, t], predicted[:, t]).statistic for t in range(3)]
    np.testing.assert_allclose(got, want, rtol=0, atol=CORR_TOL)


@settings(max_examples=30)
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 40)), levels=st.integers(1, 50),
       seed=st.integers(0, 2**32 - 1))
def test_fast_average_ranks_equal_scipy_rankdata(shape, levels, seed):
    # Few distinct levels force many ties (levels=1: one constant row); exact equality
    # because average ranks are halves of small integers, exact in float64.
    a = np.random.default_rng(seed).integers(0, levels, size=shape).astype(float)
    np.testing.assert_array_equal(_average_ranks(a), rankdata(a, axis=-1))


def test_lds_stacked_scores_equal_separate_calls():
    scores, masks, losses = _toy()
    stack = np.stack([scores, -2 * scores, np.cos(scores)])
    got = lds(stack, masks, losses)
    assert got.shape == (3, scores.shape[0])
    for k in range(3):
        np.testing.assert_array_equal(got[k], lds(stack[k], masks, losses))


def test_lds_on_subset_index_equals_lds_on_those_rows():
    scores, masks, losses = _toy()
    idx = np.arange(0, 60, 3)
    np.testing.assert_allclose(lds(scores, masks, losses, subset_index=idx),
                               lds(scores, masks[idx], losses[idx]), rtol=0, atol=CORR_TOL)
    boolean = np.zeros(60, bool)
    boolean[idx] = True
    np.testing.assert_array_equal(lds(scores, masks, losses, subset_index=boolean),
                                  lds(scores, masks, losses, subset_index=idx))


@settings(max_examples=25)
@given(scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2**32 - 1))
def test_lds_invariant_to_positive_rescaling_and_flips_under_negation(scale, seed):
    scores, masks, losses = _toy(seed=seed % 1000)
    base = lds(scores, masks, losses)
    # Rescaling multiplies every predicted sum by the same positive number, which keeps
    # their order — unless rounding creates or breaks a tie between near-equal sums; at
    # 60 subsets of Gaussian scores such near-ties (relative gap < 1e-15) do not occur.
    np.testing.assert_allclose(lds(scale * scores, masks, losses), base, rtol=0, atol=CORR_TOL)
    np.testing.assert_allclose(lds(-scores, masks, losses), -base, rtol=0, atol=CORR_TOL)


def test_lds_is_one_for_losses_from_an_additive_datamodel():
    rng = np.random.default_rng(1)
    masks = random_subset_masks(40, 500, seed=2)
    w = rng.normal(size=(6, 40))
    b = rng.normal(size=6)
    losses = b + masks @ w.T            # exactly additive: L_S = b + Σ_{j∈S} w_j
    np.testing.assert_allclose(lds(w, masks, losses), 1.0, rtol=0, atol=CORR_TOL)
    ceil = lds_ceiling(masks, losses, seed=3)
    # Every subset has 20 samples, so w is identified only up to a common shift
    # (w_j + c, b − 20c): compare centred weights. The ridge (1e-3 against a normal-matrix
    # diagonal ≈ 250 · 0.25 = 62) shrinks them by a relative ~1e-3/62 ≈ 2e-5, so 1e-4
    # absolute on O(1) weights; that shrinkage is uniform-ish and far below the gaps
    # between predicted sums, so held-out ranks are kept (allow a near-tie swap: 1e-4).
    assert np.all(ceil.ceiling > 1 - 1e-4)
    centred = lambda a: a - a.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(centred(ceil.weights), centred(w), atol=1e-4)


def test_lds_ceiling_split_is_a_partition_and_scores_method_on_same_subsets():
    scores, masks, losses = _toy(n_subsets=200)
    ceil = lds_ceiling(masks, losses, fit_fraction=0.5, seed=0)
    assert ceil.fit_index.size == 100 and ceil.eval_index.size == 100
    assert np.array_equal(np.union1d(ceil.fit_index, ceil.eval_index), np.arange(200))
    held_out = lds(scores, masks, losses, subset_index=ceil.eval_index)
    assert held_out.shape == ceil.ceiling.shape == (scores.shape[0],)
    assert np.all(np.isfinite(ceil.ceiling))


def test_lds_ceiling_beats_noisy_scores_for_additive_losses_with_noise():
    # Losses = additive part + noise; the true weights are the best additive predictor.
    # Scores = true weights + large noise rank worse than the fitted datamodel.
    rng = np.random.default_rng(9)
    masks = random_subset_masks(30, 2000, seed=10)
    w = rng.normal(size=(5, 30))
    losses = masks @ w.T + rng.normal(scale=1.0, size=(2000, 5))
    ceil = lds_ceiling(masks, losses, seed=11)
    noisy = lds(w + rng.normal(scale=2.0, size=w.shape), masks, losses,
                subset_index=ceil.eval_index)
    assert np.all(ceil.ceiling > noisy)


def test_lds_constant_column_returns_nan_and_warns_with_indices():
    scores, masks, losses = _toy()
    losses = losses.copy()
    losses[:, 2] = 3.0
    with pytest.warns(ConstantInputWarning, match=r"test indices: 2"):
        out = lds(scores, masks, losses)
    assert np.isnan(out[2]) and np.all(np.isfinite(np.delete(out, 2)))
    zero = scores.copy()
    zero[1] = 0.0
    with pytest.warns(ConstantInputWarning, match=r"test indices: 1"):
        out = lds(zero, masks, _toy()[2])
    assert np.isnan(out[1])


def test_lds_no_warning_when_all_defined():
    scores, masks, losses = _toy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lds(scores, masks, losses)


@pytest.mark.parametrize("mutate,err,match", [
    (lambda s, m, l: (s[:, :-1], m, l), ValueError, "scores"),
    (lambda s, m, l: (s, m, l[:-1]), ValueError, "subset_losses"),
    (lambda s, m, l: (s, m, l[:, :-1]), ValueError, "test"),
    (lambda s, m, l: (s[0], m, l), ValueError, "scores"),
    (lambda s, m, l: (np.where(s > 1, np.nan, s), m, l), ValueError, "scores"),
    (lambda s, m, l: (s, m, np.where(l > 1, np.inf, l)), ValueError, "subset_losses"),
    (lambda s, m, l: (s, m * 2.0, l), ValueError, "masks"),
    (lambda s, m, l: (s, m.astype(str), l), TypeError, "masks"),
    (lambda s, m, l: (s, m[0], l), ValueError, "masks"),
    (lambda s, m, l: (s.astype(str), m, l), TypeError, "scores"),
])
def test_lds_rejects_bad_input(mutate, err, match):
    scores, masks, losses = _toy()
    with pytest.raises(err, match=match):
        lds(*mutate(scores, masks, losses))


def test_lds_rejects_bad_subset_index():
    scores, masks, losses = _toy()
    with pytest.raises(ValueError, match="subset_index"):
        lds(scores, masks, losses, subset_index=[0])
    with pytest.raises(ValueError, match="subset_index"):
        lds(scores, masks, losses, subset_index=[0, 600])
    with pytest.raises(TypeError, match="subset_index"):
        lds(scores, masks, losses, subset_index=[0.5, 1.5])


def test_lds_ceiling_rejects_bad_input():
    _, masks, losses = _toy()
    with pytest.raises(ValueError, match="fit_fraction"):
        lds_ceiling(masks, losses, fit_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="hold out"):
        lds_ceiling(masks[:3], losses[:3], fit_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="ridge"):
        lds_ceiling(masks, losses, ridge=-1.0, seed=0)
    with pytest.raises(ValueError, match="subset_losses"):
        lds_ceiling(masks, losses[:-1], seed=0)


# --- auc ------------------------------------------------------------------------------

def test_auc_perfect_chance_and_reversed():
    labels = np.array([0, 0, 1, 1, 0, 1], bool)
    assert auc(labels.astype(float), labels) == 1.0
    assert auc(-labels.astype(float), labels) == 0.0
    assert auc(np.zeros(6), labels) == 0.5       # all ties: chance


def test_auc_equals_pairwise_win_rate():
    # AUC = P(score_pos > score_neg) + ½ P(tie), counted over all pairs.
    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.3
    s = np.round(rng.normal(size=60) + labels, 1)
    pos, neg = s[labels], s[~labels]
    wins = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc(s, labels) == pytest.approx(wins, abs=1e-12)


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        auc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="shape"):
        auc([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(TypeError, match="is_positive"):
        auc([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="scores_for_positive"):
        auc([np.nan, 0.2], [True, False])


# --- synthetic ------------------------------------------------------------------------

def test_synthetic_noise_has_requested_standard_deviation():
    # With 200 000 residuals the sample std has relative standard error ≈ 1/√(2n) ≈ 0.0016
    # (Gaussian) and ≈ √(5/4n) ≈ 0.0025 (Laplace, kurtosis 6); 2 % is > 8 standard errors.
    for kind in ("gaussian", "laplace"):
        p = make_linear_problem(n_train=200_000, d=2, n_test=10, sigma_n=0.7, sigma_s=0.1,
                                train_noise=kind, seed=4)
        resid = p.y - p.X @ p.w
        assert abs(resid.std() / 0.7 - 1) < 0.02
        # Laplace is heavier tailed: excess kurtosis 3 vs 0.
        kurt = np.mean(resid**4) / np.mean(resid**2) ** 2 - 3
        assert (abs(kurt - 3) < 0.3) if kind == "laplace" else (abs(kurt) < 0.1)


def test_synthetic_shapes_and_shared_design_across_noise_levels():
    a = make_linear_problem(sigma_n=0.1, sigma_s=1.0, seed=1)
    b = make_linear_problem(sigma_n=1.0, sigma_s=0.1, seed=1)
    assert a.X.shape == (100, 10) and a.y.shape == (100,)
    assert a.X_test.shape == (50, 10) and a.y_test.shape == (50,)
    assert np.array_equal(a.X, b.X) and np.array_equal(a.w, b.w)
    assert not np.array_equal(a.y, b.y)


@pytest.mark.parametrize("kwargs,err", [
    (dict(sigma_n=-1.0, sigma_s=1.0, seed=0), ValueError),
    (dict(sigma_n=1.0, sigma_s=np.nan, seed=0), ValueError),
    (dict(sigma_n=1.0, sigma_s=1.0, train_noise="cauchy", seed=0), ValueError),
    (dict(sigma_n=1.0, sigma_s=1.0, test_noise=1, seed=0), TypeError),
    (dict(sigma_n=1.0, sigma_s=1.0, seed="a"), TypeError),
    (dict(n_train=0, sigma_n=1.0, sigma_s=1.0, seed=0), ValueError),
])
def test_synthetic_rejects_bad_input(kwargs, err):
    with pytest.raises(err):
        make_linear_problem(**kwargs)
