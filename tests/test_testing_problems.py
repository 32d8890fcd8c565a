"""Conformance problems: drawn condition number and leverage are exact; strategies bounded."""
import numpy as np
import pytest
from hypothesis import given, settings

from iif_ref import linear
from iif_ref.errors import IndefiniteObjectiveError
from iif_ref.testing import AttributionProblem, Attributor, check_attributor, make_problem
from iif_ref.testing.problems import hessian_condition, max_test_leverage
from iif_ref.testing.strategies import (
    linear_problems,
    projection_inputs,
    solve_inputs,
    torch_models,
)


def _leverages(X):
    Q, _ = np.linalg.qr(X)
    return np.sum(Q * Q, axis=1)


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e4])
def test_make_problem_has_the_requested_condition_number(kappa):
    p = make_problem(30, 4, 2, condition_number=kappa, seed=0)
    sv = np.linalg.svd(p.X, compute_uv=False)
    # κ from an SVD of a matrix built from its SVD: relative error ~ κ·eps.
    assert sv[0] / sv[-1] == pytest.approx(kappa, rel=1e-10 * kappa)
    assert hessian_condition(p) == pytest.approx(kappa ** 2, rel=1e-10 * kappa)


@pytest.mark.parametrize("lev", [0.2, 0.8, 0.99])
def test_make_problem_sets_the_leverage_of_sample_0(lev):
    p = make_problem(20, 3, 2, condition_number=5.0, leverage=lev, seed=1, lam=50.0)
    h = _leverages(p.X)
    # Leverages are squared row norms of an orthonormal basis: accurate to ~d·eps.
    assert h[0] == pytest.approx(lev, abs=1e-12)
    assert h.sum() == pytest.approx(3.0, abs=1e-12)


def test_make_problem_is_reproducible_from_its_seed():
    a = make_problem(12, 2, 3, condition_number=3.0, seed=42)
    b = make_problem(12, 2, 3, condition_number=3.0, seed=42)
    for name in ("X", "y", "X_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_problem_arrays_are_read_only_copies():
    X = np.ones((5, 1)) * np.arange(5)[:, None]
    p = AttributionProblem("p", X, np.arange(5.0), X[:2], np.zeros(2))
    X[0, 0] = 99.0
    assert p.X[0, 0] == 0.0
    with pytest.raises(ValueError):
        p.X[0, 0] = 1.0


def test_checkpoint_params_match_the_closed_form_gradient_descent_iterates():
    # θ_s = θ* − (I − lr H)^s θ* (GD from 0) vs the explicit loop; contraction ≤ 1 so
    # the loop's rounding stays at a few eps·‖θ*‖ for these 4 steps.
    p = make_problem(15, 3, 2, condition_number=4.0, seed=3)
    theta_star = linear.fit(p.X, p.y)
    H = 2.0 * p.X.T @ p.X
    step = np.eye(3) - p.lr * H
    closed = np.array([theta_star - np.linalg.matrix_power(step, s) @ theta_star
                       for s in p.checkpoints])
    np.testing.assert_allclose(p.checkpoint_params(), closed, rtol=0,
                               atol=1e-13 * np.linalg.norm(theta_star))


def test_torch_model_holds_theta_star():
    torch = pytest.importorskip("torch", reason="torch not installed")
    p = make_problem(10, 2, 2, seed=0)
    model = p.torch_model()
    X, y, Xt, yt = p.torch_data()
    assert model.weight.dtype == torch.float64 and model.bias is None
    np.testing.assert_allclose(model(X).detach().numpy()[:, 0], p.X @ p.theta_star,
                               rtol=1e-13, atol=1e-13)
    assert y.shape == (10, 1) and yt.shape == (2, 1)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"n_train": 3, "d": 3}, ValueError, "n_train"),
    ({"condition_number": 0.5}, ValueError, "condition_number"),
    ({"d": 1, "condition_number": 2.0}, ValueError, "d = 1"),
    ({"leverage": 1.0}, ValueError, "leverage"),
    ({"leverage": 0.01}, ValueError, "leverage"),
    ({"noise": -1.0}, ValueError, "noise"),
    ({"lam": 1e-6}, IndefiniteObjectiveError, "lam"),
    ({"seed": -1}, ValueError, "seed"),
])
def test_make_problem_rejects_impossible_parameters(kwargs, exc, match):
    args = {"n_train": 12, "d": 2, "n_test": 2, "seed": 0, **kwargs}
    with pytest.raises(exc, match=match):
        make_problem(**args)


def test_attributor_rejects_bad_declarations():
    with pytest.raises(ValueError, match="kind"):
        Attributor(lambda p: 0, kind="shapley")
    with pytest.raises(ValueError, match="sign"):
        Attributor(lambda p: 0, kind="if", sign="up")
    with pytest.raises(ValueError, match="normalisation"):
        Attributor(lambda p: 0, kind="if", normalisation="median")
    with pytest.raises(ValueError, match="normalisation"):
        Attributor(lambda p: 0, kind="if", normalisation=-2.0)
    with pytest.raises(ValueError, match="capabilities"):
        Attributor(lambda p: 0, kind="iif", capabilities={"magic"})
    with pytest.raises(TypeError, match="callable"):
        Attributor(3, kind="if")
    with pytest.raises(TypeError, match="kind"):
        check_attributor(lambda p: 0)


@settings(max_examples=15)
@given(linear_problems())
def test_drawn_problems_are_well_posed_and_within_bounds(p):
    assert p.n_train > p.d
    assert 1.0 <= p.condition_number <= 1e3
    # λ was drawn ≥ 1.5 × the largest test leverage: Eq. (12) is well posed.
    assert p.lam >= 1.5 * max_test_leverage(p) * (1 - 1e-12)
    assert np.all(np.abs(p.X) < 1e3) and np.all(np.isfinite(p.y))


@settings(max_examples=15)
@given(linear_problems())
def test_linear_iif_passes_the_suite_on_drawn_problems(p):
    # Property: the exact reference satisfies every check on any drawn problem, so the
    # tolerances derived from κ(H) hold over the whole strategy, not only the defaults.
    def linear_iif(q):
        baseline = q.baseline_targets if q.baseline == "prediction" else None
        return linear.integrated_influence(q.X, q.y, q.X_test, q.y_test, lam=q.lam,
                                           K=q.K, baseline_targets=baseline)

    report = check_attributor(linear_iif, kind="iif", problems=[p],
                              capabilities={"prediction_baseline", "exact_integral",
                                            "exact_path"})
    report.raise_if_failed()


@settings(max_examples=10)
@given(projection_inputs())
def test_projection_inputs_have_the_declared_dtype_and_shape(args):
    G = args["G"]
    assert G.dtype == args["dtype"] and G.ndim == 2 and 1 <= args["proj_dim"] <= 64
    assert 0 <= args["seed"] < 2 ** 64


@settings(max_examples=10)
@given(solve_inputs())
def test_solve_inputs_are_consistent_and_damped(args):
    Phi, Psi, Gamma = args["Phi"], args["Psi"], args["Gamma"]
    assert Phi.shape == Psi.shape and Gamma.shape[-1] == Phi.shape[-1]
    assert Gamma.shape[0] == Phi.shape[0]
    assert args["damping"] > 0


@settings(max_examples=5)
@given(torch_models())
def test_torch_models_are_float64_and_match_their_data(case):
    torch = pytest.importorskip("torch", reason="torch not installed")
    out = case["model"](case["X"])
    assert out.dtype == torch.float64 and out.shape == case["y"].shape
    assert case["X_test"].shape[1] == case["X"].shape[1]


@pytest.mark.parametrize("change, exc, match", [
    ({"X": np.ones(5)}, ValueError, "X must have 2"),
    ({"y": np.ones(4)}, ValueError, "same number of rows"),
    ({"X_test": np.ones((2, 3))}, ValueError, "X_test must have d"),
    ({"y": np.array([1.0, np.nan, 0, 0, 0])}, ValueError, "non-finite"),
    ({"lam": 0.0}, ValueError, "lam"),
    ({"K": 0}, ValueError, "K"),
    ({"checkpoints": (2, 1)}, ValueError, "checkpoints"),
    ({"baseline": "zero"}, ValueError, "baseline"),
])
def test_attribution_problem_rejects_bad_fields(change, exc, match):
    fields = {"name": "p", "X": np.arange(10.0).reshape(5, 2), "y": np.arange(5.0),
              "X_test": np.ones((2, 2)), "y_test": np.zeros(2), **change}
    with pytest.raises(exc, match=match):
        AttributionProblem(**fields)


def test_check_attributor_rejects_problems_of_the_wrong_type():
    with pytest.raises(TypeError, match="problems"):
        check_attributor(lambda p: 0, kind="if", problems=[{"X": 1}])
