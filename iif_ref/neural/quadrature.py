"""Quadrature rules for the path integral over t (Eq. 9), each with an embedded coarser rule.

IIF integrates ``dL_test(θ(Γ(t)))/dt`` over ``t ∈ [0, 1]``; Eq. (10) is the right-endpoint
Euler sum of that integral on ``t_k = k/K``. A rule here is ``K`` nodes ``t_j ∈ (0, 1]``
with weights ``w_j`` (``Σ_j w_j g(t_j) ≈ ∫_0^1 g``) and weights ``w̃_j`` of a coarser rule on
a subset of the same nodes (zero elsewhere): ``|Σ_j (w_j − w̃_j) g(t_j)|`` estimates the
error at no extra model evaluation.

* ``"euler"`` — Eq. (10) as printed: ``t_k = k/K``, ``w_k = 1/K`` (first order). Embedded:
  the right-endpoint rule on every other node from ``t = 1`` down (width ``2/K``), which
  has about twice the error, so the difference estimates the error of the fine rule.
* ``"radau"`` — Gauss–Radau in the graded variable ``u`` with ``t = u^q`` (``q``
  :data:`GRADING`): the node ``t = 1`` (θ* itself, as in Euler) plus ``K − 1`` nodes
  that crowd toward ``t = 0`` where the masked path's integrand is large
  (docs/algorithm1.md, "Quadrature"). Exact for ``g(u^q) q u^{q−1}`` polynomial of
  degree ``2K − 2`` in ``u``. Embedded: the interpolatory rule (in ``u``) on all nodes
  but ``t = 1``.
* ``"gauss"`` — Gauss–Legendre in ``t`` (no node at ``t = 1``: one more path model),
  embedded like ``"radau"``; ``"midpoint"`` — ``t_k = (k − ½)/K``, embedded like
  ``"euler"``. Both are kept for the measurement in
  ``validation/quadrature_convergence.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import legendre

__all__ = ["QuadratureRule", "quadrature_rule", "RULES", "DEFAULT_RULE", "GRADING"]

#: Names accepted by :func:`quadrature_rule` (and ``IIFConfig.quadrature``).
RULES = ("radau", "euler", "gauss", "midpoint")
#: The default rule, chosen by measurement (docs/results/quadrature_convergence.json).
DEFAULT_RULE = "radau"
#: Grading exponent ``q`` of ``t = u^q`` for the graded rules.
GRADING = 2


@dataclass(frozen=True)
class QuadratureRule:
    """Nodes and weights of one rule on ``[0, 1]``, nodes ascending.

    Attributes
    ----------
    name : str
    nodes : ndarray, shape (K,)
        ``t_j ∈ (0, 1]``, ascending.
    weights : ndarray, shape (K,)
        ``w_j > 0``, summing to 1.
    coarse_weights : ndarray, shape (K,)
        Weights of the embedded coarser rule on a subset of ``nodes`` (zero off it);
        sum to 1. None of the nodes costs anything extra.
    """

    name: str
    nodes: np.ndarray
    weights: np.ndarray
    coarse_weights: np.ndarray

    @property
    def starts(self):
        """``t_j − w_j``: the ``ρ`` of a step's ``y_from``, so that the affine target
        gradient gives ``∇l(ρ(t_j)) − ∇l(ρ(t_j − w_j)) = w_j ∂_t ∇l(ρ(t_j))`` on the linear
        path (Eq. 15). For ``"euler"`` these are the grid points ``t_{k−1}``."""
        return self.nodes - self.weights


def interpolatory_weights(nodes):
    """Weights on ``[0, 1]`` integrating exactly the polynomial interpolant of ``nodes``.

    Solved in the Legendre basis (``∫_{−1}^{1} P_m = 2δ_{m0}``), well conditioned for the
    clustered nodes used here.
    """
    x = 2.0 * np.asarray(nodes, dtype=np.float64) - 1.0
    V = legendre.legvander(x, len(x) - 1)           # V[j, m] = P_m(x_j)
    rhs = np.zeros(len(x))
    rhs[0] = 1.0                                     # ∫_0^1 = ½ ∫_{−1}^{1}
    return np.linalg.solve(V.T, rhs)


def _right_radau(n):
    """Gauss–Radau nodes and weights on ``[0, 1]`` with the node ``1`` fixed, ``n`` nodes."""
    if n == 1:
        return np.array([1.0]), np.array([1.0])
    c = np.zeros(n + 1)
    c[n - 1] = c[n] = 1.0                            # P_{n−1} + P_n: roots include −1
    x = np.sort(-legendre.legroots(c))               # mirrored: the fixed node at +1
    x[-1] = 1.0
    u = (x + 1.0) / 2.0
    return u, interpolatory_weights(u)


def _graded(u, v, q):
    """Nodes ``t = u^q`` and weights of ``∫ g(t) dt = ∫ g(u^q) q u^{q−1} du``; a single
    node keeps weight 1 (the one-node rule integrates constants in ``t``)."""
    if len(u) == 1:
        return u ** q, np.ones(1)
    return u ** q, v * q * u ** (q - 1)


def _drop_highest(u, q):
    """Weights (in t) of the interpolatory rule in ``u`` on all nodes but the highest.

    Any embedded rule on a subset has degree at most ``K − 2``, far below Radau's
    ``2K − 2``, so the estimate is pessimistic; dropping the node where the integrand is
    smoothest (``t = 1``) keeps the subset's resolution near ``t = 0`` and was the
    tightest choice measured (docs/algorithm1.md, "Quadrature of the path integral").
    """
    coarse = np.zeros_like(u)
    if len(u) > 1:
        coarse[:-1] = _graded(u[:-1], interpolatory_weights(u[:-1]), q)[1]
    else:
        coarse[:] = 1.0
    return coarse


def _paired_coarse(K):
    """Equal-width rule with ``K`` nodes, coarsened: nodes paired from the top, each
    pair's upper node weighted ``2/K`` (an odd lowest node keeps ``1/K``)."""
    coarse = np.zeros(K)
    coarse[K - 1::-2] = 2.0 / K
    if K % 2:
        coarse[0] = 1.0 / K
    return coarse


def quadrature_rule(name, K):
    """The ``K``-node rule ``name`` (one of :data:`RULES`) on ``[0, 1]``.

    Parameters
    ----------
    name : str
    K : int
        Number of nodes (path steps).

    Returns
    -------
    QuadratureRule

    Raises
    ------
    ValueError
        Unknown ``name``, or ``K < 1``.
    """
    if name not in RULES:
        raise ValueError(f"quadrature must be one of {RULES}, got {name!r}")
    K = int(K)
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    if name == "euler":
        nodes = np.arange(1, K + 1, dtype=np.float64) / K
        weights = np.full(K, 1.0 / K)
        return QuadratureRule(name, nodes, weights, _paired_coarse(K))
    if name == "midpoint":
        nodes = (np.arange(K) + 0.5) / K
        return QuadratureRule(name, nodes, np.full(K, 1.0 / K), _paired_coarse(K))
    if name == "gauss":
        x, w = legendre.leggauss(K)
        u, v, q = (x + 1.0) / 2.0, w / 2.0, 1
    else:
        (u, v), q = _right_radau(K), GRADING
    nodes, weights = _graded(u, v, q)
    return QuadratureRule(name, nodes, weights, _drop_highest(u, q))
