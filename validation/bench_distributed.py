"""Scaling of the distributed engine: time per sample and memory per worker as N grows,
and its overhead against one process on the same cores.

Model: ``f(x; θ) = tanh(x W) · θ`` with ``d = 16`` inputs and ``n_params = 256``
trainable weights (:class:`iif_ref.distributed.synthetic.RandomFeatureRegression`),
K = 3 path steps, P = 64, 16 test points, top-10 proponents/opponents. Synthetic
Gaussian samples.

* distributed: a ``LocalCluster`` of ``W`` single-threaded worker processes (W = the
  usable cores), chunks of 2048 samples (fixed across N: ≥ 5 chunks at N = 10⁴, so
  no worker idles on an uneven last chunk), features written to a fresh store, Fisher tree-reduced, scores kept
  blockwise (``return_scores=False``: only top-k and sums reach the driver). Timed warm
  (workers started and imports done); phases timed separately.
* single process: the same features for all N at once, ``projected_scores`` and a
  full sort for the top-k, with BLAS limited to W threads (equal cores). Skipped where
  its ``(K, N, P)`` features would not fit ``--single-max-bytes``.

Memory: resident set size of each worker (and of the single process) sampled every
20 ms by psutil during the run, minus the RSS just before it.

Usage::

    python validation/bench_distributed.py            # quick: N = 1e4, 3e4, 1e5
    python validation/bench_distributed.py --full     # N up to 1e6
    iif-ref reproduce bench_distributed [--full]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "bench_distributed.json"


class RssSampler:
    """Peak RSS of some processes, sampled in a background thread."""

    def __init__(self, pids, interval=0.02):
        import psutil
        self.procs = [psutil.Process(p) for p in pids]
        self.base = [p.memory_info().rss for p in self.procs]
        self.peak = list(self.base)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for i, p in enumerate(self.procs):
                try:
                    self.peak[i] = max(self.peak[i], p.memory_info().rss)
                except Exception:  # a process that went away
                    pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def growth(self):
        return [pk - b for pk, b in zip(self.peak, self.base)]


def make_problem(N, *, d=16, n_params=256, K=3, P=64, n_test=16, seed=0, backend="numpy"):
    from iif_ref.distributed.synthetic import RandomFeatureRegression

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    y = np.tanh(X[:, 0]) + 0.1 * rng.standard_normal(N)
    theta = 0.3 * rng.standard_normal((K, n_params))
    fn = RandomFeatureRegression(d, theta, 0.5 * theta[-1], proj_dim=P, seed=7,
                                 backend=backend)
    X_test = rng.standard_normal((n_test, d))
    Gamma = fn.test_features(X_test, np.tanh(X_test[:, 0]))
    return fn, X, y, Gamma


def run_distributed(client, worker_pids, fn, X, y, Gamma, *, chunk_rows, top_k):
    from iif_ref.distributed.featurize import featurize, open_store
    from iif_ref.distributed.reduce import factor_fishers, fisher_grams, score_blocks

    root = tempfile.mkdtemp(prefix="bench_store_")
    try:
        with RssSampler(worker_pids) as mem:
            t0 = time.perf_counter()
            store = open_store(Path(root) / "s", fn, X, y, chunk_rows=chunk_rows)
            featurize(client, store, fn, X, y)
            t1 = time.perf_counter()
            grams = fisher_grams(client, store)
            factors = factor_fishers(grams)
            t2 = time.perf_counter()
            out = score_blocks(client, store, factors, Gamma, top_k=top_k,
                               return_scores=False)
            t3 = time.perf_counter()
        store_bytes = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"seconds": t3 - t0, "featurize_s": t1 - t0, "fisher_s": t2 - t1,
            "scores_s": t3 - t2, "worker_rss_growth": mem.growth(),
            "store_bytes": store_bytes, "n_chunks": store.n_chunks}, out


def run_single(fn, X, y, Gamma, *, threads, top_k):
    from threadpoolctl import threadpool_limits

    from iif_ref.kernels import projected_scores

    with threadpool_limits(limits=threads), RssSampler([os.getpid()]) as mem:
        t0 = time.perf_counter()
        feats = fn(0, X, y)
        Phi = np.stack([feats[k][0] for k in fn.steps])
        Psi = np.stack([feats[k][1] for k in fn.steps])
        del feats
        t1 = time.perf_counter()
        scores = projected_scores(Phi, Psi, Gamma, backend="numpy")
        order = np.argsort(scores, axis=1, kind="stable")
        t2 = time.perf_counter()
    return {"seconds": t2 - t0, "featurize_s": t1 - t0, "solve_s": t2 - t1,
            "rss_growth": mem.growth()[0]}, scores, order[:, :top_k]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="N up to 1e6")
    parser.add_argument("--sizes", type=int, nargs="*", help="explicit N values")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: usable cores)")
    parser.add_argument("--chunk-rows", type=int, default=2048,
                        help="samples per chunk (fixed across N, so memory per worker "
                             "should be flat)")
    parser.add_argument("--single-max-bytes", type=float, default=1.5e9,
                        help="skip the single-process run above this feature size")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from iif_ref.bench import write_results

    sizes = args.sizes or ([10_000, 30_000, 100_000, 300_000, 1_000_000] if args.full
                           else [10_000, 30_000, 100_000])
    workers = args.workers or len(os.sched_getaffinity(0))
    top_k, K, P = 10, 3, 64
    t_start = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    client = Client(cluster)
    startup = time.perf_counter() - t_start
    rows = []
    try:
        pids = list(client.run(os.getpid).values())
        # Warm-up: imports and first calls on every worker, not timed.
        fn, X, y, Gamma = make_problem(2 * workers * 64)
        run_distributed(client, pids, fn, X, y, Gamma, chunk_rows=64, top_k=top_k)
        for N in sizes:
            fn, X, y, Gamma = make_problem(N)
            chunk_rows = args.chunk_rows
            dist, out = run_distributed(client, pids, fn, X, y, Gamma,
                                        chunk_rows=chunk_rows, top_k=top_k)
            row = {"N": N, "workers": workers, "chunk_rows": chunk_rows, "K": K,
                   "proj_dim": P, "n_params": fn.n_params,
                   "dist_seconds": dist["seconds"],
                   "dist_us_per_sample": 1e6 * dist["seconds"] / N,
                   "dist_phases_s": {k: dist[k] for k in ("featurize_s", "fisher_s",
                                                         "scores_s")},
                   "worker_peak_rss_growth_mib": max(dist["worker_rss_growth"]) / 2**20,
                   "store_mib": dist["store_bytes"] / 2**20, "n_chunks": dist["n_chunks"],
                   "load_average": os.getloadavg()}
            feature_bytes = 2 * K * N * P * 8
            if feature_bytes <= args.single_max_bytes:
                single, scores, top = run_single(fn, X, y, Gamma, threads=workers,
                                                 top_k=top_k)
                row.update({"single_seconds": single["seconds"],
                            "single_us_per_sample": 1e6 * single["seconds"] / N,
                            "single_rss_growth_mib": single["rss_growth"] / 2**20,
                            "overhead": dist["seconds"] / single["seconds"] - 1.0,
                            "top_k_equal": bool(np.array_equal(top, out["proponents"])),
                            "max_abs_sum_diff": float(np.max(np.abs(
                                scores.sum(axis=1) - out["score_sums"])))})
            else:
                row.update({"single_seconds": None, "overhead": None,
                            "single_skipped": f"features {feature_bytes / 1e9:.1f} GB > "
                                              f"--single-max-bytes"})
            rows.append(row)
            single_text = ("—" if row["single_seconds"] is None else
                           f"{row['single_us_per_sample']:7.1f} µs  "
                           f"{row['single_rss_growth_mib']:7.1f} MiB  "
                           f"overhead {100 * row['overhead']:+5.1f}%  "
                           f"top-k equal {row['top_k_equal']}")
            print(f"N={N:>9,d}  dist {row['dist_us_per_sample']:7.1f} µs/sample  "
                  f"worker peak +{row['worker_peak_rss_growth_mib']:6.1f} MiB  | single "
                  f"{single_text}", flush=True)
    finally:
        client.close()
        cluster.close()
    meta = {"command": " ".join([Path(sys.argv[0]).name] + list(argv or sys.argv[1:])),
            "model": "tanh(x W)·θ, d=16, n_params=256, MSE", "K": K, "proj_dim": P,
            "n_test": 16, "top_k": top_k, "cluster_startup_s": startup,
            "total_s": time.perf_counter() - t_start,
            "notes": "overhead = distributed / single-process wall time − 1 at equal "
                     "cores (W single-threaded workers vs W BLAS threads); memory is "
                     "peak RSS growth during the run, sampled every 20 ms"}
    path = write_results(args.out, rows, meta)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
