"""The Linear calls of one forward pass, recorded: per-sample gradients as factors.

A weight used as ``z = a Wᵀ + b`` (``torch.nn.functional.linear``) has the per-sample
gradient ``∂(w·f(x_i))/∂W = Σ_s g_{i,s} a_{i,s}ᵀ`` with ``g = ∂(w·f)/∂z`` its output
gradient, summed over the positions ``s`` of sample ``i`` (a sequence axis: input
``(n, S, d_in)``; or several calls of one weight), and ``∂(w·f(x_i))/∂b = Σ_s g_{i,s}``.
One batched forward pass gives every ``a`` and one batched backward pass every ``g``,
for all samples at once; a ``vmap`` of ``grad`` instead runs the model per sample.

The calls are found by the operation, not by the module: :class:`LinearCalls` is a torch
function mode that sees every ``linear`` call (an ``nn.Linear``'s forward, or a model's
own ``F.linear``, wherever it sits) and every other operation that touches a trainable
parameter. Module forward hooks (as in traker and kronfluence) see only the module's
own calls: a weight also read elsewhere (tied to an embedding, ``x @ layer.weight.T`` in
a parent's ``forward``) would go unseen and its per-sample gradient would be silently
wrong. Here any such use, or any parameter outside a Linear call (LayerNorm,
embeddings, convolutions), sends the whole model to the general path
(:func:`linear_factors` returns None): one exact path per model, never a mix.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["LinearCalls", "linear_factors"]

#: Tensor properties and methods that read metadata only: not a use of the values.
_METADATA_PROPERTIES = (torch.Tensor.shape, torch.Tensor.dtype, torch.Tensor.device,
                        torch.Tensor.ndim, torch.Tensor.requires_grad)
_METADATA_METHODS = (torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel)


def _reads_metadata(func):
    if getattr(func, "__name__", None) == "__get__":
        owner = getattr(func, "__self__", None)
        return any(owner is p for p in _METADATA_PROPERTIES)
    return any(func is m for m in _METADATA_METHODS)


def _linear_args(args, kwargs):
    names = ("input", "weight", "bias")
    values = dict(zip(names, args))
    values.update(kwargs)
    return values["input"], values["weight"], values.get("bias")


class LinearCalls(TorchFunctionMode):
    """Within the block, record each ``linear`` call on the tensors of ``params``.

    Parameters
    ----------
    params : dict of str -> tensor
        The trainable tensors, by name, that the forward pass will use (matched by
        identity, so they must be the very tensors substituted into the model).

    Attributes
    ----------
    calls : list of (weight name or None, bias name or None, a, z)
        ``a`` the call's input (a copy), ``z`` its output as recorded; the model
        continues with a copy of ``z``, so in-place operations of the model (e.g.
        ``ReLU(inplace=True)``) change neither.
    other_uses : set of str
        Names of the parameters that some other operation touched.
    names : list of str
        The names of ``params``.
    """

    def __init__(self, params):
        super().__init__()
        self.names = list(params)
        self._by_id = {id(t): name for name, t in params.items()}
        self._alive = list(params.values())   # ids stay unique while the mode lives
        self.calls, self.other_uses = [], set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight, bias = _linear_args(args, kwargs)
            w_name = self._by_id.get(id(weight))
            b_name = None if bias is None else self._by_id.get(id(bias))
            if (w_name or b_name) and id(x) not in self._by_id:
                z = func(*args, **kwargs)
                if not z.requires_grad:       # the graph starts at the first Linear
                    z.requires_grad_(True)
                self.calls.append((w_name, b_name, x.detach().clone(), z))
                return z.clone()
        if not _reads_metadata(func):
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self._by_id:
                    self.other_uses.add(self._by_id[id(leaf)])
        return func(*args, **kwargs)


def linear_factors(calls, out, W):
    """Per-sample gradient factors of every parameter, from the recorded ``calls``.

    Parameters
    ----------
    calls : LinearCalls
        The record of the forward pass that gave ``out``.
    out : tensor, shape (n, ...)
        The model's outputs ``f(X)``, ``n_out`` values per sample.
    W : tensor, shape (n, R, n_out)
        Output-space weights ``w``.

    Returns
    -------
    dict or None
        By parameter name: a weight's ``(g, a)``, shapes ``(n R, S, out)`` and
        ``(n R, S, in)``; a bias's ``g``, ``(n R, S, out)``. Row ``i R + r`` is sample
        ``i`` with weight row ``r``; ``S`` counts the positions of all the parameter's
        calls. The weight and bias of one call share their ``g`` (the same tensor). None when a parameter is used otherwise than in Linear calls, in no call,
        both as a weight and as a bias, or by a call without the sample axis first.
    """
    n, r = W.shape[0], W.shape[1]
    roles = {}
    for w_name, b_name, a, z in calls.calls:
        if a.ndim < 2 or a.shape[0] != n or z.shape[0] != n:
            return None
        for name, role in ((w_name, "weight"), (b_name, "bias")):
            if name is not None and roles.setdefault(name, role) != role:
                return None
    if calls.other_uses or set(roles) != set(calls.names):
        return None
    zs = [z for *_, z in calls.calls]
    out = out.reshape(n, -1)
    grads = [[None] * len(zs)] * r
    if out.requires_grad:
        grads = [torch.autograd.grad(out, zs, W[:, j], retain_graph=j < r - 1,
                                     allow_unused=True) for j in range(r)]
    parts = {}
    for c, (w_name, b_name, a, z) in enumerate(calls.calls):
        g = torch.stack([torch.zeros_like(z) if row[c] is None else row[c]
                         for row in grads], dim=1)
        g = g.reshape(n * r, -1, z.shape[-1])
        if w_name is not None:
            a = a.reshape(n, -1, a.shape[-1])
            parts.setdefault(w_name, []).append(
                (g, a if r == 1 else a.repeat_interleave(r, dim=0)))
        if b_name is not None:
            parts.setdefault(b_name, []).append(g)
    factors = {}
    for name, items in parts.items():
        # One call: its g itself, the same tensor for the weight and the bias.
        if roles[name] == "weight":
            factors[name] = items[0] if len(items) == 1 else (
                torch.cat([g for g, _ in items], dim=1), torch.cat([a for _, a in items], dim=1))
        else:
            factors[name] = items[0] if len(items) == 1 else torch.cat(items, dim=1)
    return factors
