"""Many independent model fits (LDS ground truth) on a Dask cluster.

The retraining logic itself (architecture, optimiser, seeds, caching) belongs to
:mod:`iif_ref.retraining`; this helper only places independent fits on workers, ships
the shared data once, and returns the results in mask order.
"""
from __future__ import annotations

import numpy as np

from iif_ref._validation import check_positive_int
from iif_ref.distributed import _executor

__all__ = ["RetrainingError", "map_retrainings", "SubsetTraining"]


class RetrainingError(RuntimeError):
    """Some fits failed; ``results`` holds the others (None where failed).

    Attributes
    ----------
    errors : dict
        ``subset index -> exception``.
    results : list
        One entry per mask; None for a failed fit.
    """

    def __init__(self, message, *, errors, results):
        super().__init__(message)
        self.errors = dict(errors)
        self.results = list(results)


class SubsetTraining:
    """``fit_fn`` that trains one subset exactly as :func:`iif_ref.retraining.retrain_subsets`.

    ``SubsetTraining(spec, seed)(j, mask, (X_train, y_train, X_test, y_test))`` trains
    ``spec`` on the masked rows with seed ``subset_seed(seed, j)`` and one thread, and
    returns ``(test_losses, seconds)`` — the same per-subset function the retraining
    engine runs in its own worker processes, so the losses are bit-identical to
    ``retrain_subsets(..., seed=seed).losses[j]``. Pass the data as that engine holds
    it: ``X`` as float32 arrays, labels as int64.

    Parameters
    ----------
    spec : iif_ref.retraining.ModelSpec
    seed : int
    """

    def __init__(self, spec, seed):
        self.spec, self.seed = spec, int(seed)

    def __call__(self, j, mask, data):
        from iif_ref import retraining

        # The retraining engine's own hand-off and training function (no copy of its
        # logic here): data into its per-process slot, then one subset.
        retraining._init_worker_in_process(*data)
        return retraining._train_subset(self.spec, mask, retraining.subset_seed(self.seed, j))


def _fit_batch(fit_fn, indices, masks, data):
    return [fit_fn(int(j), m, data) for j, m in zip(indices, masks)]


def map_retrainings(client, fit_fn, masks, *, data=None, batch_size=1, stack=True):
    """Run ``fit_fn(j, masks[j], data)`` for every subset ``j`` on the cluster.

    Parameters
    ----------
    client : distributed.Client, str or None
        Cluster (or scheduler address); None runs the fits here, in order.
    fit_fn : callable
        Picklable ``fit_fn(j, mask, data) -> result``: fit a model on the training
        rows where ``mask`` is True and return what the caller needs (e.g. the test
        losses). It must be deterministic given ``j`` (seed it from ``j``), so where a
        fit runs does not change its result, and a fit rerun after a lost worker gives
        the same answer.
    masks : array_like of bool, shape (n_subsets, n_train)
    data : object, optional
        Shared read-only inputs (training and test arrays, model spec); sent to every
        worker once, not with every task.
    batch_size : int
        Fits per task (amortises scheduling for fits of milliseconds).
    stack : bool
        Return ``np.stack`` of the results (they must share a shape) instead of a list.

    Returns
    -------
    ndarray of shape (n_subsets, ...) or list
        Results in mask order.

    Raises
    ------
    RetrainingError
        Some fits raised; the error carries every other result.
    ConnectionError
        Unreachable cluster.
    """
    from iif_ref.distributed.api import connect

    if not callable(fit_fn):
        raise TypeError(f"fit_fn must be callable, got {type(fit_fn).__name__}")
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        raise TypeError(f"masks must be boolean, got dtype {masks.dtype}")
    if masks.ndim != 2 or 0 in masks.shape:
        raise ValueError(f"masks must have shape (n_subsets, n_train) with both >= 1, "
                         f"got {masks.shape}")
    batch_size = check_positive_int(batch_size, "batch_size")
    owned = False
    if client is not None:
        client, owned = connect(client)
    try:
        shared = _executor.scatter(client, data) if client is not None else data
        futures = {}
        for start in range(0, masks.shape[0], batch_size):
            idx = np.arange(start, min(start + batch_size, masks.shape[0]))
            futures[start] = _executor.submit(client, _fit_batch, fit_fn, idx, masks[idx],
                                              shared, name=f"refit-{start}")
        done, errors = _executor.settle(client, futures)
    finally:
        if owned:
            client.close()
    results = [None] * masks.shape[0]
    for start, values in done.items():
        results[start:start + len(values)] = values
    if errors:
        failed = {j: exc for start, exc in errors.items()
                  for j in range(start, min(start + batch_size, masks.shape[0]))}
        first = min(failed)
        raise RetrainingError(
            f"{len(failed)} of {masks.shape[0]} fit(s) failed (first: subset {first}, "
            f"{type(failed[first]).__name__}: {failed[first]})", errors=failed,
            results=results) from failed[first]
    return np.stack(results) if stack else results
