"""Quadrature of the path integral (Eq. 9), the residual against the path's own loss
change, the three readings of the path models (Eq. 16), and the one result schema.

The linear MSE path is the known integral: θ(Γ(t)) is affine in t, so the integrand
``dL_test/dt`` is affine in t and :func:`iif_ref.linear.integrated_influence` with
``K=None`` gives the exact integral of Eq. (9).
"""
import warnings

import numpy as np
import pytest
import torch

import iif_ref.linear as linear
from iif_ref.neural import (FunctionalModel, IIFConfig, attribute, integrated_influence,
                            path_model_step, resolve_loss)
from iif_ref.neural.baseline import per_sample_losses
from iif_ref.neural.path import path_loss, step_time
from iif_ref.neural.quadrature import RULES, quadrature_rule
from iif_ref.neural.result import COMPLETENESS_FIELDS, warn_incomplete
from test_neural_bridge import _linear_problem

EPS64 = np.finfo(np.float64).eps

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# --- the rules ------------------------------------------------------------------------

@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("K", [1, 2, 5, 20])
def test_rules_integrate_constants_and_their_embedded_rules_too(name, K):
    r = quadrature_rule(name, K)
    assert r.nodes.shape == r.weights.shape == r.coarse_weights.shape == (K,)
    assert np.all(np.diff(r.nodes) > 0) and 0 < r.nodes[0] and r.nodes[-1] <= 1
    assert np.all(r.weights > 0)
    # Interpolatory weights from a Legendre-basis solve: rounding of order K·eps.
    np.testing.assert_allclose(r.weights.sum(), 1.0, rtol=0, atol=1e3 * EPS64)
    np.testing.assert_allclose(r.coarse_weights.sum(), 1.0, rtol=0, atol=1e3 * EPS64)


def test_euler_is_the_grid_of_eq_10():
    r = quadrature_rule("euler", 4)
    np.testing.assert_array_equal(r.nodes, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(r.weights, [0.25] * 4)
    np.testing.assert_array_equal(r.starts, [0.0, 0.25, 0.5, 0.75])   # t_{k−1}
    # Embedded: right endpoints 1 and 0.5, each covering a width of 0.5.
    np.testing.assert_array_equal(r.coarse_weights, [0.0, 0.5, 0.0, 0.5])


@pytest.mark.parametrize("K", [2, 3, 5, 8])
def test_radau_keeps_t_1_and_is_exact_to_its_degree_in_the_graded_variable(K):
    r = quadrature_rule("radau", K)
    assert r.nodes[-1] == 1.0                  # θ* itself: no extra path model
    # t = u²: ∫ t^m dt = ∫ 2u^{2m+1} du, exact for 2m + 1 ≤ 2K − 2.
    for m in range(0, (2 * K - 3) // 2 + 1):
        np.testing.assert_allclose(r.weights @ r.nodes ** m, 1.0 / (m + 1), rtol=1e-12)
    # The graded nodes crowd toward t = 0: the lowest is below Euler's 1/K by far.
    assert r.nodes[0] < 0.25 / K


def test_unknown_rule_and_bad_K_are_named():
    with pytest.raises(ValueError, match="quadrature"):
        quadrature_rule("simpson", 5)
    with pytest.raises(ValueError, match="K"):
        quadrature_rule("radau", 0)
    with pytest.raises(ValueError, match="quadrature"):
        IIFConfig(quadrature="trapezoid")


# --- the known integral: linear MSE ---------------------------------------------------

_EXACT_PATH = dict(lam=1.0, baseline="per_test", unlearn_reduction="sum",
                   unlearn_optimizer="lbfgs", unlearn_epochs=1, path_models="refit",
                   refit_tol=1e-12, curvature="gauss_newton", proj_dim=None, damping=0.0,
                   progress=False)


@pytest.fixture(scope="module")
def linear_runs():
    X, y, Xt, yt, net = _linear_problem(0)
    exact = linear.integrated_influence(X, y, Xt, yt, K=None, lam=1.0).sum(1)
    runs = {(rule, K): integrated_influence(net, "mse", X, y, Xt, yt, K=K, quadrature=rule,
                                            **_EXACT_PATH)
            for rule, K in [("radau", 3), ("euler", 4)]}
    # Tolerance of the L-BFGS solves (see test_neural_bridge): located to ≈ sqrt(eps)
    # relative, times the conditioning of the quadratics.
    H = 2 * X.T @ X
    kappa = max(np.linalg.cond(H), *(np.linalg.cond(H - 2 * np.outer(x, x)) for x in Xt))
    tol = 10 * kappa * np.sqrt(EPS64) * np.abs(exact).max()
    return runs, exact, tol


def test_radau_is_exact_on_the_affine_integrand_and_its_estimate_bounds_the_error(
        linear_runs):
    runs, exact, tol = linear_runs
    r = runs[("radau", 3)]
    # Integrand affine in t: g(u) = f(u²)·2u is cubic, within Radau K = 3's degree 4.
    np.testing.assert_allclose(r.scores.sum(1), exact, rtol=0, atol=tol)
    # The embedded 2-node rule (degree 1 in u) is not exact: the estimate is an upper
    # bound of the error, not zero.
    assert np.all(r.quadrature_error >= np.abs(r.scores.sum(1) - exact) - tol)
    assert np.sum(r.quadrature_error > 100 * tol) >= 2


def test_euler_error_estimate_equals_its_error_on_the_affine_integrand(linear_runs):
    runs, exact, tol = linear_runs
    r = runs[("euler", 4)]
    # f(t) = a + bt: Euler with K steps errs by b/(2K), its embedded rule (2 steps of
    # 2/K) by b/K, so the estimate |Q_K − Q_coarse| is exactly the error b/(2K).
    err = np.abs(r.scores.sum(1) - exact)
    assert np.sum(err > 100 * tol) >= 2        # real errors (b ≠ 0), not rounding
    np.testing.assert_allclose(r.quadrature_error, err, rtol=0, atol=2 * tol)


def test_residual_is_sum_minus_delta_path_and_delta_is_eq_12(linear_runs):
    runs, _, tol = linear_runs
    X, y, Xt, yt, _ = _linear_problem(0)
    for r in runs.values():
        np.testing.assert_array_equal(r.residual, r.scores.sum(1) - r.delta_path)
        np.testing.assert_array_equal(r.path_delta, r.delta_path)
        # Unmasked MSE path with refits: θ_0 = θ', so the path's change is Δ (Eq. 12).
        np.testing.assert_allclose(r.delta, linear.delta(X, y, Xt, yt, lam=1.0),
                                   rtol=0, atol=tol)
        np.testing.assert_allclose(r.delta_path, r.delta, rtol=0, atol=tol)


# --- the warning ------------------------------------------------------------------------

def test_incompleteness_warning_is_one_per_call_naming_the_first_rows_and_the_count():
    residual = np.array([0.0, 5.0, -3.0] + [2.0] * 20)
    delta_path = np.ones(23)
    with pytest.warns(RuntimeWarning) as record:
        bad = warn_incomplete(residual, delta_path)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "22 of 23" in msg and "rows 1, 2, 3," in msg and "..." in msg
    np.testing.assert_array_equal(bad, np.arange(1, 23))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_incomplete(np.array([0.5]), np.array([-1.0])).size == 0


# --- the three readings of the path models ----------------------------------------------

def _classifier(seed=0, n=24):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                              torch.nn.Linear(5, 3)).double()
    X = torch.as_tensor(rng.standard_normal((n, 3)))
    Y = torch.as_tensor(np.eye(3)[rng.integers(0, 3, n)])
    rho = 0.6 * Y + 0.4 * torch.softmax(torch.as_tensor(rng.standard_normal((n, 3))), 1)
    return net, X, Y, rho


def test_epoch_with_one_full_batch_is_the_step_reading():
    net, X, _, rho = _classifier()
    fm, loss = FunctionalModel(net), resolve_loss("cross_entropy")
    step, _ = path_model_step(fm, loss, fm.theta_star, X, rho,
                              IIFConfig(path_models="step", path_lr=0.01), k=1)
    epoch, _ = path_model_step(fm, loss, fm.theta_star, X, rho,
                               IIFConfig(path_models="epoch", path_lr=0.01,
                                         path_batch_size=X.shape[0]), k=1)
    for n in fm.names:      # the same full-batch gradient step, to rounding of the sum
        torch.testing.assert_close(epoch[n], step[n], rtol=0, atol=1e3 * EPS64)


def test_epoch_takes_one_pass_of_mini_batches_and_lowers_the_path_loss():
    net, X, _, rho = _classifier()
    fm, loss = FunctionalModel(net), resolve_loss("cross_entropy")
    cfg = IIFConfig(path_models="epoch", path_lr=0.002, path_batch_size=6)
    theta, traj = path_model_step(fm, loss, fm.theta_star, X, rho, cfg, k=1)
    step, _ = path_model_step(fm, loss, fm.theta_star, X, rho, cfg.replace(
        path_models="step"), k=1)
    # Four mini-batch steps of a small η on a smooth loss lower it more than one
    # full-batch step, and the trajectory ends at the model returned.
    start = path_loss(fm, loss, fm.theta_star, X, rho, cfg)
    assert path_loss(fm, loss, theta, X, rho, cfg) < path_loss(fm, loss, step, X, rho, cfg) \
        < start
    np.testing.assert_allclose(traj[-1], path_loss(fm, loss, theta, X, rho, cfg),
                               rtol=1e-12)


def test_refit_meets_its_stated_convergence_test_or_warns():
    # A linear model with MSE: a quadratic with one minimiser, reached by L-BFGS.
    rng = np.random.default_rng(5)
    net = torch.nn.Linear(3, 3).double()
    X = torch.as_tensor(rng.standard_normal((24, 3)))
    rho = torch.as_tensor(rng.standard_normal((24, 3)))
    fm, loss = FunctionalModel(net), resolve_loss("mse")
    cfg = IIFConfig(path_models="refit", refit_tol=1e-8, refit_max_iter=200)

    def grad_inf(params):
        p = {n: v.detach().clone().requires_grad_(True) for n, v in params.items()}
        per_sample_losses(fm, loss, p, X, rho).sum().backward()
        return max(float(v.grad.abs().max()) for v in p.values())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theta, _ = path_model_step(fm, loss, fm.theta_star, X, rho, cfg, k=1)
    # The stated test: ‖∇‖_∞ ≤ refit_tol · ‖∇ at the start‖_∞.
    assert grad_inf(theta) <= cfg.refit_tol * grad_inf(fm.theta_star)
    # Two iterations cannot meet it: the warning says so instead of returning silently.
    with pytest.warns(RuntimeWarning, match="refit_max_iter=2"):
        path_model_step(fm, loss, fm.theta_star, X, rho, cfg.replace(refit_max_iter=2), k=1)


def test_flow_step_length_is_path_time_times_the_node_spacing_at_the_midpoint_targets():
    net, X, _, rho = _classifier()
    fm, loss = FunctionalModel(net), resolve_loss("cross_entropy")
    flow, _ = path_model_step(fm, loss, fm.theta_star, X, rho,
                              IIFConfig(path_models="flow", path_time=0.05), k=1, dt=0.2)
    step, _ = path_model_step(fm, loss, fm.theta_star, X, rho,
                              IIFConfig(path_models="step", path_lr=0.01), k=1)
    for n in fm.names:      # 0.05 × 0.2 = 0.01: the same gradient step
        torch.testing.assert_close(flow[n], step[n], rtol=0, atol=1e3 * EPS64)
    cfg = IIFConfig(path_models="flow")
    assert step_time(cfg, 0.2, 0.6) == pytest.approx(0.4)
    assert step_time(cfg.replace(path_models="step"), 0.2, 0.6) == 0.2
    with pytest.raises(ValueError, match="dt"):
        path_model_step(fm, loss, fm.theta_star, X, rho, IIFConfig(path_models="flow"), k=1)


def _flow_run(net, X, Y, Xt, yt, **options):
    base = dict(proj_dim=None, curvature="gauss_newton", damping=1e-3, progress=False,
                path_lr=0.01, path_time=0.05, mask_path=False, baseline="prediction")
    base.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return integrated_influence(net, "cross_entropy", X, Y.argmax(1), Xt, yt, **base)


def test_flow_path_does_not_move_with_the_number_of_nodes_and_its_integral_converges():
    # Under "step" each added node moves the path a further path_lr: the loss change
    # of the path (delta_path) grows with K. Under "flow" the path is one gradient flow
    # of length path_time, discretised more finely as K grows: delta_path and ΣI settle.
    net, X, Y, _ = _classifier(n=30)
    Xt, yt = X[:3] + 0.1, Y[:3].argmax(1)
    runs = {(m, K): _flow_run(net, X, Y, Xt, yt, K=K, path_models=m)
            for m in ("flow", "step") for K in (4, 16)}

    def change(m, field):
        a, b = (np.asarray(getattr(runs[m, K], field)) for K in (4, 16))
        return np.max(np.abs(a - b) / np.abs(b))

    assert change("step", "delta_path") > 0.5         # 4 → 16 steps of path_lr
    # What remains is first order in θ's movement within an interval (the targets'
    # variation is integrated exactly at the midpoint): 13% here, from path_time = 0.05
    # on a summed loss of 30 samples.
    assert change("flow", "delta_path") < 0.2
    sums = {m: [runs[m, K].scores.sum(1) for K in (4, 16)] for m in ("flow", "step")}
    rel = {m: np.max(np.abs(a - b) / np.abs(b)) for m, (a, b) in sums.items()}
    assert rel["flow"] < 0.1 and rel["flow"] < rel["step"] / 5


@pytest.mark.parametrize("reading", ["step", "flow", "epoch", "refit"])
def test_path_loss_of_each_path_model_on_its_own_targets_is_in_the_diagnostics(reading):
    net, X, Y, _ = _classifier(n=30)
    Xt, yt = X[:2] + 0.1, Y[:2].argmax(1)
    options = dict(K=3, path_models=reading, path_lr=0.01, path_batch_size=8,
                   refit_max_iter=50, refit_tol=1e-6, proj_dim=None,
                   curvature="gauss_newton", damping=1e-3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = integrated_influence(net, "cross_entropy", X, Y.argmax(1), Xt, yt, **options)
    assert r.config["path_models"] == reading
    d = r.diagnostics
    assert len(d["path_loss"]) == 3 and len(d["path_loss_start"]) == 1
    # The top node is θ* at t = 1: its path loss is the training loss at y.
    fm, loss = FunctionalModel(net), resolve_loss("cross_entropy")
    cfg = IIFConfig(**options)
    np.testing.assert_allclose(d["path_loss"][0], path_loss(fm, loss, fm.theta_star, X, Y,
                                                            cfg), rtol=1e-12)
    # Computed path models: the trajectory's last value is the same loss ("flow" trains
    # on the targets at the middle of each interval, so its trajectory is on those).
    if reading != "flow":
        for traj, value in zip(d["path_trajectory"], d["path_loss"][1:]):
            np.testing.assert_allclose(traj[-1], value, rtol=1e-10)
    # Every node of the default rule is recorded, descending in t.
    nodes = quadrature_rule(cfg.quadrature, 3).nodes
    assert [e["t"] for e in d["node_sums"]] == list(nodes[::-1])
    np.testing.assert_allclose(sum(e["sum"] for e in d["node_sums"]), r.scores.sum(1),
                               rtol=1e-12)


def test_former_path_model_names_are_accepted():
    assert IIFConfig(path_models="one_step").path_models == "step"
    assert IIFConfig(path_models="sgd_epoch").path_models == "epoch"


# --- one result schema ------------------------------------------------------------------

def test_every_method_returns_the_same_fields_with_none_where_it_has_no_path():
    net, X, Y, _ = _classifier(n=30)
    y = Y.argmax(1).numpy()
    Xt, yt = X[:3].numpy() + 0.1, y[:3]
    common = dict(proj_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        results = {m: attribute(net, "cross_entropy", X.numpy(), y, Xt, yt, method=m,
                                **({"progress": False, **common} if m == "iif" else common))
                   for m in ("iif", "tracin", "trak")}
        results["if"] = attribute(net, "cross_entropy", X.numpy(), y, Xt, yt, method="if")
        results["if_projected"] = attribute(net, "cross_entropy", X.numpy(), y, Xt, yt,
                                            method="if", solver="projected", proj_dim=8)
    for name, r in results.items():
        for field in ("scores", "config", "diagnostics", "method") + COMPLETENESS_FIELDS:
            assert hasattr(r, field), (name, field)
        assert r.diagnostics, name                  # never an empty dict
        if name == "iif":
            for field in COMPLETENESS_FIELDS:
                assert getattr(r, field).shape == (3,), field
        else:                                       # None, never a placeholder zero
            assert all(getattr(r, f) is None for f in COMPLETENESS_FIELDS), name
    sums = np.sum(results["tracin"].diagnostics["checkpoint_sums"], axis=0)
    np.testing.assert_allclose(sums, results["tracin"].scores.sum(1), rtol=1e-12)
