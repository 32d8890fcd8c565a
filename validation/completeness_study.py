"""When is IIF complete on a network? Path models × curvature × K on the Table 2 digits MLP.

``python validation/completeness_study.py [--quick] [--out DIR]`` runs IIF (default
quadrature, joint unlearning baseline) on the Table 2 digits MLP (64-128-64-10, Table 5
training, 1,000 training and 100 test points) for each

* path-model reading (``IIFConfig.path_models``): ``"step"`` (Eq. 16 as printed, η = 1e-3
  on the summed loss), ``"flow"`` (the same step with η = 5e-3 times the node spacing),
  ``"epoch"`` (one epoch of mini-batch SGD at the training learning
  rate 0.01 on the mean loss, batch 64), ``"refit"`` (L-BFGS to ``refit_tol``, at most
  ``--refit-max-iter`` iterations; a warning counts the refits stopped by the cap);
* curvature: the exact Gauss–Newton matrix (unprojected, solved in sample space) and the
  projected Fisher (P = 512, the default);
* K ∈ {1, 2, 5, 10, 20},

and reports ``Σ_i I``, ``delta_path``, ``delta`` (medians), the median
``|residual| / |delta_path|`` over all test points and over those whose ``|delta_path|``
exceeds the optimiser's drift floor, the quadrature error estimate, and the path loss of
each path model on its own targets. The drift floor of a test point is
``|L_test(θ_drift) − L_test(θ*)|`` where θ_drift is the same sequence of path-model
updates applied to the unchanged data (targets y at every node): the loss change the
optimiser makes on its own. For each reading it also trains a model on Γ(0) from
scratch (the same initialisation and mini-batch SGD as θ*, on the path's start targets)
and reports how far the warm-started θ_0 is from it: test-loss difference and training
loss on Γ(0) of both.

Writes ``completeness_study.json`` (``completeness_study_quick.json`` with ``--quick``:
300 training / 30 test points, 10 training epochs, K ∈ {1, 2, 5}) and a plot to
``docs/results/`` (or ``--out``). The full run takes hours on 2 cores (the exact
Gauss–Newton solve of 9,000 rows at every node); run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from iif_ref.bench import write_results
from iif_ref.datasets import load_digits_split
from iif_ref.models import TrainConfig, make_mlp, train
from iif_ref.neural import IIFConfig, integrated_influence
from iif_ref.neural.baseline import per_sample_losses
from iif_ref.neural.functional import FunctionalModel, as_targets
from iif_ref.neural.losses import resolve_loss
from iif_ref.neural.optimise import minimise
from iif_ref.neural.path import path_loss, path_model_step, path_targets
from iif_ref.neural.plan import plan_path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
KS = (1, 2, 5, 10, 20)
QUICK_KS = (1, 2, 5)
CURVATURES = {"gauss_newton": dict(proj_dim=None, curvature="gauss_newton"),
              "projected_fisher": dict(proj_dim=512, curvature="fisher")}


def readings(refit_max_iter):
    """The path-model readings with the options stated in the module docstring."""
    return {"step": dict(path_models="step"),
            "flow": dict(path_models="flow"),
            "epoch": dict(path_models="epoch", path_lr=0.01, train_reduction="mean",
                          path_batch_size=64),
            "refit": dict(path_models="refit", refit_max_iter=refit_max_iter,
                          refit_tol=1e-6)}


def make_problem(*, n_train, n_test, epochs, seed=0):
    """The Table 2 digits MLP (Table 5 training) and its split."""
    data = load_digits_split(n_train, n_test, seed=seed)
    model = make_mlp(64, seed=seed)
    train(model, data.X_train, data.y_train, config=TrainConfig(epochs=epochs), seed=seed)
    return model, data


def _test_losses(fm, loss, theta, X_test, Y_test):
    with torch.no_grad():
        return per_sample_losses(fm, loss, theta, X_test, Y_test).double().numpy()


def node_spacings(nodes):
    """``t_above − t`` of every path-model update of a run on ``nodes`` (ascending): one
    per node below ``t = 1``, descending, then θ_0 at ``t = 0``."""
    below = [t for t in sorted(nodes, reverse=True) if t < 1.0]
    above = [1.0] + below
    return [a - t for a, t in zip(above, below)] + [float(min(nodes))]


def drift_floor(model, data, cfg, spacings):
    """``|L_test(θ_drift) − L_test(θ*)|``: the path-model updates of ``cfg``'s reading
    (one per entry of ``spacings``, :func:`node_spacings`) from θ* on the unchanged data
    (targets y)."""
    fm, loss = FunctionalModel(model), resolve_loss("cross_entropy")
    X = torch.as_tensor(data.X_train, dtype=fm.dtype)
    Y = as_targets(data.y_train, "y_train", 10, loss, fm)
    Xt = torch.as_tensor(data.X_test, dtype=fm.dtype)
    Yt = as_targets(data.y_test, "y_test", 10, loss, fm)
    theta = fm.theta_star
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k, dt in zip(range(len(spacings), 0, -1), spacings):
            theta, _ = path_model_step(fm, loss, theta, X, Y, cfg, k=k, dt=dt)
    return np.abs(_test_losses(fm, loss, theta, Xt, Yt)
                  - _test_losses(fm, loss, fm.theta_star, Xt, Yt))


def scratch_gap(model, data, cfg, *, epochs, seed=0):
    """θ_0 of a run against a model trained on Γ(0) from scratch (same initialisation
    and mini-batch SGD schedule as θ*, on the masked start targets of the path)."""
    plan = plan_path(model, "cross_entropy", data.X_train, data.y_train, data.X_test,
                     data.y_test, config=cfg.replace(K=1, progress=False))
    (group,) = plan.groups
    fm, loss = plan.problem.fm, plan.problem.loss
    X, Xt, Yt = plan.problem.X, plan.problem.X_test, plan.problem.Y_test
    rho0 = path_targets(plan.problem.Y, group.Ybar, 0.0, mask=plan.mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warm, _ = path_model_step(fm, loss, fm.theta_star, X, rho0, cfg, k=0, dt=1.0)
    fresh = FunctionalModel(make_mlp(64, seed=seed)).theta_star
    n = X.shape[0]

    def objective(p, idx, scale):
        Xb, Rb = (X, rho0) if idx is None else (X[idx], rho0[idx])
        return scale * per_sample_losses(fm, loss, p, Xb, Rb).sum() / n

    scratch, _ = minimise(objective, fresh, n_samples=n, epochs=epochs, optimizer="sgd",
                          lr=TrainConfig().lr, batch_size=TrainConfig().batch_size,
                          seed=seed, what="training on Γ(0) from scratch")
    mean = cfg.replace(train_reduction="mean")
    gap = _test_losses(fm, loss, warm, Xt, Yt) - _test_losses(fm, loss, scratch, Xt, Yt)
    return {"median_abs_test_loss_gap": float(np.median(np.abs(gap))),
            "train_loss_gamma0_warm": path_loss(fm, loss, warm, X, rho0, mean),
            "train_loss_gamma0_scratch": path_loss(fm, loss, scratch, X, rho0, mean),
            "train_loss_gamma0_theta_star": path_loss(fm, loss, fm.theta_star, X, rho0,
                                                      mean)}


def median_ratio(num, den, keep=None):
    """Median of ``|num| / |den|`` over ``keep`` and ``den ≠ 0`` (None when empty)."""
    keep = (den != 0) if keep is None else (keep & (den != 0))
    ratio = np.abs(num[keep]) / np.abs(den[keep])
    return float(np.median(ratio)) if ratio.size else None


def study(model, data, *, Ks, refit_max_iter, train_epochs, gn_max_K=None,
          curvatures=tuple(CURVATURES), scratch=True):
    rows = []
    for reading, path_options in readings(refit_max_iter).items():
        for curvature, curv_options in CURVATURES.items():
            if curvature not in curvatures:
                continue
            for K in Ks:
                if curvature == "gauss_newton" and gn_max_K is not None and K > gn_max_K:
                    continue
                options = dict(K=K, progress=False, **path_options, **curv_options)
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", RuntimeWarning)
                    r = integrated_influence(model, "cross_entropy", data.X_train,
                                             data.y_train, data.X_test, data.y_test,
                                             **options)
                seconds = time.perf_counter() - t0
                cfg = IIFConfig(**options)
                floor = drift_floor(model, data, cfg,
                                    node_spacings(r.diagnostics["nodes"]))
                above = np.abs(r.delta_path) > floor
                sums = r.scores.sum(1)
                rows.append({
                    "path_models": reading, "curvature": curvature, "K": K,
                    "options": {k: v for k, v in options.items() if k != "progress"},
                    "median_sum_I": float(np.median(sums)),
                    "median_delta_path": float(np.median(r.delta_path)),
                    "median_delta": float(np.median(r.delta)),
                    "median_abs_residual_over_delta_path": median_ratio(r.residual,
                                                                        r.delta_path),
                    "median_abs_residual_over_delta_path_above_floor": median_ratio(
                        r.residual, r.delta_path, above),
                    "n_above_drift_floor": int(above.sum()),
                    "median_drift_floor": float(np.median(floor)),
                    "median_quadrature_error_over_abs_sum": median_ratio(
                        r.quadrature_error, sums),
                    "path_loss": list(map(float, r.diagnostics["path_loss"])),
                    "path_loss_start": r.diagnostics["path_loss_start"],
                    "warnings": sorted({str(w.message)[:80] for w in caught}),
                    "seconds": seconds})
                row = rows[-1]
                print(f"{reading:5s} {curvature:16s} K={K:2d}: ΣI {row['median_sum_I']:+.4g}"
                      f"  δ_path {row['median_delta_path']:+.4g}  Δ {row['median_delta']:+.4g}"
                      f"  |res|/|δ_path| {row['median_abs_residual_over_delta_path']:.3g}"
                      f" (above floor: {row['n_above_drift_floor']} pts, "
                      f"{row['median_abs_residual_over_delta_path_above_floor']})"
                      f"  {seconds:.0f} s", flush=True)
    gaps = {}
    for reading, path_options in (readings(refit_max_iter).items() if scratch else ()):
        gaps[reading] = scratch_gap(model, data, IIFConfig(**path_options),
                                    epochs=train_epochs)
        print(f"{reading}: θ_0 vs Γ(0) from scratch {gaps[reading]}", flush=True)
    return rows, gaps


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for reading in readings(0):
        for curvature, style in (("gauss_newton", "-"), ("projected_fisher", "--")):
            sel = [r for r in rows if r["path_models"] == reading
                   and r["curvature"] == curvature]
            if sel:
                ax.loglog([r["K"] for r in sel],
                          [r["median_abs_residual_over_delta_path"] for r in sel],
                          style, marker="o", label=f"{reading}, {curvature}")
    ax.set_xlabel("K (nodes)")
    ax.set_ylabel("median |residual| / |delta_path|")
    ax.set_title("Completeness on the digits MLP")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default docs/results)")
    parser.add_argument("--quick", action="store_true",
                        help="300 training / 30 test points, 10 epochs, K = 1, 2, 5")
    parser.add_argument("--refit-max-iter", type=int, default=200)
    parser.add_argument("--gn-max-K", type=int, default=None,
                        help="exact Gauss-Newton rows only up to this K (one 9,000-row solve "
                             "per node: the bulk of the full run's time); default: every K")
    parser.add_argument("--ks", type=int, nargs="+", help="these K instead of the default")
    parser.add_argument("--curvatures", nargs="+", choices=list(CURVATURES),
                        default=list(CURVATURES))
    parser.add_argument("--name", help="file stem (default completeness_study[_quick]); a "
                                       "partial run (--ks, --curvatures) skips the "
                                       "from-scratch comparison")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out is not None else DEFAULT_OUT
    sizes = (dict(n_train=300, n_test=30, epochs=10) if args.quick
             else dict(n_train=1000, n_test=100, epochs=50))
    Ks = args.ks or (QUICK_KS if args.quick else KS)
    partial = args.ks is not None or set(args.curvatures) != set(CURVATURES)
    model, data = make_problem(**sizes)
    rows, gaps = study(model, data, Ks=Ks, refit_max_iter=args.refit_max_iter,
                       train_epochs=sizes["epochs"], gn_max_K=args.gn_max_K,
                       curvatures=args.curvatures, scratch=not partial)
    stem = args.name or ("completeness_study_quick" if args.quick else "completeness_study")
    meta = {"reproduction": "completeness_study", "quick": args.quick, "sizes": sizes,
            "Ks": list(Ks), "gauss_newton_max_K": args.gn_max_K, "scratch_gap": gaps,
            "problem": "Table 2 digits MLP 64-128-64-10 (make_mlp), joint baseline",
            "argv": list(argv) if argv is not None else sys.argv[1:]}
    write_results(out / f"{stem}.json", rows, meta)
    png = plot(rows, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')}" + (f" and {png.name}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
