"""Bridge tests: the torch implementation of Algorithm 1 against exact references.

(a) bias-free ``nn.Linear`` + MSE, unprojected, Gauss–Newton, unlearning and path models
    solved to convergence  ==  the closed form :func:`iif_ref.linear.integrated_influence`;
(b) K = 1 with baseline f(x; θ*)  ==  the influence function (independently computed);
    with the classification mask  ==  the (1 − p_{y_i})-reweighted influence function;
(c) projected scores approach the unprojected ones as P grows;
(d) kernel backends give the same scores.
"""
import numpy as np
import pytest
import torch

import iif_ref.linear as linear
from iif_ref.kernels import available_backends
from iif_ref.neural import influence_function, integrated_influence
from _helpers import fit_summed_cross_entropy

EPS64 = np.finfo(np.float64).eps

# torch's forward-mode AD (torch.func.jvp, behind the Gauss–Newton products) imports
# torch._decomp.decompositions_for_jvp on first use, and that module calls
# torch.jit.script: the deprecation is torch's own, raised once per process.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _linear_problem(seed, n=40, d=4, n_test=3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y = X @ w + 0.3 * rng.standard_normal(n)
    Xt = rng.standard_normal((n_test, d))
    yt = Xt @ w + rng.standard_normal(n_test)
    net = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.as_tensor(linear.fit(X, y))[None])
    return X, y, Xt, yt, net


@pytest.mark.parametrize("K", [1, 3])
def test_bridge_linear_mse_equals_closed_form_iif(K):
    X, y, Xt, yt, net = _linear_problem(0)
    r = integrated_influence(
        net, "mse", X, y, Xt, yt, K=K, lam=1.0, baseline="per_test",
        unlearn_reduction="sum",              # the closed form's λ multiplies the sum
        unlearn_optimizer="lbfgs", unlearn_epochs=1, path_models="refit",
        quadrature="euler", refit_tol=1e-12, curvature="gauss_newton", proj_dim=None, damping=0.0,
        progress=False)
    ref = linear.integrated_influence(X, y, Xt, yt, K=K, lam=1.0)
    # Tolerance: the unlearning (Eq. 12) and the path refits are solved by L-BFGS with a
    # strong-Wolfe line search, which compares objective *values*; near a minimiser they
    # change only to second order, so the minimiser is located to a relative
    # ≈ sqrt(eps) (measured here: ~1e-10 absolute in θ'). The scores are linear in
    # θ' − θ* through Δy and in θ_k through G, H; the solve with H = 2XᵀX (exact for this
    # model) adds κ·eps. κ is the worst condition number of the quadratics involved.
    H = 2 * X.T @ X
    kappa = max(np.linalg.cond(H), *(np.linalg.cond(H - 2 * np.outer(x, x)) for x in Xt))
    tol = 10 * kappa * np.sqrt(EPS64) * np.abs(ref).max()
    np.testing.assert_allclose(r.scores, ref, rtol=0, atol=tol)
    # Δ is measured at the unlearned θ'; the closed form gives the same value, up to the
    # same sqrt(eps)-level location error of θ' (absolute, as Δ can be tiny).
    ref_delta = linear.delta(X, y, Xt, yt, lam=1.0)
    np.testing.assert_allclose(r.delta, ref_delta, rtol=0,
                               atol=10 * kappa * np.sqrt(EPS64) * np.abs(ref_delta).max())


def test_bridge_linear_completeness_residual_shrinks_with_K():
    X, y, Xt, yt, net = _linear_problem(1)
    opts = dict(baseline="per_test", unlearn_optimizer="lbfgs", unlearn_epochs=1,
                path_models="refit", quadrature="euler", curvature="gauss_newton", proj_dim=None, damping=0.0,
                progress=False)
    res = [np.abs(integrated_influence(net, "mse", X, y, Xt, yt, K=K, **opts).residual)
           for K in (1, 4, 16)]
    # Right-endpoint Euler rule on a smooth integrand: residual = c/K + O(1/K²), so each
    # 4x refinement divides it by 4 up to the O(1/K) relative correction (≤ 10% here).
    np.testing.assert_allclose(4 * res[1], res[0], rtol=0.1)
    np.testing.assert_allclose(4 * res[2], res[1], rtol=0.1)
    assert np.all(res[2] > 0)


def _classifier(seed, n=60, d=5, hidden=6, classes=3):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    # Random labels: the small net cannot separate them, so probabilities stay away
    # from 0 and 1 and the gradients are O(1) (no underflow-dominated comparisons).
    y = rng.integers(0, classes, n)
    Xt = rng.standard_normal((4, d))
    yt = rng.integers(0, classes, 4)
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(),
                              torch.nn.Linear(hidden, classes)).double()
    fit_summed_cross_entropy(net, X, y, max_iter=30)
    return X, y, Xt, yt, net


def _reference_if(net, X, y, Xt, yt, damping, weights=None):
    """−g_t (H + λ_d I)⁻¹ ∇l_i by plain autograd loops (no torch.func, no iif_ref)."""
    params = [p for p in net.parameters()]
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def unflat(v):
        out, s = [], 0
        for sh in shapes:
            k = int(np.prod(sh))
            out.append(v[s:s + k].reshape(sh))
            s += k
        return out

    def f(v, x):
        W1, b1, W2, b2 = unflat(v)
        return torch.tanh(x @ W1.T + b1) @ W2.T + b2

    def ce(v, x, lab):
        return torch.nn.functional.cross_entropy(f(v, x), lab, reduction="sum")

    Xt_, yt_ = torch.as_tensor(X), torch.as_tensor(y)
    H = torch.autograd.functional.hessian(lambda v: ce(v, Xt_, yt_), flat0).numpy()

    def g(x, lab):
        v = flat0.clone().requires_grad_(True)
        return torch.autograd.grad(ce(v, torch.as_tensor(x)[None], torch.as_tensor([lab])),
                                   v)[0].numpy()

    U = np.stack([g(X[i], y[i]) for i in range(len(y))])
    if weights is not None:
        U = U * weights[:, None]
    G = np.stack([g(Xt[t], yt[t]) for t in range(len(yt))])
    Hd = H + damping * np.eye(H.shape[0])
    return -G @ np.linalg.solve(Hd, U.T), np.linalg.cond(Hd)


def test_corollary_2_6_iif_k1_prediction_baseline_equals_influence_function():
    X, y, Xt, yt, net = _classifier(0)
    damping = 1.0
    r = integrated_influence(net, "cross_entropy", X, y, Xt, yt, K=1, baseline="prediction",
                             mask_path=False, curvature="hessian", proj_dim=None,
                             damping=damping, progress=False)
    ref, cond = _reference_if(net, X, y, Xt, yt, damping)
    # Both are float64 solves of the same SPD system: relative error ≲ κ·eps (times a
    # small constant for the Hessian and gradient evaluations' own rounding).
    tol = 100 * cond * EPS64 * np.abs(ref).max()
    np.testing.assert_allclose(r.scores, ref, rtol=0, atol=tol)
    # The influence function through its own entry point gives the same numbers.
    r_if = influence_function(net, "cross_entropy", X, y, Xt, yt, solver="exact",
                              damping=damping)
    np.testing.assert_allclose(r_if.scores, ref, rtol=0, atol=tol)


def test_masked_k1_prediction_baseline_is_one_minus_p_reweighted_influence_function():
    X, y, Xt, yt, net = _classifier(1)
    damping = 1.0
    r = integrated_influence(net, "cross_entropy", X, y, Xt, yt, K=1, baseline="prediction",
                             mask_path=True, curvature="hessian", proj_dim=None,
                             damping=damping, progress=False)
    with torch.no_grad():
        p = torch.softmax(net(torch.as_tensor(X)), dim=1).numpy()[np.arange(len(y)), y]
    ref, cond = _reference_if(net, X, y, Xt, yt, damping, weights=1.0 - p)
    tol = 100 * cond * EPS64 * np.abs(ref).max()
    np.testing.assert_allclose(r.scores, ref, rtol=0, atol=tol)
    # ... and it is *not* the plain influence function (the weights 1 − p differ from 1).
    plain, _ = _reference_if(net, X, y, Xt, yt, damping)
    assert np.abs(r.scores - plain).max() > 1e3 * tol


def test_mse_k1_prediction_baseline_equals_influence_function_cg():
    X, y, Xt, yt, _ = _linear_problem(2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                              torch.nn.Linear(5, 1)).double()
    opt = torch.optim.LBFGS(net.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    Xt_, yt_ = torch.as_tensor(X), torch.as_tensor(y)[:, None]

    def closure():
        opt.zero_grad()
        loss = ((net(Xt_) - yt_) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # Near the minimiser the Hessian is (nearly) PSD; the damping makes it safely SPD.
    damping = 1.0
    r = integrated_influence(net, "mse", X, y, Xt, yt, K=1, baseline="prediction",
                             curvature="hessian", proj_dim=None, damping=damping,
                             progress=False)
    cg_tol = 1e-12
    r_cg = influence_function(net, "mse", X, y, Xt, yt, solver="cg", damping=damping,
                              cg_tol=cg_tol)
    # CG stops at relative residual cg_tol, i.e. a relative solution error ≤ κ·cg_tol.
    kappa = max(r.diagnostics["condition"])
    tol = 10 * kappa * (cg_tol + 100 * EPS64) * np.abs(r.scores).max()
    np.testing.assert_allclose(r_cg.scores, r.scores, rtol=0, atol=tol)
    assert r.delta.tolist() == [0.0] * len(yt)  # θ' = θ*: no Δ, IF is not complete


def _projection_problem(seed):
    # A bias-free linear layer with two MSE outputs and O(1) residuals: its empirical
    # Fisher Σ u_i u_iᵀ is well conditioned (κ ~ 10²) and has no built-in null space, so
    # the unprojected solve needs no damping and the comparison isolates the projection.
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((400, 60))
    y = rng.standard_normal((400, 2))
    Xt = rng.standard_normal((5, 60))
    yt = rng.standard_normal((5, 2))
    net = torch.nn.Linear(60, 2, bias=False).double()            # 120 parameters
    return X, y, Xt, yt, net


# P beyond n_params is the point here (the limit P → ∞), not a user mistake.
@pytest.mark.filterwarnings("ignore::iif_ref.errors.ProjectionDimensionWarning")
def test_projected_scores_converge_to_unprojected_as_P_grows():
    X, y, Xt, yt, net = _projection_problem(0)
    # Full-batch unlearning: the baseline must not depend on the projection seed, which
    # also orders the mini-batches of the default unlearning.
    # The dense projection: with P ≥ n_params its A has full row rank almost surely (a
    # CountSketch's buckets collide, so it need not).
    base = dict(K=1, unlearn_lr=1e-3, unlearn_batch_size=None, curvature="fisher",
                kind="rademacher", progress=False)
    exact_run = integrated_influence(net, "mse", X, y, Xt, yt, proj_dim=None,
                                     damping=0.0, **base)
    exact = exact_run.scores
    kappa = max(exact_run.diagnostics["condition"])
    assert kappa < 1e3  # the problem is as well conditioned as intended
    # Smallest Fisher eigenvalue at θ*: u_i = 2 r_i ⊗ x_i with r_i = f(x_i) − y_i.
    r = X @ net.weight.detach().numpy().T - y
    U = 2 * (r[:, :, None] * X[:, None, :]).reshape(len(X), -1)
    lam_min = np.linalg.eigvalsh(U.T @ U)[0]
    damping = 1e-6 * lam_min
    errors = {}
    for P in (16, 64, 256):
        errs = []
        for seed in (0, 1, 2):
            # A small damping (1e-6 of the smallest Fisher eigenvalue) only keeps the
            # rank-deficient P > n_params Gram invertible; it does not act on range(Aᵀ),
            # where Aᵀg lives, beyond that relative 1e-6 (docs/algorithm1.md).
            s = integrated_influence(net, "mse", X, y, Xt, yt, proj_dim=P,
                                     seed=seed, damping=damping, **base).scores
            errs.append(np.linalg.norm(s - exact) / np.linalg.norm(exact))
        errors[P] = float(np.mean(errs))
    assert errors[64] < errors[16]
    assert errors[256] < errors[64]
    # P = 256 ≥ n_params = 120: A has full row rank and A(AᵀFA)⁺Aᵀ = F⁻¹ exactly, so only
    # the damping and float64 rounding (κ(F)·eps) remain.
    assert errors[256] < 1e-4, errors


@pytest.mark.parametrize("other", ["numba", "cupy"])
def test_kernel_backends_give_the_same_scores(other):
    status = available_backends()
    if not status.get(other, False) if isinstance(status, dict) else other not in status:
        pytest.skip(f"kernel backend {other!r} is not available here")
    X, y, Xt, yt, net = _projection_problem(3)
    opts = dict(K=2, proj_dim=64, seed=5, progress=False)
    a = integrated_influence(net, "mse", X, y, Xt, yt, backend="numpy", **opts)
    b = integrated_influence(net, "mse", X, y, Xt, yt, backend=other, **opts)
    # Same ±1 pattern bit for bit; only the summation order of the projection GEMM and the
    # Gram differs (≈ √M·eps relative per entry), amplified by κ(F) in the solve.
    kappa = max(a.diagnostics["condition"])
    tol = 10 * kappa * np.sqrt(net.weight.numel()) * EPS64 * np.abs(a.scores).max()
    np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=tol)
