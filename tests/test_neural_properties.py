"""Property tests: fast paths against slow twins on random shapes and seeds; invariances."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iif_ref.neural import integrated_influence, resolve_loss, train_features

EPS64 = np.finfo(np.float64).eps


@settings(max_examples=10)
@given(n=st.integers(1, 7), d=st.integers(1, 4), hidden=st.integers(1, 4),
       out=st.integers(1, 3), chunk=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       loss=st.sampled_from(["mse", "cross_entropy"]))
def test_streamed_vmap_gradients_equal_autograd_loops(n, d, hidden, out, chunk, seed, loss):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(),
                              torch.nn.Linear(hidden, out)).double()
    X = rng.standard_normal((n, d))
    y_to, y_from = rng.random((n, out)), rng.random((n, out))
    Phi, Psi = train_features(net, loss, None, X, y_from, y_to, proj_dim=None,
                              chunk_size=chunk)
    fn = resolve_loss(loss).fn
    for i in range(n):
        rows = []
        for target in (y_to[i], y_from[i]):
            net.zero_grad()
            fn(net(torch.as_tensor(X[i:i + 1]))[0], torch.as_tensor(target)).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).numpy())
        scale = max(np.abs(rows[0]).max(), np.abs(rows[1]).max(), 1e-300)
        # Same float64 sums in another order: a few dozen ulp of the largest entry.
        np.testing.assert_allclose(Phi[i], rows[0], rtol=0, atol=64 * EPS64 * scale)
        np.testing.assert_allclose(Psi[i], rows[0] - rows[1], rtol=0, atol=64 * EPS64 * scale)


def test_permuting_training_samples_permutes_the_scores():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 3)), rng.integers(0, 3, 40)
    Xt, yt = rng.standard_normal((2, 3)), rng.integers(0, 3, 2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 3)).double()
    perm = rng.permutation(40)
    opts = dict(K=2, proj_dim=None, damping=0.5, progress=False)
    a = integrated_influence(net, "cross_entropy", X, y, Xt, yt, **opts)
    b = integrated_influence(net, "cross_entropy", X[perm], y[perm], Xt, yt, **opts)
    # Only the order of the sums over training samples changes: N·eps relative per sum,
    # amplified by κ of the damped Fisher in the solve.
    kappa = max(a.diagnostics["condition"])
    tol = 10 * kappa * 40 * EPS64 * np.abs(a.scores).max()
    np.testing.assert_allclose(b.scores, a.scores[:, perm], rtol=0, atol=tol)
    np.testing.assert_allclose(b.delta, a.delta, rtol=0, atol=tol)
