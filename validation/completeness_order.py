"""Completeness of Integrated Influence by measurement: the residual falls as 1/K.

``python validation/completeness_order.py [--out DIR]`` prints, for K = 1, 2, 4, 8, 16, the
completeness residual ``Σ_i I[t, i] − path_delta_t`` of every test point, its fitted
log–log slope against K, and writes ``completeness_order.json`` (and
``completeness_order.png`` when matplotlib is installed) into ``docs/results/``.

What is held exact, so that only the Euler sum of Eq. (10) is left:

* path models θ_k = θ(Γ(t_k)) refitted to convergence (``path_models="refit"``, Eq. 2),
  from θ_K = θ*, itself fitted to a gradient of ~1e-8;
* the exact Hessian of the summed training loss (``curvature="hessian"``,
  ``proj_dim=None``, ``damping=0``), float64;
* the unmasked path (``mask_path=False``), from the Eq. (13) baseline of the default
  unlearning (Eq. 12).

The integrand ``d L_test(θ(Γ(t)))/dt`` is smooth, so the right-endpoint Euler sum has
error ``c/K + O(1/K²)``: slope −1 on a log–log plot (first order).

Problem. A 3→4→2 tanh MLP (26 parameters) in float64, MSE, 80 training samples whose
targets are the outputs of the initial network plus N(0, 0.01²) noise, 4 test points
drawn the same way. θ* is the L-BFGS fit started at the generating network: small noise
and 160 residuals for 26 parameters keep θ* an isolated minimum with a positive-definite
Hessian (smallest eigenvalue ≈ 3e-3, largest ≈ 285), so every refit stays in its basin.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from iif_ref.bench import write_results
from iif_ref.neural import integrated_influence

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
KS = (1, 2, 4, 8, 16)


def make_problem(seed=0, *, n_train=80, n_test=4, noise=0.01, hidden=4):
    """The 3→hidden→2 tanh MLP fitted to convergence, and its data (float64)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(),
                              torch.nn.Linear(hidden, 2)).double()
    X = rng.standard_normal((n_train, 3))
    X_test = rng.standard_normal((n_test, 3))
    with torch.no_grad():
        y = net(torch.as_tensor(X)).numpy() + noise * rng.standard_normal((n_train, 2))
        y_test = net(torch.as_tensor(X_test)).numpy() + noise * rng.standard_normal((n_test, 2))
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    opt = torch.optim.LBFGS(net.parameters(), max_iter=500, history_size=50,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=0.0)

    def closure():
        opt.zero_grad()
        loss = ((net(Xt) - yt) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    closure()
    grad = max(float(p.grad.abs().max()) for p in net.parameters())
    return net, X, y, X_test, y_test, grad


def exact_path_options():
    """The options that leave only the Euler error in the residual."""
    return dict(path_models="refit", quadrature="euler", mask_path=False,
                curvature="hessian", proj_dim=None, damping=0.0, progress=False)


def slope(Ks, residuals):
    """Least-squares slope of log|residual| against log K, per test point."""
    logs = np.log(np.abs(np.asarray(residuals)))
    return np.polyfit(np.log(np.asarray(Ks, dtype=float)), logs, 1)[0]


def measure(Ks=KS, seed=0):
    net, X, y, X_test, y_test, grad = make_problem(seed)
    rows = []
    for K in Ks:
        r = integrated_influence(net, "mse", X, y, X_test, y_test, K=K,
                                 **exact_path_options())
        rows.append({"K": int(K), "residual": r.residual.tolist(),
                     "path_delta": r.path_delta.tolist(), "delta": r.delta.tolist(),
                     "max_condition": float(max(r.diagnostics["condition"]))})
    slopes = slope(Ks, [row["residual"] for row in rows])
    return rows, slopes, grad


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    Ks = np.array([row["K"] for row in rows])
    R = np.abs(np.array([row["residual"] for row in rows]))
    D = np.abs(np.array(rows[-1]["path_delta"]))
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for t in range(R.shape[1]):
        ax.loglog(Ks, R[:, t] / D[t], "o-", label=f"test point {t}")
    ax.loglog(Ks, R[0].max() / D.min() / Ks, "k--", lw=0.8, label="slope −1")
    ax.set_xlabel("K (path steps)")
    ax.set_ylabel("|Σ_i I − path Δ| / |path Δ|")
    ax.set_title("Completeness residual, exact path and Hessian")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default docs/results)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out is not None else DEFAULT_OUT
    rows, slopes, grad = measure(seed=args.seed)
    print(f"θ* gradient (max abs): {grad:.2e}")
    print("   K  " + "  ".join(f"|res_{t}|/|pathΔ_{t}|" for t in range(len(slopes))))
    for row in rows:
        rel = np.abs(row["residual"]) / np.abs(row["path_delta"])
        print(f"{row['K']:4d}  " + "  ".join(f"{v:16.3e}" for v in rel))
    print("log-log slope per test point: " + ", ".join(f"{s:.4f}" for s in slopes))
    meta = {"reproduction": "completeness_order", "seed": args.seed, "Ks": list(KS),
            "slopes": [float(s) for s in slopes], "theta_star_grad_max": grad,
            "options": exact_path_options(),
            "problem": "3-4-2 tanh MLP (26 params), MSE, n_train=80, n_test=4, noise 0.01",
            "argv": list(argv) if argv is not None else sys.argv[1:]}
    write_results(out / "completeness_order.json", rows, meta)
    png = plot(rows, out / "completeness_order.png")
    print(f"wrote {out / 'completeness_order.json'}" + (f" and {png.name}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
