"""Gradient-based minimisation of an objective over a parameter dict (shared by the
unlearning baseline of Eq. 12 and the path models of Eq. 16).

The objective is a sum of per-sample terms over the training data plus an optional
extra term; mini-batches are scaled so their expectation is the full objective. Every
run records its history (the full objective after each epoch, the step sizes taken),
which the caller reports when a run diverges. Plain SGD steps can be guarded by a
backtracking (Armijo) line search on the mini-batch objective, so that no step raises
the objective it was taken on. Small models can be solved by Newton's method with the
exact Hessian, which reaches a quadratic objective's minimiser to rounding in one step.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["minimise", "DivergenceError", "MAX_BACKTRACKS", "ARMIJO_C",
           "NEWTON_MAX_PARAMS"]


class DivergenceError(ValueError):
    """An optimisation left every finite bound; ``trajectory`` holds the objective values."""

    def __init__(self, message, *, trajectory=()):
        super().__init__(message)
        self.trajectory = tuple(float(v) for v in trajectory)


def minimise(objective, params, *, n_samples, epochs, optimizer, lr, batch_size=None,
             seed=0, max_iter=500, tol=1e-10, divergence_floor=None, what="optimisation",
             line_search=False, monitor=None):
    """Minimise ``objective(params, idx, scale)`` from ``params``; return (params, history).

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
        (``"sgd"``, ``"adam"``) or one L-BFGS or Newton solve of up to ``max_iter``
        iterations.
    optimizer : {"sgd", "adam", "lbfgs", "newton"}
        ``"newton"``: full batch, exact Hessian (at most :data:`NEWTON_MAX_PARAMS`
        parameters), see :func:`_newton`.
    lr : float
        Step size; with ``line_search`` the largest step tried (``"lbfgs"`` uses a
        strong-Wolfe line search with unit initial step and ignores ``lr``).
    batch_size : int or None
    seed : int
        Seed of the mini-batch order.
    max_iter, tol : int, float
        L-BFGS / Newton iteration cap and gradient tolerance (infinity norm, relative to
        the starting gradient).
    divergence_floor : float or None
        The run is divergent when the full objective drops below it.
    what : str
        Name used in error messages.
    line_search : bool
        ``"sgd"`` only: backtracking (Armijo) on each mini-batch objective. A step
        ``α`` is accepted when ``f_b(θ − α g) ≤ f_b(θ) − c α ‖g‖²`` with ``c = 0.1`` and
        the trial value finite; ``α`` starts at ``min(lr, 2 α_prev)`` and halves up to
        :data:`MAX_BACKTRACKS` times; when no trial is accepted the step is skipped (and
        counted). This is the stochastic Armijo rule of Vaswani et al. (NeurIPS 2019):
        a step never increases the objective it was taken on, so a too large ``lr``
        cannot make the run diverge.
    monitor : callable, optional
        ``monitor(params) -> list of float``, recorded at the start and after each epoch
        (e.g. the test losses of the unlearning baseline).

    Returns
    -------
    params : dict of str -> tensor (detached)
    history : dict
        ``objective``: the full objective at the start and after each epoch;
        ``step_size``: per epoch ``[min, mean, max]`` of the steps taken (``lr`` without
        line search; empty for L-BFGS); ``skipped_steps``: per epoch, mini-batch steps for
        which no trial step was accepted; ``monitor``: the monitor's values (start, then
        per epoch), when a monitor is given.

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

    history = {"objective": [full()], "step_size": [], "skipped_steps": []}
    if monitor is not None:
        with torch.no_grad():
            history["monitor"] = [list(map(float, monitor(leaves)))]

    def check(value):
        trajectory = history["objective"]
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

    def end_epoch(steps, skipped):
        value = full()
        check(value)
        history["objective"].append(value)
        history["step_size"].append(
            [float(np.min(steps)), float(np.mean(steps)), float(np.max(steps))] if steps
            else [])
        history["skipped_steps"].append(int(skipped))
        if monitor is not None:
            with torch.no_grad():
                history["monitor"].append(list(map(float, monitor(leaves))))

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
            end_epoch([], 0)
        return {n: p.detach() for n, p in leaves.items()}, history

    if optimizer == "newton":
        for _ in range(epochs):
            _newton(objective, leaves, max_iter=max_iter, tol=tol, what=what)
            end_epoch([], 0)
        return {n: p.detach() for n, p in leaves.items()}, history

    if line_search and optimizer != "sgd":
        raise ValueError(f"line_search is available for optimizer='sgd' only, got "
                         f"{optimizer!r}")
    opt = None if line_search else (torch.optim.SGD(values, lr=lr) if optimizer == "sgd"
                                    else torch.optim.Adam(values, lr=lr))
    gen = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    alpha = lr
    for _ in range(epochs):
        if batch_size is None or batch_size >= n_samples:
            batches = [None]
        else:
            order = torch.randperm(n_samples, generator=gen)
            batches = list(torch.split(order, batch_size))
        steps, skipped = [], 0
        for idx in batches:
            scale = 1.0 if idx is None else n_samples / len(idx)
            if line_search:
                alpha = _armijo_step(objective, leaves, idx, scale, min(lr, 2 * alpha))
                if alpha == 0.0:
                    skipped += 1
                    alpha = lr
                else:
                    steps.append(alpha)
                continue
            opt.zero_grad()
            loss = objective(leaves, idx, scale)
            loss.backward()
            opt.step()
            steps.append(lr)
            value = float(loss.detach())
            if not np.isfinite(value):
                check(value)
        end_epoch(steps, skipped)
    return {n: p.detach() for n, p in leaves.items()}, history


#: Halvings of the trial step before a mini-batch step is skipped (2⁻³⁰ ≈ 1e-9 of lr).
MAX_BACKTRACKS = 30
#: Sufficient-decrease constant of the Armijo rule.
ARMIJO_C = 0.1


def _armijo_step(objective, leaves, idx, scale, alpha):
    """One backtracking gradient step on the batch objective, in place; the step taken
    (0.0 when no trial step satisfied the Armijo condition)."""
    values = list(leaves.values())
    f0 = objective(leaves, idx, scale)
    grads = torch.autograd.grad(f0, values)
    f0 = float(f0.detach())
    flat = torch.cat([g.reshape(-1) for g in grads])
    gg = float(flat @ flat)
    if not (np.isfinite(f0) and np.isfinite(gg)) or gg == 0.0:
        return 0.0
    with torch.no_grad():
        start = [v.detach().clone() for v in values]
        for _ in range(MAX_BACKTRACKS + 1):
            for v, s, g in zip(values, start, grads):
                v.copy_(s - alpha * g)
            trial = float(objective(leaves, idx, scale))
            if np.isfinite(trial) and trial <= f0 - ARMIJO_C * alpha * gg:
                return alpha
            alpha *= 0.5
        for v, s in zip(values, start):
            v.copy_(s)
    return 0.0


#: Largest parameter count of ``optimizer="newton"`` (its Hessian is dense: 32 MiB here).
NEWTON_MAX_PARAMS = 2048


def _newton(objective, leaves, *, max_iter, tol, what):
    """Newton's method on the full objective, in place on ``leaves``.

    Each iteration forms the exact Hessian ``H`` (autograd) and steps ``s = −(H + μI)⁻¹g``
    with the smallest ``μ ≥ 0`` of ``0, 10⁻¹²·‖H‖, 10⁻¹¹·‖H‖, …`` that makes the matrix
    positive definite, backtracked until it satisfies the Armijo condition (``μ = 0`` near a
    minimiser, where the iteration converges quadratically; one step solves a quadratic
    up to rounding). It stops at ``‖g‖_∞ ≤ tol·‖g₀‖_∞``, when a step no longer lowers
    ``‖g‖`` (the rounding floor of a backward-stable solve, ``‖θ − θ̂‖/‖θ̂‖ ≲ κ(H)·ε``), or
    after ``max_iter`` iterations.
    """
    names = list(leaves)
    shapes = [leaves[n].shape for n in names]
    sizes = [leaves[n].numel() for n in names]
    n_params = sum(sizes)
    if n_params > NEWTON_MAX_PARAMS:
        raise ValueError(
            f"{what}: optimizer='newton' forms the dense Hessian and is limited to "
            f"{NEWTON_MAX_PARAMS} parameters; the model has {n_params} (use 'lbfgs')")
    flat = torch.cat([leaves[n].detach().reshape(-1) for n in names])

    def unflatten(v):
        return dict(zip(names, (c.reshape(s) for c, s in zip(torch.split(v, sizes), shapes))))

    def f(v):
        return objective(unflatten(v), None, 1.0)

    def grad(v):
        v = v.detach().requires_grad_(True)
        value = f(v)
        (g,) = torch.autograd.grad(value, v)
        return float(value.detach()), g.detach()

    eps = torch.finfo(flat.dtype).eps
    value, g = grad(flat)
    g0 = max(float(g.abs().max()), np.finfo(float).tiny)
    eye = torch.eye(n_params, dtype=flat.dtype, device=flat.device)
    for _ in range(max_iter):
        if float(g.abs().max()) <= tol * g0:
            break
        H = torch.autograd.functional.hessian(f, flat.detach())
        H = 0.5 * (H + H.T)
        step = _newton_step(grad, flat, value, g, H, eye, eps)
        if step is None:
            break
        flat, value, g = step
    with torch.no_grad():
        for n, v in unflatten(flat).items():
            leaves[n].copy_(v)


def _newton_step(grad, flat, value, g, H, eye, eps):
    """One damped Newton step of :func:`_newton`: ``(θ, f, g)`` after it, or None at the
    rounding floor (no step lowers the objective or, at unit length, the gradient norm)."""
    scale = float(H.abs().max())
    for mu in [0.0] + [scale * 10.0 ** e for e in range(-12, 7)]:
        L, info = torch.linalg.cholesky_ex(H + mu * eye)
        if int(info) != 0:
            continue
        s = -torch.cholesky_solve(g[:, None], L)[:, 0]
        slope = float(g @ s)
        alpha = 1.0
        for _ in range(MAX_BACKTRACKS + 1):
            trial = flat + alpha * s
            t_value, t_g = grad(trial)
            if np.isfinite(t_value):
                if t_value <= value + ARMIJO_C * alpha * slope and (
                        t_value < value - 4 * eps * abs(value) or t_g.norm() < g.norm()):
                    return trial, t_value, t_g
                # Past the objective's rounding floor only the gradient still tells
                # progress: a unit step that halves it (iterative refinement); a unit
                # step that leaves both where they are ends the iteration.
                if alpha == 1.0 and abs(t_value - value) <= 4 * eps * abs(value):
                    return (trial, t_value, t_g) if t_g.norm() < 0.5 * g.norm() else None
            alpha *= 0.5
        # (H + μI) is positive definite, so s descends: backtracking failed only at
        # the rounding floor, where a larger μ (a shorter step) cannot do better.
        return None
    return None
