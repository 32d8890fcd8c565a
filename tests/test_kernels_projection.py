"""project(): Phi = G A streamed over row blocks of A (Eq. 17, 31).

Bridge: every backend against ``G @ projection_matrix(...)`` (the oracle).
Property: invariance to the memory budget (block size) and to splitting the rows of G;
the Johnson–Lindenstrauss norm bound; the float32 accumulation bound.
"""
import numpy as np
import pytest
from _backends import BACKEND_PARAMS  # tests/_backends.py
from hypothesis import given, settings
from hypothesis import strategies as st

from iif_ref.kernels import project, projection_matrix

EPS = {np.dtype(np.float32): float(np.finfo(np.float32).eps),
       np.dtype(np.float64): float(np.finfo(np.float64).eps)}


def _dot_tolerance(G, A, dtype):
    """Rounding bound for Phi[i, p] = sum_m G[i, m] A[m, p] accumulated in ``dtype``.

    Each of the M products and partial sums is rounded once; the errors of a sum of M
    terms add like a random walk, so |error| <= c sqrt(M) eps sum_m |G A| with c = 4
    covering the blocked BLAS order and the rounding of A itself (the worst case,
    M eps, is what no test of a real summation should need). Both operands are
    evaluated in float64 here, so this is a bound on |computed - exact|.
    """
    M = G.shape[1]
    scale = np.abs(G.astype(np.float64)) @ np.abs(A.astype(np.float64))
    return 4 * np.sqrt(M) * EPS[np.dtype(dtype)] * scale + np.finfo(np.float64).tiny


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=10)
@given(n=st.integers(1, 9), n_params=st.integers(1, 700), proj_dim=st.integers(1, 300),
       seed=st.integers(0, 2**64 - 1), kind=st.sampled_from(["rademacher", "gaussian"]),
       dtype=st.sampled_from([np.float32, np.float64]), order=st.sampled_from("CF"),
       budget_rows=st.integers(1, 800))
def test_project_equals_g_times_materialised_a(backend, n, n_params, proj_dim, seed, kind,
                                               dtype, order, budget_rows):
    G = np.asarray(np.random.default_rng(seed % 2**32).standard_normal((n, n_params)),
                   dtype=dtype, order=order)
    budget = budget_rows * proj_dim * np.dtype(dtype).itemsize
    Phi = project(G, proj_dim, seed=seed, kind=kind, backend=backend, memory_budget=budget)
    A64 = projection_matrix(n_params, proj_dim, seed=seed, kind=kind, dtype=np.float64)
    exact = G.astype(np.float64) @ A64
    assert Phi.shape == (n, proj_dim) and Phi.dtype == dtype
    assert np.all(np.abs(Phi - exact) <= _dot_tolerance(G, A64, dtype))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_project_invariant_to_memory_budget(backend):
    G = np.random.default_rng(0).standard_normal((6, 1000))
    P = 96
    ref = project(G, P, seed=3, backend=backend, memory_budget=1000 * P * 8)  # one block
    A = projection_matrix(1000, P, seed=3)
    tol = _dot_tolerance(G, A, np.float64)
    for rows in (1, 7, 128, 999):
        got = project(G, P, seed=3, backend=backend, memory_budget=rows * P * 8 + 5)
        assert np.all(np.abs(got - ref) <= 2 * tol), rows  # both within tol of exact


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_project_invariant_to_splitting_rows_of_g(backend):
    G = np.random.default_rng(1).standard_normal((40, 513)).astype(np.float32)
    whole = project(G, 200, seed=8, backend=backend)
    parts = np.concatenate([project(G[a:b], 200, seed=8, backend=backend)
                            for a, b in [(0, 1), (1, 17), (17, 40)]])
    A = projection_matrix(513, 200, seed=8)
    assert np.all(np.abs(whole - parts) <= 2 * _dot_tolerance(G, A, np.float32))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_projection_with_a_seed_above_2_32_equals_g_times_materialised_a(backend):
    # Every backend, numpy included, against the dense product with A materialised
    # independently of the streamed kernel; the seed's high word must matter (a backend
    # that truncated the seed to 32 bits would return the projection of seed 1).
    G = np.random.default_rng(2).standard_normal((3, 2000))
    seed = 2**40 + 1
    got = project(G, 130, seed=seed, backend=backend)
    A = projection_matrix(2000, 130, seed=seed, dtype=np.float64)
    assert np.all(np.abs(got - G @ A) <= _dot_tolerance(G, A, np.float64))
    low_word = project(G, 130, seed=seed % 2**32, backend=backend)
    assert np.linalg.norm(got - low_word) > 0.5 * np.linalg.norm(got)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_float32_projection_within_sqrt_m_eps32_of_float64(backend):
    """Documented bound: float32 accumulation error ~ sqrt(M) eps32 relative."""
    M, P = 20000, 64
    G64 = np.random.default_rng(4).standard_normal((4, M))
    G32 = G64.astype(np.float32)
    Phi32 = project(G32, P, seed=1, backend=backend)
    Phi64 = project(G32.astype(np.float64), P, seed=1, backend=backend)
    A = projection_matrix(M, P, seed=1)
    assert np.all(np.abs(Phi32 - Phi64) <= _dot_tolerance(G32, A, np.float32)
                  + _dot_tolerance(G32, A, np.float64))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_johnson_lindenstrauss_norm_preservation(backend, kind):
    """||x A||^2 / ||x||^2 concentrates at 1: for Rademacher and Gaussian A,
    P(|ratio - 1| > e) <= 2 exp(-P (e^2/2 - e^3/3) / 2) (Achlioptas 2003). With
    P = 1024 and 50 vectors, e = 0.3 puts the chance of any failure below 1e-5."""
    P, M, n = 1024, 3000, 50
    rng = np.random.default_rng(5)
    X = rng.standard_normal((n, M)) * rng.exponential(size=(n, 1))
    X[0] = 0.0
    X[0, 17] = 3.0  # a 1-sparse vector: the worst case for sparse projections
    e = 0.3
    assert n * 2 * np.exp(-P * (e**2 / 2 - e**3 / 3) / 2) < 1e-5
    ratio = np.sum(project(X, P, seed=21, kind=kind, backend=backend) ** 2, axis=1) \
        / np.sum(X**2, axis=1)
    assert np.all(np.abs(ratio - 1) <= e)
    # E ratio = 1 with variance <= 2/P per vector (Rademacher: 2/P (1 - sum x^4/|x|^4)).
    assert abs(ratio.mean() - 1) <= 6 * np.sqrt(2 / P / n)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_project_does_not_modify_input_and_accepts_views(backend):
    G = np.random.default_rng(6).standard_normal((10, 300))
    before = G.copy()
    view = G[::2, 50:250]  # neither C- nor F-contiguous
    got = project(view, 33, seed=4, backend=backend)
    exact = view @ projection_matrix(200, 33, seed=4)
    assert np.array_equal(G, before)
    assert np.all(np.abs(got - exact)
                  <= _dot_tolerance(view, projection_matrix(200, 33, seed=4), np.float64))


def test_integer_input_is_projected_in_float64():
    G = np.arange(12).reshape(2, 6)
    Phi = project(G, 3, backend="numpy")
    assert Phi.dtype == np.float64


def test_one_dimensional_input_rejected_with_hint():
    with pytest.raises(ValueError, match=r"G must be 2-D.*G\[None, :\]"):
        project(np.ones(10), 4, backend="numpy")


def test_budget_smaller_than_one_row_says_how_much_is_needed():
    with pytest.raises(ValueError, match="memory_budget=100 bytes.*need 4096 bytes"):
        project(np.ones((2, 10), dtype=np.float32), 1024, memory_budget=100, backend="numpy")


@pytest.mark.parametrize("G,kwargs,exc,match", [
    (np.full((2, 3), np.nan), {}, ValueError, "G contains"),
    (np.ones((0, 3)), {}, ValueError, "G is empty"),
    (np.ones((2, 0)), {}, ValueError, "n_params"),
    (np.ones((2, 3, 4)), {}, ValueError, "G must have 2"),
    (np.ones((2, 3), dtype=complex), {}, TypeError, "G must be real"),
    (np.ones((2, 3)), dict(seed=-5), ValueError, "seed"),
    (np.ones((2, 3)), dict(kind="sparse"), ValueError, "kind"),
    (np.ones((2, 3)), dict(memory_budget=0), ValueError, "memory_budget"),
    (np.ones((2, 3)), dict(memory_budget=1.5), TypeError, "memory_budget"),
    (np.ones((2, 3)), dict(backend="torch"), ValueError, "unknown backend"),
])
def test_project_bad_inputs_raise_naming_the_argument(G, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        project(G, 4, **{"backend": "numpy", **kwargs})


def test_project_bad_proj_dim():
    with pytest.raises(ValueError, match="proj_dim"):
        project(np.ones((2, 3)), 0, backend="numpy")
