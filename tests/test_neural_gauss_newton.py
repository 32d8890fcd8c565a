"""The exact Gauss–Newton / empirical-Fisher oracle in sample space (iif_ref.neural.sample_space).

Reference tests build the ``n_params × n_params`` curvature explicitly from per-sample
Jacobians (torch.func.jacrev) and the closed-form output Hessians, independently of the
package's VJP code. Tolerances: both solves are backward stable, so they agree to a
small multiple of ``cond · eps``; each test checks that ``cond`` is small enough for the
stated bound.
"""
import ast
import graphlib
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from iif_ref import linear  # noqa: E402
from iif_ref.neural import engine, integrated_influence  # noqa: E402
from iif_ref.neural.attribution import attribute  # noqa: E402
from iif_ref.neural.plan import prepare_problem  # noqa: E402
from iif_ref.neural.sample_space import (MemoryBudgetError, build_solve,  # noqa: E402
                                         exact_influence)

EPS = np.finfo(np.float64).eps


def _mlp(n_in, hidden, n_out, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, n_out)).double()


def _data(loss, n_train, n_in, n_out, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_train + 4, n_in, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, n_out, (n_train + 4,), generator=g)
    else:
        y = torch.randn(n_train + 4, n_out, generator=g, dtype=torch.float64)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def _dense_oracle(net, loss, X, y, Xt, yt, kind):
    """C (Gauss–Newton or Fisher), U and G from explicit Jacobians, float64."""
    from torch.func import functional_call, jacrev, vmap

    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach() for n, p in net.named_parameters()}

    def f(p, x):
        return functional_call(net, p, (x[None],))[0]

    def rows(Xs, ys):
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, Xs)
        J = torch.cat([jac[n].reshape(len(Xs), jac[n].shape[1], -1) for n in names], 2)
        F = vmap(f, in_dims=(None, 0))(params, Xs)
        if loss == "cross_entropy":
            p = torch.softmax(F, 1)
            r = p - torch.nn.functional.one_hot(ys, F.shape[1]).double()
            S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        else:
            r = 2 * (F - ys)
            S = 2 * torch.eye(F.shape[1], dtype=torch.float64).expand(len(Xs), -1, -1)
        u = (J.transpose(1, 2) @ r[:, :, None])[:, :, 0]
        return J.numpy(), S.numpy(), u.detach().numpy()

    J, S, U = rows(X, y)
    _, _, G = rows(Xt, yt)
    if kind == "gauss_newton":
        C = np.einsum("nom,nop,npk->mk", J, S, J)
    else:
        C = U.T @ U
    return C, U, G


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("kind", ["gauss_newton", "fisher"])
@pytest.mark.parametrize("n_train", [12, 60])   # sample side (N < 67) and parameter side
def test_sample_space_influence_equals_dense_parameter_space_solve(loss, kind, n_train):
    net = _mlp(4, 8, 3, seed=1)                            # 67 parameters
    X, y, Xt, yt = _data(loss, n_train, 4, 3, seed=2)
    C, U, G = _dense_oracle(net, loss, X, y, Xt, yt, kind)
    ex = exact_influence(net, loss, X, y, Xt, yt, curvature=kind)
    rows = n_train * ({"gauss_newton": 2 if loss == "cross_entropy" else 3,
                       "fisher": 1}[kind])
    assert ex.side == ("sample" if rows < 67 else "parameter")
    assert ex.trace == pytest.approx(np.trace(C), rel=1e-12)
    lam = 1e-2 * np.trace(C) / len(C)
    F = C + lam * np.eye(len(C))
    cond = np.linalg.cond(F)
    assert cond < 1e4          # so the bound below, 100·cond·eps, is below 1e-10
    ref = -G @ np.linalg.solve(F, U.T)
    got, _, lam_used = ex.scores(lam)
    assert lam_used == lam
    assert _rel(got, ref) <= max(100 * cond * EPS, 1e-13) <= 1e-10


def test_bias_free_linear_mse_gauss_newton_equals_closed_form_influence():
    # More features than samples: the sample-space side (N = 25 < n_params = 40).
    rng = np.random.default_rng(0)
    X, Xt = rng.standard_normal((25, 40)), rng.standard_normal((3, 40))
    y, yt = rng.standard_normal(25), rng.standard_normal(3)
    ridge = 0.5
    theta = np.linalg.solve(X.T @ X + ridge * np.eye(40), X.T @ y)
    net = torch.nn.Linear(40, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.as_tensor(theta)[None])
    ex = exact_influence(net, "mse", X, y, Xt, yt)
    assert ex.side == "sample" and ex.form == "range"
    # GGN = Hessian = 2XᵀX for MSE without ½, so λ_d = 2·ridge gives H = 2(XᵀX + ridge I).
    got, cond, _ = ex.scores(2 * ridge)
    ref = linear.influence_function(X, y, Xt, yt, ridge=ridge)
    assert cond < 1e4
    assert _rel(got, ref) <= 1e-10


# P beyond n_params is the point here (the limit P → ∞), not a user mistake.
@pytest.mark.filterwarnings("ignore::iif_ref.errors.ProjectionDimensionWarning")
def test_projected_fisher_converges_to_exact_fisher_as_P_grows():
    # MSE: a cross-entropy Fisher is singular (Σ_c ∂l/∂b_c = 0 for the output bias).
    net = _mlp(3, 4, 2, seed=0)                            # 26 parameters
    X, y, Xt, yt = _data("mse", 60, 3, 2, seed=1)
    ex = exact_influence(net, "mse", X, y, Xt, yt, curvature="fisher")
    assert ex.side == "parameter"                          # 60 rows >= 26 parameters
    lam_min = np.linalg.eigvalsh(ex.gram)[0]
    assert lam_min > 1e-6 * ex.scale                       # the Fisher is full rank
    # Tiny damping (1e-6 λ_min): for P ≥ n_params, A(AᵀCA + λI)⁻¹Aᵀ → C⁻¹ up to ~λ/λ_min.
    lam = 1e-6 * lam_min
    exact, _, _ = ex.scores(lam)
    errors = {}
    for P in (4, 12, 64):
        errs = [np.linalg.norm(
            attribute(net, "mse", X, y, Xt, yt, method="if", solver="projected",
                      proj_dim=P, seed=s, damping=lam).scores - exact)
            / np.linalg.norm(exact) for s in range(3)]
        errors[P] = float(np.mean(errs))
    assert errors[12] < errors[4] and errors[64] < errors[12], errors
    assert errors[64] < 1e-4, errors


def test_cross_entropy_gauss_newton_keeps_n_out_minus_one_rows_on_a_confident_model():
    # Logits scaled ×40: p_y ≈ 1 − 1e-9 on many samples, where S_i ~ 1e-9 and the
    # rounding of its null direction 1 is relatively large; 1 must still be dropped.
    net = _mlp(4, 8, 3, seed=5)
    with torch.no_grad():
        net[2].weight.mul_(40.0)
    X, y, Xt, yt = _data("cross_entropy", 30, 4, 3, seed=5)
    with torch.no_grad():
        probs = torch.softmax(net(X), 1).max(1).values
    assert float(probs.max()) > 1 - 1e-8
    ex = exact_influence(net, "cross_entropy", X, y, Xt, yt)
    assert ex.n_rows == 30 * 2


def test_damping_grid_from_one_eigendecomposition_equals_separate_cholesky_solves():
    net = _mlp(4, 8, 3, seed=3)
    X, y, Xt, yt = _data("cross_entropy", 15, 4, 3, seed=4)
    grid_solve = exact_influence(net, "cross_entropy", X, y, Xt, yt)
    assert grid_solve.side == "sample"
    dampings = [r * grid_solve.scale for r in (1e-2, 1e-1, 1.0, 10.0)]
    grid = grid_solve.scores_grid(dampings)
    assert "eigh_s" in grid_solve.timings
    for (s_grid, cond, lam), d in zip(grid, dampings):
        one = exact_influence(net, "cross_entropy", X, y, Xt, yt)   # a fresh Cholesky
        s_chol, _, _ = one.scores(d)
        assert lam == d and cond < 1e4
        assert _rel(s_grid, s_chol) <= 100 * cond * EPS


# The fallback projects at the default P = 512, above this small model's 67 parameters.
@pytest.mark.filterwarnings("ignore::iif_ref.errors.ProjectionDimensionWarning")
def test_memory_budget_error_names_the_sizes_and_auto_falls_back_to_projected():
    net = _mlp(4, 8, 3, seed=0)
    X, y, Xt, yt = _data("cross_entropy", 30, 4, 3, seed=0)
    with pytest.raises(MemoryBudgetError) as info:
        exact_influence(net, "cross_entropy", X, y, Xt, yt, memory_budget=1000)
    msg, err = str(info.value), info.value
    need = 8 * (60 * 67 + 2 * 60 * 60)         # B (30·2 rows × 67) + Gram + factor
    for part in ("n_train=30", "n_out=3", "n_params=67", f"{need} bytes",
                 "memory_budget=1000"):
        assert part in msg, msg
    assert (err.n_train, err.n_params, err.bytes_needed) == (30, 67, need)
    with pytest.raises(MemoryBudgetError):
        attribute(net, "cross_entropy", X, y, Xt, yt, method="if", solver="gauss_newton",
                  memory_budget=1000)
    r = attribute(net, "cross_entropy", X, y, Xt, yt, method="if", memory_budget=1000)
    assert r.config["solver"] == "projected"
    assert "n_params=67" in r.diagnostics["solver_fallback"]


def test_if_defaults_run_the_exact_gauss_newton_solve():
    # The old default (dense Hessian, damping 0) raised on this network.
    net = _mlp(6, 16, 4, seed=0)
    X, y, Xt, yt = _data("cross_entropy", 40, 6, 4, seed=0)
    r = attribute(net, "cross_entropy", X, y, Xt, yt, method="if")
    explicit = exact_influence(net, "cross_entropy", X, y, Xt, yt).scores("auto")[0]
    assert r.config["solver"] == "gauss_newton"
    assert np.isfinite(r.scores).all()
    np.testing.assert_array_equal(r.scores, explicit)
    assert r.diagnostics["sample_space"][0]["trace_per_param"] > 0


# Unmasked, step k = 1 at θ_1 ≠ θ*: J_iΔy is not parallel to u_i, so the Fisher needs the
# Woodbury form there; the Gauss–Newton's J_iΔy always lies in range(Bᵀ).
@pytest.mark.parametrize("kind, forms", [("gauss_newton", {"range"}),
                                         ("fisher", {"range", "woodbury"})])
def test_iif_unprojected_sample_space_equals_dense_twin(kind, forms, monkeypatch):
    net = _mlp(4, 8, 3, seed=5)                            # 67 parameters
    X, y, Xt, yt = _data("cross_entropy", 15, 4, 3, seed=6)
    options = dict(K=2, baseline="prediction", mask_path=False, path_models="one_step",
                   proj_dim=None, curvature=kind, damping="auto", progress=False)
    fast = integrated_influence(net, "cross_entropy", X, y, Xt, yt, **options)
    assert {d["form"] for d in fast.diagnostics["sample_space"]} == forms
    assert {d["side"] for d in fast.diagnostics["sample_space"]} == {"sample"}
    monkeypatch.setattr(engine, "SAMPLE_SPACE_CURVATURES", ())
    slow = integrated_influence(net, "cross_entropy", X, y, Xt, yt, **options)
    assert "sample_space" not in slow.diagnostics
    np.testing.assert_allclose(fast.diagnostics["damping"], slow.diagnostics["damping"],
                               rtol=1e-12)
    cond = max(slow.diagnostics["condition"])
    assert cond < 1e6
    assert _rel(fast.scores, slow.scores) <= 100 * cond * EPS


def test_build_solve_refuses_an_unknown_curvature_and_zero_damping_on_a_singular_C():
    net = _mlp(4, 8, 3, seed=0)
    X, y, Xt, yt = _data("mse", 5, 4, 3, seed=0)
    prob = prepare_problem(net, "mse", X, y, Xt, yt)
    with pytest.raises(ValueError, match="curvature must be one of"):
        build_solve(prob.fm, prob.loss, prob.fm.theta_star, prob.X, prob.Y, prob.X_test,
                    prob.Y_test, curvature="hessian")
    ex = exact_influence(net, "mse", X, y, Xt, yt)
    assert ex.side == "sample"                      # 15 rows < 67 parameters
    with pytest.raises(ValueError, match="singular"):
        ex.scores(0.0)


NEURAL = pathlib.Path(__file__).resolve().parents[1] / "iif_ref" / "neural"


def test_neural_modules_import_without_a_circle():
    """Every import between iif_ref.neural modules (lazy ones included) is acyclic, and
    methods imports first in a fresh interpreter."""
    graph = {}
    for path in NEURAL.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("iif_ref.neural."):
                    deps.add(node.module.split(".")[2])
                elif node.module == "iif_ref.neural":
                    deps.add("__init__")
        graph[path.stem] = deps
    assert {"attribution", "methods", "engine"} <= set(graph)
    graphlib.TopologicalSorter(graph).prepare()      # raises CycleError on a circle
    subprocess.run([sys.executable, "-c", "import iif_ref.neural.methods"], check=True,
                   timeout=120)


@pytest.mark.parametrize("n_train", [15, 60])   # singular C (sample side) and full rank
def test_damping_grid_condition_numbers_are_those_of_the_damped_curvature(n_train):
    # cond(C + λ_d I) of the dense oracle's C, for every damping of the grid: the
    # condition number of the matrix actually solved, not of the undamped C.
    net = _mlp(4, 8, 3, seed=3)
    X, y, Xt, yt = _data("cross_entropy", n_train, 4, 3, seed=4)
    C, _, _ = _dense_oracle(net, "cross_entropy", X, y, Xt, yt, "gauss_newton")
    solve = exact_influence(net, "cross_entropy", X, y, Xt, yt)
    dampings = [r * solve.scale for r in (1e-2, 1.0, 10.0)]
    for _, cond, lam in solve.scores_grid(dampings):
        expected = np.linalg.cond(C + lam * np.eye(len(C)))
        assert expected < 1e5
        np.testing.assert_allclose(cond, expected, rtol=1e-8)
