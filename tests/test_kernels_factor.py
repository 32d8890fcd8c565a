"""Public factor/solve layer (factor_fisher, FisherFactor.solve, solve_factored,
resolve_damping) and the device-array path of the front end.

Tolerances: a backward-stable Cholesky solve has forward error
<= c n eps64 cond(F) ||F^{-1}|| ||rhs|| (Higham, Thm 10.4); the reference bounds of
``test_kernels_solve._reference_terms`` (c = 16) are reused, so both files hold the
public layer and ``projected_scores`` to the same standard.
"""
import types

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels_solve import EPS64, _conditioned, _reference_terms

from iif_ref.errors import NotPositiveDefiniteError
from iif_ref.kernels import (RELATIVE_DAMPING, FisherFactor, _frontend, factor_fisher,
                             is_device_array, project, projected_scores, resolve_damping,
                             solve_factored)


# --------------------------------------------------------------------------- factor + solve
@settings(max_examples=20)
@given(B=st.integers(1, 4), N=st.integers(1, 30), P=st.integers(1, 20), T=st.integers(1, 5),
       log10_cond=st.floats(0, 5), rel_damping=st.floats(1e-6, 10),
       seed=st.integers(0, 2**32 - 1))
def test_factor_then_solve_equals_projected_scores_and_dense_cholesky(B, N, P, T, log10_cond,
                                                                      rel_damping, seed):
    # Covers both forms: N >= P (P x P Cholesky) and N < P (N x N push-through kernel).
    rng = np.random.default_rng(seed)
    Phi = _conditioned(rng, B, N, P, log10_cond)
    Psi, Gamma = rng.standard_normal((B, N, P)), rng.standard_normal((B, T, P))
    lam = rel_damping * np.mean(np.sum(Phi**2, axis=(1, 2))) / P
    factor = factor_fisher(Phi, damping=lam)
    assert isinstance(factor, FisherFactor) and len(factor) == B and factor.proj_dim == P
    assert factor.forms == (("direct" if N >= P else "woodbury"),) * B
    W = factor.solve(Gamma.transpose(0, 2, 1))                       # (B, P, T)
    terms = -np.einsum("bpt,bnp->btn", W, Psi)
    expected, bounds = _reference_terms(Phi, Psi, Gamma, np.full(B, lam))
    oracle = projected_scores(Phi, Psi, Gamma, damping=lam, backend="numpy", reduce=False)
    for b in range(B):
        assert np.max(np.abs(terms[b] - expected[b])) <= bounds[b]
        # Both are within bounds[b] of the dense reference, hence within 2 bounds[b].
        assert np.max(np.abs(terms[b] - oracle[b])) <= 2 * bounds[b]


@pytest.mark.parametrize("N,P", [(40, 6), (5, 12)])
def test_solve_factored_per_slice_and_vector_rhs_equal_dense_solve(N, P):
    rng = np.random.default_rng(1)
    Phi = rng.standard_normal((3, N, P))
    rhs = rng.standard_normal((3, P, 4))
    factor = factor_fisher(Phi, damping=0.2)
    full = solve_factored(factor, rhs)
    vec = solve_factored(factor, rhs[:, :, 0])
    for b in range(3):
        F = Phi[b].T @ Phi[b] + 0.2 * np.eye(P)
        want = scipy.linalg.solve(F, rhs[b], assume_a="pos")
        eig = np.linalg.eigvalsh(F)
        # c = 16 as in the module docstring; ||rhs|| scales the normwise bound.
        bound = 16 * max(N, P) * EPS64 * (eig[-1] / eig[0]) / eig[0] * np.linalg.norm(rhs[b], 2)
        assert np.max(np.abs(full[b] - want)) <= bound
        assert np.max(np.abs(factor.solve(rhs[b], index=b) - full[b])) <= bound
        assert np.max(np.abs(vec[b] - want[:, 0])) <= bound
        assert factor.solve(rhs[b, :, 0], index=b).shape == (P,)
    assert full.dtype == np.float64 and full.shape == rhs.shape


def test_factor_from_gram_equals_factor_from_phi():
    # Same Gram (one float64 GEMM each) and the same damping rule: F_b^{-1} agrees to
    # the solve bound; the relative default is computed from tr(gram_b) = ||Phi_b||_F^2,
    # equal to rounding (N P terms summed in two orders: <= N P eps64 tr relative).
    rng = np.random.default_rng(2)
    B, N, P = 3, 50, 7
    Phi = rng.standard_normal((B, N, P)) * np.array([1.0, 1e3, 1e-3])[:, None, None]
    grams = np.einsum("bnp,bnq->bpq", Phi, Phi)
    grams = (grams + grams.transpose(0, 2, 1)) / 2
    rhs = rng.standard_normal((B, P, 2))
    a, g = factor_fisher(Phi), factor_fisher(gram=grams)
    assert np.allclose(a.damping, g.damping, rtol=N * P * EPS64, atol=0)
    assert np.array_equal(g.damping, RELATIVE_DAMPING * np.trace(grams, axis1=1, axis2=2) / P)
    for b in range(B):
        F = grams[b] + g.damping[b] * np.eye(P)
        eig = np.linalg.eigvalsh(F)
        # Two backward-stable solves of Fishers equal to rounding: twice the c = 16 bound.
        bound = 2 * 16 * N * EPS64 * (eig[-1] / eig[0]) / eig[0] * np.linalg.norm(rhs[b], 2)
        assert np.max(np.abs(a.solve(rhs[b], index=b) - g.solve(rhs[b], index=b))) <= bound
        # The stored factor is F's Cholesky factor: L L^T = F to c P eps64 ||F||.
        L = np.tril(g.lower(b))
        assert np.max(np.abs(L @ L.T - F)) <= 16 * P * EPS64 * eig[-1]
    with pytest.raises(ValueError):
        g.lower(0)[0, 0] = 1.0          # read-only view: the factor cannot be corrupted


def test_resolve_damping_rules_and_projected_scores_uses_the_same_numbers():
    rng = np.random.default_rng(3)
    Phi = rng.standard_normal((3, 20, 5)) * np.array([1.0, 10.0, 0.1])[:, None, None]
    Psi, Gamma = rng.standard_normal((3, 20, 5)), rng.standard_normal((3, 2, 5))
    traces = np.sum(Phi.astype(np.float64) ** 2, axis=(1, 2))
    # Relative default: 1e-3 tr / P, the same float64 sums on both sides (rtol 1e-15:
    # np.sum of squares vs square-then-sum may differ in the last bit).
    assert np.allclose(resolve_damping(Phi), RELATIVE_DAMPING * traces / 5, rtol=1e-15, atol=0)
    assert resolve_damping(Phi[0]).shape == (1,)
    assert resolve_damping(Phi, 0.25).tolist() == [0.25] * 3
    seen = []
    lam = resolve_damping(Phi, lambda tr, P: seen.append((tr, P)) or 2.0 * tr / P)
    assert [P for _, P in seen] == [5] * 3
    assert np.allclose(lam, 2.0 * traces / 5, rtol=1e-15, atol=0)
    # projected_scores given the default as a callable uses exactly these numbers:
    # bit-identical scores.
    default = projected_scores(Phi, Psi, Gamma, backend="numpy")
    explicit = projected_scores(Phi, Psi, Gamma, backend="numpy",
                                damping=lambda tr, P: RELATIVE_DAMPING * tr / P)
    assert np.array_equal(default, explicit)


# --------------------------------------------------------------------------- errors
def test_factor_error_names_failing_slices_and_suggested_damping_fixes_them():
    rng = np.random.default_rng(4)
    Phi = rng.standard_normal((4, 30, 6))
    Phi[1, :, 3] = Phi[1, :, 0]        # rank-deficient Gram
    Phi[3] = 0.0                       # zero Gram: the suggestion falls back to >= 1
    with pytest.raises(NotPositiveDefiniteError, match=r"b = \[1, 3\]") as info:
        factor_fisher(Phi, damping=0.0)
    err = info.value
    with pytest.raises(NotPositiveDefiniteError) as scores_info:
        projected_scores(Phi, Phi, Phi[:, :2], damping=0.0, backend="numpy")
    assert err.slices == scores_info.value.slices == (1, 3)
    # The relative default of the failing slices (slice 1's; slice 3's trace is 0).
    assert err.suggested_damping == scores_info.value.suggested_damping
    assert np.isclose(err.suggested_damping, RELATIVE_DAMPING * np.sum(Phi[1] ** 2) / 6,
                      rtol=1e-15, atol=0)
    fixed = factor_fisher(Phi, damping=err.suggested_damping)
    assert np.all(np.isfinite(fixed.solve(np.ones((4, 6)))))
    grams = np.einsum("bnp,bnq->bpq", Phi, Phi)
    with pytest.raises(NotPositiveDefiniteError) as gram_info:
        factor_fisher(gram=grams, damping=0.0)
    assert gram_info.value.slices == (1, 3)
    assert np.isclose(gram_info.value.suggested_damping, err.suggested_damping, rtol=1e-14,
                      atol=0)  # trace of the GEMM Gram vs sum of squares: rounding only
    with pytest.raises(NotPositiveDefiniteError) as zero_info:  # only the zero slice fails
        factor_fisher(gram=grams[3:], damping=0.0)
    assert zero_info.value.suggested_damping == 1.0             # max(1, 10 * 0)


def test_factor_with_fewer_samples_than_dimensions_needs_positive_damping():
    Phi = np.random.default_rng(5).standard_normal((2, 3, 8))
    with pytest.raises(NotPositiveDefiniteError, match="N < P") as info:
        factor_fisher(Phi, damping=0.0)
    assert info.value.slices == (0, 1) and info.value.suggested_damping > 0


GOOD_PHI = np.ones((2, 5, 3)) + np.eye(5, 3)[None]


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((), {}, TypeError, "exactly one of Phi and gram"),
    ((GOOD_PHI,), dict(gram=np.eye(3)), TypeError, "exactly one of Phi and gram"),
    ((np.full((2, 5, 3), np.nan),), {}, ValueError, "Phi contains"),
    ((np.ones((2, 0, 3)),), {}, ValueError, "Phi is empty"),
    ((np.ones(3),), {}, ValueError, "Phi must have 2 or 3"),
    ((), dict(gram=np.ones((2, 3, 4))), ValueError, "square"),
    ((), dict(gram=np.array([[2.0, 1.0], [0.0, 2.0]])), ValueError, "symmetric"),
    ((), dict(gram=np.array([[np.inf, 0.0], [0.0, 1.0]])), ValueError, "gram contains"),
    ((GOOD_PHI,), dict(damping=-1.0), ValueError, "damping must be >= 0"),
    ((GOOD_PHI,), dict(damping="big"), TypeError, "damping"),
    ((GOOD_PHI,), dict(damping=lambda tr, P: -1.0), ValueError, r"damping\(trace, P\)"),
])
def test_factor_fisher_bad_inputs_raise_naming_the_argument(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        factor_fisher(*args, **kwargs)


@pytest.mark.parametrize("rhs,kwargs,exc,match", [
    (np.ones((3, 3)), {}, ValueError, r"rhs must have shape \(B, P\)"),
    (np.ones((2, 4)), {}, ValueError, r"rhs must have shape \(B, P\)"),
    (np.full((2, 3), np.nan), {}, ValueError, "rhs contains"),
    (np.ones((2, 3, 0)), {}, ValueError, "rhs is empty"),
    (np.ones(4), dict(index=0), ValueError, "P=3 rows"),
    (np.ones(3), dict(index=2), ValueError, "index must satisfy"),
    (np.ones(3), dict(index=1.0), TypeError, "index must be an int"),
])
def test_solve_factored_bad_inputs_raise_naming_the_argument(rhs, kwargs, exc, match):
    factor = factor_fisher(GOOD_PHI, damping=1.0)
    with pytest.raises(exc, match=match):
        solve_factored(factor, rhs, **kwargs)


def test_solve_factored_rejects_a_non_factor():
    with pytest.raises(TypeError, match="FisherFactor"):
        solve_factored(np.eye(3), np.ones((1, 3)))


# --------------------------------------------------------------------------- device arrays
# A stand-in for a CUDA array: NumPy data behind an object that reports a CUDA DLPack
# device, computes through its own __array_namespace__, and refuses conversion to NumPy
# (as CuPy does), so any host copy in the front end fails the test loudly.

class FakeDeviceArray:
    def __init__(self, data):
        self._data = np.asarray(data)

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0

    def __array_namespace__(self, api_version=None):
        return FAKE_XP

    def __array__(self, *args, **kwargs):
        raise TypeError("implicit conversion of a device array to NumPy")

    def __getitem__(self, key):
        return FakeDeviceArray(self._data[key])

    def __mul__(self, other):
        return FakeDeviceArray(self._data * other._data)


def _fake_namespace():
    xp = types.SimpleNamespace(float64=np.float64, calls=[])

    def record(name, f):
        def wrapped(*args, **kwargs):
            xp.calls.append(name)
            return f(*args, **kwargs)
        return wrapped

    # Reductions return host scalars (what float()/bool() of a 0-d device array gives).
    xp.sum = record("sum", lambda x, dtype=None: np.sum(x._data, dtype=dtype))
    xp.all = record("all", lambda x: np.all(x._data))
    xp.isfinite = record("isfinite", lambda x: FakeDeviceArray(np.isfinite(x._data)))
    xp.asarray = record("asarray", lambda x, dtype=None: FakeDeviceArray(
        x._data.astype(dtype)))
    return xp


FAKE_XP = _fake_namespace()


class RecordingBackend:
    """Stands for the cupy backend: records what the front end hands it."""

    def __init__(self):
        self.calls = []

    def projected_scores(self, Phi, Psi, Gamma, *, damping, reduce):
        self.calls.append(("projected_scores", (Phi, Psi, Gamma), damping, reduce))
        return "device result"

    def project(self, G, proj_dim, *, seed, kind, chunk_rows):
        self.calls.append(("project", (G,), chunk_rows, (proj_dim, seed, kind)))
        return "device result"


@pytest.fixture
def recording_cupy(monkeypatch):
    backend = RecordingBackend()
    seen = []

    def get_backend(name):
        seen.append(name)
        return backend
    monkeypatch.setattr(_frontend, "get_backend", get_backend)
    backend.names = seen
    return backend


def test_device_arrays_are_detected_by_their_dlpack_device():
    import torch
    assert is_device_array(FakeDeviceArray(np.ones(2)))
    assert not is_device_array(np.ones(2))
    assert not is_device_array(torch.ones(2))       # a CPU tensor is a host array
    assert not is_device_array([1.0, 2.0])


def test_device_arrays_reach_the_cupy_backend_unchanged_with_host_damping(recording_cupy):
    rng = np.random.default_rng(6)
    host = [rng.standard_normal((2, 9, 4)).astype(np.float32),
            rng.standard_normal((2, 9, 4)), rng.standard_normal((2, 3, 4))]
    dev = [FakeDeviceArray(a) for a in host]
    FAKE_XP.calls.clear()
    assert projected_scores(*dev, backend="cupy", reduce=False) == "device result"
    (_, arrays, lam, reduce), = recording_cupy.calls
    assert recording_cupy.names == ["cupy"] and reduce is False
    assert all(a is d for a, d in zip(arrays, dev))      # the very objects: no copy
    # The damping the backend gets is the host rule evaluated on the device traces:
    # float64 sums of float64 squares of the same values (rtol 1e-15, summation order).
    assert isinstance(lam, np.ndarray) and lam.dtype == np.float64
    assert np.allclose(lam, resolve_damping(host[0]), rtol=1e-15, atol=0)
    assert {"sum", "asarray"} <= set(FAKE_XP.calls)     # reductions ran on the "device"


def test_two_dimensional_device_inputs_get_a_batch_axis_on_the_device(recording_cupy):
    rng = np.random.default_rng(7)
    dev = [FakeDeviceArray(rng.standard_normal(s)) for s in ((9, 4), (9, 4), (2, 4))]
    projected_scores(*dev, damping=0.5, backend="cupy")
    (_, arrays, lam, _), = recording_cupy.calls
    assert all(isinstance(a, FakeDeviceArray) and a.shape == (1,) + d.shape
               for a, d in zip(arrays, dev))
    assert lam.tolist() == [0.5]


def test_device_g_reaches_the_cupy_project_unchanged(recording_cupy):
    G = FakeDeviceArray(np.random.default_rng(8).standard_normal((3, 50)).astype(np.float32))
    assert project(G, 16, seed=2, backend="cupy", memory_budget=16 * 4 * 10) == \
        "device result"
    (_, (got,), chunk_rows, rest), = recording_cupy.calls
    assert got is G and rest == (16, 2, "rademacher")
    assert chunk_rows == 10     # budget / (P * 4 bytes of float32)


@pytest.mark.parametrize("data,match,exc", [
    (np.full((2, 9, 4), np.nan), "Phi contains non-finite", ValueError),
    (np.ones((2, 9, 4), dtype=np.int64), "Phi must be float32 or float64", TypeError),
    (np.ones((2, 0, 4)), "Phi is empty", ValueError),
    (np.ones(4), "Phi must have 2 or 3", ValueError),
])
def test_bad_device_inputs_raise_naming_the_argument_without_host_copy(recording_cupy, data,
                                                                       match, exc):
    good = FakeDeviceArray(np.ones((2, 9, 4)))
    with pytest.raises(exc, match=match):
        projected_scores(FakeDeviceArray(data), good, good, backend="cupy")
    assert recording_cupy.calls == []


def test_overflowing_device_sum_falls_back_to_the_elementwise_finiteness_test(recording_cupy):
    big = np.full((1, 4, 2), 1e308)   # finite entries whose float64 sum overflows
    dev = FakeDeviceArray(big)
    FAKE_XP.calls.clear()
    with np.errstate(over="ignore"):  # the stand-in's overflowing sum, as on a device
        projected_scores(dev, dev, dev, damping=1.0, backend="cupy")
    assert len(recording_cupy.calls) == 1
    assert FAKE_XP.calls.count("isfinite") == 3   # the fallback ran for each array
    assert "asarray" not in FAKE_XP.calls          # absolute damping: no trace needed


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_device_arrays_on_a_host_backend_raise_type_error_naming_cupy(backend):
    dev = FakeDeviceArray(np.ones((2, 9, 4)))
    with pytest.raises(TypeError, match='Phi is a device array.*backend="cupy"'):
        projected_scores(dev, dev, dev, backend=backend)
    with pytest.raises(TypeError, match='G is a device array.*backend="cupy"'):
        project(FakeDeviceArray(np.ones((2, 9))), 4, backend=backend)
    with pytest.raises(TypeError, match="runs on the host"):
        factor_fisher(dev)


def test_host_inputs_with_backend_cupy_still_validate_with_numpy(recording_cupy):
    # Host arrays keep the NumPy path (as_float_array: ints become float64) even when the
    # device backend is asked for; only their validation is unchanged, not the backend.
    Phi = np.ones((1, 5, 2), dtype=np.int32) + np.eye(5, 2, dtype=np.int32)[None]
    projected_scores(Phi, Phi, Phi[:, :1], damping=1.0, backend="cupy")
    (_, arrays, _, _), = recording_cupy.calls
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in arrays)
