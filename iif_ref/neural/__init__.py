"""Integrated Influence for torch models (Algorithm 1), with IF, TracIn and TRAK.

Stable entry points
-------------------
attribute(model, loss, X_train, y_train, X_test, y_test, *, method="iif", seed=0,
          client=None, **options) -> AttributionResult
    One call for the four methods ("iif", "if", "tracin", "trak"); ``client`` delegates
    to ``iif_ref.distributed.attribute_distributed``.
integrated_influence(model, loss, X_train, y_train, X_test, y_test, *, config=None,
                     baseline_params=None, callback=None, **options) -> AttributionResult
    Algorithm 1; options are the fields of :class:`IIFConfig`.
influence_function, tracin, trak
    The other methods on the same machinery (:mod:`iif_ref.neural.methods`).
self_influence(model, loss, X_train, y_train, *, lr, ...) -> SelfInfluenceResult
    Sec. 3.3 (mislabel score = −self-influence).
proponents_opponents(model, loss, X_train, y_train, X_test, y_test, *, n_top, ...)
    Sec. 3.2, two opposite baselines.

Building blocks (for engines that distribute the work, e.g. over shards of D_train)
-----------------------------------------------------------------------------------
train_features(model, loss, params, X, y_from, y_to, *, proj_dim, seed=0,
               kind="rademacher", chunk_size=256, backend=None, sample_offset=0)
    -> (Phi, Psi): NumPy ``(n, P)`` projected per-sample gradients ``u_i A`` and
    directions ``(J_iΔy) A`` of one path step, streamed in chunks (the ``(n, n_params)``
    gradient matrix never exists). Rows of a shard concatenate to those of the whole.
test_features(model, loss, params, X_test, y_test, *, proj_dim, ...) -> Gamma (n_test, P)
step_features(model, loss, params, X, y_from, y_to, X_test, y_test, *, proj_dim, ...)
    -> (Phi, Psi, Gamma) of one path step, test rows projected with the training rows.
gradient_features(model, fn, params, X, Y, *, proj_dim, ...) -> (n, P)
    Any per-sample output function's gradient, projected (TRAK's margin, TracIn).
plan_path(model, loss, X_train, y_train, X_test, y_test, *, config=None,
          baseline_params=None, **options) -> PathPlan
    The sequential part of Algorithm 1 (baselines, path targets and models θ_k, test
    features), shared by the single-process run and the distributed engine.
path_targets(Y, Ybar, t, *, mask), path_model_step(...), unlearn(...)
    Eq. (15), (16), (12).
FunctionalModel(model, dtype=None)
    Parameters as a dict; ``flatten`` defines the flat index ``m`` (the row of ``A``).

Conventions (docs/conventions.md): summed training loss, MSE without ½, soft-target
cross-entropy, ``scores[t, i] > 0`` means sample ``i`` pushes test loss ``t`` up.
The torch side knows no kernel backend: ``backend=`` is passed through to
:mod:`iif_ref.kernels`, and tensors become NumPy arrays at that boundary.
"""
from iif_ref._optional import require

require("torch", "iif_ref.neural")  # a missing torch names the extra that installs it

from iif_ref.neural.attribution import attribute, integrated_influence, prepare_problem  # noqa: E402
from iif_ref.neural.baseline import per_sample_baselines, unlearn
from iif_ref.neural.config import IIFConfig
from iif_ref.neural.features import (gradient_features, step_features, test_features,
                                     train_features)
from iif_ref.neural.functional import FunctionalModel
from iif_ref.neural.losses import TargetLinearLoss, check_target_linear, resolve_loss
from iif_ref.neural.methods import influence_function, tracin, trak, trak_margin
from iif_ref.neural.optimise import DivergenceError
from iif_ref.neural.path import path_model_step, path_targets
from iif_ref.neural.plan import PathGroup, PathPlan, PathStep, plan_path
from iif_ref.neural.result import AttributionResult
from iif_ref.neural.tasks import (ProponentsOpponents, SelfInfluenceResult,
                                  proponents_opponents, self_influence)

__all__ = [
    "attribute", "integrated_influence", "influence_function", "tracin", "trak",
    "self_influence", "proponents_opponents",
    "IIFConfig", "AttributionResult", "SelfInfluenceResult", "ProponentsOpponents",
    "train_features", "test_features", "step_features", "gradient_features",
    "path_targets", "path_model_step", "unlearn", "per_sample_baselines",
    "FunctionalModel", "TargetLinearLoss", "resolve_loss", "check_target_linear",
    "trak_margin", "prepare_problem", "DivergenceError",
    "plan_path", "PathPlan", "PathGroup", "PathStep",
]
