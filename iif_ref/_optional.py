"""Optional dependencies: import one, or fail with the extra that installs it.

``numpy``, ``scipy``, ``threadpoolctl``, ``tqdm``, ``numba``, ``scikit-learn`` and
``matplotlib`` are dependencies of the package (so every quick reproduction runs once
torch is installed); torch and everything else come with an extra of ``pyproject.toml``
(``pip install "iif_ref[EXTRA]"``). A package that is missing all the same (an install
with ``--no-deps``) is still named with the extra that brings it.
"""
from __future__ import annotations

import importlib

__all__ = ["EXTRAS", "MissingDependencyError", "require"]

#: The extra that installs each optional top-level module.
EXTRAS = {"torch": "torch", "sklearn": "data", "matplotlib": "plots", "numba": "fast",
          "dask": "distributed", "distributed": "distributed", "zarr": "distributed",
          "dattri": "peers", "trak": "peers"}

#: Distribution names where they differ from the module's.
_DISTRIBUTION = {"sklearn": "scikit-learn", "trak": "traker"}


class MissingDependencyError(ImportError):
    """An optional package is not installed; the message names the extra to install."""


def _missing(top):
    try:
        importlib.import_module(top)
    except ModuleNotFoundError as exc:
        return exc.name == top
    return False


def require(module, purpose):
    """Import ``module`` (dotted), or raise :class:`MissingDependencyError`.

    Parameters
    ----------
    module : str
        Module to import, e.g. ``"matplotlib.pyplot"``; its top-level package must be a
        key of :data:`EXTRAS`.
    purpose : str
        What needs it, for the message (``"iif-ref reproduce figure1"``).

    Returns
    -------
    module
    """
    top = module.partition(".")[0]
    extra = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if not _missing(top):
            raise  # the package is there; a module inside it or one it imports is missing
        pin = '"torch==2.13.0" ' if top == "torch" else ""
        raise MissingDependencyError(
            f"{purpose} needs {_DISTRIBUTION.get(top, top)}, which is not installed: install "
            f"iif_ref's extra [{extra}] (from a checkout: python -m pip install "
            f"{pin}\".[{extra}]\")", name=top) from exc
