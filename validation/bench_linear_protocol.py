"""Benchmark the linear LDS protocol: wall time of the full Table 1 + Table 4 runs
(6 settings × 100 trials × 5000 subsets, every method and the ceiling), and where a
trial's time goes.

``iif-ref reproduce bench_linear_protocol [--trials 100] [--subsets 5000] [--out DIR]``

Measured in one run:

1. a per-component breakdown of one full-size trial (median of ``--repeats`` trials):
   subset masks, the 5000 refits, the six methods' scores, the stacked LDS on all and on
   the held-out subsets, the datamodel ceiling, and the completeness check — as
   fractions of the trial;
2. the ratio of the vectorised LDS (one ranking of the losses shared by six methods) to
   the reference loop of ``scipy.stats.spearmanr`` over methods and test points, on the
   same inputs (and their agreement);
3. the wall time and the CPU time of ``table1 --full`` and ``table4 --full`` (their
   JSON/markdown land in ``--results-out``), with the load average before and after:
   on a shared machine the wall time also counts waiting for a core.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from iif_ref import linear
from iif_ref.bench import time_callable, write_results
from iif_ref.metrics import lds, lds_ceiling, random_subset_masks
from iif_ref.reproduce import _linear_protocol as protocol
from iif_ref.synthetic import make_linear_problem


def _component_breakdown(cfg, repeats):
    setting = protocol.Setting("bench", "σn=1, σs=1", 1.0, 1.0)
    problem = make_linear_problem(cfg.n_train, cfg.d, cfg.n_test, sigma_n=1.0, sigma_s=1.0,
                                  seed=0)
    masks = random_subset_masks(cfg.n_train, cfg.subsets, alpha=cfg.alpha, seed=1)
    losses = linear.subset_test_losses(problem.X, problem.y, problem.X_test, problem.y_test,
                                       masks)
    scored = protocol.method_scores(problem, cfg)
    stack = np.stack([v[0] for v in scored.values()])
    ceil = lds_ceiling(masks, losses, seed=2)
    parts = {
        "masks": lambda: random_subset_masks(cfg.n_train, cfg.subsets, alpha=cfg.alpha,
                                             seed=1),
        "refits (subset_test_losses)": lambda: linear.subset_test_losses(
            problem.X, problem.y, problem.X_test, problem.y_test, masks),
        "method scores (6 methods)": lambda: protocol.method_scores(problem, cfg),
        "LDS, all subsets (stacked)": lambda: lds(stack, masks, losses),
        "LDS, held-out half (stacked)": lambda: lds(stack, masks, losses,
                                                    subset_index=ceil.eval_index),
        "datamodel ceiling": lambda: lds_ceiling(masks, losses, seed=2),
        "completeness check": lambda: protocol.completeness_residual(
            problem, cfg, scored["iif_exact"][0]),
        "whole trial (run_trial)": lambda: protocol.run_trial(setting, cfg, 0),
    }
    rows = []
    for name, fn in parts.items():
        t = time_callable(fn, repeats=repeats, warmup=1)
        rows.append({"component": name, "median_s": t.median, "iqr_s": t.iqr,
                     "min_s": t.minimum})
    trial = rows[-1]["median_s"]
    for r in rows:
        r["fraction_of_trial"] = r["median_s"] / trial
    return rows, (problem, masks, losses, stack)


def _lds_vs_spearman_loop(inputs, repeats):
    from scipy.stats import spearmanr
    _, masks, losses, stack = inputs

    def loop():
        predicted = np.einsum("mtj,sj->mts", stack, masks.astype(float))
        return np.array([[spearmanr(losses[:, t], predicted[m, t]).statistic
                          for t in range(stack.shape[1])] for m in range(stack.shape[0])])

    fast = time_callable(lambda: lds(stack, masks, losses), repeats=repeats, warmup=1)
    ref = time_callable(loop, repeats=max(1, repeats // 2), warmup=0)
    agree = float(np.max(np.abs(lds(stack, masks, losses) - loop())))
    return {"vectorised_lds_median_s": fast.median, "spearmanr_loop_median_s": ref.median,
            "speedup": ref.median / fast.median, "max_abs_difference": agree}


def main(argv=None):
    p = argparse.ArgumentParser(prog="iif-ref reproduce bench_linear_protocol",
                                description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=protocol.FULL["trials"])
    p.add_argument("--subsets", type=int, default=protocol.FULL["subsets"])
    p.add_argument("--repeats", type=int, default=5, help="repeats per component timing")
    p.add_argument("--skip-full", action="store_true",
                   help="only the breakdown and the LDS ratio, not the full tables")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="worker processes for the tables")
    p.add_argument("--out", type=Path, default=protocol.DEFAULT_OUT,
                   help="directory of bench_linear_protocol.json")
    p.add_argument("--results-out", type=Path, default=protocol.DEFAULT_OUT,
                   help="directory for the tables' own JSON/markdown")
    args = p.parse_args(argv)
    cfg = protocol.Config(trials=args.trials, subsets=args.subsets)

    load_before = os.getloadavg()
    rows, inputs = _component_breakdown(cfg, args.repeats)
    for r in rows:
        print(f"{r['component']:>32}: {r['median_s'] * 1e3:9.1f} ms  "
              f"({100 * r['fraction_of_trial']:5.1f} % of a trial)")
    ratio = _lds_vs_spearman_loop(inputs, args.repeats)
    print(f"vectorised LDS vs spearmanr loop: {ratio['speedup']:.1f}x faster "
          f"(max |difference| {ratio['max_abs_difference']:.1e})")

    tables, tables_cpu = {}, {}
    if not args.skip_full:
        from iif_ref.reproduce import table1, table4
        common = ["--trials", str(args.trials), "--subsets", str(args.subsets),
                  "--out", str(args.results_out), "--jobs", str(args.jobs)] + (
                      ["--no-progress"] if args.no_progress else [])
        for name, module in (("table1", table1), ("table4", table4)):
            t0, c0 = time.perf_counter(), protocol.cpu_seconds()
            module.main(common)
            tables[name] = time.perf_counter() - t0
            tables_cpu[name] = protocol.cpu_seconds() - c0
            print(f"{name}: {tables[name]:.1f} s wall, {tables_cpu[name]:.1f} CPU s")
        total = sum(tables.values())
        n_trials = 6 * args.trials
        print(f"full protocol (6 settings × {args.trials} trials × {args.subsets} subsets): "
              f"{total:.1f} s = {total / n_trials * 1e3:.0f} ms per trial; breakdown "
              f"predicted {rows[-1]['median_s'] * n_trials:.1f} s; "
              f"{sum(tables_cpu.values()):.1f} CPU s")
    load_after = os.getloadavg()
    meta = {"benchmark": "bench_linear_protocol", "config": {"trials": args.trials,
            "subsets": args.subsets, "n_train": cfg.n_train, "d": cfg.d, "n_test": cfg.n_test,
            "jobs": args.jobs},
            "lds_vs_spearmanr_loop": ratio, "tables_wall_s": tables,
            "tables_cpu_s": tables_cpu,
            "full_protocol_cpu_s": sum(tables_cpu.values()) if tables_cpu else None,
            "full_protocol_wall_s": sum(tables.values()) if tables else None,
            "load_average_before": load_before, "load_average_after": load_after,
            "argv": list(argv) if argv is not None else sys.argv[1:]}
    path = write_results(Path(args.out) / "bench_linear_protocol.json", rows, meta)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
