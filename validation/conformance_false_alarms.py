"""False-alarm rate of every conformance check on exact answers.

Runs :func:`iif_ref.testing.check_attributor` on attributors that are correct by
construction — the closed forms of :mod:`iif_ref.linear` (IF, TracIn, IIF) and the torch
attributors of :mod:`iif_ref.testing.own` in float64 with exact curvature — over
generated least-squares problems that span :func:`iif_ref.testing.make_problem`'s range:
sizes, κ(X) up to 10⁶ (κ(H) up to 10¹²), leverage of sample 0 up to 1 − 10⁻⁴, training
and test noise from 0 to 3, λ from just above the largest test leverage to 100 times it,
K and the TracIn checkpoints. Every check must pass or be skipped with its reason; the
number that fail is the false-alarm count, and the target is 0. The torch IIF solves
Eq. (12) and its path refits by Newton's method (one exact step on these quadratics),
so it is held to the same rounding tolerance as the closed forms, with no declared
``rtol``; it runs on the first ``--n-neural-iif`` problems (about 0.7 s each).

Writes ``docs/results/conformance_false_alarms.json``: one row per (attributor, check)
with the number of problems, how many the check applied to, how many failed, the largest
error/tolerance ratio seen (the margin left), the skip reasons, and, for any failure, the
problem's parameters so it can be rebuilt with ``make_problem``.

Every finished problem is appended to a journal next to the output
(``<out>.journal.jsonl``), so an interrupted sweep resumes where it stopped when rerun
with the same arguments; the journal is keyed by a digest of the package's and this
script's sources, so a changed tolerance or attributor starts afresh.

Usage::

    python validation/conformance_false_alarms.py [--n-problems 10000]
        [--n-neural 10000] [--n-neural-iif 10000] [--jobs 2] [--out PATH]

One BLAS thread per worker: these problems are tiny, and threaded BLAS on a shared
2-core machine is tens of times slower than one thread.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "results" / "conformance_false_alarms.json"
#: First entry of every problem's seed sequence (problem ``j`` uses ``[SWEEP_SEED, j]``).
SWEEP_SEED = 20261203
#: The generator's range swept here (documented in the JSON).
RANGES = {
    "d": [1, 8],
    "n_train": "log-uniform integer in [d + 2, 80]",
    "n_test": [1, 6],
    "condition_number": "kappa(X) = 10^U(0, 6) (1 when d = 1); kappa(H) = kappa(X)^2",
    "leverage": "half the problems uncontrolled; half 1 - 10^U(log10(1 - d/n), -4)",
    "noise": "0 with probability 0.03, else 10^U(-4, 0.5)",
    "test_noise": "0 with probability 0.03, else 10^U(-4, 0.5)",
    "lam": "max test leverage x 10^U(log10 1.01, 2), at least 1e-3",
    "K": [1, 8],
    "n_checkpoints": [1, 5],
}


def draw_params(j):
    """Parameters of problem ``j`` (a dict of :func:`make_problem` arguments)."""
    from iif_ref.testing.problems import make_problem, max_test_leverage

    rng = np.random.default_rng([SWEEP_SEED, j])
    d = int(rng.integers(1, 9))
    lo = d + 2
    n = int(round(math.exp(rng.uniform(math.log(lo), math.log(80)))))
    n = max(lo, n)
    params = {
        "n_train": n, "d": d, "n_test": int(rng.integers(1, 7)),
        "condition_number": 1.0 if d == 1 else float(10.0 ** rng.uniform(0.0, 6.0)),
        "leverage": None,
        "noise": 0.0 if rng.random() < 0.03 else float(10.0 ** rng.uniform(-4.0, 0.5)),
        "test_noise": 0.0 if rng.random() < 0.03 else float(10.0 ** rng.uniform(-4.0, 0.5)),
        "K": int(rng.integers(1, 9)), "n_checkpoints": int(rng.integers(1, 6)),
        "seed": int(rng.integers(0, 2 ** 31)),
    }
    if rng.random() < 0.5:
        lo_gap = math.log10(1.0 - d / n)
        params["leverage"] = float(1.0 - 10.0 ** rng.uniform(-4.0, lo_gap))
        params["leverage"] = max(params["leverage"], d / n)
    factor = float(10.0 ** rng.uniform(math.log10(1.01), 2.0))
    probe = make_problem(lam=1e300, name=f"sweep{j}", **params)
    params["lam"] = max(factor * max_test_leverage(probe), 1e-3)
    return params


def make(j):
    """Problem ``j`` of the sweep and its parameters."""
    from iif_ref.testing.problems import make_problem

    params = draw_params(j)
    return make_problem(name=f"sweep{j}", **params), params


def attributors(p, which):
    """The correct attributors run on problem ``p`` (``which``: names to include)."""
    from iif_ref.testing import Attributor
    from iif_ref.testing.own import (
        linear_if,
        linear_iif,
        linear_tracin,
        neural_if,
        neural_iif,
        neural_tracin,
    )
    out = []
    if "linear" in which:
        out += [Attributor(linear_if, kind="if", name="linear.influence_function"),
                Attributor(linear_tracin, kind="tracin", name="linear.tracin"),
                Attributor(linear_iif, kind="iif", name="linear.integrated_influence",
                           capabilities={"prediction_baseline", "exact_integral",
                                         "exact_path"})]
    if "neural" in which:
        out += [Attributor(neural_if, kind="if", name="attribute[if, exact]"),
                Attributor(neural_tracin, kind="tracin", name="attribute[tracin]")]
    if "neural_iif" in which:
        out.append(Attributor(neural_iif, kind="iif", name="attribute[iif, Newton]",
                              capabilities={"prediction_baseline", "exact_path"}))
    return out


def run_one(task):
    """Check every selected attributor on problem ``task[0]``; return compact results."""
    j, which = task
    import warnings

    from iif_ref.testing import check_attributor
    if "neural" in which or "neural_iif" in which:
        import torch
        torch.set_num_threads(1)
    p, params = make(j)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for att in attributors(p, which):
            report = check_attributor(att, problems=[p])
            for r in report.results:
                ratio = None
                if r.status in ("passed", "failed") and r.error is not None and r.tolerance:
                    ratio = abs(r.error) / r.tolerance
                out.append((att.name, r.check, r.status, ratio,
                            r.message if r.status == "skipped" else
                            (r.message if r.failed else None)))
    return j, params, out


def reason_key(message):
    """A skip message without its per-problem numbers and parenthesised details."""
    text, previous = message, None
    while text != previous:                      # innermost parentheses first
        previous, text = text, re.sub(r" ?\([^()]*\)", "", text)
    return re.sub(r"[-+]?\d[\d.e+-]*", "#", text)[:160]


def aggregate(results):
    """Rows per (attributor, check) from :func:`run_one` outputs."""
    rows = {}
    for j, params, out in results:
        for name, check, status, ratio, msg in out:
            row = rows.setdefault((name, check), {
                "attributor": name, "check": check, "n_problems": 0, "n_applicable": 0,
                "n_passed": 0, "n_failed": 0, "n_error": 0, "n_skipped": 0,
                "max_error_over_tolerance": None, "skip_reasons": Counter(),
                "failures": []})
            row["n_problems"] += 1
            row[f"n_{status}"] += 1
            if status != "skipped":
                row["n_applicable"] += 1
            else:
                row["skip_reasons"][reason_key(msg)] += 1
            if ratio is not None and status == "passed":
                m = row["max_error_over_tolerance"]
                row["max_error_over_tolerance"] = ratio if m is None else max(m, ratio)
            if status in ("failed", "error") and len(row["failures"]) < 20:
                row["failures"].append({"problem": j, "params": params, "message": msg})
    for row in rows.values():
        row["skip_reasons"] = dict(row["skip_reasons"].most_common())
    return list(rows.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-problems", type=int, default=10000,
                    help="problems for the iif_ref.linear attributors")
    ap.add_argument("--n-neural", type=int, default=10000,
                    help="problems (the first ones) for the torch IF and TracIn")
    ap.add_argument("--n-neural-iif", type=int, default=10000,
                    help="problems (the first ones) for the torch IIF (Newton refits)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("n_problems", "n_neural", "n_neural_iif", "jobs"):
        if getattr(args, name) < 0 or (name == "jobs" and args.jobs < 1):
            ap.error(f"--{name.replace('_', '-')} must be positive")

    n_all = max(args.n_problems, args.n_neural, args.n_neural_iif)
    tasks = []
    for j in range(n_all):
        which = tuple(w for w, n in (("linear", args.n_problems), ("neural", args.n_neural),
                                     ("neural_iif", args.n_neural_iif)) if j < n)
        tasks.append((j, which))
    # What the results were computed with: the checkout as the sweep starts.
    args.commit, args.sources_digest = _commit(), _sources_digest()
    journal = Journal(args.out.with_suffix(".journal.jsonl"), args.sources_digest)
    results, wall_before = journal.load(tasks)
    if results:
        print(f"resuming: {len(results)}/{len(tasks)} tasks already in {journal.path}",
              flush=True)
    done = {res[0] for res in results}
    which_of = dict(tasks)
    todo = [t for t in tasks if t[0] not in done]
    t0 = time.perf_counter()
    with get_context("spawn").Pool(args.jobs) as pool:
        for res in pool.imap_unordered(run_one, todo, chunksize=2):
            results.append(res)
            journal.append(res, which_of[res[0]], wall_before + time.perf_counter() - t0)
            k = len(results)
            if k % 500 == 0 and k < len(tasks):
                print(f"{k}/{len(tasks)} tasks, {time.perf_counter() - t0:.0f} s",
                      flush=True)
                _write(args, results, wall_before + time.perf_counter() - t0,
                       complete=False)
    wall = wall_before + time.perf_counter() - t0
    rows, total_failed = _write(args, results, wall, complete=True)
    journal.remove()
    print(f"{'attributor':<30} {'check':<18} {'problems':>8} {'applied':>8} {'failed':>6} "
          f"{'max err/tol':>11}")
    for r in rows:
        m = r["max_error_over_tolerance"]
        print(f"{r['attributor']:<30} {r['check']:<18} {r['n_problems']:>8} "
              f"{r['n_applicable']:>8} {r['n_failed'] + r['n_error']:>6} "
              f"{'-' if m is None else f'{m:.3g}':>11}")
    print(f"false alarms: {total_failed}; wall {wall:.1f} s with {args.jobs} job(s)")
    print(f"wrote {args.out}")
    return 1 if total_failed else 0


def _commit():
    """The checkout's commit (with "+changes" when the tree differs), or None."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "iif_ref",
                                "validation"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def _sources_digest():
    """SHA-256 of the package's and this script's sources: what decides the results."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "iif_ref").rglob("*.py")) + [Path(__file__).resolve()]:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:32]


class Journal:
    """Append-only record of finished problems, so an interrupted sweep resumes.

    One JSON line per problem after a header naming the sources' digest. A line cut
    short by an interruption is ignored, and a journal written by other sources (a
    changed tolerance, a changed attributor) is set aside rather than resumed.
    """

    def __init__(self, path, digest):
        self.path, self.digest = Path(path), digest

    def load(self, tasks):
        """Results already recorded for ``tasks`` (same problem, same attributors)
        and the wall time they took; starts a new journal when there is none."""
        wanted = {j: list(which) for j, which in tasks}
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        header = _parse(lines[0]) if lines else None
        if header is None or header.get("sources") != self.digest:
            if lines:
                stale = self.path.with_suffix(".stale")
                os.replace(self.path, stale)
                print(f"{self.path.name} was written by other sources; moved to "
                      f"{stale.name}", flush=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"sources": self.digest})
            return [], 0.0
        results, wall, seen = [], 0.0, set()
        for line in lines[1:]:
            rec = _parse(line)
            if rec is None or rec["j"] in seen or wanted.get(rec["j"]) != rec["which"]:
                continue
            seen.add(rec["j"])
            results.append((rec["j"], rec["params"], [tuple(o) for o in rec["out"]]))
            wall = max(wall, rec["wall"])
        return results, wall

    def append(self, res, which, wall):
        """Record one finished problem (flushed to disk before returning)."""
        j, params, out = res
        self._append({"j": j, "which": list(which), "params": params, "out": out,
                      "wall": round(wall, 1)})

    def _append(self, record):
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self):
        self.path.unlink(missing_ok=True)


def _parse(line):
    """One journal line as a dict, or None when it was cut short."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _write(args, results, wall, *, complete):
    """Aggregate ``results`` and write them to ``args.out`` (also while running)."""
    rows = sorted(aggregate(results), key=lambda r: (r["attributor"], r["check"]))
    total_failed = sum(r["n_failed"] + r["n_error"] for r in rows)
    from iif_ref.bench import write_results
    done = Counter(name for _, _, out in results for name in {o[0] for o in out})
    meta = {"command": "python validation/" + Path(__file__).name + " " + " ".join(
                args.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "complete": complete, "problems_done_by_attributor": dict(done),
            "sweep_seed": SWEEP_SEED, "ranges": RANGES,
            "n_problems": {"linear": args.n_problems, "neural": args.n_neural,
                           "neural_iif": args.n_neural_iif},
            "neural_iif_note": ("Newton refits (unlearn_optimizer and refit_optimizer "
                                "'newton'), full K; no declared rtol: the checks' "
                                "rounding tolerance"),
            "commit": args.commit, "sources_digest": args.sources_digest,
            "false_alarms": total_failed, "wall_seconds": round(wall, 1),
            "jobs": args.jobs}
    write_results(args.out, rows, meta)
    return rows, total_failed


if __name__ == "__main__":
    sys.exit(main())
