"""iif_ref's own attributors in the conformance calling convention ``fn(problem) -> scores``.

Each function takes an :class:`~iif_ref.testing.AttributionProblem` and returns scores of
shape ``(n_test, n_train)`` with the sign and summed-loss normalisation of
``docs/conventions.md`` (the :class:`~iif_ref.testing.Attributor` defaults). The
``linear_*`` functions are the closed forms of :mod:`iif_ref.linear`; the ``neural_*``
functions run :func:`iif_ref.attribute` on the problem's bias-free ``torch.nn.Linear``
in float64 with exact curvature, so that the suite can hold them to the closed forms.
Nothing here is imported by ``iif_ref.testing``; the ``neural_*`` functions import torch
when called.
"""
import iif_ref
from iif_ref import linear


def linear_if(p):
    """:func:`iif_ref.linear.influence_function` on problem ``p``."""
    return linear.influence_function(p.X, p.y, p.X_test, p.y_test)


def linear_tracin(p):
    """:func:`iif_ref.linear.tracin` on problem ``p`` at its learning rate and checkpoints."""
    return linear.tracin(p.X, p.y, p.X_test, p.y_test, lr=p.lr,
                         checkpoints=list(p.checkpoints))


def linear_iif(p):
    """:func:`iif_ref.linear.integrated_influence` on problem ``p``.

    The ``"prediction"`` baseline passes the problem's baseline targets; the ``"unlearn"``
    baseline passes none, so that the Eq. (12) targets are computed.
    """
    baseline = p.baseline_targets if p.baseline == "prediction" else None
    return linear.integrated_influence(p.X, p.y, p.X_test, p.y_test, lam=p.lam, K=p.K,
                                       baseline_targets=baseline)


def _attribute(p, method, **options):
    """Scores of :func:`iif_ref.attribute` on the problem's torch model, squared error."""
    X, y, Xt, yt = p.torch_data()
    return iif_ref.attribute(p.torch_model(), "mse", X, y, Xt, yt, method=method,
                             progress=False, **options).scores


def neural_if(p):
    """Neural influence function with the exact Hessian solve and no damping."""
    return _attribute(p, "if", solver="exact", damping=0.0)


def neural_tracin(p):
    """Neural TracIn at the problem's checkpoints and learning rate."""
    import torch

    # Checkpoints by parameter name: the bias-free nn.Linear has only "weight" (1, d).
    ckpts = [{"weight": torch.as_tensor(theta, dtype=torch.float64)[None, :]}
             for theta in p.checkpoint_params()]
    return _attribute(p, "tracin", checkpoints=ckpts, lrs=[p.lr] * len(ckpts))


def neural_iif(p):
    """Neural IIF: Newton refits for Eq. (12) and the path, exact Hessian, no projection.

    Newton's method stops at a gradient 1e-10 relative to the start (or at its rounding
    floor), so the scores carry a solver error (see ``tests/test_testing_neural.py`` for
    the tolerance that follows). On these quadratic objectives it takes one step.
    """
    baseline = "per_test" if p.baseline == "unlearn" else "prediction"
    # Eq. (12) with the summed losses of the problem (λ weighs Σ_i l_i), solved to
    # convergence over the full batch: the exact θ'_t of iif_ref.linear.unlearned_params.
    # Eq. (10)'s Euler sum with K steps: what the linear reference computes for K.
    return _attribute(p, "iif", K=p.K, quadrature="euler", lam=p.lam, baseline=baseline,
                      unlearn_optimizer="newton", unlearn_epochs=1, unlearn_reduction="sum",
                      unlearn_batch_size=None, path_models="refit", refit_optimizer="newton",
                      curvature="hessian",
                      proj_dim=None, damping=0.0)
