"""The single-process engine of Algorithm 1: score each planned path step and sum.

:func:`run` takes a validated :class:`~iif_ref.neural.plan.Problem` and a resolved
:class:`~iif_ref.neural.config.IIFConfig`, walks the steps that
:func:`~iif_ref.neural.plan.plan_problem` hands out (baselines, targets, path models)
and adds each step's term ``−G_k F_k⁻¹ (J Δy)_kᵀ`` (Eq. 10; at a node of a general
quadrature rule ``J Δy`` carries the node's weight, :mod:`iif_ref.neural.quadrature`):

* projected: ``Φ, Ψ, Γ = (U, D, G)·A`` (one ``A`` for the whole run,
  :func:`~iif_ref.neural.features.make_projector`), then the Fisher ``ΦᵀΦ`` through the
  package's one step solve :func:`iif_ref.kernels.solve_step` (Eq. 17, 31);
* unprojected Gauss–Newton or empirical Fisher: the exact damped solve in sample space
  (:mod:`iif_ref.neural.sample_space`), no ``n_params × n_params`` matrix;
* unprojected Hessian: the dense float64 curvature of :mod:`iif_ref.neural.curvature`,
  through the same step solve.

The public calls (:func:`~iif_ref.neural.attribution.integrated_influence` and the
methods of :mod:`iif_ref.neural.methods`) both sit on this module, which imports
neither of them.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from iif_ref._defaults import default_relative_damping
from iif_ref.errors import NotPositiveDefiniteError
from iif_ref.neural.curvature import (dense_curvature, dense_scores, projected_gram,
                                      resolve_damping)
from iif_ref.neural.features import make_projector, step_features
from iif_ref.neural.plan import plan_problem
from iif_ref.neural.result import AttributionResult, warn_incomplete
from iif_ref.neural.sample_space import CURVATURES, build_solve

#: Steps slower than this print a line of progress where no progress bar is shown.
SLOW_STEP_SECONDS = 10.0

__all__ = ["run", "path_result"]

#: Unprojected curvatures solved in sample space; the others (and all of them, when a
#: test empties this tuple to run the slow twin) take the dense parameter-space solve.
SAMPLE_SPACE_CURVATURES = CURVATURES


def _step_scores(plan, step, projector=None):
    """The step-k term ``−G_k F_k⁻¹ (J Δy)_kᵀ`` for the group's test rows;
    (scores, cond, damping, sample-space diagnostics or None). ``projector`` (from
    :func:`~iif_ref.neural.features.make_projector`) is shared by the steps of a run, so
    ``A`` is generated once."""
    prob, cfg, k, theta = plan.problem, plan.config, step.k, step.theta
    fm, loss = prob.fm, prob.loss
    rows = step.group.rows
    relative = default_relative_damping(plan.run_config["method"],
                                        projected=cfg.proj_dim is not None)
    if cfg.proj_dim is None and cfg.curvature in SAMPLE_SPACE_CURVATURES:
        solve = build_solve(fm, loss, theta, prob.X, step.rho_k, prob.X_test[rows],
                            prob.Y_test[rows], rho_from=step.rho_prev,
                            curvature=cfg.curvature, chunk_size=cfg.chunk_size)
        try:
            scores, cond, lam_d = solve.scores(cfg.damping, relative=relative)
        except NotPositiveDefiniteError as exc:
            raise NotPositiveDefiniteError(f"path step k={k}: {exc}", slices=(k,),
                                           damping=exc.damping,
                                           suggested_damping=exc.suggested_damping) from exc
        return scores, cond, lam_d, solve.summary()
    # Training and test rows of the step in one projection pass (A generated once);
    # equal to train_features + plan.test_features up to float rounding.
    Phi, Psi, Gamma = step_features(fm, loss, theta, prob.X, step.rho_prev, step.rho_k,
                                    prob.X_test[rows], prob.Y_test[rows], step=k,
                                    projector=projector, psi_as_scale=True,
                                    **plan.feature_options)
    # Ψ = diag(α) Φ when every row fused: −Γ F⁻¹ Ψᵀ = (−Γ F⁻¹ Φᵀ) diag(α), and the
    # (n, P) Ψ is never formed.
    Psi, alpha = (Phi, Psi) if Psi.ndim == 1 else (Psi, None)
    if cfg.proj_dim is None:
        C = dense_curvature(fm, loss, theta, prob.X, step.rho_k, kind=cfg.curvature, U=Phi,
                            chunk_size=cfg.chunk_size)
    else:
        C = projected_gram(Phi)     # Eq. (31), float64
    # One solve for both: its Cholesky factor also gives the condition estimate.
    lam_d = resolve_damping(cfg.damping, np.trace(C), C.shape[0], relative=relative)
    scores, cond = dense_scores(C, Psi, Gamma, damping=lam_d, step=k)
    if alpha is not None:
        scores *= alpha[None, :]
    return scores, cond, lam_d, None


def run(prob, cfg, *, baseline_params=None, callback=None, method="iif"):
    """Algorithm 1 on a prepared problem: the summed step terms of Eq. (10) as a result.

    ``prob`` from :func:`~iif_ref.neural.plan.prepare_problem`, ``cfg`` a resolved
    :class:`~iif_ref.neural.config.IIFConfig`; ``method`` labels the result. Steps found
    in ``cfg.cache_dir`` are loaded, new ones saved after they finish (``callback``).
    """
    plan = plan_problem(prob, cfg, baseline_params=baseline_params, method=method)
    scores = np.zeros((prob.n_test, prob.n_train))
    loss_prime = np.zeros(prob.n_test)
    # Σ_i of (fine − embedded coarse) rule terms: the quadrature error estimate.
    coarse_gap = np.zeros(prob.n_test)
    diag = {"condition": [], "damping": [], "unlearning_trajectory": [],
            "path_trajectory": [], "path_loss": [], "node_sums": []}
    from tqdm.auto import tqdm

    # One projection for every step and test group of the run: A is generated once.
    projector = make_projector(prob.fm, cfg.proj_dim, seed=cfg.seed, kind=cfg.kind,
                               backend=cfg.backend)
    bar = tqdm(total=len(plan.groups) * cfg.K, desc=f"{method} steps",
               disable=None if cfg.progress else True)  # None: off unless a terminal
    # Without a terminal (a log file) the bar is off; a slow step still gets a line.
    log_slow_steps = cfg.progress and bar.disable
    n_done, t_step = 0, time.perf_counter()
    for group in plan.groups:
        diag["unlearning_trajectory"].append(group.unlearning_trajectory)
        loss_prime[group.rows] = group.loss_prime
        for step in plan.steps(group):
            if step.path_trajectory is not None:
                diag["path_trajectory"].append(step.path_trajectory)
            hit = step.cached
            if hit is not None:
                term, cond, lam_d = hit["scores"], float(hit["cond"]), float(hit["damping"])
            else:
                term, cond, lam_d, sample_space = _step_scores(plan, step, projector)
                if sample_space is not None:
                    diag.setdefault("sample_space", []).append(sample_space)
                plan.cache.save(step.name, scores=term,
                                theta=prob.fm.flatten(step.theta).numpy(),
                                cond=np.float64(cond), damping=np.float64(lam_d))
            scores[group.rows] += term
            node_sum = term.sum(axis=1)
            coarse_gap[group.rows] += (1.0 - step.coarse_weight / step.weight) * node_sum
            diag["node_sums"].append({"group": group.index, "k": step.k, "t": step.t,
                                      "sum": node_sum})
            diag["path_loss"].append(step.path_loss)
            diag["condition"].append(cond)
            diag["damping"].append(lam_d)
            bar.update(1)
            n_done += 1
            # Timed from the previous step's end: its path model (built by plan.steps) too.
            seconds, t_step = time.perf_counter() - t_step, time.perf_counter()
            if log_slow_steps and seconds > SLOW_STEP_SECONDS:
                print(f"[iif_ref] {method} step {n_done}/{bar.total} (t = {step.t:.3g}) in "
                      f"{seconds:.0f}s", file=sys.stderr, flush=True)
            if callback is not None:
                callback(step.name)
    bar.close()
    diag["loss_star"], diag["loss_prime"] = plan.loss_star, loss_prime
    diag.update(plan.completeness_diagnostics())
    diag["cached_steps"] = list(plan.cache.loaded)
    config = plan.run_config
    config["damping_used"] = list(diag["damping"])
    config["damping_relative"] = default_relative_damping(
        method, projected=cfg.proj_dim is not None)
    return path_result(plan, scores, loss_prime, coarse_gap, config, diag, method)


def path_result(plan, scores, loss_prime, coarse_gap, config, diag, method):
    """The result of a walked plan, with the completeness fields of the result schema
    (:class:`~iif_ref.neural.result.AttributionResult`).

    For ``method="iif"``: ``delta`` = Δ of the Eq. 12 baseline, ``delta_path`` the loss
    change of the path models actually used, ``residual = Σ_i I − delta_path``,
    ``quadrature_error = |coarse_gap|`` (None when ``coarse_gap`` is: an engine that
    does not keep the steps apart); a ``RuntimeWarning`` names the test points whose
    ``|residual|`` exceeds ``|delta_path|``. Other methods run on this engine (the
    projected and dense influence function) are derivatives at θ*, not path integrals:
    those fields are None.
    """
    if method != "iif":
        return AttributionResult(scores=scores, delta=None, delta_path=None, residual=None,
                                 quadrature_error=None, config=config, diagnostics=diag,
                                 method=method)
    delta, delta_path = plan.loss_star - loss_prime, plan.path_delta()
    residual = scores.sum(axis=1) - delta_path
    quadrature_error = None if coarse_gap is None else np.abs(coarse_gap)
    # Frames: warn_incomplete, path_result, run, integrated_influence, its thread-pool
    # wrapper, the caller.
    warn_incomplete(residual, delta_path, stacklevel=6)
    return AttributionResult(scores=scores, delta=delta, delta_path=delta_path,
                             residual=residual, quadrature_error=quadrature_error,
                             config=config, diagnostics=diag, method=method)
