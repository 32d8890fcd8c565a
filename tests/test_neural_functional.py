"""FunctionalModel's fast paths for Linear stacks against their general twins.

A plain ``nn.Sequential`` of ``nn.Linear`` and parameter-free modules is evaluated layer
by layer (not through ``functional_call``) and its per-sample VJPs come in closed form
(``g aᵀ`` per Linear, not ``vmap(grad)``). Both must give the general path's numbers;
any other model must take the general path.
"""
import numpy as np
import pytest
import torch
from torch.func import functional_call

from iif_ref.models import make_mlp
from iif_ref.neural import FunctionalModel

EPS64 = np.finfo(np.float64).eps


def _general(fm):
    """``fm`` with its Linear-stack fast paths switched off (the slow twin)."""
    twin = FunctionalModel(fm.model, dtype="float64" if fm.dtype == torch.float64
                           else "float32")
    twin._layers, twin._layers_linear = None, []
    return twin


def _stack_models():
    torch.manual_seed(0)
    nested = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh()),
        torch.nn.Linear(5, 4, bias=False), torch.nn.GELU(), torch.nn.Linear(4, 3))
    frozen = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(),
                                 torch.nn.Linear(5, 3))
    frozen[0].weight.requires_grad_(False)
    return {"package MLP (dropout)": make_mlp(6, hidden=(7, 5), n_classes=3, seed=1),
            "nested, bias-free, flatten": nested, "frozen first weight": frozen,
            "single Linear": torch.nn.Linear(6, 2, bias=False)}


@pytest.mark.parametrize("name", list(_stack_models()))
def test_linear_stack_forward_and_vjps_equal_the_general_path(name):
    model = _stack_models()[name].double().eval()
    fm = FunctionalModel(model)
    assert fm._layers is not None
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    n_out = fm.forward(fm.theta_star, X[:1]).shape[1]
    W = torch.randn(11, 2, n_out, generator=gen, dtype=torch.float64)
    params = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
              for k, v in fm.theta_star.items()}
    twin = _general(fm)
    # The layer-by-layer forward runs the same operations as functional_call.
    expected = functional_call(model, ({**fm.constants, **params},), (X,))
    assert torch.equal(fm.forward(params, X), expected.reshape(11, -1))
    # Closed-form VJPs: the same float64 sums of products as vmap(grad), possibly in
    # another order, so a few ulp of the largest entry.
    fast = fm.per_sample_vjp(params, X, W)
    slow = twin.per_sample_vjp(params, X, W)
    assert fast.shape == slow.shape == (11, 2, fm.n_params)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), rtol=0,
                               atol=64 * EPS64 * float(slow.abs().max()))


def test_other_models_take_the_general_path():
    torch.manual_seed(0)

    class Custom(torch.nn.Sequential):       # may override forward
        pass

    hooked = torch.nn.Sequential(torch.nn.Linear(3, 2))
    hooked[0].register_forward_hook(lambda module, inputs, output: output * 2)
    others = [Custom(torch.nn.Linear(3, 2)), hooked,
              torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)),
              torch.nn.Sequential(torch.nn.Conv1d(1, 2, 2), torch.nn.Flatten())]
    for model in others:
        assert FunctionalModel(model)._layers is None, model
    # The hook is honoured (through functional_call).
    fm = FunctionalModel(hooked)
    x = torch.randn(4, 3)
    plain = torch.nn.functional.linear(x, hooked[0].weight, hooked[0].bias)
    assert torch.allclose(fm.forward(fm.theta_star, x), 2 * plain)


def test_vjps_stay_differentiable_when_the_parameters_require_grad():
    model = make_mlp(4, hidden=(3,), n_classes=2, seed=0).double().eval()
    fm = FunctionalModel(model)
    params = {k: v.clone().requires_grad_(True) for k, v in fm.theta_star.items()}
    X = torch.randn(5, 4, dtype=torch.float64)
    W = torch.randn(5, 1, 2, dtype=torch.float64)
    rows = fm.per_sample_vjp(params, X, W)
    assert rows.requires_grad             # the general path keeps the graph
    (grad,) = torch.autograd.grad(rows.sum(), [params["0.weight"]])
    assert torch.isfinite(grad).all()
