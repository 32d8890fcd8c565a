"""iif_ref: Integrated Influence data attribution, exact where it can be.

The closed-form linear reference (:mod:`iif_ref.linear`) and the metrics
(:mod:`iif_ref.metrics`) need only NumPy and SciPy. The projection kernels
(:mod:`iif_ref.kernels`) load Numba or CuPy lazily, and the torch side
(:mod:`iif_ref.neural`) is imported only when used, so ``import iif_ref`` needs neither
numba, cupy, torch nor a GPU.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "attribute"]


def __getattr__(name):
    # Lazy: `iif_ref.attribute` pulls in torch only when a user asks for it.
    if name == "attribute":
        from iif_ref.neural import attribute
        return attribute
    raise AttributeError(f"module 'iif_ref' has no attribute {name!r}")
