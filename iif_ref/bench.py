"""A small, generic benchmark harness: machine description, timing, memory, roofline, JSON.

Benchmarks in ``validation/`` use these helpers so that every published figure comes with
the description of the machine that produced it and is a ratio measured within one run
(new vs reference, or vs the dense BLAS GEMM "roofline" of the same machine), never a bare
time compared across runs.

Functions
---------
machine_info
    CPU model, core counts, memory, BLAS/OpenMP thread pools, package versions.
time_callable
    Median and spread of wall times of a zero-argument callable (``time.perf_counter``).
peak_memory
    Peak Python/NumPy allocation (``tracemalloc``) and resident-set growth while a
    callable runs.
gemm_roofline
    Time of a BLAS GEMM ``G @ A`` with ``A`` materialised: the bound a projection kernel
    (which never stores ``A``) is compared against.
write_results
    Atomic JSON file with ``meta``, ``machine`` and ``rows``.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import numbers
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

from iif_ref._io import atomic_write
from iif_ref._validation import check_positive_int

__all__ = [
    "TimingResult",
    "MemoryResult",
    "machine_info",
    "time_callable",
    "peak_memory",
    "gemm_roofline",
    "write_results",
    "write_text_atomic",
]

# Packages whose versions a benchmark result should record. Versions are read from the
# installed metadata, so recording them imports nothing (torch and cupy stay unloaded).
_VERSIONED_PACKAGES = ("iif_ref", "numpy", "scipy", "numba", "torch", "cupy-cuda12x",
                       "cupy", "threadpoolctl", "traker", "dattri", "fast_jl")


# --------------------------------------------------------------------------- machine
def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _total_memory_bytes():
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _physical_cores():
    try:
        import psutil
        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def _thread_pools():
    """BLAS / OpenMP thread pools as threadpoolctl reports them, else NumPy's build config."""
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        keep = ("user_api", "internal_api", "num_threads", "version", "threading_layer",
                "architecture", "filepath")
        return {"source": "threadpoolctl",
                "pools": [{k: info.get(k) for k in keep if k in info}
                          for info in threadpoolctl.threadpool_info()]}
    try:
        config = np.show_config(mode="dicts")
        blas = config.get("Build Dependencies", {}).get("blas", {})
        return {"source": "numpy.show_config", "pools": [dict(blas)]}
    except (TypeError, AttributeError):
        return {"source": "unavailable", "pools": []}


def _versions():
    out = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _gpus():
    """GPU names and memory from ``nvidia-smi`` when it exists; an empty list otherwise."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return gpus


def machine_info():
    """Describe the machine a benchmark runs on.

    Returns
    -------
    dict
        JSON-serialisable: ``cpu_model``, ``logical_cores`` (``os.cpu_count``),
        ``usable_cores`` (the scheduler affinity of this process, which is what a run may
        use), ``physical_cores`` (psutil, else None), ``memory_bytes``, ``platform``,
        ``thread_pools`` (threadpoolctl's BLAS/OpenMP pools with their thread counts and
        libraries when threadpoolctl is installed, else NumPy's build configuration),
        ``env_threads`` (the ``*_NUM_THREADS`` variables that are set), ``versions``
        (from package metadata, so nothing is imported) and ``gpus`` (from
        ``nvidia-smi``; empty without one).

    Examples
    --------
    >>> info = machine_info()
    >>> info["logical_cores"] >= 1
    True
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": _physical_cores(),
        "memory_bytes": _total_memory_bytes(),
        "platform": platform.platform(),
        "thread_pools": _thread_pools(),
        "env_threads": {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")},
        "versions": _versions(),
        "gpus": _gpus(),
    }


# --------------------------------------------------------------------------- timing
@dataclasses.dataclass(frozen=True)
class TimingResult:
    """Wall times of repeated calls, in seconds.

    Attributes
    ----------
    times : tuple of float
        One entry per timed repeat (warm-up calls excluded).
    median, minimum, maximum : float
        Summary of ``times``.
    iqr : float
        Inter-quartile range of ``times`` (0 for fewer than two repeats); the spread to
        quote next to the median.
    warmup : int
        Untimed calls made first (JIT compilation, caches, lazy imports).
    """

    times: tuple
    median: float
    minimum: float
    maximum: float
    iqr: float
    warmup: int

    @property
    def repeats(self):
        return len(self.times)

    def as_dict(self):
        """JSON-serialisable form."""
        out = dataclasses.asdict(self)
        out["times"] = list(self.times)
        out["repeats"] = self.repeats
        return out


def time_callable(fn, *, repeats=5, warmup=1):
    """Time a zero-argument callable.

    Parameters
    ----------
    fn : callable
        Called as ``fn()``; its return value is discarded. Work it launches
        asynchronously (a GPU kernel) must be synchronised inside ``fn``.
    repeats : int, optional
        Number of timed calls (>= 1).
    warmup : int, optional
        Number of untimed calls first (>= 0).

    Returns
    -------
    TimingResult
        Median, minimum, maximum, inter-quartile range and every time.

    Notes
    -----
    Uses ``time.perf_counter`` (monotonic, highest available resolution). The median
    is reported because a single outlier (a page fault, another process) moves it least.

    Examples
    --------
    >>> r = time_callable(lambda: sum(range(1000)), repeats=3, warmup=1)
    >>> r.repeats, r.minimum <= r.median <= r.maximum
    (3, True)
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    repeats = check_positive_int(repeats, "repeats")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral):
        raise TypeError(f"warmup must be an integer, got {type(warmup).__name__}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(int(warmup)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return TimingResult(times=tuple(times), median=statistics.median(times),
                        minimum=min(times), maximum=max(times), iqr=iqr, warmup=int(warmup))


# --------------------------------------------------------------------------- memory
@dataclasses.dataclass(frozen=True)
class MemoryResult:
    """Memory used while a callable ran, in bytes.

    Attributes
    ----------
    tracemalloc_peak : int
        Peak of the bytes allocated through Python's allocators *during the call* and
        tracked by ``tracemalloc``. NumPy registers its data buffers with tracemalloc, so
        this includes array data allocated by NumPy; it excludes memory that native
        libraries allocate themselves (BLAS workspaces, Numba/CUDA/torch allocators).
    rss_delta : int or None
        Resident set size after the call minus before (psutil). Negative when the call
        freed memory; None without psutil.
    rss_peak_delta : int or None
        Highest resident set size sampled every ``interval`` seconds by a background
        thread during the call, minus the RSS before it (psutil). Sees native
        allocations that tracemalloc misses, but can miss spikes shorter than the
        sampling interval. None without psutil.
    maxrss_increase : int
        Growth of the process's lifetime RSS high-water mark (``resource.getrusage``,
        ``ru_maxrss``). Zero unless the call pushed the process above its previous peak,
        so it is a lower bound on the call's peak; exact for the first large call.
    result : object
        The callable's return value (not serialised).
    """

    tracemalloc_peak: int
    rss_delta: int | None
    rss_peak_delta: int | None
    maxrss_increase: int
    result: object = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self):
        """JSON-serialisable form (without ``result``)."""
        return {"tracemalloc_peak": self.tracemalloc_peak, "rss_delta": self.rss_delta,
                "rss_peak_delta": self.rss_peak_delta,
                "maxrss_increase": self.maxrss_increase}


def _maxrss_bytes():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def peak_memory(fn, *, interval=0.001):
    """Measure the memory a zero-argument callable uses.

    Parameters
    ----------
    fn : callable
        Called once as ``fn()``.
    interval : float, optional
        Seconds between RSS samples of the background sampler (psutil only).

    Returns
    -------
    MemoryResult
        See its attributes for exactly what each number measures; ``.result`` holds
        ``fn()``'s return value.

    Notes
    -----
    Tracing with ``tracemalloc`` slows pure-Python code several-fold, so do not time
    a call and measure its memory in the same run. If tracemalloc is already tracing,
    its peak is reset for this call and tracing is left running afterwards.

    Examples
    --------
    >>> m = peak_memory(lambda: np.ones(1_000_000))
    >>> m.tracemalloc_peak >= 8_000_000
    True
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(interval, bool) or not isinstance(interval, numbers.Real) \
            or not math.isfinite(interval) or interval <= 0:
        raise ValueError(f"interval must be a finite number > 0, got {interval!r}")
    try:
        import psutil
        proc = psutil.Process()
    except ImportError:
        proc = None

    rss_before = proc.memory_info().rss if proc is not None else None
    peak_rss = [rss_before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss = proc.memory_info().rss
            if rss > peak_rss[0]:
                peak_rss[0] = rss
            stop.wait(interval)

    sampler = None
    if proc is not None:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    maxrss_before = _maxrss_bytes()
    try:
        result = fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if not was_tracing:
            tracemalloc.stop()
        if sampler is not None:
            stop.set()
            sampler.join()
    maxrss_after = _maxrss_bytes()
    if proc is not None:
        rss_after = proc.memory_info().rss
        peak_rss[0] = max(peak_rss[0], rss_after)
        rss_delta = int(rss_after - rss_before)
        rss_peak_delta = int(peak_rss[0] - rss_before)
    else:
        rss_delta = rss_peak_delta = None
    return MemoryResult(tracemalloc_peak=int(peak - base), rss_delta=rss_delta,
                        rss_peak_delta=rss_peak_delta,
                        maxrss_increase=int(maxrss_after - maxrss_before), result=result)


# --------------------------------------------------------------------------- roofline
def gemm_roofline(n, m, p, dtype=np.float64, *, repeats=5, warmup=1, seed=0):
    """Time the BLAS GEMM ``G @ A`` with ``G`` of shape ``(n, m)`` and ``A`` materialised.

    A projection ``Phi = G A`` (Eq. 17/31) that generates ``A`` on the fly cannot beat
    the same product with ``A`` already in memory by much, so this time is the yardstick
    projection kernels are reported against (as a ratio measured in the same run).

    Parameters
    ----------
    n, m, p : int
        Rows of ``G`` (samples), inner dimension (``n_params``), columns of ``A``
        (``proj_dim``).
    dtype : numpy floating dtype, optional
        float32 or float64.
    repeats, warmup : int, optional
        Passed to :func:`time_callable`.
    seed : int, optional
        Seed of the standard-normal inputs (their values do not affect BLAS speed).

    Returns
    -------
    dict
        ``n``, ``m``, ``p``, ``dtype``, ``seconds`` (median), ``iqr``, ``gflops``
        (``2 n m p / seconds / 1e9``), ``bytes`` (of ``G``, ``A`` and the output) and
        ``timing`` (:meth:`TimingResult.as_dict`). Allocating ``G`` and ``A`` is not
        timed; the output buffer is preallocated and written with ``np.matmul(out=)``.

    Examples
    --------
    >>> r = gemm_roofline(8, 16, 4, repeats=2)
    >>> r["gflops"] > 0
    True
    """
    n = check_positive_int(n, "n")
    m = check_positive_int(m, "m")
    p = check_positive_int(p, "p")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n, m)).astype(dtype)
    A = rng.standard_normal((m, p)).astype(dtype)
    out = np.empty((n, p), dtype=dtype)
    timing = time_callable(lambda: np.matmul(G, A, out=out), repeats=repeats, warmup=warmup)
    flops = 2.0 * n * m * p
    return {"n": n, "m": m, "p": p, "dtype": dtype.name, "seconds": timing.median,
            "iqr": timing.iqr, "gflops": flops / timing.median / 1e9 if timing.median > 0
            else float("inf"),
            "bytes": int(G.nbytes + A.nbytes + out.nbytes), "timing": timing.as_dict()}


# --------------------------------------------------------------------------- output
def _to_json(obj):
    """``json.dump`` default: NumPy scalars/arrays, dataclasses, paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.dtype):
        return obj.name
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_results(path, rows, meta=None, *, machine=True):
    """Write benchmark rows to a JSON file atomically.

    Parameters
    ----------
    path : str or path-like
        Destination; parent directories are created.
    rows : sequence of dict
        One dict per measurement.
    meta : dict, optional
        What was run (command, grid, seeds, notes).
    machine : bool or dict, optional
        ``True`` adds :func:`machine_info`; a dict is stored as given; ``False`` omits it.

    Returns
    -------
    pathlib.Path
        The written path.

    Notes
    -----
    Written with :func:`write_text_atomic`, so a reader never sees a partial file.
    Non-finite floats are rejected (strict JSON has no NaN): record a missing
    value as ``None`` with a reason.
    """
    if isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__iter__"):
        raise TypeError(f"rows must be a sequence of dicts, got {type(rows).__name__}")
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"rows[{i}] must be a dict, got {type(row).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
    payload = {"meta": dict(meta or {})}
    if machine is True:
        payload["machine"] = machine_info()
    elif isinstance(machine, dict):
        payload["machine"] = machine
    elif machine is not False:
        raise TypeError(f"machine must be a bool or dict, got {type(machine).__name__}")
    payload["rows"] = rows
    try:
        text = json.dumps(payload, indent=2, default=_to_json, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"rows or meta contain a non-finite float ({exc}); "
                         "store None and a reason instead") from None
    return write_text_atomic(path, text + "\n")


def write_text_atomic(path, text):
    """Write ``text`` (UTF-8) to ``path`` so that a reader never sees a partial file.

    Parameters
    ----------
    path : str or path-like
        Destination; parent directories are created.
    text : str
        The whole content, written as given.

    Returns
    -------
    pathlib.Path
        ``path`` as a :class:`pathlib.Path`.

    Notes
    -----
    Written by :func:`iif_ref._io.atomic_write`: a temporary file in the destination
    directory, flushed and ``fsync``-ed, renamed over ``path`` (``os.replace``, atomic on
    one file system); the temporary file is removed if anything fails.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return atomic_write(path, text.encode("utf-8"))
