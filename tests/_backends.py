"""Shared test data for the kernel backends: pytest parameters and Philox known answers.

Imported by the ``tests/test_kernels_*.py`` files (pytest puts ``tests/`` on ``sys.path``).
"""
import pytest

from iif_ref.kernels._registry import backend_names, backend_status


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
