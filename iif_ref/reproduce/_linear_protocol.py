"""Shared protocol of the linear-regression reproductions (paper Tables 1 and 4).

One *trial*: draw a synthetic problem (:func:`iif_ref.synthetic.make_linear_problem`),
draw ``subsets`` random training subsets of fraction ``alpha``, retrain on each
(:func:`iif_ref.linear.subset_test_losses`), score every method with the LDS
(:func:`iif_ref.metrics.lds`) per test point and average over test points. A table cell
is the mean ± standard error of those per-trial averages over ``trials`` trials.

Methods (all from :mod:`iif_ref.linear`, summed MSE, ``docs/conventions.md`` sign):

- ``iif_exact`` – integrated influence, exact integral (``K=None``), per-test unlearning
  baseline (Eq. 12–13) with ``lam``;
- ``iif_k1``, ``iif_k5`` – the same with the discrete Euler sum (Eq. 10), K = 1 and 5;
- ``if`` – influence function (Koh–Liang upweighting, same sign);
- ``tracin`` – TracIn-CP on full-batch gradient descent from θ = 0 on the summed loss,
  step ``tracin_lr``, ``tracin_checkpoints`` checkpoints evenly spaced over the run until
  gradient descent has converged (error contraction 1e-6), or explicit iterations;
- ``loo`` – exact leave-one-out retraining;
- ``ceiling`` – linear-datamodel estimate of the best achievable LDS
  (:func:`iif_ref.metrics.lds_ceiling`), fitted on half the subsets and scored on the
  other half, where every method is also scored (the ``heldout`` numbers).

Seeds: trial ``r`` of a run with base seed ``s`` uses ``SeedSequence([s, r])``, split into
independent streams for the problem, the subsets and the ceiling's split. The streams do
not depend on the setting, so the columns of a table share ``X``, ``w``, the test inputs
and the subsets (common random numbers: column differences are less noisy).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import ConstantInputWarning

from iif_ref import linear
from iif_ref.bench import write_results, write_text_atomic
from iif_ref.errors import IndefiniteObjectiveError
from iif_ref.metrics import lds, lds_ceiling, random_subset_masks
from iif_ref.synthetic import make_linear_problem

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "docs" / "results"
# Quick runs are previews: by default they go to the ignored scratch folder so that they
# never overwrite the published full-protocol results in docs/results.
QUICK_OUT = REPO_ROOT / "results"

METHODS = ("iif_exact", "iif_k1", "iif_k5", "if", "tracin", "loo")
LABELS = {"iif_exact": "IIF exact (K=∞)", "iif_k1": "IIF K=1", "iif_k5": "IIF K=5",
          "if": "IF", "tracin": "TracIn", "loo": "LOO (exact)", "ceiling": "LDS ceiling"}
# Which of our rows the paper's rows are printed beside.
PAPER_ROW = {"iif_exact": "IIF", "iif_k1": "IIF", "iif_k5": "IIF", "if": "IF",
             "tracin": "TracIn"}

QUICK = {"trials": 10, "subsets": 500}
FULL = {"trials": 100, "subsets": 5000}


@dataclass(frozen=True)
class Setting:
    """One column of a table: noise levels and laws, and the paper's numbers for it."""

    key: str
    label: str
    sigma_n: float
    sigma_s: float
    train_noise: str = "gaussian"
    test_noise: str = "gaussian"
    paper: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """Everything a run depends on (stored in the JSON so it can be repeated)."""

    trials: int = QUICK["trials"]
    subsets: int = QUICK["subsets"]
    n_train: int = 100
    d: int = 10
    n_test: int = 50
    alpha: float = 0.5
    lam: float = 1.0
    ridge: float = 0.0
    tracin_lr: float = 1e-3
    # An int n: n checkpoints evenly spaced over a gradient-descent run to convergence
    # (iif_ref.linear.tracin's schedule); a tuple: explicit iteration indices.
    tracin_checkpoints: object = 10
    ceiling_fit_fraction: float = 0.5
    seed: int = 0
    methods: tuple = METHODS


# --------------------------------------------------------------------------- scores
def _iif(problem, cfg, K):
    """IIF scores and the test points they are defined for.

    For ``lam`` below the well-posedness threshold some test points have an unbounded
    unlearning objective (``IndefiniteObjectiveError``); those are dropped, counted and
    reported — never silently scored.
    """
    keep = np.ones(problem.X_test.shape[0], dtype=bool)
    while keep.any():
        try:
            scores = linear.integrated_influence(
                problem.X, problem.y, problem.X_test[keep], problem.y_test[keep],
                lam=cfg.lam, K=K, ridge=cfg.ridge)
            return scores, keep
        except IndefiniteObjectiveError as exc:
            if not exc.test_indices:
                raise
            # The indices are positions among the test points passed in this call.
            keep[np.flatnonzero(keep)[list(exc.test_indices)]] = False
    return None, keep


def method_scores(problem, cfg, methods=None):
    """Scores of each method: ``{name: (scores (n_kept, n_train), kept (n_test,) bool)}``."""
    methods = cfg.methods if methods is None else methods
    X, y, Xt, yt = problem.X, problem.y, problem.X_test, problem.y_test
    every = np.ones(Xt.shape[0], dtype=bool)
    out = {}
    for name in methods:
        if name == "iif_exact":
            out[name] = _iif(problem, cfg, None)
        elif name.startswith("iif_k"):
            out[name] = _iif(problem, cfg, int(name[5:]))
        elif name == "if":
            out[name] = (linear.influence_function(X, y, Xt, yt, ridge=cfg.ridge), every)
        elif name == "tracin":
            out[name] = (linear.tracin(X, y, Xt, yt, lr=cfg.tracin_lr,
                                       checkpoints=cfg.tracin_checkpoints, ridge=cfg.ridge),
                         every)
        elif name == "loo":
            out[name] = (linear.leave_one_out(X, y, Xt, yt, ridge=cfg.ridge), every)
        else:
            raise ValueError(f"unknown method {name!r}; known: {METHODS}")
    return out


def completeness_residual(problem, cfg, scores):
    """Largest ``|Σ_i I[t, i] − Δ_t| / max(|Δ_t|, Σ_i |I[t, i]|)`` of exact IIF scores.

    ``Δ_t = L_test(θ*) − L_test(θ(0))`` from :func:`iif_ref.linear.delta` (Eq. 1, 9);
    ``θ(0)`` is the fit to the per-test unlearning baseline targets (Eq. 12–13), equal to
    ``θ'_t`` when ``ridge = 0``.
    """
    delta = linear.delta(problem.X, problem.y, problem.X_test, problem.y_test,
                         lam=cfg.lam, ridge=cfg.ridge)
    scale = np.maximum(np.abs(delta), np.abs(scores).sum(axis=1))
    return float(np.max(np.abs(scores.sum(axis=1) - delta) / scale))


# --------------------------------------------------------------------------- one trial
def _trial_streams(cfg, trial):
    ss = np.random.SeedSequence([cfg.seed, trial])
    return [np.random.default_rng(s) for s in ss.spawn(3)]


def _mean_lds(values):
    finite = np.isfinite(values)
    return (float(np.mean(values[finite])) if finite.any() else None), int((~finite).sum())


def run_trial(setting, cfg, trial, *, methods=None, ceiling=True, completeness=True):
    """Run one trial; returns per-method test-averaged LDS (all and held-out subsets)."""
    methods = cfg.methods if methods is None else methods
    rng_problem, rng_masks, rng_split = _trial_streams(cfg, trial)
    problem = make_linear_problem(cfg.n_train, cfg.d, cfg.n_test, sigma_n=setting.sigma_n,
                                  sigma_s=setting.sigma_s, train_noise=setting.train_noise,
                                  test_noise=setting.test_noise, seed=rng_problem)
    masks = random_subset_masks(cfg.n_train, cfg.subsets, alpha=cfg.alpha, seed=rng_masks)
    losses = linear.subset_test_losses(problem.X, problem.y, problem.X_test, problem.y_test,
                                       masks, ridge=cfg.ridge)
    out = {"methods": {}, "nan_test_points": {}, "dropped_test_points": {}}
    split = None
    with warnings.catch_warnings(record=True) as caught:
        # A constant column (NaN LDS) is counted per method below; keep the warnings.
        warnings.simplefilter("always", ConstantInputWarning)
        if ceiling:
            ceil = lds_ceiling(masks, losses, fit_fraction=cfg.ceiling_fit_fraction,
                               seed=rng_split)
            split = ceil.eval_index
            mean, n_nan = _mean_lds(ceil.ceiling)
            out["methods"]["ceiling"] = {"heldout": mean}
            out["nan_test_points"]["ceiling"] = n_nan
        scored = method_scores(problem, cfg, methods)
        for name, (scores, kept) in scored.items():
            out["dropped_test_points"][name] = int((~kept).sum())
            if name == "iif_exact" and completeness and kept.all():
                out["completeness_residual"] = completeness_residual(problem, cfg, scores)
        # Methods scored on every test point share one ranking of the subset losses.
        full = [n for n, (sc, kept) in scored.items() if sc is not None and kept.all()]
        values = {}
        if full:
            stack = np.stack([scored[n][0] for n in full])
            both = [lds(stack, masks, losses)]
            if split is not None:
                both.append(lds(stack, masks, losses, subset_index=split))
            for k, n in enumerate(full):
                values[n] = [b[k] for b in both]
        for n, (sc, kept) in scored.items():
            if n in values or sc is None:
                continue
            values[n] = [lds(sc, masks, losses[:, kept])]
            if split is not None:
                values[n].append(lds(sc, masks, losses[:, kept], subset_index=split))
        for n in scored:
            if n not in values:
                out["methods"][n] = {"all": None, "heldout": None}
                continue
            mean, n_nan = _mean_lds(values[n][0])
            out["methods"][n] = {"all": mean}
            if split is not None:
                out["methods"][n]["heldout"] = _mean_lds(values[n][1])[0]
            out["nan_test_points"][n] = n_nan
    out["warnings"] = [str(w.message) for w in caught]
    return out


# --------------------------------------------------------------------------- aggregation
def _mean_se(values):
    vals = np.array([v for v in values if v is not None], dtype=float)
    if vals.size == 0:
        return None, None, 0
    se = float(vals.std(ddof=1) / np.sqrt(vals.size)) if vals.size > 1 else None
    return float(vals.mean()), se, int(vals.size)


def cpu_seconds():
    """CPU seconds of this process and of its finished (joined) worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _run_trial_star(args):
    setting, cfg, r, methods, ceiling = args
    return run_trial(setting, cfg, r, methods=methods, ceiling=ceiling)


def run_setting(setting, cfg, *, methods=None, ceiling=True, progress=True, desc=None,
                jobs=1):
    """Run every trial of one setting; returns the aggregated cells and diagnostics.

    ``jobs > 1`` runs trials in that many worker processes. Each trial draws from its own
    ``SeedSequence([seed, trial])``, so the results do not depend on ``jobs``.
    """
    methods = cfg.methods if methods is None else methods
    t0 = time.perf_counter()
    work = [(setting, cfg, r, methods, ceiling) for r in range(cfg.trials)]
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(max_workers=jobs)
        iterator = pool.map(_run_trial_star, work, chunksize=max(1, cfg.trials // (4 * jobs)))
    else:
        pool, iterator = None, map(_run_trial_star, work)
    if progress:
        from tqdm import tqdm
        # disable=None: no bar when standard error is not a terminal (logs, CI).
        iterator = tqdm(iterator, total=cfg.trials, desc=desc or setting.key, leave=False,
                        file=sys.stderr, disable=None)
    try:
        trials = list(iterator)
    finally:
        if pool is not None:
            pool.shutdown()
    wall = time.perf_counter() - t0
    names = list(methods) + (["ceiling"] if ceiling else [])
    cells = {}
    for name in names:
        cell = {}
        for part in ("all", "heldout"):
            mean, se, n = _mean_se([t["methods"][name].get(part) for t in trials])
            if n or part in trials[0]["methods"][name]:
                cell[part] = {"mean": mean, "se": se, "n_trials": n}
        cell["nan_test_points"] = int(sum(t["nan_test_points"].get(name, 0) for t in trials))
        cell["dropped_test_points"] = int(sum(t["dropped_test_points"].get(name, 0)
                                              for t in trials))
        cells[name] = cell
    residuals = [t["completeness_residual"] for t in trials if "completeness_residual" in t]
    return {"cells": cells, "wall_s": wall,
            "completeness_residual_max": max(residuals) if residuals else None,
            "warnings": sorted({w for t in trials for w in t["warnings"]})[:20]}


# --------------------------------------------------------------------------- sweeps
SWEEPS = {
    "lam": ([0.5, 1.0, 2.0, 5.0], ("iif_exact", "iif_k1", "iif_k5"), False),
    "alpha": ([0.25, 0.5, 0.75], METHODS, True),
    # (lr, checkpoints): 10 evenly spaced checkpoints of a run to convergence at three
    # step sizes; only the converged model (1); 50; only the first five steps; only θ = 0.
    "tracin": ([(3e-4, 10), (1e-3, 10), (3e-3, 10), (1e-3, 1), (1e-3, 50),
                (1e-3, (0, 1, 2, 3, 4)), (1e-3, (0,))], ("tracin",), False),
}


def run_sweeps(settings, cfg, *, progress=True, jobs=1):
    """Measured sensitivity to the parameters the paper leaves open."""
    rows = []
    for param, (values, methods, ceiling) in SWEEPS.items():
        for value in values:
            if param == "tracin":
                sub = dataclasses.replace(cfg, tracin_lr=value[0], tracin_checkpoints=value[1])
                shown = {"tracin_lr": value[0], "tracin_checkpoints": value[1]}
            else:
                sub = dataclasses.replace(cfg, **{param: value})
                shown = {param: value}
            for s in settings:
                res = run_setting(s, sub, methods=methods, ceiling=ceiling, progress=progress,
                                  desc=f"sweep {param}={value} {s.key}", jobs=jobs)
                for name, cell in res["cells"].items():
                    rows.append({"sweep": param, **shown, "setting": s.key, "method": name,
                                 **_flat(cell)})
    return rows


# --------------------------------------------------------------------------- output
def _flat(cell):
    out = {}
    for part in ("all", "heldout"):
        if part in cell:
            out[f"{part}_mean"] = cell[part]["mean"]
            out[f"{part}_se"] = cell[part]["se"]
            out[f"{part}_n_trials"] = cell[part]["n_trials"]
    out["nan_test_points"] = cell["nan_test_points"]
    out["dropped_test_points"] = cell["dropped_test_points"]
    return out


def _fmt_ckpt(c):
    if isinstance(c, (int, np.integer)):
        return f"{c} evenly spaced up to convergence"
    return "steps " + ",".join(map(str, c))


def _fmt(mean, se):
    if mean is None:
        return "—"
    return f"{mean:.3f} ± {se:.3f}" if se is not None else f"{mean:.3f}"


def markdown_table(title, settings, results, cfg, sweep_rows=None):
    """Markdown: ours (all subsets), paper, and held-out comparison with the ceiling."""
    head = "| method | " + " | ".join(s.label for s in settings) + " |"
    rule = "|---" * (len(settings) + 1) + "|"
    lines = [f"### {title}", "",
             f"{cfg.trials} trials × {cfg.subsets} subsets (alpha = {cfg.alpha}), "
             f"N = {cfg.n_train}, d = {cfg.d}, n_test = {cfg.n_test}, lam = {cfg.lam}, "
             f"TracIn lr = {cfg.tracin_lr}, checkpoints = {_fmt_ckpt(cfg.tracin_checkpoints)}; "
             "mean ± standard error over trials of the test-averaged LDS.", "",
             "**LDS on all subsets (ours) beside the paper**", "", head, rule]
    for name in cfg.methods:
        cells = [_fmt(results[s.key]["cells"][name]["all"]["mean"],
                      results[s.key]["cells"][name]["all"]["se"]) for s in settings]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    for paper_name in ("IIF", "IF", "TracIn"):
        lines.append(f"| paper {paper_name} | "
                     + " | ".join(f"{s.paper.get(paper_name, float('nan')):.3f}"
                                  for s in settings) + " |")
    if "ceiling" in results[settings[0].key]["cells"]:
        lines += ["", "**Held-out half of the subsets (the ceiling's evaluation half)**", "",
                  head, rule]
        for name in list(cfg.methods) + ["ceiling"]:
            cells = [_fmt(results[s.key]["cells"][name]["heldout"]["mean"],
                          results[s.key]["cells"][name]["heldout"]["se"]) for s in settings]
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    resid = [results[s.key]["completeness_residual_max"] for s in settings]
    resid = [r for r in resid if r is not None]
    if resid:
        lines += ["", f"Exact-IIF completeness: max relative residual "
                      f"|Σ_i I − Δ| / max(|Δ|, Σ|I|) = {max(resid):.1e} over all trials."]
    drops = {n: sum(results[s.key]["cells"][n]["dropped_test_points"] for s in settings)
             for n in cfg.methods}
    nans = {n: sum(results[s.key]["cells"][n]["nan_test_points"] for s in settings)
            for n in cfg.methods}
    if any(drops.values()) or any(nans.values()):
        lines += ["", f"Test points dropped (indefinite unlearning objective): {drops}; "
                      f"NaN LDS (constant column): {nans}."]
    if sweep_rows:
        lines += ["", "**Sweeps** (methods: LDS on all subsets; LDS ceiling: on its held-out "
                      "half)", "",
                  "| sweep | value | method | " + " | ".join(s.label for s in settings)
                  + " |", "|---" * (len(settings) + 3) + "|"]
        seen = {}
        for r in sweep_rows:
            value = (f"lr={r['tracin_lr']}, checkpoints={_fmt_ckpt(r['tracin_checkpoints'])}"
                     if r["sweep"] == "tracin" else r[r["sweep"]])
            key = (r["sweep"], str(value), r["method"])
            seen.setdefault(key, {})[r["setting"]] = (r.get("all_mean"), r.get("all_se"),
                                                      r.get("heldout_mean"),
                                                      r.get("heldout_se"))
        for (sweep, value, method), by_setting in seen.items():
            cells = []
            for s in settings:
                a_m, a_se, h_m, h_se = by_setting.get(s.key, (None,) * 4)
                cells.append(_fmt(h_m, h_se) if method == "ceiling" else _fmt(a_m, a_se))
            lines.append(f"| {sweep} | {value} | {LABELS[method]} | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI
def build_parser(prog, description):
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--full", action="store_true",
                   help=f"paper protocol: {FULL['trials']} trials × {FULL['subsets']} subsets "
                        f"(default quick: {QUICK['trials']} × {QUICK['subsets']})")
    p.add_argument("--trials", type=int, help="number of trials (overrides --full)")
    p.add_argument("--subsets", type=int, help="random subsets per trial (overrides --full)")
    p.add_argument("--n-test", type=int, default=Config.n_test,
                   help="test points per trial (paper silent; default %(default)s)")
    p.add_argument("--lam", type=float, default=Config.lam,
                   help="unlearning regularisation λ of Eq. 12 (default %(default)s)")
    p.add_argument("--alpha", type=float, default=Config.alpha,
                   help="subset fraction (default %(default)s)")
    p.add_argument("--tracin-lr", type=float, default=Config.tracin_lr,
                   help="TracIn gradient-descent step on the summed loss (default %(default)s)")
    p.add_argument("--tracin-checkpoints", type=int, default=Config.tracin_checkpoints,
                   help="TracIn checkpoints, evenly spaced over gradient descent from θ=0 "
                        "until convergence (default %(default)s)")
    p.add_argument("--seed", type=int, default=Config.seed, help="base seed (default 0)")
    p.add_argument("--sweep", action="store_true",
                   help="also measure lam, alpha and TracIn-schedule sweeps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes for the trials (results do not depend on it; "
                        "default 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory for NAME.json and NAME.md (default: docs/results "
                        "with --full, the scratch folder results/ otherwise)")
    return p


def config_from_args(args):
    base = FULL if args.full else QUICK
    return Config(trials=args.trials or base["trials"], subsets=args.subsets or base["subsets"],
                  n_test=args.n_test, lam=args.lam, alpha=args.alpha,
                  tracin_lr=args.tracin_lr, tracin_checkpoints=args.tracin_checkpoints, seed=args.seed)


def run_table(name, title, settings, argv, description):
    """Entry point shared by ``table1`` and ``table4``; returns the exit code."""
    args = build_parser(f"iif-ref reproduce {name}", description).parse_args(argv)
    cfg = config_from_args(args)
    progress = not args.no_progress
    t0, c0 = time.perf_counter(), cpu_seconds()
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    results = {s.key: run_setting(s, cfg, progress=progress, jobs=args.jobs)
               for s in settings}
    sweep_rows = (run_sweeps(settings, cfg, progress=progress, jobs=args.jobs)
                  if args.sweep else None)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    rows = []
    for s in settings:
        for method, cell in results[s.key]["cells"].items():
            rows.append({"setting": s.key, "method": method, "label": LABELS[method],
                         "paper": s.paper.get(PAPER_ROW.get(method)), **_flat(cell)})
    meta = {
        "reproduction": name, "title": title,
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "config": dataclasses.asdict(cfg),
        "settings": [dataclasses.asdict(s) for s in settings],
        "per_setting": {s.key: {k: v for k, v in results[s.key].items() if k != "cells"}
                        for s in settings},
        "wall_s": wall,
        "jobs": args.jobs,
        # CPU seconds of this process and its workers (all threads): on a shared
        # machine the wall time also counts waiting for a core.
        "cpu_s": cpu,
        "load_average_at_end": os.getloadavg(),
    }
    if sweep_rows is not None:
        meta["sweeps"] = sweep_rows
    out_dir = Path(args.out) if args.out is not None else (
        DEFAULT_OUT if args.full else QUICK_OUT)
    write_results(out_dir / f"{name}.json", rows, meta)
    md = markdown_table(title, settings, results, cfg, sweep_rows)
    write_text_atomic(out_dir / f"{name}.md", md)
    print(md)
    print(f"wrote {out_dir / (name + '.json')} and {name}.md in {wall:.1f} s "
          f"({cpu:.1f} CPU s)")
    return 0
