"""The conformance suite accepts correct attributors and catches wrong ones.

Correct attributors: the closed forms of iif_ref.linear, plus independent NumPy
implementations written here from the formulas (TracIn by explicit gradient descent, IF by
normal equations, the projector by a materialised matrix), so that a pass is not the
oracle compared with itself. Wrong attributors: a sign flip, a missing factor 2, an
undeclared mean normalisation, a permutation bug, an ignored duplicate, a non-linear
projector, a projector with the wrong scale or an ignored seed.
"""
import unittest

import numpy as np
import pytest

from iif_ref import linear
from iif_ref.kernels import project
from iif_ref.testing import (
    Attributor,
    ConformanceError,
    check_attributor,
    default_problems,
    exact_scores,
    make_problem,
    parametrize_with_checks,
)
from iif_ref.testing.own import linear_if, linear_iif, linear_tracin

ALL_IIF_CAPS = frozenset({"prediction_baseline", "exact_integral", "exact_path"})


# ----------------------------------------------------------------- correct attributors
def normal_equations_if(p):
    """IF from the formula with an explicit Hessian (independent of linear's QR path)."""
    theta = np.linalg.solve(p.X.T @ p.X, p.X.T @ p.y)
    H = 2.0 * p.X.T @ p.X
    g_test = 2.0 * (p.X_test @ theta - p.y_test)[:, None] * p.X_test
    g_train = 2.0 * (p.X @ theta - p.y)[:, None] * p.X
    return -g_test @ np.linalg.solve(H, g_train.T)


def gd_tracin(p):
    """TracIn from explicit gradient-descent checkpoints and per-sample gradients."""
    S = np.zeros((p.n_test, p.n_train))
    for theta in p.checkpoint_params():
        g_test = 2.0 * (p.X_test @ theta - p.y_test)[:, None] * p.X_test
        g_train = 2.0 * (p.X @ theta - p.y)[:, None] * p.X
        S -= p.lr * g_test @ g_train.T
    return S


def proponent_positive_tracin(p):
    """The TracIn paper's sign: positive = proponent."""
    return -gd_tracin(p)


def mean_loss_if(p):
    """Koh–Liang IF with the mean training loss: n_train × ours."""
    return p.n_train * normal_equations_if(p)


def dense_projector(G, dim, seed):
    """Materialised Rademacher matrix ±1/√dim from a NumPy generator."""
    A = np.random.default_rng(seed).choice([-1.0, 1.0], size=(G.shape[1], dim))
    return G @ A / np.sqrt(dim)


def ours_projector(G, dim, seed):
    return project(G, dim, seed=seed, backend="numpy")


# ----------------------------------------------------------------- wrong attributors
def wrong_sign_if(p):
    return -normal_equations_if(p)


def missing_factor_two_if(p):
    # ½ in the training loss only: H and ∇l_i halve together (cancel), but the test
    # gradient is that of the ½-loss, so the scores are half of ours.
    return 0.5 * normal_equations_if(p)


def reversed_order_if(p):
    # Sorting the training set by target before computing, and not undoing it.
    order = np.argsort(p.y)
    return normal_equations_if(p.replace(X=p.X[order], y=p.y[order]))


def ignores_duplicates_if(p):
    # De-duplicates rows before fitting and copies scores back: a duplicated sample
    # should change θ* and H, this implementation pretends it does not.
    _, first, inverse = np.unique(p.X, axis=0, return_index=True, return_inverse=True)
    keep = np.sort(first)
    S = normal_equations_if(p.replace(X=p.X[keep], y=p.y[keep]))
    pos = {int(k): c for c, k in enumerate(keep)}
    return S[:, [pos[int(first[inverse[i]])] for i in range(p.n_train)]]


def k1_without_baseline_iif(p):
    # Always uses the unlearning baseline, even when asked for f(x; θ*).
    return linear.integrated_influence(p.X, p.y, p.X_test, p.y_test, lam=p.lam, K=p.K)


def unscaled_projector(G, dim, seed):
    return np.sqrt(dim) * dense_projector(G, dim, seed)


def unseeded_projector(G, dim, seed):
    return dense_projector(G, dim, 0)


def batch_dependent_projector(G, dim, seed):
    # Seeds its matrix from the batch size: chunked calls use different matrices.
    return dense_projector(G, dim, seed + G.shape[0])


def clipped_projector(G, dim, seed):
    return np.tanh(dense_projector(G, dim, seed))


# ----------------------------------------------------------------- correct ones pass
@pytest.mark.parametrize("fn, kind, decl", [
    (linear_if, "if", {}),
    (normal_equations_if, "if", {}),
    (mean_loss_if, "if", {"normalisation": "mean"}),
    (linear_tracin, "tracin", {}),
    (gd_tracin, "tracin", {}),
    (proponent_positive_tracin, "tracin", {"sign": "loss_down"}),
    (linear_iif, "iif", {"capabilities": ALL_IIF_CAPS}),
    (linear_iif, "iif", {}),
    (ours_projector, "projector", {}),
    (dense_projector, "projector", {}),
], ids=lambda v: getattr(v, "__name__", None))
def test_correct_attributors_pass_every_applicable_check(fn, kind, decl):
    report = check_attributor(fn, kind=kind, **decl)
    report.raise_if_failed()
    assert report.counts()["passed"] >= 4


def test_iif_with_all_capabilities_runs_every_iif_check():
    report = check_attributor(linear_iif, kind="iif", capabilities=ALL_IIF_CAPS)
    ran = {r.check for r in report.results if r.status == "passed"}
    assert {"iif_exact", "iif_k1_equals_if", "iif_completeness", "permutation",
            "duplicate", "target_scaling"} <= ran


def test_iif_without_prediction_baseline_skips_corollary_2_6_with_reason():
    report = check_attributor(linear_iif, kind="iif")
    skipped = [r for r in report.results if r.check == "iif_k1_equals_if"]
    assert skipped and all(r.status == "skipped" for r in skipped)
    assert "prediction_baseline" in skipped[0].message


def test_completeness_check_uses_the_euler_bias_for_discrete_k():
    # A K = 4 attributor with exact path models: Σ_i I − Δ is c²/4, not 0, and the check
    # accepts exactly that; relabelling it as the exact integral must fail.
    caps = {"exact_path"}
    good = check_attributor(linear_iif, kind="iif", capabilities=caps,
                            checks="iif_completeness")
    good.raise_if_failed()
    assert all("c²/K (K=4)" in r.message for r in good.results)

    def always_k4(p):
        return linear_iif(p.replace(K=4))

    bad = check_attributor(always_k4, kind="iif", capabilities={"exact_integral"},
                           checks="iif_completeness")
    assert not bad.passed


# ----------------------------------------------------------------- wrong ones fail
@pytest.mark.parametrize("fn, kind, decl, check, hint", [
    (wrong_sign_if, "if", {}, "if_exact", "opposite sign"),
    (wrong_sign_if, "if", {}, "loo_sign", "sign convention looks reversed"),
    (missing_factor_two_if, "if", {}, "if_exact", "missing factor 2"),
    (mean_loss_if, "if", {}, "if_exact", "mean-loss normalisation"),
    (normal_equations_if, "if", {"normalisation": "mean"}, "if_exact", "1/n_train"),
    (reversed_order_if, "if", {}, "if_exact", "permuted"),
    (reversed_order_if, "if", {}, "permutation", ""),
    (ignores_duplicates_if, "if", {}, "duplicate", ""),
    (gd_tracin, "tracin", {"sign": "loss_down"}, "tracin_exact", "opposite sign"),
    (k1_without_baseline_iif, "iif", {"capabilities": {"prediction_baseline"}},
     "iif_k1_equals_if", ""),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_wrong_attributors_are_caught_with_a_diagnosis(fn, kind, decl, check, hint):
    report = check_attributor(fn, kind=kind, checks=check, **decl)
    failed = [r for r in report.results if r.status == "failed"]
    assert failed, str(report)
    assert all(r.error is not None and r.tolerance is not None for r in failed)
    assert hint in failed[0].message
    with pytest.raises(ConformanceError, match=check):
        report.raise_if_failed()


@pytest.mark.parametrize("fn, check", [
    (unscaled_projector, "projector_jl"),
    (unseeded_projector, "projector_deterministic"),
    (batch_dependent_projector, "projector_batch_split"),
    (clipped_projector, "projector_linear"),
])
def test_wrong_projectors_are_caught(fn, check):
    report = check_attributor(fn, kind="projector", checks=check)
    assert [r.status for r in report.results] == ["failed"], str(report)


def test_raising_attributor_is_reported_as_error_not_crash():
    def boom(p):
        raise RuntimeError("solver diverged")

    report = check_attributor(boom, kind="if", checks="if_exact")
    assert {r.status for r in report.results} == {"error"}
    assert "solver diverged" in report.results[0].message
    assert not report.passed


@pytest.mark.parametrize("bad, match", [
    (lambda p: np.zeros((p.n_train, p.n_test + 1)), "shape"),
    (lambda p: np.full((p.n_test, p.n_train), np.nan), "non-finite"),
])
def test_malformed_output_is_an_error_naming_the_problem(bad, match):
    report = check_attributor(bad, kind="if", checks="if_exact")
    assert all(r.status == "error" and match in r.message for r in report.results)


def test_report_table_lists_every_result_and_counts():
    report = check_attributor(wrong_sign_if, kind="if")
    text = str(report)
    assert text.count("\n") == len(report.results) + 3
    c = report.counts()
    assert f"{c['passed']} passed, {c['failed']} failed" in text
    assert report.as_dict()["counts"] == c


def test_exact_scores_of_iif_k1_prediction_baseline_equal_if():
    # Corollary 2.6 through the public exact_scores helper, against the influence function
    # written out above from the normal equations (not iif_ref.linear's code). Tolerance:
    # κ(H) = 4 and residuals of order one on this problem, so the two backward-stable
    # evaluations agree to a few hundred eps; 1e-12 relative leaves a margin of ~10.
    p = make_problem(20, 3, 3, condition_number=2.0, seed=5).replace(K=1,
                                                                     baseline="prediction")
    ref = normal_equations_if(p)
    np.testing.assert_allclose(exact_scores("iif", p), ref, rtol=1e-12,
                               atol=1e-12 * np.abs(ref).max())
    # The unlearning baseline is another quantity: the comparison above can fail.
    assert not np.allclose(exact_scores("iif", p.replace(baseline="unlearn")), ref,
                           rtol=1e-3)


def test_unknown_check_name_is_rejected():
    with pytest.raises(ValueError, match="unknown check"):
        check_attributor(linear_if, kind="if", checks="no_such_check")


# ----------------------------------------------------------------- pytest parametrisation
@parametrize_with_checks([Attributor(gd_tracin, kind="tracin"),
                          Attributor(linear_iif, kind="iif"),
                          Attributor(ours_projector, kind="projector", name="kernels.project")],
                         problems=default_problems()[:1])
def test_parametrize_with_checks_runs_each_check(attributor, check):
    try:
        check(attributor)
    except unittest.SkipTest:
        # Skips are legitimate only for capability-gated checks.
        assert check.__name__ == "iif_k1_equals_if"
        raise


def test_parametrized_check_raises_assertion_error_for_a_wrong_attributor():
    mark = parametrize_with_checks([Attributor(wrong_sign_if, kind="if")])
    params = dict((c.__name__, (a, c)) for a, c in mark.args[1])
    att, check = params["if_exact"]
    with pytest.raises(AssertionError, match="opposite sign"):
        check(att)


def test_parametrize_with_checks_requires_declared_attributors():
    with pytest.raises(TypeError, match="Attributor"):
        parametrize_with_checks([linear_if])
