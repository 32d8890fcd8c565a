"""The sequential part of Algorithm 1, planned once for every engine.

:func:`plan_path` validates the data, derives the run configuration and its cache,
computes the baselines θ' (Eq. 12) with their targets ``ȳ`` (Eq. 13) and the test
losses at θ* and θ', and hands out the path steps ``k = K..1`` of each baseline group at
the nodes ``t_k`` of the quadrature rule (:mod:`iif_ref.neural.quadrature`): targets
``ρ(t_k − w_k), ρ(t_k)`` (Eq. 15), the path model θ_k (Eq. 16) and
the projected test gradients at θ_k (Eq. 7, 17). What an engine does with a step (the
single-process solve of :mod:`iif_ref.neural.attribution`, or the Dask featurisation
of :mod:`iif_ref.distributed.api`) is its own business; the orchestration exists here.

Path models are computed lazily, in order, because each starts from the previous one
(Eq. 16) and a resumed run takes a cached θ_k instead of recomputing it.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from iif_ref.neural.baseline import per_sample_losses, unlearn
from iif_ref.neural.cache import StepCache, fingerprint
from iif_ref.neural.config import IIFConfig
from iif_ref.neural.features import test_features
from iif_ref.neural.functional import (FunctionalModel, as_inputs, as_targets, eval_mode,
                                       probe_outputs)
from iif_ref.neural.losses import CROSS_ENTROPY, MSE, check_target_linear, resolve_loss
from iif_ref.neural.path import (path_loss, path_model_step, path_targets, predictions,
                                 step_time)
from iif_ref.neural.quadrature import quadrature_rule

__all__ = ["plan_path", "PathPlan", "PathGroup", "PathStep", "Problem", "prepare_problem"]


class Problem:
    """Validated tensors of one attribution problem (built by :func:`prepare_problem`)."""

    def __init__(self, fm, loss, X, Y, X_test, Y_test):
        self.fm, self.loss = fm, loss
        self.X, self.Y, self.X_test, self.Y_test = X, Y, X_test, Y_test
        self.n_train, self.n_test = X.shape[0], X_test.shape[0]


def prepare_problem(model, loss, X_train, y_train, X_test, y_test, *, dtype=None):
    """Validate the data against the model once, at the boundary.

    Raises
    ------
    TypeError
        ``model`` is not a Module, or has float16/bfloat16 parameters without
        ``dtype="float32"``/``"float64"``; non-numeric data; class labels that are not
        integers.
    ValueError
        No trainable parameters, or parameters on the meta device; empty or non-finite
        data; row counts that differ; test features whose per-sample shape differs from
        the training features' (a single test point without its sample axis is named);
        targets whose width differs from the model output; a callable loss whose
        gradient is not affine in the target.
    """
    loss = resolve_loss(loss)
    fm = FunctionalModel(model, dtype=dtype)
    X = as_inputs(X_train, "X_train", fm)
    X_test = as_inputs(X_test, "X_test", fm)
    if tuple(X_test.shape[1:]) != tuple(X.shape[1:]):
        hint = ""
        if tuple(X_test.shape) == tuple(X.shape[1:]):
            hint = (f"; X_test of shape {tuple(X_test.shape)} looks like one test point "
                    f"without its sample axis: pass X_test[None] (or X_test.reshape(1, -1) "
                    f"for a 1-D point), shape {(1, *X.shape[1:])}")
        raise ValueError(f"X_test has per-sample shape {tuple(X_test.shape[1:])} but X_train "
                         f"has {tuple(X.shape[1:])}{hint}")
    F0 = probe_outputs(fm, X, "X_train")
    n_out = F0.shape[1]
    Y = as_targets(y_train, "y_train", n_out, loss, fm)
    Y_test = as_targets(y_test, "y_test", n_out, loss, fm)
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"X_train and y_train must have the same number of rows, got "
                         f"{X.shape[0]} and {Y.shape[0]}")
    if Y_test.shape[0] != X_test.shape[0]:
        raise ValueError(f"X_test and y_test must have the same number of rows, got "
                         f"{X_test.shape[0]} and {Y_test.shape[0]}")
    if loss not in (MSE, CROSS_ENTROPY):
        check_target_linear(loss, F0, Y[:8], generator=torch.Generator().manual_seed(0))
    return Problem(fm, loss, X, Y, X_test, Y_test)


@dataclass
class PathGroup:
    """One baseline and the test points it serves.

    Attributes
    ----------
    index : int
    rows : ndarray of int, shape (n_rows,)
        Test rows (all of them for a joint baseline, one for ``"per_test"``).
    theta_prime : dict of str -> tensor
        θ' (Eq. 12).
    unlearning_trajectory : list of float
        The unlearning objective, start then per epoch (empty when θ' was given).
    loss_prime : ndarray, shape (n_rows,)
        Test losses at θ', float64.
    Ybar : tensor, shape (n_train, n_out)
        Baseline targets ``prediction(f(x_i; θ'))`` (Eq. 13).
    unlearning : dict
        The unlearning history (:func:`iif_ref.neural.baseline.unlearn`): ``objective``,
        ``test_loss``, ``step_size``, ``skipped_steps`` per epoch (empty when θ' was
        given).
    loss_path_start : ndarray, shape (n_rows,), or None
        Test losses at the path's start model θ_0 (set once :meth:`PathPlan.steps` has
        yielded step 1).
    path_loss_start : float or None
        ``L_train(Γ(0))`` at θ_0 (set with ``loss_path_start``).
    """

    index: int
    rows: np.ndarray
    theta_prime: dict
    unlearning_trajectory: list
    loss_prime: np.ndarray
    Ybar: torch.Tensor
    unlearning: dict = field(default_factory=dict)
    loss_path_start: np.ndarray | None = None
    path_loss_start: float | None = None


@dataclass
class PathStep:
    """Path step ``k`` of one group: what every engine needs to score it.

    Attributes
    ----------
    group : PathGroup
    k : int
        ``K..1``.
    name : str
        Cache key ``"group{g}_step{k}"``.
    theta : dict of str -> tensor
        θ_k (Eq. 16; θ* for ``k = K`` when ``t_K = 1``).
    rho_prev, rho_k : tensors, shape (n_train, n_out)
        Targets ``ρ(t_k − w_k)``, ``ρ(t_k)`` (Eq. 15); for ``"euler"``
        ``ρ(t_{k−1})``, ``ρ(t_k)``. The targets are affine in t, so the step's
        ``∇l(ρ_k) − ∇l(ρ_prev)`` is ``w_k ∂_t∇l(ρ(t_k))``: the node's weight times
        ``J_i ρ'`` (docs/algorithm1.md, "Quadrature of the path integral").
    path_trajectory : list of float or None
        ``L_train(Γ(t_k))`` before and after the step; None when nothing was computed
        (θ_K = θ* at ``t_K = 1``, or θ_k from the cache).
    cached : dict or None
        The cache entry of a finished step (``scores``, ``theta``, ``cond``, ``damping``).
    t : float
        Node ``t_k`` of the quadrature rule (``k/K`` for ``"euler"``).
    weight, coarse_weight : float
        The node's weight ``w_k`` in the rule and in its embedded coarser rule
        (:class:`~iif_ref.neural.quadrature.QuadratureRule`).
    path_loss : float
        ``L_train(Γ(t_k))`` at θ_k, the objective the path model minimises
        (:func:`~iif_ref.neural.path.path_loss`).
    """

    group: PathGroup
    k: int
    name: str
    theta: dict
    rho_prev: torch.Tensor
    rho_k: torch.Tensor
    path_trajectory: list | None
    cached: dict | None
    t: float = 1.0
    weight: float = 1.0
    coarse_weight: float = 1.0
    path_loss: float = float("nan")


class PathPlan:
    """Baselines, path steps and test features of one run (built by :func:`plan_path`).

    Attributes
    ----------
    problem : Problem
    config : IIFConfig
    mask : bool
        Appendix E's target mask, resolved (default: on for classification losses).
    run_config : dict
        The run's configuration, as recorded in ``AttributionResult.config``.
    cache : StepCache
        Step cache (a no-op unless ``config.cache_dir``).
    loss_star : ndarray, shape (n_test,)
        Test losses at θ*, float64.
    groups : list of PathGroup
    not_unlearned : ndarray of int
        Test rows whose unlearned baseline did not move the test loss the intended way
        (``Δ_t ≥ 0`` for ``unlearn_sign=+1``, ``Δ_t ≤ 0`` for ``−1``); a warning names
        them. Empty for the ``"prediction"`` and ``"given"`` baselines.
    """

    def __init__(self, problem, config, mask, run_config, cache, loss_star, groups):
        self.problem, self.config, self.mask = problem, config, mask
        self.run_config, self.cache = run_config, cache
        self.loss_star, self.groups = loss_star, groups
        self.rule = quadrature_rule(config.quadrature, config.K)
        self.not_unlearned = _check_unlearned(config, loss_star, groups)

    @property
    def feature_options(self):
        """Projection options shared by every featurisation of the run."""
        c = self.config
        return dict(proj_dim=c.proj_dim, seed=c.seed, kind=c.kind, chunk_size=c.chunk_size,
                    backend=c.backend)

    def steps(self, group):
        """Path steps at the rule's nodes, ``t`` descending (``k = K..1``), each path
        model computed when reached.

        Yields
        ------
        PathStep
            θ_k at node ``t_k`` of the quadrature rule (``config.quadrature``,
            :mod:`iif_ref.neural.quadrature`) is computed from the model of the node
            above (Eq. 16; from θ* for the top node, which is θ* itself when
            ``t_K = 1``) unless the cache holds the step, in which case θ_k (and, for
            the caller, the step's scores) comes from it. After the lowest node the
            start model θ_0 at ``ρ(0)`` is computed the same way and the test losses
            at it are stored in ``group.loss_path_start`` (see :meth:`path_delta`).
        """
        prob, cfg, rule = self.problem, self.config, self.rule
        fm = prob.fm
        theta = fm.theta_star
        t_above = 1.0
        for k in range(cfg.K, 0, -1):
            name = f"group{group.index}_step{k}"
            t, w = float(rule.nodes[k - 1]), float(rule.weights[k - 1])
            rho_k = path_targets(prob.Y, group.Ybar, t, mask=self.mask)
            # y_from: ∇l(ρ(t)) − ∇l(ρ(t − w)) = w ∂_t∇l(ρ(t)) (targets affine in t).
            rho_prev = path_targets(prob.Y, group.Ybar, float(rule.starts[k - 1]),
                                    mask=self.mask)
            hit = self.cache.load(name)
            ptraj = None
            if hit is not None:
                theta = fm.unflatten(torch.as_tensor(hit["theta"], dtype=fm.dtype))
            elif not (k == cfg.K and t == 1.0):
                with eval_mode(fm.model):
                    rho_step = path_targets(prob.Y, group.Ybar, step_time(cfg, t, t_above),
                                            mask=self.mask)
                    theta, traj = path_model_step(fm, prob.loss, theta, prob.X, rho_step,
                                                  cfg, k=k, dt=t_above - t)
                ptraj = list(map(float, traj))
            own = path_loss(fm, prob.loss, theta, prob.X, rho_k, cfg)
            yield PathStep(group=group, k=k, name=name, theta=theta, rho_prev=rho_prev,
                           rho_k=rho_k, path_trajectory=ptraj, cached=hit, t=t, weight=w,
                           coarse_weight=float(rule.coarse_weights[k - 1]), path_loss=own)
            t_above = t
        group.loss_path_start = self._path_start(group, theta)

    def _path_start(self, group, theta_1):
        """Test losses of the group's rows at the path's own start model θ_0.

        θ_0 is the path model at the start targets ``ρ(0)`` (Eq. 15 with t = 0,
        masked when the path is), obtained from the model of the lowest node as every
        other θ_k (Eq. 16, or the refit). The quadrature of Eq. (9) over the nodes
        approximates ``L_test(θ_K) − L_test(θ_0)``, the loss change the computed path
        integrates.
        """
        prob, cfg = self.problem, self.config
        name = f"group{group.index}_start"
        hit = self.cache.load(name)
        if hit is not None:
            group.path_loss_start = float(hit["path_loss"])
            return np.asarray(hit["loss"], dtype=np.float64)
        t_1 = float(self.rule.nodes[0])
        rho_0 = path_targets(prob.Y, group.Ybar, 0.0, mask=self.mask)
        rho_step = path_targets(prob.Y, group.Ybar, step_time(cfg, 0.0, t_1), mask=self.mask)
        with eval_mode(prob.fm.model):
            theta0, _ = path_model_step(prob.fm, prob.loss, theta_1, prob.X, rho_step, cfg,
                                        k=0, dt=t_1)
            loss0 = _test_losses(prob, theta0, group.rows)
            group.path_loss_start = path_loss(prob.fm, prob.loss, theta0, prob.X, rho_0, cfg)
        self.cache.save(name, loss=loss0, path_loss=np.float64(group.path_loss_start))
        return loss0

    def path_delta(self):
        """``L_test(θ_K) − L_test(θ_0)`` per test row, ``(n_test,)``: the loss change the
        computed path integrates (θ_K = θ*, θ_0 the path model at ``ρ(t_0)``), against
        which the completeness residual ``Σ_i I − path_delta`` is measured.

        Raises
        ------
        RuntimeError
            A group's steps have not all been walked (θ_0 is computed after step 1).
        """
        start = np.full(self.problem.n_test, np.nan)
        for group in self.groups:
            if group.loss_path_start is None:
                raise RuntimeError(f"path group {group.index} has not been walked to k=1; "
                                   "iterate plan.steps(group) to the end first")
            start[group.rows] = group.loss_path_start
        return self.loss_star - start

    def completeness_diagnostics(self):
        """Diagnostics of the baselines and of the path ends, for the run's result:
        ``unlearning`` (per group), ``not_unlearned``, ``loss_path_start``,
        ``path_loss_start`` (``L_train(Γ(0))`` at θ_0, per group), ``nodes``,
        ``weights``, ``coarse_weights`` (the quadrature rule, ascending)."""
        return {"unlearning": [g.unlearning for g in self.groups],
                "not_unlearned": self.not_unlearned.tolist(),
                "loss_path_start": self.loss_star - self.path_delta(),
                "path_loss_start": [g.path_loss_start for g in self.groups],
                "nodes": self.rule.nodes.tolist(), "weights": self.rule.weights.tolist(),
                "coarse_weights": self.rule.coarse_weights.tolist()}

    def test_features(self, step):
        """Projected test-loss gradients of the group's rows at θ_k, ``(n_rows, P)``
        (``(n_rows, n_params)`` without projection); Eq. (7), (17)."""
        prob, rows = self.problem, step.group.rows
        with eval_mode(prob.fm.model):
            return test_features(prob.fm, prob.loss, step.theta, prob.X_test[rows],
                                 prob.Y_test[rows], step=step.k, **self.feature_options)


def _test_losses(prob, params, rows):
    with torch.no_grad():
        return per_sample_losses(prob.fm, prob.loss, params, prob.X_test[rows],
                                 prob.Y_test[rows]).double().numpy()


def _baselines(prob, cfg, baseline_params, cache):
    """(test rows, θ', unlearning trajectory) for each baseline of the run."""
    all_rows = np.arange(prob.n_test)
    if cfg.baseline == "prediction":
        return [(all_rows, prob.fm.theta_star, {})]
    if cfg.baseline == "given":
        if baseline_params is None:
            raise ValueError("baseline='given' needs baseline_params (a dict of tensors "
                             "keyed by parameter name)")
        return [(all_rows, {n: torch.as_tensor(baseline_params[n], dtype=prob.fm.dtype)
                            for n in prob.fm.names}, {})]
    row_sets = [all_rows] if cfg.baseline == "joint" else [np.array([t]) for t in all_rows]
    out = []
    for g, rows in enumerate(row_sets):
        hit = cache.load(f"baseline_{g}")
        if hit is not None:
            out.append((rows, prob.fm.unflatten(torch.as_tensor(hit["theta"])),
                        json.loads(str(hit["history"]))))
            continue
        theta, history = unlearn(prob.fm, prob.loss, prob.X, prob.Y, prob.X_test[rows],
                                 prob.Y_test[rows], cfg)
        cache.save(f"baseline_{g}", theta=prob.fm.flatten(theta).numpy(),
                   history=np.array(json.dumps(history)))
        out.append((rows, theta, history))
    return out


def _check_unlearned(cfg, loss_star, groups):
    """Rows whose unlearned baseline failed to move the test loss (warned about)."""
    if cfg.baseline not in ("joint", "per_test"):
        return np.zeros(0, dtype=int)
    rows = np.concatenate([g.rows for g in groups])
    loss_prime = np.concatenate([g.loss_prime for g in groups])
    # Δ_t = L(θ*) − L(θ'_t) must be < 0 when unlearning (sign +1), > 0 when learning.
    failed = np.sort(rows[cfg.unlearn_sign * (loss_star[rows] - loss_prime) >= 0])
    if failed.size:
        shown = ", ".join(map(str, failed[:20])) + (", ..." if failed.size > 20 else "")
        goal = "raise" if cfg.unlearn_sign == 1 else "lower"
        warnings.warn(
            f"unlearning (Eq. 12, baseline={cfg.baseline!r}) did not {goal} the test loss "
            f"of {failed.size} of {len(rows)} test points (rows {shown}); their baseline "
            "is not unlearned. Raise unlearn_epochs or unlearn_lr, or lower lam; the "
            "per-epoch test losses are in diagnostics['unlearning']",
            RuntimeWarning, stacklevel=3)
    return failed


def plan_problem(prob, cfg, *, baseline_params=None, method="iif"):
    """:func:`plan_path` for an already prepared :class:`Problem` (``cfg`` validated)."""
    fm, loss = prob.fm, prob.loss
    mask = bool(cfg.mask_path if cfg.mask_path is not None else loss.classification)
    config = cfg.to_dict()
    config.update(method=method, loss=loss.name, n_params=fm.n_params, n_train=prob.n_train,
                  n_test=prob.n_test, torch_dtype=str(fm.dtype).replace("torch.", ""),
                  mask_path_resolved=mask, torch_version=torch.__version__)
    key = fingerprint(config=config, model=fm.model, loss_name=loss.name,
                      arrays=[prob.X, prob.Y, prob.X_test, prob.Y_test,
                              baseline_params if baseline_params is not None else 0])
    cache = StepCache(cfg.cache_dir, key, config)
    with eval_mode(fm.model):
        loss_star = _test_losses(prob, fm.theta_star, np.arange(prob.n_test))
        groups = []
        for g, (rows, theta_prime, history) in enumerate(
                _baselines(prob, cfg, baseline_params, cache)):
            groups.append(PathGroup(
                index=g, rows=rows, theta_prime=theta_prime,
                unlearning_trajectory=list(map(float, history.get("objective", []))),
                loss_prime=_test_losses(prob, theta_prime, rows),
                Ybar=predictions(fm, loss, theta_prime, prob.X, chunk_size=cfg.chunk_size),
                unlearning=history))
    return PathPlan(prob, cfg, mask, config, cache, loss_star, groups)


def plan_path(model, loss, X_train, y_train, X_test, y_test, *, config=None,
              baseline_params=None, method="iif", **options):
    """Plan Algorithm 1: baselines, path targets and models, test features.

    Parameters
    ----------
    model, loss, X_train, y_train, X_test, y_test
        As in :func:`iif_ref.neural.integrated_influence`.
    config : IIFConfig, optional
        All options at once; or pass them as keywords (``**options``), not both.
    baseline_params : dict of str -> tensor, optional
        θ' for ``baseline="given"``.
    method : str
        Recorded in ``run_config`` (``"iif"``, or ``"if"`` for its K = 1 case).

    Returns
    -------
    PathPlan
        Baselines computed (Eq. 12–13); :meth:`PathPlan.steps` yields the path steps
        of a group with θ_k (Eq. 15–16), :meth:`PathPlan.test_features` their projected
        test gradients.

    Raises
    ------
    ValueError, TypeError
        Bad data or options (named), as :func:`iif_ref.neural.integrated_influence`.
    iif_ref.neural.optimise.DivergenceError
        The unlearning objective diverged.

    Notes
    -----
    The sequential part of Algorithm 1 (Eq. 12–16): engines that score the steps
    differently share it, so their baselines, path models and test gradients are the
    same computation.

    Examples
    --------
    >>> import torch
    >>> from iif_ref.neural import plan_path
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(20, 3, dtype=torch.float64); y = X.sum(1, keepdim=True)
    >>> net = torch.nn.Linear(3, 1).double()
    >>> plan = plan_path(net, "mse", X, y, X[:2], y[:2], K=3, baseline="joint",
    ...                  proj_dim=4, progress=False)
    >>> [step.k for step in plan.steps(plan.groups[0])]
    [3, 2, 1]
    >>> plan.test_features(next(plan.steps(plan.groups[0]))).shape
    (2, 4)
    """
    cfg = IIFConfig.resolve(config, options)
    with eval_mode(model):
        prob = prepare_problem(model, loss, X_train, y_train, X_test, y_test, dtype=cfg.dtype)
    return plan_problem(prob, cfg, baseline_params=baseline_params, method=method)
