"""The result of an attribution run: scores, completeness, configuration, diagnostics."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["AttributionResult", "warn_incomplete", "COMPLETENESS_FIELDS"]


#: Test points named in the incompleteness warning before "...".
WARN_SHOWN = 10

#: The completeness fields: set by IIF, None for the methods without a path.
COMPLETENESS_FIELDS = ("delta", "delta_path", "residual", "quadrature_error")


@dataclass
class AttributionResult:
    """Scores with what is needed to judge and repeat them; one schema for every method.

    Every result has every attribute below. The completeness fields (``delta``,
    ``delta_path``, ``residual``, ``quadrature_error``) belong to IIF, the only method
    that integrates a loss change along a path; they are ``None`` for the others, never
    a placeholder zero:

    ============  =====  ============  ========  =================  =====================
    method        delta  delta_path    residual  quadrature_error   why None
    ============  =====  ============  ========  =================  =====================
    ``"iif"``     set    set           set       set                —
    ``"if"``      None   None          None      None               a derivative at θ*:
                                                                    no baseline, no path
    ``"tracin"``  None   None          None      None               a sum over training
                                                                    checkpoints, no path
    ``"trak"``    None   None          None      None               a linearised model at
                                                                    θ*, no baseline
    ============  =====  ============  ========  =================  =====================

    Attributes
    ----------
    scores : ndarray, float64, shape (n_test, n_train)
        ``I[t, i]``; ``> 0``: sample ``i`` pushes test loss ``t`` up (opponent),
        ``< 0``: pulls it down (proponent) — docs/conventions.md.
    delta : ndarray, float64, shape (n_test,), or None
        ``Δ_t = L_test(θ*) − L_test(θ'_t)`` (Eq. 1) for the baseline θ' of Eq. (12)
        (0 for ``baseline="prediction"``, where θ' = θ*). ``Δ_t < 0``: θ' raised test
        loss ``t``. What the paper's completeness promises ``Σ_i I`` approaches; the
        computed path need not start at θ' (see ``delta_path``).
    delta_path : ndarray, float64, shape (n_test,), or None
        ``L_test(θ_K) − L_test(θ_0)``: the loss change between the ends of the path
        models actually used, θ_K = θ* and θ_0 the path model at the start targets
        ``ρ(0)`` (Eq. 15–16, reached from the lowest node as every other path model).
        This is what the computed integral integrates. It equals ``delta`` only when
        θ_0 = θ' (exact path models on the unmasked path); the masked path of appendix E
        starts at ``ȳ ⊙ y`` (``p'_y e_y`` for cross-entropy), and Eq. (16)'s one-step
        path models barely leave θ*, so it can be far smaller than ``delta``.
    residual : ndarray, float64, shape (n_test,), or None
        ``Σ_i I[t, i] − delta_path_t``: what the quadrature of the path integral misses
        of the loss change along the path it was computed on. With exact path models
        (``path_models="refit"``) and exact curvature it is the quadrature error
        (first order in 1/K for ``quadrature="euler"``, docs/algorithm1.md
        "Completeness"); inexact path models and an approximate curvature (Fisher,
        projection, damping) add theirs. Not ``Σ_i I − delta``. A ``RuntimeWarning``
        names the test points whose ``|residual|`` exceeds ``|delta_path|``.
    quadrature_error : ndarray, float64, shape (n_test,), or None
        Estimate of the quadrature error of ``Σ_i I[t, i]``: ``|Σ_i (Q − Q̃)|`` with
        ``Q̃`` the rule's embedded coarser rule on a subset of the same nodes
        (:mod:`iif_ref.neural.quadrature`; no extra model evaluation). It bounds the
        error of the coarser rule, so it over-estimates that of the rule used once the
        integral converges. None from the distributed engine, whose workers sum the
        steps.
    config : dict
        Every option, with the resolved damping per step, dtypes, ``n_params``, ``P``,
        ``K``, λ and the seed: enough to repeat the run.
    diagnostics : dict
        Method-specific. IIF: ``condition`` (condition number of each damped ``F``
        solved: 2-norm from the eigenvalues on the dense path, LAPACK's 1-norm estimate
        on the projected path), ``damping`` (absolute λ_d per step),
        ``unlearning_trajectory`` (objective per epoch, per baseline), ``unlearning``
        (per baseline: ``objective``, ``test_loss`` per row, ``step_size``
        ``[min, mean, max]`` and ``skipped_steps`` per epoch), ``not_unlearned`` (test
        rows whose baseline failed to raise their loss; a warning names them),
        ``loss_star`` / ``loss_prime`` / ``loss_path_start`` (test losses at θ*, θ' and
        θ_0), ``path_trajectory`` (the training loss before and after each computed
        path model, on the targets its update trains on: ``Γ(t_k)``, or for
        ``path_models="flow"`` the targets at the interval's midpoint), ``path_loss``
        (``L_train(Γ(t_k))`` of each path model on its own targets, per step
        ``k = K..1``) and ``path_loss_start`` (θ_0 on ``Γ(0)``, per
        baseline), ``nodes`` / ``weights`` / ``coarse_weights`` (the quadrature rule,
        ascending in t), ``node_sums`` (``Σ_i`` of each step's term), ``cached_steps``
        (steps loaded from ``cache_dir``). IF, TracIn, TRAK: ``condition`` and
        ``damping`` of their solves where they solve, TracIn's
        ``checkpoint_sums`` (``Σ_i`` of each checkpoint's term).
    method : str
        ``"iif"``, ``"if"``, ``"tracin"`` or ``"trak"``.
    """

    scores: np.ndarray
    delta: np.ndarray | None
    residual: np.ndarray | None
    config: dict
    diagnostics: dict = field(default_factory=dict)
    method: str = "iif"
    delta_path: np.ndarray | None = None
    quadrature_error: np.ndarray | None = None

    def __post_init__(self):
        # Never hand back a silent NaN.
        for name in ("scores",) + COMPLETENESS_FIELDS:
            value = getattr(self, name)
            if value is not None and not np.all(np.isfinite(value)):
                raise FloatingPointError(f"{self.method}: non-finite values in {name}; "
                                         "see diagnostics (condition, damping)")

    @property
    def path_delta(self):
        """The former name of :attr:`delta_path`."""
        return self.delta_path

    def top(self, n, *, kind="proponents"):
        """Indices of the ``n`` strongest proponents (most negative) or opponents (most
        positive) per test point, shape ``(n_test, n)``."""
        if kind not in ("proponents", "opponents"):
            raise ValueError(f"kind must be 'proponents' or 'opponents', got {kind!r}")
        order = np.argsort(self.scores if kind == "proponents" else -self.scores, axis=1,
                           kind="stable")
        return order[:, :n]


def warn_incomplete(residual, delta_path, *, stacklevel=4):
    """One ``RuntimeWarning`` naming the test points whose ``|residual|`` exceeds
    ``|delta_path|`` (the attributions miss more than the path's whole loss change).

    Returns
    -------
    ndarray of int
        Those test points, ascending.
    """
    bad = np.flatnonzero(np.abs(residual) > np.abs(delta_path))
    if bad.size:
        shown = ", ".join(map(str, bad[:WARN_SHOWN])) + (", ..." if bad.size > WARN_SHOWN
                                                          else "")
        warnings.warn(
            f"completeness: |Σ_i I − delta_path| exceeds |delta_path| for {bad.size} of "
            f"{len(residual)} test points (rows {shown}); the attributions do not account "
            "for the loss change of the path models they integrate along. A large "
            "result.quadrature_error calls for more nodes (K); otherwise the path models "
            "(path_models) or the curvature approximation (curvature, proj_dim, damping) "
            "miss it (docs/algorithm1.md, 'Completeness')",
            RuntimeWarning, stacklevel=stacklevel)
    return bad
