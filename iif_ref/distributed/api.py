"""Public entry points of the distributed engine.

:func:`attribute_features`
    Scores from any feature function (the protocol in
    :mod:`iif_ref.distributed.featurize`) and projected test gradients: featurise into
    the store (resuming), reduce the Fishers, factor, score blockwise, top-k.
:func:`attribute_distributed`
    ``iif_ref.attribute(..., client=...)`` for torch models: the driver runs the
    sequential parts (baseline, path models, test gradients) through
    :func:`iif_ref.neural.plan_path`, as the single-process run does; the workers
    featurise.
:func:`connect`
    A running ``distributed.Client`` from a client or a scheduler address, with a clear
    error when the cluster cannot be reached.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from iif_ref._validation import as_float_array, check_positive_int, check_positive_real
from iif_ref.distributed import _executor
from iif_ref.distributed.featurize import describe_feature_function, featurize, open_store
from iif_ref.distributed.reduce import factor_fishers, fisher_grams, score_blocks
from iif_ref.distributed.store import ChunkCorruptError

__all__ = ["DistributedScores", "connect", "attribute_features", "attribute_distributed"]


@dataclass(frozen=True)
class DistributedScores:
    """Scores and diagnostics of a distributed run.

    Attributes
    ----------
    scores : ndarray, shape (n_test, n_train), or None
        ``I[t, i]`` (docs/conventions.md); None when ``return_scores=False``.
    score_sums : ndarray, shape (n_test,)
        ``Σ_i I[t, i]`` — compare with ``Δ_t`` for the completeness residual.
    proponents, opponents : ndarray, shape (n_test, k), int64
        Training indices of the ``k`` most negative / most positive scores per test
        point (ties broken by lower index).
    proponent_scores, opponent_scores : ndarray, shape (n_test, k)
    steps : tuple
        Path-step keys, in the order of ``damping`` and ``condition``.
    damping : ndarray, shape (n_steps,)
        Absolute damping used per step.
    condition : ndarray, shape (n_steps,)
        2-norm condition number of each damped projected Fisher.
    store : str or None
        Feature store directory (None when a temporary store was removed).
    fingerprint : str
        SHA-256 fingerprint of the store's configuration.
    computed_chunks, reused_chunks, corrupt_chunks : tuple of int
        What featurisation did (see :class:`~iif_ref.distributed.featurize.FeaturizeReport`).
    options : dict
        Options of the run (chunk sizes, top_k, damping request).
    """

    scores: np.ndarray | None
    score_sums: np.ndarray
    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray
    steps: tuple
    damping: np.ndarray
    condition: np.ndarray
    store: str | None
    fingerprint: str
    computed_chunks: tuple
    reused_chunks: tuple
    corrupt_chunks: tuple
    options: dict = field(default_factory=dict)


def connect(client, *, timeout=10.0):
    """Return a running ``distributed.Client``.

    Parameters
    ----------
    client : distributed.Client or str
        A client, or a scheduler address such as ``"tcp://host:8786"``.
    timeout : float
        Seconds to wait for the scheduler.

    Returns
    -------
    client : distributed.Client
    owned : bool
        True when this function created the client (the caller closes it).

    Raises
    ------
    ConnectionError
        The scheduler cannot be reached, or the client is closed.
    TypeError
        ``client`` is neither.
    """
    timeout = check_positive_real(timeout, "timeout")
    if isinstance(client, str):
        from distributed import Client
        try:
            return Client(client, timeout=timeout, set_as_default=False), True
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"could not reach a Dask scheduler at {client!r} within {timeout:g} s "
                f"({type(exc).__name__}: {exc}); start one (dask scheduler / "
                f"LocalCluster) or pass a running distributed.Client") from exc
    return _executor.check_client(client), False


def _as_data(X, y):
    X = as_float_array(X, "X_train", ndim=(2, 3, 4, 5))
    y = as_float_array(y, "y_train", ndim=(1, 2))
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X_train and y_train must have the same number of rows, got "
                         f"{X.shape[0]} and {y.shape[0]}")
    return X, y


def attribute_features(feature_fn, X_train, y_train, Gamma, *, client, store=None,
                       chunk_rows=4096, test_block=256, damping=None, top_k=10,
                       return_scores=True, fan_in=4, connect_timeout=10.0):
    """Integrated-influence scores from a feature function, on a Dask cluster.

    Parameters
    ----------
    feature_fn : feature function
        See :mod:`iif_ref.distributed.featurize` (``steps``, ``proj_dim``,
        ``fingerprint()``, ``__call__(shard_id, X, y)``).
    X_train : ndarray, shape (n_train, ...)
    y_train : ndarray, shape (n_train,) or (n_train, n_out)
    Gamma : ndarray, shape (n_steps, n_test, proj_dim)
        Projected test gradients per step, in ``feature_fn.steps`` order.
    client : distributed.Client, str or None
        Cluster (or scheduler address); None runs every task in this process.
    store : str or path-like, optional
        Feature store directory, reused across runs with the same fingerprint (a
        rerun after a failure computes only missing chunks). Must be reachable by
        every worker. Default: a temporary directory, removed afterwards.
    chunk_rows : int
        Training samples per chunk (the unit of featurisation, storage and scoring).
    test_block : int
        Test points per score block.
    damping : float, None or callable
        Absolute ``lam_d``, None for the kernels' relative default per step, or
        ``damping(trace, P)`` per step (see :func:`~iif_ref.distributed.reduce.factor_fishers`).
    top_k : int
        Proponents and opponents kept per test point.
    return_scores : bool
        Return the full score matrix (needs ``n_test × n_train`` floats on the driver).
    fan_in : int
        Partial results combined per reduction task.
    connect_timeout : float
        Seconds to wait for the scheduler when ``client`` is an address.

    Returns
    -------
    DistributedScores

    Raises
    ------
    ConnectionError
        Unreachable cluster or closed client.
    iif_ref.distributed.store.StoreMismatchError
        ``store`` holds features of another configuration.
    iif_ref.distributed.store.StoreWriteError
        Disk full or other write failure (stored chunks are kept).
    iif_ref.distributed.featurize.FeaturizationError
        The feature function failed on some chunks (stored chunks are kept).
    iif_ref.errors.NotPositiveDefiniteError
        A damped projected Fisher is not positive definite.

    Notes
    -----
    Implements Eq. (10) with the projected Fisher of Eq. (17) and (31):
    ``I[t, i] = −Σ_k Gamma_k[t] (Phi_kᵀ Phi_k + lam_d I)⁻¹ Psi_k[i]ᵀ``; equal, up to
    summation order, to :func:`iif_ref.kernels.projected_scores` on the same features.
    """
    X_train, y_train = _as_data(X_train, y_train)
    chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
    test_block = check_positive_int(test_block, "test_block")
    top_k = check_positive_int(top_k, "top_k")
    fan_in = check_positive_int(fan_in, "fan_in")
    if fan_in < 2:
        raise ValueError(f"fan_in must be >= 2, got {fan_in}")
    if not isinstance(return_scores, (bool, np.bool_)):
        raise TypeError(f"return_scores must be a bool, got {type(return_scores).__name__}")
    Gamma = as_float_array(Gamma, "Gamma", ndim=3)
    steps, proj_dim, _, _ = describe_feature_function(feature_fn)
    if Gamma.shape[0] != len(steps) or Gamma.shape[2] != proj_dim:
        raise ValueError(f"Gamma must have shape (n_steps={len(steps)}, n_test, "
                         f"proj_dim={proj_dim}), got {Gamma.shape}")
    owned = False
    if client is not None:
        client, owned = connect(client, timeout=connect_timeout)
    tmp = None
    try:
        if store is None:
            tmp = tempfile.mkdtemp(prefix="iif_ref_store_")
            store_path = tmp
        else:
            store_path = store
        fstore = open_store(store_path, feature_fn, X_train, y_train, chunk_rows=chunk_rows)
        report = featurize(client, fstore, feature_fn, X_train, y_train)
        computed, corrupt = set(report.computed), set(report.corrupt)
        for attempt in range(2):
            try:
                grams = fisher_grams(client, fstore, fan_in=fan_in)
                factors = factor_fishers(grams, damping=damping)
                out = score_blocks(client, fstore, factors, Gamma, top_k=top_k,
                                   test_block=test_block, return_scores=return_scores,
                                   fan_in=fan_in)
                break
            except ChunkCorruptError as exc:
                # A chunk went bad after verification (disk error, concurrent writer):
                # recompute what is bad and reduce again, once.
                if attempt == 1:
                    raise
                again = featurize(client, fstore, feature_fn, X_train, y_train)
                computed |= set(again.computed)
                corrupt |= set(again.corrupt) | {exc.chunk}
        reused = tuple(sorted(set(range(fstore.n_chunks)) - computed))
        return DistributedScores(
            scores=out["scores"], score_sums=out["score_sums"],
            proponents=out["proponents"], proponent_scores=out["proponent_scores"],
            opponents=out["opponents"], opponent_scores=out["opponent_scores"],
            steps=fstore.steps, damping=factors.damping, condition=factors.condition,
            store=None if tmp is not None else str(store_path),
            fingerprint=fstore.fingerprint, computed_chunks=tuple(sorted(computed)),
            reused_chunks=reused, corrupt_chunks=tuple(sorted(corrupt)),
            options={"chunk_rows": chunk_rows, "test_block": test_block, "top_k": top_k,
                     "damping": damping if not callable(damping) else "callable",
                     "fan_in": fan_in,
                     "n_workers": (len(client.scheduler_info()["workers"])
                                   if client is not None else 0)})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if owned:
            client.close()


_DISTRIBUTED_METHODS = ("iif", "if")


def _method_config(method, seed, options):
    """The :class:`IIFConfig` of ``method``: IIF as given; IF as IIF with K = 1, the
    prediction baseline and no mask (Lemma 2.5), like ``influence_function(solver=
    "projected")``."""
    from iif_ref._defaults import DEFAULT_PROJECTION
    from iif_ref.neural.config import IIFConfig

    if method not in _DISTRIBUTED_METHODS:
        raise ValueError(f"method={method!r} has no distributed engine; available: "
                         f"{_DISTRIBUTED_METHODS} (run it without client=)")
    if method == "if":
        allowed = {"damping", "proj_dim", "kind", "backend", "chunk_size", "dtype",
                   "progress", "cache_dir", "solver"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for method='if'")
        solver = options.pop("solver", "projected")
        if solver != "projected":
            raise ValueError(f"method='if' runs distributed only with solver='projected', "
                             f"got {solver!r}")
        options.pop("cache_dir", None)
        # damping "auto" (IIFConfig's default) with IF's r, and IF's projection, as
        # influence_function does.
        options.setdefault("kind", DEFAULT_PROJECTION["if"])
        return IIFConfig(K=1, baseline="prediction", mask_path=False, seed=seed, **options)
    options.pop("cache_dir", None)
    return IIFConfig.from_options({**options, "seed": seed})


def attribute_distributed(model, loss, X_train, y_train, X_test, y_test, *, client,
                          method="iif", seed=0, store=None, baseline_params=None,
                          chunk_rows=4096, test_block=256, top_k=10, connect_timeout=10.0,
                          **options):
    """:func:`iif_ref.attribute` for a torch model, its training set featurised on Dask.

    Parameters
    ----------
    model, loss, X_train, y_train, X_test, y_test
        As in :func:`iif_ref.neural.integrated_influence`.
    client : distributed.Client or str
        Running client or scheduler address.
    method : {"iif", "if"}
        Integrated Influence, or the influence function as its ``K = 1`` case
        (projected solver).
    seed : int
        Projection seed (and mini-batch order of the driver-side optimisers).
    store : str or path-like, optional
        Feature-store directory (one sub-store per baseline group); reruns resume.
        Default: a temporary directory, removed afterwards. Must be shared by the
        workers on a multi-node cluster.
    baseline_params : dict, optional
        θ' for ``baseline="given"``.
    chunk_rows, test_block, top_k, connect_timeout
        As in :func:`attribute_features`. The full score matrix is returned (the result
        type holds it); for a training set whose ``n_test × n_train`` scores do not fit
        the driver, call :func:`attribute_features` with ``return_scores=False``.
    **options
        Fields of :class:`iif_ref.neural.config.IIFConfig` (``K``, ``lam``, ``baseline``,
        ``proj_dim`` — required, projection is what makes the Fisher distributable —
        ``damping``, ``path_models`` ...). ``cache_dir`` is ignored (the store is the
        cache).

    Returns
    -------
    iif_ref.neural.result.AttributionResult
        As from the single-process run, with ``diagnostics["distributed"]`` holding per
        group the store, fingerprint, chunks computed/reused/corrupt and the top-k.

    Notes
    -----
    Implements Eq. (10) with Eq. (12)–(17), (31), like the single-process Algorithm 1.
    On the driver, from :func:`iif_ref.neural.plan_path` (the single-process run's
    own plan): the baseline θ' (Eq. 12), baseline targets (Eq. 13), path models θ_k
    (Eq. 16) and the test gradients ``Gamma`` — each a pass of forward/backward over
    the data, sequential in k. On the workers: the per-sample projected
    gradients and directions of every step (the dominant cost, ``K`` per-sample VJPs
    and projections per sample), the Gram partial sums, and the score blocks.
    """
    import torch

    from iif_ref._defaults import absolute_damping, default_relative_damping
    from iif_ref.neural.functional import eval_mode
    from iif_ref.neural.plan import plan_path
    from iif_ref.neural.engine import path_result
    from iif_ref.distributed.torch_features import TorchPathFeatures

    cfg = _method_config(method, seed, dict(options))
    cfg.validate()
    relative = default_relative_damping(method, projected=True)
    if cfg.proj_dim is None:
        raise ValueError("the distributed engine needs proj_dim (the projected Fisher "
                         "is what is reduced across workers); proj_dim=None runs "
                         "without client=")
    if client is None:
        raise ValueError("client is required (a distributed.Client or scheduler address)")
    client, owned = connect(client, timeout=connect_timeout)
    try:
        with eval_mode(model):   # also the mode the model is pickled to workers in
            # The sequential part (baselines, path models θ_k, test gradients) is the
            # single-process run's own plan; only the per-sample featurisation is farmed out.
            plan = plan_path(model, loss, X_train, y_train, X_test, y_test, config=cfg,
                             baseline_params=baseline_params, method=method)
            prob, fm = plan.problem, plan.problem.fm
            config = plan.run_config
            config.update(distributed={"chunk_rows": chunk_rows, "test_block": test_block,
                                       "top_k": top_k})
            scores = np.zeros((prob.n_test, prob.n_train))
            loss_star, loss_prime = plan.loss_star, np.zeros(prob.n_test)
            diag = {"condition": [], "damping": [], "unlearning_trajectory": [],
                    "path_trajectory": [], "distributed": []}
            X_np = prob.X.detach().cpu().numpy()
            common = plan.feature_options
            for group in plan.groups:
                rows = group.rows
                diag["unlearning_trajectory"].append(group.unlearning_trajectory)
                loss_prime[rows] = group.loss_prime
                steps = list(plan.steps(group))          # k = K..1, sequential (Eq. 16)
                for step in steps:
                    if step.path_trajectory is not None:
                        diag["path_trajectory"].append(step.path_trajectory)
                steps = steps[::-1]                     # k = 1..K, the feature function's order
                Gamma = np.stack([plan.test_features(step) for step in steps])
                flat = np.stack([fm.flatten(step.theta).detach().cpu().numpy()
                                 for step in steps])
                fn = TorchPathFeatures(model, loss, flat, n_out=prob.Y.shape[1],
                                       mask=plan.mask, dtype=cfg.dtype,
                                       tag={"group": group.index},
                                       nodes=[step.t for step in steps],
                                       starts=[step.t - step.weight for step in steps],
                                       **common)
                Yboth = torch.cat([prob.Y, group.Ybar], dim=1).detach().cpu().numpy()
                out = attribute_features(
                    fn, X_np, Yboth, Gamma, client=client,
                    store=None if store is None else f"{store}/group_{group.index}",
                    chunk_rows=chunk_rows, test_block=test_block,
                    damping=lambda tr, P: absolute_damping(cfg.damping, tr, P,
                                                           relative=relative),
                    top_k=top_k, return_scores=True)
                scores[rows] = out.scores
                # Listed k = K..1, the order of the single-process run.
                diag["condition"].extend(out.condition[::-1].tolist())
                diag["damping"].extend(out.damping[::-1].tolist())
                diag["distributed"].append({
                    "test_rows": np.asarray(rows).tolist(), "store": out.store,
                    "fingerprint": out.fingerprint, "computed_chunks": out.computed_chunks,
                    "reused_chunks": out.reused_chunks, "corrupt_chunks": out.corrupt_chunks,
                    "score_sums": out.score_sums, "proponents": out.proponents,
                    "proponent_scores": out.proponent_scores, "opponents": out.opponents,
                    "opponent_scores": out.opponent_scores,
                    "n_workers": out.options["n_workers"]})
    finally:
        if owned:
            client.close()
    diag["loss_star"], diag["loss_prime"] = loss_star, loss_prime
    diag.update(plan.completeness_diagnostics())
    diag["cached_steps"] = []
    config["damping_used"] = list(diag["damping"])
    # The single-process run's result rules; the workers sum the steps, so the embedded
    # rule's quadrature estimate is not available here.
    return path_result(plan, scores, loss_prime, None, config, diag, method)
