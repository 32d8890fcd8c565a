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
        Measured ``Δ_t = L_test(θ*) − L_test(θ'_t)`` (Eq. 1) for the baseline θ' used;
        None for methods without a baseline (TracIn, TRAK).
    residual : ndarray, float64, shape (n_test,), or None
        Completeness residual ``Σ_i I[t, i] − Δ_t`` (zero for the exact integral; the
        Euler sum, the path-model approximation and the curvature choice contribute).
    config : dict
        Every option, with the resolved damping per step, dtypes, ``n_params``, ``P``,
        ``K``, λ and the seed: enough to repeat the run.
    diagnostics : dict
        ``condition`` (condition number of each damped ``F`` solved: 2-norm from the
        eigenvalues on the dense path, LAPACK's 1-norm estimate on the projected path),
        ``damping``
        (absolute λ_d per step), ``unlearning_trajectory``, ``loss_star`` /
        ``loss_prime`` (test losses at θ* and θ'), ``cached_steps`` (steps loaded from
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

    def __post_init__(self):
        # Never hand back a silent NaN.
        for name in ("scores", "delta", "residual"):
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
