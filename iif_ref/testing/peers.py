"""Peer libraries' attributors behind the conformance protocol (optional dependencies).

Wraps the influence-function attributors of ``dattri`` (explicit, CG, LiSSA, Arnoldi,
EK-FAC, DataInf — those the installed version has), its TracIn and TRAK, and the
``TRAKer`` of ``traker`` (:func:`traker_attributors`), so that
:func:`~iif_ref.testing.check_attributor` can hold them to the exact least-squares
answers. Each wrapper builds, for every problem, the bias-free ``torch.nn.Linear(d, 1)``
at θ* with the squared error, and returns the peer's scores transposed to
``(n_test, n_train)``. Nothing here is imported by ``iif_ref.testing``; importing this
module needs torch, and each wrapper imports its peer only when called.

Two settings:

``"default"``
    The peer's constructor defaults, a training loss that is the *mean* squared error
    over the batch (what a typical user writes, ``nn.MSELoss()``), and torch's default
    float32 output buffers. Declared ``normalisation="mean"`` for the inverse-Hessian
    methods (their Hessian is then ``H/n_train``) and ``precision="float32"``.
``"fair"``
    The summed squared error of ``docs/conventions.md``, torch's default dtype set to
    float64 during the call (dattri allocates its score buffers with the default dtype),
    and the peer's own accuracy knobs set so that it *can* be exact here: zero
    regularisation; CG and Arnoldi iterations up to the number of parameters with
    tolerance 1e-12; LiSSA on the full batch with ``scaling`` above ``λ_max(H)`` and
    enough recursion for κ(H); projection switched off in TracIn and set to no
    compression in TRAK.

Sign: dattri's influence-function scores are ``∇l_i·H⁻¹∇L_test`` (positive = proponent)
and its TracIn scores ``Σ η ∇l_i·∇L_test``, so both are declared ``sign="loss_down"``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import math

import numpy as np

from iif_ref.testing.protocol import Attributor

__all__ = ["SETTINGS", "peer_versions", "dattri_attributors", "traker_attributors"]

SETTINGS = ("default", "fair")


def peer_versions():
    """Installed versions of the peer packages, or the reason each is unavailable."""
    out = {}
    for dist, module in (("dattri", "dattri"), ("traker", "trak")):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = {"available": False, "reason": f"{dist} is not installed "
                         f"(pip install --no-deps {dist})"}
            continue
        try:
            __import__(module)
        except Exception as exc:  # an import error of the peer is what we report
            out[dist] = {"available": False, "version": version,
                         "reason": f"import {module} failed: {type(exc).__name__}: {exc}"}
            continue
        out[dist] = {"available": True, "version": version}
    return out


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _setup(problem, reduction, checkpoints=None, *, wrap=False):
    """Model, dattri task and full-batch loaders for ``problem``.

    ``wrap=True`` puts the linear layer inside ``nn.Sequential`` (EK-FAC looks for
    linear *sub*-modules and finds none in a bare ``nn.Linear``).
    """
    import torch
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    dtype = torch.get_default_dtype()   # float32 at "default", float64 at "fair"
    model = problem.torch_model(dtype)
    if wrap:
        model = torch.nn.Sequential(model)
    X, y, X_test, y_test = problem.torch_data(dtype)

    def loss_func(params, data):
        x, target = data
        out = torch.func.functional_call(model, params, (x,))
        se = (out - target) ** 2
        # dattri calls this on one sample (TracIn/TRAK: x of shape (d,); IF: (1, d)) and
        # on the full batch (the Hessian): sum over the batch is L_train, mean is L/n.
        return se.sum() if reduction == "sum" else se.mean()

    if checkpoints is None:
        checkpoints = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints)
    train = DataLoader(TensorDataset(X, y), batch_size=problem.n_train, shuffle=False)
    test = DataLoader(TensorDataset(X_test, y_test), batch_size=problem.n_test,
                      shuffle=False)
    return model, task, train, test


def _hessian_spectrum(problem):
    sv = np.linalg.svd(problem.X, compute_uv=False)
    return 2.0 * sv[0] ** 2, 2.0 * sv[-1] ** 2         # λ_max, λ_min of H = 2XᵀX


def _run_if(cls_name, setting, **fair_kwargs_fn):
    """Wrapper for one of dattri's IF attributors (``BaseInnerProductAttributor``)."""
    # EK-FAC documents that its loss must be the batch mean, so it gets one at both
    # settings (and is declared normalisation="mean").
    reduction = "sum" if setting == "fair" and cls_name != "IFAttributorEKFAC" else "mean"

    def fn(problem):
        import torch
        import dattri.algorithm as algo
        kwargs = fair_kwargs_fn["kwargs"](problem) if setting == "fair" else {}
        # dattri's LiSSA casts its sampled batches to float32 (``.float()``), so it runs
        # only with a float32 model, at either setting.
        fp64 = setting == "fair" and cls_name != "IFAttributorLiSSA"
        dtype = torch.float64 if fp64 else torch.float32
        with _default_dtype(dtype):
            _, task, train, test = _setup(problem, reduction,
                                          wrap=cls_name == "IFAttributorEKFAC")
            att = getattr(algo, cls_name)(task=task, device="cpu", **kwargs)
            att.cache(train)
            scores = att.attribute(train, test)
        return scores.detach().cpu().numpy().T.astype(np.float64)

    fn.__name__ = f"dattri.{cls_name}[{setting}]"
    return fn


def _fair_kwargs(cls_name):
    def explicit(problem):
        return {"regularization": 0.0}

    def cg(problem):
        return {"regularization": 0.0, "max_iter": 2 * problem.d, "tol": 1e-12}

    def arnoldi(problem):
        # d + 1 Arnoldi steps span the whole d-dimensional parameter space.
        return {"regularization": 0.0, "proj_dim": problem.d, "max_iter": problem.d + 1,
                "tol": 1e-12}

    def lissa(problem):
        lmax, lmin = _hessian_spectrum(problem)
        scaling = 1.5 * lmax
        # The Neumann series of H/scaling contracts by (1 − λ_min/scaling) per step:
        # reaching 1e-10 needs log(1e10)·scaling/λ_min steps (capped for run time).
        depth = int(min(50_000, math.ceil(math.log(1e10) * scaling / lmin)))
        return {"batch_size": problem.n_train, "num_repeat": 1,
                "recursion_depth": depth, "damping": 0.0, "scaling": scaling}

    def ekfac(problem):
        return {"damping": 0.0}

    def datainf(problem):
        # DataInf's closed form divides by the regularisation; 0 is not allowed, and its
        # documented fallback is 0.1. A small value is the least biased choice.
        return {"regularization": 1e-3}

    return {"IFAttributorExplicit": explicit, "IFAttributorCG": cg,
            "IFAttributorArnoldi": arnoldi, "IFAttributorLiSSA": lissa,
            "IFAttributorEKFAC": ekfac, "IFAttributorDataInf": datainf}[cls_name]


def _tracin(setting):
    def fn(problem):
        import torch
        from dattri.algorithm import TracInAttributor
        dtype = torch.float64 if setting == "fair" else torch.float32
        with _default_dtype(dtype):
            ckpts = [{"weight": torch.as_tensor(t, dtype=dtype)[None, :]}
                     for t in problem.checkpoint_params()]
            _, task, train, test = _setup(problem, "sum", checkpoints=ckpts)
            weights = torch.full((len(ckpts),), float(problem.lr), dtype=dtype)
            att = TracInAttributor(task=task, weight_list=weights, normalized_grad=False,
                                   device="cpu",
                                   projector_kwargs={"proj_dim": 512, "proj_seed": 0,
                                                     "proj_max_batch_size": 32,
                                                     "device": "cpu"})
            if setting == "fair":
                # dattri has no public switch for "no projection": a None projector
                # configuration after construction takes its unprojected branch.
                att.projector_kwargs = None
            scores = att.attribute(train, test)
        return scores.detach().cpu().numpy().T.astype(np.float64)

    fn.__name__ = f"dattri.TracInAttributor[{setting}]"
    return fn


def _trak(setting):
    def fn(problem):
        import torch
        from dattri.algorithm import TRAKAttributor
        dtype = torch.float64 if setting == "fair" else torch.float32
        with _default_dtype(dtype):
            model, task, train, test = _setup(problem, "sum")

            def zero_probability(params, data):
                # Q = 1 − p = 1 for every sample: the squared error has no class
                # probability, and Q ≡ 1 leaves TRAK's kernel g_test (ΦᵀΦ)⁻¹ φ_i.
                return torch.zeros((), dtype=torch.get_default_dtype())

            proj = {"proj_dim": 512, "proj_seed": 0, "proj_max_batch_size": 32,
                    "device": "cpu"}
            if setting == "fair":
                proj["proj_dim"] = problem.d
            att = TRAKAttributor(task=task, correct_probability_func=zero_probability,
                                 projector_kwargs=proj, device="cpu", regularization=0.0)
            att.cache(train)
            scores = att.attribute(test)
        return scores.detach().cpu().numpy().T.astype(np.float64)

    fn.__name__ = f"dattri.TRAKAttributor[{setting}]"
    return fn


_IF_CLASSES = ("IFAttributorExplicit", "IFAttributorCG", "IFAttributorLiSSA",
               "IFAttributorArnoldi", "IFAttributorEKFAC", "IFAttributorDataInf")
# Inverse-Hessian solvers whose error is set by a stopping rule; at the fair setting they
# are held to this relative tolerance (declared, and printed in the report).
_ITERATIVE_RTOL = {"IFAttributorCG": 1e-6, "IFAttributorLiSSA": 1e-3,
                   "IFAttributorArnoldi": 1e-6}


def dattri_attributors(setting="fair"):
    """Declared :class:`Attributor` wrappers of dattri's methods.

    Parameters
    ----------
    setting : {"default", "fair"}
        See the module docstring.

    Returns
    -------
    list of Attributor
        Only classes present in the installed dattri. Raises ``ImportError`` (with the
        reason) when dattri cannot be imported.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    import dattri.algorithm as algo
    out = []
    fair = setting == "fair"
    precision = "float64" if fair else "float32"
    for cls_name in _IF_CLASSES:
        if not hasattr(algo, cls_name):
            continue
        fn = _run_if(cls_name, setting, kwargs=_fair_kwargs(cls_name))
        prec = "float32" if cls_name == "IFAttributorLiSSA" else precision
        mean_loss = not fair or cls_name == "IFAttributorEKFAC"
        out.append(Attributor(fn, kind="if", sign="loss_down",
                              normalisation="mean" if mean_loss else "sum",
                              precision=prec,
                              rtol=_ITERATIVE_RTOL.get(cls_name) if fair else None))
    if hasattr(algo, "TracInAttributor"):
        out.append(Attributor(_tracin(setting), kind="tracin", sign="loss_down",
                              precision=precision))
    if hasattr(algo, "TRAKAttributor"):
        out.append(Attributor(_trak(setting), kind="if", sign="loss_down",
                              precision=precision))
    return out


# --------------------------------------------------------------------------- traker
def _traker_trak(setting):
    """traker's ``TRAKer`` with a regression model output, scores chained to the test loss.

    TRAK attributes a *model output* ``f``: score ``φ̂ᵀ(ΦᵀΦ)⁻¹φ_i Q_i`` with ``φ = ∇_θ f``
    (projected) and the out-to-loss weight ``Q_i``. For the squared error we give it
    ``f(x; θ)`` itself and ``Q_i = −∂l_i/∂f = 2(y_i − f_i)``; the wrapper multiplies by
    ``∂L_test/∂f = 2(f(x̂) − ŷ)`` (chain rule) to attribute the test loss. traker 0.3.2
    frees the CPU projector's matrix in ``finalize_features`` and then fails in
    ``score`` (``AttributeError: proj_matrix``); resetting the projector's model id makes
    it regenerate the same matrix (same seed and model id) before scoring.
    """
    def fn(problem):
        import logging
        import tempfile

        import torch
        from trak import TRAKer
        from trak.modelout_functions import AbstractModelOutput

        class RegressionOutput(AbstractModelOutput):
            def __init__(self):
                super().__init__()

            @staticmethod
            def get_output(model, weights, buffers, x, y):
                return torch.func.functional_call(model, (weights, buffers),
                                                  x.unsqueeze(0)).sum()

            def get_out_to_loss_grad(self, model, weights, buffers, batch):
                x, y = batch
                f = torch.func.functional_call(model, (weights, buffers), x)
                return (2.0 * (y - f)).clone().detach()

        model = problem.torch_model(torch.float32)
        X, y, X_test, y_test = problem.torch_data(torch.float32)
        options = ({"proj_dim": problem.d, "use_half_precision": False}
                   if setting == "fair" else {})
        with tempfile.TemporaryDirectory() as tmp:
            tr = TRAKer(model=model, task=RegressionOutput(), train_set_size=problem.n_train,
                        save_dir=tmp, device="cpu", logging_level=logging.ERROR, **options)
            state = model.state_dict()
            tr.load_checkpoint(state, model_id=0)
            tr.featurize(batch=(X, y), num_samples=problem.n_train)
            tr.finalize_features()
            tr.projector.model_id = -1        # see the docstring: regenerate the matrix
            tr.start_scoring_checkpoint(exp_name="conformance", checkpoint=state,
                                        model_id=0, num_targets=problem.n_test)
            tr.score(batch=(X_test, y_test), num_samples=problem.n_test)
            scores = np.asarray(tr.finalize_scores(exp_name="conformance"),
                                dtype=np.float64).T
        r_test = problem.X_test @ problem.theta_star - problem.y_test
        return scores * (2.0 * r_test)[:, None]

    fn.__name__ = f"traker.TRAKer[{setting}]"
    return fn


def traker_attributors(setting="fair"):
    """traker's TRAK as a declared :class:`Attributor` (kind ``"if"``).

    ``"default"``: TRAKer's defaults (``proj_dim = 2048``, half precision);
    ``"fair"``: ``proj_dim = d`` (no compression, so ``ΦᵀΦ`` is invertible) in float32.
    Raises ``ImportError`` when traker cannot be imported.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    import trak  # noqa: F401
    precision = "float32"
    return [Attributor(_traker_trak(setting), kind="if", sign="loss_up",
                       precision=precision)]
