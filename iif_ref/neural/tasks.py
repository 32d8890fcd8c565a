"""The paper's tasks as API: self-influence for mislabel detection (Sec. 3.3) and
proponents / opponents with two opposite baselines (Sec. 3.2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iif_ref._threads import torch_owns_the_cores
from iif_ref._validation import check_positive_int, check_positive_real
from iif_ref.neural.attribution import Problem, _run, integrated_influence, prepare_problem
from iif_ref.neural.baseline import per_sample_baselines, per_sample_losses
from iif_ref.neural.config import IIFConfig
from iif_ref._defaults import default_relative_damping
from iif_ref.neural.curvature import dense_curvature, dense_scores, resolve_damping
from iif_ref.neural.features import train_features
from iif_ref.neural.functional import eval_mode
from iif_ref.neural.path import path_targets

__all__ = ["self_influence", "SelfInfluenceResult", "proponents_opponents",
           "ProponentsOpponents"]


@dataclass
class SelfInfluenceResult:
    """Self-influence ``I_i(i)`` of each training sample on its own loss.

    Attributes
    ----------
    self_influence : ndarray, shape (n,)
        ``I[i, i]`` with the per-sample baseline θ'_i (our sign: ``< 0`` lowers the loss).
    mislabel_score : ndarray, shape (n,)
        ``−self_influence``, the paper's unnormalised mislabel probability: a sample that
        is the main reason for its own (low) loss is suspect.
    delta : ndarray, shape (n,)
        ``l_i(θ*) − l_i(θ'_i)`` (negative: θ'_i unlearned sample i).
    indices : ndarray of int
        The training samples scored.
    config : dict
    """

    self_influence: np.ndarray
    mislabel_score: np.ndarray
    delta: np.ndarray
    indices: np.ndarray
    config: dict


@torch_owns_the_cores
def self_influence(model, loss, X_train, y_train, *, lr=1e-2, indices=None, fast=True,
                   **options):
    """Self-influence with the per-sample baselines ``θ'_i = θ* + η ∇l_i(θ*)`` (Sec. 3.3).

    Parameters
    ----------
    model, loss, X_train, y_train
        As in :func:`~iif_ref.neural.integrated_influence`; the test points are the
        training points themselves.
    lr : float
        η of the one-step ascent that unlearns sample ``i``.
    indices : sequence of int, optional
        Samples to score (default all).
    fast : bool
        With ``K = 1`` the path model is θ* for every ``i``, so one curvature serves all
        samples and ``I[i, i] = −u_i F⁻¹ ψ_iᵀ`` is evaluated for all of them at once.
        ``False`` (or ``K > 1``) runs Algorithm 1 once per sample (cost ∝ n · K passes).
    **options
        :class:`IIFConfig` fields (``K`` defaults to 1 here; ``baseline`` is fixed).

    Returns
    -------
    SelfInfluenceResult
    """
    lr = check_positive_real(lr, "lr")
    options = {"K": 1, **options}
    if "baseline" in options:
        raise TypeError("self_influence fixes the baseline (per-sample θ'_i); do not pass "
                        "baseline=")
    cfg = IIFConfig.from_options({**options, "baseline": "given"})
    with eval_mode(model):
        prob = prepare_problem(model, loss, X_train, y_train, X_train[:1], y_train[:1],
                               dtype=cfg.dtype)
        n = prob.n_train
        idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"indices must be non-empty and within [0, {n})")
        fm, loss_ = prob.fm, prob.loss
        mask = cfg.mask_path if cfg.mask_path is not None else loss_.classification
        thetas = dict(per_sample_baselines(fm, loss_, prob.X, prob.Y, idx, lr=lr))
        delta = np.empty(idx.size)
        loss_star = per_sample_losses(fm, loss_, fm.theta_star, prob.X, prob.Y).detach()
        for j, i in enumerate(idx):
            li = per_sample_losses(fm, loss_, thetas[i], prob.X[i:i + 1], prob.Y[i:i + 1])
            delta[j] = float(loss_star[i]) - float(li.detach()[0])
        if fast and cfg.K == 1:
            values = _self_influence_k1(prob, cfg, thetas, idx, mask)
        else:
            values = np.empty(idx.size)
            for j, i in enumerate(idx):
                sub = Problem(fm, loss_, prob.X, prob.Y, prob.X[i:i + 1], prob.Y[i:i + 1])
                res = _run(sub, cfg, baseline_params=thetas[i], method="iif")
                values[j] = res.scores[0, i]
    config = cfg.to_dict()
    config.update(task="self_influence", lr=lr, fast=bool(fast and cfg.K == 1),
                  loss=loss_.name, n_params=fm.n_params)
    return SelfInfluenceResult(self_influence=values, mislabel_score=-values, delta=delta,
                               indices=idx, config=config)


def _self_influence_k1(prob, cfg, thetas, idx, mask):
    """``I[i, i] = −u_i (C + λ_d I)⁻¹ ψ_iᵀ`` at θ* for every i in one solve."""
    import torch

    fm, loss = prob.fm, prob.loss
    # ρ_i(t_0): sample i's own baseline target prediction(f(x_i; θ'_i)), masked as the path.
    with torch.no_grad():
        Ybar = prob.Y.clone()
        for i in idx:
            Ybar[i] = loss.prediction(fm.forward(thetas[int(i)], prob.X[i:i + 1]))[0]
    rho1 = path_targets(prob.Y, Ybar, 1.0, mask=mask)
    rho0 = path_targets(prob.Y, Ybar, 0.0, mask=mask)
    common = dict(proj_dim=cfg.proj_dim, seed=cfg.seed, kind=cfg.kind,
                  chunk_size=cfg.chunk_size, backend=cfg.backend, step=1)
    Phi, Psi = train_features(fm, loss, fm.theta_star, prob.X, rho0, rho1, **common)
    # With K = 1 the test gradient of sample i at θ* and target y_i is its own u_i.
    Gamma = Phi[idx]
    if cfg.proj_dim is None:
        C = dense_curvature(fm, loss, fm.theta_star, prob.X, rho1, kind=cfg.curvature,
                            U=Phi, chunk_size=cfg.chunk_size)
        lam_d = resolve_damping(cfg.damping, np.trace(C), C.shape[0],
                                relative=default_relative_damping("iif", projected=False))
        S, _ = dense_scores(C, Psi[idx], Gamma, damping=lam_d, step=1)
    else:
        from iif_ref.kernels import projected_scores

        lam_d = resolve_damping(cfg.damping, float(np.sum(np.square(Phi, dtype=np.float64))),
                                cfg.proj_dim,
                                relative=default_relative_damping("iif", projected=True))
        options = {} if cfg.backend is None else {"backend": cfg.backend}
        # The Fisher uses every training sample; only the diagonal pairs are kept.
        S = projected_scores(Phi, Psi[idx], Gamma, damping=lam_d, **options)
    return np.diag(S).copy()


@dataclass
class ProponentsOpponents:
    """Top proponents and opponents of each test point (Sec. 3.2).

    Attributes
    ----------
    proponents : ndarray of int, shape (n_test, n_top)
        Most negative scores on the path from the *unlearned* baseline (test loss falls
        along it).
    opponents : ndarray of int, shape (n_test, n_top)
        Most positive scores on the path from the *opposite* baseline (lower test loss;
        the loss rises along the path).
    unlearned, learned : AttributionResult
        The two runs.
    """

    proponents: np.ndarray
    opponents: np.ndarray
    unlearned: object
    learned: object


@torch_owns_the_cores
def proponents_opponents(model, loss, X_train, y_train, X_test, y_test, *, n_top=8,
                         **options):
    """Proponents and opponents with the two opposite baselines of Sec. 3.2.

    Parameters
    ----------
    model, loss, X_train, y_train, X_test, y_test
        As in :func:`~iif_ref.neural.integrated_influence`.
    n_top : int
    **options
        :class:`IIFConfig` fields shared by both runs (``unlearn_sign`` is set here).

    Returns
    -------
    ProponentsOpponents
    """
    n_top = check_positive_int(n_top, "n_top")
    if "unlearn_sign" in options:
        raise TypeError("proponents_opponents sets unlearn_sign itself")
    up = integrated_influence(model, loss, X_train, y_train, X_test, y_test,
                              unlearn_sign=1, **options)
    down = integrated_influence(model, loss, X_train, y_train, X_test, y_test,
                                unlearn_sign=-1, **options)
    n_top = min(n_top, up.scores.shape[1])
    return ProponentsOpponents(proponents=up.top(n_top, kind="proponents"),
                               opponents=down.top(n_top, kind="opponents"),
                               unlearned=up, learned=down)
