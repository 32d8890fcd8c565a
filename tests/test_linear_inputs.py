"""Bad input to iif_ref.linear raises a clear ValueError/TypeError naming the argument."""
from __future__ import annotations

import numpy as np
import pytest

from iif_ref import linear
from test_linear_reference import make_problem

X, Y, X_TEST, Y_TEST = make_problem(0, 12, 3, 0.5, 1.0, n_test=2)
N, D = X.shape
MASKS = np.ones((2, N), dtype=bool)

# Every public function with its data arguments, called with one argument replaced.
CALLS = {
    "fit": lambda **kw: linear.fit(kw.get("X", X), kw.get("y", Y),
                                   ridge=kw.get("ridge", 0.0)),
    "unlearned_params": lambda **kw: linear.unlearned_params(
        kw.get("X", X), kw.get("y", Y), kw.get("X_test", X_TEST), kw.get("y_test", Y_TEST),
        lam=kw.get("lam", 1.0), ridge=kw.get("ridge", 0.0)),
    "integrated_influence": lambda **kw: linear.integrated_influence(
        kw.get("X", X), kw.get("y", Y), kw.get("X_test", X_TEST), kw.get("y_test", Y_TEST),
        lam=kw.get("lam", 1.0), K=kw.get("K", None),
        baseline_targets=kw.get("baseline_targets", None), ridge=kw.get("ridge", 0.0)),
    "delta": lambda **kw: linear.delta(
        kw.get("X", X), kw.get("y", Y), kw.get("X_test", X_TEST), kw.get("y_test", Y_TEST),
        lam=kw.get("lam", 1.0), baseline_targets=kw.get("baseline_targets", None),
        ridge=kw.get("ridge", 0.0)),
    "influence_function": lambda **kw: linear.influence_function(
        kw.get("X", X), kw.get("y", Y), kw.get("X_test", X_TEST), kw.get("y_test", Y_TEST),
        ridge=kw.get("ridge", 0.0)),
    "tracin": lambda **kw: linear.tracin(
        kw.get("X", X), kw.get("y", Y), kw.get("X_test", X_TEST), kw.get("y_test", Y_TEST),
        lr=kw.get("lr", 1e-3), checkpoints=kw.get("checkpoints", 2),
        ridge=kw.get("ridge", 0.0)),
    "leave_one_out": lambda **kw: linear.leave_one_out(
        kw.get("X", X), kw.get("y", Y), kw.get("X_test", X_TEST), kw.get("y_test", Y_TEST),
        ridge=kw.get("ridge", 0.0)),
    "subset_test_losses": lambda **kw: linear.subset_test_losses(
        kw.get("X", X), kw.get("y", Y), kw.get("X_test", X_TEST), kw.get("y_test", Y_TEST),
        kw.get("masks", MASKS), ridge=kw.get("ridge", 0.0)),
}
TRAIN_ONLY = {"fit"}


def _with_nonfinite(a, value):
    a = np.array(a, dtype=float)
    a.flat[a.size // 2] = value
    return a


def _cases(args):
    """(function name, argument) pairs; fit takes no test data."""
    return [(name, arg) for name in sorted(CALLS) for arg in args
            if not (name in TRAIN_ONLY and arg in ("X_test", "y_test"))]


@pytest.mark.parametrize("name, arg", _cases(["X", "y", "X_test", "y_test"]))
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_data_raises_naming_argument(name, arg, value):
    bad = _with_nonfinite({"X": X, "y": Y, "X_test": X_TEST, "y_test": Y_TEST}[arg], value)
    with pytest.raises(ValueError, match=rf"^{arg} contains .*non-finite"):
        CALLS[name](**{arg: bad})


SHAPE_CASES = {
    "X": [(X[:, 0], r"^X must have 2 dimension"),
          (X[:0], r"^X is empty"),
          (np.zeros((N, 0)), r"^X must have at least one column")],
    "y": [(Y[:-1], rf"^y must have {N} entries"),
          (np.stack([Y, Y], axis=1), r"^y must hold scalar targets"),
          (Y[None, None], r"^y must have 1 or 2 dimension")],
    "X_test": [(X_TEST[:, :2], rf"^X_test must have d = {D} columns")],
    "y_test": [(Y_TEST[:1], rf"^y_test must have {len(Y_TEST)} entries")],
}


@pytest.mark.parametrize("name, arg, bad, pattern", [
    (name, arg, bad, pattern) for name, arg in _cases(list(SHAPE_CASES))
    for bad, pattern in SHAPE_CASES[arg]])
def test_mismatched_shapes_raise_naming_argument(name, arg, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        CALLS[name](**{arg: bad})


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("arg, bad", [("X", "abc"), ("y", None),
                                      ("X", np.array([["a", "b", "c"]] * N))])
def test_non_numeric_data_raises_type_error(name, arg, bad):
    with pytest.raises(TypeError, match=rf"^{arg} must"):
        CALLS[name](**{arg: bad})


@pytest.mark.parametrize("name", sorted(CALLS))
def test_rank_deficient_training_set_without_ridge_raises(name):
    # n_train <= d: XᵀX is singular. Fine with ridge > 0 (except LOO/subsets, see below).
    X_few, y_few = X[:2], Y[:2]
    with pytest.raises(ValueError, match=r"^X has numerical rank 2 < d = 3 .*ridge > 0"):
        CALLS[name](X=X_few, y=y_few)
    # Collinear columns with plenty of samples.
    X_col = X.copy()
    X_col[:, 2] = 2.0 * X_col[:, 0] - X_col[:, 1]
    with pytest.raises(ValueError, match=r"^X has numerical rank 2 < d = 3 .*linearly dependent"):
        CALLS[name](X=X_col)


@pytest.mark.parametrize("name", ["fit", "integrated_influence", "influence_function",
                                  "tracin", "delta"])
def test_ridge_makes_underdetermined_problems_well_posed(name):
    X_few, y_few = X[:2], Y[:2]
    out = CALLS[name](X=X_few, y=y_few, ridge=0.5, lam=5.0)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("ridge, exc, pattern", [
    (-1.0, ValueError, r"^ridge must be >= 0"),
    (np.nan, ValueError, r"^ridge must be finite"),
    ("0.1", TypeError, r"^ridge must be a real number"),
])
def test_bad_ridge_raises(name, ridge, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CALLS[name](ridge=ridge)


@pytest.mark.parametrize("name", ["unlearned_params", "integrated_influence", "delta"])
@pytest.mark.parametrize("lam, exc, pattern", [
    (0.0, ValueError, r"^lam must be > 0"),
    (-1.0, ValueError, r"^lam must be > 0"),
    (np.inf, ValueError, r"^lam must be finite"),
    (None, TypeError, r"^lam must be a real number"),
])
def test_bad_lam_raises(name, lam, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CALLS[name](lam=lam)


@pytest.mark.parametrize("K, exc, pattern", [
    (0, ValueError, r"^K must be >= 1"),
    (-3, ValueError, r"^K must be >= 1"),
    (2.5, TypeError, r"^K must be an integer"),
    (2.0, TypeError, r"^K must be an integer"),
    (True, TypeError, r"^K must be an integer"),
])
def test_bad_K_raises(K, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CALLS["integrated_influence"](K=K)


def test_numpy_integer_K_is_accepted():
    a = CALLS["integrated_influence"](K=np.int64(3))
    b = CALLS["integrated_influence"](K=3)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["integrated_influence", "delta"])
@pytest.mark.parametrize("bad, pattern", [
    (Y[:-1], r"^baseline_targets must have shape"),
    (np.zeros((3, N)), r"^baseline_targets must have shape"),      # 3 rows for 2 test points
    (np.zeros((2, N + 1)), r"^baseline_targets must have shape"),
    (_with_nonfinite(Y, np.nan), r"^baseline_targets contains .*non-finite"),
])
def test_bad_baseline_targets_raise(name, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        CALLS[name](baseline_targets=bad)


@pytest.mark.parametrize("func", [linear.path_params, linear.path_derivative])
@pytest.mark.parametrize("baseline, t, exc, pattern", [
    (Y[:-1], 0.5, ValueError, r"^baseline_targets must have shape"),
    (Y, np.nan, ValueError, r"^t contains .*non-finite"),
    (Y, [[0.1, 0.2]], ValueError, r"^t must have 0 or 1 dimension"),
    (Y, "a", TypeError, r"^t must"),
])
def test_bad_path_arguments_raise(func, baseline, t, exc, pattern):
    with pytest.raises(exc, match=pattern):
        func(X, Y, baseline, t)


@pytest.mark.parametrize("theta, pattern", [
    (np.zeros(D + 1), rf"^X_test must have d = {D + 1} columns"),
    (np.zeros((3, D)), r"^theta must have shape"),
    (_with_nonfinite(np.zeros(D), np.inf), r"^theta contains .*non-finite"),
])
def test_bad_theta_in_test_losses_raises(theta, pattern):
    with pytest.raises(ValueError, match=pattern):
        linear.test_losses(theta, X_TEST, Y_TEST)


@pytest.mark.parametrize("masks, exc, pattern", [
    (MASKS.astype(float), TypeError, r"^masks must be a boolean array, got dtype float64"),
    (MASKS.astype(int), TypeError, r"^masks must be a boolean array"),
    (None, TypeError, r"^masks must be a boolean array"),
    (MASKS[0], ValueError, rf"^masks must have shape \(n_subsets >= 1, {N}\)"),
    (MASKS[:, :-1], ValueError, r"^masks must have shape"),
    (MASKS[:0], ValueError, r"^masks must have shape"),
])
def test_bad_masks_raise(masks, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CALLS["subset_test_losses"](masks=masks)


def test_empty_and_singular_subsets_are_named():
    masks = np.ones((4, N), dtype=bool)
    masks[1] = False                                     # empty
    masks[3] = False
    with pytest.raises(ValueError, match=r"^masks rows \[1, 3\] select no training sample"):
        CALLS["subset_test_losses"](masks=masks)
    masks = np.ones((4, N), dtype=bool)
    masks[2] = False
    masks[2, :2] = True                                  # 2 samples for d = 3: singular Gram
    with pytest.raises(ValueError, match=r"^masks rows \[2\] select subsets whose Gram"):
        CALLS["subset_test_losses"](masks=masks)
    # With ridge the same subset is well posed.
    out = CALLS["subset_test_losses"](masks=masks, ridge=0.1)
    assert out.shape == (4, len(Y_TEST)) and np.all(np.isfinite(out))


def test_leave_one_out_names_samples_with_unit_leverage():
    # Sample 0 is the only one with a non-zero first feature: h_00 = 1, and removing it
    # leaves the first column of X all zero.
    X_lev = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, -1.0]])
    y_lev = np.array([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"^training sample\(s\) \[0\] have leverage h_ii = 1"):
        linear.leave_one_out(X_lev, y_lev, X_lev[:1], y_lev[:1])
    # Ridge keeps every leverage below 1.
    out = linear.leave_one_out(X_lev, y_lev, X_lev[:1], y_lev[:1], ridge=0.1)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("kw, exc, pattern", [
    ({"lr": 0.0}, ValueError, r"^lr must be > 0"),
    ({"lr": -1e-3}, ValueError, r"^lr must be > 0"),
    ({"checkpoints": 0}, ValueError, r"^checkpoints must be >= 1"),
    ({"checkpoints": [3, 2]}, ValueError, r"^checkpoints must be strictly increasing"),
    ({"checkpoints": [1, 1]}, ValueError, r"^checkpoints must be strictly increasing"),
    ({"checkpoints": [-1, 2]}, ValueError, r"^checkpoints must be strictly increasing non-neg"),
    ({"checkpoints": []}, ValueError, r"^checkpoints must be an int or a non-empty"),
    ({"checkpoints": [0.5, 1.0]}, TypeError, r"^checkpoints must hold integer"),
    ({"checkpoints": 5, "n_steps": 3}, ValueError, r"need n_steps >= 5"),
    ({"checkpoints": [1, 2], "n_steps": 3}, ValueError, r"^n_steps is used only when"),
    ({"checkpoints": 2, "n_steps": 0}, ValueError, r"^n_steps must be >= 1"),
])
def test_bad_tracin_arguments_raise(kw, exc, pattern):
    args = {"lr": 1e-3, "checkpoints": 2, **kw}
    with pytest.raises(exc, match=pattern):
        linear.tracin(X, Y, X_TEST, Y_TEST, **args)


def test_all_zero_features_raise():
    with pytest.raises(ValueError, match=r"^X is all zeros"):
        linear.fit(np.zeros((5, 2)), np.ones(5))


def test_tracin_learning_rate_too_small_to_converge_needs_n_steps():
    with pytest.raises(ValueError, match=r"^lr = 1e-300 is too small .*pass n_steps"):
        linear.tracin(X, Y, X_TEST, Y_TEST, lr=1e-300, checkpoints=3)
    out = linear.tracin(X, Y, X_TEST, Y_TEST, lr=1e-300, checkpoints=3, n_steps=30)
    assert out.shape == (len(Y_TEST), N) and np.all(np.isfinite(out))
