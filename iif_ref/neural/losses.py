"""Per-sample losses that are linear in their target, the only ones Algorithm 1 accepts.

A loss ``l(f, y)`` is *target-linear* when its output-space gradient ``∂l/∂f`` is affine
in ``y``. Then ``∇θ l(f(x; θ), y) = J_f(x)ᵀ ∂l/∂f`` is affine in ``y`` too, and the
paper's ``J_i(t_k) Δy^(k)`` (Eq. 8, 10) equals the difference of two per-sample gradients
*exactly* (Eq. 23–24). Both built-in losses follow ``docs/conventions.md``:

* ``"mse"``: ``l(f, y) = Σ_c (f_c − y_c)²`` (no ½); prediction ``f`` itself.
* ``"cross_entropy"``: soft-target ``l(f, y) = −Σ_c y_c log softmax(f)_c`` (not
  renormalised, so the masked path targets ``ρ ⊙ y`` of appendix E stay linear);
  prediction ``softmax(f)``.

A user loss is any callable ``loss(f, y) -> scalar`` on *one* sample (``f`` and ``y`` of
shape ``(n_out,)``) that declares ``target_linear = True``; it may carry a
``prediction(f)`` method (default: identity) mapping outputs into the target space, used
for the baselines ``f(x; θ')`` of Eq. (13). The declaration is checked numerically on the
data (:func:`check_target_linear`), so a wrong declaration is refused, not trusted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["TargetLinearLoss", "resolve_loss", "check_target_linear", "trak_margin"]


@dataclass(frozen=True)
class TargetLinearLoss:
    """A per-sample loss linear in its target, with the map from outputs to targets.

    Parameters
    ----------
    name : str
        ``"mse"``, ``"cross_entropy"`` or the user callable's name.
    fn : callable
        ``fn(f, y) -> 0-d tensor`` for one sample, ``f`` and ``y`` of shape ``(n_out,)``.
    prediction : callable
        ``prediction(f) -> (n_out,)``: the model's prediction as a target (identity for
        MSE, ``softmax`` for cross-entropy). Baseline targets are ``prediction(f(x; θ'))``.
    classification : bool
        Targets are one-hot class vectors; integer labels are accepted and one-hot encoded.
    batched : callable or None
        ``batched(F, Y) -> (n,)``: the per-sample losses of a batch in one call, equal to
        ``vmap(fn)`` row by row (the built-in losses; a ``vmap`` costs a fraction of a
        millisecond of dispatch per call, which adds up over the optimisers' steps).
    """

    name: str
    fn: Callable
    prediction: Callable
    classification: bool = False
    batched: Callable | None = None

    def __call__(self, f, y):
        return self.fn(f, y)


def _mse(f, y):
    return torch.sum((f - y) ** 2)


def _soft_cross_entropy(f, y):
    return -torch.sum(y * torch.log_softmax(f, dim=-1))


def _mse_rows(F, Y):
    return torch.sum((F - Y) ** 2, dim=-1)


def _soft_cross_entropy_rows(F, Y):
    return -torch.sum(Y * torch.log_softmax(F, dim=-1), dim=-1)


def _identity(f):
    return f


def _softmax(f):
    return torch.softmax(f, dim=-1)


MSE = TargetLinearLoss("mse", _mse, _identity, classification=False, batched=_mse_rows)
CROSS_ENTROPY = TargetLinearLoss("cross_entropy", _soft_cross_entropy, _softmax,
                                 classification=True, batched=_soft_cross_entropy_rows)


def trak_margin(f, y):
    """TRAK's output function ``log(p_y / (1 − p_y))`` for logits ``f`` and one-hot ``y``.

    Computed as ``f_y − logsumexp(f_c, c ≠ y)``, which has no cancellation when
    ``p_y → 1``.
    """
    f_y = torch.sum(y * f)
    others = torch.where(y > 0.5, torch.full_like(f, -torch.inf), f)
    return f_y - torch.logsumexp(others, dim=-1)


trak_margin.classification = True


def resolve_loss(loss):
    """Return the :class:`TargetLinearLoss` for ``"mse"``, ``"cross_entropy"`` or a callable.

    Raises
    ------
    ValueError
        Unknown loss name, or a callable that does not declare ``target_linear = True``
        (for example ``torch.nn.functional.huber_loss``): Algorithm 1's
        ``J_iΔy`` is exact only for target-linear losses.
    TypeError
        ``loss`` is neither a string nor a callable.
    """
    if isinstance(loss, TargetLinearLoss):
        return loss
    if isinstance(loss, str):
        key = loss.lower().replace("-", "_")
        if key == "mse":
            return MSE
        if key in ("cross_entropy", "ce"):
            return CROSS_ENTROPY
        raise ValueError(f"loss must be 'mse', 'cross_entropy' or a target-linear callable, "
                         f"got {loss!r}")
    if not callable(loss):
        raise TypeError(f"loss must be a string or a callable, got {type(loss).__name__}")
    if getattr(loss, "target_linear", False) is not True:
        name = getattr(loss, "__name__", type(loss).__name__)
        raise ValueError(
            f"loss {name!r} does not declare target_linear = True. Algorithm 1 needs a "
            "per-sample loss whose gradient is linear in the target (MSE, soft-target "
            "cross-entropy), so that J_iΔy is a difference of two gradients (Eq. 23-24). "
            "Set `loss.target_linear = True` only if ∂l/∂f is affine in y.")
    prediction = getattr(loss, "prediction", _identity)
    classification = bool(getattr(loss, "classification", False))
    name = getattr(loss, "__name__", type(loss).__name__)
    return TargetLinearLoss(name, loss, prediction, classification=classification)


def check_target_linear(loss, f, y, *, generator=None):
    """Refuse a loss whose output gradient is not affine in the target on these samples.

    Checks ``∂l/∂f(f, (y₁ + y₂)/2) = (∂l/∂f(f, y₁) + ∂l/∂f(f, y₂))/2`` with ``y₁ = y`` and a
    random ``y₂``, which holds for every target-linear loss up to rounding.

    Parameters
    ----------
    loss : TargetLinearLoss
    f, y : torch.Tensor, shape (n, n_out)
        Model outputs and targets of a few samples.

    Raises
    ------
    ValueError
        The midpoint identity fails beyond ``100 · eps · scale`` (the gradient of a
        target-linear loss is computed with O(eps) relative rounding per term).
    """
    from torch.func import grad, vmap

    f = f.detach()
    y2 = torch.rand(y.shape, generator=generator, dtype=y.dtype, device=y.device)
    w = vmap(grad(loss.fn, argnums=0))
    g1, g2, gm = w(f, y), w(f, y2), w(f, 0.5 * (y + y2))
    err = torch.max(torch.abs(gm - 0.5 * (g1 + g2))).item()
    scale = max(torch.max(torch.abs(g1)).item(), torch.max(torch.abs(g2)).item(), 1.0)
    tol = 100 * torch.finfo(f.dtype).eps * scale
    if not err <= tol:
        raise ValueError(
            f"loss {loss.name!r} declares target_linear = True but its gradient in the "
            f"output is not affine in the target (midpoint error {err:.3g} > {tol:.3g}); "
            "Algorithm 1 would compute J_iΔy incorrectly for it")
