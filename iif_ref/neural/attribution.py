"""Algorithm 1: Integrated Influence of training samples on test losses of a torch model.

Data flow (docs/algorithm1.md maps each line to the paper)::

    θ*, loss, D_train, test points
      → baseline θ' by unlearning (Eq. 12), targets ȳ = prediction(f(x; θ')) (Eq. 13)
      → for k = K..1: targets ρ(t_k) (Eq. 15), path model θ_k (Eq. 16, θ_K = θ*)
          → per-sample u_i, J_iΔy, test gradients G at θ_k (chunks, torch.func,
            test rows projected with the last training chunk)
          → projected: Φ, Ψ, Γ = (U, D, G)·A → kernels.solve_step with ΦᵀΦ (Eq. 17, 31)
            unprojected Gauss–Newton / Fisher: −G (C_k + λ_d I)⁻¹ Dᵀ through the
            sample-space Gram (neural.sample_space); Hessian: dense C_k, float64
          → I += step term
      → scores (n_test, n_train); Δ of the baseline (Eq. 1, 12) and the path's own
        loss change L(θ_K) − L(θ_0) measured; residual Σ_i I − (L(θ_K) − L(θ_0))
"""
from __future__ import annotations

from iif_ref._threads import torch_owns_the_cores
from iif_ref._validation import check_options
from iif_ref.neural.config import IIFConfig
from iif_ref.neural.engine import run as _run
from iif_ref.neural.functional import eval_mode
from iif_ref.neural.methods import influence_function, tracin, trak
from iif_ref.neural.plan import Problem, prepare_problem

__all__ = ["integrated_influence", "attribute", "prepare_problem", "Problem"]


@torch_owns_the_cores
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
        ``scores`` (n_test, n_train) float64, ``delta`` (Δ of the Eq. 12 baseline),
        ``path_delta`` (the loss change the computed path integrates), ``residual``
        (``Σ_i I − path_delta``), ``config``, ``diagnostics``.

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
    cfg = IIFConfig.resolve(config, options)
    with eval_mode(model):
        prob = prepare_problem(model, loss, X_train, y_train, X_test, y_test, dtype=cfg.dtype)
        return _run(prob, cfg, baseline_params=baseline_params, callback=callback)


_METHODS = ("iif", "if", "tracin", "trak")


@torch_owns_the_cores
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
    fn = {"if": influence_function, "tracin": tracin, "trak": trak}[method]
    check_options(fn, options, what=f"method={method!r}")
    return fn(model, loss, X_train, y_train, X_test, y_test, seed=seed, **options)
