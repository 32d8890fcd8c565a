"""The protocol an attribution method follows to be checked by :mod:`iif_ref.testing`.

An *attributor* is a plain callable wrapped in :class:`Attributor`, which declares what it
computes and in which convention:

``kind``
    ``"if"`` (influence function at θ*), ``"tracin"`` (TracInCP over given checkpoints),
    ``"iif"`` (Integrated Influence, Eq. 9/10) or ``"projector"`` (a random projection of
    gradients, Eq. 17).
``sign``
    ``"loss_up"`` (this package's: a positive score means the sample pushes the test loss
    *up*, an opponent) or ``"loss_down"`` (a positive score means the sample pulls it
    down, a proponent — the sign of the TracIn and TRAK papers).
``normalisation``
    The factor ``c`` by which the method's scores exceed ours for the same sign:
    ``"sum"`` (``c = 1``, the summed training loss of ``docs/conventions.md``),
    ``"mean"`` (``c = n_train``: the Koh–Liang influence of upweighting a sample in the
    *mean* training loss is ``n_train`` times ours), or a positive number (e.g. ``0.5`` for
    a squared error with ½ in both the training and the test loss).

The checks convert the declared convention into ours, ``ours = sign · raw / c``, and only
then compare with the exact answers. A method that declares the wrong convention fails.

Scoring kinds are called as ``fn(problem) -> scores`` with ``problem`` an
:class:`AttributionProblem` and ``scores`` array-like of shape ``(n_test, n_train)``.
Projectors are called as ``fn(G, dim, seed) -> Phi`` with ``G`` of shape
``(n, n_params)`` and ``Phi = G A`` of shape ``(n, dim)``.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

import numpy as np

from iif_ref._validation import (
    as_float_array,
    check_nonnegative_real,
    check_positive_int,
    check_positive_real,
    check_same_length,
)

__all__ = ["KINDS", "SIGNS", "NORMALISATIONS", "BASELINES", "CAPABILITIES",
           "AttributionProblem", "Attributor", "as_attributor"]

KINDS = ("if", "tracin", "iif", "projector")
SIGNS = ("loss_up", "loss_down")
NORMALISATIONS = ("sum", "mean")
#: ``"unlearn"``: baseline targets ``X θ'_t`` of Eq. (12)–(13), one θ'_t per test point,
#: with λ = ``problem.lam``; ``"prediction"``: ``f(x; θ*)`` (Lemma 2.5, Corollary 2.6).
BASELINES = ("unlearn", "prediction")
#: Optional abilities an IIF attributor declares; checks that need one are skipped
#: (with the reason) for an attributor that lacks it.
#: ``"prediction_baseline"``: honours ``problem.baseline == "prediction"``;
#: ``"exact_integral"``: accepts ``problem.K = None`` (the exact integral of Eq. 9);
#: ``"exact_path"``: its path models are the exact minimisers θ(Γ(t_k)) of Eq. (2), so for
#: K > 1 it must equal the exact Euler sum (Eq. 16's single SGD step does not).
CAPABILITIES = ("prediction_baseline", "exact_integral", "exact_path")
PRECISIONS = {"float64": np.finfo(np.float64).eps, "float32": np.finfo(np.float32).eps}


@dataclass(frozen=True)
class AttributionProblem:
    """A least-squares regression problem handed to an attributor.

    The model is the bias-free linear ``f(x; θ) = xᵀθ`` with the summed squared error
    ``L_train(θ) = Σ_i (x_iᵀθ − y_i)²`` and test loss ``(x̂ᵀθ − ŷ)²``; θ* is its least-squares
    fit. Exact answers come from :mod:`iif_ref.linear`.

    Attributes
    ----------
    name : str
        Identifies the problem in reports.
    X : ndarray, shape (n_train, d)
    y : ndarray, shape (n_train,)
    X_test : ndarray, shape (n_test, d)
    y_test : ndarray, shape (n_test,)
        float64 arrays (read-only views: an attributor must not modify them).
    lam : float
        λ of the unlearning objective Eq. (12) (for IIF with ``baseline="unlearn"``).
    K : int or None
        Path steps of Eq. (10) an IIF attributor must use; ``None`` = exact integral.
    baseline : {"unlearn", "prediction"}
        Which baseline an IIF attributor must use (see :data:`BASELINES`).
    lr : float
        Gradient-descent step of the training run whose checkpoints TracIn uses.
    checkpoints : tuple of int
        Iteration indices ``s`` of the checkpoints θ_s (θ_0 = 0, full-batch gradient
        descent on ``L_train`` with step ``lr``; see :meth:`checkpoint_params`).
    condition_number : float
        κ(X) used to draw the problem (κ of the Hessian is its square).
    seed : int or None
        Seed that drew the problem.
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    lam: float = 1.0
    K: int | None = 4
    baseline: str = "unlearn"
    lr: float = 0.0
    checkpoints: tuple = (1, 2, 4)
    condition_number: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for attr, ndim in (("X", 2), ("y", 1), ("X_test", 2), ("y_test", 1)):
            arr = np.array(as_float_array(getattr(self, attr), attr, ndim=ndim),
                           dtype=np.float64)          # a private, read-only copy
            arr.setflags(write=False)
            object.__setattr__(self, attr, arr)
        check_same_length(self.X, "X", self.y, "y")
        check_same_length(self.X_test, "X_test", self.y_test, "y_test")
        if self.X_test.shape[1] != self.X.shape[1]:
            raise ValueError(f"X_test must have d = {self.X.shape[1]} columns like X, "
                             f"got shape {self.X_test.shape}")
        object.__setattr__(self, "lam", check_positive_real(self.lam, "lam"))
        object.__setattr__(self, "K", check_positive_int(self.K, "K", allow_none=True))
        object.__setattr__(self, "lr", check_nonnegative_real(self.lr, "lr"))
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        checkpoints = tuple(self.checkpoints)
        if (not checkpoints or any(isinstance(c, bool) or not isinstance(c, numbers.Integral)
                                   or c < 0 for c in checkpoints)
                or any(b <= a for a, b in zip(checkpoints, checkpoints[1:]))):
            raise ValueError(f"checkpoints must be strictly increasing non-negative "
                             f"iteration indices, got {self.checkpoints!r}")
        object.__setattr__(self, "checkpoints", tuple(int(c) for c in checkpoints))

    @property
    def n_train(self):
        return self.X.shape[0]

    @property
    def n_test(self):
        return self.X_test.shape[0]

    @property
    def d(self):
        return self.X.shape[1]

    @property
    def theta_star(self):
        """Least-squares parameters θ*, shape (d,) (:func:`iif_ref.linear.fit`)."""
        from iif_ref import linear
        return linear.fit(self.X, self.y)

    @property
    def baseline_targets(self):
        """Baseline targets ȳ, shape (n_test, n_train): ``X θ'_t`` or ``X θ*``."""
        from iif_ref import linear
        if self.baseline == "prediction":
            return np.broadcast_to(self.X @ self.theta_star, (self.n_test, self.n_train)).copy()
        theta_prime = linear.unlearned_params(self.X, self.y, self.X_test, self.y_test,
                                              lam=self.lam)
        return theta_prime @ self.X.T

    def checkpoint_params(self):
        """Parameters θ_s at ``self.checkpoints``, shape (n_checkpoints, d).

        Runs full-batch gradient descent ``θ_{s+1} = θ_s − lr ∇L_train(θ_s)`` from θ_0 = 0
        step by step (an independent computation from the closed form that
        :func:`iif_ref.linear.tracin` uses).
        """
        theta = np.zeros(self.d)
        out = []
        wanted = set(self.checkpoints)
        for s in range(max(self.checkpoints) + 1):
            if s in wanted:
                out.append(theta.copy())
            theta = theta - self.lr * 2.0 * (self.X.T @ (self.X @ theta - self.y))
        return np.array(out)

    def replace(self, **changes):
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def torch_model(self, dtype=None):
        """A bias-free ``torch.nn.Linear(d, 1)`` holding θ* (float64 by default).

        Imports torch lazily so that :mod:`iif_ref.testing` needs no torch.
        """
        import torch
        dtype = torch.float64 if dtype is None else dtype
        model = torch.nn.Linear(self.d, 1, bias=False).to(dtype)
        with torch.no_grad():
            model.weight.copy_(torch.as_tensor(self.theta_star, dtype=dtype)[None, :])
        return model

    def torch_data(self, dtype=None):
        """``(X, y, X_test, y_test)`` as torch tensors, targets of shape ``(n, 1)``."""
        import torch
        dtype = torch.float64 if dtype is None else dtype
        t = lambda a: torch.as_tensor(np.array(a), dtype=dtype)  # noqa: E731 (copy: writable)
        return t(self.X), t(self.y)[:, None], t(self.X_test), t(self.y_test)[:, None]


def _normalisation_factor(normalisation, n_train):
    if isinstance(normalisation, str):
        return 1.0 if normalisation == "sum" else float(n_train)
    return float(normalisation)


@dataclass(frozen=True)
class Attributor:
    """A user's attribution callable with its declared conventions.

    Parameters
    ----------
    fn : callable
        ``fn(problem) -> scores (n_test, n_train)`` for the scoring kinds,
        ``fn(G, dim, seed) -> (n, dim)`` for ``kind="projector"``.
    kind : {"if", "tracin", "iif", "projector"}
    sign : {"loss_up", "loss_down"}
        See the module docstring; ignored for projectors.
    normalisation : {"sum", "mean"} or float
        See the module docstring; ignored for projectors.
    name : str, optional
        Shown in reports (default: ``fn.__name__``).
    precision : {"float64", "float32"}
        The arithmetic the method uses; tolerances scale with its machine epsilon.
    capabilities : iterable of str
        Subset of :data:`CAPABILITIES` (IIF only).
    rtol : float, optional
        Relative tolerance that replaces the derived one for comparisons with exact
        answers (for iterative solvers, e.g. CG or LiSSA, whose error is set by their
        stopping rule rather than by rounding). Reports say that it was declared.
    """

    fn: object
    kind: str
    sign: str = "loss_up"
    normalisation: object = "sum"
    name: str | None = None
    precision: str = "float64"
    capabilities: frozenset = field(default_factory=frozenset)
    rtol: float | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"fn must be callable, got {type(self.fn).__name__}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.sign not in SIGNS:
            raise ValueError(f"sign must be one of {SIGNS}, got {self.sign!r}")
        norm = self.normalisation
        if isinstance(norm, str):
            if norm not in NORMALISATIONS:
                raise ValueError(f"normalisation must be one of {NORMALISATIONS} or a "
                                 f"positive number, got {norm!r}")
        elif isinstance(norm, bool) or not isinstance(norm, numbers.Real):
            raise TypeError(f"normalisation must be 'sum', 'mean' or a positive number, "
                            f"got {type(norm).__name__}")
        elif not (np.isfinite(norm) and norm > 0):
            raise ValueError(f"normalisation must be a finite number > 0, got {norm}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, "
                             f"got {self.precision!r}")
        caps = frozenset(self.capabilities)
        unknown = sorted(caps - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"unknown capabilities {unknown}; known: {CAPABILITIES}")
        object.__setattr__(self, "capabilities", caps)
        if self.rtol is not None and not (isinstance(self.rtol, numbers.Real)
                                          and np.isfinite(self.rtol) and self.rtol > 0):
            raise ValueError(f"rtol must be a finite number > 0 or None, got {self.rtol!r}")
        if self.name is None:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", type(self.fn).__name__))

    @property
    def eps(self):
        """Machine epsilon of the declared precision."""
        return float(PRECISIONS[self.precision])

    def scores(self, problem):
        """Call ``fn(problem)`` and return the scores in this package's convention.

        Returns
        -------
        ndarray, shape (problem.n_test, problem.n_train), float64
            ``sign · raw / c`` (see the module docstring).

        Raises
        ------
        ValueError
            The callable returned the wrong shape or non-finite values (the message says
            which).
        """
        if self.kind == "projector":
            raise TypeError("a projector is called with project(G, dim, seed), not scores()")
        raw = self.fn(problem)
        raw = _to_numpy(raw)
        want = (problem.n_test, problem.n_train)
        if raw.shape != want:
            raise ValueError(f"{self.name} returned scores of shape {raw.shape}; the protocol "
                             f"requires (n_test, n_train) = {want}")
        if not np.issubdtype(raw.dtype, np.number) or np.iscomplexobj(raw):
            raise ValueError(f"{self.name} returned dtype {raw.dtype}; real numbers required")
        raw = raw.astype(np.float64)
        if not np.all(np.isfinite(raw)):
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(raw))[0])
            raise ValueError(f"{self.name} returned {int(np.sum(~np.isfinite(raw)))} "
                             f"non-finite score(s), first at (test, train) = {bad}")
        sign = 1.0 if self.sign == "loss_up" else -1.0
        return sign * raw / _normalisation_factor(self.normalisation, problem.n_train)

    def project(self, G, dim, seed):
        """Call a projector ``fn(G, dim, seed)`` and return a float64 NumPy array."""
        if self.kind != "projector":
            raise TypeError(f"project() is for kind='projector', this attributor is "
                            f"kind={self.kind!r}")
        out = _to_numpy(self.fn(G, dim, seed))
        if out.shape != (G.shape[0], dim):
            raise ValueError(f"{self.name} returned shape {out.shape}; the protocol requires "
                             f"(n, dim) = {(G.shape[0], dim)}")
        if not np.all(np.isfinite(out)):
            raise ValueError(f"{self.name} returned non-finite projections")
        return out.astype(np.float64)


def _to_numpy(value):
    """NumPy view of an array-like, a torch tensor (detached, on the CPU) included."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    elif hasattr(value, "get") and type(value).__module__.startswith("cupy"):
        value = value.get()
    return np.asarray(value)


def as_attributor(fn, **declaration):
    """Return ``fn`` if it is an :class:`Attributor`, else wrap it with ``declaration``."""
    if isinstance(fn, Attributor):
        if declaration:
            return dataclasses.replace(fn, **declaration)
        return fn
    if "kind" not in declaration:
        raise TypeError("kind= is required to wrap a plain callable "
                        f"(one of {KINDS})")
    return Attributor(fn, **declaration)
