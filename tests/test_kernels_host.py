"""Bridge tests: the C++ host build of the CUDA code against the NumPy oracle.

The host library (``libiif_host.so``) is compiled from the same ``__host__ __device__``
functions the CUDA kernels use, so these tests check the kernels' arithmetic on every CI
run, without a GPU: Philox known answers, the sign pattern of ``A`` bit for bit, Gaussian
entries to a few ulp, and the projection / Gram summation orders against their stated
error bounds. The CUDA kernels themselves then run unchanged on a CPU emulation of the
CUDA execution model (``libiif_cuda_emulation.so``) and must reproduce the host twin bit
for bit, whatever the launch geometry; the CuPy backend's Python runs on top of them
through a test double of the CuPy calls it makes. Both libraries are built with CMake into
a temporary directory when they are not already present. A last test compiles every ``.cu``
file through NVRTC, as the CuPy backend does at run time, when an NVRTC library is
installed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from _backends import PHILOX_KAT, host_library  # tests/_backends.py
from hypothesis import given, settings
from hypothesis import strategies as st

from iif_ref.kernels import _cupy_backend, _host, projection_matrix
from iif_ref.kernels._philox import philox4x32_10

EPS32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff u
EPS64 = float(np.finfo(np.float64).eps) / 2


@pytest.fixture(scope="session", autouse=True)
def host_lib(tmp_path_factory):
    """The loaded host library, built with CMake into a temporary directory if needed."""
    yield from host_library(tmp_path_factory)


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_host_philox_matches_random123_known_answers(counter, key, expected):
    assert _host.philox4x32_10(counter, key) == expected


words = st.integers(0, 2**32 - 1)


@settings(max_examples=50)
@given(st.tuples(words, words, words, words), st.tuples(words, words))
def test_host_philox_equals_numpy_philox_bit_for_bit(counter, key):
    expected = philox4x32_10(*(np.uint64(w) for w in counter + key))
    assert _host.philox4x32_10(counter, key) == tuple(int(w) for w in expected)


seeds = st.integers(0, 2**64 - 1)
proj_dims = st.integers(1, 300)
kernel_dtypes = st.sampled_from([np.float64, np.float32])


@st.composite
def row_blocks(draw):
    n_rows = draw(st.integers(1, 6))
    # Rows near 0, near the 2**32 boundary of m_lo/m_hi, and near 2**64: the oracle's
    # matrix has 2**64 − 1 rows (the largest n_params), so the last block ends there.
    row_start = draw(st.one_of(st.integers(0, 1000), st.integers(2**32 - 8, 2**32 + 8),
                               st.integers(2**64 - 1000, 2**64 - 1 - n_rows)))
    return row_start, n_rows


def _oracle(seed, row_start, n_rows, proj_dim, kind, dtype):
    return projection_matrix(2**64 - 1, proj_dim, seed=seed, kind=kind, dtype=dtype,
                             rows=(row_start, row_start + n_rows))


@settings(max_examples=40)
@given(seeds, row_blocks(), proj_dims, kernel_dtypes)
def test_host_rademacher_block_equals_oracle_bit_for_bit(seed, rows, proj_dim, dtype):
    row_start, n_rows = rows
    got = _host.generate_block(seed, row_start, n_rows, proj_dim, dtype=dtype)
    want = _oracle(seed, row_start, n_rows, proj_dim, "rademacher", dtype)
    assert got.dtype == want.dtype
    # Same sign bits and the same once-rounded magnitude: identical bytes.
    assert got.tobytes() == want.tobytes()


@settings(max_examples=40)
@given(seeds, row_blocks(), proj_dims, kernel_dtypes)
def test_host_gaussian_block_within_few_ulp_of_oracle(seed, rows, proj_dim, dtype):
    row_start, n_rows = rows
    got = _host.generate_block(seed, row_start, n_rows, proj_dim, kind="gaussian", dtype=dtype)
    want = _oracle(seed, row_start, n_rows, proj_dim, "gaussian", dtype)
    # docs/rng.md: log, sqrt, cos, sin agree to a few float64 ulp between libms. glibc's and
    # NumPy's are within 1 ulp, so with three roundings each side is within about 2.5 ulp and
    # the two within 6; after rounding to float32, at most one float32 ulp apart.
    ulps = 6 if dtype == np.float64 else 1
    tol = ulps * np.spacing(np.abs(want).astype(dtype))
    assert np.all(np.abs(got - want) <= tol)


def test_host_block_rows_do_not_depend_on_the_block_they_are_generated_in():
    whole = _host.generate_block(7, 100, 40, 130)
    for start, stop in [(0, 1), (3, 17), (39, 40)]:
        part = _host.generate_block(7, 100 + start, stop - start, 130)
        assert np.array_equal(part, whole[start:stop])


def _projection_bound(G, A_T, dtype):
    """Error bound of kernels/projection.cuh against the exact G @ A_T, plus the float64
    reference's own error (M u64 S): (16 u + (ceil(M/16) + 1 + M) u64) S + u |Phi|."""
    u = EPS32 if dtype == np.float32 else EPS64
    M = G.shape[1]
    S = np.abs(G.astype(np.float64)) @ np.abs(A_T.astype(np.float64))
    exact = G.astype(np.float64) @ A_T.astype(np.float64)
    return (16 * u + (-(-M // 16) + 1 + M) * EPS64) * S + u * np.abs(exact), exact


@settings(max_examples=15)
@given(st.integers(1, 9), st.integers(1, 150), st.integers(1, 140), seeds,
       st.sampled_from(["rademacher", "gaussian"]), kernel_dtypes, st.integers(0, 2**40))
def test_host_projection_obeys_blocked_summation_bound(n, M, proj_dim, seed, kind, dtype,
                                                       m_offset):
    G = np.random.default_rng(seed % 2**32).standard_normal((n, M)).astype(dtype)
    Phi = _host.project(G, proj_dim, seed=seed, kind=kind, m_offset=m_offset)
    A_T = _host.generate_block(seed, m_offset, M, proj_dim, kind=kind, dtype=dtype)
    bound, exact = _projection_bound(G, A_T, dtype)
    assert Phi.dtype == dtype
    assert np.all(np.abs(Phi - exact) <= bound)


def test_host_float32_projection_error_does_not_grow_with_m():
    # The float32 part of the bound is 16 u32 S for any M: with M = 20000 a plain float32
    # dot product could reach M u32 S, the blocked one must stay within (16 + 2) u32 S.
    rng = np.random.default_rng(0)
    G = rng.standard_normal((2, 20000)).astype(np.float32)
    Phi = _host.project(G, 4, seed=5)
    A_T = _host.generate_block(5, 0, 20000, 4, dtype=np.float32)
    bound, exact = _projection_bound(G, A_T, np.float32)
    S = np.abs(G.astype(np.float64)) @ np.abs(A_T.astype(np.float64))
    assert np.all(np.abs(Phi - exact) <= bound)
    assert np.all(bound <= 18 * EPS32 * S + 2 * EPS32 * S)  # the bound itself is M-free


def test_host_projection_rows_independent_of_row_chunking():
    # Each output row is one chain of operations: projecting a slice of rows gives those rows
    # bit for bit (what lets the GPU process rows in slabs).
    G = np.random.default_rng(1).standard_normal((10, 77)).astype(np.float32)
    whole = _host.project(G, 33, seed=9)
    assert np.array_equal(_host.project(G[3:8], 33, seed=9), whole[3:8])


def test_host_projection_matches_oracle_project():
    # Two implementations of Phi = G A, each within its bound of the exact product.
    G = np.random.default_rng(2).standard_normal((6, 300))
    from iif_ref.kernels import project
    want = project(G, 50, seed=11, backend="numpy")
    got = _host.project(G, 50, seed=11)
    A = projection_matrix(300, 50, seed=11)
    bound, _ = _projection_bound(G, A, np.float64)
    assert np.all(np.abs(got - want) <= 2 * bound)


@settings(max_examples=15)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 20), kernel_dtypes,
       st.floats(0.0, 10.0), st.integers(0, 2**32 - 1))
def test_host_gram_is_symmetric_and_within_float64_summation_bound(B, N, P, dtype, damping,
                                                                    seed):
    Phi = np.random.default_rng(seed).standard_normal((B, N, P)).astype(dtype)
    F = _host.gram(Phi, damping=damping)
    Phi64 = Phi.astype(np.float64)
    exact = np.einsum("bri,brj->bij", Phi64, Phi64) + damping * np.eye(P)
    # gram.cuh: |dF_ij| <= N u64 sum_r |Phi_ri||Phi_rj| (+ one rounding of the damping add),
    # and the einsum reference has the same bound.
    S = np.einsum("bri,brj->bij", np.abs(Phi64), np.abs(Phi64)) + damping * np.eye(P)
    assert np.array_equal(F, F.transpose(0, 2, 1))
    assert np.all(np.abs(F - exact) <= 2 * (N + 1) * EPS64 * S)


def test_host_gram_of_float32_equals_gram_of_its_float64_upcast_bit_for_bit():
    # Products of float32 values are exact in float64 and the order is fixed, so the float32
    # input loses nothing in the Gram.
    Phi = np.random.default_rng(3).standard_normal((2, 31, 7)).astype(np.float32)
    assert np.array_equal(_host.gram(Phi, damping=0.25),
                          _host.gram(Phi.astype(np.float64), damping=0.25))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: _host.generate_block(-1, 0, 1, 4), ValueError, "seed"),
    (lambda: _host.generate_block(0, 2**64 - 1, 2, 4), ValueError, "row_start"),
    (lambda: _host.generate_block(0, 0, 0, 4), ValueError, "n_rows"),
    (lambda: _host.generate_block(0, 0, 1, 2**32), ValueError, "proj_dim"),
    (lambda: _host.generate_block(0, 0, 1, 4, kind="uniform"), ValueError, "kind"),
    (lambda: _host.generate_block(0, 0, 1, 4, dtype=np.int32), TypeError, "dtype"),
    (lambda: _host.project(np.array([[np.nan, 1.0]]), 4), ValueError, "G"),
    (lambda: _host.project(np.ones(3), 4), ValueError, "G"),
    (lambda: _host.gram(np.ones((2, 3)), damping=0.0), ValueError, "Phi"),
    (lambda: _host.gram(np.ones((1, 2, 3)), damping=-1.0), ValueError, "damping"),
    (lambda: _host.philox4x32_10([1, 2, 3], [0, 0]), ValueError, "counter"),
])
def test_host_bad_arguments_raise_naming_them(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_missing_host_library_error_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv(_host.ENV_VAR, str(tmp_path / "nowhere.so"))
    monkeypatch.setattr(_host, "_lib", None)
    ok, reason = _host.available()
    assert not ok and "cmake" in reason and "nowhere.so" in reason
    with pytest.raises(_host.HostLibraryError, match="cmake --build"):
        _host.load()


# --------------------------------------------------------------------------- CUDA emulation
# The kernels of kernels/*.cu, run unchanged with one OS thread per CUDA thread. The host
# twin evaluates the same operations in the same order with the same libm, so every result
# (Gaussian included) must be identical bytes; a tiling, indexing or guard error would not.

# Shapes off the 64 x 64 output tiles and the 16-wide m tiles, and with several tiles each way.
EMULATED_SHAPES = [(1, 1, 1), (3, 17, 5), (65, 33, 129), (70, 100, 64)]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, M, P", EMULATED_SHAPES)
def test_emulated_projection_kernel_equals_host_twin_bit_for_bit(n, M, P, dtype, kind):
    G = np.random.default_rng(n * M * P).standard_normal((n, M)).astype(dtype)
    m_offset = 2**32 - 7  # rows of A straddle the m_lo / m_hi word boundary
    got = _host.emulate_project(G, P, seed=2**63 + 12345, kind=kind, m_offset=m_offset,
                                fill=np.nan)
    want = _host.project(G, P, seed=2**63 + 12345, kind=kind, m_offset=m_offset)
    assert got.tobytes() == want.tobytes()


def test_emulated_projection_does_not_depend_on_launch_geometry():
    G = np.random.default_rng(3).standard_normal((20, 40)).astype(np.float32)
    want = _host.project(G, 70, seed=1)
    # A grid twice as large as needed: the extra blocks must write nothing.
    bigger = _host.emulate_project(G, 70, seed=1, launch=((4, 2), (256,)), fill=np.nan)
    assert bigger.tobytes() == want.tobytes()
    # Any block shape but 256 threads is refused by the kernel: nothing is written.
    refused = _host.emulate_project(G, 70, seed=1, launch=((2, 1), (128,)), fill=np.nan)
    assert np.all(np.isnan(refused))


@pytest.mark.parametrize("launch", [None, ((1,), (256,)), ((3,), (64,))])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_emulated_generate_kernel_equals_host_block_for_any_grid(kind, launch):
    # The generate kernel is a grid-stride loop: one block, a few, or small blocks all give
    # the same block of A.
    got = _host.emulate_generate(11, 2**64 - 9, 9, 67, kind=kind, dtype=np.float32,
                                 launch=launch)
    want = _host.generate_block(11, 2**64 - 9, 9, 67, kind=kind, dtype=np.float32)
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("kind", ["countsketch", "kronecker_in", "kronecker_out"])
def test_structured_kinds_host_and_emulated_blocks_equal_oracle_bit_for_bit(kind):
    # The CountSketch rows (one ±1 in column h(m)) and the ±1 Kronecker factors: the C++
    # entry function, the emulated generate kernel and the NumPy oracle give the same bytes,
    # rows straddling the m_lo / m_hi boundary.
    for dtype in (np.float32, np.float64):
        want = projection_matrix(2**32 + 40, 67, seed=2**63 + 5, kind=kind, dtype=dtype,
                                 rows=(2**32 - 20, 2**32 + 40))
        host = _host.generate_block(2**63 + 5, 2**32 - 20, 60, 67, kind=kind, dtype=dtype)
        emulated = _host.emulate_generate(2**63 + 5, 2**32 - 20, 60, 67, kind=kind,
                                          dtype=dtype, launch=((3,), (64,)))
        assert host.tobytes() == want.tobytes() == emulated.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, M, P", EMULATED_SHAPES)
def test_countsketch_host_emulated_and_every_host_backend_agree_bit_for_bit(n, M, P, dtype):
    # kernels/countsketch.cuh fixes the order (per row, ascending m, one add in the input
    # dtype); the NumPy (ufunc.at) and Numba backends follow it, so all four are the same
    # bytes, also for a grid-stride launch smaller than the rows and small blocks.
    from iif_ref.kernels._registry import available_backends, get_backend
    G = np.random.default_rng(n * M + P).standard_normal((n, M)).astype(dtype)
    want = _host.countsketch(G, P, seed=2**40 + 3)
    for launch in (None, ((1,), (32,))):
        got = _host.emulate_countsketch(G, P, seed=2**40 + 3, launch=launch, fill=np.nan)
        assert got.tobytes() == want.tobytes()
    for name in available_backends():
        if name != "cupy":
            got = get_backend(name).project(G, P, seed=2**40 + 3, kind="countsketch",
                                            chunk_rows=7)
            assert got.tobytes() == want.tobytes(), name


@pytest.mark.parametrize("kind", ["countsketch", "kronecker_in"])
def test_emulated_tiled_projection_of_structured_kinds_equals_host_twin(kind):
    # The tiled dense kernel's generic branch (entry by entry) on the new kinds: the dense
    # product with the materialised matrix, in the contract of projection.cuh.
    G = np.random.default_rng(8).standard_normal((70, 40)).astype(np.float32)
    got = _host.emulate_project(G, 130, seed=4, kind=kind, m_offset=2**32 - 9, fill=np.nan)
    want = _host.project(G, 130, seed=4, kind=kind, m_offset=2**32 - 9)
    assert got.tobytes() == want.tobytes()


def test_cupy_backend_logic_countsketch_on_the_emulation(emulated_cupy_backend):
    G = np.random.default_rng(2).standard_normal((50, 300)).astype(np.float32)
    got = emulated_cupy_backend.project(G, 64, seed=9, kind="countsketch", chunk_rows=5)
    assert got.tobytes() == _host.countsketch(G, 64, seed=9).tobytes()
    block = emulated_cupy_backend.generate(9, 0, 5, 64, "kronecker_out", np.float32)
    assert block.tobytes() == _host.generate_block(9, 0, 5, 64, kind="kronecker_out",
                                                   dtype=np.float32).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, N, P, grid_z", [(1, 1, 1, 1), (3, 37, 70, 3), (3, 20, 130, 2)])
def test_emulated_gram_kernel_equals_host_twin_bit_for_bit(B, N, P, grid_z, dtype):
    # P = 70 and 130 need off-diagonal tiles (computed once, mirrored); grid_z < B makes the
    # kernel loop over slices itself.
    from iif_ref.kernels._cupy_backend import gram_launch
    Phi = np.random.default_rng(B * N * P).standard_normal((B, N, P)).astype(dtype)
    damping = np.linspace(0.0, 1.5, B)
    grid, block = gram_launch(B, P)
    got = _host.emulate_gram(Phi, damping, launch=(grid[:2] + (grid_z,), block), fill=np.nan)
    for b in range(B):
        want = _host.gram(Phi[b:b + 1], damping=float(damping[b]))[0]
        assert got[b].tobytes() == want.tobytes()


# --------------------------------------------------------------------------- CuPy backend logic
# The CuPy backend's own Python (array routing, launch shapes, row slabs, chunked solves,
# failure detection, the error it raises) run against a test double of the few CuPy calls it
# makes: arrays are NumPy arrays, kernel launches run the real kernels on the CPU emulation,
# the batched Cholesky writes cuSOLVER's layout (lower factor in row-major order, info =
# first failing pivot, 1-based). This proves the orchestration given those semantics; CuPy's
# actual API is exercised only by tests/test_kernels_gpu.py on a GPU.

def _emulated_cupy_modules():
    import types

    import scipy.linalg

    class ndarray(np.ndarray):
        @property
        def data(self):
            return types.SimpleNamespace(ptr=self.ctypes.data)

    def wrap(r):
        return r.view(ndarray) if isinstance(r, np.ndarray) else r

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args):
            lib = _host.load_emulation()
            grid = tuple(grid) + (1,) * (3 - len(grid))
            raw = [a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in args]
            code = 0 if self.name.endswith("f32") else 1
            if self.name.startswith("iif_project"):
                rc = lib.iif_emulate_project(code, grid[0], grid[1], block[0], *raw)
            elif self.name.startswith("iif_generate"):
                rc = lib.iif_emulate_generate(code, grid[0], block[0], *raw)
            elif self.name.startswith("iif_countsketch"):
                rc = lib.iif_emulate_countsketch(code, grid[0], block[0], *raw)
            else:
                rc = lib.iif_emulate_gram(code, grid[0], grid[1], grid[2], block[0], *raw)
            assert rc == 0

    class RawModule:
        def __init__(self, code, *, options, backend):
            # What NVRTC receives: local includes already expanded, options as a tuple.
            assert '#include "' not in code and isinstance(options, tuple)
            self.get_function = Kernel

    def dpotrf_batched(handle, uplo, n, ptr_array, lda, info_ptr, batch):
        ptrs = np.ctypeslib.as_array((ctypes.c_uint64 * batch).from_address(ptr_array))
        info = np.ctypeslib.as_array((ctypes.c_int32 * batch).from_address(info_ptr))
        for b in range(batch):
            A = np.ctypeslib.as_array(
                (ctypes.c_double * (n * n)).from_address(int(ptrs[b]))).reshape(n, n)
            info[b] = 0
            for j in range(n):  # right-looking Cholesky of the row-major lower triangle
                d = A[j, j] - A[j, :j] @ A[j, :j]
                if not d > 0:
                    A[j, j], info[b] = d, j + 1
                    break
                A[j, j] = np.sqrt(d)
                A[j + 1:, j] = (A[j + 1:, j] - A[j + 1:, :j] @ A[j, :j]) / A[j, j]

    def solve_triangular(a, b, trans=0, lower=False, overwrite_b=False):
        return wrap(np.stack([scipy.linalg.solve_triangular(a[i], b[i], trans=trans,
                                                            lower=lower)
                              for i in range(a.shape[0])]))

    cupy = types.ModuleType("cupy")
    cupy.ndarray = ndarray
    cupy.RawModule = RawModule
    cupy.asarray = lambda x, dtype=None: wrap(np.array(x, dtype=dtype))
    cupy.asnumpy = lambda x: np.array(x).view(np.ndarray)
    for name in ("empty", "zeros", "arange", "ascontiguousarray", "diagonal", "matmul",
                 "all", "isfinite"):
        setattr(cupy, name, (lambda f: lambda *a, **k: wrap(f(*a, **k)))(getattr(np, name)))
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    device = types.SimpleNamespace(get_cusolver_handle=lambda: 0)
    cupy.cuda = types.SimpleNamespace(runtime=runtime, device=device)

    class Device:  # a context manager with an id
        def __init__(self, i=0):
            self.id = i

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cupy.cuda.Device = Device
    cusolver = types.SimpleNamespace(dpotrfBatched=dpotrf_batched)
    cublas = types.SimpleNamespace(CUBLAS_FILL_MODE_UPPER=1)
    libs = types.SimpleNamespace(cusolver=cusolver, cublas=cublas)
    linalg = types.SimpleNamespace(solve_triangular=solve_triangular)
    return {"cupy": cupy, "cupy.cuda": cupy.cuda, "cupy.cuda.device": device,
            "cupy_backends": types.SimpleNamespace(), "cupy_backends.cuda": types.SimpleNamespace(),
            "cupy_backends.cuda.libs": libs, "cupy_backends.cuda.libs.cusolver": cusolver,
            "cupy_backends.cuda.libs.cublas": cublas,
            "cupyx": types.SimpleNamespace(), "cupyx.scipy": types.SimpleNamespace(),
            "cupyx.scipy.linalg": linalg}


@pytest.fixture
def emulated_cupy_backend(monkeypatch):
    """The CuPy backend module with CuPy replaced by the emulation double; row slabs of 64
    rows and at most 2 Gram slices per launch, so the slab and slice loops are exercised."""
    import sys
    for name, module in _emulated_cupy_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    _cupy_backend._module.cache_clear()
    monkeypatch.setattr(_cupy_backend, "_GRID_Y_MAX", 2)
    yield _cupy_backend
    _cupy_backend._module.cache_clear()


def test_cupy_backend_logic_projects_in_row_slabs_like_host_twin(emulated_cupy_backend):
    cb = emulated_cupy_backend
    assert cb.available() == (True, "")
    G = np.random.default_rng(4).standard_normal((130, 40)).astype(np.float32)
    got = cb.project(G, 70, seed=6, kind="rademacher", chunk_rows=3)  # 130 rows: 2 slabs
    assert isinstance(got, np.ndarray)
    assert got.tobytes() == _host.project(G, 70, seed=6).tobytes()
    block = cb.generate(6, 2**32 - 1, 3, 70, "gaussian", np.float64)
    assert block.tobytes() == _host.generate_block(6, 2**32 - 1, 3, 70,
                                                   kind="gaussian").tobytes()


def test_cupy_backend_logic_scores_match_oracle_and_name_failing_slices(emulated_cupy_backend,
                                                                        monkeypatch):
    cb = emulated_cupy_backend
    from iif_ref.errors import NotPositiveDefiniteError
    from iif_ref.kernels import projected_scores
    rng = np.random.default_rng(5)
    Phi, Psi = rng.standard_normal((5, 30, 6)), rng.standard_normal((5, 30, 6))
    Gamma = rng.standard_normal((5, 4, 6))
    lam = np.full(5, 0.5)
    monkeypatch.setattr(cb, "SOLVE_WORKSPACE_BYTES", 2 * 8 * (2 * 36 + 6 * 4 + 4 * 30))
    got = cb.projected_scores(Phi, Psi, Gamma, damping=lam, reduce=False)  # chunks of 2
    want = projected_scores(Phi, Psi, Gamma, damping=0.5, backend="numpy", reduce=False)
    # Well-conditioned 6 x 6 solves (cond(F) < 1e3 here): agreement to 1e-11 relative.
    assert np.allclose(got, want, rtol=1e-11, atol=1e-11 * np.abs(want).max())
    reduced = cb.projected_scores(Phi, Psi, Gamma, damping=lam, reduce=True)
    assert np.allclose(reduced, want.sum(axis=0), rtol=1e-11, atol=1e-11 * np.abs(want).max())
    Phi[2][:, 1] = 0.0  # exactly singular F_2 and F_4 without damping
    Phi[4][:, 5] = 0.0
    with pytest.raises(NotPositiveDefiniteError) as got_error:
        cb.projected_scores(Phi, Psi, Gamma, damping=np.zeros(5), reduce=True)
    with pytest.raises(NotPositiveDefiniteError) as want_error:
        projected_scores(Phi, Psi, Gamma, damping=0.0, backend="numpy")
    assert got_error.value.slices == want_error.value.slices == (2, 4)
    assert got_error.value.suggested_damping == want_error.value.suggested_damping


# --------------------------------------------------------------------------- NVRTC

def _find_nvrtc():
    """libnvrtc from the CUDA toolkit or the nvidia-cuda-nvrtc wheel, else None."""
    candidates = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates += sorted(Path(root).glob("cu*/lib/libnvrtc.so*"))
            candidates += sorted(Path(root).glob("cuda_nvrtc/lib/libnvrtc.so*"))
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            candidates += sorted(Path(os.environ[env]).glob("lib64/libnvrtc.so*"))
    candidates += sorted(Path("/usr/local/cuda/lib64").glob("libnvrtc.so*"))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if "builtins" in path.name or ".alt." in path.name:
            continue
        try:
            # NVRTC dlopens its builtins library by soname; a wheel's lib directory is not
            # on the loader path, so load it first, globally.
            for builtins in sorted(path.parent.glob("libnvrtc-builtins.so*")):
                if ".alt." not in builtins.name:
                    ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(str(path))
        except OSError:
            continue
    return None


def _nvrtc_compile(lib, source, name, options):
    """Compile with NVRTC; return (ok, log, ptx)."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0,
                                  None, None) == 0
    opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
    status = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if status == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return status == 0, log.value.decode(errors="replace"), ptx.decode(errors="replace")


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("source", sorted(_cupy_backend.KERNELS))
def test_cuda_sources_compile_through_nvrtc_with_backend_options(source, arch):
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("no NVRTC library found (CUDA toolkit lib64 or the nvidia-cuda-nvrtc "
                    "wheel); the CuPy backend's run-time compile cannot be checked here")
    ok, log, ptx = _nvrtc_compile(lib, _cupy_backend.kernel_source(source), source,
                                  list(_cupy_backend.NVRTC_OPTIONS) + [f"-arch={arch}"])
    assert ok, log
    for entry in _cupy_backend.KERNELS[source]:
        # extern "C" keeps the names unmangled, which is how cupy.RawModule finds them.
        assert f".entry {entry}(" in ptx, entry
