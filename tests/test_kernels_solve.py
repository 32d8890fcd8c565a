"""projected_scores(): -sum_b Gamma_b (Phi_b^T Phi_b + lam_d I)^{-1} Psi_b^T.

Reference: a Python loop of dense float64 ``scipy.linalg.cho_factor``/``cho_solve`` on
the P x P Fisher. Tolerances come from the conditioning of each slice: a backward-stable
Cholesky solve has forward error <= c n eps cond(F) ||F^{-1}|| (Higham, *Accuracy and
Stability of Numerical Algorithms*, Thm 10.4), and the same normwise bound holds for
the N x N Woodbury form because cond(Phi Phi^T + lam I) <= cond(F).
"""
import numpy as np
import pytest
import scipy.linalg
from _backends import BACKEND_PARAMS  # tests/_backends.py
from hypothesis import given, settings
from hypothesis import strategies as st

from iif_ref.errors import NotPositiveDefiniteError
from iif_ref.kernels import projected_scores

EPS64 = np.finfo(np.float64).eps
EPS32 = float(np.finfo(np.float32).eps)


def _conditioned(rng, B, N, P, log10_cond):
    """Phi_b = U diag(s) V^T with singular values log-spaced over 10**-log10_cond..1."""
    k = min(N, P)
    out = np.empty((B, N, P))
    for b in range(B):
        U = np.linalg.qr(rng.standard_normal((N, k)))[0]
        V = np.linalg.qr(rng.standard_normal((P, k)))[0]
        s = np.logspace(-log10_cond, 0, k)
        out[b] = (U * s) @ V.T
    return out


def _reference_terms(Phi, Psi, Gamma, lam):
    """Dense float64 loop: -Gamma_b cho_solve(F_b, Psi_b^T), and per-slice error bounds."""
    Phi, Psi, Gamma = (np.asarray(x, dtype=np.float64) for x in (Phi, Psi, Gamma))
    B, N, P = Phi.shape
    terms, bounds = [], []
    for b in range(B):
        F = Phi[b].T @ Phi[b] + lam[b] * np.eye(P)
        terms.append(-Gamma[b] @ scipy.linalg.cho_solve(scipy.linalg.cho_factor(F),
                                                         Psi[b].T))
        eig = np.linalg.eigvalsh(F)
        cond, inv_norm = eig[-1] / eig[0], 1 / eig[0]
        scale = np.linalg.norm(Gamma[b], 2) * np.linalg.norm(Psi[b], 2) * inv_norm
        # c = 16 for the Cholesky solve, its reference twin and the surrounding GEMMs.
        bounds.append(16 * max(N, P) * EPS64 * cond * scale)
    return np.array(terms), np.array(bounds)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=15)
@given(B=st.integers(1, 4), N=st.integers(1, 40), P=st.integers(1, 24), T=st.integers(1, 6),
       log10_cond=st.floats(0, 5), rel_damping=st.floats(1e-6, 10),
       seed=st.integers(0, 2**32 - 1))
def test_batched_scores_equal_loop_of_dense_cholesky_solves(backend, B, N, P, T, log10_cond,
                                                            rel_damping, seed):
    rng = np.random.default_rng(seed)
    Phi = _conditioned(rng, B, N, P, log10_cond)
    Psi = rng.standard_normal((B, N, P))
    Gamma = rng.standard_normal((B, T, P))
    lam = rel_damping * np.mean(np.sum(Phi**2, axis=(1, 2))) / P
    expected, bounds = _reference_terms(Phi, Psi, Gamma, np.full(B, lam))
    per = projected_scores(Phi, Psi, Gamma, damping=lam, backend=backend, reduce=False)
    total = projected_scores(Phi, Psi, Gamma, damping=lam, backend=backend)
    assert per.shape == (B, T, N) and per.dtype == np.float64
    assert total.shape == (T, N) and total.dtype == np.float64
    for b in range(B):
        assert np.max(np.abs(per[b] - expected[b])) <= bounds[b]
    assert np.max(np.abs(total - expected.sum(axis=0))) <= bounds.sum()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("log10_cond", [0, 3, 6])
def test_woodbury_path_for_n_below_p_equals_direct_form(backend, log10_cond):
    rng = np.random.default_rng(log10_cond)
    B, N, P, T = 3, 10, 60, 4
    Phi = _conditioned(rng, B, N, P, log10_cond)
    Psi = np.concatenate([Phi[:, :5], rng.standard_normal((B, 5, P))], axis=1)  # in/out of span
    Gamma = rng.standard_normal((B, T, P))
    lam = 1e-4
    expected, bounds = _reference_terms(Phi, Psi, Gamma, np.full(B, lam))
    got = projected_scores(Phi, Psi, Gamma, damping=lam, backend=backend, reduce=False)
    assert np.all(np.max(np.abs(got - expected), axis=(1, 2)) <= bounds)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_more_test_points_than_samples_uses_the_other_rhs_and_agrees(backend):
    rng = np.random.default_rng(3)
    Phi, Psi = rng.standard_normal((2, 30, 8)), rng.standard_normal((2, 30, 8))
    Gamma = rng.standard_normal((2, 50, 8))  # T > N: solve against Psi instead
    expected, bounds = _reference_terms(Phi, Psi, Gamma, np.full(2, 0.5))
    got = projected_scores(Phi, Psi, Gamma, damping=0.5, backend=backend, reduce=False)
    assert np.all(np.max(np.abs(got - expected), axis=(1, 2)) <= bounds)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_two_dimensional_inputs_are_one_slice(backend):
    rng = np.random.default_rng(4)
    Phi, Psi, Gamma = rng.standard_normal((20, 5)), rng.standard_normal((20, 5)), \
        rng.standard_normal((3, 5))
    flat = projected_scores(Phi, Psi, Gamma, damping=0.1, backend=backend)
    batched = projected_scores(Phi[None], Psi[None], Gamma[None], damping=0.1, backend=backend)
    assert flat.shape == (3, 20)
    assert np.array_equal(flat, batched)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_default_damping_is_relative_to_mean_gram_eigenvalue_per_slice(backend):
    rng = np.random.default_rng(5)
    Phi = rng.standard_normal((3, 25, 6)) * np.array([1.0, 10.0, 0.01])[:, None, None]
    Psi, Gamma = rng.standard_normal((3, 25, 6)), rng.standard_normal((3, 2, 6))
    per = projected_scores(Phi, Psi, Gamma, backend=backend, reduce=False)
    for b in range(3):
        lam_b = 1e-3 * np.trace(Phi[b].T @ Phi[b]) / 6
        expected, bound = _reference_terms(Phi[b:b + 1], Psi[b:b + 1], Gamma[b:b + 1], [lam_b])
        assert np.max(np.abs(per[b] - expected[0])) <= bound[0]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_default_damping_makes_scores_scale_as_inverse_square_of_phi(backend):
    # F(c Phi) = c^2 F(Phi) when the damping scales with tr(Phi^T Phi): scores / c^2.
    rng = np.random.default_rng(6)
    Phi, Psi, Gamma = rng.standard_normal((2, 12, 30)), rng.standard_normal((2, 12, 30)), \
        rng.standard_normal((2, 3, 30))
    base = projected_scores(Phi, Psi, Gamma, backend=backend)
    scaled = projected_scores(8.0 * Phi, Psi, Gamma, backend=backend)  # power of 2: exact scaling
    _, bounds = _reference_terms(Phi, Psi, Gamma, 1e-3 * np.sum(Phi**2, axis=(1, 2)) / 30)
    assert np.max(np.abs(64.0 * scaled - base)) <= 2 * bounds.sum()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("N,P", [(40, 10), (10, 40)])
def test_float32_inputs_within_perturbation_bound_of_float64(backend, N, P):
    """Rounding the inputs to float32 (relative eps32 per entry) moves F by
    ||dF|| <= 2 eps32 ||Phi||_F^2 and the score by at most
    eps32 ||Gamma||_F ||Psi||_F ||F^-1|| (2 + 2 ||Phi||_F^2 ||F^-1||) to first order;
    the Gram itself is exact products summed in float64, so nothing else is float32."""
    rng = np.random.default_rng(7)
    Phi, Psi, Gamma = rng.standard_normal((2, N, P)), rng.standard_normal((2, N, P)), \
        rng.standard_normal((2, 5, P))
    lam = 0.5
    f32 = [x.astype(np.float32) for x in (Phi, Psi, Gamma)]
    got = projected_scores(*f32, damping=lam, backend=backend, reduce=False)
    ref = projected_scores(Phi, Psi, Gamma, damping=lam, backend=backend, reduce=False)
    for b in range(2):
        F = Phi[b].T @ Phi[b] + lam * np.eye(P)
        inv_norm = 1 / np.linalg.eigvalsh(F)[0]
        phi_f2 = np.sum(Phi[b] ** 2)
        bound = EPS32 * np.linalg.norm(Gamma[b]) * np.linalg.norm(Psi[b]) * inv_norm * (
            2 + 2 * phi_f2 * inv_norm)
        assert np.max(np.abs(got[b] - ref[b])) <= 2 * bound  # 2x for second-order terms


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_float32_gram_is_accumulated_in_float64(backend):
    """Columns 1 and 1 ± 2^-12 (exact in float32): the Gram is [[N, N], [N, N(1 + 2^-24)]],
    positive definite (smallest eigenvalue ~ N 2^-25) but singular once rounded to
    float32. Undamped, a float32 Gram would raise; the float64 Gram of the same float32
    values must give exactly the float64-input result."""
    N = 64
    Phi = np.ones((1, N, 2), dtype=np.float32)
    Phi[0, :, 1] = 1.0 + 2.0**-12
    Phi[0, ::2, 1] = 1.0 - 2.0**-12
    gram32 = Phi[0].T @ Phi[0]
    assert np.linalg.matrix_rank(gram32.astype(np.float64)) == 1  # the failure being guarded
    Psi = np.ones((1, N, 2), dtype=np.float32)
    Gamma = np.array([[[1.0, -1.0]]], dtype=np.float32)
    got = projected_scores(Phi, Psi, Gamma, damping=0.0, backend=backend)
    ref = projected_scores(Phi.astype(np.float64), Psi.astype(np.float64),
                           Gamma.astype(np.float64), damping=0.0, backend="numpy")
    expected, bound = _reference_terms(Phi, Psi, Gamma, [0.0])
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - ref)) <= bound[0]
    assert np.max(np.abs(got - expected[0])) <= bound[0]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_not_positive_definite_error_names_failing_slices_and_a_fixing_damping(backend):
    rng = np.random.default_rng(8)
    B, N, P = 5, 30, 6
    Phi = rng.standard_normal((B, N, P))
    for b in (1, 3):  # rank-deficient Gram: a repeated column
        Phi[b, :, 4] = Phi[b, :, 2]
    Psi, Gamma = rng.standard_normal((B, N, P)), rng.standard_normal((B, 2, P))
    with pytest.raises(NotPositiveDefiniteError, match=r"b = \[1, 3\]") as info:
        projected_scores(Phi, Psi, Gamma, damping=0.0, backend=backend)
    err = info.value
    assert err.slices == (1, 3) and err.damping == 0.0
    assert isinstance(err, ValueError) and isinstance(err, np.linalg.LinAlgError)
    fixed = projected_scores(Phi, Psi, Gamma, damping=err.suggested_damping, backend=backend)
    assert np.all(np.isfinite(fixed))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fewer_samples_than_dimensions_needs_positive_damping(backend):
    rng = np.random.default_rng(9)
    Phi, Psi, Gamma = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8)), \
        rng.standard_normal((2, 1, 8))
    with pytest.raises(NotPositiveDefiniteError, match="N < P") as info:
        projected_scores(Phi, Psi, Gamma, damping=0.0, backend=backend)
    assert info.value.slices == (0, 1) and info.value.suggested_damping > 0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_zero_phi_slice_with_default_damping_raises_not_nan(backend):
    rng = np.random.default_rng(10)
    Phi = rng.standard_normal((3, 20, 4))
    Phi[2] = 0.0  # tr = 0: the relative default is 0, F_2 = 0
    Psi, Gamma = rng.standard_normal((3, 20, 4)), rng.standard_normal((3, 2, 4))
    with pytest.raises(NotPositiveDefiniteError) as info:
        projected_scores(Phi, Psi, Gamma, backend=backend)
    assert info.value.slices == (2,) and info.value.suggested_damping > 0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_inputs_are_not_overwritten(backend):
    rng = np.random.default_rng(11)
    arrays = [rng.standard_normal((2, 9, 4)), rng.standard_normal((2, 9, 4)),
              rng.standard_normal((2, 3, 4))]
    copies = [a.copy() for a in arrays]
    projected_scores(*arrays, damping=0.1, backend=backend)
    projected_scores(*[a[:, :2] for a in arrays], damping=0.1, backend=backend)  # Woodbury
    assert all(np.array_equal(a, c) for a, c in zip(arrays, copies))


GOOD = dict(Phi=np.ones((2, 5, 3)), Psi=np.ones((2, 5, 3)), Gamma=np.ones((2, 4, 3)))


@pytest.mark.parametrize("change,exc,match", [
    (dict(Psi=np.ones((2, 6, 3))), ValueError, "same number of samples N"),
    (dict(Gamma=np.ones((3, 4, 3))), ValueError, "same batch size B"),
    (dict(Gamma=np.ones((2, 4, 2))), ValueError, "same proj_dim P"),
    (dict(Gamma=np.ones((4, 3))), ValueError, "all be 2-D or all be 3-D"),
    (dict(Phi=np.ones(3)), ValueError, "Phi must have 2 or 3"),
    (dict(Psi=np.full((2, 5, 3), np.inf)), ValueError, "Psi contains"),
    (dict(Gamma=np.ones((2, 0, 3))), ValueError, "Gamma is empty"),
    (dict(Phi=np.ones((2, 5, 3), dtype=complex)), TypeError, "Phi must be real"),
    (dict(Phi="abc"), TypeError, "Phi"),
    (dict(damping=-1.0), ValueError, "damping must be >= 0"),
    (dict(damping=np.nan), ValueError, "damping must be finite"),
    (dict(damping="big"), TypeError, "damping"),
    (dict(reduce=1), TypeError, "reduce"),
    (dict(backend="cuda"), ValueError, "unknown backend"),
])
def test_projected_scores_bad_inputs_raise_naming_the_argument(change, exc, match):
    kwargs = {**GOOD, "damping": 1.0, "backend": "numpy", **change}
    with pytest.raises(exc, match=match):
        projected_scores(kwargs.pop("Phi"), kwargs.pop("Psi"), kwargs.pop("Gamma"), **kwargs)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("N,P", [(30, 8), (6, 20)])
def test_permuting_samples_permutes_score_columns(backend, N, P):
    # F_b = sum_i phi_i phi_i^T does not depend on the order of the samples, and column
    # i of the score depends on Psi[i] only; equal up to the rounding of the Gram sum.
    rng = np.random.default_rng(12)
    Phi, Psi, Gamma = rng.standard_normal((2, N, P)), rng.standard_normal((2, N, P)), \
        rng.standard_normal((2, 3, P))
    perm = rng.permutation(N)
    base = projected_scores(Phi, Psi, Gamma, damping=0.3, backend=backend)
    permuted = projected_scores(Phi[:, perm], Psi[:, perm], Gamma, damping=0.3,
                                backend=backend)
    _, bounds = _reference_terms(Phi, Psi, Gamma, np.full(2, 0.3))
    assert np.max(np.abs(permuted - base[:, perm])) <= 2 * bounds.sum()
