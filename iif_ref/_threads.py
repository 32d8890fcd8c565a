"""One busy thread pool at a time: NumPy/SciPy BLAS and Numba run single-threaded inside
torch work.

The torch entry points do their heavy work (per-sample gradients, the projection GEMM)
in torch's own thread pool, and only small work elsewhere: the ``P × P`` projected
Fisher and its Cholesky solve in NumPy/SciPy BLAS, the projection matrix ``A`` in a
Numba kernel, once per call. A multi-threaded call of either leaves worker threads
busy-waiting (OpenBLAS, and Numba's OpenMP runtime beside torch's), and on a machine
with as many cores as torch threads they take the cores torch's next GEMM needs, or
torch's spinning threads slow them. Measured on the 2-core benchmark machine
(``validation/bench_neural.py``, IIF with K = 5): 1.10-1.18 s per call with two-thread
OpenBLAS, 0.72-0.78 s with one thread; ``A`` (17,226 × 512) took 42 ms in two Numba
threads right after torch work and 6 ms in one. The limits hold for the duration of a
call and the caller's settings are restored after it.
"""
from __future__ import annotations

import contextlib
import functools

__all__ = ["blas_one_thread", "torch_owns_the_cores"]

_controller = None


def blas_one_thread():
    """Context manager: NumPy's and SciPy's BLAS limited to one thread, the caller's
    setting restored after (a no-op without threadpoolctl)."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return contextlib.nullcontext()
        import scipy.linalg  # noqa: F401  (load SciPy's BLAS before it is inspected)
        _controller = ThreadpoolController()   # inspecting the loaded libraries: ~0.5 ms
    return _controller.limit(limits=1, user_api="blas")


@contextlib.contextmanager
def _numba_limit():
    try:
        import numba
    except ImportError:            # the NumPy backend generates A
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def torch_owns_the_cores(fn):
    """Decorator: run ``fn`` with NumPy's and SciPy's BLAS and Numba limited to one
    thread each (torch's own threads are untouched); nested calls keep the limits."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with blas_one_thread(), _numba_limit():
            return fn(*args, **kwargs)
    return wrapper
