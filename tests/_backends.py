"""Shared test data for the kernel backends: pytest parameters and Philox known answers.

Imported by the ``tests/test_kernels_*.py`` files (pytest puts ``tests/`` on ``sys.path``).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from iif_ref.kernels import _host
from iif_ref.kernels._registry import backend_names, backend_status

REPO = Path(__file__).resolve().parents[1]
# Build folder of this session's CMake build of the host libraries (built at most once).
_HOST_BUILD = []


def _backend_params():
    """One ``pytest.param`` per registered backend, skipped with the reason it is unavailable."""
    params = []
    for name in backend_names():
        ok, reason = backend_status(name)
        marks = [pytest.mark.skipif(not ok, reason=f"backend {name!r} unavailable: {reason}")]
        if name == "cupy":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


BACKEND_PARAMS = _backend_params()

# Random123 tests/kat_vectors, the three "philox4x32 10" lines (docs/rng.md):
# (counter words, key words, expected output words).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


def host_library(tmp_path_factory):
    """Body of a fixture yielding the loaded host library (``libiif_host.so``).

    The library in place is used when it and its CUDA-emulation twin load; otherwise both
    are built with CMake into a temporary directory (once per session) and selected
    through ``_host.ENV_VAR`` for the fixture's lifetime. Skips when that is impossible.
    Use it in a fixture, so that the decision is taken when a test runs, after any build,
    not when its module is imported.
    """
    ok, reason = _host.available()
    if ok and _host.emulation_library_path().is_file():
        yield _host.load()
        return
    if not _HOST_BUILD:
        if shutil.which("cmake") is None:
            pytest.skip(f"host library unavailable ({reason}) and cmake is not installed")
        build = tmp_path_factory.mktemp("iif_host_build")
        # The host library alone: the nvcc compile check is the top-level build's job.
        for cmd in (["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     "-DIIF_BUILD_CUDA=OFF"],
                    ["cmake", "--build", str(build), "--target", "iif_host",
                     "iif_cuda_emulation"]):
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        _HOST_BUILD.append(build)
    previous = os.environ.get(_host.ENV_VAR)
    os.environ[_host.ENV_VAR] = str(_HOST_BUILD[0] / Path(_host.library_path()).name)
    _host._lib = _host._emulation_lib = None
    try:
        yield _host.load()
    finally:
        if previous is None:
            os.environ.pop(_host.ENV_VAR, None)
        else:
            os.environ[_host.ENV_VAR] = previous
        _host._lib = _host._emulation_lib = None
