"""Structured projections against the dense one: IIF's speed and its LDS.

Issue 21, item 2. For ``kind`` = ``"rademacher"`` (dense, the reference), ``"kronecker"``
(Kronecker-factored per Linear layer) and ``"countsketch"`` (one nonzero per parameter),
all from the Philox streams of docs/rng.md (docs/kernels.md, "Structured projections"):

1. *Speed*: wall time of ``integrated_influence`` (K = 5, defaults otherwise) on the
   digits-width MLP of ``validation/bench_neural.py`` (64-128-64-10, 17,226 parameters)
   with synthetic inputs of ``n_train`` rows (``--sizes``, default 1,000 and 10,000) and
   100 test points, and of one path step's featurisation alone (``train_features``: the
   per-sample gradients and their projection, the part the projection changes), at
   ``P = 512`` for every kind, and for the structured kinds also at larger ``P``
   (``--match-dims``) at the size ``--match-size``: the largest of those whose time is at
   most dense's at ``P = 512`` is "the P that matches dense's time".
2. *LDS*: on the Table 2 quick ground truth (digits, 500 training and 20 test points, 100
   retrained half-subsets) or, with ``--full-ground-truth``, on the full one (1,297
   training and 500 test points, 1,000 subsets), built and cached by ``iif-ref reproduce
   table2`` (``--cache-dir`` as there), dense at
   ``P = 512`` and each structured kind at ``P = 512`` and at every ``--match-dims``
   (so the LDS at the matched ``P`` is among them), with Table 2's damping procedure (the
   relative damping chosen on the tuning subsets from the same grid, LDS on the
   evaluation subsets; also the LDS at the default damping).

``--parts speed`` or ``--parts lds`` reruns one part and keeps the other part's rows from
the results file (the decision is taken again from both).

Writes ``docs/results/structured_projections.json`` (``--out``) with the machine and its
load. The decision rule of the issue (docs/kernels.md): a structured kind becomes the
default if it is within 0.01 LDS of dense and at least 2x faster at 60,000 samples.

Run: ``python validation/bench_structured_projections.py [--sizes 1000 10000 60000]``
(about 10 minutes on 2 quiet cores without 60,000; the ground truth, when not cached,
adds a few minutes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from iif_ref.reproduce import _neural_protocol as proto, table2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_neural  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "results" / "structured_projections.json"
DENSE, KINDS = "rademacher", ("rademacher", "kronecker", "countsketch")
P_DEFAULT = 512


def log(msg):
    print(f"[structured] {msg}", file=sys.stderr, flush=True)


def _iif_seconds(net, data, kind, proj_dim, repeats):
    from iif_ref.neural import integrated_influence

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        integrated_influence(net, "cross_entropy", *data, kind=kind, proj_dim=proj_dim,
                             progress=False)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def _features_seconds(net, X, y, kind, proj_dim, repeats):
    """One path step's featurisation (``Phi``, ``Psi`` of every training row), the part of
    IIF that the projection changes; the projector is built once, as IIF does."""
    from iif_ref.neural.features import make_projector, train_features
    from iif_ref.neural.functional import FunctionalModel

    fm = FunctionalModel(net)
    projector = make_projector(fm, proj_dim, seed=0, kind=kind, backend=None)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        train_features(fm, "cross_entropy", None, X, y, y, proj_dim=proj_dim, kind=kind,
                       projector=projector)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def speed(args):
    """Rows ``{what, kind, P, n_train, seconds}`` and the matched ``P`` of each structured
    kind; ``what`` is ``"iif"`` (end to end) or ``"features"`` (one step's features)."""
    net, split, _ = bench_neural._model_and_data(1000, 100)
    test = (split.X_test, split.y_test)
    from iif_ref.neural import integrated_influence
    for kind in KINDS:   # one-off costs (numba compile, torch.func imports) of the process
        integrated_influence(net, "cross_entropy", split.X_train[:20], split.y_train[:20],
                             *(t[:2] for t in test), kind=kind, K=1, progress=False)
    rows = []

    def measure(n, kind, P):
        X, y = bench_neural._synthetic(n, seed=n)
        out = None
        for what in ("features",) + (() if args.features_only else ("iif",)):
            if what == "features":
                seconds, each = _features_seconds(net, X, y, kind, P, args.repeats)
            else:
                seconds, each = _iif_seconds(net, (X, y) + test, kind, P, args.repeats)
            rows.append({"part": "speed", "what": what, "n_train": n, "kind": kind,
                         "proj_dim": P, "seconds": seconds, "seconds_each": each})
            log(f"n_train={n:6d} {what:8s} {kind:12s} P={P:5d}: {seconds:7.2f} s")
            out = seconds
        return out      # the end-to-end time when measured, else the features' time

    for n in args.sizes:
        for kind in KINDS:
            measure(n, kind, P_DEFAULT)
    what = "features" if args.features_only else "iif"
    dense = next(r["seconds"] for r in rows if r["n_train"] == args.match_size
                 and r["kind"] == DENSE and r["what"] == what)
    matched = {DENSE: P_DEFAULT}
    for kind in KINDS[1:]:
        matched[kind] = P_DEFAULT
        for P in args.match_dims:
            if measure(args.match_size, kind, P) <= dense:
                matched[kind] = max(matched[kind], P)
    return rows, matched


def _iif_runner(model, data, seed, K, kind, proj_dim):
    """``run(r)`` of Table 2's damping procedure for IIF with this projection: the
    absolute damping is ``r`` times the scale learnt from the run at "auto" (as
    ``table2.run_methods``' ``auto_scaled``)."""
    from iif_ref import attribute

    state = {}
    options = dict(method="iif", seed=seed, K=K, kind=kind, proj_dim=proj_dim, progress=False)

    def run(r):
        if "scale" not in state:
            res = attribute(model, "cross_entropy", *data, damping="auto", **options)
            state["default"] = res
            state["scale"] = float(res.config["damping_used"][0]) / \
                res.config["damping_relative"]
            if np.isclose(r, res.config["damping_relative"]):
                return res.scores, r * state["scale"], res
        res = attribute(model, "cross_entropy", *data, damping=r * state["scale"], **options)
        return res.scores, r * state["scale"], res
    return run, state


def lds(args):
    table2_argv = ["--workers", str(args.workers)] + (["--full"] if args.full_ground_truth
                                                       else [])
    if args.dataset is not None:
        table2_argv += ["--dataset", args.dataset]
    if args.cache_dir is not None:
        table2_argv += ["--cache-dir", str(args.cache_dir)]
    gt_args = table2.parse_args(table2_argv)
    truth = table2.ground_truth(gt_args)
    masks, losses = truth.masks, truth.gt.losses
    tune, evaluate = proto.split_subsets(gt_args.n_subsets, seed=gt_args.seed + 4)
    rows = []
    configs = [(kind, P_DEFAULT) for kind in KINDS]
    configs += [(kind, P) for kind in KINDS[1:] for P in args.match_dims]
    if args.lds_configs:
        configs = [(DENSE, P_DEFAULT)] + [c for c in args.lds_configs
                                          if c != (DENSE, P_DEFAULT)]
    for kind, P in configs:
        t0 = time.perf_counter()
        run, state = _iif_runner(truth.model, truth.data, gt_args.seed, gt_args.K, kind, P)
        choice = proto.choose_damping(run, masks, losses, tune, grid=gt_args.grid)
        per_test = proto.lds_on(choice.scores, masks, losses, evaluate)
        row = {"part": "lds", "kind": kind, "proj_dim": P, "lds": proto.mean_se(per_test),
               "lds_per_test": [float(v) for v in per_test],
               "lds_default_damping": proto.mean_se(proto.lds_on(
                   state["default"].scores, masks, losses, evaluate)),
               "relative_damping": choice.relative, "tune_lds": choice.tune_lds,
               "seconds_chosen_run": choice.seconds, "seconds_total": time.perf_counter() - t0}
        rows.append(row)
        if rows[0]["kind"] == DENSE and row is not rows[0]:
            # Paired over the same test points: the spread of the gap, not of each LDS.
            row["gap_to_dense_paired"] = proto.mean_se(
                np.asarray(rows[0]["lds_per_test"]) - np.asarray(row["lds_per_test"]))
        log(f"LDS {kind:12s} P={P:5d}: {proto.fmt(row['lds'])} "
            f"(default damping {proto.fmt(row['lds_default_damping'])})"
            + (f", dense minus this {proto.fmt(row['gap_to_dense_paired'])}"
               if "gap_to_dense_paired" in row else ""))
    return rows, {"n_train": len(truth.split.X_train), "n_test": len(truth.split.X_test),
                  "n_subsets": gt_args.n_subsets, "n_eval": int(len(evaluate)),
                  "grid": list(gt_args.grid), "K": gt_args.K, "data": truth.split.source}


def decision(speed_rows, lds_rows, matched):
    """The issue's rule per structured kind (needs both parts), for one configuration, the
    kind at ``P = 512``: within 0.01 LDS of dense (paired over the test points) and at
    least 2x faster end to end at 60,000 samples. The LDS at the matched ``P`` is reported
    beside it (at that ``P`` the kind is by construction no faster than dense)."""
    out = {}
    largest = max(r["n_train"] for r in speed_rows)
    what = "iif" if any(r["what"] == "iif" for r in speed_rows) else "features"

    def seconds(kind, P, n):
        return next((r["seconds"] for r in speed_rows if r["n_train"] == n and r["kind"] == kind
                     and r["proj_dim"] == P and r["what"] == what), None)

    def gap(kind, P):
        row = next((r for r in lds_rows if r["kind"] == kind and r["proj_dim"] == P), None)
        return None if row is None else row.get("gap_to_dense_paired")

    dense_t = seconds(DENSE, P_DEFAULT, largest)
    for kind in KINDS[1:]:
        g, t = gap(kind, P_DEFAULT), seconds(kind, P_DEFAULT, largest)
        speedup = None if t is None else dense_t / t
        within = g is not None and g["mean"] <= 0.01
        P_m = (matched or {}).get(kind)
        out[kind] = {"lds_gap_to_dense_at_512": g, "within_0.01": bool(within),
                     f"speedup_at_{largest}_of_{what}": speedup,
                     "matched_proj_dim": P_m,
                     "lds_gap_to_dense_at_matched": gap(kind, P_m) if P_m else None,
                     "becomes_default": bool(within and speedup is not None and speedup >= 2
                                             and largest >= 60000 and what == "iif")}
    return out


def _part_meta(payload, part):
    """The meta of ``part`` in a results file written by this script."""
    meta = payload.get("meta", {})
    return meta.get("runs", {}).get(part) or {k: v for k, v in meta.items()
                                              if k not in ("runs", "decision")}


def combine(out, new_rows, new_meta, parts):
    """Rows and meta of this run's ``parts`` plus, from the file ``out`` if it exists, the
    other part's (so ``--parts lds`` reruns the LDS and keeps the stored speed rows)."""
    import json

    rows, runs = list(new_rows), {part: new_meta for part in parts}
    if Path(out).is_file():
        old = json.loads(Path(out).read_text())
        for part in ("speed", "lds"):
            if part not in parts and any(r.get("part") == part for r in old["rows"]):
                rows += [r for r in old["rows"] if r.get("part") == part]
                runs[part] = _part_meta(old, part)
    speed_rows = [r for r in rows if r["part"] == "speed"]
    lds_rows = [r for r in rows if r["part"] == "lds"]
    matched = runs.get("speed", {}).get("matched_proj_dim")
    meta = {"runs": runs, "decision": decision(speed_rows, lds_rows, matched)
            if speed_rows and lds_rows else None}
    return rows, meta


def _kind_and_dim(text):
    kind, _, P = text.partition(":")
    if kind not in KINDS or not P.isdigit():
        raise argparse.ArgumentTypeError(f"expected KIND:P with KIND in {KINDS}, got {text!r}")
    return kind, int(P)


def main(argv=None):
    from iif_ref.bench import write_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--match-size", type=int, default=10000,
                   help="n_train at which the P matching dense's time is searched")
    p.add_argument("--match-dims", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--features-only", action="store_true",
                   help="time one step's featurisation only, not IIF end to end (the "
                        "matched P is then matched on the featurisation time)")
    p.add_argument("--workers", type=int, default=2, help="retraining processes")
    p.add_argument("--full-ground-truth", action="store_true",
                   help="LDS on Table 2's full ground truth (--full) instead of the quick one")
    p.add_argument("--cache-dir", type=Path, help="ground-truth cache (as table2's)")
    p.add_argument("--dataset", choices=["digits", "mnist"],
                   help="data set of the ground truth (as table2's --dataset)")
    p.add_argument("--lds-configs", nargs="+", type=_kind_and_dim, metavar="KIND:P",
                   help="only these projections in the LDS part (dense at P = 512, the "
                        "reference, is always run first)")
    p.add_argument("--parts", nargs="+", choices=["speed", "lds"], default=["speed", "lds"])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.match_size not in args.sizes:
        p.error("--match-size must be one of --sizes")
    load_before = list(os.getloadavg())
    speed_rows, matched = speed(args) if "speed" in args.parts else ([], None)
    lds_rows, lds_meta = lds(args) if "lds" in args.parts else ([], None)
    meta = {"command": " ".join([sys.executable] + sys.argv), "parts": args.parts,
            "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
            "model": "digits-width MLP 64-128-64-10 (validation/bench_neural.py), "
                     "synthetic inputs for speed; Table 2's MLP for LDS",
            "method": "integrated_influence K=5, defaults but kind and proj_dim",
            "features_only": args.features_only,
            "matched_proj_dim": matched, "lds_ground_truth": lds_meta}
    rows, meta = combine(args.out, speed_rows + lds_rows, meta, args.parts)
    path = write_results(args.out, rows, meta)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
