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
    return vmap(loss.fn)(fm.forward(params, X), Y)


def unlearn(fm, loss, X, Y, X_test, Y_test, cfg, *, params=None):
    """Unlearned parameters θ' of Eq. (12) for the test batch (``L_test`` summed over it).

    Parameters
    ----------
    fm : FunctionalModel
    loss : TargetLinearLoss
    X, Y : tensors, shapes (n_train, ...), (n_train, n_out)
    X_test, Y_test : tensors, shapes (n_test, ...), (n_test, n_out)
    cfg : IIFConfig
        Uses ``lam``, ``unlearn_*``, ``train_reduction``, ``divergence_factor``, ``seed``.
    params : dict, optional
        Starting point; default θ*.

    Returns
    -------
    theta_prime : dict of tensors
    trajectory : list of float
        The objective at the start and after each epoch.

    Raises
    ------
    DivergenceError
        The objective became non-finite or fell below
        ``obj₀ − divergence_factor · (|obj₀| + 1)`` — with ``train_reduction="mean"``
        and λ ≈ 1, or a too large step, ``−L_test + λ L_train`` is unbounded below; the
        message carries the trajectory.

    Notes
    -----
    Implements Eq. (12) with ``L_train`` normalised by ``cfg.train_reduction``
    (sum by default, docs/conventions.md) and ``L_test`` the summed per-sample loss of
    the test batch: one joint baseline for the batch. Mini-batch terms of ``L_train``
    are scaled by ``n_train / batch`` so each step is unbiased for the full objective.
    """
    n = X.shape[0]
    norm = 1.0 if cfg.train_reduction == "sum" else 1.0 / n
    sign = float(cfg.unlearn_sign)

    def objective(p, idx, scale):
        test = per_sample_losses(fm, loss, p, X_test, Y_test).sum()
        Xb, Yb = (X, Y) if idx is None else (X[idx], Y[idx])
        train = per_sample_losses(fm, loss, p, Xb, Yb).sum()
        return -sign * test + cfg.lam * norm * scale * train

    start = fm.theta_star if params is None else params
    with torch.no_grad():
        obj0 = float(objective(start, None, 1.0))
    floor = obj0 - cfg.divergence_factor * (abs(obj0) + 1.0)
    return minimise(objective, start, n_samples=n, epochs=cfg.unlearn_epochs,
                    optimizer=cfg.unlearn_optimizer, lr=cfg.unlearn_lr,
                    batch_size=cfg.unlearn_batch_size, seed=cfg.seed,
                    max_iter=cfg.refit_max_iter, tol=cfg.refit_tol, divergence_floor=floor,
                    what="unlearning (Eq. 12)")


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
