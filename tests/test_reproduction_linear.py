"""Smoke tests of the linear reproductions (Tables 1 and 4, Figure 1) at tiny sizes.

They run each ``iif_ref.reproduce.NAME`` entry point as ``iif-ref reproduce NAME`` would,
check the JSON they write is complete, finite and carries the paper's numbers, and check
the exact-IIF completeness identity inside the protocol itself.
"""
import importlib
import json
import math
import numpy as np
import pytest

TINY = ["--trials", "2", "--subsets", "40", "--n-test", "4", "--no-progress"]
METHOD_ROWS = {"iif_exact", "iif_k1", "iif_k5", "if", "tracin", "loo"}
EPS = np.finfo(np.float64).eps


def _load(name):
    return importlib.import_module(f"iif_ref.reproduce.{name}")


def _check_table_json(path, module):
    data = json.loads(path.read_text())
    rows = data["rows"]
    settings = [s.key for s in module.SETTINGS]
    assert {r["setting"] for r in rows} == set(settings)
    for key in settings:
        names = {r["method"] for r in rows if r["setting"] == key}
        assert names == METHOD_ROWS | {"ceiling"}
    for r in rows:
        parts = ("heldout",) if r["method"] == "ceiling" else ("all", "heldout")
        for part in parts:
            mean, se = r[f"{part}_mean"], r[f"{part}_se"]
            assert math.isfinite(mean) and -1.0 <= mean <= 1.0, r
            assert math.isfinite(se) and se >= 0.0, r
            assert r[f"{part}_n_trials"] == 2
        assert r["dropped_test_points"] == 0
    # The paper's numbers sit beside ours, exactly as printed in the paper.
    by = {(r["setting"], r["method"]): r for r in rows}
    for s in module.SETTINGS:
        assert by[(s.key, "iif_exact")]["paper"] == s.paper["IIF"]
        assert by[(s.key, "if")]["paper"] == s.paper["IF"]
        assert by[(s.key, "tracin")]["paper"] == s.paper["TracIn"]
        assert by[(s.key, "loo")]["paper"] is None
    meta = data["meta"]
    assert meta["config"]["trials"] == 2 and meta["config"]["subsets"] == 40
    for key in settings:
        # Completeness of exact IIF, measured inside every trial (see the test below).
        assert meta["per_setting"][key]["completeness_residual_max"] < 1e-11
    assert "machine" in data
    return data


@pytest.mark.parametrize("name", ["table1", "table4"])
def test_table_smoke_writes_finite_complete_json(name, tmp_path):
    module = _load(name)
    assert module.main(TINY + ["--out", str(tmp_path)]) == 0
    _check_table_json(tmp_path / f"{name}.json", module)
    md = (tmp_path / f"{name}.md").read_text()
    assert "paper IIF" in md and "LDS ceiling" in md


def test_table_is_reproducible_from_its_seed(tmp_path):
    module = _load("table1")
    module.main(TINY + ["--out", str(tmp_path / "a")])
    module.main(TINY + ["--out", str(tmp_path / "b")])
    a = json.loads((tmp_path / "a" / "table1.json").read_text())["rows"]
    b = json.loads((tmp_path / "b" / "table1.json").read_text())["rows"]
    assert a == b


def test_sweep_rows_cover_each_swept_value():
    # The --sweep code path on one setting (the CLI runs the same function per table).
    from iif_ref.reproduce import _linear_protocol as protocol
    setting = _load("table1").SETTINGS[1]
    cfg = protocol.Config(trials=2, subsets=24, n_test=3)
    sweeps = protocol.run_sweeps([setting], cfg, progress=False)
    assert {r["lam"] for r in sweeps if r["sweep"] == "lam"} == {0.5, 1.0, 2.0, 5.0}
    assert {r["alpha"] for r in sweeps if r["sweep"] == "alpha"} == {0.25, 0.5, 0.75}
    assert {r["method"] for r in sweeps if r["sweep"] == "tracin"} == {"tracin"}
    assert len({str(r["tracin_checkpoints"]) for r in sweeps if r["sweep"] == "tracin"}) > 3
    for r in sweeps:
        if r.get("all_mean") is not None:
            assert -1.0 <= r["all_mean"] <= 1.0
    results = {setting.key: protocol.run_setting(setting, cfg, progress=False)}
    md = protocol.markdown_table("t", [setting], results, cfg, sweeps)
    assert "| lam | 5.0 | IIF exact" in md and "| alpha | 0.25 | LDS ceiling" in md


def test_exact_iif_completeness_inside_protocol():
    # Σ_i I[t, i] = Δ_t (Eq. 9 with Eq. 1) for the per-test unlearning baseline, on the
    # protocol's own problems. The scores and Δ come from QR-based solves whose relative
    # error is O(κ(M)·d·eps) with κ(M) ≈ ((√N+√d)/(√N−√d))² ≈ 4 for N=100, d=10 Gaussian
    # features, plus the unlearning solve's conditioning at λ = 1 (test leverage ≪ 1);
    # 1e-11 ≈ 4.5e4 eps leaves two orders of margin over the ~1e-14 observed.
    from iif_ref.reproduce import _linear_protocol as protocol
    from iif_ref.synthetic import make_linear_problem
    cfg = protocol.Config(n_test=20)
    for sigma_n, sigma_s in [(0.1, 1.0), (1.0, 1.0), (1.0, 0.1)]:
        for seed in range(3):
            problem = make_linear_problem(sigma_n=sigma_n, sigma_s=sigma_s, n_test=20,
                                          seed=seed)
            scores, kept = protocol.method_scores(problem, cfg, ("iif_exact",))["iif_exact"]
            assert kept.all()
            assert protocol.completeness_residual(problem, cfg, scores) < 1e-11


def test_completeness_residual_detects_wrong_scores():
    # The check above can fail: moving 1 % of Σ|I| onto one sample's score gives a
    # relative residual ≈ 1e-2 (≈ 1e-2·Σ|I| / max(|Δ|, Σ|I|) with Σ|I| ≥ |Δ|).
    from iif_ref.reproduce import _linear_protocol as protocol
    from iif_ref.synthetic import make_linear_problem
    cfg = protocol.Config(n_test=5)
    problem = make_linear_problem(sigma_n=1.0, sigma_s=1.0, n_test=5, seed=0)
    scores = protocol.method_scores(problem, cfg, ("iif_exact",))["iif_exact"][0]
    wrong = scores.copy()
    wrong[:, 0] += 0.01 * np.abs(scores).sum(axis=1)
    assert protocol.completeness_residual(problem, cfg, wrong) > 5e-3


def test_figure1_if_and_loo_zero_but_iif_nonzero(tmp_path):
    module = _load("figure1")
    assert module.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "figure1.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "figure1.json").read_text())
    s = data["meta"]["summary"]
    # A is fitted exactly: its residual is rounding-level (features are O(1), targets
    # O(1), κ of the 13-feature Gram ≈ 37, so ≲ 37·25·eps ≈ 2e-13).
    assert abs(s["residual_A"]) < 1e-11
    # IF ∝ A's residual and LOO(A) = 0 because the fit without A is the same fit.
    assert abs(s["IF_A_to_B"]) < 1e-11 and abs(s["LOO_A_to_B"]) < 1e-11
    # IIF gives A a clearly non-zero share of B's Δ: ≥ 1 % of |Δ_B|.
    assert abs(s["IIF_A_to_B"]) > 0.01 * abs(s["delta_B"])
    # Completeness with Δ from iif_ref.linear.delta: κ(ΦᵀΦ) ≈ 37 and 25 samples give a
    # rounding bound ≈ 37·25·eps ≈ 2e-13 relative; 1e-11 leaves a 50x margin.
    assert s["completeness_residual_B"] < 1e-11 * max(1.0, abs(s["delta_B"]))
    rows = data["rows"]
    assert sum(r["is_A"] for r in rows) == 1
    assert all(math.isfinite(r[k]) for r in rows for k in ("IIF", "IF", "LOO"))


def _closed_form_problem(sigma_n, sigma_s, seed):
    from iif_ref.synthetic import make_linear_problem
    return make_linear_problem(sigma_n=sigma_n, sigma_s=sigma_s, n_test=9, seed=seed)


@pytest.mark.parametrize("lam", [0.8, 1.0, 5.0])
def test_linear_iif_is_rescaled_if_minus_shared_term(lam):
    # The explanation used in docs/reproduction-linear.md: with residuals e_i = y_i − x_iᵀθ*,
    # r_t = x̂_tᵀθ* − ŷ_t, C = X̂ M⁻¹ Xᵀ, h_t = x̂_tᵀM⁻¹x̂_t, the per-test unlearning
    # baseline gives θ'_t − θ* = M⁻¹x̂_t r_t/(λ − h_t) and therefore
    #   IIF[t, i] = (r̄_t / r_t) · (IF[t, i] − 2 r_t² C_ti² / (λ − h_t)),
    #   r̄_t = r_t (λ/(λ − h_t) + 1) / 2  (the path residual at t = ½).
    # Both sides are O(κ(M)·d·eps) accurate with κ(M) ≈ 4 here; 1e-12 relative to the
    # largest score is > 40x that.
    from iif_ref import linear
    p = _closed_form_problem(0.1, 1.0, seed=3)
    X, y, Xt, yt = p.X, p.y, p.X_test, p.y_test
    M = X.T @ X
    theta = np.linalg.solve(M, X.T @ y)
    e, r = y - X @ theta, Xt @ theta - yt
    C = Xt @ np.linalg.solve(M, X.T)
    h = np.einsum("td,td->t", Xt, np.linalg.solve(M, Xt.T).T)
    IF = linear.influence_function(X, y, Xt, yt)
    rbar = r * (lam / (lam - h) + 1.0) / 2.0
    want = (rbar / r)[:, None] * (IF - 2.0 * (r ** 2 / (lam - h))[:, None] * C ** 2)
    got = linear.integrated_influence(X, y, Xt, yt, lam=lam)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(got).max())


def test_linear_iif_lds_does_not_depend_on_K():
    # Per test point the K = 1, K = 5 and exact IIF rows are positive multiples of one
    # vector (the Euler average of the path residual, which keeps the sign of r_t for
    # λ > h_t), so every subset sum is rescaled by the same positive factor and the
    # ranks — hence the LDS — agree up to float rounding of near-tied sums (1e-12).
    from iif_ref import linear
    from iif_ref.metrics import lds, random_subset_masks
    p = _closed_form_problem(1.0, 1.0, seed=5)
    args = (p.X, p.y, p.X_test, p.y_test)
    masks = random_subset_masks(100, 400, seed=6)
    losses = linear.subset_test_losses(*args, masks)
    ref = lds(linear.integrated_influence(*args, K=None), masks, losses)
    for K in (1, 2, 5):
        scores = linear.integrated_influence(*args, K=K)
        np.testing.assert_allclose(lds(scores, masks, losses), ref, rtol=0, atol=1e-12)
    # ... while IF, a different vector, does change the LDS at this size.
    assert np.max(np.abs(lds(linear.influence_function(*args), masks, losses) - ref)) > 1e-3


def test_results_do_not_depend_on_jobs(tmp_path):
    # Each trial has its own SeedSequence([seed, trial]); worker processes change nothing.
    module = _load("table4")
    module.main(TINY + ["--out", str(tmp_path / "one")])
    module.main(TINY + ["--jobs", "2", "--out", str(tmp_path / "two")])
    one = json.loads((tmp_path / "one" / "table4.json").read_text())["rows"]
    two = json.loads((tmp_path / "two" / "table4.json").read_text())["rows"]
    assert one == two


def test_ill_posed_unlearning_drops_and_counts_test_points_never_scores_them():
    # λ = 0.1 is below the leverage h_t = x̂ᵀ(XᵀX)⁻¹x̂ (≈ ‖x̂‖²/100, spread 0.02–0.3) of
    # some test points: Eq. 12 has no minimiser there. Those points must be dropped and
    # counted; the others must get exactly the scores of a direct call.
    from iif_ref.reproduce import _linear_protocol as protocol
    from iif_ref import linear
    from iif_ref.synthetic import make_linear_problem
    cfg = protocol.Config(n_test=20, lam=0.1, trials=1, subsets=30)
    problem = make_linear_problem(sigma_n=1.0, sigma_s=1.0, n_test=20, seed=0)
    scores, kept = protocol.method_scores(problem, cfg, ("iif_exact",))["iif_exact"]
    assert kept.any() and not kept.all()
    direct = linear.integrated_influence(problem.X, problem.y, problem.X_test[kept],
                                         problem.y_test[kept], lam=0.1)
    np.testing.assert_array_equal(scores, direct)
    setting = protocol.Setting("s", "s", 1.0, 1.0)
    trial = protocol.run_trial(setting, cfg, 0, methods=("iif_exact", "if"))
    assert trial["dropped_test_points"]["iif_exact"] > 0
    assert trial["dropped_test_points"]["if"] == 0
    assert "completeness_residual" not in trial   # not claimed for a partial score set
