"""The counter-based projection matrix A of docs/rng.md: generator, layout, statistics.

Layers: unit (Random123 known answers, an independent per-entry reading of the spec),
bridge (randomgen's Philox, Numba-compiled vs NumPy generator, every backend vs the
NumPy oracle) and property (block invariance, moments of A).
"""
import subprocess
import sys

import numpy as np
import pytest
from _backends import BACKEND_PARAMS, PHILOX_KAT  # tests/_backends.py
from hypothesis import given, settings
from hypothesis import strategies as st

from iif_ref.kernels import projection_matrix
from iif_ref.kernels._philox import philox4x32_10
from iif_ref.kernels._registry import backend_status, get_backend

U64 = np.uint64


def _words(seed, c0, c1, c2, c3):
    r = philox4x32_10(U64(c0), U64(c1), U64(c2), U64(c3), U64(seed % 2**32), U64(seed >> 32))
    return [int(x) for x in r]


# ---------------------------------------------------------------- generator

@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox4x32_10_matches_random123_known_answers(counter, key, expected):
    result = philox4x32_10(*(U64(c) for c in counter), *(U64(k) for k in key))
    assert tuple(int(r) for r in result) == expected


@settings(max_examples=20)
@given(seed=st.integers(0, 2**64 - 1), counter=st.integers(0, 2**128 - 2))
def test_philox_matches_randomgen_raw_output(seed, counter):
    randomgen = pytest.importorskip("randomgen", reason="randomgen is needed for this bridge")
    # randomgen packs key = k0 + 2**32 k1 and counter = c0 + 2**32 c1 + ..., and
    # increments the 128-bit counter before each block of four words.
    gen = randomgen.Philox(number=4, width=32, key=seed, counter=counter)
    raw = [int(x) for x in gen.random_raw(4)]
    c = (counter + 1) % 2**128
    words = [(c >> (32 * i)) & 0xFFFFFFFF for i in range(4)]
    assert _words(seed, *words) == raw


def test_numba_compiled_philox_equals_numpy_philox_bit_for_bit():
    pytest.importorskip("numba", reason="numba backend not installed")
    import numba

    from iif_ref.kernels import _numba_backend

    @numba.njit
    def run(c, k):
        out = np.empty_like(c)
        for i in range(c.shape[0]):
            r = _numba_backend._philox(c[i, 0], c[i, 1], c[i, 2], c[i, 3], k[i, 0], k[i, 1])
            for j in range(4):
                out[i, j] = r[j]
        return out

    rng = np.random.default_rng(7)
    c = rng.integers(0, 2**32, size=(4096, 4), dtype=np.uint64)
    k = rng.integers(0, 2**32, size=(4096, 2), dtype=np.uint64)
    c[:4] = 0xFFFFFFFF  # the carry-heavy extremes
    k[:2] = 0xFFFFFFFF
    expected = np.stack(philox4x32_10(c[:, 0], c[:, 1], c[:, 2], c[:, 3], k[:, 0], k[:, 1]),
                        axis=1)
    assert np.array_equal(run(c, k), expected)


# ---------------------------------------------------------------- entry layout

@settings(max_examples=15)
@given(seed=st.integers(0, 2**64 - 1), row=st.integers(0, 2**64 - 1),
       proj_dim=st.integers(1, 300), data=st.data())
def test_rademacher_entry_follows_spec_bit_layout(seed, row, proj_dim, data):
    """An independent per-entry reading of docs/rng.md (scalar Philox call, word, bit)."""
    p = data.draw(st.integers(0, proj_dim - 1))
    r = _words(seed, row % 2**32, row >> 32, p // 128, 0)
    bit = (r[(p % 128) // 32] >> (p % 32)) & 1
    expected = (1.0 if bit == 0 else -1.0) / np.sqrt(proj_dim)
    block = get_backend("numpy").generate(seed, row, 1, proj_dim, "rademacher", np.float64)
    assert block[0, p] == expected


@settings(max_examples=15)
@given(seed=st.integers(0, 2**64 - 1), row=st.integers(0, 2**64 - 1),
       proj_dim=st.integers(1, 64), data=st.data())
def test_gaussian_entry_follows_spec_box_muller(seed, row, proj_dim, data):
    p = data.draw(st.integers(0, proj_dim - 1))
    r = _words(seed, row % 2**32, row >> 32, p // 2, 1)
    u1 = ((r[0] >> 5) * 2.0**26 + (r[1] >> 6) + 0.5) / 2.0**53
    u2 = ((r[2] >> 5) * 2.0**26 + (r[3] >> 6) + 0.5) / 2.0**53
    rho = np.sqrt(-2.0 * np.log(u1))
    z = rho * (np.cos(2 * np.pi * u2) if p % 2 == 0 else np.sin(2 * np.pi * u2))
    block = get_backend("numpy").generate(seed, row, 1, proj_dim, "gaussian", np.float64)
    # Same float64 formula evaluated elementwise vs vectorised: a few ulp of |z|/sqrt(P).
    assert abs(block[0, p] - z / np.sqrt(proj_dim)) <= 4 * np.finfo(float).eps * (
        abs(z) + 1) / np.sqrt(proj_dim)


def test_rademacher_value_is_inverse_sqrt_p_rounded_once_to_dtype():
    for dtype in (np.float32, np.float64):
        A = projection_matrix(50, 37, seed=1, dtype=dtype)
        value = dtype(1.0 / np.sqrt(37))
        assert A.dtype == dtype
        assert set(np.unique(np.abs(A))) == {value}


# ---------------------------------------------------------------- backends vs oracle

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=12)
@given(seed=st.integers(0, 2**64 - 1), row_start=st.integers(0, 2**64 - 40),
       n_rows=st.integers(1, 33), proj_dim=st.integers(1, 400),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_rademacher_sign_pattern_identical_on_every_backend(backend, seed, row_start, n_rows,
                                                            proj_dim, dtype):
    expected = get_backend("numpy").generate(seed, row_start, n_rows, proj_dim, "rademacher",
                                             dtype)
    got = get_backend(backend).generate(seed, row_start, n_rows, proj_dim, "rademacher", dtype)
    assert got.dtype == dtype and got.shape == (n_rows, proj_dim)
    assert np.array_equal(got, expected)  # bit for bit, including the rounded value


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=8)
@given(seed=st.integers(0, 2**64 - 1), row_start=st.integers(0, 2**64 - 40),
       n_rows=st.integers(1, 17), proj_dim=st.integers(1, 99))
def test_gaussian_entries_agree_with_oracle_to_few_ulp(backend, seed, row_start, n_rows,
                                                       proj_dim):
    expected = get_backend("numpy").generate(seed, row_start, n_rows, proj_dim, "gaussian",
                                             np.float64)
    got = get_backend(backend).generate(seed, row_start, n_rows, proj_dim, "gaussian",
                                        np.float64)
    # docs/rng.md: log, sqrt, cos, sin may differ by a few ulp between libms; |z| < 9
    # here (u1 >= 2**-53 gives |z| <= 8.6), so 16 ulp of 9/sqrt(P) is a generous cap.
    assert np.max(np.abs(got - expected)) <= 16 * np.finfo(float).eps * 9 / np.sqrt(proj_dim)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_row_block_equals_rows_of_whole_matrix(backend, kind):
    whole = projection_matrix(300, 131, seed=99, kind=kind, backend=backend)
    for start, stop in [(0, 1), (7, 150), (150, 300), (299, 300)]:
        block = projection_matrix(300, 131, seed=99, kind=kind, rows=(start, stop),
                                  backend=backend)
        assert np.array_equal(block, whole[start:stop])


def test_columns_prefix_independent_of_proj_dim_up_to_scale():
    # A[m, p] depends on (seed, m, p) only; P enters through the scale 1/sqrt(P).
    a = projection_matrix(20, 300, seed=5) * np.sqrt(300)
    b = projection_matrix(20, 1000, seed=5) * np.sqrt(1000)
    assert np.array_equal(np.sign(a), np.sign(b[:, :300]))


def test_different_seeds_give_different_matrices():
    a = projection_matrix(64, 128, seed=0)
    b = projection_matrix(64, 128, seed=1)
    c = projection_matrix(64, 128, seed=2**32)  # differs only in the high key word
    assert np.mean(a != b) > 0.4 and np.mean(a != c) > 0.4


# ---------------------------------------------------------------- statistics (JL)

@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("seed", [0, 1, 2**63 + 12345])
def test_rows_are_near_orthonormal_mean_of_a_at_is_identity(kind, seed):
    """(A A^T)[m, m'] = sum_p A[m,p] A[m',p] has mean delta_{mm'} (docs/rng.md).

    Off-diagonal entries are sums of P independent terms of variance 1/P^2 (variance
    1/P); Gaussian diagonals have variance 2/P; Rademacher diagonals are exactly 1.
    With 64*63 off-diagonal entries at fixed seeds, 6 standard deviations is a bound
    a correct generator exceeds with probability < 1e-5.
    """
    M, P = 64, 2048
    A = projection_matrix(M, P, seed=seed, kind=kind)
    C = A @ A.T
    off = C[~np.eye(M, dtype=bool)]
    assert np.max(np.abs(off)) <= 6 / np.sqrt(P)
    # The mean of the off-diagonal entries has variance 1/(P * 4032 / 2) (symmetric pairs).
    assert abs(np.mean(off)) <= 6 / np.sqrt(P * off.size / 2)
    if kind == "rademacher":
        assert np.allclose(np.diag(C), 1.0, rtol=0, atol=P * np.finfo(float).eps)
    else:
        assert np.max(np.abs(np.diag(C) - 1)) <= 6 * np.sqrt(2 / P)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_entry_moments_mean_zero_variance_one_over_p(kind):
    M, P = 512, 512
    z = projection_matrix(M, P, seed=11, kind=kind).ravel() * np.sqrt(P)
    n = z.size
    assert abs(z.mean()) <= 6 / np.sqrt(n)            # var(z) = 1
    if kind == "rademacher":
        # z^2 = 1 up to the rounding of 1/sqrt(P) and the product with sqrt(P).
        assert np.allclose(z**2, 1.0, rtol=0, atol=4 * np.finfo(float).eps)
    else:
        assert abs(np.mean(z**2) - 1) <= 6 * np.sqrt(2 / n)   # var(z^2) = 3 - 1
        assert abs(np.mean(z**3)) <= 6 * np.sqrt(15 / n)      # var(z^3) = 15
        assert abs(np.mean(z**4) - 3) <= 6 * np.sqrt(96 / n)  # var(z^4) = 105 - 9


# ---------------------------------------------------------------- packaging and inputs

def test_importing_kernels_imports_neither_numba_nor_cupy():
    code = ("import sys, iif_ref.kernels; "
            "print('numba' in sys.modules, 'cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_unknown_or_unavailable_backend_error_names_available_ones():
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*available: numpy"):
        projection_matrix(4, 4, backend="cuda")
    ok, reason = backend_status("cupy")
    if ok:
        pytest.skip("cupy is available here; the unavailable message cannot be exercised")
    with pytest.raises(ValueError, match=r"backend 'cupy' is unavailable: .+; available: numpy"):
        projection_matrix(4, 4, backend="cupy")


@pytest.mark.parametrize("seed,exc", [(-1, ValueError), (2**64, ValueError), (1.0, TypeError),
                                      (True, TypeError), ("0", TypeError)])
def test_seed_outside_uint64_range_is_rejected(seed, exc):
    with pytest.raises(exc, match="seed"):
        projection_matrix(4, 4, seed=seed)


def test_seed_extremes_accepted():
    for seed in (0, 2**64 - 1, np.uint64(2**64 - 1), np.int64(3)):
        assert projection_matrix(3, 5, seed=seed).shape == (3, 5)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(kind="normal"), ValueError, "kind"),
    (dict(dtype=np.float16), TypeError, "dtype"),
    (dict(dtype=np.int32), TypeError, "dtype"),
    (dict(rows=(3, 3)), ValueError, "rows"),
    (dict(rows=(0, 11)), ValueError, "rows"),
    (dict(rows=5), TypeError, "rows"),
])
def test_projection_matrix_bad_arguments_raise_naming_them(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        projection_matrix(10, 4, **kwargs)


@pytest.mark.parametrize("n_params,proj_dim,match", [(0, 4, "n_params"), (4, 0, "proj_dim"),
                                                     (4, 2**32, "proj_dim")])
def test_projection_matrix_bad_sizes_raise_naming_them(n_params, proj_dim, match):
    with pytest.raises(ValueError, match=match):
        projection_matrix(n_params, proj_dim)
