"""Cross-check against dattri: the same trained model, our IF and TRAK against dattri's,
and dattri's LDS against ours on the same ground truth.

Skipped with the reason when dattri cannot be imported (``pip install --no-deps dattri``).
"""
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the cross-check needs torch")
from iif_ref.reproduce import _neural_protocol as proto  # noqa: E402

OK, REASON = proto.dattri_available()
pytestmark = [pytest.mark.peers, pytest.mark.skipif(not OK, reason=REASON or "dattri missing")]

from iif_ref.metrics import lds, random_subset_masks  # noqa: E402

from _helpers import trained_digits_mlp  # noqa: E402


@pytest.fixture(scope="module")
def problem():
    # 64 → 4 → 10 MLP: 310 parameters, fewer than the 400 training samples, so the
    # exact Hessian is small and TRAK's Gram ΦᵀΦ (310 × 310) is invertible.
    return trained_digits_mlp(400, 8, hidden=(4,), epochs=30, batch_size=32, seed=1)


def test_if_explicit_hessian_matches_dattri(problem):
    from iif_ref import attribute
    from iif_ref.errors import NotPositiveDefiniteError

    split, model = problem
    data = (split.X_train, split.y_train, split.X_test, split.y_test)
    # The Hessian at an SGD solution is indefinite: take twice the damping our solver
    # says would make H + λI positive definite, and give dattri the same λ.
    try:
        ours = attribute(model, "cross_entropy", *data, method="if", solver="exact",
                         damping=1e-2, dtype="float64")
        damping = 1e-2
    except NotPositiveDefiniteError as exc:
        damping = 2 * exc.suggested_damping
        ours = attribute(model, "cross_entropy", *data, method="if", solver="exact",
                         damping=damping, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = proto.dattri_scores(model, *data, method="if", damping=damping)
    rho = proto.per_test_spearman(ours.scores, theirs)
    # Same matrix H + λI. dattri's path rounds somewhere in float32 (the measured
    # difference is ~3e-8, far above float64's cond · eps ~ 1e-14), so the bound is
    # float32's: 10 · cond · eps32, cond(H + λI) as recorded by our solve.
    cond = float(ours.diagnostics["condition"][0])
    rel = np.max(np.abs(ours.scores - theirs)) / np.max(np.abs(ours.scores))
    assert rel <= 10 * cond * np.finfo(np.float32).eps, (rel, cond)
    assert np.all(rho > 0.9999), rho


def test_trak_unprojected_matches_dattri_square_projection(problem):
    """TRAK's Γ(ΦᵀΦ)⁻¹Φᵀ is invariant under Φ → ΦA for an invertible square A, so our
    unprojected TRAK equals dattri's with proj_dim = n_params and no regularisation, up
    to the conditioning of ΦᵀΦ (dattri projects in float32)."""
    from iif_ref import attribute

    split, model = problem
    data = (split.X_train, split.y_train, split.X_test, split.y_test)
    n_params = sum(p.numel() for p in model.parameters())
    # A damping 1e-9 · tr(ΦᵀΦ)/M only lifts exactly-null directions (e.g. a ReLU unit
    # that is dead on every sample, whose weights have zero gradients everywhere);
    # Γ and Ψ have no component there, so the scores are the pseudo-inverse ones.
    auto = attribute(model, "cross_entropy", *data, method="trak", proj_dim=None,
                     damping="auto", dtype="float64")
    tiny = 1e-9 * auto.config["damping_used"][0] / 1e-3
    ours = attribute(model, "cross_entropy", *data, method="trak", proj_dim=None,
                     damping=tiny, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = proto.dattri_scores(model, *data, method="trak", damping=0.0,
                                     proj_dim=n_params)
    rho = proto.per_test_spearman(ours.scores, theirs)
    print(f"TRAK ours vs dattri per-test Spearman: min {rho.min():.4f}, mean {rho.mean():.4f}")
    # Measured min 0.9997 on this problem; the bound 0.99 leaves room for dattri's
    # float32 projection of an ill-conditioned Gram matrix, and fails for a sign or a
    # missing (1 − p) reweighting, either of which drops ρ far below 0.99.
    assert np.all(rho > 0.99), rho


def test_dattri_lds_equals_ours_on_the_same_ground_truth():
    rng = np.random.default_rng(0)
    masks = random_subset_masks(30, 50, alpha=0.5, seed=0)
    scores = rng.normal(size=(4, 30))
    losses = masks @ scores.T + rng.normal(size=(50, 4))
    ours = lds(scores, masks, losses)
    theirs = proto.dattri_lds(scores, masks, losses)
    # Both are Spearman with average ranks of the same two vectors: equal to rounding.
    assert np.allclose(ours, theirs, atol=1e-12)
