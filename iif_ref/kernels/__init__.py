"""Kernel layer: counter-based random projection and batched projected-Fisher solves.

Importing this package imports neither numba nor cupy; backends load lazily
(see :mod:`iif_ref.kernels._registry` for the backend protocol).
"""
from iif_ref.kernels._registry import available_backends

__all__ = ["available_backends"]
