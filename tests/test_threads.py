"""The torch entry points run NumPy/SciPy BLAS and Numba single-threaded, and restore the
caller's settings (iif_ref._threads)."""
import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from iif_ref._threads import torch_owns_the_cores
from iif_ref.neural import trak


def _blas_threads():
    return {d["filepath"]: d["num_threads"] for d in threadpool_info()
            if d["user_api"] == "blas"}


def test_limits_hold_inside_and_are_restored_after():
    numba = pytest.importorskip("numba")
    before_blas, before_numba = _blas_threads(), numba.get_num_threads()
    seen = {}

    @torch_owns_the_cores
    def probe():
        seen["blas"], seen["numba"] = _blas_threads(), numba.get_num_threads()
        seen["torch"] = torch.get_num_threads()
        return 7

    torch_threads = torch.get_num_threads()
    assert probe() == 7
    assert seen["blas"] and set(seen["blas"].values()) == {1}
    assert seen["numba"] == 1
    assert seen["torch"] == torch_threads          # torch keeps its threads
    assert _blas_threads() == before_blas
    assert numba.get_num_threads() == before_numba


def test_limits_are_restored_when_the_call_raises():
    numba = pytest.importorskip("numba")
    before_blas, before_numba = _blas_threads(), numba.get_num_threads()
    X = np.zeros((3, 2))
    with pytest.raises(ValueError):
        trak(torch.nn.Linear(2, 2), "cross_entropy", X, np.array([0, 1, 5]), X, [0, 1, 0])
    assert _blas_threads() == before_blas
    assert numba.get_num_threads() == before_numba



def test_every_small_factorisation_runs_on_one_blas_thread():
    # The limit is applied per call: a second factorisation is limited like the first,
    # and the caller's setting is back after each.
    from iif_ref.kernels._fisher import _blas_threads as factor_limit
    before = _blas_threads()
    for _ in range(2):
        with factor_limit(512):
            assert set(_blas_threads().values()) == {1}
        assert _blas_threads() == before
    with factor_limit(4096):                 # larger ones keep the caller's setting
        assert _blas_threads() == before
