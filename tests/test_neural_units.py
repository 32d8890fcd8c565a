"""Unit tests of the torch side of Algorithm 1: each piece, its slow twin, bad input."""
import json

import numpy as np
import pytest
import torch

from iif_ref._defaults import DEFAULT_PROJECTION
from iif_ref.kernels import projection_matrix
from iif_ref.neural import (DivergenceError, FunctionalModel, IIFConfig, attribute,
                            gradient_features, integrated_influence, path_targets,
                            proponents_opponents, resolve_loss, self_influence,
                            test_features, tracin, train_features, trak)
from iif_ref.neural.losses import check_target_linear
from _helpers import fit_summed_cross_entropy

EPS64 = np.finfo(np.float64).eps


def _mlp(seed, d=4, hidden=5, out=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, out)).double()


def _data(seed, n=30, d=4, classes=3, n_test=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)), rng.integers(0, classes, n),
            rng.standard_normal((n_test, d)), rng.integers(0, classes, n_test))


def _trained_classifier(seed, n=40):
    # Random labels and a partial fit: probabilities stay away from 0 and 1, so gradients
    # are O(1) rather than underflowing on a memorised training set.
    X, y, Xt, yt = _data(seed, n=n)
    net = _mlp(seed)
    fit_summed_cross_entropy(net, X, y, max_iter=8)
    return X, y, Xt, yt, net


def _autograd_grad(net, loss_fn, x, target):
    net.zero_grad()
    loss_fn(net(torch.as_tensor(x)[None])[0], torch.as_tensor(target)).backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]).numpy().copy()


# ---- losses -----------------------------------------------------------------------

def test_unknown_or_undeclared_loss_is_refused():
    with pytest.raises(ValueError, match="mse"):
        resolve_loss("hinge")
    with pytest.raises(ValueError, match="target_linear"):
        resolve_loss(lambda f, y: torch.sum(torch.abs(f - y)))
    with pytest.raises(TypeError):
        resolve_loss(3)


def test_falsely_declared_target_linear_loss_is_refused():
    def quartic(f, y):
        return torch.sum((f - y) ** 4)

    quartic.target_linear = True
    X, y, Xt, yt = _data(0)
    Y = np.eye(3)[y]
    with pytest.raises(ValueError, match="not affine in the target"):
        integrated_influence(_mlp(0), quartic, X, Y, Xt, np.eye(3)[yt], proj_dim=None,
                             progress=False)
    # The check itself accepts the built-in losses.
    F = torch.randn(5, 3, dtype=torch.float64)
    for name in ("mse", "cross_entropy"):
        check_target_linear(resolve_loss(name), F, torch.rand(5, 3, dtype=torch.float64))


def test_declared_callable_mse_equals_builtin_mse():
    def my_mse(f, y):
        return torch.sum((f - y) ** 2)

    my_mse.target_linear = True
    X, _, Xt, _ = _data(1)
    rng = np.random.default_rng(1)
    y, yt = rng.standard_normal((30, 3)), rng.standard_normal((3, 3))
    opts = dict(K=2, proj_dim=None, damping=1.0, progress=False)
    a = integrated_influence(_mlp(1), "mse", X, y, Xt, yt, **opts)
    b = integrated_influence(_mlp(1), my_mse, X, y, Xt, yt, **opts)
    np.testing.assert_array_equal(a.scores, b.scores)


# ---- per-sample gradients: torch.func vs autograd loops ----------------------------

def test_per_sample_gradients_and_directions_match_autograd_loops():
    X, y, _, _ = _data(2, n=9)
    net = _mlp(2)
    rng = np.random.default_rng(2)
    Yto = rng.random((9, 3))
    Yfrom = rng.random((9, 3))
    Phi, Psi = train_features(net, "cross_entropy", None, X, Yfrom, Yto, proj_dim=None,
                              chunk_size=4)
    ce = resolve_loss("cross_entropy").fn
    for i in range(9):
        u = _autograd_grad(net, ce, X[i], Yto[i])
        d = u - _autograd_grad(net, ce, X[i], Yfrom[i])
        # Same float64 operations in a different order: agreement to a few ulp of the
        # largest entry (the gradient is a sum of a handful of products).
        np.testing.assert_allclose(Phi[i], u, rtol=0, atol=64 * EPS64 * np.abs(u).max())
        np.testing.assert_allclose(Psi[i], d, rtol=0, atol=64 * EPS64 * np.abs(u).max())


def test_projected_features_equal_gradients_times_A_and_do_not_depend_on_chunks():
    X, y, Xt, yt = _data(3, n=11)
    net = _mlp(3)
    Y = np.eye(3)[y]
    full, _ = train_features(net, "cross_entropy", None, X, Y, Y, proj_dim=None)
    A = projection_matrix(full.shape[1], 8, seed=4)
    Phi1, _ = train_features(net, "cross_entropy", None, X, Y, Y, proj_dim=8, seed=4,
                             chunk_size=3, backend="numpy")
    Phi2, _ = train_features(net, "cross_entropy", None, X, Y, Y, proj_dim=8, seed=4,
                             chunk_size=11, backend="numpy")
    # The same dot products summed in possibly different order: κ-free, ≈ √M·eps relative.
    tol = 64 * np.sqrt(full.shape[1]) * EPS64 * np.abs(full).max()
    np.testing.assert_allclose(Phi1, full @ A, rtol=0, atol=tol)
    np.testing.assert_allclose(Phi1, Phi2, rtol=0, atol=tol)
    # Shards concatenate to the whole (what a distributed engine relies on).
    a, _ = train_features(net, "cross_entropy", None, X[:5], Y[:5], Y[:5], proj_dim=8, seed=4,
                          backend="numpy")
    b, _ = train_features(net, "cross_entropy", None, X[5:], Y[5:], Y[5:], proj_dim=8, seed=4,
                          backend="numpy", sample_offset=5)
    np.testing.assert_allclose(np.concatenate([a, b]), Phi1, rtol=0, atol=tol)
    G = test_features(net, "cross_entropy", None, Xt, yt, proj_dim=None)
    np.testing.assert_allclose(G, gradient_features(net, "cross_entropy", None, Xt, yt,
                                                    proj_dim=None), rtol=0, atol=0)


def test_non_finite_gradients_name_the_samples():
    class Divide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1).double()

        def forward(self, x):
            return self.lin(x) / x[:, :1]

    X = np.ones((6, 3))
    X[[2, 4], 0] = 0.0
    with pytest.raises(ValueError, match=r"sample\(s\) \[2, 4\]"):
        train_features(Divide(), "mse", None, X, np.zeros(6), np.ones(6), proj_dim=None)


# ---- path ---------------------------------------------------------------------------

def test_path_targets_endpoints_and_mask():
    Y = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    Ybar = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    assert torch.equal(path_targets(Y, Ybar, 0.0, mask=False), Ybar)
    assert torch.equal(path_targets(Y, Ybar, 1.0, mask=False), Y)
    mid = path_targets(Y, Ybar, 0.5, mask=True)
    assert torch.allclose(mid, torch.tensor([[0.0, 0.75, 0.0]], dtype=torch.float64))


# ---- bad input ----------------------------------------------------------------------

def test_model_without_trainable_parameters_is_refused():
    net = _mlp(0)
    for p in net.parameters():
        p.requires_grad_(False)
    X, y, Xt, yt = _data(0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        integrated_influence(net, "cross_entropy", X, y, Xt, yt, progress=False)


@pytest.mark.parametrize("bad, match", [
    (dict(X_test=np.zeros((2, 5))), "X_test has per-sample shape"),
    (dict(y_test=np.array([0, 1])), "X_test and y_test"),
    (dict(y_test=np.array([0, 1, 7])), "outside"),
    (dict(X_train=np.full((30, 4), np.nan)), "X_train contains"),
])
def test_bad_data_is_refused_naming_the_argument(bad, match):
    X, y, Xt, yt = _data(0)
    args = dict(X_train=X, y_train=y, X_test=Xt, y_test=yt, **{})
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        integrated_influence(_mlp(0), "cross_entropy", args["X_train"], args["y_train"],
                             args["X_test"], args["y_test"], progress=False)


@pytest.mark.parametrize("option, value, exc", [
    ("K", 0, ValueError), ("proj_dim", 0, ValueError), ("K", 1.5, TypeError),
    ("damping", -1.0, ValueError), ("baseline", "mean", ValueError),
    ("curvature", "hessian", ValueError),   # with the default projection: refused
    ("refit_optimizer", "sgd", ValueError), ("unlearn_optimizer", "bfgs", ValueError),
])
def test_impossible_options_are_refused(option, value, exc):
    with pytest.raises(exc, match=option):
        IIFConfig(**{option: value})


def test_divergent_unlearning_reports_the_trajectory():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 3))
    y = X @ np.ones(3)
    net = torch.nn.Linear(3, 1, bias=False).double()
    # λ far below the leverage of the test point: the summed −L_test + λ L_train is
    # unbounded below, and plain full-batch SGD (no line search) runs down it.
    with pytest.raises(DivergenceError, match="trajectory") as info:
        integrated_influence(net, "mse", X, y, 10 * X[:1], y[:1] + 5, lam=1e-4,
                             unlearn_lr=0.5, unlearn_epochs=50, proj_dim=None,
                             unlearn_reduction="sum", unlearn_line_search=False,
                             unlearn_batch_size=None, progress=False)
    assert len(info.value.trajectory) >= 2


def test_attribute_dispatch_and_unknown_method():
    X, y, Xt, yt, net = _trained_classifier(0)
    with pytest.raises(ValueError, match="method"):
        attribute(net, "cross_entropy", X, y, Xt, yt, method="loo")
    r = attribute(net, "cross_entropy", X, y, Xt, yt, method="tracin")
    assert r.method == "tracin" and r.scores.shape == (3, 40)


def test_attribute_with_client_delegates_to_the_distributed_engine(monkeypatch):
    X, y, Xt, yt = _data(0)
    try:
        import iif_ref.distributed  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="attribute_distributed"):
            attribute(_mlp(0), "cross_entropy", X, y, Xt, yt, client=object())
        return
    seen = {}

    def fake(model, loss, X_train, y_train, X_test, y_test, **kwargs):
        seen.update(kwargs, n_train=len(X_train))
        return "delegated"

    monkeypatch.setattr("iif_ref.distributed.attribute_distributed", fake)
    client = object()
    out = attribute(_mlp(0), "cross_entropy", X, y, Xt, yt, method="iif", seed=4,
                    client=client, K=2)
    assert out == "delegated"
    assert seen == {"method": "iif", "seed": 4, "client": client, "K": 2, "n_train": 30}


# ---- results, reproducibility, resumability -----------------------------------------

def test_result_config_is_serialisable_and_repeats_the_run():
    X, y, Xt, yt, net = _trained_classifier(1)
    r = integrated_influence(net, "cross_entropy", X, y, Xt, yt, K=2, proj_dim=16, seed=3,
                             progress=False)
    text = json.dumps(r.config)
    keys = {k: v for k, v in json.loads(text).items() if k in IIFConfig.__dataclass_fields__}
    again = integrated_influence(net, "cross_entropy", X, y, Xt, yt, **keys)
    np.testing.assert_array_equal(again.scores, r.scores)
    # The equality shows that the config holds what determines the scores only if a
    # config differing in one field gives other scores: another seed draws another
    # projection matrix (proj_dim = 16 < n_params), so the scores must move.
    other = integrated_influence(net, "cross_entropy", X, y, Xt, yt,
                                 **dict(keys, seed=keys["seed"] + 1))
    assert not np.allclose(other.scores, r.scores, rtol=1e-6)
    assert r.scores.dtype == np.float64 and r.scores.shape == (3, 40)
    assert len(r.config["damping_used"]) == 2 and all(np.isfinite(r.diagnostics["condition"]))
    assert net.training  # mode restored


def test_interrupted_run_resumes_from_the_cache(tmp_path):
    X, y, Xt, yt, net = _trained_classifier(2)
    opts = dict(K=3, proj_dim=16, progress=False, cache_dir=str(tmp_path))
    full = integrated_influence(net, "cross_entropy", X, y, Xt, yt, K=3, proj_dim=16,
                                progress=False)

    class Stop(Exception):
        pass

    def stop_after_first(name):
        raise Stop(name)

    with pytest.raises(Stop):
        integrated_influence(net, "cross_entropy", X, y, Xt, yt, callback=stop_after_first,
                             **opts)
    seen = []
    resumed = integrated_influence(net, "cross_entropy", X, y, Xt, yt, callback=seen.append,
                                   **opts)
    # The baseline and step K were loaded, not recomputed; the result is identical.
    assert resumed.diagnostics["cached_steps"] == ["baseline_0", "group0_step3"]
    assert seen == ["group0_step3", "group0_step2", "group0_step1"]
    np.testing.assert_array_equal(resumed.scores, full.scores)
    # A changed configuration does not reuse the steps.
    other = integrated_influence(net, "cross_entropy", X, y, Xt, yt,
                                 **{**opts, "seed": 1})
    assert other.diagnostics["cached_steps"] == []


def test_float32_model_agrees_with_float64_to_float32_accuracy():
    X, y, Xt, yt, net = _trained_classifier(3)
    opts = dict(K=2, proj_dim=16, progress=False)
    a = integrated_influence(net, "cross_entropy", X, y, Xt, yt, **opts)
    b = integrated_influence(net, "cross_entropy", X, y, Xt, yt, dtype="float32", **opts)
    assert b.config["torch_dtype"] == "float32" and b.scores.dtype == np.float64
    # float32 gradients carry ~eps32 relative error, amplified by κ(F) in the solve.
    kappa = max(a.diagnostics["condition"])
    tol = 10 * kappa * np.finfo(np.float32).eps * np.abs(a.scores).max()
    np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=tol)


# ---- the other methods and the tasks ------------------------------------------------

def test_tracin_equals_negative_gradient_dot_products():
    X, y, Xt, yt, net = _trained_classifier(4)
    r = tracin(net, "cross_entropy", X, y, Xt, yt, lrs=[0.5])
    ce = resolve_loss("cross_entropy").fn
    U = np.stack([_autograd_grad(net, ce, X[i], np.eye(3)[y[i]]) for i in range(len(y))])
    G = np.stack([_autograd_grad(net, ce, Xt[t], np.eye(3)[yt[t]]) for t in range(len(yt))])
    ref = -0.5 * G @ U.T
    # Length-M float64 dot products (M = 43) of gradients equal to a few ulp: ≤ M·eps·|g||u|.
    bound = 10 * U.shape[1] * EPS64 * np.abs(G).max() * np.abs(U).max() * U.shape[1]
    np.testing.assert_allclose(r.scores, ref, rtol=0, atol=bound)


@pytest.mark.parametrize("kind", [None, "rademacher"])
def test_trak_equals_its_formula_with_the_margin_gradient(kind):
    # None: TRAK's default projection (DEFAULT_PROJECTION["trak"]), materialised below.
    X, y, Xt, yt, net = _trained_classifier(5)
    damping = 0.1
    P = 16
    options = {} if kind is None else {"kind": kind}
    r = trak(net, "cross_entropy", X, y, Xt, yt, proj_dim=P, damping=damping, seed=2,
             backend="numpy", **options)
    kind = kind or DEFAULT_PROJECTION["trak"]

    def margin(f, target):
        c = int(torch.argmax(target))
        others = torch.cat([f[:c], f[c + 1:]])
        return f[c] - torch.logsumexp(others, 0)

    Phi = np.stack([_autograd_grad(net, margin, X[i], np.eye(3)[y[i]]) for i in range(len(y))])
    Gam = np.stack([_autograd_grad(net, margin, Xt[t], np.eye(3)[yt[t]])
                    for t in range(len(yt))])
    with torch.no_grad():
        p = torch.softmax(net(torch.as_tensor(X)), 1).numpy()[np.arange(len(y)), y]
    A = projection_matrix(Phi.shape[1], P, seed=2, kind=kind)
    F = (Phi @ A).T @ (Phi @ A) + damping * np.eye(P)
    ref = -(Gam @ A) @ np.linalg.solve(F, ((1 - p)[:, None] * (Phi @ A)).T)
    tol = 100 * np.linalg.cond(F) * EPS64 * np.abs(ref).max()
    np.testing.assert_allclose(r.scores, ref, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="classification"):
        trak(net, "mse", X, np.eye(3)[y], Xt, np.eye(3)[yt])


def test_self_influence_fast_path_equals_running_algorithm_1_per_sample():
    X, y, _, _, net = _trained_classifier(6, n=25)
    opts = dict(proj_dim=None, curvature="fisher", damping=0.5, lr=0.05)
    fast = self_influence(net, "cross_entropy", X, y, **opts)
    slow = self_influence(net, "cross_entropy", X, y, fast=False, indices=[0, 3, 7],
                          progress=False, **opts)
    # Both solve (F + 0.5 I) v = ψ_i with the same dense F; only the order of operations
    # differs, so they agree to κ·eps (times a small constant).
    Y = np.eye(3)[y]
    U, _ = train_features(net, "cross_entropy", None, X, Y, Y, proj_dim=None)
    kappa = np.linalg.cond(U.T @ U + 0.5 * np.eye(U.shape[1]))
    np.testing.assert_allclose(fast.self_influence[[0, 3, 7]], slow.self_influence, rtol=0,
                               atol=100 * kappa * EPS64 * np.abs(slow.self_influence).max())
    np.testing.assert_array_equal(fast.mislabel_score, -fast.self_influence)
    # θ'_i ascends sample i's own loss, so Δ_i = l_i(θ*) − l_i(θ'_i) < 0 for every i.
    assert np.all(fast.delta < 0)


def test_proponent_and_opponent_baselines_move_the_test_loss_oppositely():
    X, y, Xt, yt, net = _trained_classifier(7)
    po = proponents_opponents(net, "cross_entropy", X, y, Xt[:1], yt[:1], n_top=3,
                              proj_dim=None, damping=0.5, unlearn_lr=1e-2, progress=False)
    assert po.unlearned.delta[0] < 0 < po.learned.delta[0]
    s_up, s_down = po.unlearned.scores[0], po.learned.scores[0]
    assert np.all(s_up[po.proponents[0]] <= np.sort(s_up)[2])
    assert np.all(s_down[po.opponents[0]] >= np.sort(s_down)[-3])


def test_functional_model_flatten_roundtrip_and_index_order():
    net = _mlp(0)
    fm = FunctionalModel(net)
    v = fm.flatten(fm.theta_star)
    expected = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert torch.equal(v, expected)
    back = fm.unflatten(v)
    assert all(torch.equal(back[n], fm.theta_star[n]) for n in fm.names)


def test_fused_masked_cross_entropy_features_equal_the_two_row_computation():
    X, y, _, _ = _data(8, n=12)
    net = _mlp(8)
    Y = torch.as_tensor(np.eye(3)[y])
    with torch.no_grad():
        pbar = torch.softmax(net(torch.as_tensor(X)), 1)
    # Masked path targets of one step (appendix E): both weights ∝ ∂l/∂f(f, y).
    rho_k = path_targets(Y, pbar, 0.6, mask=True)
    rho_prev = path_targets(Y, pbar, 0.4, mask=True)
    a = train_features(net, "cross_entropy", None, X, rho_prev, rho_k, proj_dim=8,
                       backend="numpy", fuse=True)
    b = train_features(net, "cross_entropy", None, X, rho_prev, rho_k, proj_dim=8,
                       backend="numpy", fuse=False)
    np.testing.assert_array_equal(a[0], b[0])
    # Ψ: α·(u A) instead of (J^T w_d) A — equal up to the rounding of w_d = w_to − w_from
    # (64 eps of the weights, see _parallel_factor) and of the projection (√M eps).
    scale = np.abs(b[0]).max()
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e3 * EPS64 * scale)
    assert np.abs(b[1]).max() > 1e-3 * scale  # the directions are not trivially zero


@pytest.mark.parametrize("changed", ["y_train", "X_test", "y_test"])
def test_changed_data_under_the_same_cache_dir_is_recomputed_not_reloaded(changed,
                                                                         tmp_path):
    # The fingerprint covers every array of the problem: after changing one of them, a
    # rerun with the same cache_dir loads nothing and equals a fresh run (a fingerprint
    # without that array would reload the old baseline and steps, silently).
    X, y, Xt, yt, net = _trained_classifier(2)
    opts = dict(K=2, proj_dim=16, progress=False)
    integrated_influence(net, "cross_entropy", X, y, Xt, yt, cache_dir=str(tmp_path), **opts)
    data = {"y_train": y, "X_test": Xt, "y_test": yt}
    data[changed] = {"y_train": np.where(np.arange(len(y)) < 5, (y + 1) % 3, y),
                     "X_test": Xt + 0.25, "y_test": (yt + 1) % 3}[changed]
    args = (net, "cross_entropy", X, data["y_train"], data["X_test"], data["y_test"])
    rerun = integrated_influence(*args, cache_dir=str(tmp_path), **opts)
    fresh = integrated_influence(*args, **opts)
    assert rerun.diagnostics["cached_steps"] == []
    np.testing.assert_array_equal(rerun.scores, fresh.scores)
    np.testing.assert_array_equal(rerun.delta, fresh.delta)
    # and the same data again does resume from the cache
    again = integrated_influence(*args, cache_dir=str(tmp_path), **opts)
    assert again.diagnostics["cached_steps"] == ["baseline_0", "group0_step2",
                                                 "group0_step1", "group0_start"]
    np.testing.assert_array_equal(again.scores, fresh.scores)
