"""The result of an attribution run: scores, completeness, configuration, diagnostics."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["AttributionResult"]


@dataclass
class AttributionResult:
    """Scores with what is needed to judge and repeat them.

    Attributes
    ----------
    scores : ndarray, float64, shape (n_test, n_train)
        ``I[t, i]``; ``> 0``: sample ``i`` pushes test loss ``t`` up (opponent),
        ``< 0``: pulls it down (proponent) — docs/conventions.md.
    delta : ndarray, float64, shape (n_test,), or None
        Measured ``Δ_t = L_test(θ*) − L_test(θ'_t)`` (Eq. 1) for the unlearned baseline
        θ' of Eq. (12) (zero for ``baseline="prediction"``); None for methods without a
        baseline (TracIn, TRAK). ``Δ_t < 0``: θ' raised test loss ``t``.
    residual : ndarray, float64, shape (n_test,), or None
        Completeness residual of IIF, ``Σ_i I[t, i] − path_delta_t``: what the discrete
        sum (Eq. 10) misses of the loss change along the path it was computed on. With
        exact path models (``path_models="refit"``) and exact curvature it is the Euler
        error, O(1/K) (docs/algorithm1.md, "Completeness"); one-step path models
        (Eq. 16) and an approximate curvature (Fisher, projection, damping) add theirs.
        For the influence function, ``Σ_i IF[t, i] − delta_t``.
    path_delta : ndarray, float64, shape (n_test,), or None
        ``L_test(θ_K) − L_test(θ_0)`` with θ_K = θ* and θ_0 the path model at the
        path's own start targets ``ρ(t_0)`` (Eq. 15–16): the loss change the computed
        path integrates. It equals ``delta`` only when θ_0 = θ' (exact path models on
        the unmasked path). The masked path of appendix E starts at ``ȳ ⊙ y``
        (``p'_y e_y`` for cross-entropy), not at the Eq. (13) baseline, so it integrates
        the change from the model fitted to those start targets, which is not Δ. None
        for methods without a path.
    config : dict
        Every option, with the resolved damping per step, dtypes, ``n_params``, ``P``,
        ``K``, λ and the seed: enough to repeat the run.
    diagnostics : dict
        ``condition`` (condition number of each damped ``F`` solved: 2-norm from the
        eigenvalues on the dense path, LAPACK's 1-norm estimate on the projected path),
        ``damping``
        (absolute λ_d per step), ``unlearning_trajectory`` (objective per epoch, per
        baseline), ``unlearning`` (per baseline: ``objective``, ``test_loss`` per row,
        ``step_size`` ``[min, mean, max]`` and ``skipped_steps`` per epoch),
        ``not_unlearned`` (test rows whose baseline failed to raise their loss; a
        warning names them), ``loss_star`` / ``loss_prime`` / ``loss_path_start``
        (test losses at θ*, θ' and θ_0), ``cached_steps`` (steps loaded from
        ``cache_dir``).
    method : str
        ``"iif"``, ``"if"``, ``"tracin"`` or ``"trak"``.
    """

    scores: np.ndarray
    delta: np.ndarray | None
    residual: np.ndarray | None
    config: dict
    diagnostics: dict = field(default_factory=dict)
    method: str = "iif"
    path_delta: np.ndarray | None = None

    def __post_init__(self):
        # Never hand back a silent NaN.
        for name in ("scores", "delta", "residual", "path_delta"):
            value = getattr(self, name)
            if value is not None and not np.all(np.isfinite(value)):
                raise FloatingPointError(f"{self.method}: non-finite values in {name}; "
                                         "see diagnostics (condition, damping)")

    def top(self, n, *, kind="proponents"):
        """Indices of the ``n`` strongest proponents (most negative) or opponents (most
        positive) per test point, shape ``(n_test, n)``."""
        if kind not in ("proponents", "opponents"):
            raise ValueError(f"kind must be 'proponents' or 'opponents', got {kind!r}")
        order = np.argsort(self.scores if kind == "proponents" else -self.scores, axis=1,
                           kind="stable")
        return order[:, :n]
