"""iif_ref: Integrated Influence data attribution, exact where it can be.

The closed-form linear reference (:mod:`iif_ref.linear`) and the metrics
(:mod:`iif_ref.metrics`) need only NumPy and SciPy. The projection kernels
(:mod:`iif_ref.kernels`) load Numba or CuPy lazily, and the torch side
(:mod:`iif_ref.neural`) is imported only when used, so ``import iif_ref`` needs neither
numba, cupy, torch nor a GPU.
"""
__version__ = "0.1.0"

#: Public subpackages and modules, imported on first attribute access (``iif_ref.linear``)
#: so that ``import iif_ref`` stays light.
_SUBMODULES = ("bench", "datasets", "distributed", "errors", "kernels", "linear", "metrics",
               "models", "neural", "retraining", "synthetic", "testing")

__all__ = ["__version__", "attribute", *_SUBMODULES]


def __getattr__(name):
    # Lazy (PEP 562): `iif_ref.attribute` pulls in torch only when a user asks for it.
    if name == "attribute":
        from iif_ref.neural import attribute
        return attribute
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"iif_ref.{name}")
    raise AttributeError(f"module 'iif_ref' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
