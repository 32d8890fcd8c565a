"""Ground truth by retraining: train on many random subsets and record each test loss.

This is the counterfactual the Linear Datamodeling Score (LDS, paper Sec. 3) is measured
against: for subset ``S_j`` (a boolean mask over the training set), train the same
architecture from scratch on the rows in ``S_j`` and record the per-sample test loss
``L_test(ẑ_t; θ_{S_j})`` for every test point.

Engineering, each for a reason:

* **Resumable.** Each finished subset is written to ``cache_dir/subset_XXXXX.npz`` with
  :func:`iif_ref._io.atomic_write` (fsync-ed temporary file, then :func:`os.replace`,
  atomic on POSIX), so an interrupted run leaves
  only whole files and a rerun trains only the missing subsets. Each file stores a key
  (SHA-256 of the data, the mask, the model and training settings and the seed); a file
  whose key does not match is retrained, never silently reused.
* **Parallel.** Subsets are trained in worker processes
  (:class:`concurrent.futures.ProcessPoolExecutor`, ``spawn`` start method so no
  OpenMP state is inherited across ``fork``), each with ``torch.set_num_threads(1)``:
  small networks do not scale across threads, so ``W`` single-threaded processes beat
  one ``W``-threaded process (``benchmark_parallelism`` measures it).
* **Deterministic.** Subset ``j`` is trained with seed ``subset_seed(seed, j)`` and one
  thread whether it runs in a worker or in the calling process, so parallel and serial
  runs return bit-identical losses.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from iif_ref._io import array_digest, atomic_write
from iif_ref._validation import as_float_array, check_positive_int

__all__ = ["ModelSpec", "RetrainingResult", "subset_seed", "retrain_subsets",
           "benchmark_parallelism"]


@dataclass(frozen=True)
class ModelSpec:
    """A picklable description of the network to retrain.

    Attributes
    ----------
    arch : str
        Name registered in :func:`iif_ref.models.make_model` (``"mlp"``, ``"resnet9"``).
    kwargs : dict
        Keyword arguments of the factory (e.g. ``{"in_features": 64}``).
    train : iif_ref.models.TrainConfig
    """

    arch: str
    kwargs: dict = field(default_factory=dict)
    train: object = None

    def to_dict(self):
        return {"arch": self.arch, "kwargs": dict(self.kwargs),
                "train": None if self.train is None else self.train.to_dict()}


@dataclass(frozen=True)
class RetrainingResult:
    """Per-subset test losses.

    Attributes
    ----------
    losses : ndarray, shape (n_subsets, n_test)
        ``L_test(ẑ_t; θ_{S_j})``, float64 (per-sample cross-entropy).
    masks : ndarray of bool, shape (n_subsets, n_train)
    seconds : ndarray, shape (n_subsets,)
        Training time of each subset (as recorded when it was trained).
    n_cached : int
        Subsets read from the cache instead of trained in this call.
    wall_seconds : float
        Wall time of this call.
    config : dict
        Model, training settings, seed, workers — enough to repeat the run.
    """

    losses: np.ndarray
    masks: np.ndarray
    seconds: np.ndarray
    n_cached: int
    wall_seconds: float
    config: dict


def subset_seed(seed, j):
    """Training seed of subset ``j``: a 63-bit integer from ``SeedSequence([seed, j])``."""
    return int(np.random.SeedSequence([int(seed), int(j)]).generate_state(2, np.uint32)
               .astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64))


# Data handed to each worker once, by the pool initialiser, instead of with every task.
_WORKER = {}


def _init_worker(X_train, y_train, X_test, y_test):
    import torch

    torch.set_num_threads(1)
    _WORKER.update(X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test)


def _train_subset(spec, mask, seed):
    """Train ``spec`` on the rows in ``mask``; return (test losses, seconds)."""
    from iif_ref.models import make_model, per_sample_cross_entropy, train

    t0 = time.perf_counter()
    model = make_model(spec.arch, seed=seed, **spec.kwargs)
    train(model, _WORKER["X_train"][mask], _WORKER["y_train"][mask],
          config=spec.train, seed=seed, threads=1)
    losses = per_sample_cross_entropy(model, _WORKER["X_test"], _WORKER["y_test"], threads=1)
    return losses, time.perf_counter() - t0


def _write_atomic(path, **arrays):
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _read_cached(path, key):
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            return z["losses"].astype(np.float64), float(z["seconds"])
    except (OSError, KeyError, ValueError):
        return None  # unreadable or foreign file: retrain it


def retrain_subsets(spec, X_train, y_train, X_test, y_test, masks, *, seed, cache_dir=None,
                    n_workers=1, progress=True, max_new=None, same_seed=False):
    """Train ``spec`` on every subset in ``masks`` and return each test point's loss.

    Parameters
    ----------
    spec : ModelSpec
    X_train : array_like, shape (n_train, ...)
    y_train : array_like of int, shape (n_train,)
    X_test : array_like, shape (n_test, ...)
    y_test : array_like of int, shape (n_test,)
    masks : array_like of bool, shape (n_subsets, n_train)
        Row ``j`` selects the training rows of subset ``j`` (e.g. from
        ``iif_ref.metrics.random_subset_masks``).
    seed : int, keyword-only
        Subset ``j`` is initialised and shuffled with ``subset_seed(seed, j)``.
    same_seed : bool, keyword-only
        Every subset is initialised and shuffled with ``subset_seed(seed, 0)``: the same
        initial parameters and the same minibatch order (over positions in the subset),
        so the test losses differ by the data alone (a low-noise ground truth).
    cache_dir : str or Path, optional, keyword-only
        Where finished subsets are stored; ``None`` keeps nothing.
    n_workers : int, keyword-only
        Worker processes; 1 trains in this process (still single-threaded, so the
        result equals the parallel one bit for bit).
    progress : bool, keyword-only
        A tqdm bar of the subsets trained, on standard error when it is a terminal.
    max_new : int, optional, keyword-only
        Stop after training this many new subsets (to test resumption); the returned
        losses then hold NaN for subsets not yet trained and ``config["complete"]`` is
        False.

    Returns
    -------
    RetrainingResult
    """
    from iif_ref.models import TrainConfig

    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    spec = ModelSpec(spec.arch, dict(spec.kwargs), spec.train or TrainConfig())
    X_train = as_float_array(X_train, "X_train").astype(np.float32)
    X_test = as_float_array(X_test, "X_test").astype(np.float32)
    y_train = _labels(y_train, "y_train", len(X_train))
    y_test = _labels(y_test, "y_test", len(X_test))
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        raise TypeError(f"masks must be boolean, got dtype {masks.dtype}")
    if masks.ndim != 2 or masks.shape[1] != len(X_train) or masks.shape[0] == 0:
        raise ValueError(f"masks must have shape (n_subsets, {len(X_train)}), got {masks.shape}")
    if not masks.any(axis=1).all():
        raise ValueError(f"masks row {int(np.flatnonzero(~masks.any(axis=1))[0])} selects no sample")
    n_workers = check_positive_int(n_workers, "n_workers")
    max_new = check_positive_int(max_new, "max_new", allow_none=True)

    n_subsets, n_test = masks.shape[0], len(X_test)
    config = {"model": spec.to_dict(), "seed": int(seed), "same_seed": bool(same_seed),
              "n_subsets": int(n_subsets),
              "n_train": int(len(X_train)), "n_test": int(n_test), "n_workers": n_workers,
              "threads_per_worker": 1, "loss": "per-sample cross-entropy, eval mode"}
    data_key = array_digest(X_train, y_train, X_test, y_test, extra=config["model"])
    keys = [array_digest(masks[j], extra=[data_key, int(seed), j] + (["same seed"] if
                                                                      same_seed else []))
            for j in range(n_subsets)]
    seeds = [subset_seed(seed, 0 if same_seed else j) for j in range(n_subsets)]

    losses = np.full((n_subsets, n_test), np.nan)
    seconds = np.full(n_subsets, np.nan)
    cache = None if cache_dir is None else Path(cache_dir)
    todo = []
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    for j in range(n_subsets):
        hit = None if cache is None else _read_cached(cache / f"subset_{j:05d}.npz", keys[j])
        if hit is None:
            todo.append(j)
        else:
            losses[j], seconds[j] = hit
    n_cached = n_subsets - len(todo)
    if max_new is not None:
        todo = todo[:max_new]

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    # disable=None: no bar when standard error is not a terminal (logs, CI).
    bar = tqdm(total=len(todo), desc=f"retrain ({n_cached} cached)", file=sys.stderr,
               disable=None if progress else True)

    def finish(j, result):
        losses[j], seconds[j] = result
        if cache is not None:
            _write_atomic(cache / f"subset_{j:05d}.npz", key=np.array(keys[j]),
                          losses=losses[j], seconds=np.array(seconds[j]))
        bar.update()

    if todo and n_workers == 1:
        _init_worker_in_process(X_train, y_train, X_test, y_test)
        for j in todo:
            finish(j, _train_subset(spec, masks[j], seeds[j]))
    elif todo:
        with ProcessPoolExecutor(max_workers=min(n_workers, len(todo)),
                                 mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(X_train, y_train, X_test, y_test)) as pool:
            futures = {pool.submit(_train_subset, spec, masks[j], seeds[j]): j
                       for j in todo}
            for fut in as_completed(futures):
                finish(futures[fut], fut.result())
    bar.close()
    config["complete"] = bool(np.isfinite(losses).all())
    return RetrainingResult(losses, masks.copy(), seconds, n_cached,
                            time.perf_counter() - t0, config)


def _init_worker_in_process(X_train, y_train, X_test, y_test):
    # Same data hand-off as a worker, without touching this process's thread setting:
    # train() and per_sample_cross_entropy() set one thread themselves and restore it.
    _WORKER.update(X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test)


def _labels(y, name, n):
    arr = np.asarray(y)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    return arr.astype(np.int64)


def _warm(_):
    import torch  # noqa: F401  (the import is the start-up cost being paid here)

    return None


def benchmark_parallelism(spec, X_train, y_train, X_test, y_test, masks, *, seed,
                          n_workers=2):
    """Time the same trainings as ``n_workers`` single-threaded processes and as one process
    with ``n_workers`` threads, in one run.

    The worker pool is started and warmed (torch imported) before the clock starts, so
    the comparison is of training throughput; the start-up is reported separately.

    Returns
    -------
    dict
        ``processes_s``, ``threads_s``, ``ratio_threads_over_processes`` (> 1 means the
        processes are faster), ``pool_startup_s``, the number of trainings and the
        machine description.
    """
    import torch  # noqa: F401  (its version is recorded below)

    from iif_ref.bench import machine_info
    from iif_ref.models import make_model, per_sample_cross_entropy, train

    masks = np.asarray(masks, dtype=bool)
    X_train = np.asarray(X_train, dtype=np.float32)
    X_test = np.asarray(X_test, dtype=np.float32)
    y_train = _labels(y_train, "y_train", len(X_train))
    y_test = _labels(y_test, "y_test", len(X_test))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=get_context("spawn"),
                             initializer=_init_worker,
                             initargs=(X_train, y_train, X_test, y_test)) as pool:
        list(pool.map(_warm, range(n_workers)))
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(pool.map(_train_subset, [spec] * len(masks), list(masks),
                      [subset_seed(seed, j) for j in range(len(masks))]))
        processes_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for j in range(len(masks)):
        s = subset_seed(seed, j)
        model = make_model(spec.arch, seed=s, **spec.kwargs)
        train(model, X_train[masks[j]], y_train[masks[j]], config=spec.train, seed=s,
              threads=n_workers)
        per_sample_cross_entropy(model, X_test, y_test, threads=n_workers)
    threads_s = time.perf_counter() - t0
    return {"n_trainings": int(len(masks)), "n_workers": int(n_workers),
            "processes_s": processes_s, "threads_s": threads_s,
            "ratio_threads_over_processes": threads_s / processes_s,
            "pool_startup_s": startup, "torch": torch.__version__,
            "machine": machine_info()}
