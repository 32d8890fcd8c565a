"""Hypothesis strategies for property tests of attribution code.

* :func:`linear_problems` — least-squares :class:`~iif_ref.testing.AttributionProblem`s
  with a drawn condition number, leverage, noise level and test points;
* :func:`torch_models` — a small float64 torch model (a bias-free ``nn.Linear`` or a tiny
  MLP) with training and test data; torch is imported only when the strategy draws;
* :func:`projection_inputs` and :func:`solve_inputs` — arguments for
  :func:`iif_ref.kernels.project` and :func:`iif_ref.kernels.projected_scores`.

Every element is bounded (features and targets of order one, condition numbers and
damping within stated ranges) so that tolerances derived from κ and the dtype hold.
Importing this module needs hypothesis; drawing from :func:`torch_models` needs torch.
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from iif_ref.testing.problems import make_problem, max_test_leverage

__all__ = ["seeds", "linear_problems", "torch_models", "projection_inputs", "solve_inputs"]

#: Seeds for ``numpy.random.default_rng``: the strategies draw a seed and generate arrays
#: from it, which shrinks well and keeps element sizes bounded.
seeds = st.integers(min_value=0, max_value=2 ** 32 - 1)


@st.composite
def linear_problems(draw, *, n_train=(6, 40), d=(1, 6), n_test=(1, 5),
                    condition_number=(1.0, 1e3), leverage=True, noise=(0.05, 2.0), K=(1, 8)):
    """Least-squares problems with drawn κ(X), leverage and noise.

    Parameters
    ----------
    n_train, d, n_test : (int, int)
        Inclusive ranges; ``n_train`` is raised to ``d + 2`` where needed.
    condition_number : (float, float)
        Range of κ(X), drawn log-uniformly (κ(H) = κ²). 1 when ``d = 1``.
    leverage : bool
        Whether to draw the leverage of training sample 0 in ``[d/n_train, 0.95]``
        (else uncontrolled).
    noise : (float, float)
        Range of the target-noise standard deviation. Keep it away from 0: a noise-free
        fit has residuals, hence IF/TracIn/IIF scores, at rounding level, where relative
        errors carry no information.
    K : (int, int)
        Range of the IIF path steps carried by the problem.

    Returns
    -------
    SearchStrategy[AttributionProblem]
        With ``lam`` drawn as 1.5–4 times the largest test leverage, so that the
        unlearning objective of Eq. (12) is always well posed.
    """
    dd = draw(st.integers(*d))
    n = draw(st.integers(max(n_train[0], dd + 2), max(n_train[1], dd + 2)))
    nt = draw(st.integers(*n_test))
    if dd == 1:
        kappa = 1.0
    else:
        log_k = draw(st.floats(np.log10(condition_number[0]), np.log10(condition_number[1]),
                               allow_nan=False, allow_infinity=False))
        kappa = float(10.0 ** log_k)
    lev = None
    if leverage and draw(st.booleans()):
        lev = draw(st.floats(dd / n, 0.95, allow_nan=False, allow_infinity=False,
                             exclude_max=False))
    sigma = draw(st.floats(*noise, allow_nan=False, allow_infinity=False))
    k = draw(st.integers(*K))
    seed = draw(seeds)
    # lam follows from the drawn test points; draw them once with a huge lam to read off
    # their leverages, then rebuild the same problem (same seed) with a valid lam.
    probe = make_problem(n, dd, nt, condition_number=kappa, leverage=lev, noise=sigma,
                         lam=1e300, K=k, seed=seed)
    factor = draw(st.floats(1.5, 4.0))
    lam = max(factor * max_test_leverage(probe), 1e-3)
    return probe.replace(lam=lam)


@st.composite
def torch_models(draw, *, kinds=("linear", "mlp"), n_train=(6, 24), d=(1, 4),
                 n_test=(1, 3), hidden=(2, 6)):
    """A small float64 torch model with regression data.

    Returns
    -------
    SearchStrategy[dict]
        ``{"kind", "model", "X", "y", "X_test", "y_test", "seed"}``: ``model`` is a
        bias-free ``nn.Linear(d, 1)`` (``"linear"``) or ``Linear → tanh → Linear``
        (``"mlp"``), float64, weights drawn from the seed; tensors ``X`` (n_train, d),
        ``y`` (n_train, 1), ``X_test`` (n_test, d), ``y_test`` (n_test, 1) with entries of
        order one. torch is imported here, when a value is drawn.
    """
    import torch

    kind = draw(st.sampled_from(tuple(kinds)))
    dd = draw(st.integers(*d))
    n = draw(st.integers(max(n_train[0], dd + 2), max(n_train[1], dd + 2)))
    nt = draw(st.integers(*n_test))
    seed = draw(seeds)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "linear":
            model = torch.nn.Linear(dd, 1, bias=False)
        else:
            h = draw(st.integers(*hidden))
            model = torch.nn.Sequential(torch.nn.Linear(dd, h), torch.nn.Tanh(),
                                        torch.nn.Linear(h, 1))
    model = model.to(torch.float64)
    X = torch.randn(n, dd, generator=gen, dtype=torch.float64)
    X_test = torch.randn(nt, dd, generator=gen, dtype=torch.float64)
    w = torch.randn(dd, 1, generator=gen, dtype=torch.float64)
    y = X @ w + 0.3 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    y_test = X_test @ w + 0.3 * torch.randn(nt, 1, generator=gen, dtype=torch.float64)
    return {"kind": kind, "model": model, "X": X, "y": y, "X_test": X_test,
            "y_test": y_test, "seed": seed}


_FLOAT_DTYPES = (np.float64, np.float32)


@st.composite
def projection_inputs(draw, *, n=(1, 16), n_params=(1, 300), proj_dim=(1, 64),
                      dtypes=_FLOAT_DTYPES):
    """Arguments of a projection ``Phi = G A`` (Eq. 17, 31).

    Returns
    -------
    SearchStrategy[dict]
        ``{"G": (n, n_params) array of the drawn dtype with standard-normal entries,
        "proj_dim": int, "seed": int in [0, 2**64), "dtype": numpy dtype}``.
    """
    rows = draw(st.integers(*n))
    m = draw(st.integers(*n_params))
    p = draw(st.integers(*proj_dim))
    dtype = np.dtype(draw(st.sampled_from(tuple(dtypes))))
    data_seed = draw(seeds)
    G = np.random.default_rng(data_seed).standard_normal((rows, m)).astype(dtype)
    return {"G": G, "proj_dim": p, "seed": draw(st.integers(0, 2 ** 64 - 1)),
            "dtype": dtype}


@st.composite
def solve_inputs(draw, *, n_train=(1, 40), n_test=(1, 6), proj_dim=(1, 24),
                 n_steps=(1, 3), damping=(1e-6, 1.0), dtypes=_FLOAT_DTYPES,
                 batched=True):
    """Arguments of a damped projected-Fisher solve ``Γ (ΦᵀΦ + λ_d I)⁻¹ Ψᵀ``.

    Parameters
    ----------
    damping : (float, float)
        Range of λ_d, drawn log-uniformly and scaled by the mean diagonal of ``ΦᵀΦ`` so
        that the condition number of ``F`` is at most about ``1/damping[0]``.
    batched : bool
        Whether to give the arrays a leading path-step axis of length ``n_steps``.

    Returns
    -------
    SearchStrategy[dict]
        ``{"Phi": (S, n_train, P), "Psi": (S, n_train, P), "Gamma": (S, n_test, P),
        "damping": float, "dtype": numpy dtype}`` (``S`` omitted when not batched).
    """
    n = draw(st.integers(*n_train))
    nt = draw(st.integers(*n_test))
    p = draw(st.integers(*proj_dim))
    s = draw(st.integers(*n_steps)) if batched else None
    dtype = np.dtype(draw(st.sampled_from(tuple(dtypes))))
    rng = np.random.default_rng(draw(seeds))
    lead = (s,) if batched else ()
    Phi = rng.standard_normal(lead + (n, p))
    Psi = rng.standard_normal(lead + (n, p))
    Gamma = rng.standard_normal(lead + (nt, p))
    log_d = draw(st.floats(np.log10(damping[0]), np.log10(damping[1]),
                           allow_nan=False, allow_infinity=False))
    scale = float(np.mean(np.sum(Phi ** 2, axis=-2)))       # mean diagonal of ΦᵀΦ
    return {"Phi": Phi.astype(dtype), "Psi": Psi.astype(dtype),
            "Gamma": Gamma.astype(dtype), "damping": float(10.0 ** log_d) * scale,
            "dtype": dtype}
