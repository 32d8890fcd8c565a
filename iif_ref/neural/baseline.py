"""Baselines by unlearning (Eq. 12–13), and the per-sample baselines of Sec. 3.3.

``θ' = argmin −s·L_test(θ) + λ L_train(θ)`` is approached with a few epochs of an
optimiser started at θ* (the paper: "a few epochs ... without full convergence"); the
baseline targets are ``prediction(f(x_i; θ'))`` (Eq. 13; the softmax for cross-entropy).
``s = +1`` unlearns the test points (the default, Eq. 12); ``s = −1`` is the opposite
baseline of Sec. 3.2 that *lowers* the test loss, whose path reveals opponents.
"""
from __future__ import annotations

import torch
from torch.func import vmap

from iif_ref.neural.optimise import DivergenceError, minimise

__all__ = ["unlearn", "per_sample_baselines", "per_sample_losses", "DivergenceError"]


def per_sample_losses(fm, loss, params, X, Y):
    """``l(f(x_n; θ), y_n)`` for every row, shape ``(n,)``."""
    return _rows(loss, fm.forward(params, X), Y)


def _rows(loss, F, Y):
    return vmap(loss.fn)(F, Y) if loss.batched is None else loss.batched(F, Y)


def log_per_sample_losses(fm, loss, params, X, Y):
    """``log l(f(x_n; θ), y_n)`` in float64, finite for a loss that underflows to 0.

    A confidently classified point has a cross-entropy below the float32 (even float64)
    resolution, and ``log 0 = −inf`` would make the unlearning objective of Eq. (12)
    infinite. For a one-hot target the cross-entropy is ``softplus(a)`` with
    ``a = logsumexp_{j≠y} f_j − f_y``, and ``log softplus(a) = a + O(e^a)`` for
    ``a < −20`` (absolute error below ``e^{-20}/2``), which keeps the log and its gradient
    exact where the loss itself underflows. Other losses are floored at the smallest
    normal float64.
    """
    return _log_rows(loss, fm.forward(params, X), Y, one_hot=_is_one_hot(Y))


def _is_one_hot(Y):
    return bool(((Y == 0) | (Y == 1)).all()) and bool((Y.sum(-1) == 1).all())


def _log_rows(loss, F, Y, *, one_hot):
    """:func:`log_per_sample_losses` from the outputs ``F`` (``one_hot``: ``Y`` is)."""
    F, Y = F.to(torch.float64), Y.to(torch.float64)
    if loss.name == "cross_entropy" and one_hot:
        others = F.masked_fill(Y > 0, float("-inf"))
        a = torch.logsumexp(others, dim=-1) - (F * Y).sum(-1)
        tail = a < -20.0
        # The unselected branch must stay finite, or its NaN gradient leaks through where.
        safe = torch.where(tail, torch.zeros_like(a), a)
        return torch.where(tail, a, torch.log(torch.nn.functional.softplus(safe)))
    return torch.log(_rows(loss, F, Y).clamp_min(torch.finfo(torch.float64).tiny))


def unlearn(fm, loss, X, Y, X_test, Y_test, cfg, *, params=None):
    """Unlearned parameters θ' of Eq. (12) for a group of test points.

    Parameters
    ----------
    fm : FunctionalModel
    loss : TargetLinearLoss
    X, Y : tensors, shapes (n_train, ...), (n_train, n_out)
    X_test, Y_test : tensors, shapes (n_rows, ...), (n_rows, n_out)
        The test points unlearned together (one for ``baseline="per_test"``).
    cfg : IIFConfig
        Uses ``lam``, ``unlearn_*``, ``divergence_factor``, ``seed``.
    params : dict, optional
        Starting point; default θ*.

    Returns
    -------
    theta_prime : dict of tensors
    history : dict
        ``objective`` (start, then per epoch), ``test_loss`` (per-row test losses,
        start then per epoch), ``step_size`` (per epoch ``[min, mean, max]``) and
        ``skipped_steps`` (per epoch) — see :func:`iif_ref.neural.optimise.minimise`.

    Raises
    ------
    DivergenceError
        The objective became non-finite or fell below
        ``obj₀ − divergence_factor · (|obj₀| + 1)``: ``−L_test + λ L_train`` is unbounded
        below in the region reached (small λ, a large step without line search, many
        epochs); the message carries the trajectory.

    Notes
    -----
    Implements Eq. (12), ``min_θ −s·L_test(θ) + λ L_train(θ)`` from θ*, with
    ``cfg.unlearn_reduction``:

    * ``"log_mean"`` (default): ``−mean_t log l_t(θ) + λ·mean_i l_i(θ)``. ``L_train``
      is the mean training loss, the normalisation of a mini-batch training loop (the
      paper's "5 epochs using the SGD optimizer"; a batch term is the batch mean), so
      λ = 0.5 (Table 6, MNIST) means the same whatever ``n_train`` and the batch size.
      The log makes the ascent scale-free: ``∇(−log l_t) = −∇l_t / l_t`` is Eq. (12)'s
      gradient with λ scaled by the current test loss, so a confidently fitted test
      point (cross-entropy gradient ∝ its tiny loss) is still unlearned instead of
      being outweighed by the training-loss drift at θ*, and the ascent slows as the
      loss grows (docs/algorithm1.md, "Unlearning"). The opposite baseline
      (``unlearn_sign=−1``, lower the test loss) minimises
      ``mean_t l_t(θ)/l_t(θ*) + λ·mean_i l_i(θ)`` instead: ``+log l_t`` has no lower
      bound (``log l_t ≈ −margin`` as the test point is fitted), so whatever λ and the
      step size, descent on it runs off to ``−∞``; the ratio has the log's gradient at
      θ* and is bounded below by 0.
    * ``"mean"``: ``−mean_t l_t + λ·mean_i l_i``, Eq. (12) as printed with mean losses.
    * ``"sum"``: both summed (the linear reference's normalisation). λ then multiplies ``n_train`` times more training loss;
      at an imperfectly converged θ* the training gradient dominates and the
      optimiser keeps training instead of unlearning (docs/algorithm1.md).

    Mini-batch terms of ``L_train`` are scaled so each step is unbiased for the full
    objective. ``unlearn_line_search`` (SGD) backtracks each step on its mini-batch
    objective (Armijo), so no step raises the objective it was taken on.
    """
    n = X.shape[0]
    summed = cfg.unlearn_reduction == "sum"
    norm_train = 1.0 if summed else 1.0 / n
    norm_test = 1.0 if summed else 1.0 / X_test.shape[0]
    log = cfg.unlearn_reduction == "log_mean"
    sign = float(cfg.unlearn_sign)

    n_rows, test_one_hot = X_test.shape[0], _is_one_hot(Y_test)

    start = fm.theta_star if params is None else params
    log_start = None
    if log and sign < 0:
        with torch.no_grad():
            log_start = _log_rows(loss, fm.forward(start, X_test), Y_test,
                                  one_hot=test_one_hot)

    def objective(p, idx, scale):
        Xb, Yb = (X, Y) if idx is None else (X[idx], Y[idx])
        # One forward for both terms: at these batch sizes a call costs its dispatch.
        F = fm.forward(p, torch.cat([X_test, Xb]))
        F_test, F_train = F[:n_rows], F[n_rows:]
        if log:
            test = _log_rows(loss, F_test, Y_test, one_hot=test_one_hot)
            # l_t/l_t(θ*) from the logs: exact where the losses underflow.
            test = (test if log_start is None else torch.exp(test - log_start)).sum()
        else:
            test = _rows(loss, F_test, Y_test).sum()
        train = _rows(loss, F_train, Yb).sum()
        return -sign * norm_test * test + cfg.lam * norm_train * scale * train

    def test_losses(p):
        return per_sample_losses(fm, loss, p, X_test, Y_test).tolist()

    with torch.no_grad():
        obj0 = float(objective(start, None, 1.0))
    floor = obj0 - cfg.divergence_factor * (abs(obj0) + 1.0)
    line_search = cfg.unlearn_line_search and cfg.unlearn_optimizer == "sgd"
    theta, history = minimise(
        objective, start, n_samples=n, epochs=cfg.unlearn_epochs,
        optimizer=cfg.unlearn_optimizer, lr=cfg.unlearn_lr,
        batch_size=cfg.unlearn_batch_size, seed=cfg.seed, max_iter=cfg.refit_max_iter,
        tol=cfg.refit_tol, divergence_floor=floor, what="unlearning (Eq. 12)",
        line_search=line_search, monitor=test_losses)
    history["test_loss"] = history.pop("monitor")
    return theta, history


def per_sample_baselines(fm, loss, X, Y, indices, *, lr):
    """Per-sample baselines ``θ'_i = θ* + η ∇θ l(f(x_i; θ*), y_i)`` of Sec. 3.3.

    One gradient-*ascent* step on sample ``i``'s own loss: the model unlearns that
    sample, which gives a baseline for its self-influence.

    Parameters
    ----------
    fm : FunctionalModel
    loss : TargetLinearLoss
    X, Y : tensors, shapes (n_train, ...), (n_train, n_out)
    indices : sequence of int
        Samples whose baselines are wanted.
    lr : float
        η.

    Yields
    ------
    i, theta_prime_i : int, dict of tensors
    """
    from iif_ref.neural.functional import output_weights

    for i in indices:
        x, y = X[i:i + 1], Y[i:i + 1]
        with torch.no_grad():
            w = output_weights(loss, fm.forward(fm.theta_star, x), y)
        g = fm.per_sample_vjp(fm.theta_star, x, w[:, None, :])[0, 0]
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"non-finite loss gradient for training sample {int(i)}")
        yield int(i), fm.unflatten(fm.flatten(fm.theta_star) + lr * g)
