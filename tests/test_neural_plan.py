"""The shared path plan (plan_path) and the fused feature path on saturated float32 models."""
import numpy as np
import pytest
import torch

from iif_ref.neural import (IIFConfig, integrated_influence, path_model_step, path_targets,
                            plan_path, test_features, train_features, unlearn)
from iif_ref.neural.features import step_features
from iif_ref.neural.features import _fuse_factor, _parallel_factor
from iif_ref.neural.functional import FunctionalModel, output_weights
from iif_ref.neural.losses import resolve_loss

EPS32 = np.finfo(np.float32).eps


def _problem(seed=0, n=25, n_test=3):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double()
    return (net, rng.standard_normal((n, 4)), rng.integers(0, 3, n),
            rng.standard_normal((n_test, 4)), rng.integers(0, 3, n_test))


@pytest.mark.parametrize("path_models", ["step", "flow"])
def test_plan_steps_are_the_chain_of_eq_16_from_theta_star_with_eq_15_targets(path_models):
    net, X, y, Xt, yt = _problem()
    opts = dict(K=3, quadrature="euler", baseline="joint", proj_dim=6, unlearn_epochs=2,
                unlearn_lr=1e-2, path_lr=1e-2, path_time=3e-2, path_models=path_models,
                progress=False)
    plan = plan_path(net, "cross_entropy", X, y, Xt, yt, **opts)
    cfg = IIFConfig.from_options(opts)
    # Independent recomputation from the public building blocks.
    fm = FunctionalModel(net)
    loss = resolve_loss("cross_entropy")
    Xtt, Y = torch.as_tensor(X), torch.as_tensor(np.eye(3)[y])
    Ytt = torch.as_tensor(np.eye(3)[yt])
    theta_p, _ = unlearn(fm, loss, Xtt, Y, torch.as_tensor(Xt), Ytt, cfg)
    (group,) = plan.groups
    for n in fm.names:
        torch.testing.assert_close(group.theta_prime[n], theta_p[n], rtol=0, atol=0)
    with torch.no_grad():
        Ybar = torch.softmax(fm.forward(theta_p, Xtt), 1)
    # Same operations in the same order: equal to float64 rounding of softmax (few ulp).
    torch.testing.assert_close(group.Ybar, Ybar, rtol=4 * np.finfo(float).eps, atol=0)
    theta = fm.theta_star
    steps = list(plan.steps(group))
    assert [s.k for s in steps] == [3, 2, 1]
    for s in steps:
        rho_k = path_targets(Y, Ybar, s.k / 3, mask=True)
        if s.k < 3:
            # "step": η = path_lr on ρ(t_k); "flow": η = path_time/3 (the node spacing)
            # on the targets of the interval's midpoint (t_k + t_{k+1})/2.
            t_step = s.k / 3 if path_models == "step" else (s.k + 0.5) / 3
            theta, _ = path_model_step(fm, loss, theta, Xtt,
                                       path_targets(Y, Ybar, t_step, mask=True), cfg,
                                       k=s.k, dt=1 / 3)
            assert s.path_trajectory is not None and len(s.path_trajectory) == 2
        else:
            assert s.path_trajectory is None            # θ_K = θ*, nothing computed
        for n in fm.names:
            torch.testing.assert_close(s.theta[n], theta[n], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(s.rho_k, rho_k, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            s.rho_prev, path_targets(Y, Ybar, (s.k - 1) / 3, mask=True), rtol=1e-12, atol=0)
        np.testing.assert_allclose(
            plan.test_features(s),
            test_features(net, "cross_entropy", theta, Xt, yt, proj_dim=6, kind=cfg.kind),
            rtol=1e-12, atol=1e-14)
    # Δ = L(θ*) − L(θ') from the plan's losses is what the run reports.
    run = integrated_influence(net, "cross_entropy", X, y, Xt, yt, **opts)
    np.testing.assert_allclose(run.delta, plan.loss_star - group.loss_prime, rtol=1e-12,
                               atol=1e-14)


def test_plan_path_refuses_config_and_options_together():
    net, X, y, Xt, yt = _problem()
    with pytest.raises(TypeError, match="config"):
        plan_path(net, "cross_entropy", X, y, Xt, yt, config=IIFConfig(), K=2)


def _saturated_float32_classifier():
    # Large weights: most training samples have p_y = 1 in float32, so p − e_y has
    # entries ~1e-20..1e-40 whose float32 squares underflow (or are exactly zero).
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(40.0)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 4)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.as_tensor(X)).argmax(1).numpy()
    y[:5] = (y[:5] + 1) % 3                                # a few confidently wrong samples
    return net, X, y


def _masked_step(net, X, y, baseline=lambda p: p):
    """Masked cross-entropy targets of one path step (t = 0.4 → 0.6) from the softmax
    baseline, and their output weights: (loss, F, Y, rho_k, rho_prev, w_to, w_from)."""
    fm = FunctionalModel(net)
    loss = resolve_loss("cross_entropy")
    Y = torch.as_tensor(np.eye(3, dtype=np.float32)[y])
    with torch.no_grad():
        F = fm.forward(fm.theta_star, torch.as_tensor(X))
        pbar = baseline(torch.softmax(F, 1))
    rho_k, rho_prev = (path_targets(Y, pbar, t, mask=True) for t in (0.6, 0.4))
    return (loss, F, Y, rho_k, rho_prev, output_weights(loss, F, rho_k),
            output_weights(loss, F, rho_prev))


def test_fused_path_engages_when_float32_weights_underflow():
    net, X, y = _saturated_float32_classifier()
    loss, F, Y, rho_k, rho_prev, w_to, w_from = _masked_step(net, X, y)
    # The premise: float32 squares of some rows' weights underflow to 0.
    assert bool(((w_to * w_to).sum(1) == 0).any())
    alpha = _parallel_factor(w_to, w_from, w_to - w_from)
    assert alpha is not None
    a = train_features(net, "cross_entropy", None, X, rho_prev, rho_k, proj_dim=16,
                       backend="numpy", fuse=True)
    b = train_features(net, "cross_entropy", None, X, rho_prev, rho_k, proj_dim=16,
                       backend="numpy", fuse=False)
    np.testing.assert_array_equal(a[0], b[0])
    # Ψ: α·(u A) against (J^T w_d) A: both carry the float32 rounding of w_d (64 eps of
    # the weights, the _parallel_factor tolerance) and of the projection (√M eps per
    # row, M = 67 here); 1e3 eps of the largest |Ψ| covers both.
    scale = np.abs(b[1]).max()
    assert scale > 0
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e3 * EPS32 * scale)


def _confident_float32_classifier():
    # Logit margins 20..40 (identity weights): for margins above ~29, 1 − p_y < 1e-11,
    # and the float32 true-class weight s (p_y − 1) is dominated by the rounding of p_y
    # (relative 1e-16 of 1); its square does not underflow.
    net = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(3))
    m = np.linspace(20.0, 40.0, 50)
    X = np.stack([m, np.zeros_like(m), np.full_like(m, 0.5)], 1).astype(np.float32)
    return net, X, np.zeros(50, dtype=int)


# A 9-parameter model keeps the saturated case small; P = 16 exceeds it on purpose.
@pytest.mark.filterwarnings("ignore::iif_ref.errors.ProjectionDimensionWarning")
def test_fused_path_engages_on_a_confident_float32_classifier():
    # The weights of the masked path's two targets are parallel analytically but not to
    # their float32 rounding here; the targets are, and the cross-entropy's ∂l/∂f is
    # linear in them, so the chunk must still take the one-row path.
    net, X, y = _confident_float32_classifier()
    # A baseline away from the model's output.
    loss, F, Y, rho_k, rho_prev, w_to, w_from = _masked_step(
        net, X, y, baseline=lambda p: 0.9 * p + 0.05)
    assert _parallel_factor(w_to, w_from, w_to - w_from) is None     # the premise
    alpha = _fuse_factor(loss, F, rho_k, rho_prev, w_to, w_from, w_to - w_from)
    assert alpha is not None
    # α_i = Δρ_i/ρ_i on the true class (the other entries are 0 on the masked path).
    r_to = (rho_k * Y).sum(1).double()
    r_from = (rho_prev * Y).sum(1).double()
    np.testing.assert_allclose(alpha.numpy(), ((r_to - r_from) / r_to).numpy(),
                               rtol=64 * EPS32)
    a = train_features(net, "cross_entropy", None, X, rho_prev, rho_k, proj_dim=16,
                       backend="numpy", fuse=True)
    b = train_features(net, "cross_entropy", None, X, rho_prev, rho_k, proj_dim=16,
                       backend="numpy", fuse=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e3 * EPS32 * np.abs(b[1]).max())


def test_fuse_factor_tests_the_weights_for_a_loss_affine_in_the_target():
    # MSE: ∂l/∂f = f − y is affine, not linear, in y. Parallel targets (y_to = 2 y_from)
    # do not make the weights parallel, so the target test must not be used.
    loss = resolve_loss("mse")
    F = torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=torch.float64)
    y_from = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    y_to = 2 * y_from
    w_to, w_from = output_weights(loss, F, y_to), output_weights(loss, F, y_from)
    assert _parallel_factor(y_to, y_from, y_to - y_from) is not None
    assert _fuse_factor(loss, F, y_to, y_from, w_to, w_from, w_to - w_from) is None


def test_parallel_factor_refuses_a_zero_row_with_a_nonzero_direction():
    w_to = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    w_from = torch.tensor([[0.5, -0.5], [2.0, -2.0]])
    assert _parallel_factor(w_to, w_from, w_to - w_from) is None
    w_from = torch.tensor([[0.0, 0.0], [2.0, -2.0]])
    alpha = _parallel_factor(w_to, w_from, w_to - w_from)
    np.testing.assert_array_equal(alpha.numpy(), [0.0, -1.0])


@pytest.mark.parametrize("mask, chunk_size", [(True, 7), (False, 7), (True, 2), (False, 64)])
def test_step_features_equal_separate_train_and_test_features(mask, chunk_size):
    # mask=True fuses u_i and J_iΔy (one row per sample), mask=False needs two rows;
    # chunk_size=2 < n_test=3 sends the test rows through their own pass.
    net, X, y, Xt, yt = _problem(seed=5, n=20)
    Y = torch.as_tensor(np.eye(3)[y])
    with torch.no_grad():
        pbar = torch.softmax(net(torch.as_tensor(X)), 1)
    rho_k, rho_prev = (path_targets(Y, pbar, t, mask=mask) for t in (0.6, 0.4))
    opts = dict(proj_dim=9, seed=4, chunk_size=chunk_size, backend="numba", step=2)
    Phi, Psi, Gamma = step_features(net, "cross_entropy", None, X, rho_prev, rho_k, Xt, yt,
                                    **opts)
    Phi2, Psi2 = train_features(net, "cross_entropy", None, X, rho_prev, rho_k, **opts)
    Gamma2 = test_features(net, "cross_entropy", None, Xt, yt, **opts)
    # Same rows times the same A; only the matrix-product summation order can differ
    # with the number of rows in a call: float64, M = 57 terms → 1e3 eps of the row scale.
    for a, b in ((Phi, Phi2), (Psi, Psi2), (Gamma, Gamma2)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e3 * np.finfo(float).eps
                                   * np.abs(b).max())
    assert np.abs(Gamma2).max() > 0 and np.abs(Psi2).max() > 0
