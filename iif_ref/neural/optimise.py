"""Gradient-based minimisation of an objective over a parameter dict (shared by the
unlearning baseline of Eq. 12 and the path models of Eq. 16).

The objective is a sum of per-sample terms over the training data plus an optional
extra term; mini-batches are scaled so their expectation is the full objective. Every
run records its trajectory (the full objective after each epoch), which the caller
reports when a run diverges.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["minimise", "DivergenceError"]


class DivergenceError(ValueError):
    """An optimisation left every finite bound; ``trajectory`` holds the objective values."""

    def __init__(self, message, *, trajectory=()):
        super().__init__(message)
        self.trajectory = tuple(float(v) for v in trajectory)


def minimise(objective, params, *, n_samples, epochs, optimizer, lr, batch_size=None,
             seed=0, max_iter=500, tol=1e-10, divergence_floor=None, what="optimisation"):
    """Minimise ``objective(params, idx)`` starting from ``params``; return (params, trajectory).

    Parameters
    ----------
    objective : callable
        ``objective(params, idx, scale)`` → 0-d tensor: the objective with the training
        sum restricted to rows ``idx`` (a LongTensor, or None for all) and multiplied by
        ``scale`` (``n_samples / len(idx)``, so mini-batch terms are unbiased).
    params : dict of str -> tensor
        Starting point (not modified).
    n_samples : int
    epochs : int
        Passes over the data. With ``batch_size=None`` one epoch is one full-batch step
        (``"sgd"``, ``"adam"``) or one L-BFGS solve of up to ``max_iter`` iterations.
    optimizer : {"sgd", "adam", "lbfgs"}
    lr : float
        Step size (``"lbfgs"`` uses a strong-Wolfe line search with unit initial step and
        ignores ``lr``).
    batch_size : int or None
    seed : int
        Seed of the mini-batch order.
    max_iter, tol : int, float
        L-BFGS iteration cap and gradient tolerance (infinity norm, relative to the
        starting gradient).
    divergence_floor : float or None
        The run is divergent when the full objective drops below it.
    what : str
        Name used in error messages.

    Returns
    -------
    params : dict of str -> tensor (detached)
    trajectory : list of float
        Full objective at the start and after each epoch.

    Raises
    ------
    DivergenceError
        A non-finite objective or parameter, or the objective below ``divergence_floor``.
    """
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    values = list(leaves.values())

    def full():
        with torch.no_grad():
            return float(objective(leaves, None, 1.0))

    trajectory = [full()]

    def check(value):
        finite = np.isfinite(value) and all(bool(torch.isfinite(v).all()) for v in values)
        if not finite or (divergence_floor is not None and value < divergence_floor):
            reason = "became non-finite" if not finite else (
                f"fell below {divergence_floor:.6g} (unbounded below: the objective is "
                "not convex in the region reached; lower the learning rate or epochs, or "
                "raise lam)")
            raise DivergenceError(
                f"{what} diverged: objective {reason}; trajectory (start, then per "
                f"epoch) {', '.join(f'{v:.6g}' for v in trajectory + [value])}",
                trajectory=trajectory + [value])

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(values, lr=1.0, max_iter=max_iter, history_size=50,
                                line_search_fn="strong_wolfe", tolerance_change=0.0,
                                tolerance_grad=0.0)
        loss0 = objective(leaves, None, 1.0)
        g0 = torch.autograd.grad(loss0, values)
        g0max = max(float(g.abs().max()) for g in g0)
        opt.defaults["tolerance_grad"] = tol * max(g0max, np.finfo(float).tiny)
        for group in opt.param_groups:
            group["tolerance_grad"] = opt.defaults["tolerance_grad"]

        def closure():
            opt.zero_grad()
            loss = objective(leaves, None, 1.0)
            loss.backward()
            return loss

        for _ in range(epochs):
            opt.step(closure)
            value = full()
            check(value)
            trajectory.append(value)
        return {n: p.detach() for n, p in leaves.items()}, trajectory

    opt = (torch.optim.SGD(values, lr=lr) if optimizer == "sgd"
           else torch.optim.Adam(values, lr=lr))
    gen = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    for _ in range(epochs):
        if batch_size is None or batch_size >= n_samples:
            batches = [None]
        else:
            order = torch.randperm(n_samples, generator=gen)
            batches = list(torch.split(order, batch_size))
        for idx in batches:
            scale = 1.0 if idx is None else n_samples / len(idx)
            opt.zero_grad()
            loss = objective(leaves, idx, scale)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            if not np.isfinite(value):
                check(value)
        value = full()
        check(value)
        trajectory.append(value)
    return {n: p.detach() for n, p in leaves.items()}, trajectory
