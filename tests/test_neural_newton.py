"""Newton's method of iif_ref.neural.optimise (``optimizer="newton"``) against exact answers.

A least-squares objective is a quadratic: one Newton step solves it, so the result must
equal the normal-equations solution to the rounding of a backward-stable solve. On a
non-convex objective the damped iteration must still descend to a stationary point.
"""
import numpy as np
import pytest
import torch

from iif_ref.neural.optimise import NEWTON_MAX_PARAMS, minimise

# The exact Hessian of the last test goes through torch's forward-mode AD, whose
# decompositions module calls torch.jit.script on import: torch's own deprecation.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _least_squares(seed, n=30, d=5, kappa=1e3):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((n, d)))
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    X = U @ np.diag(np.logspace(0, np.log10(kappa), d)) @ V.T
    y = X @ rng.standard_normal(d) + 0.1 * rng.standard_normal(n)
    return torch.as_tensor(X), torch.as_tensor(y)


@pytest.mark.parametrize("seed, kappa", [(0, 1.0), (1, 1e3), (2, 1e6)])
def test_newton_solves_a_least_squares_objective_to_rounding(seed, kappa):
    X, y = _least_squares(seed, kappa=kappa)

    def objective(p, idx, scale):
        return torch.sum((X @ p["w"] - y) ** 2)

    start = {"w": torch.zeros(X.shape[1], dtype=torch.float64)}
    theta, history = minimise(objective, start, n_samples=len(y), epochs=1,
                              optimizer="newton", lr=1.0, tol=1e-10)
    exact = np.linalg.lstsq(X.numpy(), y.numpy(), rcond=None)[0]
    # Backward-stable solve of the normal equations: relative error ≲ κ(XᵀX)·eps times
    # a small constant (d = 5); 100 leaves room for the Hessian's own rounding.
    tol = 100 * kappa ** 2 * np.finfo(float).eps
    err = np.linalg.norm(theta["w"].numpy() - exact) / np.linalg.norm(exact)
    assert err <= max(tol, 1e-14), (err, tol)
    assert history["objective"][-1] <= history["objective"][0]


def test_newton_descends_to_a_stationary_point_of_a_non_convex_objective():
    # A tanh network (indefinite Hessian away from the minimiser, so the damping is used)
    # with a small ridge so a minimiser exists; L-BFGS on the same objective is the twin.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(1))

    def objective(p, idx, scale):
        h = torch.tanh(X @ p["W1"].T)
        return torch.sum((h @ p["w2"] - y) ** 2) + 1e-3 * sum(torch.sum(v ** 2)
                                                               for v in p.values())

    start = {"W1": 2.0 * torch.randn(4, 3, generator=g, dtype=torch.float64),
             "w2": torch.randn(4, generator=g, dtype=torch.float64)}
    theta, history = minimise(objective, start, n_samples=40, epochs=1,
                              optimizer="newton", lr=1.0, tol=1e-10, max_iter=200)
    leaves = {n: v.clone().requires_grad_(True) for n, v in theta.items()}
    grads = torch.autograd.grad(objective(leaves, None, 1.0), list(leaves.values()))
    g_end = max(float(v.abs().max()) for v in grads)
    start_leaves = {n: v.clone().requires_grad_(True) for n, v in start.items()}
    g0 = max(float(v.abs().max()) for v in torch.autograd.grad(
        objective(start_leaves, None, 1.0), list(start_leaves.values())))
    assert g_end <= 1e-8 * g0
    assert history["objective"][-1] < history["objective"][0]


def test_newton_refuses_a_model_too_large_for_a_dense_hessian():
    start = {"w": torch.zeros(NEWTON_MAX_PARAMS + 1, dtype=torch.float64)}
    with pytest.raises(ValueError, match="newton.*(parameters|'lbfgs')"):
        minimise(lambda p, idx, scale: torch.sum(p["w"] ** 2), start, n_samples=1,
                 epochs=1, optimizer="newton", lr=1.0, what="refit")


def test_newton_refits_equal_lbfgs_refits_on_a_linear_iif():
    # The same attribution with both refit solvers: L-BFGS's stopping rule (gradient
    # 1e-10 relative) bounds the difference by κ(H)·1e-10 relative; κ ≤ 1e4 here.
    from iif_ref import attribute
    from iif_ref.testing import default_problems

    p = default_problems()[0].replace(K=2)
    X, y, Xt, yt = p.torch_data()
    runs = [attribute(p.torch_model(), "mse", X, y, Xt, yt, method="iif", K=2, lam=p.lam,
                      baseline="per_test", unlearn_optimizer=opt, unlearn_epochs=1,
                      unlearn_reduction="sum", unlearn_batch_size=None,
                      path_models="refit", refit_optimizer=opt, curvature="hessian",
                      proj_dim=None, damping=0.0, progress=False).scores
            for opt in ("newton", "lbfgs")]
    scale = np.abs(runs[1]).max()
    np.testing.assert_allclose(runs[0], runs[1], rtol=0, atol=1e-5 * scale)
