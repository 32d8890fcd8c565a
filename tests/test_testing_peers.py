"""Peer attributors behind the protocol (skipped, with the reason, when not installed).

These pin down the *conventions* of the peers as wrapped here: dattri's influence
scores are proponent-positive (sign="loss_down") and, with a summed loss in float64 and
its exact solvers, equal the influence function to rounding.
"""
import dataclasses

import pytest

pytestmark = pytest.mark.peers

pytest.importorskip("torch", reason="peer wrappers need torch")
pytest.importorskip("dattri", reason="dattri is not installed (pip install --no-deps dattri)")

from iif_ref.testing import check_attributor, default_problems  # noqa: E402
from iif_ref.testing.peers import dattri_attributors, peer_versions  # noqa: E402


def _by_name(setting):
    return {a.name: a for a in dattri_attributors(setting)}


@pytest.mark.parametrize("name, check", [
    ("dattri.IFAttributorExplicit[fair]", "if_exact"),
    ("dattri.IFAttributorCG[fair]", "if_exact"),
    ("dattri.TracInAttributor[fair]", "tracin_exact"),
])
def test_dattri_exact_solvers_match_the_exact_answer_at_the_fair_setting(name, check):
    att = _by_name("fair")[name]
    check_attributor(att, problems=default_problems()[:1], checks=check).raise_if_failed()


def test_dattri_sign_is_proponent_positive():
    # Declared as our sign, the explicit IF is caught as exactly −1 × the exact answer.
    att = dataclasses.replace(_by_name("fair")["dattri.IFAttributorExplicit[fair]"],
                              sign="loss_up")
    report = check_attributor(att, problems=default_problems()[:1], checks="if_exact")
    assert not report.passed
    assert "opposite sign convention" in report.failures[0].message


def test_peer_versions_reports_installed_dattri():
    assert peer_versions()["dattri"]["available"]


def test_traker_trak_uncompressed_is_the_influence_function_up_to_a_positive_factor():
    # TRAKer rescales (ΦᵀΦ)⁻¹ by a data-dependent constant, so only the direction of the
    # score matrix can match: after the best positive factor the residual must be at
    # float32 level (measured ~3e-6; 1e-4 leaves room for κ(H) = 4 and n = 24 sums).
    pytest.importorskip("trak", reason="traker is not installed (pip install --no-deps traker)")
    import numpy as np

    from iif_ref.testing import exact_scores
    from iif_ref.testing.peers import traker_attributors

    att = traker_attributors("fair")[0]
    p = default_problems()[0]
    got, ref = att.scores(p), exact_scores("if", p)
    alpha = float(np.sum(got * ref) / np.sum(ref * ref))
    assert alpha > 0
    assert np.linalg.norm(got - alpha * ref) / np.linalg.norm(alpha * ref) < 1e-4
