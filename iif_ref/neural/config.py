"""The validated, serialisable configuration of one attribution run.

Every option of Algorithm 1 lives in :class:`IIFConfig`; the result of a run carries
``config.to_dict()`` (with the damping actually used and the dtypes filled in), which is
enough to repeat the run. Defaults follow the paper (Sec. 2.3–2.5, appendix E, Table 6)
where it is specific, and ``docs/algorithm1.md`` where it is not.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from iif_ref._defaults import DEFAULT_PROJ_DIM, DEFAULT_PROJECTION
from iif_ref._validation import check_nonnegative_real, check_positive_int, check_positive_real
from iif_ref.neural.quadrature import DEFAULT_RULE, RULES

__all__ = ["IIFConfig"]

#: Former names of the path-model readings, still accepted.
_PATH_MODEL_ALIASES = {"one_step": "step", "sgd_epoch": "epoch"}

_CHOICES = {
    "baseline": ("joint", "per_test", "prediction", "given"),
    "unlearn_optimizer": ("sgd", "adam", "lbfgs", "newton"),
    "refit_optimizer": ("lbfgs", "newton"),
    "train_reduction": ("sum", "mean"),
    "unlearn_reduction": ("log_mean", "mean", "sum"),
    "path_models": ("step", "flow", "epoch", "refit"),
    "quadrature": RULES,
    "curvature": ("fisher", "gauss_newton", "hessian"),
    "kind": ("rademacher", "gaussian", "countsketch", "kronecker"),
}


@dataclass
class IIFConfig:
    """Options of Algorithm 1 (Integrated Influence for a torch model).

    Parameters
    ----------
    K : int
        Number of path steps: nodes of the quadrature of the t-integral (Eq. 9), one path
        model and one curvature solve each.
    quadrature : {"radau", "euler", "gauss", "midpoint"}
        Rule of the t-integral (:mod:`iif_ref.neural.quadrature`). ``"radau"`` (default,
        chosen by measurement, docs/algorithm1.md "Quadrature of the path integral"):
        Gauss–Radau in ``u`` with ``t = u²``, the node ``t = 1`` and ``K − 1`` nodes
        graded toward ``t = 0``, at the cost of ``K`` Euler steps. ``"euler"``: Eq. (10)
        as printed, ``t_k = k/K``, right-endpoint sum. Every result carries the rule's
        error estimate (``result.quadrature_error``).
    lam : float
        λ of the unlearning objective ``−L_test + λ L_train`` (Eq. 12), in the
        normalisation ``unlearn_reduction``. Default 0.5 (Table 6, MNIST attribution).
    baseline : {"joint", "per_test", "prediction", "given"}
        ``"joint"``: one unlearned θ' for the whole test batch (``L_test`` over all of
        it, normalised by ``unlearn_reduction``);
        ``"per_test"``: one θ'_t per test point; ``"prediction"``: θ' = θ*, i.e. baseline
        targets ``f(x; θ*)`` (the influence-function setting, Lemma 2.5);
        ``"given"``: the caller passes θ' (used by self-influence and proponents).
    unlearn_epochs : int
        Passes over the training data of the unlearning optimiser (paper, Sec. 3.1:
        "5 epochs using the SGD optimizer").
    unlearn_optimizer : {"sgd", "adam", "lbfgs", "newton"}
        ``"lbfgs"`` (full batch, strong-Wolfe line search) solves Eq. (12) to convergence;
        ``"newton"`` (full batch, exact Hessian, small models) to rounding.
    unlearn_lr : float
        Step size of the unlearning optimiser; with ``unlearn_line_search`` the largest
        step tried.
    unlearn_batch_size : int or None
        Mini-batch size of the unlearning epochs (default 64: an epoch of the paper's
        1,000–5,000 MNIST samples is 16–79 SGD steps); ``None`` = full batch (one step
        per epoch). A mini-batch term is scaled so that its expectation is the full
        objective.
    unlearn_reduction : {"mean", "sum"}
        Normalisation of both losses of Eq. (12): ``"mean"`` (default) divides the
        training loss by ``n_train`` and the test loss by the number of test points
        unlearned together, so λ weighs mean against mean as in a mini-batch training
        loop; ``"sum"`` sums both (docs/algorithm1.md, "Unlearning").
    unlearn_line_search : bool
        Backtracking (Armijo) on each mini-batch step of ``unlearn_optimizer="sgd"``
        (:func:`iif_ref.neural.optimise.minimise`): no step raises its batch objective,
        so unlearning cannot diverge by a too large ``unlearn_lr``.
    unlearn_sign : {+1, −1}
        ``+1``: unlearn (raise the test loss, Eq. 12). ``−1``: the opposite baseline of
        Sec. 3.2 (lower the test loss), used to find opponents.
    train_reduction : {"sum", "mean"}
        Normalisation of ``L_train`` in the path-model objectives (Eq. 16). Curvature
        and scores always use the summed loss (docs/conventions.md).
    divergence_factor : float
        Unlearning is declared divergent when the objective falls below
        ``obj₀ − divergence_factor · (|obj₀| + 1)`` or becomes non-finite.
    mask_path : bool or None
        Apply the appendix E mask ``ρ_i(t) ⊙ y_i``. ``None``: True for classification
        losses, False otherwise.
    path_models : {"flow", "step", "epoch", "refit"}
        How the path model at a node is obtained from the model of the node above
        (Eq. 16), warm-started: ``"step"`` one full-batch gradient step at ``path_lr``
        (Eq. 16 as printed); ``"flow"`` one full-batch gradient step of length
        ``path_time × (t_above − t_k)`` on the targets at the interval's midpoint, a
        discretisation of one path of models (a gradient flow in t) that does not
        depend on the nodes (the default: the quadrature converges on it,
        docs/algorithm1.md, "Quadrature of the path integral"); ``"epoch"`` one epoch of mini-batch SGD at ``path_lr``
        (the text's "optimised ... within one epoch of SGD"; set ``path_lr`` to the
        training learning rate in the normalisation ``train_reduction``); ``"refit"``
        training to convergence by full-batch L-BFGS or Newton (``refit_optimizer``)
        until the gradient's infinity norm is below ``refit_tol`` times its value at the
        start, or ``refit_max_iter`` iterations. ``"one_step"`` and ``"sgd_epoch"`` are
        accepted for ``"step"`` and ``"epoch"``.
    path_lr : float
        η of Eq. (16) (``"step"``, ``"epoch"``).
    path_time : float
        Total step length of ``path_models="flow"`` from ``t = 1`` to ``t = 0``; the
        default ``5e-3`` is the default ``K = 5`` times the default ``path_lr``.
    path_batch_size : int
        Mini-batch size for ``path_models="epoch"``.
    refit_optimizer : {"lbfgs", "newton"}
        Solver of ``path_models="refit"``: full-batch L-BFGS, or Newton's method with the
        exact Hessian (models of at most
        :data:`~iif_ref.neural.optimise.NEWTON_MAX_PARAMS` parameters; a quadratic
        objective is solved to rounding in one step).
    refit_max_iter : int
        Iteration cap of the refit (``path_models="refit"``, ``"lbfgs"``/``"newton"``
        unlearning).
    refit_tol : float
        Gradient tolerance (infinity norm, relative to the gradient at the start) of the refit.
    curvature : {"fisher", "gauss_newton", "hessian"}
        ``"fisher"``: empirical Fisher ``Σ u_i u_iᵀ`` (Eq. 31, the paper's);
        ``"gauss_newton"``: ``Σ J_iᵀ ∇²_f l J_i`` (exact Hessian for MSE with a linear
        model); ``"hessian"``: exact ``∇²L_train`` (small models, unprojected only).
    damping : float or "auto"
        λ_d in ``F = C + λ_d I`` (absolute). ``"auto"``: ``r · tr(C) / dim`` per step
        (dim = P, or n_params unprojected) with the method's measured ``r``
        (:data:`iif_ref._defaults.DEFAULT_RELATIVE_DAMPING`: 0.1 for projected IIF);
        the values used are recorded in the result. A non-positive-definite ``F`` is an
        error.
    proj_dim : int or None
        P of Eq. (17). ``None``: no projection; the exact curvature, solved in sample
        space for ``"gauss_newton"``/``"fisher"`` and densely in parameter space for
        ``"hessian"``. A ``proj_dim`` above the model's number of trainable parameters
        runs, with a :class:`~iif_ref.errors.ProjectionDimensionWarning` (the
        projection then reduces nothing; ``None`` is exact and cheaper).
    kind : {"countsketch", "rademacher", "gaussian", "kronecker"}
        The projection (docs/rng.md, docs/kernels.md "Structured projections"): the
        sparse CountSketch (one ``±1`` per parameter; the default for IIF, whose K
        projection passes it makes 2.9× faster at 60,000 samples with the LDS of the
        dense projection, docs/benchmarks-neural.md), dense Rademacher (the reference,
        and the default of the projected influence function) or Gaussian entries, or the
        Kronecker-factored projection of the model's ``nn.Linear`` layers.
    seed : int
        Seed of the projection matrix (and of mini-batch order in the optimisers).
    backend : str or None
        Kernel backend name passed through to :mod:`iif_ref.kernels` (``None``: its default).
    chunk_size : int
        Training samples per streamed chunk of per-sample gradients.
    dtype : {"float64", "float32"} or None
        Compute dtype of the torch side; ``None`` uses the model's parameter dtype.
    progress : bool
        Show tqdm progress bars.
    cache_dir : str or None
        Directory for per-step results; a rerun with the same fingerprint resumes.
    """

    K: int = 5
    quadrature: str = DEFAULT_RULE
    lam: float = 0.5
    baseline: str = "joint"
    unlearn_epochs: int = 5
    unlearn_optimizer: str = "sgd"
    unlearn_lr: float = 0.1
    unlearn_batch_size: int | None = 64
    unlearn_reduction: str = "log_mean"
    unlearn_line_search: bool = True
    unlearn_sign: int = 1
    train_reduction: str = "sum"
    divergence_factor: float = 1e6
    mask_path: bool | None = None
    path_models: str = "flow"
    path_lr: float = 1e-3
    path_time: float = 5e-3
    path_batch_size: int = 64
    refit_optimizer: str = "lbfgs"
    refit_max_iter: int = 500
    refit_tol: float = 1e-10
    curvature: str = "fisher"
    damping: object = "auto"
    proj_dim: int | None = DEFAULT_PROJ_DIM
    kind: str = DEFAULT_PROJECTION["iif"]
    seed: int = 0
    backend: str | None = None
    chunk_size: int = 256
    dtype: str | None = None
    progress: bool = True
    cache_dir: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ``ValueError``/``TypeError`` naming the first bad option."""
        self.K = check_positive_int(self.K, "K")
        self.lam = check_nonnegative_real(self.lam, "lam")
        self.path_models = _PATH_MODEL_ALIASES.get(self.path_models, self.path_models)
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self.unlearn_epochs = check_positive_int(self.unlearn_epochs, "unlearn_epochs")
        self.unlearn_lr = check_positive_real(self.unlearn_lr, "unlearn_lr")
        self.unlearn_batch_size = check_positive_int(self.unlearn_batch_size,
                                                     "unlearn_batch_size", allow_none=True)
        if not isinstance(self.unlearn_line_search, bool):
            raise TypeError(f"unlearn_line_search must be True or False, got "
                            f"{self.unlearn_line_search!r}")
        if self.unlearn_sign not in (1, -1):
            raise ValueError(f"unlearn_sign must be +1 or -1, got {self.unlearn_sign!r}")
        self.divergence_factor = check_positive_real(self.divergence_factor,
                                                     "divergence_factor")
        if self.mask_path is not None and not isinstance(self.mask_path, bool):
            raise TypeError(f"mask_path must be True, False or None, got {self.mask_path!r}")
        self.path_lr = check_positive_real(self.path_lr, "path_lr")
        self.path_time = check_positive_real(self.path_time, "path_time")
        self.path_batch_size = check_positive_int(self.path_batch_size, "path_batch_size")
        self.refit_max_iter = check_positive_int(self.refit_max_iter, "refit_max_iter")
        self.refit_tol = check_positive_real(self.refit_tol, "refit_tol")
        if not (isinstance(self.damping, str) and self.damping == "auto"):
            self.damping = check_nonnegative_real(self.damping, "damping")
        self.proj_dim = check_positive_int(self.proj_dim, "proj_dim", allow_none=True)
        if (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                or not 0 <= self.seed < 2 ** 64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        self.seed = int(self.seed)
        if self.backend is not None and not isinstance(self.backend, str):
            raise TypeError(f"backend must be a string or None, got {type(self.backend).__name__}")
        self.chunk_size = check_positive_int(self.chunk_size, "chunk_size")
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be 'float32', 'float64' or None, got {self.dtype!r}")
        if self.proj_dim is not None and self.curvature != "fisher":
            raise ValueError(
                f"curvature={self.curvature!r} is available only unprojected (proj_dim=None); "
                "the projected path uses the empirical Fisher ΦᵀΦ (Eq. 31)")
        return self

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """Plain-Python dict of every option (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_options(cls, options):
        """Build from keyword options, naming any unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        return cls(**options)

    @classmethod
    def resolve(cls, config, options):
        """The validated config of a public call: ``config=`` or keyword options, not both."""
        if config is not None and options:
            raise TypeError("pass either config= or keyword options, not both")
        cfg = config if config is not None else cls.from_options(options)
        cfg.validate()
        return cfg
