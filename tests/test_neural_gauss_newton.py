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
from iif_ref.neural.functional import eval_mode  # noqa: E402
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
    grid = grid_solve.scores_grid(dampings, method="eigh")
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
        exact_influence(net, "cross_entropy", X, y, Xt, yt, memory_budget=1000,
                        gram="rows")
    msg, err = str(info.value), info.value
    need = 8 * (60 * 67 + 2 * 60 * 60)         # B (30·2 rows × 67) + Gram + factor
    for part in ("n_train=30", "n_out=3", "n_params=67", f"{need} bytes",
                 "memory_budget=1000"):
        assert part in msg, msg
    assert (err.n_train, err.n_params, err.bytes_needed) == (30, 67, need)
    with pytest.raises(MemoryBudgetError) as info:     # the factor path names its need
        exact_influence(net, "cross_entropy", X, y, Xt, yt, memory_budget=1000)
    assert "layer factors" in str(info.value) and info.value.bytes_needed > 8 * 60 * 60
    with pytest.raises(MemoryBudgetError):
        attribute(net, "cross_entropy", X, y, Xt, yt, method="if", solver="gauss_newton",
                  memory_budget=1000)
    with pytest.warns(RuntimeWarning, match="falls back to the projected Fisher"):
        r = attribute(net, "cross_entropy", X, y, Xt, yt, method="if", memory_budget=1000)
    assert r.config["solver"] == "projected" and r.config["solver_requested"] == "auto"
    assert "n_params=67" in r.config["solver_fallback"]
    assert "n_params=67" in r.diagnostics["solver_fallback"]


def test_memory_budget_auto_is_a_share_of_the_available_memory(monkeypatch):
    from iif_ref.neural import sample_space

    monkeypatch.setattr(sample_space, "_available_memory_bytes", lambda: 12 * 2**30)
    assert sample_space.resolve_memory_budget("auto") == int(2 / 3 * 12 * 2**30)
    monkeypatch.setattr(sample_space, "_available_memory_bytes", lambda: None)
    assert sample_space.resolve_memory_budget("auto") == 4 * 2**30
    assert sample_space.resolve_memory_budget(1e9) == 10**9
    with pytest.raises(ValueError, match="memory_budget"):
        sample_space.resolve_memory_budget("lots")
    with pytest.raises(ValueError, match="memory_budget"):
        sample_space.resolve_memory_budget(-1)
    with pytest.raises(TypeError, match="memory_budget"):
        sample_space.resolve_memory_budget([1])
    # What the factor path holds at the paper's scale (4,000 MNIST images, 9 rows each,
    # 1,000 test images): the 36,000² Gram (9.7 GiB) dominates, 10.8 GiB in all.
    need = sample_space.required_bytes(36_000, 109_386, n_test=1000, factor_bytes=10**8)
    assert 10.7 * 2**30 < need < 10.9 * 2**30


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
    assert {d["gram_from"] for d in fast.diagnostics["sample_space"]} == {"factors"}
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
    # cond(C + λ_d I) of the dense oracle's C, for every damping of the eigen-grid: the
    # condition number of the matrix actually solved, not of the undamped C. (The
    # Cholesky grid reports LAPACK's 1-norm estimate of the sample-side matrix instead.)
    net = _mlp(4, 8, 3, seed=3)
    X, y, Xt, yt = _data("cross_entropy", n_train, 4, 3, seed=4)
    C, _, _ = _dense_oracle(net, "cross_entropy", X, y, Xt, yt, "gauss_newton")
    solve = exact_influence(net, "cross_entropy", X, y, Xt, yt)
    dampings = [r * solve.scale for r in (1e-2, 1.0, 10.0)]
    for _, cond, lam in solve.scores_grid(dampings, method="eigh"):
        expected = np.linalg.cond(C + lam * np.eye(len(C)))
        assert expected < 1e5
        np.testing.assert_allclose(cond, expected, rtol=1e-8)


# ---------------------------------------------------------------- Gram from layer factors

def _stack(widths, *, bias, dropout, dtype, seed):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b, bias=bias or i == len(widths) - 2))
        if i < len(widths) - 2:
            layers += [torch.nn.Tanh()] + ([torch.nn.Dropout(0.3)] if dropout else [])
    net = torch.nn.Sequential(*layers)
    return net.double() if dtype == "float64" else net.float()


@pytest.mark.parametrize("widths, bias, dropout, dtype, loss, kind", [
    ((5, 9, 4), True, False, "float64", "cross_entropy", "gauss_newton"),
    ((5, 9, 7, 4), False, True, "float32", "cross_entropy", "gauss_newton"),
    ((3, 6, 6, 2), True, True, "float64", "mse", "gauss_newton"),
    ((5, 9, 4), True, True, "float32", "mse", "fisher"),
    ((4, 12, 3), True, False, "float64", "cross_entropy", "fisher"),
])
def test_gram_from_layer_factors_equals_the_solve_from_rows_of_B(widths, bias, dropout,
                                                                  dtype, loss, kind):
    # Same scores, trace and condition bound from the layer-wise NTK identity as from
    # B's rows; both are backward-stable solves of the same damped system, so they agree
    # to ~cond · eps (cond <= 1e3 here, so within 1e-10 with a wide margin). Dropout is
    # in the stack (eval mode); a float32 model is solved in float64 either way.
    net = _stack(widths, bias=bias, dropout=dropout, dtype=dtype, seed=len(widths))
    n_out = widths[-1]
    X, y, Xt, yt = _data(loss, 24, widths[0], n_out, seed=7)
    fast = exact_influence(net, loss, X, y, Xt, yt, curvature=kind)
    slow = exact_influence(net, loss, X, y, Xt, yt, curvature=kind, gram="rows")
    assert (fast.gram_from, slow.gram_from) == ("factors", "rows")
    assert fast.gram is None and fast.side == slow.side == "sample"
    assert fast.trace == pytest.approx(slow.trace, rel=1e-13)
    for rel in (1e-1, 1.0):
        got, cond, lam = fast.scores(rel * fast.scale)
        ref, cond_ref, _ = slow.scores(lam)
        assert cond < 1e3 and cond == pytest.approx(cond_ref, rel=1e-12)
        assert _rel(got, ref) <= 1e-10


@pytest.mark.parametrize("kind", ["gauss_newton", "fisher"])
def test_path_step_from_factors_equals_rows_in_range_and_woodbury_forms(kind):
    # ρ_from ≠ ρ: Ψ rows are J_iΔy; the Fisher needs the Woodbury form (BΨᵀ, ΓΨᵀ from
    # factors), the Gauss–Newton stays in the range form.
    net = _stack((4, 10, 3), bias=True, dropout=True, dtype="float64", seed=2)
    X, y, Xt, yt = _data("cross_entropy", 20, 4, 3, seed=3)
    prob = prepare_problem(net, "cross_entropy", X, y, Xt, yt)
    with torch.no_grad():
        rho_from = torch.softmax(prob.fm.forward(prob.fm.theta_star, prob.X), 1)
    with eval_mode(net):                                  # Dropout off, as in every solve
        solves = [build_solve(prob.fm, prob.loss, prob.fm.theta_star, prob.X, prob.Y,
                              prob.X_test, prob.Y_test, rho_from=rho_from, curvature=kind,
                              gram=g) for g in ("factors", "rows")]
    assert solves[0].form == solves[1].form == ("range" if kind == "gauss_newton"
                                                else "woodbury")
    lam = solves[0].scale
    (got, cond, _), (ref, _, _) = solves[0].scores(lam), solves[1].scores(lam)
    # Woodbury: the (Γ Ψᵀ − ...)/λ cancellation adds ~‖K‖/λ ≈ cond to the error.
    assert cond < 1e3 and _rel(got, ref) <= 1e-10


def test_damping_grid_chooses_cholesky_for_few_dampings_and_rebuilds_the_factored_gram():
    from iif_ref.neural.sample_space import EIGH_BREAK_EVEN

    net = _stack((4, 10, 3), bias=True, dropout=False, dtype="float64", seed=4)
    X, y, Xt, yt = _data("cross_entropy", 20, 4, 3, seed=5)
    solve = exact_influence(net, "cross_entropy", X, y, Xt, yt)
    dampings = [r * solve.scale for r in (1e-2, 1e-1, 1.0)]
    few = solve.scores_grid(dampings)
    assert "eigh_s" not in solve.timings and "cholesky_s" in solve.timings
    many = solve.scores_grid(dampings + [solve.scale] * (EIGH_BREAK_EVEN - 3))
    assert "eigh_s" in solve.timings
    for (a, cond, _), (b, _, _) in zip(few, many):
        assert _rel(a, b) <= 100 * cond * EPS
    tight = exact_influence(net, "cross_entropy", X, y, Xt, yt,
                            memory_budget=2**30)
    assert tight.n_rows == 40
    tight.memory_budget = 3 * 8 * 40**2 - 1      # eigh's three 40² arrays do not fit
    tight.scores_grid([solve.scale] * EIGH_BREAK_EVEN)
    assert "eigh_s" not in tight.timings
    with pytest.raises(ValueError, match="method"):
        solve.scores_grid(dampings, method="qr")


class _Scaled(torch.nn.Module):
    """A parameter outside any Linear call (a learnt output scale): no layer factors, so
    the Gram comes from B's rows."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                         torch.nn.Linear(6, 3))
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.scale * self.inner(x)


def test_a_model_without_layer_factors_takes_the_rows_of_B_and_says_so():
    torch.manual_seed(0)
    net = _Scaled().double()
    X, y, Xt, yt = _data("cross_entropy", 10, 4, 3, seed=1)
    solve = exact_influence(net, "cross_entropy", X, y, Xt, yt)
    assert solve.gram_from == "rows" and solve.summary()["gram_from"] == "rows"
    with pytest.raises(ValueError, match="gram='factors' needs a model"):
        exact_influence(net, "cross_entropy", X, y, Xt, yt, gram="factors")
    r = attribute(net, "cross_entropy", X, y, Xt, yt, method="if")
    assert r.config["solver"] == "gauss_newton" and r.config["gram_from"] == "rows"
    with pytest.raises(ValueError, match="gram must be one of"):
        exact_influence(net, "cross_entropy", X, y, Xt, yt, gram="dense")


def test_factored_gram_is_formed_block_by_block(monkeypatch):
    # Blocks of one sample each: the triangle, the diagonal blocks and ‖K‖₁ are put
    # together from many pieces and still equal B Bᵀ.
    from iif_ref.neural import layer_gram

    net = _stack((5, 8, 4), bias=True, dropout=False, dtype="float64", seed=6)
    X, y, Xt, yt = _data("cross_entropy", 9, 5, 4, seed=6)
    whole = exact_influence(net, "cross_entropy", X, y, Xt, yt)
    ref = exact_influence(net, "cross_entropy", X, y, Xt, yt, gram="rows")
    monkeypatch.setattr(layer_gram, "BLOCK_BYTES", 1)
    blocks = exact_influence(net, "cross_entropy", X, y, Xt, yt)
    K = np.empty((27, 27))
    norm1 = layer_gram.fill_gram_upper(blocks._source.factors, K)
    upper = np.triu_indices(27)
    assert np.allclose(K[upper], ref.gram[upper], rtol=1e-13, atol=1e-15 * norm1)
    assert norm1 == pytest.approx(np.abs(ref.gram).sum(0).max(), rel=1e-13)
    for solve in (whole, blocks):
        assert _rel(solve.scores(ref.scale)[0], ref.scores(ref.scale)[0]) <= 1e-12
