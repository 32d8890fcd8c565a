"""One damping rule, one step solve, and no import circle in the kernel layer.

The step solve (:func:`iif_ref.kernels.solve_step`) takes its condition estimate from
the Cholesky factor that solves; it is checked here against the estimate of a separate
factorisation (``condition_estimate``, the former diagnostic), bit for bit, since both
run the same LAPACK ``potrf`` + ``pocon`` on the same float64 matrix.
"""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import iif_ref.kernels as kernels
from iif_ref._defaults import DEFAULT_PROJ_DIM, RELATIVE_DAMPING, absolute_damping
from iif_ref.errors import NotPositiveDefiniteError

KERNELS = Path(kernels.__file__).parent
EPS64 = np.finfo(np.float64).eps


# --------------------------------------------------------------------------- imports
def _kernel_imports():
    """Module -> kernel modules it imports (at any depth of its source), from the AST."""
    graph = {}
    for path in KERNELS.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                deps |= {n.rsplit(".", 1)[-1] for n in names
                         if n.startswith("iif_ref.kernels.")}
            elif isinstance(node, ast.Import):
                deps |= {a.name.rsplit(".", 1)[-1] for a in node.names
                         if a.name.startswith("iif_ref.kernels.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_kernel_modules_import_no_circle_and_no_torch():
    graph = _kernel_imports()
    assert "_frontend" not in graph["_fisher"]   # the former _fisher <-> _frontend circle

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert [m for m in graph if m in reach(m)] == []
    for path in KERNELS.glob("*.py"):
        # Module-level imports only: a device backend may accept a torch CUDA tensor
        # and import torch inside the function that handles it.
        body = ast.parse(path.read_text()).body
        roots = {a.name.split(".")[0] for n in body if isinstance(n, ast.Import)
                 for a in n.names}
        roots |= {n.module.split(".")[0] for n in body
                  if isinstance(n, ast.ImportFrom) and n.module}
        assert "torch" not in roots, path.name


@pytest.mark.parametrize("module", ["iif_ref.kernels._fisher", "iif_ref.kernels._frontend",
                                    "iif_ref._defaults"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    # A circle shows up as an ImportError (partially initialised module) only for the
    # import order that enters it from the wrong side: each module goes first here.
    code = f"import {module}, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"      # the kernel layer does not load torch


# --------------------------------------------------------------------------- damping rule
def test_every_layer_resolves_damping_with_the_one_rule():
    from iif_ref.distributed.reduce import factor_fishers
    from iif_ref.neural import curvature

    rng = np.random.default_rng(0)
    Phi = rng.standard_normal((3, 40, 6))
    grams = np.einsum("bnp,bnq->bpq", Phi, Phi)
    traces = np.trace(grams, axis1=1, axis2=2)
    want = absolute_damping(None, traces, 6)
    assert np.array_equal(want, RELATIVE_DAMPING * traces / 6)
    assert curvature.resolve_damping is absolute_damping          # not a copy
    assert absolute_damping("auto", float(traces[1]), 6) == want[1]
    # kernels (from Phi, and from grams), and the Dask reduction: the same numbers.
    assert np.allclose(kernels.resolve_damping(Phi), want, rtol=10 * EPS64, atol=0)
    assert np.array_equal(kernels.factor_fisher(gram=grams).damping, want)
    assert np.array_equal(factor_fishers(grams).damping, want)
    with pytest.raises(ValueError, match="damping must be 'auto'"):
        absolute_damping("relative", 1.0, 2)


def test_iif_if_and_trak_project_to_the_same_default_dimension():
    import inspect

    from iif_ref.neural import IIFConfig, influence_function, trak

    assert IIFConfig().proj_dim == DEFAULT_PROJ_DIM
    for fn in (influence_function, trak):
        assert inspect.signature(fn).parameters["proj_dim"].default == DEFAULT_PROJ_DIM


# --------------------------------------------------------------------------- step solve
@settings(max_examples=20)
@given(N=st.integers(1, 40), D=st.integers(1, 16), T=st.integers(1, 6),
       rel=st.floats(1e-6, 1.0), seed=st.integers(0, 2**32 - 1))
def test_step_solve_condition_is_the_separate_factorisations_estimate(N, D, T, rel, seed):
    from iif_ref.neural.curvature import condition_estimate, dense_scores

    rng = np.random.default_rng(seed)
    Phi = rng.standard_normal((N, D))
    C = Phi.T @ Phi
    lam = absolute_damping(rel, 1.0, D) if N < D else rel * np.trace(C) / D
    Psi, Gamma = rng.standard_normal((N, D)), rng.standard_normal((T, D))
    scores, cond = dense_scores(C, Psi, Gamma, damping=lam, step=3)
    assert cond == condition_estimate(C + lam * np.eye(D))       # bit for bit
    # Scores: a backward-stable solve is within c D eps cond(F) of the exact product.
    F = C + lam * np.eye(D)
    ref = -Gamma @ np.linalg.solve(F, Psi.T)
    scale = np.linalg.norm(Gamma, axis=1)[:, None] * np.linalg.norm(Psi, axis=1)[None, :] \
        * np.linalg.norm(np.linalg.inv(F), 2)
    assert np.all(np.abs(scores - ref) <= 16 * D * EPS64 * cond * scale)


def test_fisher_factor_condition_comes_from_its_own_factor():
    from iif_ref.neural.curvature import condition_estimate

    rng = np.random.default_rng(1)
    Phi = rng.standard_normal((2, 30, 5))
    factor = kernels.factor_fisher(Phi, damping=0.1)
    for b in range(2):
        F = Phi[b].T @ Phi[b] + 0.1 * np.eye(5)
        assert factor.condition[b] == condition_estimate(F)


def test_step_solve_names_the_step_and_a_damping_that_fixes_an_indefinite_matrix():
    C = np.diag([1.0, -2.0, 3.0])
    with pytest.raises(NotPositiveDefiniteError, match="path step k=4") as info:
        kernels.solve_step(C, np.ones((2, 3)), np.ones((1, 3)), damping=0.0, step=4)
    fixed = info.value.suggested_damping
    assert np.all(np.linalg.eigvalsh(C + fixed * np.eye(3)) > 0)


def test_auto_damping_is_each_methods_measured_relative_value():
    # "auto" means r · tr(C)/dim with the method's measured r (one rule, one table):
    # the damping a result used, divided by tr(C)/dim of the matrix it solved, is r.
    torch = pytest.importorskip("torch", reason="the neural half needs torch")
    from iif_ref import attribute
    from iif_ref._defaults import DEFAULT_RELATIVE_DAMPING, default_relative_damping
    from iif_ref.neural.sample_space import exact_influence

    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double()
    X = torch.randn(30, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    data = (X, y, X[:4], y[:4])
    assert len(set(DEFAULT_RELATIVE_DAMPING.values())) > 1   # the table is not one value
    ex = exact_influence(net, "cross_entropy", *data)
    res = attribute(net, "cross_entropy", *data, method="if")
    r = default_relative_damping("if", projected=False)
    assert res.config["damping_relative"] == r
    np.testing.assert_allclose(res.config["damping_used"][0], r * ex.scale, rtol=1e-12)
    for method, options in (("trak", {"proj_dim": 16}), ("iif", {"proj_dim": 16, "K": 1}),
                            ("if", {"solver": "projected", "proj_dim": 16})):
        res = attribute(net, "cross_entropy", *data, method=method, progress=False,
                        **options) if method == "iif" else attribute(
            net, "cross_entropy", *data, method=method, **options)
        assert res.config["damping_relative"] == default_relative_damping(method,
                                                                          projected=True)


def test_default_damping_table_holds_the_documented_measured_values():
    # Literal values, not read back through the table: docs/user-guide.md (the `damping`
    # row: IIF r = 0.1; IF 1 projected, 10 exact; TRAK 10) and the default_r column of
    # docs/results/damping_defaults.json, which validation/damping_defaults.py measured.
    import json

    from iif_ref._defaults import DEFAULT_RELATIVE_DAMPING

    assert DEFAULT_RELATIVE_DAMPING == {("iif", True): 0.1, ("iif", False): 10.0,
                                        ("if", True): 1.0, ("if", False): 10.0,
                                        ("trak", True): 10.0, ("trak", False): 10.0}
    path = Path(__file__).resolve().parents[1] / "docs/results/damping_defaults.json"
    measured = json.loads(path.read_text())["rows"]
    keys = {"iif": ("iif", True), "if": ("if", False), "if_projected": ("if", True),
            "trak": ("trak", True)}
    assert {row["method"] for row in measured} == set(keys)
    for row in measured:
        assert row["default_r"] == DEFAULT_RELATIVE_DAMPING[keys[row["method"]]], row


@pytest.mark.parametrize("method, options, r", [
    ("iif", {"proj_dim": 16}, 0.1),
    ("iif", {"proj_dim": None}, 10.0),
    ("if", {"solver": "projected", "proj_dim": 16}, 1.0),
    ("if", {"solver": "fisher_exact"}, 10.0),
    ("trak", {"proj_dim": 16}, 10.0),
], ids=["iif-projected", "iif-exact", "if-projected", "if-exact", "trak-projected"])
def test_auto_damping_is_the_literal_r_times_an_independent_mean_eigenvalue(method,
                                                                           options, r):
    # damping="auto" is r·tr(C)/dim with tr(C) = ‖features‖²_F computed here, apart from
    # the run, and r written out: a changed table or a lookup with the projected flag
    # inverted (0.1 ↔ 10 for IIF, 1 ↔ 10 for IF) changes the damping used.
    torch = pytest.importorskip("torch", reason="the neural half needs torch")
    from iif_ref import attribute
    from iif_ref.neural.features import gradient_features
    from iif_ref.neural.losses import trak_margin
    from iif_ref.neural.plan import prepare_problem

    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double()
    X = torch.randn(30, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    data = (X, y, X[:4], y[:4])
    extra = {"K": 1, "baseline": "prediction", "progress": False} if method == "iif" else {}
    res = attribute(net, "cross_entropy", *data, method=method, **options, **extra)
    # K = 1 from θ' = θ*: the curvature is at θ* with the training targets (ρ(t_1) = y),
    # the empirical Fisher of the loss gradients (of the margin gradients for TRAK).
    prob = prepare_problem(net, "cross_entropy", *data)
    proj_dim = options.get("proj_dim")
    fn = trak_margin if method == "trak" else prob.loss
    features = gradient_features(prob.fm, fn, prob.fm.theta_star, prob.X, prob.Y,
                                 proj_dim=proj_dim, seed=0, kind=res.config.get("kind",
                                                                                "rademacher"))
    dim = prob.fm.n_params if proj_dim is None else proj_dim
    mean_eigenvalue = float(np.sum(np.square(features, dtype=np.float64))) / dim
    np.testing.assert_allclose(res.config["damping_used"][0], r * mean_eigenvalue,
                               rtol=1e-10)
