"""Completeness of Integrated Influence (Eq. 9–10) and the path models of Eq. (16).

The residual ``Σ_i I − path_delta`` is measured against the loss change of the path
actually computed; with exact path models and exact curvature only the Euler sum's error
is left, which is first order in 1/K. The one-step path model of Eq. (16) is checked
against a gradient step computed here by finite differences of a hand-written network.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the neural half needs torch")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "validation"))
import completeness_order  # noqa: E402

from iif_ref.neural import (FunctionalModel, IIFConfig, integrated_influence,  # noqa: E402
                            path_model_step, resolve_loss)

EPS64 = np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def exact_runs():
    net, X, y, Xt, yt, grad = completeness_order.make_problem(0, n_test=2)
    runs = {K: integrated_influence(net, "mse", X, y, Xt, yt, K=K,
                                    **completeness_order.exact_path_options())
            for K in (1, 2, 4)}
    return runs, grad


def test_residual_falls_at_first_order_in_K_with_exact_path_and_curvature(exact_runs):
    runs, grad = exact_runs
    assert grad < 1e-6                        # θ* is a minimiser, as Eq. (2) assumes
    Ks = sorted(runs)
    slopes = completeness_order.slope(Ks, [runs[K].residual for K in Ks])
    # Right-endpoint Euler on a smooth integrand: residual = c/K + O(1/K²), so the
    # fitted slope over K = 1..4 is −1 up to the O(1/K) correction (measured −1.00 to
    # −1.01 over K = 1..16 in validation/completeness_order.py); the band rejects zeroth
    # order (a residual against the wrong Δ does not fall) and second order.
    assert np.all((slopes > -1.3) & (slopes < -0.7)), slopes
    # Measured |residual|/|path Δ| ≈ 1/K here (0.25 at K = 4): it is an integration
    # error, not a mismatch of what is integrated.
    rel = np.abs(runs[4].residual) / np.abs(runs[4].path_delta)
    assert np.all(rel < 0.35), rel


def test_exact_unmasked_path_integrates_the_baseline_delta(exact_runs):
    runs, _ = exact_runs
    r = runs[4]
    # Unmasked MSE path: ρ(t_0) = f(x; θ') is fitted exactly by θ', so the refit θ_0
    # is θ' (an isolated minimiser) and the path's loss change is Δ of Eq. (12). The
    # refit stops at relative gradient refit_tol = 1e-10 (κ ≈ 1e5), so θ_0 is within
    # ~κ·1e-10 of θ' relative.
    np.testing.assert_allclose(r.path_delta, r.delta, rtol=1e-4, atol=0)
    assert np.all(r.delta < 0)                # the default baseline raised every loss


def _hand_forward(theta, X):
    """``W2 tanh(W1 x + b1) + b2`` written out in NumPy (the network of the oracle test)."""
    W1, b1, W2, b2 = theta[:6].reshape(3, 2), theta[6:9], theta[9:15].reshape(2, 3), theta[15:]
    return np.tanh(X @ W1.T + b1) @ W2.T + b2


def _hand_soft_ce(theta, X, R):
    F = _hand_forward(theta, X)
    logp = F - F.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return float(-(R * logp).sum())


def test_one_step_path_model_is_one_gradient_step_of_eq_16():
    rng = np.random.default_rng(3)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(),
                              torch.nn.Linear(3, 2)).double()
    theta = rng.standard_normal(17)
    torch.nn.utils.vector_to_parameters(torch.as_tensor(theta), net.parameters())
    X = rng.standard_normal((7, 2))
    R = rng.uniform(0.1, 1.0, (7, 2))          # soft path targets ρ(t_k), not normalised
    eta = 0.05
    cfg = IIFConfig(path_models="one_step", path_lr=eta, progress=False)
    fm = FunctionalModel(net)
    theta_k, _ = path_model_step(fm, resolve_loss("cross_entropy"), fm.theta_star,
                                 torch.as_tensor(X), torch.as_tensor(R), cfg, k=1)
    got = fm.flatten(theta_k).numpy()
    # Oracle: ∇ of the summed loss by central differences of the hand-written network.
    # h = 1e-5 balances truncation (h²·|∂³L| ≈ 1e-10) and rounding (eps·L/h ≈ 1e-10).
    h = 1e-5
    grad = np.array([(_hand_soft_ce(theta + h * e, X, R) - _hand_soft_ce(theta - h * e, X, R))
                     / (2 * h) for e in np.eye(17)])
    expected = theta - eta * grad
    # Error of the oracle ≈ eta·1e-9; the step itself is eta·|∇L| ≈ 0.05·O(1), so a
    # frozen step (lr × 0) or a wrong sign misses by ~1e6 times the tolerance.
    np.testing.assert_allclose(got, expected, rtol=0, atol=eta * 1e-7)
    assert np.abs(got - theta).max() > 1e3 * eta * 1e-7


def test_masked_path_starts_at_the_masked_targets_not_at_the_baseline():
    rng = np.random.default_rng(4)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 3)).double()
    X, y = rng.standard_normal((30, 3)), rng.integers(0, 3, 30)
    Xt, yt = rng.standard_normal((2, 3)), rng.integers(0, 3, 2)
    fm, loss = FunctionalModel(net), resolve_loss("cross_entropy")
    theta_p = {n: p + 0.3 * torch.as_tensor(rng.standard_normal(p.shape))
               for n, p in fm.theta_star.items()}
    cfg = IIFConfig(K=1, proj_dim=None, curvature="fisher", damping=1.0, path_lr=0.01,
                    path_models="step", baseline="given", progress=False)
    r = integrated_influence(net, "cross_entropy", X, y, Xt, yt, config=cfg,
                             baseline_params=theta_p)
    assert r.config["mask_path_resolved"]
    # K = 1: θ_0 is one Eq. (16) step from θ* on ρ(t_0) = ȳ ⊙ y = p'_y e_y (appendix E).
    Xtt, Y = torch.as_tensor(X), torch.as_tensor(np.eye(3)[y])
    with torch.no_grad():
        rho0 = torch.softmax(fm.forward(theta_p, Xtt), 1) * Y
    theta0, _ = path_model_step(fm, loss, fm.theta_star, Xtt, rho0, cfg, k=0)

    def test_loss(theta):
        with torch.no_grad():
            F = fm.forward(theta, torch.as_tensor(Xt))
            return -torch.log_softmax(F, 1)[torch.arange(2), torch.as_tensor(yt)].numpy()

    # Same operations as the run, in the same order: equal to a few ulp of the losses.
    tol = 100 * EPS64 * test_loss(fm.theta_star).max()
    np.testing.assert_allclose(r.path_delta, test_loss(fm.theta_star) - test_loss(theta0),
                               rtol=0, atol=tol)
    np.testing.assert_allclose(r.delta, test_loss(fm.theta_star) - test_loss(theta_p),
                               rtol=0, atol=tol)
    # The masked start model is not θ': the path's loss change is not Δ of Eq. (12).
    assert np.all(np.abs(r.path_delta - r.delta) > 0.1 * np.abs(r.delta))
    np.testing.assert_allclose(r.residual, r.scores.sum(1) - r.path_delta, rtol=0, atol=tol)
