"""The influence function, TracIn and TRAK on the same machinery as Algorithm 1.

Each is the IIF pipeline with one setting changed (docs/algorithm1.md, "special cases"):

* **IF** = IIF with ``K = 1``, baseline targets ``prediction(f(x; θ*))`` (θ' = θ*),
  unmasked path, curvature the Hessian of the summed training loss (Lemma 2.5,
  Corollary 2.6): ``IF[t, i] = −∇L_test(θ*) H⁻¹ ∇l_i(θ*)``. Solvers: the exact
  Gauss–Newton matrix or empirical Fisher in sample space (the default, within a memory
  budget), the projected Fisher (Eq. 17, 31), the dense exact Hessian, or conjugate
  gradients on Hessian-vector products.
* **TracIn** (TracInCP) drops the curvature and the path: ``−Σ_c η_c ∇l_test(θ_c)·∇l_i(θ_c)``
  over checkpoints θ_c with step sizes η_c. Sign: positive pushes the test loss up
  (the negative of TracIn's "proponent-positive" convention).
* **TRAK** replaces the loss gradient by the gradient of the output function
  ``m = log(p_y / (1 − p_y))``, projects, solves with ``Φᵀ Φ`` of those features, and
  reweights training sample ``i`` by ``Q_i = 1 − p_{y_i}``; the checkpoint ensemble is
  averaged: ``−mean_c Γ_c (Φ_cᵀΦ_c + λ_d I)⁻¹ Φ_cᵀ diag(Q_c)``. Sign: positive pushes
  the test loss up (the negative of TRAK's τ). With the mask and ``K = 1`` IIF gives the
  same ``1 − p`` reweighting of the loss gradient.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from iif_ref._threads import torch_owns_the_cores
from iif_ref._validation import check_nonnegative_real, check_positive_int, check_positive_real
from iif_ref.errors import NotPositiveDefiniteError
from iif_ref.neural.baseline import per_sample_losses
from iif_ref.neural.config import IIFConfig
from iif_ref._defaults import DEFAULT_PROJECTION, default_relative_damping
from iif_ref.neural.curvature import dense_scores, projected_gram, resolve_damping
from iif_ref.neural.engine import run
from iif_ref.neural.features import DEFAULT_PROJ_DIM, gradient_features, make_projector
from iif_ref.neural.functional import chunks, eval_mode
from iif_ref.neural.losses import trak_margin
from iif_ref.neural.plan import prepare_problem
from iif_ref.neural.result import AttributionResult
from iif_ref.neural.sample_space import DEFAULT_MEMORY_BUDGET, MemoryBudgetError, build_solve

__all__ = ["influence_function", "tracin", "trak", "trak_margin"]


_SOLVERS = ("auto", "gauss_newton", "fisher_exact", "projected", "exact", "cg")


@torch_owns_the_cores
def influence_function(model, loss, X_train, y_train, X_test, y_test, *, solver="auto",
                       damping="auto", proj_dim=DEFAULT_PROJ_DIM, seed=0,
                       kind=DEFAULT_PROJECTION["if"], backend=None,
                       chunk_size=256, dtype=None, cg_tol=1e-10, cg_max_iter=None,
                       memory_budget=DEFAULT_MEMORY_BUDGET, progress=False, cache_dir=None):
    """Influence function ``IF[t, i] = −∇L_test(θ*) (C + λ_d I)⁻¹ ∇l_i(θ*)``.

    Parameters
    ----------
    model, loss, X_train, y_train, X_test, y_test
        As in :func:`~iif_ref.neural.integrated_influence`.
    solver : {"auto", "gauss_newton", "fisher_exact", "projected", "exact", "cg"}
        The curvature ``C`` and how it is inverted:

        * ``"gauss_newton"``: the exact Gauss–Newton matrix ``Σ J_iᵀ∇²_f l J_i`` of the
          summed training loss, solved in sample space in float64
          (:mod:`iif_ref.neural.sample_space`; no ``n_params²`` matrix);
        * ``"fisher_exact"``: the exact (unprojected) empirical Fisher ``Σ u_i u_iᵀ``,
          the same way;
        * ``"projected"``: the projected empirical Fisher ``ΦᵀΦ`` (Eq. 17, 31);
        * ``"exact"``: dense Hessian of the summed training loss (small models);
        * ``"cg"``: conjugate gradients with Hessian-vector products (no ``M × M`` matrix);
        * ``"auto"`` (default): ``"gauss_newton"`` when it fits ``memory_budget``, else
          ``"projected"``; ``config["solver"]`` records which ran.
    damping : float or "auto"
        λ_d (absolute), or the package's relative rule ``"auto"``
        (:func:`~iif_ref._defaults.absolute_damping` on ``tr(C)`` and the dimension of
        ``C``, with the measured ``r`` of :data:`~iif_ref._defaults.DEFAULT_RELATIVE_DAMPING`:
        10 for the exact solvers, 1 for the projected Fisher). ``solver="cg"`` needs a
        number.
    proj_dim : int
        P for ``solver="projected"`` (validated whatever the solver; above the number
        of parameters, a :class:`~iif_ref.errors.ProjectionDimensionWarning`).
    memory_budget : int or "auto"
        Bytes allowed for the sample-space solve (default ``"auto"``: two thirds of the
        memory available when the call starts,
        :func:`~iif_ref.neural.sample_space.resolve_memory_budget`). A stack of Linear
        layers forms the Gram from layer factors (about ``8 (n_train · r)²`` bytes with
        ``r = n_out − 1`` rows per sample for cross-entropy), any other model from the
        ``n_train · r × n_params`` rows of ``B``. Over the budget, ``"gauss_newton"`` and
        ``"fisher_exact"`` raise :class:`~iif_ref.neural.sample_space.MemoryBudgetError`
        naming the sizes, and ``"auto"`` falls back to ``"projected"`` with a
        ``RuntimeWarning``; ``config["solver_fallback"]`` then gives the reason.
    seed, kind, backend, chunk_size, dtype, progress, cache_dir
        As in :class:`IIFConfig`.
    cg_tol : float
        Relative residual ``‖(H + λ_d I)v − g‖ ≤ cg_tol ‖g‖`` per test point.
    cg_max_iter : int or None
        Default ``10 · n_params`` (rounding slows CG beyond the exact-arithmetic bound
        ``n_params``). Not reaching ``cg_tol`` is a warning, and the achieved residual is
        in ``diagnostics["cg_relative_residual"]``.

    Returns
    -------
    AttributionResult
        ``delta``, ``delta_path``, ``residual`` and ``quadrature_error`` are None: the
        influence function is a derivative at θ*, with no baseline and no path (the
        result schema, :class:`~iif_ref.neural.result.AttributionResult`).

    Notes
    -----
    Implements the Koh–Liang upweighting influence in the sign of IIF with the summed
    loss (docs/conventions.md); the mean-loss IF is ``n_train`` times this. Through IIF:
    Eq. (10) with ``K = 1``, ``ȳ = prediction(f(x; θ*))``, unmasked (Lemma 2.5).
    """
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
    # Checked whatever the solver, as every method does: a bad value is a bad call even
    # where the sample-space solver would not use it.
    proj_dim = check_positive_int(proj_dim, "proj_dim", allow_none=True)
    fallback = None
    if solver in ("auto", "gauss_newton", "fisher_exact"):
        try:
            return _influence_sample_space(
                model, loss, (X_train, y_train, X_test, y_test), solver=solver,
                damping=damping, dtype=dtype, chunk_size=chunk_size,
                memory_budget=memory_budget)
        except MemoryBudgetError as exc:
            if solver != "auto":
                raise
            fallback, solver = str(exc), "projected"
            warnings.warn(f"influence_function(solver='auto') falls back to the projected "
                          f"Fisher (proj_dim={proj_dim}), not the exact Gauss-Newton "
                          f"influence function: {exc}", RuntimeWarning, stacklevel=3)
    if solver in ("exact", "projected"):
        cfg = IIFConfig(K=1, baseline="prediction", mask_path=False,
                        curvature="hessian" if solver == "exact" else "fisher",
                        proj_dim=None if solver == "exact" else proj_dim, damping=damping,
                        seed=seed, kind=kind, backend=backend, chunk_size=chunk_size,
                        dtype=dtype, progress=progress, cache_dir=cache_dir)
        with eval_mode(model):
            prob = prepare_problem(model, loss, X_train, y_train, X_test, y_test, dtype=dtype)
            result = run(prob, cfg, method="if")
        result.config["solver"] = solver
        if fallback is not None:
            result.config["solver_requested"] = "auto"
            result.config["solver_fallback"] = fallback
            result.diagnostics["solver_fallback"] = fallback
        return result
    if isinstance(damping, str):
        raise ValueError("solver='cg' needs an absolute damping (a float >= 0); 'auto' is "
                         "relative to a curvature matrix that CG never forms")
    cfg = IIFConfig(K=1, baseline="prediction", proj_dim=None, curvature="hessian",
                    damping=damping, seed=seed, chunk_size=chunk_size, dtype=dtype,
                    progress=progress)
    cg_tol = check_positive_real(cg_tol, "cg_tol")
    with eval_mode(model):
        prob = prepare_problem(model, loss, X_train, y_train, X_test, y_test, dtype=dtype)
        return _influence_cg(prob, cfg, cg_tol, cg_max_iter)


def _influence_sample_space(model, loss, data, *, solver, damping, dtype, chunk_size,
                            memory_budget):
    """IF with the exact Gauss–Newton (``"auto"``, ``"gauss_newton"``) or empirical
    Fisher (``"fisher_exact"``) curvature, solved in sample space."""
    if isinstance(damping, str) and damping != "auto":
        raise ValueError(f"damping must be a number >= 0 or 'auto', got {damping!r}")
    curvature = "fisher" if solver == "fisher_exact" else "gauss_newton"
    with eval_mode(model):
        prob = prepare_problem(model, loss, *data, dtype=dtype)
        solve = build_solve(prob.fm, prob.loss, prob.fm.theta_star, prob.X, prob.Y,
                            prob.X_test, prob.Y_test, curvature=curvature,
                            memory_budget=memory_budget, chunk_size=chunk_size)
    relative = default_relative_damping("if", projected=False)
    scores, cond, lam_d = solve.scores(damping, relative=relative)
    config = dict(method="if", solver="fisher_exact" if curvature == "fisher" else
                  "gauss_newton", loss=prob.loss.name, curvature=curvature, proj_dim=None,
                  damping=damping, damping_used=[lam_d], damping_relative=relative,
                  memory_budget=solve.memory_budget, gram_from=solve.gram_from,
                  chunk_size=chunk_size, n_params=prob.fm.n_params,
                  torch_dtype=str(prob.fm.dtype).replace("torch.", ""),
                  solve_dtype="float64")
    if solver == "auto":
        config["solver_requested"] = "auto"
    return AttributionResult(scores=scores, delta=None, residual=None,
                             config=config, method="if",
                             diagnostics={"condition": [cond], "damping": [lam_d],
                                          "sample_space": [solve.summary()]})


def _influence_cg(prob, cfg, tol, max_iter):
    fm, loss = prob.fm, prob.loss
    M = fm.n_params
    max_iter = 10 * M if max_iter is None else check_positive_int(max_iter, "cg_max_iter")
    lam_d = cfg.damping
    theta = fm.flatten(fm.theta_star).detach()

    def train_loss(vec):
        return per_sample_losses(fm, loss, fm.unflatten(vec), prob.X, prob.Y).sum()

    grad_fn = grad(train_loss)

    def hvp(V):  # (T, M) -> (T, M): rows of (H + λ_d I) V
        return vmap(lambda v: jvp(grad_fn, (theta,), (v,))[1])(V) + lam_d * V

    common = dict(proj_dim=None, chunk_size=cfg.chunk_size)
    G = torch.as_tensor(gradient_features(fm, loss, fm.theta_star, prob.X_test, prob.Y_test,
                                          what="test-loss gradient", **common))
    # Batched conjugate gradients, one independent system per test point.
    Xs = torch.zeros_like(G)
    R = G.clone()
    Pd = R.clone()
    rr = (R * R).sum(1)
    bnorm = torch.sqrt(rr)
    iters = 0
    while iters < max_iter and bool((torch.sqrt(rr) > tol * bnorm).any()):
        HP = hvp(Pd)
        curv = (Pd * HP).sum(1)
        active = torch.sqrt(rr) > tol * bnorm
        if bool((curv[active] <= 0).any()):
            bad = torch.nonzero(active & (curv <= 0)).reshape(-1).tolist()
            raise NotPositiveDefiniteError(
                f"conjugate gradients met non-positive curvature (H + {lam_d:.3g} I is not "
                f"positive definite) for test point(s) {bad}; raise damping",
                slices=bad, damping=lam_d)
        alpha = torch.where(active, rr / torch.where(active, curv, 1.0), 0.0)
        Xs = Xs + alpha[:, None] * Pd
        R = R - alpha[:, None] * HP
        rr_new = (R * R).sum(1)
        beta = torch.where(active, rr_new / torch.where(active, rr, 1.0), 0.0)
        Pd = R + beta[:, None] * Pd
        rr = rr_new
        iters += 1
    rel = (torch.sqrt(rr) / bnorm).max().item()
    if not rel <= tol:
        warnings.warn(f"conjugate gradients stopped after {iters} iterations at relative "
                      f"residual {rel:.3g} > cg_tol={tol:.3g}; raise cg_max_iter or damping",
                      RuntimeWarning, stacklevel=3)
    scores = np.zeros((prob.n_test, prob.n_train))
    Xs64 = Xs.double().numpy()
    for s, e in chunks(prob.n_train, cfg.chunk_size):
        U = gradient_features(fm, loss, fm.theta_star, prob.X[s:e], prob.Y[s:e],
                              what="per-sample gradient", **common)
        scores[:, s:e] = -(Xs64 @ U.astype(np.float64).T)
    config = cfg.to_dict()
    config.update(method="if", solver="cg", loss=loss.name, n_params=M, cg_tol=tol,
                  cg_iterations=iters, damping_used=[lam_d])
    return AttributionResult(scores=scores, delta=None, residual=None,
                             config=config, diagnostics={"cg_relative_residual": rel,
                                                         "cg_iterations": iters},
                             method="if")


def _checkpoint_list(fm, checkpoints):
    if checkpoints is None:
        return [fm.theta_star]
    out = []
    for c, ck in enumerate(checkpoints):
        missing = [n for n in fm.names if n not in ck]
        if missing:
            raise ValueError(f"checkpoints[{c}] lacks trainable parameter(s) {missing}")
        out.append({n: torch.as_tensor(ck[n], dtype=fm.dtype) for n in fm.names})
    if not out:
        raise ValueError("checkpoints is empty")
    return out


@torch_owns_the_cores
def tracin(model, loss, X_train, y_train, X_test, y_test, *, checkpoints=None, lrs=None,
           proj_dim=None, seed=0, kind=DEFAULT_PROJECTION["tracin"], backend=None,
           chunk_size=256,
           dtype=None, progress=False):
    """TracInCP: ``−Σ_c η_c ∇l(ẑ_t; θ_c) · ∇l(z_i; θ_c)``, shape ``(n_test, n_train)``.

    Parameters
    ----------
    checkpoints : list of dict, optional
        Parameters θ_c by name (a ``state_dict`` works); default ``[θ*]``.
    lrs : list of float, optional
        η_c per checkpoint; default 1 each.
    proj_dim : int or None
        Project gradients first (a Johnson–Lindenstrauss estimate of the dot products);
        None: exact dot products.
    seed, kind, backend, chunk_size, dtype, progress
        As in :class:`IIFConfig`.

    Returns
    -------
    AttributionResult
        ``delta``, ``delta_path``, ``residual`` and ``quadrature_error`` are None
        (TracIn has no baseline and no path); ``diagnostics["checkpoint_sums"]`` holds
        ``Σ_i`` of each checkpoint's term per test point.

    Notes
    -----
    IIF with the curvature replaced by the identity, ``K = 1`` and ``ȳ = f(x; θ*)`` at
    each checkpoint is TracIn's single-checkpoint term; our sign is the negative of
    Pruthi et al.'s so that ``> 0`` means "pushes the test loss up".
    """
    with eval_mode(model):
        prob = prepare_problem(model, loss, X_train, y_train, X_test, y_test, dtype=dtype)
        fm = prob.fm
        cks = _checkpoint_list(fm, checkpoints)
        lrs = [1.0] * len(cks) if lrs is None else [check_positive_real(v, "lrs")
                                                    for v in lrs]
        if len(lrs) != len(cks):
            raise ValueError(f"lrs has {len(lrs)} entries for {len(cks)} checkpoints")
        common = dict(proj_dim=proj_dim, seed=seed, kind=kind, chunk_size=chunk_size,
                      backend=backend)
        scores = np.zeros((prob.n_test, prob.n_train))
        checkpoint_sums = []
        for c, (theta, eta) in enumerate(zip(cks, lrs)):
            before = scores.sum(axis=1)
            Gm = gradient_features(fm, prob.loss, theta, prob.X_test, prob.Y_test, step=c,
                                   what="test-loss gradient", **common).astype(np.float64)
            for s, e in chunks(prob.n_train, chunk_size):
                U = gradient_features(fm, prob.loss, theta, prob.X[s:e], prob.Y[s:e],
                                      step=c, what="per-sample gradient", **common)
                scores[:, s:e] -= eta * (Gm @ U.astype(np.float64).T)
            checkpoint_sums.append(scores.sum(axis=1) - before)
    config = dict(method="tracin", loss=prob.loss.name, lrs=lrs, n_checkpoints=len(cks),
                  proj_dim=proj_dim, seed=seed, kind=kind, backend=backend,
                  n_params=fm.n_params, torch_dtype=str(fm.dtype).replace("torch.", ""))
    return AttributionResult(scores=scores, delta=None, residual=None, config=config,
                             diagnostics={"checkpoint_sums": checkpoint_sums},
                             method="tracin")


@torch_owns_the_cores
def trak(model, loss, X_train, y_train, X_test, y_test, *, checkpoints=None,
         proj_dim=DEFAULT_PROJ_DIM,
         damping="auto", seed=0, kind=DEFAULT_PROJECTION["trak"], backend=None,
         chunk_size=256,
         dtype=None, progress=False):
    """TRAK scores in IIF's sign: ``−mean_c Γ_c (Φ_cᵀΦ_c + λ_d I)⁻¹ Φ_cᵀ diag(1 − p_c)``.

    Parameters
    ----------
    loss : "cross_entropy"
        TRAK's output function is defined for classification; other losses are refused.
    checkpoints : list of dict, optional
        Independently trained models' parameters (TRAK's ensemble); default ``[θ*]``.
    proj_dim : int or None
        P (TRAK always projects; None gives the exact unprojected twin for small models).
    damping : float or "auto"
        λ_d; "auto" is ``r · tr(ΦᵀΦ)/P`` with TRAK's measured ``r``
        (:data:`iif_ref._defaults.DEFAULT_RELATIVE_DAMPING`).
    seed, kind, backend, chunk_size, dtype, progress
        As in :class:`IIFConfig`. Every checkpoint uses the same projection ``A``.

    Returns
    -------
    AttributionResult
        ``delta``, ``delta_path``, ``residual`` and ``quadrature_error`` are None (no
        baseline, no path); ``diagnostics`` has ``condition`` and ``damping`` per
        checkpoint.

    Notes
    -----
    Features are ``φ_i = ∇θ m(x_i; θ_c) A`` with ``m = log(p_y/(1 − p_y))``; the
    training-side weights are ``Q_i = 1 − p_{y_i}(θ_c)``; scores are averaged over
    checkpoints (Park et al. 2023, without their optional soft-thresholding). TRAK's
    ``τ`` is positive for helpful samples, so ours is ``−τ``.
    """
    from iif_ref.neural.losses import resolve_loss

    if resolve_loss(loss).name != "cross_entropy":
        raise ValueError("TRAK is defined for classification: loss must be 'cross_entropy' "
                         f"(got {getattr(loss, '__name__', loss)!r})")
    if not (isinstance(damping, str) and damping == "auto"):
        damping = check_nonnegative_real(damping, "damping")
    with eval_mode(model):
        prob = prepare_problem(model, loss, X_train, y_train, X_test, y_test, dtype=dtype)
        fm = prob.fm
        cks = _checkpoint_list(fm, checkpoints)
        scores = np.zeros((prob.n_test, prob.n_train))
        conds, lams = [], []
        relative = default_relative_damping("trak", projected=proj_dim is not None)
        # Every checkpoint uses the same A: generated once for the call.
        projector = make_projector(fm, proj_dim, seed=seed, kind=kind, backend=backend)
        for c, theta in enumerate(cks):
            common = dict(proj_dim=proj_dim, seed=seed, kind=kind, chunk_size=chunk_size,
                          backend=backend, step=c, projector=projector)
            Phi = gradient_features(fm, trak_margin, theta, prob.X, prob.Y,
                                    what="margin gradient", **common)
            Gamma = gradient_features(fm, trak_margin, theta, prob.X_test, prob.Y_test,
                                      what="test margin gradient", **common)
            with torch.no_grad():
                p = torch.exp(per_sample_losses(fm, prob.loss, theta, prob.X, prob.Y) * -1.0)
            Q = (1.0 - p).double().numpy()
            # Projected or not, the Gram of the features and the package's one step solve.
            # Ψ = diag(1 − p) Φ: −Γ F⁻¹ Ψᵀ = (−Γ F⁻¹ Φᵀ) diag(1 − p), Ψ never formed.
            C = projected_gram(Phi)
            lam_d = resolve_damping(damping, np.trace(C), C.shape[0], relative=relative)
            term, cond = dense_scores(C, Phi, Gamma, damping=lam_d, step=c)
            term *= Q[None, :]
            scores += term / len(cks)
            conds.append(cond)
            lams.append(lam_d)
    config = dict(method="trak", loss="cross_entropy", n_checkpoints=len(cks),
                  proj_dim=proj_dim, seed=seed, kind=kind, backend=backend,
                  damping=damping, damping_used=lams, damping_relative=relative,
                  n_params=fm.n_params,
                  torch_dtype=str(fm.dtype).replace("torch.", ""))
    return AttributionResult(scores=scores, delta=None, residual=None, config=config,
                             diagnostics={"condition": conds, "damping": lams},
                             method="trak")
