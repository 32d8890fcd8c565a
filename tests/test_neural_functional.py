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
    twin._layers, twin.closed_form = None, False
    return twin


def _inputs_weights_params(fm, n, *, seed):
    """``n`` float64 inputs of width 6, two output weights per sample, and θ* moved off
    the trained point (so that no gradient vanishes by accident)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    n_out = fm.forward(fm.theta_star, X[:1]).shape[1]
    W = torch.randn(n, 2, n_out, generator=gen, dtype=torch.float64)
    params = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
              for k, v in fm.theta_star.items()}
    return X, W, params


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
    X, W, params = _inputs_weights_params(fm, 11, seed=3)
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


class _SubclassMLP(torch.nn.Module):
    """An MLP as users write it: layers as attributes, ``forward`` calling torch.relu."""

    def __init__(self, d_in, hidden, d_out, *, bias=True, dropout=0.0):
        super().__init__()
        dims = (d_in, *hidden, d_out)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, bias=bias)
                                          for a, b in zip(dims[:-1], dims[1:]))
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.drop(torch.relu(layer(x)))
        return self.layers[-1](x)


class _SharedModule(torch.nn.Module):
    """One Linear called at two sites: its gradient is a sum of two outer products."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = (torch.nn.Linear(6, 5), torch.nn.Linear(5, 5),
                                           torch.nn.Linear(5, 3))

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


class _TiedWeights(torch.nn.Module):
    """One Parameter held by two Linear modules (named once by named_parameters)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


class _WeightReadElsewhere(torch.nn.Module):
    """A Linear's weight also used outside the Linear call (a module hook cannot see it)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)

    def forward(self, x):
        z = self.fc(x)
        return self.head(torch.relu(z) + x @ self.fc.weight.T)


class _Sequence(torch.nn.Module):
    """A Linear over a sequence axis, input (n, seq, d): Σ_s g_s a_sᵀ per sample."""

    def __init__(self):
        super().__init__()
        self.token, self.head = torch.nn.Linear(6, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.token(x.reshape(x.shape[0], 3, 2).repeat(1, 1, 3)))
                         .mean(dim=1))


class _WithLayerNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.head = (torch.nn.Linear(6, 5), torch.nn.LayerNorm(5),
                                         torch.nn.Linear(5, 2))

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.fc(x))))


def _module_models():
    """name -> (model, whether the closed form applies, whether its factors are 2-D)."""
    torch.manual_seed(1)
    inplace = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(inplace=True),
                                  torch.nn.Linear(5, 3))
    unused = _SubclassMLP(6, (5,), 3)
    unused.spare = torch.nn.Linear(2, 2)
    return {"subclass MLP": (_SubclassMLP(6, (7, 5), 3), True, True),
            "subclass MLP, bias-free": (_SubclassMLP(6, (5,), 3, bias=False), True, True),
            "subclass MLP, dropout (eval)": (_SubclassMLP(6, (5,), 3, dropout=0.5), True,
                                             True),
            "nested subclass in Sequential": (torch.nn.Sequential(
                torch.nn.Flatten(), _SubclassMLP(6, (5,), 4), torch.nn.GELU(),
                torch.nn.Linear(4, 3)), True, True),
            "Sequential, in-place ReLU": (inplace, True, True),
            "one Linear called twice": (_SharedModule(), True, False),
            "tied weights": (_TiedWeights(), True, False),
            "Linear over a sequence axis": (_Sequence(), True, False),
            "weight read outside its Linear": (_WeightReadElsewhere(), False, False),
            "LayerNorm": (_WithLayerNorm(), False, False),
            "unused parameter": (unused, False, False)}


@pytest.mark.parametrize("name", list(_module_models()))
def test_linear_call_factors_equal_the_general_path(name):
    """Closed-form per-sample VJPs of any module equal vmap(grad) to a few ulp; models
    whose parameters are not all in Linear calls take the general path."""
    model, closed, flat = _module_models()[name]
    model = model.double().eval()
    fm = FunctionalModel(model)
    X, W, params = _inputs_weights_params(fm, 9, seed=4)
    # The substituted forward is functional_call's, bit for bit (tied weights included).
    expected = functional_call(model, ({**fm.constants, **params},), (X,))
    assert torch.equal(fm.forward(params, X), expected.reshape(9, -1))
    assert (fm.per_sample_vjp_factors(params, X, W, sequence=True) is not None) == closed
    factors = fm.per_sample_vjp_factors(params, X, W)
    assert (factors is not None) == (closed and flat)
    if factors is not None:
        for f, shape in zip(factors, fm.shapes):
            assert (f[0].shape[1] * f[1].shape[1] if isinstance(f, tuple)
                    else f.shape[1]) == int(np.prod(shape))
    fast = fm.per_sample_vjp(params, X, W)
    slow = _general(fm).per_sample_vjp(params, X, W)
    assert fast.shape == slow.shape == (9, 2, fm.n_params)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), rtol=0,
                               atol=64 * EPS64 * float(slow.abs().max()))


def test_substitution_is_undone_and_reaches_buffers():
    """θ and the buffers (in the compute dtype) are in place for one call only."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    model[1].running_mean.add_(0.5)
    fm = FunctionalModel(model, dtype="float64")
    x = torch.randn(5, 3, dtype=torch.float64)
    out = fm.forward(fm.theta_star, x)
    assert out.dtype == torch.float64
    assert torch.equal(out, functional_call(model, ({**fm.constants, **fm.theta_star},),
                                            (x,)))
    assert model[0].weight.dtype == torch.float32
    assert isinstance(model[0].weight, torch.nn.Parameter)
    assert model[1].running_mean.dtype == torch.float32


def test_iif_of_a_subclass_model_equals_its_sequential_twin(monkeypatch):
    """The same function written as a Sequential (layer-by-layer path) and as a subclass
    (substituted forward, Linear calls recorded by the mode) gets the same IIF scores;
    and the subclass's scores equal those of its general vmap(grad) path."""
    from iif_ref.neural import integrated_influence

    torch.manual_seed(2)
    seq = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5),
                              torch.nn.ReLU(), torch.nn.Linear(5, 3)).double().eval()
    sub = _SubclassMLP(6, (7, 5), 3).double().eval()
    sub.load_state_dict({f"layers.{i}.{k}": v for i, j in enumerate((0, 2, 4))
                         for k, v in seq[j].state_dict().items()})
    gen = np.random.default_rng(5)
    X, Xt = gen.standard_normal((30, 6)), gen.standard_normal((4, 6))
    y, yt = gen.integers(0, 3, 30), gen.integers(0, 3, 4)
    opts = dict(K=2, proj_dim=16, baseline="prediction", progress=False)
    # float64 VJPs that differ in summation order only (a few ulp), through K step
    # solves whose condition numbers stay below ~1e4 here: 1e-10 of the largest score.
    a = integrated_influence(seq, "cross_entropy", X, y, Xt, yt, **opts).scores
    b = integrated_influence(sub, "cross_entropy", X, y, Xt, yt, **opts).scores
    scale = float(np.abs(a).max())
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-10 * scale)
    monkeypatch.setattr(FunctionalModel, "per_sample_vjp_factors",
                        lambda self, *args, **kwargs: None)       # the general path
    general = integrated_influence(sub, "cross_entropy", X, y, Xt, yt, **opts).scores
    np.testing.assert_allclose(b, general, rtol=0, atol=1e-10 * scale)


def test_weight_and_bias_of_one_linear_share_their_output_gradient():
    """Callers group a Linear's weight and bias by the identity of their g (an exact
    Gram uses g gᵀ once per layer): the factors keep one tensor for both."""
    fm = FunctionalModel(_SubclassMLP(6, (5,), 3).double().eval())
    X, W, params = _inputs_weights_params(fm, 4, seed=1)
    factors = dict(zip(fm.names, fm.per_sample_vjp_factors(params, X, W)))
    for i in range(2):
        assert factors[f"layers.{i}.weight"][0] is factors[f"layers.{i}.bias"]


def test_linear_factors_are_the_same_inside_a_callers_no_grad_block():
    # The exact oracle asks for factors under torch.no_grad(); the backward pass that
    # gives g must still run (it once failed there: the graph was cut at out.reshape).
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 3)).double()
    fm = FunctionalModel(net)
    X = torch.randn(5, 4, dtype=torch.float64)
    W = torch.randn(5, 2, 3, dtype=torch.float64)
    free = fm.per_sample_vjp_factors(fm.theta_star, X, W)
    with torch.no_grad():
        blocked = fm.per_sample_vjp_factors(fm.theta_star, X, W)
    assert free is not None and blocked is not None
    for f, b in zip(free, blocked):
        for x, y in zip(f if isinstance(f, tuple) else (f,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(x, y)
