"""Algorithm 1: Integrated Influence of training samples on test losses of a torch model.

Data flow (docs/algorithm1.md maps each line to the paper)::

    θ*, loss, D_train, test points
      → baseline θ' by unlearning (Eq. 12), targets ȳ = prediction(f(x; θ')) (Eq. 13)
      → for k = K..1: targets ρ(t_k) (Eq. 15), path model θ_k (Eq. 16, θ_K = θ*)
          → per-sample u_i, J_iΔy, test gradients G at θ_k (chunks, torch.func)
          → projected: Φ, Ψ, Γ = (U, D, G)·A → kernels.projected_scores (Eq. 17, 31)
            unprojected: dense curvature C_k, −G (C_k + λ_d I)⁻¹ Dᵀ in float64
          → I += step term
      → scores (n_test, n_train), Δ measured, residual Σ_i I − Δ
"""
from __future__ import annotations

import numpy as np
import torch

from iif_ref.neural.baseline import per_sample_losses, unlearn
from iif_ref.neural.cache import StepCache, fingerprint
from iif_ref.neural.config import IIFConfig
from iif_ref.neural.curvature import (condition_estimate, dense_curvature, dense_scores,
                                      resolve_damping)
from iif_ref.neural.features import test_features, train_features
from iif_ref.neural.functional import FunctionalModel, as_inputs, as_targets, eval_mode
from iif_ref.neural.losses import MSE, CROSS_ENTROPY, check_target_linear, resolve_loss
from iif_ref.neural.path import path_model_step, path_targets, predictions
from iif_ref.neural.result import AttributionResult

__all__ = ["integrated_influence", "attribute", "prepare_problem", "Problem"]


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
        ``model`` is not a Module; non-numeric data.
    ValueError
        No trainable parameters; empty or non-finite data; row counts that differ;
        test features whose per-sample shape differs from the training features';
        targets whose width differs from the model output; a callable loss whose
        gradient is not affine in the target.
    """
    loss = resolve_loss(loss)
    fm = FunctionalModel(model, dtype=dtype)
    X = as_inputs(X_train, "X_train", fm)
    X_test = as_inputs(X_test, "X_test", fm)
    if tuple(X_test.shape[1:]) != tuple(X.shape[1:]):
        raise ValueError(f"X_test has per-sample shape {tuple(X_test.shape[1:])} but X_train "
                         f"has {tuple(X.shape[1:])}")
    with torch.no_grad():
        F0 = fm.forward(fm.theta_star, X[:8])
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


def _test_losses(prob, params, rows):
    with torch.no_grad():
        return per_sample_losses(prob.fm, prob.loss, params, prob.X_test[rows],
                                 prob.Y_test[rows]).double().numpy()


def _groups(prob, cfg, baseline_params, cache):
    """(test rows, θ', unlearning trajectory) for each baseline of the run."""
    all_rows = np.arange(prob.n_test)
    if cfg.baseline == "prediction":
        return [(all_rows, prob.fm.theta_star, [])]
    if cfg.baseline == "given":
        if baseline_params is None:
            raise ValueError("baseline='given' needs baseline_params (a dict of tensors "
                             "keyed by parameter name)")
        return [(all_rows, {n: torch.as_tensor(baseline_params[n], dtype=prob.fm.dtype)
                            for n in prob.fm.names}, [])]
    row_sets = [all_rows] if cfg.baseline == "joint" else [np.array([t]) for t in all_rows]
    out = []
    for g, rows in enumerate(row_sets):
        hit = cache.load(f"baseline_{g}")
        if hit is not None:
            out.append((rows, prob.fm.unflatten(torch.as_tensor(hit["theta"])),
                        hit["trajectory"].tolist()))
            continue
        theta, traj = unlearn(prob.fm, prob.loss, prob.X, prob.Y, prob.X_test[rows],
                              prob.Y_test[rows], cfg)
        cache.save(f"baseline_{g}", theta=prob.fm.flatten(theta).numpy(),
                   trajectory=np.asarray(traj))
        out.append((rows, theta, traj))
    return out


def _step_scores(prob, cfg, theta, rho_prev, rho_k, rows, k):
    """The step-k term ``−G_k F_k⁻¹ (J Δy)_kᵀ`` for test ``rows``; (scores, cond, damping)."""
    fm, loss = prob.fm, prob.loss
    common = dict(proj_dim=cfg.proj_dim, seed=cfg.seed, kind=cfg.kind,
                  chunk_size=cfg.chunk_size, backend=cfg.backend, step=k)
    Phi, Psi = train_features(fm, loss, theta, prob.X, rho_prev, rho_k, **common)
    Gamma = test_features(fm, loss, theta, prob.X_test[rows], prob.Y_test[rows], **common)
    if cfg.proj_dim is None:
        C = dense_curvature(fm, loss, theta, prob.X, rho_k, kind=cfg.curvature, U=Phi,
                            chunk_size=cfg.chunk_size)
        lam_d = resolve_damping(cfg.damping, np.trace(C), C.shape[0])
        scores, cond = dense_scores(C, Psi, Gamma, damping=lam_d, step=k)
        return scores, cond, lam_d
    from iif_ref.kernels import projected_scores

    P = cfg.proj_dim
    Phi64 = Phi.astype(np.float64)
    gram = Phi64.T @ Phi64
    lam_d = resolve_damping(cfg.damping, np.trace(gram), P)
    # Diagnostic only (the kernel factors F itself and raises if it is not SPD).
    cond = condition_estimate(gram + lam_d * np.eye(P))
    options = {} if cfg.backend is None else {"backend": cfg.backend}
    scores = projected_scores(Phi, Psi, Gamma, damping=lam_d, **options)
    return scores, cond, lam_d


def _run(prob, cfg, *, baseline_params=None, callback=None, method="iif"):
    fm, loss = prob.fm, prob.loss
    mask = cfg.mask_path if cfg.mask_path is not None else loss.classification
    config = cfg.to_dict()
    config.update(method=method, loss=loss.name, n_params=fm.n_params, n_train=prob.n_train,
                  n_test=prob.n_test, torch_dtype=str(fm.dtype).replace("torch.", ""),
                  mask_path_resolved=bool(mask), torch_version=torch.__version__)
    key = fingerprint(config=config, model=fm.model, loss_name=loss.name,
                      arrays=[prob.X, prob.Y, prob.X_test, prob.Y_test,
                              baseline_params if baseline_params is not None else 0])
    cache = StepCache(cfg.cache_dir, key, config)
    groups = _groups(prob, cfg, baseline_params, cache)

    scores = np.zeros((prob.n_test, prob.n_train))
    delta = np.zeros(prob.n_test)
    loss_star = _test_losses(prob, fm.theta_star, np.arange(prob.n_test))
    loss_prime = np.zeros(prob.n_test)
    diag = {"condition": [], "damping": [], "unlearning_trajectory": [],
            "path_trajectory": []}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(groups) * cfg.K, desc=f"{method} steps", disable=not cfg.progress)
    for g, (rows, theta_prime, traj) in enumerate(groups):
        diag["unlearning_trajectory"].append(list(map(float, traj)))
        loss_prime[rows] = _test_losses(prob, theta_prime, rows)
        delta[rows] = loss_star[rows] - loss_prime[rows]
        Ybar = predictions(fm, loss, theta_prime, prob.X, chunk_size=cfg.chunk_size)
        theta = fm.theta_star
        for k in range(cfg.K, 0, -1):
            name = f"group{g}_step{k}"
            rho_k = path_targets(prob.Y, Ybar, k / cfg.K, mask=mask)
            rho_prev = path_targets(prob.Y, Ybar, (k - 1) / cfg.K, mask=mask)
            hit = cache.load(name)
            if hit is not None:
                theta = fm.unflatten(torch.as_tensor(hit["theta"], dtype=fm.dtype))
                term, cond, lam_d = hit["scores"], float(hit["cond"]), float(hit["damping"])
            else:
                if k < cfg.K:
                    theta, ptraj = path_model_step(fm, loss, theta, prob.X, rho_k, cfg, k=k)
                    diag["path_trajectory"].append(list(map(float, ptraj)))
                term, cond, lam_d = _step_scores(prob, cfg, theta, rho_prev, rho_k, rows, k)
                cache.save(name, scores=term, theta=fm.flatten(theta).numpy(),
                           cond=np.float64(cond), damping=np.float64(lam_d))
            scores[rows] += term
            diag["condition"].append(cond)
            diag["damping"].append(lam_d)
            bar.update(1)
            if callback is not None:
                callback(name)
    bar.close()
    diag["loss_star"], diag["loss_prime"] = loss_star, loss_prime
    diag["cached_steps"] = list(cache.loaded)
    config["damping_used"] = list(diag["damping"])
    return AttributionResult(scores=scores, delta=delta, residual=scores.sum(axis=1) - delta,
                             config=config, diagnostics=diag, method=method)


def integrated_influence(model, loss, X_train, y_train, X_test, y_test, *, config=None,
                         baseline_params=None, callback=None, **options):
    """Integrated Influence (Algorithm 1) of every training sample on every test loss.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model f(·; θ*); its trainable parameters are θ*. Not modified
        (evaluated in eval mode, its mode restored after).
    loss : "mse", "cross_entropy" or a target-linear callable
        Per-sample loss (docs/conventions.md); training and test loss alike.
    X_train : array_like or tensor, shape (n_train, ...)
    y_train : array_like, shape (n_train, n_out), (n_train,) for one output, or integer
        labels (n_train,) for cross-entropy
    X_test, y_test : the same for the test points, shape (n_test, ...)
    config : IIFConfig, optional
        All options at once; or pass them as keywords (``**options``), not both.
    baseline_params : dict of str -> tensor, optional
        θ' for ``baseline="given"``.
    callback : callable, optional
        ``callback(step_name)`` after each finished (and cached) step; an exception it
        raises interrupts the run, which resumes from ``cache_dir`` when called again.
    **options
        Fields of :class:`IIFConfig` (K, lam, baseline, proj_dim, damping, ...).

    Returns
    -------
    AttributionResult
        ``scores`` (n_test, n_train) float64, ``delta``, ``residual``, ``config``,
        ``diagnostics``.

    Raises
    ------
    ValueError, TypeError
        Bad data or options (named); see :func:`prepare_problem` and :class:`IIFConfig`.
    iif_ref.neural.optimise.DivergenceError
        The unlearning objective diverged (message carries the trajectory).
    iif_ref.errors.NotPositiveDefiniteError
        A damped curvature at some step is not positive definite.

    Notes
    -----
    Implements Eq. (10): ``I[t, i] = −Σ_{k=1..K} G_t(θ_k) F_k⁻¹ J_i(t_k)Δy^(k)``, with the
    baseline of Eq. (12–13), targets of Eq. (15), models of Eq. (16), projection Eq. (17)
    and Fisher Eq. (31). ``K=1`` with ``baseline="prediction"`` (and ``mask_path=False``
    for cross-entropy) is the influence function (Lemma 2.5, Corollary 2.6).

    Examples
    --------
    >>> import torch
    >>> from iif_ref.neural import integrated_influence
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(30, 3, dtype=torch.float64)
    >>> y = X @ torch.ones(3, 1, dtype=torch.float64) + 0.1 * torch.randn(30, 1, dtype=torch.float64)
    >>> net = torch.nn.Linear(3, 1, bias=False).double()
    >>> r = integrated_influence(net, "mse", X, y, X[:2] + 1, y[:2], K=1,
    ...                          baseline="prediction", proj_dim=None, damping=0.0,
    ...                          curvature="hessian", progress=False)
    >>> r.scores.shape                      # K = 1 at θ' = θ*: the influence function
    (2, 30)
    >>> bool((r.delta == 0).all())
    True
    """
    if config is not None and options:
        raise TypeError("pass either config= or keyword options, not both")
    cfg = config if config is not None else IIFConfig.from_options(options)
    cfg.validate()
    with eval_mode(model):
        prob = prepare_problem(model, loss, X_train, y_train, X_test, y_test, dtype=cfg.dtype)
        return _run(prob, cfg, baseline_params=baseline_params, callback=callback)


_METHODS = ("iif", "if", "tracin", "trak")


def attribute(model, loss, X_train, y_train, X_test, y_test, *, method="iif", seed=0,
              client=None, **options):
    """Attribute test losses to training samples with one of the four methods.

    Parameters
    ----------
    model, loss, X_train, y_train, X_test, y_test
        As in :func:`integrated_influence`.
    method : {"iif", "if", "tracin", "trak"}
        :func:`integrated_influence`, :func:`~iif_ref.neural.methods.influence_function`,
        :func:`~iif_ref.neural.methods.tracin`, :func:`~iif_ref.neural.methods.trak`.
    seed : int
        Projection seed (and mini-batch order).
    client : dask.distributed.Client, optional
        Delegate to ``iif_ref.distributed.attribute_distributed``.
    **options
        Options of the chosen method.

    Returns
    -------
    AttributionResult
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if client is not None:
        try:
            from iif_ref.distributed import attribute_distributed
        except ImportError as exc:
            raise ImportError("client= needs iif_ref.distributed.attribute_distributed, "
                              f"which could not be imported ({exc})") from exc
        return attribute_distributed(model, loss, X_train, y_train, X_test, y_test,
                                     method=method, seed=seed, client=client, **options)
    if method == "iif":
        return integrated_influence(model, loss, X_train, y_train, X_test, y_test,
                                    seed=seed, **options)
    from iif_ref.neural import methods

    fn = {"if": methods.influence_function, "tracin": methods.tracin,
          "trak": methods.trak}[method]
    return fn(model, loss, X_train, y_train, X_test, y_test, seed=seed, **options)
