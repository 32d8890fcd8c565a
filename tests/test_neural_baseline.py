"""The unlearning baseline of Eq. (12): it unlearns with the defaults, says when it does
not, never diverges under its line search, and records its trajectory."""
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the neural half needs torch")

from _helpers import trained_digits_mlp  # noqa: E402

from iif_ref.neural import (DivergenceError, IIFConfig, integrated_influence,  # noqa: E402
                            plan_path)


@pytest.fixture(scope="module")
def digits():
    split, model = trained_digits_mlp(128, 12, hidden=(32,), epochs=60, batch_size=32,
                                      seed=2)
    return model, split.X_train, split.y_train, split.X_test, split.y_test


def test_default_unlearning_raises_every_test_loss_of_a_digits_mlp(digits):
    model, X, y, Xt, yt = digits
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no "not unlearned" warning
        plan = plan_path(model, "cross_entropy", X, y, Xt, yt, proj_dim=8, progress=False)
    loss_prime = np.concatenate([g.loss_prime for g in plan.groups])
    rows = np.concatenate([g.rows for g in plan.groups])
    # Δ_t = L(θ*) − L(θ'_t) < 0 for every test point, including the confidently
    # classified ones (losses down to ~4e-3 here), whose loss gradient is tiny.
    assert np.all(plan.loss_star[rows] - loss_prime < 0)
    assert plan.not_unlearned.size == 0
    assert plan.loss_star.min() < 1e-2        # the instance has confident test points


def test_unlearning_that_moves_nothing_names_every_test_point_and_warns(digits):
    model, X, y, Xt, yt = digits
    # A step of 1e-300 leaves θ' = θ* in float64: nothing is unlearned, Δ_t = 0.
    with pytest.warns(RuntimeWarning, match=r"did not raise the test loss of 12 of 12"):
        plan = plan_path(model, "cross_entropy", X, y, Xt, yt, proj_dim=8,
                         unlearn_lr=1e-300, progress=False)
    np.testing.assert_array_equal(plan.not_unlearned, np.arange(12))


def test_unlearning_names_exactly_the_test_points_whose_loss_fell(digits):
    model, X, y, Xt, yt = digits
    # λ·mean L_train dominates the ascent of confidently classified test points: the
    # training drift lowers their loss (docs/algorithm1.md, "Unlearning").
    opts = dict(unlearn_reduction="mean", unlearn_lr=1e-3, baseline="joint", proj_dim=8,
                progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_path(model, "cross_entropy", X, y, Xt, yt, **opts)
    (group,) = plan.groups
    failed = np.flatnonzero(plan.loss_star - group.loss_prime >= 0)
    np.testing.assert_array_equal(plan.not_unlearned, failed)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert failed.size > 0                    # the premise (measured: rows 7 and 8)
    assert len(messages) == 1 and f"{failed.size} of 12" in messages[0]
    assert all(f"{r}" in messages[0] for r in failed)


def test_opposite_baseline_objective_is_bounded_below_and_lowers_the_test_loss(digits):
    model, X, y, Xt, yt = digits
    # The test point with the smallest loss (3.6e-3): the default log test term, +log l_t,
    # would have no lower bound here (log l_t ≈ −margin), and its objective fell
    # geometrically at the default step (−5.6 to −2.6e6 in 5 epochs; a larger model
    # reached −7e31 and a DivergenceError). The ratio l_t/l_t(θ*) starts at 1 and stays ≥ 0.
    cfg = IIFConfig(K=1, proj_dim=8, unlearn_sign=-1, baseline="per_test", progress=False)
    t = 3
    r = integrated_influence(model, "cross_entropy", X, y, Xt[t:t + 1], yt[t:t + 1],
                             config=cfg)
    (hist,) = r.diagnostics["unlearning"]
    obj = np.array(hist["objective"])
    train_mean_star = obj[0] - 1.0            # 1 + λ·mean_i l_i(θ*) at the start
    assert 0 < train_mean_star < cfg.lam * 0.2 and hist["test_loss"][0][0] < 1e-2
    assert np.all(obj >= 0) and obj[-1] < obj[0]
    assert r.delta[0] > 0                     # Δ_t = l_t(θ*) − l_t(θ') > 0: the loss fell


def _linear_problem():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 3))
    y = X @ np.ones(3) + 0.1 * rng.standard_normal(20)
    net = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():                      # start at the least-squares fit θ*
        net.weight.copy_(torch.as_tensor(np.linalg.lstsq(X, y, rcond=None)[0][None]))
    return net, X, y, X[:1] + 0.5, y[:1] + 1.0


def test_line_search_keeps_unlearning_finite_where_plain_sgd_diverges():
    net, X, y, Xt, yt = _linear_problem()
    # Summed Eq. (12) with λ = 5 is a convex quadratic (λ above the test leverage), so a
    # full-batch step above 2/L_max (L_max ≈ 2λ·λ_max(XᵀX) ≈ 400 here) oscillates out,
    # by a factor ≈ 200 per step: past float64's range (and a DivergenceError) in 200.
    opts = dict(unlearn_reduction="sum", lam=5.0, unlearn_batch_size=None,
                unlearn_lr=0.5, unlearn_epochs=200, proj_dim=None, K=1, progress=False)
    with pytest.raises(DivergenceError):
        integrated_influence(net, "mse", X, y, Xt, yt, unlearn_line_search=False, **opts)
    r = integrated_influence(net, "mse", X, y, Xt, yt, **opts)
    (hist,) = r.diagnostics["unlearning"]
    obj = np.array(hist["objective"])
    assert np.all(np.isfinite(obj))
    # Full batch: the Armijo rule on the batch objective is on the full objective, which
    # therefore never rises (up to rounding of the objective, ~eps·|obj|).
    assert np.all(np.diff(obj) <= 1e-12 * np.abs(obj[:-1]).max())
    assert max(s[2] for s in hist["step_size"]) < 0.5   # it backtracked below lr
    assert r.delta[0] < 0


def test_unlearning_trajectory_is_in_the_diagnostics_per_epoch(digits):
    model, X, y, Xt, yt = digits
    cfg = IIFConfig(K=1, proj_dim=8, unlearn_epochs=3, baseline="per_test", progress=False)
    r = integrated_influence(model, "cross_entropy", X, y, Xt[:2], yt[:2], config=cfg)
    assert len(r.diagnostics["unlearning"]) == 2                 # one per test point
    for t, hist in enumerate(r.diagnostics["unlearning"]):
        assert len(hist["objective"]) == len(hist["test_loss"]) == 4   # start + 3 epochs
        assert len(hist["step_size"]) == len(hist["skipped_steps"]) == 3
        # 128 samples in batches of 64: 2 steps per epoch, each at most unlearn_lr.
        assert all(0 < s[0] <= s[1] <= s[2] <= cfg.unlearn_lr for s in hist["step_size"])
        # The recorded last test loss is the loss at θ'_t that Δ_t is measured with.
        np.testing.assert_allclose(hist["test_loss"][-1][0], r.diagnostics["loss_prime"][t],
                                   rtol=1e-12)
    assert r.diagnostics["not_unlearned"] == []


def test_log_test_loss_stays_finite_and_exact_where_the_loss_underflows():
    # A float32 network whose margins (up to 120) put the cross-entropy of its confident
    # rows below float32 and float64 resolution: log l must stay finite, equal log of the
    # float64 loss where that is representable, and equal −margin-ish asymptote a beyond.
    from iif_ref.neural import FunctionalModel, resolve_loss
    from iif_ref.neural.baseline import log_per_sample_losses

    model = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    fm = FunctionalModel(model)
    X = torch.tensor([[120.0, 0.0], [30.0, 0.0], [0.5, 0.2]])
    Y = torch.nn.functional.one_hot(torch.tensor([0, 0, 1]), 3).to(torch.float32)
    loss = resolve_loss("cross_entropy")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in fm.theta_star.items()}
    logs = log_per_sample_losses(fm, loss, params, X, Y)
    assert logs.dtype == torch.float64 and torch.isfinite(logs).all()
    F = (X.double() @ model.weight.detach().double().T).numpy()
    y = [0, 0, 1]
    # CE = log1p(Σ_{j≠y} e^{f_j − f_y}), free of the cancellation in lse(f) − f_y.
    exact = np.array([np.log(np.log1p(sum(np.exp(F[r, j] - F[r, y[r]])
                                          for j in range(3) if j != y[r])))
                      for r in range(3)])
    # rows 1-2: representable in float64 -> equal to its log.
    np.testing.assert_allclose(logs[1:].detach().numpy(), exact[1:], rtol=1e-12)
    # row 0: CE = log(1 + 2e^-120) ~ 2e^-120 -> log CE = log 2 − 120 within e^-120.
    np.testing.assert_allclose(float(logs[0].detach()), np.log(2.0) - 120.0, rtol=1e-12)
    logs.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in params.values())


def test_progress_bar_only_on_a_terminal(digits, capsys):
    # progress=True draws the step bar on a terminal only (tqdm's disable=None); pytest's
    # captured stderr is not a terminal, so nothing may be written there.
    model, X, y, Xt, yt = digits
    integrated_influence(model, "cross_entropy", X, y, Xt, yt, K=2, proj_dim=8,
                         progress=True)
    assert "steps" not in capsys.readouterr().err


def test_slow_steps_print_a_line_where_no_bar_is_drawn(digits, capsys, monkeypatch):
    # A log file gets one line per step slower than SLOW_STEP_SECONDS (here every step),
    # and none with progress=False.
    from iif_ref.neural import engine

    monkeypatch.setattr(engine, "SLOW_STEP_SECONDS", -1.0)
    model, X, y, Xt, yt = digits
    integrated_influence(model, "cross_entropy", X, y, Xt, yt, K=2, proj_dim=8,
                         progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[iif_ref]")]
    assert [ln.split(" (")[0] for ln in lines] == ["[iif_ref] iif step 1/2",
                                                   "[iif_ref] iif step 2/2"]
    integrated_influence(model, "cross_entropy", X, y, Xt, yt, K=2, proj_dim=8,
                         progress=False)
    assert "[iif_ref]" not in capsys.readouterr().err


# ---- the objective of Eq. (12), computed apart from the optimiser --------------------
def _ce_rows(net, params, X, y):
    """Per-sample cross-entropy of ``net`` with parameters ``params`` (plain torch)."""
    from torch.func import functional_call

    logits = functional_call(net, params, (torch.as_tensor(X),))
    return torch.nn.functional.cross_entropy(logits, torch.as_tensor(y),
                                             reduction="none").detach().numpy()


@pytest.mark.filterwarnings("ignore:unlearning .* did not:RuntimeWarning")
@pytest.mark.parametrize("reduction, sign", [("log_mean", 1), ("log_mean", -1),
                                             ("mean", 1), ("sum", 1)])
def test_unlearning_objective_is_eq_12_in_its_documented_normalisation(reduction, sign):
    # n_test = 3 and n_train = 25 differ, so a test term normalised by n_train (or a
    # training term by n_test) changes the value: computed here from per-sample losses.
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double()
    X, y = rng.standard_normal((25, 4)), rng.integers(0, 3, 25)
    Xt, yt = rng.standard_normal((3, 4)), rng.integers(0, 3, 3)
    lam = 0.7
    plan = plan_path(net, "cross_entropy", X, y, Xt, yt, lam=lam, unlearn_epochs=2,
                     unlearn_reduction=reduction, unlearn_sign=sign, proj_dim=8,
                     progress=False)
    (group,) = plan.groups

    theta_star = {n: p.detach() for n, p in net.named_parameters()}

    def objective(params):
        test, train = _ce_rows(net, params, Xt, yt), _ce_rows(net, params, X, y)
        if reduction == "log_mean" and sign == -1:   # bounded below: l_t / l_t(θ*)
            return np.mean(test / _ce_rows(net, theta_star, Xt, yt)) + lam * np.mean(train)
        if reduction == "log_mean":
            return -np.mean(np.log(test)) + lam * np.mean(train)
        if reduction == "mean":
            return -sign * np.mean(test) + lam * np.mean(train)
        return -sign * np.sum(test) + lam * np.sum(train)

    history = group.unlearning["objective"]
    np.testing.assert_allclose(history[0], objective(theta_star), rtol=1e-12)
    np.testing.assert_allclose(history[-1], objective(group.theta_prime), rtol=1e-12)
    assert history[-1] < history[0]


# ---- the warning about baselines that did not move the test loss ---------------------
def test_opposite_baseline_that_lowers_every_test_loss_is_not_warned_about(digits):
    # unlearn_sign = −1 (Sec. 3.2's opposite baseline, used for opponents) must lower
    # the test loss; doing so is success, not a "did not lower" failure.
    model, X, y, Xt, yt = digits
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        plan = plan_path(model, "cross_entropy", X, y, Xt, yt, unlearn_sign=-1, proj_dim=8,
                         progress=False)
    (group,) = plan.groups
    assert np.all(group.loss_prime < plan.loss_star)              # the premise
    assert plan.not_unlearned.size == 0


def test_opposite_baseline_that_moves_nothing_is_warned_about(digits):
    model, X, y, Xt, yt = digits
    with pytest.warns(RuntimeWarning, match=r"did not lower the test loss of 12 of 12"):
        plan = plan_path(model, "cross_entropy", X, y, Xt, yt, unlearn_sign=-1,
                         unlearn_lr=1e-300, proj_dim=8, progress=False)
    np.testing.assert_array_equal(plan.not_unlearned, np.arange(12))


def test_proponents_opponents_warn_about_neither_baseline_when_both_moved(digits):
    from iif_ref.neural import proponents_opponents

    model, X, y, Xt, yt = digits
    with warnings.catch_warnings():
        # the unlearning check's warning is an error here; the completeness warning
        # (its own subject) may fire on these short paths
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", message="completeness:", category=RuntimeWarning)
        po = proponents_opponents(model, "cross_entropy", X, y, Xt[:4], yt[:4], n_top=3,
                                  K=1, proj_dim=8, progress=False)
    assert np.all(po.unlearned.delta < 0) and np.all(po.learned.delta > 0)


# ---- log l in float64 over the whole range of margins -------------------------------
def test_log_cross_entropy_is_exact_over_the_whole_range_of_margins():
    # For a one-hot target the cross-entropy is softplus(a), a = lse_{j≠y} f_j − f_y.
    # log softplus(a) and its derivative σ(a)/softplus(a) against a 50-digit reference,
    # from the underflow region through the switch to the asymptote a (at a < −20,
    # whose error e^a/2 < e^-20/2 is the documented bound) to large margins of the
    # wrong class. A switch at −2 would be off by 0.06 at a loss of 0.13.
    mpmath = pytest.importorskip("mpmath", reason="the 50-digit reference needs mpmath")
    from iif_ref.neural.baseline import _log_rows
    from iif_ref.neural.losses import resolve_loss

    mpmath.mp.dps = 50
    a = np.unique(np.concatenate([np.linspace(-60.0, 40.0, 2001), [-700.0, -300.0, -100.0],
                                  np.linspace(-20.5, -19.5, 41)]))
    F = torch.tensor(np.stack([a, np.zeros_like(a)], axis=1), requires_grad=True)
    Y = torch.tensor([[0.0, 1.0]], dtype=torch.float64).expand(len(a), 2)
    got = _log_rows(resolve_loss("cross_entropy"), F, Y, one_hot=True)
    got.sum().backward()
    slope = F.grad[:, 0].numpy()          # ∂ log l / ∂a (f_0 = a, f_y = 0)
    ref, ref_slope = [], []
    for v in a:
        sp = mpmath.log1p(mpmath.exp(mpmath.mpf(v)))
        ref.append(float(mpmath.log(sp)))
        ref_slope.append(float(1 / (1 + mpmath.exp(-mpmath.mpf(v))) / sp))
    bound = np.exp(-20.0) / 2 + 8 * np.finfo(float).eps * np.maximum(1.0, np.abs(ref))
    err = np.abs(got.detach().numpy() - np.array(ref))
    assert np.all(err <= bound), (a[np.argmax(err / bound)], err.max())
    slope_err = np.abs(slope - np.array(ref_slope))
    assert np.all(slope_err <= np.exp(-20.0) / 2 + 8 * np.finfo(float).eps), slope_err.max()
