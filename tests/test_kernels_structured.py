"""Structured projections: CountSketch and the Kronecker-factored projection of Linear layers.

Bridge: every backend generates the same ±1 / bucket pattern bit for bit (the oracle is the
NumPy backend); CountSketch products are the same bytes on every backend (one summation
order, kernels/countsketch.cuh) and within the rounding bound of ``G @ A``; the factored
Kronecker products (flat ``G``, per-parameter blocks, per-sample factors ``(g, a)``) equal
``G`` times the materialised Kronecker matrix (the slow exact twin).
Property: ``E[A Aᵀ] = I`` (exact diagonal, Hoeffding bound on the off-diagonal mean over
seeds); the column split and factor shapes of the layout.
"""
import numpy as np
import pytest
import torch
from _backends import BACKEND_PARAMS  # tests/_backends.py
from hypothesis import given, settings
from hypothesis import strategies as st

from iif_ref.kernels import LinearBlock, Projector, project, projection_matrix
from iif_ref.kernels._kronecker import KroneckerLayout, factor_shape, split_columns
from iif_ref.kernels._registry import get_backend

# The dense projection's rounding bound, c sqrt(M) eps sum|G||A| with c = 4: the factored
# Kronecker evaluation rounds each product at most twice more, well inside c.
from test_kernels_projection import EPS, _dot_tolerance  # noqa: E402  (tests/ on sys.path)


# ------------------------------------------------------------------ the ±1 / bucket pattern
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**64 - 1),
       row_start=st.one_of(st.integers(0, 10**6), st.integers(2**32 - 70, 2**32 + 70)),
       n_rows=st.integers(1, 70), proj_dim=st.integers(1, 300),
       kind=st.sampled_from(["countsketch", "kronecker_in", "kronecker_out"]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_structured_blocks_equal_oracle_bit_for_bit(backend, seed, row_start, n_rows, proj_dim,
                                                    kind, dtype):
    got = get_backend(backend).generate(seed, row_start, n_rows, proj_dim, kind, dtype)
    want = get_backend("numpy").generate(seed, row_start, n_rows, proj_dim, kind, dtype)
    assert got.dtype == np.dtype(dtype) and got.tobytes() == want.tobytes()


def test_countsketch_has_one_signed_unit_per_row_from_the_documented_counter():
    from iif_ref.kernels._philox import philox4x32_10, split_seed
    seed, P = 2**50 + 17, 37
    A = projection_matrix(500, P, seed=seed, kind="countsketch")
    assert np.all((A != 0).sum(axis=1) == 1) and set(np.unique(A)) == {-1.0, 0.0, 1.0}
    k0, k1 = split_seed(seed)
    for m in (0, 1, 499):   # docs/rng.md: counter (m_lo, m_hi, 0, 2), h = r0 P >> 32, sign r1 & 1
        r0, r1, _, _ = philox4x32_10(np.uint64(m), np.uint64(0), np.uint64(0), np.uint64(2),
                                     k0, k1)
        h = (int(r0) * P) >> 32
        assert A[m, h] == (-1.0 if int(r1) & 1 else 1.0)


def test_countsketch_buckets_and_signs_are_balanced():
    # 2**16 rows into P = 8 buckets: each count is Binomial(n, 1/8) (sd 85); sign bits
    # Binomial(n, 1/2) (sd 128). 6 sd is a false-alarm rate of 2e-9 per count.
    A = projection_matrix(2**16, 8, seed=5, kind="countsketch")
    n = A.shape[0]
    counts = (A != 0).sum(axis=0)
    assert np.all(np.abs(counts - n / 8) < 6 * np.sqrt(n / 8 * 7 / 8))
    assert abs((A < 0).sum() - n / 2) < 6 * np.sqrt(n / 4)


# ------------------------------------------------------------------ CountSketch products
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 9), n_params=st.integers(1, 700), proj_dim=st.integers(1, 300),
       seed=st.integers(0, 2**64 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       budget_rows=st.integers(1, 800))
def test_countsketch_project_equals_oracle_bytes_and_g_times_a(backend, n, n_params, proj_dim,
                                                              seed, dtype, budget_rows):
    G = np.random.default_rng(n_params).standard_normal((n, n_params)).astype(dtype)
    budget = budget_rows * proj_dim * np.dtype(dtype).itemsize
    got = project(G, proj_dim, seed=seed, kind="countsketch", backend=backend,
                  memory_budget=budget)
    oracle = project(G, proj_dim, seed=seed, kind="countsketch", backend="numpy")
    assert got.dtype == np.dtype(dtype) and got.tobytes() == oracle.tobytes()
    A = projection_matrix(n_params, proj_dim, seed=seed, kind="countsketch")
    exact = G.astype(np.float64) @ A
    # Each entry sums its bucket's k_p terms in order: error <= (k_p - 1) u sum |G| <= M u sum|G|.
    bound = n_params * EPS[np.dtype(dtype)] / 2 * (np.abs(G.astype(np.float64)) @ np.abs(A))
    assert np.all(np.abs(got - exact) <= bound)


# ------------------------------------------------------------------ E[A Aᵀ] = I
def _gram_over_seeds(make, seeds):
    total = None
    for seed in seeds:
        A = make(seed)
        total = A @ A.T if total is None else total + A @ A.T
    return total / len(seeds)


@pytest.mark.parametrize("which", ["countsketch", "kronecker"])
def test_expected_a_at_is_identity(which):
    # Every (A Aᵀ)[m, m'] is a sum of products of unit-norm rows, so it lies in [-1, 1];
    # its mean over S independent seeds deviates from its expectation by more than t with
    # probability <= 2 exp(-S t² / 2) (Hoeffding): t = 0.15, S = 2000 gives 3.4e-10 per
    # entry. A sign bias or correlated rows would shift the mean by >= 1/P = 0.25 (P = 4).
    # The diagonal is 1 exactly (CountSketch) or to rounding (b entries (1/sqrt b)²).
    S = 2000
    if which == "countsketch":
        def make(seed):
            return projection_matrix(12, 4, seed=seed, kind="countsketch")
    else:
        layers = [LinearBlock(0, 3, 2, bias=6)]  # 9 parameters + 3 others: rest block

        def make(seed):
            return projection_matrix(12, 7, seed=seed, kind="kronecker", layers=layers)
    mean = _gram_over_seeds(make, range(S))
    one = make(0)
    np.testing.assert_allclose(np.diag(one @ one.T), 1.0, rtol=0, atol=8 * EPS[np.dtype(np.float64)])
    off = mean - np.diag(np.diag(mean))
    assert np.max(np.abs(off)) < 0.15, off


# ------------------------------------------------------------------ Kronecker
layer_shapes = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9), st.booleans()),
                        min_size=1, max_size=3)


def _stack(shapes, extra):
    """LinearBlocks laid out weight, bias, weight, bias, ... with ``extra`` rest parameters
    in front (e.g. an embedding) and n_params."""
    layers, offset = [], extra
    for d_out, d_in, bias in shapes:
        w = offset
        offset += d_out * d_in
        b = offset if bias else None
        offset += d_out if bias else 0
        layers.append(LinearBlock(w, d_out, d_in, b))
    return layers, offset


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=15, deadline=None)
@given(shapes=layer_shapes, extra=st.integers(0, 5), n=st.integers(1, 6),
       seed=st.integers(0, 2**64 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       data=st.data())
def test_kronecker_projection_equals_g_times_materialised_kronecker_matrix(
        backend, shapes, extra, n, seed, dtype, data):
    layers, n_params = _stack(shapes, extra)
    n_blocks = len(layers) + (extra > 0)
    proj_dim = data.draw(st.integers(n_blocks, n_params))
    proj = Projector(n_params, proj_dim, seed=seed, kind="kronecker", dtype=dtype,
                     backend=backend, layers=layers)
    A = projection_matrix(n_params, proj_dim, seed=seed, kind="kronecker", layers=layers,
                          dtype=dtype)
    oracle = Projector(n_params, proj_dim, seed=seed, kind="kronecker", dtype=dtype,
                       backend="numpy", layers=layers)
    for (so, si), (oo, oi) in zip(proj.factor_pairs, oracle.factor_pairs):
        assert so.tobytes() == oo.tobytes() and si.tobytes() == oi.tobytes()
    G = np.random.default_rng(n_params).standard_normal((n, n_params)).astype(dtype)
    got = proj(G)
    assert got.dtype == np.dtype(dtype)
    assert np.all(np.abs(got - G.astype(np.float64) @ A.astype(np.float64))
                  <= _dot_tolerance(G, A, dtype))


def test_kronecker_rows_are_outer_products_of_the_factors():
    # A[(o, i), c] = S_out[o, q] S_in[i, r] / sqrt(b), c = q p_in + r; the bias is input i = d_in.
    layers = [LinearBlock(0, 5, 4, bias=20)]
    proj = Projector(25, 12, seed=3, kind="kronecker", dtype=np.float64, backend="numpy",
                     layers=layers)
    A = projection_matrix(25, 12, seed=3, kind="kronecker", layers=layers)
    (S_out, S_in), = proj.factor_pairs
    group = proj.layout.groups[0]
    for o in range(5):
        for i in range(5):
            row = A[20 + o] if i == 4 else A[o * 4 + i]
            want = np.outer(S_out[o], S_in[i]).reshape(-1)[:group.size] / np.sqrt(12)
            assert np.array_equal(row, want)
    assert S_out.shape == (5, group.p_out) and S_in.shape == (5, group.p_in)


def test_kronecker_factored_torch_path_equals_materialised_matrix():
    # The torch side: per-sample factors (g, a) of an nn.Linear stack, never forming g aᵀ,
    # and the per-parameter blocks, against the flat per-sample gradients times A.
    from iif_ref.neural.features import linear_blocks, make_projector, train_features
    from iif_ref.neural.functional import FunctionalModel
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(),
                              torch.nn.Linear(7, 3, bias=False)).double()
    X, y = torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 3, (11,))
    fm = FunctionalModel(net)
    U, _ = train_features(net, "cross_entropy", None, X, y, y, proj_dim=None)
    for kind in ("kronecker", "countsketch"):
        layers = linear_blocks(fm) if kind == "kronecker" else None
        A = projection_matrix(fm.n_params, 20, seed=4, kind=kind, layers=layers)
        Phi, _ = train_features(net, "cross_entropy", None, X, y, y, proj_dim=20, seed=4,
                                kind=kind)
        tol = _dot_tolerance(U, A, np.float64)
        assert np.all(np.abs(Phi - U @ A) <= tol), kind
        proj = make_projector(fm, 20, seed=4, kind=kind, backend=None)
        flat = proj.project_tensor(torch.as_tensor(U))
        assert np.all(np.abs(flat - U @ A) <= tol), kind


def test_linear_blocks_find_linear_layers_in_a_module_subclass():
    from iif_ref.neural.features import linear_blocks
    from iif_ref.neural.functional import FunctionalModel

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))    # outside any Linear: rest
            self.body = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.body(x * self.scale)

    fm = FunctionalModel(Net())
    assert linear_blocks(fm) == [LinearBlock(4, 3, 4, 16)]
    layout = KroneckerLayout(fm.n_params, linear_blocks(fm), 6)
    assert layout.rest_index.tolist() == [0, 1, 2, 3]
    assert [g.size for g in layout.groups] == [3, 3]


@settings(max_examples=50, deadline=None)
@given(capacities=st.lists(st.integers(1, 50), min_size=1, max_size=6), data=st.data())
def test_split_columns_is_equal_up_to_capacity(capacities, data):
    total = data.draw(st.integers(len(capacities), sum(capacities)))
    shares = split_columns(total, capacities)
    assert sum(shares) == total
    assert all(1 <= s <= c for s, c in zip(shares, capacities))
    # Max-min fair: a block below its capacity has at most one column less than any other.
    uncapped = [s for s, c in zip(shares, capacities) if s < c]
    assert not uncapped or max(shares) <= min(uncapped) + 1


@settings(max_examples=100, deadline=None)
@given(d_out=st.integers(1, 300), width=st.integers(1, 300), data=st.data())
def test_factor_shape_fits_the_layer_and_covers_the_block(d_out, width, data):
    b = data.draw(st.integers(1, d_out * width))
    p_out, p_in = factor_shape(b, d_out, width)
    assert 1 <= p_out <= d_out and 1 <= p_in <= width and p_out * p_in >= b
    assert p_out * (p_in - 1) < b     # no wasted row of the grid


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(kind="kronecker"), ValueError, "needs layers="),
    (dict(kind="rademacher", layers=[LinearBlock(0, 2, 2)]), ValueError, "only used by"),
    (dict(kind="kronecker", layers=[LinearBlock(0, 2, 2), LinearBlock(3, 2, 2)]), ValueError,
     "overlaps"),
    (dict(kind="kronecker", layers=[LinearBlock(0, 5, 5)]), ValueError, "outside"),
    (dict(kind="kronecker", layers=[]), ValueError, "layers is empty"),
    (dict(kind="kronecker", layers=[(0, 2, 2)]), TypeError, "LinearBlock"),
    (dict(kind="sparse"), ValueError, "countsketch"),
])
def test_projector_bad_structure_raises_naming_it(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Projector(20, 4, dtype=np.float64, backend="numpy", **kwargs)


def test_kronecker_proj_dim_limits():
    layers = [LinearBlock(0, 2, 2), LinearBlock(4, 2, 2)]
    with pytest.raises(ValueError, match="smaller than the number of Kronecker blocks"):
        Projector(10, 2, kind="kronecker", layers=layers, backend="numpy")   # 3 blocks
    with pytest.raises(ValueError, match="exceeds"):
        Projector(8, 9, kind="kronecker", layers=layers, backend="numpy")


def test_config_accepts_structured_kinds_and_rejects_others():
    from iif_ref.neural.config import IIFConfig
    assert IIFConfig(kind="kronecker").kind == "kronecker"
    assert IIFConfig(kind="countsketch").kind == "countsketch"
    with pytest.raises(ValueError, match="kind"):
        IIFConfig(kind="sparse")
