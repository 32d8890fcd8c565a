"""Convergence of the t-integral (Eq. 9) under each quadrature rule, on the digits MLP.

``python validation/quadrature_convergence.py [--quick] [--out DIR]`` runs IIF at its
defaults on a 64-128-64-10 ReLU MLP written as an ``nn.Module`` subclass (scikit-learn
digits, 1,000 training and 100 test points, the Table 5 training settings), once per rule
of :mod:`iif_ref.neural.quadrature` at ``K`` and at ``4K`` nodes, and reports per rule

* the median over test points of ``|ΣI(K) − ΣI(4K)| / |ΣI(4K)|`` (target ≤ 5% at the
  default), and of the rule's own error estimate ``quadrature_error(K)`` over the same
  ``|ΣI(4K)|``;
* the same for the default rule and Euler (``--static-rules``) on a static path (``path_lr`` 1e-8: every
  path model within rounding of θ*), where only the quadrature differs between ``K`` and
  ``4K`` (at the defaults each node adds one Eq. 16 step, so ``4K`` nodes also move the
  path models further);
* the wall time of each run, and the ratio of the default rule's time to Euler's at the
  same ``K`` (same process, alternating, median of ``--repeats`` runs);
* the integrand along t: ``Σ_i`` of each node's term divided by its weight, at the
  finest Radau grid, beside the masked path's weights ``ρ_{y_i}(t) = t + (1 − t) p'_{y_i}``
  (appendix E), whose spread shows where the integrand is large.

Writes ``quadrature_convergence.json`` to ``docs/results/`` (or ``--out``). ``--quick``
uses 300 training and 30 test points and 10 training epochs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from iif_ref.bench import write_results
from iif_ref.datasets import load_digits_split
from iif_ref.models import TrainConfig, train
from iif_ref.neural import integrated_influence
from iif_ref.neural.quadrature import DEFAULT_RULE, RULES

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
#: η of the static-path runs: path models within ~1e-8 of θ*, the same at K and 4K.
STATIC_PATH_LR = 1e-8


class DigitsMLP(torch.nn.Module):
    """64-128-64-10 ReLU MLP as a Module subclass (the general, non-Sequential path)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)
        self.fc3 = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_problem(*, n_train, n_test, epochs, seed=0):
    """The trained MLP and its digits split."""
    data = load_digits_split(n_train, n_test, seed=seed)
    torch.manual_seed(seed)
    net = DigitsMLP()
    train(net, data.X_train, data.y_train, config=TrainConfig(epochs=epochs), seed=seed)
    return net, data


def relative(a, ref):
    return np.abs(a - ref) / np.abs(ref)


def run(net, data, **options):
    t0 = time.perf_counter()
    r = integrated_influence(net, "cross_entropy", data.X_train, data.y_train,
                             data.X_test, data.y_test, progress=False, **options)
    return r, time.perf_counter() - t0


def measure(net, data, *, K, rules, **options):
    """Per rule: ΣI at K and 4K nodes, their relative change and the error estimate."""
    rows, results = [], {}
    for rule in rules:
        coarse, t_coarse = run(net, data, K=K, quadrature=rule, **options)
        fine, t_fine = run(net, data, K=4 * K, quadrature=rule, **options)
        results[rule] = (coarse, fine)
        s_c, s_f = coarse.scores.sum(1), fine.scores.sum(1)
        moved = coarse.delta_path != 0
        rows.append({
            "quadrature": rule, "K": K, "options": options,
            "median_rel_change_to_4K": float(np.median(relative(s_c, s_f))),
            "p90_rel_change_to_4K": float(np.quantile(relative(s_c, s_f), 0.9)),
            "median_rel_error_estimate": float(np.median(coarse.quadrature_error
                                                         / np.abs(s_f))),
            "median_abs_sum_I": float(np.median(np.abs(s_c))),
            "median_abs_sum_I_4K": float(np.median(np.abs(s_f))),
            "median_abs_delta": float(np.median(np.abs(coarse.delta))),
            "median_abs_delta_path": float(np.median(np.abs(coarse.delta_path))),
            "median_abs_delta_path_4K": float(np.median(np.abs(fine.delta_path))),
            # Over the test points whose path moved their loss at all.
            "median_abs_residual_over_delta_path": float(np.median(
                np.abs(coarse.residual[moved]) / np.abs(coarse.delta_path[moved]))),
            "n_delta_path_zero": int((~moved).sum()),
            "nodes": coarse.diagnostics["nodes"],
            "seconds_K": t_coarse, "seconds_4K": t_fine})
        print(f"{rule:9s} K={K} {options}: median |ΣI(K) − ΣI(4K)|/|ΣI(4K)| = "
              f"{rows[-1]['median_rel_change_to_4K']:.3f}, estimate "
              f"{rows[-1]['median_rel_error_estimate']:.3f}  ({t_coarse:.1f} s, "
              f"{t_fine:.1f} s)", flush=True)
    return rows, results


def timing(net, data, *, K, repeats):
    """Median wall time of the default rule and of Euler at ``K``, alternating."""
    times = {DEFAULT_RULE: [], "euler": []}
    for _ in range(repeats):
        for rule in times:
            times[rule].append(run(net, data, K=K, quadrature=rule)[1])
    out = {f"seconds_{rule}": float(np.median(v)) for rule, v in times.items()}
    out["ratio_default_over_euler"] = out[f"seconds_{DEFAULT_RULE}"] / out["seconds_euler"]
    return out


def integrand(result):
    """Nodes and ``Σ_i`` of each node's term over its weight: the integrand of Eq. (9)
    per test point, shape ``(K, n_test)``."""
    nodes = np.asarray(result.diagnostics["nodes"])
    weights = np.asarray(result.diagnostics["weights"])
    sums = {e["k"]: e["sum"] for e in result.diagnostics["node_sums"]}
    return nodes, np.stack([sums[k] / weights[k - 1] for k in range(1, len(nodes) + 1)])


def path_start_weights(net, data):
    """``p'_{y_i}`` of the default baseline θ': the masked path's start weight
    ``ρ_{y_i}(0)`` per training sample (appendix E)."""
    from iif_ref.neural import plan_path
    plan = plan_path(net, "cross_entropy", data.X_train, data.y_train, data.X_test,
                     data.y_test, progress=False)
    Ybar = plan.groups[0].Ybar.double().numpy()
    return Ybar[np.arange(len(data.y_train)), data.y_train]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default docs/results)")
    parser.add_argument("--quick", action="store_true",
                        help="300 training / 30 test points, 10 epochs")
    parser.add_argument("--K", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--path-models", default=None,
                        help="path_models of every run (default: the package default)")
    parser.add_argument("--static-rules", default=f"{DEFAULT_RULE},euler",
                        help="comma-separated rules to measure on the static path")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out is not None else DEFAULT_OUT
    sizes = (dict(n_train=300, n_test=30, epochs=10) if args.quick
             else dict(n_train=1000, n_test=100, epochs=50))
    net, data = make_problem(**sizes)
    # At the defaults: the path models ("step", Eq. 16) change with the nodes, so the
    # 4K run integrates along a different path; with a static path (θ_t ≈ θ*, a
    # vanishing path_lr) only the quadrature differs between K and 4K.
    chosen = {} if args.path_models is None else {"path_models": args.path_models}
    rows, results = measure(net, data, K=args.K, rules=RULES, **chosen)
    static, _ = measure(net, data, K=args.K, rules=args.static_rules.split(","),
                        path_lr=STATIC_PATH_LR, path_time=STATIC_PATH_LR, **chosen)
    rows += static
    times = timing(net, data, K=args.K, repeats=args.repeats)
    fine = results[DEFAULT_RULE][1]
    nodes, f = integrand(fine)
    p_start = path_start_weights(net, data)
    q = [0.0, 0.01, 0.1, 0.5, 0.9]
    start_quantiles = dict(zip(map(str, q), map(float, np.quantile(p_start, q))))
    profile = [{"t": float(t), "median_abs_integrand": float(np.median(np.abs(fk))),
                "median_masked_weight": float(np.median(t + (1 - t) * p_start)),
                "min_masked_weight": float(np.min(t + (1 - t) * p_start))}
               for t, fk in zip(nodes, f)]
    print("t        median|integrand|  median ρ_y(t)  min ρ_y(t)")
    for p in profile:
        print(f"{p['t']:.5f}  {p['median_abs_integrand']:16.4g}  "
              f"{p['median_masked_weight']:13.4f}  {p['min_masked_weight']:.4f}")
    print(f"p'_y quantiles {start_quantiles}")
    print(f"time {DEFAULT_RULE} / euler at K={args.K}: "
          f"{times['ratio_default_over_euler']:.3f}")
    meta = {"reproduction": "quadrature_convergence", "quick": args.quick, "K": args.K,
            "default_rule": DEFAULT_RULE, "sizes": sizes, "timing": times,
            "static_path_lr": STATIC_PATH_LR,
            "integrand_profile": profile, "start_weight_quantiles": start_quantiles,
            "problem": "digits 64-128-64-10 ReLU MLP (nn.Module subclass), IIF defaults",
            "argv": list(argv) if argv is not None else sys.argv[1:]}
    name = "quadrature_convergence_quick.json" if args.quick else \
        "quadrature_convergence.json"
    write_results(out / name, rows, meta)
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
