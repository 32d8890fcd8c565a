"""GPU bridge tests: the CuPy backend (CUDA kernels through NVRTC) against its two twins.

* the C++ host library, built from the same headers and evaluating the same operations in
  the same order: Rademacher projections and Gram matrices must agree bit for bit, which
  checks the kernels' tiling, indexing and boundary handling exactly;
* the NumPy oracle: the same ``A`` (sign pattern bit for bit, Gaussian to a few ulp) and
  scores within bounds derived from the condition number.

Every test here needs CuPy and a CUDA device and is skipped with the reason otherwise.
The backend-agnostic tests (test_kernels_rng.py, test_kernels_projection.py, ...) also run
the CuPy backend where it is available.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _backends import host_library  # tests/_backends.py

from iif_ref.errors import NotPositiveDefiniteError
from iif_ref.kernels import _host, project, projected_scores, projection_matrix
from iif_ref.kernels._registry import backend_status, get_backend

CUPY_OK, CUPY_REASON = backend_status("cupy")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not CUPY_OK, reason=f"backend 'cupy' unavailable: {CUPY_REASON}")]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The host twin, built with CMake if absent: decided when a test runs, not at import
    (on a fresh machine the library does not exist until this fixture builds it)."""
    yield from host_library(tmp_path_factory)


needs_host = pytest.mark.usefixtures("host")

EPS64 = float(np.finfo(np.float64).eps)
U = {np.dtype(np.float32): float(np.finfo(np.float32).eps) / 2,
     np.dtype(np.float64): EPS64 / 2}


@pytest.fixture(scope="module")
def cb():
    return get_backend("cupy")


def _oracle_block(seed, row_start, n_rows, proj_dim, kind, dtype):
    return get_backend("numpy").generate(seed, row_start, n_rows, proj_dim, kind, dtype)


row_starts = st.one_of(st.integers(0, 10**6), st.integers(2**32 - 70, 2**32 + 70),
                       st.integers(2**64 - 10**6, 2**64 - 70))


@settings(max_examples=20)
@given(st.integers(0, 2**64 - 1), row_starts, st.integers(1, 70), st.integers(1, 400),
       st.sampled_from([np.float32, np.float64]))
def test_cupy_rademacher_block_equals_oracle_bit_for_bit(cb, seed, row_start, n_rows, proj_dim,
                                                         dtype):
    got = cb.generate(seed, row_start, n_rows, proj_dim, "rademacher", dtype)
    want = _oracle_block(seed, row_start, n_rows, proj_dim, "rademacher", dtype)
    assert got.dtype == np.dtype(dtype) and got.tobytes() == want.tobytes()


@settings(max_examples=20)
@given(st.integers(0, 2**64 - 1), row_starts, st.integers(1, 70), st.integers(1, 400),
       st.sampled_from([np.float32, np.float64]))
def test_cupy_gaussian_block_within_few_ulp_of_oracle(cb, seed, row_start, n_rows, proj_dim,
                                                      dtype):
    got = cb.generate(seed, row_start, n_rows, proj_dim, "gaussian", dtype)
    want = _oracle_block(seed, row_start, n_rows, proj_dim, "gaussian", dtype)
    # Each side's z carries its libm's error (CUDA: log 1 ulp, sin/cos 2 ulp, sqrt and the
    # division exact-rounded; NumPy/libm at most as much) plus three roundings, about
    # 4 ulp each, so the two differ by at most 8 float64 ulp; after the cast to float32 that
    # is at most one float32 ulp (a tiny difference can straddle one rounding boundary).
    ulps = 8 if dtype == np.float64 else 1
    assert np.all(np.abs(got - want) <= ulps * np.spacing(np.abs(want).astype(dtype)))


def _random(shape, dtype, seed, order="C"):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=dtype,
                      order=order)


# Shapes that are not multiples of the 64 x 64 output tiles or the 16-wide m tiles, and one
# that needs several tiles in every direction.
PROJECT_SHAPES = [(1, 1, 1), (3, 17, 5), (65, 33, 129), (130, 1000, 70), (7, 4099, 300)]


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, M, P", PROJECT_SHAPES)
def test_cupy_rademacher_projection_equals_host_twin_bit_for_bit(cb, n, M, P, dtype):
    G = _random((n, M), dtype, n + M + P)
    for m_offset in (0, 2**32 - 5):
        got = cb.project(G, P, seed=123456789012345, kind="rademacher", chunk_rows=1,
                         m_offset=m_offset)
        want = _host.project(G, P, seed=123456789012345, kind="rademacher",
                             m_offset=m_offset)
        assert got.dtype == np.dtype(dtype)
        assert got.tobytes() == want.tobytes()


def _projection_bound(G, A_T, dtype):
    """kernels/projection.cuh bound against the exact G @ A_T, plus the float64 reference's
    own error: (16 u + (ceil(M/16) + 1 + M) u64) S + u |Phi|."""
    u = U[np.dtype(dtype)]
    M = G.shape[1]
    S = np.abs(G.astype(np.float64)) @ np.abs(A_T.astype(np.float64))
    exact = G.astype(np.float64) @ A_T.astype(np.float64)
    return (16 * u + (-(-M // 16) + 1 + M) * EPS64 / 2) * S + u * np.abs(exact), exact


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, M, P", PROJECT_SHAPES)
def test_cupy_projection_within_blocked_summation_bound(cb, n, M, P, dtype, kind):
    G = _random((n, M), dtype, 7 * n + M, order="F")  # F order: the backend copies to C
    got = cb.project(G, P, seed=99, kind=kind, chunk_rows=5)
    A_T = _oracle_block(99, 0, M, P, kind, dtype)
    bound, exact = _projection_bound(G, A_T, dtype)
    if kind == "gaussian":  # the kernel's A may differ from the oracle's A_T entry by entry:
        # by 8 float64 ulp (16 u64), or by one float32 ulp (2 u32) after the cast.
        per_entry = 2 * U[np.dtype(np.float32)] if dtype == np.float32 else 16 * U[np.dtype(dtype)]
        bound = bound + per_entry * (np.abs(G.astype(np.float64))
                                     @ np.abs(A_T.astype(np.float64)))
    assert np.all(np.abs(got - exact) <= bound)


def test_cupy_projection_rows_independent_of_row_chunking(cb):
    G = _random((300, 500), np.float32, 1)
    whole = cb.project(G, 96, seed=4, kind="gaussian", chunk_rows=1)
    part = cb.project(G[130:250], 96, seed=4, kind="gaussian", chunk_rows=1)
    assert part.tobytes() == whole[130:250].tobytes()


def test_cupy_projection_through_public_front_end(cb):
    G = _random((5, 300), np.float64, 2)
    Phi = project(G, 16, seed=1, backend="cupy")
    assert isinstance(Phi, np.ndarray) and Phi.shape == (5, 16)
    bound, exact = _projection_bound(G, projection_matrix(300, 16, seed=1), np.float64)
    assert np.all(np.abs(Phi - exact) <= bound)


def test_cupy_projection_of_torch_cuda_tensor_is_zero_copy_and_returns_torch(cb):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here; the DLPack path needs a torch CUDA tensor")
    import cupy
    G = _random((40, 257), np.float32, 3)
    t = torch.from_numpy(G).cuda()
    before = t.clone()
    assert cupy.from_dlpack(t).data.ptr == t.data_ptr()  # DLPack shares the memory
    out = cb.project(t, 70, seed=8, kind="rademacher", chunk_rows=10)
    assert isinstance(out, torch.Tensor) and out.device == t.device
    assert out.dtype == torch.float32 and tuple(out.shape) == (40, 70)
    ref = cb.project(G, 70, seed=8, kind="rademacher", chunk_rows=10)
    assert out.cpu().numpy().tobytes() == ref.tobytes()
    assert torch.equal(t, before)


def test_cupy_projection_of_cupy_array_stays_on_device(cb):
    import cupy
    G = _random((9, 100), np.float64, 4)
    out = cb.project(cupy.asarray(G), 12, seed=2, kind="rademacher", chunk_rows=3)
    assert isinstance(out, cupy.ndarray)
    assert cupy.asnumpy(out).tobytes() == cb.project(G, 12, seed=2, kind="rademacher",
                                                     chunk_rows=3).tobytes()


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, N, P", [(1, 1, 1), (3, 17, 5), (2, 100, 129), (5, 33, 64)])
def test_cupy_gram_equals_host_twin_bit_for_bit(cb, B, N, P, dtype):
    import cupy
    Phi = _random((B, N, P), dtype, B * N * P)
    damping = np.linspace(0.0, 2.0, B)
    got = cupy.asnumpy(cb.gram(cupy.asarray(Phi), cupy.asarray(damping)))
    for b in range(B):
        want = _host.gram(Phi[b:b + 1], damping=float(damping[b]))[0]
        assert got[b].tobytes() == want.tobytes()
    assert np.array_equal(got, got.transpose(0, 2, 1))


def _scores_bound(Phi, Psi, Gamma, damping):
    """Per-entry bound for two backward-stable evaluations of -sum_b Gamma_b F_b^-1 Psi_b^T:
    c P cond(F_b) u64 |Gamma_b| |F_b^-1| |Psi_b| per slice (2-norms, c = 20 covering the Gram,
    the factorisation, the solve and the final product), summed over b."""
    bound = 0.0
    for b in range(Phi.shape[0]):
        phi = Phi[b].astype(np.float64)
        F = phi.T @ phi + damping * np.eye(phi.shape[1])
        cond = np.linalg.cond(F)
        inv_norm = 1.0 / np.linalg.eigvalsh(F)[0]
        g = np.linalg.norm(Gamma[b].astype(np.float64), axis=1)[:, None]
        p = np.linalg.norm(Psi[b].astype(np.float64), axis=1)[None, :]
        bound = bound + 20 * F.shape[0] * cond * EPS64 * inv_norm * g * p
    return bound


@settings(max_examples=10)
@given(st.integers(1, 5), st.integers(1, 80), st.integers(1, 70), st.integers(1, 6),
       st.sampled_from([np.float32, np.float64]), st.floats(1e-3, 10.0),
       st.integers(0, 2**32 - 1))
def test_cupy_projected_scores_match_oracle_within_condition_bound(cb, B, N, P, T, dtype,
                                                                   damping, seed):
    rng = np.random.default_rng(seed)
    Phi, Psi = (rng.standard_normal((B, N, P)).astype(dtype) for _ in range(2))
    Gamma = rng.standard_normal((B, T, P)).astype(dtype)
    got = projected_scores(Phi, Psi, Gamma, damping=damping, backend="cupy")
    want = projected_scores(Phi, Psi, Gamma, damping=damping, backend="numpy")
    assert got.dtype == np.float64 and got.shape == (T, N)
    assert np.all(np.abs(got - want) <= _scores_bound(Phi, Psi, Gamma, damping))
    per = projected_scores(Phi, Psi, Gamma, damping=damping, backend="cupy", reduce=False)
    assert per.shape == (B, T, N)
    # The reduction adds B float64 terms: B u64 sum_b |term_b|.
    assert np.all(np.abs(per.sum(axis=0) - got) <= B * EPS64 * np.abs(per).sum(axis=0))


def test_cupy_projected_scores_chunked_agree_with_single_chunk(cb, monkeypatch):
    rng = np.random.default_rng(5)
    Phi, Psi, Gamma = (rng.standard_normal(s) for s in [(6, 50, 20), (6, 50, 20), (6, 3, 20)])
    lam = np.full(6, 0.5)
    whole = cb.projected_scores(Phi, Psi, Gamma, damping=lam, reduce=False)
    per_slice = 8 * (2 * 20 * 20 + 20 * 3 + 3 * 50)
    monkeypatch.setattr(cb, "SOLVE_WORKSPACE_BYTES", 2 * per_slice)  # chunks of 2 slices
    chunked = cb.projected_scores(Phi, Psi, Gamma, damping=lam, reduce=False)
    # The Gram is per slice, but cuBLAS may pick other kernels for another batch count, so
    # the two agree to the rounding bound of the solve rather than bit for bit.
    for b in range(6):
        assert np.all(np.abs(chunked[b] - whole[b])
                      <= _scores_bound(Phi[b:b + 1], Psi[b:b + 1], Gamma[b:b + 1], 0.5))


def test_cupy_not_positive_definite_names_every_failing_slice_like_oracle(cb):
    rng = np.random.default_rng(6)
    Phi = rng.standard_normal((5, 30, 8))
    Phi[1][:, 3] = 0.0  # a zero column: F_b has an exactly zero row and column
    Phi[4][:, 0] = 0.0
    Psi, Gamma = rng.standard_normal((5, 30, 8)), rng.standard_normal((5, 2, 8))
    errors = {}
    for backend in ("cupy", "numpy"):
        with pytest.raises(NotPositiveDefiniteError) as info:
            projected_scores(Phi, Psi, Gamma, damping=0.0, backend=backend)
        errors[backend] = info.value
    assert errors["cupy"].slices == errors["numpy"].slices == (1, 4)
    assert errors["cupy"].damping == 0.0
    assert errors["cupy"].suggested_damping == pytest.approx(errors["numpy"].suggested_damping,
                                                             rel=1e-12)
    # The suggested damping works and the result is finite.
    fixed = projected_scores(Phi, Psi, Gamma, damping=errors["cupy"].suggested_damping,
                             backend="cupy")
    assert np.all(np.isfinite(fixed))


def test_cupy_undamped_rank_deficient_gram_raises_and_damped_matches_woodbury_oracle(cb):
    rng = np.random.default_rng(7)
    Phi, Psi = rng.standard_normal((2, 10, 40)), rng.standard_normal((2, 10, 40))
    Gamma = rng.standard_normal((2, 3, 40))
    with pytest.raises(NotPositiveDefiniteError) as info:
        projected_scores(Phi, Psi, Gamma, damping=0.0, backend="cupy")
    assert info.value.slices == (0, 1) and "N < P" in str(info.value)
    got = projected_scores(Phi, Psi, Gamma, damping=1.0, backend="cupy")
    want = projected_scores(Phi, Psi, Gamma, damping=1.0, backend="numpy")  # N x N Woodbury
    assert np.all(np.abs(got - want) <= _scores_bound(Phi, Psi, Gamma, 1.0))


def test_cupy_projected_scores_do_not_modify_inputs(cb):
    rng = np.random.default_rng(8)
    arrays = [rng.standard_normal(s).astype(np.float32)
              for s in [(3, 20, 6), (3, 20, 6), (3, 4, 6)]]
    copies = [a.copy() for a in arrays]
    projected_scores(*arrays, damping=0.1, backend="cupy")
    assert all(np.array_equal(a, c) for a, c in zip(arrays, copies))


def test_cupy_projected_scores_of_torch_cuda_tensors_return_torch(cb):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here; the DLPack path needs torch CUDA tensors")
    rng = np.random.default_rng(9)
    Phi, Psi, Gamma = (rng.standard_normal(s) for s in [(2, 30, 5), (2, 30, 5), (2, 3, 5)])
    lam = np.full(2, 0.3)
    out = cb.projected_scores(*(torch.from_numpy(a).cuda() for a in (Phi, Psi, Gamma)),
                              damping=lam, reduce=True)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.float64
    ref = cb.projected_scores(Phi, Psi, Gamma, damping=lam, reduce=True)
    assert out.cpu().numpy().tobytes() == ref.tobytes()


# --------------------------------------------------------------------------- structured projections
@needs_host
@settings(max_examples=10)
@given(st.integers(0, 2**64 - 1), row_starts, st.integers(1, 70), st.integers(1, 400),
       st.sampled_from(["countsketch", "kronecker_in", "kronecker_out"]),
       st.sampled_from([np.float32, np.float64]))
def test_cupy_structured_blocks_equal_host_bit_for_bit(cb, seed, row_start, n_rows, proj_dim,
                                                       kind, dtype):
    # The CountSketch bucket/sign pattern and the ±1 Kronecker factors from the device
    # generate kernel are the C++ twin's (and so the oracle's) bytes.
    if row_start + n_rows > 2**64:
        row_start = 2**64 - n_rows
    got = cb.generate(seed, row_start, n_rows, proj_dim, kind, dtype)
    want = _host.generate_block(seed, row_start, n_rows, proj_dim, kind=kind, dtype=dtype)
    assert got.tobytes() == want.tobytes()


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, M, P", [(1, 1, 1), (3, 17, 5), (300, 1000, 129), (70, 5000, 64)])
def test_cupy_countsketch_projection_equals_host_bit_for_bit(cb, n, M, P, dtype):
    # kernels/countsketch.cu, one thread per row in the order of countsketch.cuh: the same
    # bytes as the host twin and the NumPy oracle.
    G = np.random.default_rng(n + M + P).standard_normal((n, M)).astype(dtype)
    got = cb.project(G, P, seed=2**63 + 1, kind="countsketch", chunk_rows=M,
                     m_offset=2**32 - 5)
    want = _host.countsketch(G, P, seed=2**63 + 1, m_offset=2**32 - 5)
    assert got.tobytes() == want.tobytes()
    whole = cb.project(G, P, seed=3, kind="countsketch", chunk_rows=M)
    oracle = project(G, P, seed=3, kind="countsketch", backend="numpy")
    assert whole.tobytes() == oracle.tobytes()


def test_cupy_kronecker_projector_factors_equal_oracle_bit_for_bit():
    from iif_ref.kernels import LinearBlock, Projector
    layers = [LinearBlock(0, 128, 64, 8192), LinearBlock(8320, 64, 128, 16512),
              LinearBlock(16576, 10, 64, 17216)]
    dev = Projector(17226, 512, kind="kronecker", layers=layers, backend="cupy", seed=7)
    ref = Projector(17226, 512, kind="kronecker", layers=layers, backend="numpy", seed=7)
    for (a, b), (c, d) in zip(dev.factor_pairs, ref.factor_pairs):
        assert a.tobytes() == c.tobytes() and b.tobytes() == d.tobytes()
    G = np.random.default_rng(0).standard_normal((8, 17226)).astype(np.float32)
    assert np.array_equal(dev(G), ref(G))
