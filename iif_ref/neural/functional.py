"""A functional view of a ``torch.nn.Module``: parameters as data, flat parameter index.

The flat index ``m`` of a parameter entry (the row of the projection matrix ``A``,
docs/rng.md) runs over the *trainable* parameters in ``model.named_parameters()`` order,
each flattened row-major. Frozen parameters (``requires_grad=False``) are kept as
constants. The model is evaluated in eval mode (dropout off, batch-norm statistics
fixed): attribution explains the deployed function. θ is substituted for the module's
tensors for the duration of one forward call (:meth:`FunctionalModel.substituted`, what
``torch.func.functional_call`` does, without its per-call bookkeeping, which costs more
than the forward pass itself at the batch sizes of unlearning). A plain
``nn.Sequential`` of ``nn.Linear`` layers and parameter-free modules (the package's
MLPs) is evaluated layer by layer, the same operations without module calls (tested
equal bit for bit).

Per-sample gradients of Linear layers come in closed form (:mod:`iif_ref.neural.linear_calls`):
every ``torch.nn.functional.linear`` call on a trainable parameter is recorded during one
batched forward pass, wherever it sits in the model.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch.func import grad, vmap

from iif_ref._validation import as_float_array
from iif_ref.neural.linear_calls import LinearCalls, linear_factors

__all__ = ["FunctionalModel", "eval_mode", "check_model", "as_inputs", "as_targets",
           "output_weights", "chunks"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_HALF = (torch.float16, torch.bfloat16)


def check_model(model):
    """Raise ``TypeError`` naming ``model`` unless it is a ``torch.nn.Module``."""
    if not isinstance(model, torch.nn.Module):
        hint = ("; a plain function has no parameters to attribute through: wrap the "
                "computation in an nn.Module that holds them as nn.Parameter"
                if callable(model) else "")
        raise TypeError(f"model must be a torch.nn.Module (its trainable parameters are "
                        f"θ*), got {type(model).__name__}{hint}")
    return model


@contextlib.contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode for the block and restore its previous mode after.

    Raises
    ------
    TypeError
        ``model`` is not a ``torch.nn.Module`` (the first use of the model in every
        public call, so the message comes before anything else touches it).
    """
    was_training = check_model(model).training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class FunctionalModel:
    """``f(x; θ)`` with θ a dict of tensors, plus per-sample vector–Jacobian products.

    Parameters
    ----------
    model : torch.nn.Module
    dtype : {"float32", "float64"} or None
        Compute dtype; ``None`` keeps the dtype of the first trainable parameter.

    Attributes
    ----------
    names : list of str
        Trainable parameter names, in flat-index order.
    theta_star : dict of str -> tensor
        Detached copies of the trainable parameters (θ*), in the compute dtype.
    n_params : int
        ``M``, the number of trainable scalars.
    """

    def __init__(self, model, *, dtype=None):
        check_model(model)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no trainable parameters (every parameter has "
                             "requires_grad=False); there is nothing to attribute through")
        meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if meta:
            raise ValueError(
                f"model has {len(meta)} parameter(s) or buffer(s) on the meta device "
                f"({', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}): shapes without "
                "values, so there is nothing to evaluate; materialise and load the weights "
                "first, e.g. model.to_empty(device='cpu') then model.load_state_dict(...)")
        self.dtype = _DTYPES[dtype] if dtype is not None else trainable[0][1].dtype
        if self.dtype in _HALF:
            # Per-sample gradients and the damped solves need float32 at least; computing
            # in half precision would change the results' precision silently.
            raise TypeError(
                f"model has {str(self.dtype).replace('torch.', '')} parameters; attribution "
                "computes in float32 or float64: pass dtype='float32' (or 'float64') to "
                "compute in that precision without changing the model, or convert it with "
                "model.float()")
        if not self.dtype.is_floating_point:
            raise TypeError(f"model parameters must be floating point, got {self.dtype}")
        self.model = model
        self.device = trainable[0][1].device
        self.names = [n for n, _ in trainable]
        self.shapes = [tuple(p.shape) for _, p in trainable]
        self.numels = [p.numel() for _, p in trainable]
        self.n_params = int(sum(self.numels))
        self.theta_star = {n: p.detach().to(self.dtype).clone() for n, p in trainable}
        # Frozen parameters and buffers are constants of f; floating ones follow the dtype.
        consts = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        consts.update(dict(model.named_buffers()))
        self.constants = {n: (t.detach().to(self.dtype) if t.is_floating_point() else t)
                          for n, t in consts.items()}
        self._layers = _linear_stack(model)
        self._sites = _tensor_sites(model)
        #: Whether per-sample VJPs of Linear layers may come in closed form (False: the
        #: general ``vmap(grad)`` path for every model, the slow twin of the tests).
        self.closed_form = True

    # ---- parameters as vectors -------------------------------------------------
    def flatten(self, params):
        """Concatenate ``params`` into a vector of length ``n_params`` (flat index order)."""
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, vector):
        """Inverse of :meth:`flatten`."""
        out, start = {}, 0
        for n, shape, k in zip(self.names, self.shapes, self.numels):
            out[n] = vector[start:start + k].reshape(shape)
            start += k
        return out

    def clone(self, params):
        return {n: params[n].detach().clone() for n in self.names}

    # ---- evaluation -------------------------------------------------------------
    @contextlib.contextmanager
    def substituted(self, tensors):
        """The module with ``tensors`` (by parameter or buffer name) in place of its own
        for the block, restored after (also on error).

        The same substitution as ``torch.func.functional_call`` (tied tensors included:
        every module that holds a tensor gets the substitute), without its per-call
        checks of the names, which :class:`FunctionalModel` made once.
        """
        saved = []
        try:
            for name, tensor in tensors.items():
                for store, key in self._sites[name]:
                    saved.append((store, key, store[key]))
                    store[key] = tensor
            yield self.model
        finally:
            for store, key, original in reversed(saved):
                store[key] = original

    def forward(self, params, X):
        """Batched outputs ``f(X; θ)``, shape ``(n, n_out)``."""
        tensors = {**self.constants, **params}
        if self._layers is None:
            with self.substituted(tensors) as model:
                out = model(X)
        else:
            out = X
            for layer in self._layers:
                out = (layer(out) if isinstance(layer, torch.nn.Module) else
                       torch.nn.functional.linear(out, tensors[layer[0]],
                                                  None if layer[1] is None
                                                  else tensors[layer[1]]))
        return out.reshape(out.shape[0], -1)

    def _single(self, params, x):
        return self.forward(params, x.unsqueeze(0)).reshape(-1)

    def per_sample_vjp(self, params, X, W):
        """Per-sample VJPs ``J_f(x_n)ᵀ w_{n,r}``, flattened: shape ``(n, R, n_params)``.

        Parameters
        ----------
        params : dict of tensors
        X : tensor, shape (n, ...)
        W : tensor, shape (n, R, n_out)
            Output-space weights: ``R`` vectors per sample (e.g. ``∂l/∂f`` at two targets).

        Notes
        -----
        Every gradient Algorithm 1 needs is such a VJP: ``u_i = J_iᵀ ∂_f l(f_i, ρ_i(t_k))``,
        ``J_iΔy = J_iᵀ (∂_f l(f_i, ρ_i(t_k)) − ∂_f l(f_i, ρ_i(t_{k−1})))`` (exact for
        target-linear losses, Eq. 23–24) and ``G = J_testᵀ ∂_f l(f_test, ŷ)``.
        ``torch.func.vmap`` over samples and weight rows of ``grad`` of ``w · f(x; θ)``.
        """
        blocks = self.per_sample_vjp_blocks(params, X, W)
        return torch.cat(blocks, dim=2)

    def per_sample_vjp_blocks(self, params, X, W):
        """:meth:`per_sample_vjp` split by parameter, not concatenated: a list, in the
        order of :attr:`names`, of ``(n, R, numel_j)`` tensors whose concatenation along
        the last axis is the flat ``(n, R, n_params)`` result (which is never formed:
        a projection can multiply each block by its rows of ``A`` instead).

        When every parameter is used by Linear calls only, the blocks are formed from
        :meth:`per_sample_vjp_factors` (``Σ_s g_s a_sᵀ``), the same numbers as the
        general ``vmap(grad)`` up to rounding without its per-sample passes
        (tests/test_neural_functional.py)."""
        n, r = W.shape[0], W.shape[1]
        factors = self.per_sample_vjp_factors(params, X, W, sequence=True)
        if factors is not None:
            return [(torch.bmm(f[0].transpose(1, 2), f[1]) if f[0].shape[1] > 1
                     else f[0][:, 0, :, None] * f[1][:, 0, None, :])
                    .reshape(n, r, -1) if isinstance(f, tuple)
                    else f.sum(dim=1).reshape(n, r, -1) for f in factors]

        def weighted_output(p, x, w):
            return torch.dot(w, self._single(p, x))

        per_row = vmap(grad(weighted_output), in_dims=(None, None, 0))
        per_sample = vmap(per_row, in_dims=(None, 0, 0))
        g = per_sample(params, X, W)
        return [g[name].reshape(n, r, -1) for name in self.names]

    def per_sample_vjp_factors(self, params, X, W, *, sequence=False):
        """Per-sample VJPs as Linear-layer factors, in the order of :attr:`names`, or None
        when some parameter is not used by ``torch.nn.functional.linear`` calls alone.

        A weight used in Linear calls ``z = a Wᵀ + b`` has per-sample VJP rows
        ``Σ_s g_s a_sᵀ``, summed over the positions ``s`` of its inputs (a sequence axis,
        or several calls of one weight), with ``g = ∂(w·f)/∂z`` its output gradient; a
        bias's rows are ``Σ_s g_s``.

        Parameters
        ----------
        params : dict of tensors
        X : tensor, shape (n, ...)
        W : tensor, shape (n, R, n_out)
        sequence : bool
            False: a weight's factor is the pair ``(g, a)`` of shapes ``(n R, out)``,
            ``(n R, in)`` (rows ``g aᵀ``) and a bias's is ``g``, ``(n R, out)``, the same
            tensor as its weight's ``g`` when they share one call; None when
            some weight has more than one position per sample (not an outer product).
            True: ``(g, a)`` of shapes ``(n R, S, out)``, ``(n R, S, in)`` and a bias's
            ``g`` of shape ``(n R, S, out)``, for any ``S``.

        Returns
        -------
        list or None
            Row ``i R + r`` is sample ``i`` with weight row ``r``. None also when the
            parameters require grad (the general path keeps the graph) or
            :attr:`closed_form` is off.

        Notes
        -----
        One batched forward pass records every Linear call
        (:class:`~iif_ref.neural.linear_calls.LinearCalls`) and one batched backward
        pass per weight row gives every ``g``; this assumes that the model maps the rows
        of a batch independently (true in eval mode; batch statistics would also break
        the general path's per-sample evaluation).
        """
        differentiated = torch.is_grad_enabled() and any(
            v.requires_grad for v in params.values())
        if not self.closed_form or differentiated:    # vmap(grad) keeps the graph
            return None
        detached = {name: params[name].detach() for name in self.names}
        # Grad mode for the backward pass too: a caller's no_grad block would otherwise
        # cut the graph at the first operation on ``out`` (a reshape).
        with torch.enable_grad():
            with LinearCalls(detached) as calls:
                out = self.forward(detached, X.detach())
            factors = linear_factors(calls, out, W)
        if factors is None:
            return None
        if not sequence:
            if any(isinstance(f, tuple) and f[0].shape[1] > 1 for f in factors.values()):
                return None
            # A weight and its bias keep one shared g tensor (callers group by identity).
            flat = {}

            def squeeze(g):
                return flat.setdefault(id(g), g[:, 0] if g.shape[1] == 1 else g.sum(dim=1))

            factors = {k: ((squeeze(f[0]), f[1][:, 0]) if isinstance(f, tuple)
                           else squeeze(f)) for k, f in factors.items()}
        return [factors[name] for name in self.names]


def _linear_stack(model):
    """The layers of ``model`` when it is a plain ``nn.Sequential`` (nested ones too) of
    ``nn.Linear`` and modules without parameters or buffers, else None: a Linear as its
    ``(weight name, bias name or None)``, any other layer as the module itself. Modules
    with hooks or subclasses (which may override ``forward``) are called as
    modules."""
    layers = []

    def walk(module, prefix):
        if module._forward_hooks or module._forward_pre_hooks:
            return False
        if type(module) is torch.nn.Sequential:
            return all(walk(child, f"{prefix}{name}.")
                       for name, child in module.named_children())
        if type(module) is torch.nn.Linear:
            layers.append((prefix + "weight",
                           None if module.bias is None else prefix + "bias"))
            return True
        stateless = (next(module.parameters(), None) is None
                     and next(module.buffers(), None) is None)
        if stateless:
            layers.append(module)
        return stateless

    return layers if walk(model, "") else None


def _tensor_sites(model):
    """Every place a parameter or buffer of ``model`` is held, by its first name:
    ``name -> [(module._parameters or module._buffers, key), ...]`` (a tied tensor has
    several places, all substituted together)."""
    first, sites = {}, {}
    for kind in ("_parameters", "_buffers"):
        for module_name, module in model.named_modules(remove_duplicate=False):
            store = getattr(module, kind)
            for key, tensor in store.items():
                if tensor is None:
                    continue
                name = first.setdefault(id(tensor),
                                        f"{module_name}.{key}" if module_name else key)
                places = sites.setdefault(name, [])
                if not any(held is store and k == key for held, k in places):
                    places.append((store, key))
    return sites


def as_inputs(X, name, fm):
    """Validate features (finite, non-empty) and return a tensor in the compute dtype."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    arr = as_float_array(X, name, allow_dtypes=(np.float32, np.float64))
    if arr.ndim < 1:
        raise ValueError(f"{name} must have a sample axis, got shape {arr.shape}")
    return torch.as_tensor(np.ascontiguousarray(arr), dtype=fm.dtype, device=fm.device)


def probe_outputs(fm, X, name):
    """The model's outputs on the first rows of ``X``, shape ``(min(n, 8), n_out)``.

    Raises
    ------
    ValueError
        The model cannot be applied to ``X``: the message names ``X``'s shape and the input
        the model's first layer expects, instead of torch's shape error.
    """
    try:
        with torch.no_grad():
            return fm.forward(fm.theta_star, X[:8])
    except RuntimeError as exc:
        first = next((m for m in fm.model.modules()
                      if hasattr(m, "in_features") or hasattr(m, "in_channels")), None)
        expects = ""
        if first is not None:
            size = getattr(first, "in_features", None) or getattr(first, "in_channels")
            unit = "features" if hasattr(first, "in_features") else "channels"
            expects = f"; its first layer ({type(first).__name__}) takes {size} input {unit}"
        if X.ndim == 1:
            expects += (f"; a 1-D {name} is {X.shape[0]} samples without features: for one "
                        f"feature per sample pass {name}.reshape(-1, 1)")
        raise ValueError(f"the model cannot be applied to {name} of shape "
                         f"{tuple(X.shape)}{expects} ({exc})") from exc


def as_targets(y, name, n_out, loss, fm):
    """Targets as a ``(n, n_out)`` tensor; integer class labels are one-hot encoded.

    Raises
    ------
    TypeError
        One value per sample that are not integers, for a classification loss of a model
        with several outputs (class labels must be integers).
    ValueError
        Non-finite values, a label outside ``[0, n_out)``, or a shape that does not match
        the model output width ``n_out``.
    """
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    raw = np.asarray(y)
    if (loss.classification and raw.ndim == 1 and n_out != 1
            and not (np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_)):
        if raw.dtype.kind in "fc":
            fix = f"convert labels with {name}.astype(int)"
        else:   # strings or objects: astype(int) would fail on them
            fix = ("encode them as integers with one mapping for the training and test "
                   "labels, e.g. classes, codes = np.unique(labels, return_inverse=True)")
        raise TypeError(f"{name} for the {loss.name!r} loss must hold integer class labels "
                        f"in [0, {n_out}) (or (n, {n_out}) one-hot or soft targets), got "
                        f"dtype {raw.dtype} with shape {raw.shape}; {fix}")
    if loss.classification and raw.ndim == 1 and (np.issubdtype(raw.dtype, np.integer)
                                                   or raw.dtype == np.bool_):
        if raw.size == 0:
            raise ValueError(f"{name} is empty (shape {raw.shape})")
        if raw.min() < 0 or raw.max() >= n_out:
            raise ValueError(f"{name} holds class labels outside [0, {n_out}) "
                             f"(min {raw.min()}, max {raw.max()})")
        onehot = np.zeros((raw.size, n_out))
        onehot[np.arange(raw.size), raw] = 1.0
        arr = onehot
    else:
        arr = as_float_array(raw, name, ndim=(1, 2))
        if arr.ndim == 1:
            if n_out != 1:
                raise ValueError(f"{name} has shape {arr.shape} but the model has {n_out} "
                                 "outputs; pass (n, n_out) targets"
                                 + (" or integer class labels" if loss.classification else ""))
            arr = arr[:, None]
        if arr.shape[1] != n_out:
            raise ValueError(f"{name} has {arr.shape[1]} columns but the model has {n_out} "
                             f"outputs (shape {arr.shape})")
    return torch.as_tensor(arr, dtype=fm.dtype, device=fm.device)


def _mse_weights(F, Y):
    return 2.0 * (F - Y)                       # ∂/∂f Σ (f − y)²


def _cross_entropy_weights(F, Y):
    # ∂/∂f of −Σ_c y_c log softmax(f)_c = (Σ_c y_c) softmax(f) − y.
    return torch.softmax(F, dim=-1) * Y.sum(dim=-1, keepdim=True) - Y


def _trak_margin_weights(F, Y):
    # ∂/∂f of f_y − logsumexp(f_c, c ≠ y): y minus the softmax over the other classes.
    others = torch.where(Y > 0.5, torch.full_like(F, -torch.inf), F)
    return Y - torch.softmax(others, dim=-1)


def output_weights(loss, F, Y):
    """``∂l/∂f`` per sample, shape ``(n, n_out)``, for outputs ``F`` and targets ``Y``.

    The package's two losses and TRAK's margin use their closed forms (a ``vmap`` of
    ``grad`` costs milliseconds of dispatch per call, called a few times per chunk); any
    other target-linear loss goes through ``torch.func``. The two agree to rounding
    (tests/test_neural_projector.py).
    """
    from iif_ref.neural.losses import CROSS_ENTROPY, MSE, trak_margin

    closed = {MSE.fn: _mse_weights, CROSS_ENTROPY.fn: _cross_entropy_weights,
              trak_margin: _trak_margin_weights}.get(loss.fn)
    if closed is not None:
        # Evaluated in float64 and rounded once: for a confident float32 classifier the
        # entries of p − e_y are near 1e-30, where float32 products round differently
        # enough that the weights of two path targets stop being parallel to rounding
        # (features._parallel_factor); torch.func's float32 gradient keeps them parallel.
        return closed(F.double(), Y.double()).to(F.dtype)
    return vmap(grad(loss.fn, argnums=0))(F, Y)


def chunks(n, size):
    """Index ranges ``range(start, stop)`` of at most ``size`` covering ``0..n-1``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def n_chunks(n, size):
    return math.ceil(n / size)
