"""Benchmark: IIF, TRAK and IF of iif_ref.neural against traker and dattri, in one run.

Problem: MLP 64→128→64→10 (ReLU) trained on 1,000 standardised ``load_digits`` samples,
100 test points, float32, 2 threads, P = 512. Measured per method: wall time of the
whole attribution call (features, projection, solve; median of ``--repeats`` calls),
then, in one more call, peak
resident memory above the baseline via :mod:`iif_ref.bench` (its tracemalloc and RSS
sampler would slow a timed call). Peers run where importable (traker's CPU
``BasicProjector``; dattri's TRAK and CG influence function). Ratios are printed and the
JSON goes to ``docs/results/bench_neural.json`` with the machine description.

Usage: ``python validation/bench_neural.py [--quick] [--out PATH] [--previous PATH]``

``--previous`` copies the seconds and ratios of an earlier run's JSON (e.g. of an older
commit, run just before on the same machine) into ``meta.previous_run`` for a
before/after record; each run's ratios are measured within that run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "results" / "bench_neural.json"
#: Test points for the IF comparison with dattri (its CG solver is too slow for 100).
N_IF_TEST = 10


def _model_and_data(n_train, n_test, seed=0):
    import torch

    from iif_ref.datasets import load_digits_split

    split = load_digits_split(n_train, n_test, seed=seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    X = torch.as_tensor(split.X_train, dtype=torch.float32)
    y = torch.as_tensor(split.y_train)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):   # full-batch Adam: the model only has to be a trained model
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.as_tensor(split.X_test, dtype=torch.float32)).argmax(1)
                     == torch.as_tensor(split.y_test)).float().mean())
    return net, split, acc


def _ours(net, split, P, chunk):
    from iif_ref.neural import influence_function, integrated_influence, trak

    common = dict(seed=0, chunk_size=chunk)
    return {
        "iif_ref IIF (K=5, joint)": lambda: integrated_influence(
            net, "cross_entropy", split.X_train, split.y_train, split.X_test, split.y_test,
            K=5, baseline="joint", proj_dim=P, unlearn_lr=1e-3, path_lr=1e-3,
            progress=False, **common).scores,
        "iif_ref TRAK": lambda: trak(
            net, "cross_entropy", split.X_train, split.y_train, split.X_test, split.y_test,
            proj_dim=P, **common).scores,
        "iif_ref IF (projected Fisher)": lambda: influence_function(
            net, "cross_entropy", split.X_train, split.y_train, split.X_test, split.y_test,
            solver="projected", proj_dim=P, damping="auto", **common).scores,
        f"iif_ref IF (projected Fisher, {N_IF_TEST} test points)": lambda: influence_function(
            net, "cross_entropy", split.X_train, split.y_train, split.X_test[:N_IF_TEST],
            split.y_test[:N_IF_TEST], solver="projected", proj_dim=P, damping="auto",
            **common).scores,
    }


def _traker(net, split, P):
    import torch
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    def run():
        n_params = sum(p.numel() for p in net.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            proj = BasicProjector(grad_dim=n_params, proj_dim=P, seed=0,
                                  proj_type=ProjectionType.rademacher, device="cpu",
                                  dtype=torch.float32)
            tr = TRAKer(model=net, task="image_classification", train_set_size=len(split.X_train),
                        save_dir=tmp, device="cpu", projector=proj, proj_dim=P,
                        use_half_precision=False, logging_level=40)
            tr.load_checkpoint(net.state_dict(), model_id=0)
            X = torch.as_tensor(split.X_train, dtype=torch.float32)
            y = torch.as_tensor(split.y_train)
            for s in range(0, len(X), 250):
                tr.featurize(batch=(X[s:s + 250], y[s:s + 250]), num_samples=len(X[s:s + 250]))
            tr.finalize_features()
            Xt = torch.as_tensor(split.X_test, dtype=torch.float32)
            yt = torch.as_tensor(split.y_test)
            tr.start_scoring_checkpoint(exp_name="bench", checkpoint=net.state_dict(),
                                        model_id=0, num_targets=len(Xt))
            tr.score(batch=(Xt, yt), num_samples=len(Xt))
            scores = tr.finalize_scores(exp_name="bench")
            return -np.asarray(scores, dtype=np.float64).T   # τ (n_train, n_test) → ours

    return run


def _dattri(net, split, P):
    import torch
    from dattri.algorithm import TRAKAttributor
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    X = torch.as_tensor(split.X_train, dtype=torch.float32)
    y = torch.as_tensor(split.y_train)
    Xt = torch.as_tensor(split.X_test, dtype=torch.float32)
    yt = torch.as_tensor(split.y_test)

    def loss_func(params, data):
        x, target = data
        out = torch.func.functional_call(net, params, (x.reshape(-1, 64),))
        return torch.nn.functional.cross_entropy(out, target.reshape(-1), reduction="sum")

    def correct_probability(params, data):
        x, target = data
        out = torch.func.functional_call(net, params, (x.reshape(-1, 64),))
        return torch.softmax(out, -1)[..., target].reshape(())

    ck = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def trak_run():
        task = AttributionTask(loss_func=loss_func, model=net, checkpoints=[ck])
        att = TRAKAttributor(task=task, correct_probability_func=correct_probability,
                             projector_kwargs={"proj_dim": P, "proj_seed": 0,
                                               "device": "cpu"}, device="cpu")
        att.cache(DataLoader(TensorDataset(X, y), batch_size=100))
        return att.attribute(DataLoader(TensorDataset(Xt, yt), batch_size=100))

    def if_run():
        # dattri's CG influence recomputes the test iHVPs for every training batch, so
        # the training set goes in one batch; only N_IF_TEST test points (too slow else).
        task = AttributionTask(loss_func=loss_func, model=net, checkpoints=[ck])
        att = IFAttributorCG(task=task, device="cpu", max_iter=10, regularization=1e-3)
        att.cache(DataLoader(TensorDataset(X, y), batch_size=len(X)))
        return att.attribute(DataLoader(TensorDataset(X, y), batch_size=len(X)),
                             DataLoader(TensorDataset(Xt[:N_IF_TEST], yt[:N_IF_TEST]),
                                        batch_size=N_IF_TEST))

    return {"dattri TRAK": trak_run,
            f"dattri IF (CG, 10 iterations, {N_IF_TEST} test points)": if_run}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 train / 20 test, P=128")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per method; the median is reported (the machine "
                             "is shared, single calls vary by 2x)")
    parser.add_argument("--previous", default=None,
                        help="JSON of an earlier run to record as meta.previous_run")
    parser.add_argument("--previous-label", default="",
                        help="what the earlier run measured (e.g. its commit)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    import torch

    from iif_ref.bench import peak_memory, write_results

    torch.set_num_threads(2)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    n_train, n_test, P = (200, 20, 128) if args.quick else (1000, 100, 512)
    chunk = 1000   # one chunk: A is generated once per projection call
    t0 = time.perf_counter()
    net, split, acc = _model_and_data(n_train, n_test)
    print(f"model trained in {time.perf_counter() - t0:.1f}s, test accuracy {acc:.3f}; "
          f"n_params = {sum(p.numel() for p in net.parameters())}")

    methods = dict(_ours(net, split, P, chunk))
    skipped = {}
    try:
        methods["traker TRAK (BasicProjector)"] = _traker(net, split, P)
    except Exception as exc:  # an absent optional peer is reported, not fatal
        skipped["traker"] = f"{type(exc).__name__}: {exc}"
    try:
        methods.update(_dattri(net, split, P))
    except Exception as exc:
        skipped["dattri"] = f"{type(exc).__name__}: {exc}"

    # Warm-up: JIT compilation (numba kernels) and torch.func's first-call imports are
    # one-off costs of a process, not of a method; pay them once on a tiny problem.
    from iif_ref.neural import trak as _warm

    _warm(net, "cross_entropy", split.X_train[:20], split.y_train[:20], split.X_test[:2],
          split.y_test[:2], proj_dim=P)

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for name, fn in methods.items():
        # Timed calls alone (median of --repeats), then one call under the memory
        # probe. tracemalloc and the 1 kHz RSS sampler slow Python-heavy code (torch.func,
        # the peers' loops) several-fold on 2 cores, so a time taken under them measures
        # the probe, not the method (iif_ref.bench.peak_memory says so).
        try:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            t = float(np.median(times))
            start = time.perf_counter()
            mem = peak_memory(fn)
            t_probe = time.perf_counter() - start
        except Exception as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name:36s} skipped: {skipped[name]}")
            continue
        peak = mem.rss_peak_delta if mem.rss_peak_delta is not None else mem.maxrss_increase
        rows.append({"method": name, "seconds": t, "seconds_each": times,
                     "peak_rss_increase_bytes": int(peak),
                     "tracemalloc_peak_bytes": int(mem.tracemalloc_peak),
                     "seconds_under_memory_probe": t_probe})
        print(f"{name:36s} {t:8.2f} s (median of {', '.join(f'{x:.2f}' for x in times)})"
              f"   peak +{peak / 2**20:8.1f} MiB ({t_probe:.2f} s under the memory probe)")

    by = {r["method"]: r["seconds"] for r in rows}
    ratios = {}
    ref = by.get("traker TRAK (BasicProjector)")
    if ref:
        for name in ("iif_ref TRAK", "iif_ref IIF (K=5, joint)"):
            if name in by:
                ratios[f"{name} / traker TRAK"] = by[name] / ref
    if "dattri TRAK" in by and "iif_ref TRAK" in by:
        ratios["iif_ref TRAK / dattri TRAK"] = by["iif_ref TRAK"] / by["dattri TRAK"]
    ours_if = f"iif_ref IF (projected Fisher, {N_IF_TEST} test points)"
    their_if = f"dattri IF (CG, 10 iterations, {N_IF_TEST} test points)"
    if ours_if in by and their_if in by:
        ratios[f"iif_ref IF / dattri IF (CG), {N_IF_TEST} test points"] = (by[ours_if]
                                                                          / by[their_if])
    for k, v in ratios.items():
        print(f"ratio {k:45s} {v:6.2f}")
    meta = {"problem": {"n_train": n_train, "n_test": n_test, "proj_dim": P,
                        "architecture": "64-128-64-10 ReLU", "dtype": "float32",
                        "threads": 2, "test_accuracy": acc, "chunk_size": chunk,
                        "timed_calls_per_method": args.repeats, "statistic": "median"},
            "ratios": ratios, "skipped": skipped,
            # The machine is shared: the 1-, 5-, 15-minute load averages around the run.
            "load_average": {"start": load_start,
                             "end": os.getloadavg() if load_start is not None else None},
            "targets": {"iif_ref TRAK / traker TRAK": 0.5,
                        "iif_ref IIF (K=5, joint) / traker TRAK": 1.5}}
    if args.previous:
        import json

        with open(args.previous) as fh:
            prev = json.load(fh)
        meta["previous_run"] = {
            "label": args.previous_label,
            "seconds": {r["method"]: r["seconds"] for r in prev["rows"]},
            "ratios": prev["meta"]["ratios"],
            "load_average": prev["meta"].get("load_average")}
    if not args.quick or args.out != str(DEFAULT_OUT):
        write_results(args.out, rows, meta)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
