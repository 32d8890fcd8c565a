"""Fast paths of the featurisation against their slow twins, bit for bit.

* ``A`` generated once and reused (:class:`iif_ref.kernels.Projector`) against ``A``
  regenerated for every projection (:func:`iif_ref.kernels.project`);
* one projector shared by every path step of a run against a new one per step;
* the chunk size chosen from the memory budget against one chunk for all samples.

Each comparison is exact (``array_equal``): the fast path performs the same
floating-point operations on the same operands, only fewer times.
"""
import numpy as np
import pytest
import torch

from iif_ref.kernels import Projector, project, projection_matrix
from iif_ref.neural import features, integrated_influence, trak
from iif_ref.neural.features import chunk_rows, make_projector, step_features


EPS64 = np.finfo(np.float64).eps


def _problem(seed=0, n=37, n_test=5):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    X = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    Xt = torch.randn(n_test, 6, generator=g)
    yt = torch.randint(0, 3, (n_test,), generator=g)
    return net, X, y, Xt, yt


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_projector_holding_a_equals_regenerating_it_bit_for_bit(backend, dtype):
    G = np.random.default_rng(0).standard_normal((9, 301)).astype(dtype)
    proj = Projector(301, 24, seed=7, dtype=dtype, backend=backend)
    assert proj.A is not None and not proj.A.flags.writeable
    assert np.array_equal(proj.A, projection_matrix(301, 24, seed=7, dtype=dtype))
    for rows in (G, G[:1], np.asfortranarray(G)):
        assert np.array_equal(proj(rows), project(rows, 24, seed=7, backend=backend))


def test_projector_streams_when_a_exceeds_its_budget():
    G = np.random.default_rng(1).standard_normal((4, 300))
    small = Projector(300, 16, seed=2, dtype=np.float64, backend="numpy",
                      memory_budget=16 * 8 * 50)          # 50 rows of A, not 300
    assert small.A is None
    assert np.array_equal(small(G), project(G, 16, seed=2, backend="numpy",
                                            memory_budget=16 * 8 * 50))
    with pytest.raises(ValueError, match="n_params=300 columns"):
        Projector(300, 16, dtype=np.float64, backend="numpy")(G[:, :299])


def test_shared_projector_equals_a_new_one_per_call_and_is_checked():
    net, X, y, Xt, yt = _problem()
    Y = torch.nn.functional.one_hot(y, 3).double()
    fm = features._prepare(net, "cross_entropy", None, "float64")[0]
    proj = make_projector(fm, 16, seed=3, kind="rademacher", backend="numpy")
    common = dict(proj_dim=16, seed=3, backend="numpy", dtype="float64", fuse=False)
    shared = step_features(net, "cross_entropy", None, X, 0.5 * Y, Y, Xt, yt,
                           projector=proj, **common)
    fresh = step_features(net, "cross_entropy", None, X, 0.5 * Y, Y, Xt, yt, **common)
    for a, b in zip(shared, fresh):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="projector projects"):
        step_features(net, "cross_entropy", None, X, Y, Y, projector=proj,
                      **{**common, "seed": 4})


def test_chunk_size_from_the_budget_caps_the_gradient_block(monkeypatch):
    # Above the floor of MIN_CHUNK_ROWS samples, the budget decides; below it, the floor
    # (a GEMM of fewer rows is bound by reading A); a smaller chunk_size is honoured.
    floor = features.MIN_CHUNK_ROWS
    assert chunk_rows(None, 1000, 4, memory_budget=8 * 1000 * 100) == 100
    assert chunk_rows(256, 1000, 4, memory_budget=8 * 1000 * 100) == 100
    assert chunk_rows(3, 1000, 4, memory_budget=8 * 1000 * 100) == 3
    assert chunk_rows(None, 10**9, 8, memory_budget=1) == floor
    assert chunk_rows(256, 10**9, 8, memory_budget=1) == floor
    monkeypatch.setattr(features, "MIN_CHUNK_ROWS", 1)
    assert chunk_rows(None, 10**9, 8, memory_budget=1) == 1     # never below one sample


def test_budget_chosen_chunks_give_identical_scores(monkeypatch):
    net, X, y, Xt, yt = _problem(n=41, n_test=4)
    opts = dict(proj_dim=16, K=2, baseline="prediction", progress=False, dtype="float64",
                backend="numpy")
    whole = integrated_influence(net, "cross_entropy", X, y, Xt, yt, chunk_size=1000, **opts)
    whole_trak = trak(net, "cross_entropy", X, y, Xt, yt, proj_dim=16, chunk_size=1000,
                      dtype="float64", backend="numpy")
    # A budget of 7 samples' gradient blocks (n_params = 83): chunks of 7 (the given
    # chunk_size is an upper limit), the last of 6, so the test rows ride along.
    n_params = sum(p.numel() for p in net.parameters())
    monkeypatch.setattr(features, "FEATURE_MEMORY_BUDGET", 2 * n_params * 8 * 7)
    monkeypatch.setattr(features, "MIN_CHUNK_ROWS", 1)
    assert chunk_rows(None, n_params, 8) == 7
    chunked = integrated_influence(net, "cross_entropy", X, y, Xt, yt, chunk_size=256,
                                   **opts)
    chunked_trak = trak(net, "cross_entropy", X, y, Xt, yt, proj_dim=16, chunk_size=None,
                        dtype="float64", backend="numpy")
    assert np.array_equal(chunked.scores, whole.scores)
    assert np.array_equal(chunked_trak.scores, whole_trak.scores)


@pytest.mark.parametrize("name", ["mse", "cross_entropy"])
def test_closed_form_output_weights_equal_the_autodiff_gradient(name):
    from torch.func import grad, vmap

    from iif_ref.neural.functional import output_weights
    from iif_ref.neural.losses import resolve_loss

    loss = resolve_loss(name)
    g = torch.Generator().manual_seed(0)
    F = torch.randn(50, 7, generator=g, dtype=torch.float64) * 5
    Y = torch.rand(50, 7, generator=g, dtype=torch.float64)    # soft, unnormalised targets
    auto = vmap(grad(loss.fn, argnums=0))(F, Y)
    # Both are a few float64 operations on entries of order 1-10: rounding only.
    assert torch.allclose(output_weights(loss, F, Y), auto, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", ["mse", "cross_entropy"])
def test_batched_losses_equal_the_per_sample_loss_row_by_row(name):
    from torch.func import vmap

    from iif_ref.neural.losses import resolve_loss

    loss = resolve_loss(name)
    g = torch.Generator().manual_seed(1)
    F = torch.randn(50, 7, generator=g, dtype=torch.float64) * 5
    Y = torch.rand(50, 7, generator=g, dtype=torch.float64)
    # The same float64 operations on each row (a sum of 7 terms of order 1-100): rounding.
    torch.testing.assert_close(loss.batched(F, Y), vmap(loss.fn)(F, Y), rtol=1e-14, atol=0)


def test_closed_form_trak_margin_weights_equal_the_autodiff_gradient():
    from torch.func import grad, vmap

    from iif_ref.neural.functional import output_weights
    from iif_ref.neural.losses import TargetLinearLoss, trak_margin

    g = torch.Generator().manual_seed(2)
    F = torch.randn(50, 7, generator=g, dtype=torch.float64) * 5
    Y = torch.nn.functional.one_hot(torch.randint(0, 7, (50,), generator=g), 7).double()
    # gradient_features wraps an output function in a TargetLinearLoss like this one.
    margin = TargetLinearLoss("trak_margin", trak_margin, lambda f: f, classification=True)
    auto = vmap(grad(trak_margin, argnums=0))(F, Y)
    # A softmax over 6 logits of order 1-10 and one subtraction: rounding only.
    assert torch.allclose(output_weights(margin, F, Y), auto, rtol=0, atol=1e-13)


def test_projected_fisher_of_a_float32_model_is_accumulated_in_float64(monkeypatch):
    # docs/conventions.md ("precision"): a float32 model's features are float32 and
    # their Gram ΦᵀΦ (Eq. 31) is accumulated in float64. A float32 accumulation would be off by ~1e-7
    # relative; the Gram that reaches the solve must equal the float64 product of the
    # float32 features to float64 rounding.
    from iif_ref.neural import engine

    net, X, y, Xt, yt = _problem(seed=3, n=200)            # a float32 model
    seen = {}
    real_features, real_scores = engine.step_features, engine.dense_scores

    def features(*args, **kwargs):
        out = real_features(*args, **kwargs)
        seen["Phi"] = out[0]
        return out

    def scores(C, *args, **kwargs):
        seen["C"] = C
        return real_scores(C, *args, **kwargs)

    monkeypatch.setattr(engine, "step_features", features)
    monkeypatch.setattr(engine, "dense_scores", scores)
    integrated_influence(net, "cross_entropy", X, y, Xt, yt, K=1, baseline="prediction",
                         proj_dim=24, progress=False)
    Phi, C = seen["Phi"], seen["C"]
    assert Phi.dtype == np.float32 and C.dtype == np.float64
    Phi64 = Phi.astype(np.float64)
    ref = Phi64.T @ Phi64
    # Sums of 200 products: float64 rounding ≤ 200·eps64 of the largest |entry|.
    np.testing.assert_allclose(C, ref, rtol=0, atol=200 * EPS64 * np.abs(ref).max())


def test_float64_row_blocks_give_the_whole_matrix_gram_and_solve(monkeypatch):
    """projected_gram and dense_scores promote float32 features to float64 one row block
    at a time (no float64 copy of Φ or Ψ); the Gram's products are exact in float64, so
    blocking changes only the summation order (a few ulp of ΣΦ²), and each block's solve
    refactors the same matrix (the same factor)."""
    from iif_ref.kernels import solve_step
    from iif_ref.neural import curvature

    rng = np.random.default_rng(0)
    Phi = rng.standard_normal((50, 6)).astype(np.float32)
    Psi = rng.standard_normal((50, 6)).astype(np.float32)
    Gamma = rng.standard_normal((3, 6))
    P64 = Phi.astype(np.float64)
    whole = P64.T @ P64
    monkeypatch.setattr(curvature, "FLOAT64_BLOCK_ROWS", 16)     # blocks of 16, 16, 16, 2
    C = curvature.projected_gram(Phi)
    eps = np.finfo(np.float64).eps
    np.testing.assert_allclose(C, whole, rtol=0,
                               atol=8 * eps * float((P64 ** 2).sum(axis=0).max()))
    blocked, cond = curvature.dense_scores(C, Psi, Gamma, damping=0.1, step=1)
    direct, cond_direct = solve_step(C, Psi, Gamma, damping=0.1, step=1)
    assert cond == cond_direct
    np.testing.assert_allclose(blocked, direct, rtol=0,
                               atol=64 * eps * float(np.abs(direct).max()))


@pytest.mark.parametrize("mixed", [False, True])
def test_psi_as_scale_is_the_fused_psi(mixed):
    """With psi_as_scale, a step whose chunks all fuse returns α with Ψ = α Φ row-wise,
    bit for bit the Ψ it returns otherwise; a chunk that does not fuse (here the second)
    makes it return Ψ itself, the same array as without the option."""
    net, X, y, Xt, yt = _problem(n=40, n_test=3)
    Y = np.eye(3)[y]
    Y_from = 0.5 * Y
    if mixed:
        Y_from[20:] = 0.1                 # not parallel to e_y: these chunks take two rows
    common = dict(proj_dim=16, seed=0, chunk_size=20, dtype="float32")
    Phi, Psi, Gamma = step_features(net, "cross_entropy", None, X, Y_from, Y, Xt, yt,
                                    **common)
    Phi2, scaled, Gamma2 = step_features(net, "cross_entropy", None, X, Y_from, Y, Xt, yt,
                                         psi_as_scale=True, **common)
    assert np.array_equal(Phi, Phi2) and np.array_equal(Gamma, Gamma2)
    if mixed:
        assert scaled.shape == Psi.shape and np.array_equal(scaled, Psi)
    else:
        assert scaled.shape == (40,)
        assert np.array_equal(Phi * scaled[:, None].astype(Phi.dtype), Psi)
