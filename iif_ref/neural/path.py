"""The dataset path: targets ρ_i(t_k) (Eq. 15) and path models θ_k (Eq. 16).

Targets move linearly from the baseline ``ȳ_i = prediction(f(x_i; θ'))`` to ``y_i``; for
classification the appendix E mask ``ρ_i(t) ⊙ y_i`` keeps them sparse (one-hot ``y``).
With the mask, ``K = 1`` and ``θ' = θ*`` give ``(1 − p_{y_i})`` times the influence
function, not the influence function itself (the masked baseline is ``p_{y_i} e_{y_i}``,
whose gradient is ``p_{y_i}`` times that of the true label).

Path models start at θ* and go *down* the nodes of the quadrature rule
(:mod:`iif_ref.neural.quadrature`), each warm-started from the model of the node above,
by one function (:func:`path_model_step`) with four readings of Eq. (16)
(``IIFConfig.path_models``):

* ``"step"`` (Eq. 16 as printed): ``θ_k = θ_{k+1} − η ∇L_train(Γ(t_k))``, one
  full-batch gradient step at ``η = path_lr``;
* ``"flow"`` (default): one full-batch step of ``η = path_time · (t_above − t_k)`` on the
  targets at the interval's midpoint ``ρ((t_k + t_above)/2)``: the gradient flow
  ``dθ/dt = path_time · ∇L_train(Γ(t))`` from θ* at ``t = 1``, integrated over the
  interval exactly in the targets (``∇L_train`` is affine in them for a target-linear
  loss, so its mean over the interval is its value at the midpoint) and to first order
  in θ. Its path models converge as the nodes are refined, so the quadrature converges
  to one integral; under ``"step"`` every added node moves the path models a further
  ``path_lr`` (docs/algorithm1.md, "Quadrature of the path integral");
* ``"epoch"``: one epoch of mini-batch SGD on ``L_train(Γ(t_k))`` at ``path_lr`` (the
  text's "optimised to [its] optimal state within one epoch of SGD");
* ``"refit"``: full-batch L-BFGS (or Newton's method, ``refit_optimizer``) on
  ``L_train(Γ(t_k))`` until the gradient's infinity norm falls below ``refit_tol`` times
  its starting value, at most ``refit_max_iter`` iterations (Eq. 2: θ(Γ(t)) is the
  minimiser; this is what the linear closed form computes).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from iif_ref.neural.baseline import per_sample_losses
from iif_ref.neural.optimise import DivergenceError, minimise

__all__ = ["path_targets", "path_model_step", "path_loss", "grid", "step_time"]


def grid(K):
    """``t_k = k/K`` for ``k = 0..K`` (the grid of Eq. 10, ``quadrature="euler"``)."""
    return [k / K for k in range(K + 1)]


def path_targets(Y, Ybar, t, *, mask):
    """ρ(t) = t y + (1 − t) ȳ, optionally masked to the true class (Eq. 14–15, app. E).

    Parameters
    ----------
    Y, Ybar : tensors, shape (n, n_out)
        Training targets and baseline targets.
    t : float
        Path time; the path is affine in t, so values outside ``[0, 1]`` extrapolate
        it (used for the direction term of a quadrature node,
        :attr:`~iif_ref.neural.quadrature.QuadratureRule.starts`).
    mask : bool
        Multiply by ``Y`` elementwise (``ρ ⊙ y``).

    Returns
    -------
    rho : tensor, shape (n, n_out)
    """
    rho = t * Y + (1.0 - t) * Ybar
    return rho * Y if mask else rho


def step_time(cfg, t, t_above):
    """The ``t`` of the targets a path-model update toward node ``t`` (from the node
    ``t_above``) trains on: the node itself, or the interval's midpoint for
    ``path_models="flow"``."""
    return 0.5 * (t + t_above) if cfg.path_models == "flow" else t


def path_model_step(fm, loss, params, X, rho, cfg, *, k, dt=None):
    """θ_k from θ_{k+1} (Eq. 16) on the dataset ``Γ(t_k) = {(x_i, ρ_i(t_k))}``.

    Parameters
    ----------
    fm : FunctionalModel
    loss : TargetLinearLoss
    params : dict of tensors
        θ_{k+1}.
    X, rho : tensors, shapes (n_train, ...), (n_train, n_out)
    cfg : IIFConfig
        ``path_models`` (``"step"``, ``"epoch"``, ``"refit"``), ``path_lr`` (η),
        ``path_batch_size``, ``train_reduction``, ``refit_optimizer``,
        ``refit_max_iter``, ``refit_tol``, ``seed``.
    k : int
        Step index (seeds the mini-batch order of ``"epoch"``).
    dt : float or None
        ``t_above − t_k``, the distance in t from the node of ``params``; required by
        ``"flow"`` (its step length is ``path_time · dt``), unused otherwise.

    Returns
    -------
    theta_k : dict of tensors
    trajectory : list of float
        ``L_train(Γ(t_k))`` before and after.
    """
    n = X.shape[0]
    norm = _norm(cfg, n)

    def objective(p, idx, scale):
        Xb, Rb = (X, rho) if idx is None else (X[idx], rho[idx])
        return norm * scale * per_sample_losses(fm, loss, p, Xb, Rb).sum()

    if cfg.path_models == "refit":
        theta, history = minimise(objective, params, n_samples=n, epochs=1,
                                  optimizer=cfg.refit_optimizer, lr=1.0,
                                  max_iter=cfg.refit_max_iter,
                                  tol=cfg.refit_tol,
                                  what=f"path model refit at step k={k} (Eq. 16)")
        ratio = _gradient_max(objective, theta) / max(_gradient_max(objective, params),
                                                      torch.finfo(torch.float64).tiny)
        if not ratio <= cfg.refit_tol:
            warnings.warn(f"path model refit at step k={k} stopped at refit_max_iter="
                          f"{cfg.refit_max_iter} with gradient {ratio:.3g} of its start "
                          f"value, above refit_tol={cfg.refit_tol:g}; the path model is not "
                          "the minimiser of Eq. (2) (raise refit_max_iter or refit_tol)",
                          RuntimeWarning, stacklevel=2)
        return theta, history["objective"]
    if cfg.path_models == "epoch":
        theta, history = minimise(objective, params, n_samples=n, epochs=1, optimizer="sgd",
                                  lr=cfg.path_lr, batch_size=cfg.path_batch_size,
                                  seed=cfg.seed + 7919 * k,
                                  what=f"path model step k={k} (Eq. 16)")
        return theta, history["objective"]
    if cfg.path_models == "flow":
        if dt is None or not dt > 0:
            raise ValueError(f"path_models='flow' needs the node spacing dt > 0, got {dt!r}")
        lr = cfg.path_time * dt
    else:
        lr = cfg.path_lr
    return _full_batch_step(objective, params, n, lr, cfg.chunk_size,
                            what=f"path model step k={k} (Eq. 16)")


def _full_batch_step(objective, params, n, lr, chunk_size, *, what):
    """One gradient step ``θ − lr ∇objective`` with the gradient of the training sum
    accumulated over row chunks of ``chunk_size``: the activations of one chunk are held
    at a time, not those of all ``n`` rows (at 60,000 rows they were the largest torch
    allocation of an IIF call). Returns θ and the objective before and after, as
    :func:`~iif_ref.neural.optimise.minimise` does for one full-batch SGD epoch."""
    leaves = {name: v.detach().clone().requires_grad_(True) for name, v in params.items()}
    grads = {name: torch.zeros_like(v) for name, v in leaves.items()}
    before = 0.0
    for start in range(0, n, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, n))
        value = objective(leaves, idx, 1.0)
        for name, g in zip(leaves, torch.autograd.grad(value, list(leaves.values()))):
            grads[name] += g
        before += float(value.detach())
    theta = {name: (leaves[name] - lr * grads[name]).detach() for name in leaves}
    with torch.no_grad():
        after = sum(float(objective(theta, torch.arange(s, min(s + chunk_size, n)), 1.0))
                    for s in range(0, n, chunk_size))
    if not (np.isfinite(after) and all(bool(torch.isfinite(v).all())
                                       for v in theta.values())):
        raise DivergenceError(f"{what} diverged: objective became non-finite; trajectory "
                              f"(start, then per epoch) {before:.6g}, {after:.6g}",
                              trajectory=(before, after))
    return theta, [before, after]


def _gradient_max(objective, params):
    """``‖∇ objective‖_∞`` at ``params`` (the refit's convergence test)."""
    leaves = {name: v.detach().clone().requires_grad_(True) for name, v in params.items()}
    grads = torch.autograd.grad(objective(leaves, None, 1.0), list(leaves.values()))
    return max(float(g.abs().max()) for g in grads)


def _norm(cfg, n):
    return 1.0 if cfg.train_reduction == "sum" else 1.0 / n


def path_loss(fm, loss, params, X, rho, cfg):
    """``L_train(Γ(t))`` at ``params`` in the normalisation ``cfg.train_reduction``: the
    objective a path model at targets ``rho`` minimises (Eq. 16), as a float."""
    with torch.no_grad():
        parts = [per_sample_losses(fm, loss, params, X[s:s + cfg.chunk_size],
                                   rho[s:s + cfg.chunk_size]).sum()
                 for s in range(0, X.shape[0], cfg.chunk_size)]
    return float(_norm(cfg, X.shape[0]) * torch.stack(parts).sum())


def predictions(fm, loss, params, X, *, chunk_size):
    """Baseline targets ``prediction(f(x; θ))`` (Eq. 13), shape ``(n, n_out)``."""
    with torch.no_grad():
        parts = [loss.prediction(fm.forward(params, X[s:s + chunk_size]))
                 for s in range(0, X.shape[0], chunk_size)]
    return torch.cat(parts)
