"""iif_ref.attribute (torch, bias-free nn.Linear, float64, exact curvature) passes the suite.

The torch side knows nothing of the closed forms, so these are bridge tests: the neural
IF, TracIn and IIF must reproduce the exact least-squares answers of iif_ref.linear on a
linear model with the summed squared error.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the neural attributors need torch")

from iif_ref.testing import Attributor, check_attributor, default_problems  # noqa: E402
from iif_ref.testing.own import neural_if, neural_iif, neural_tracin  # noqa: E402

# The exact Hessian (curvature="hessian") goes through torch's forward-mode AD, whose
# decompositions module calls torch.jit.script on import: torch's own deprecation.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")

def test_neural_influence_function_passes_every_if_check():
    check_attributor(neural_if, kind="if").raise_if_failed()


def test_neural_tracin_passes_every_tracin_check():
    check_attributor(neural_tracin, kind="tracin").raise_if_failed()


def test_neural_iif_passes_every_iif_check_at_the_rounding_tolerance():
    # Newton's method solves Eq. (12) and the path refits (quadratics here) in one exact
    # step, so the neural IIF is held to the closed forms' own rounding tolerance, with
    # no solver allowance (rtol) declared.
    report = check_attributor(
        Attributor(neural_iif, kind="iif", capabilities={"prediction_baseline", "exact_path"}))
    report.raise_if_failed()
    assert {r.check for r in report.results if r.passed} >= {
        "iif_exact", "iif_k1_equals_if", "iif_completeness", "permutation", "duplicate",
        "target_scaling"}


def test_neural_iif_k1_prediction_baseline_is_exact_to_rounding():
    # Corollary 2.6 needs no iterative solve (θ_1 = θ*, ȳ = f(x; θ*)), so it must hold
    # to rounding, without the solver tolerance: κ(H) ≤ 1e4 → derived tolerance ≤ 1.2e-9.
    report = check_attributor(neural_iif, kind="iif", capabilities={"prediction_baseline"},
                              checks="iif_k1_equals_if")
    report.raise_if_failed()
    assert max(r.error for r in report.results) < 1e-9


def test_neural_if_with_mean_reduction_declared_wrongly_is_caught():
    # Wrapping the neural IF in a mean-loss convention without declaring it fails with
    # the normalisation diagnosis.
    report = check_attributor(lambda p: neural_if(p) * p.n_train, kind="if",
                              checks="if_exact", name="neural_if_times_n")
    assert not report.passed
    assert "normalisation='mean'" in report.failures[0].message
    fixed = check_attributor(lambda p: neural_if(p) * p.n_train, kind="if",
                             normalisation="mean", checks="if_exact")
    fixed.raise_if_failed()
    np.testing.assert_equal(len(fixed.results), len(default_problems()))
