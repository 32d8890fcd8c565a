"""Where the package finds the files CMake built or installed for it.

A wheel (``pip install .`` / ``pip wheel .``, built by scikit-build-core from
``CMakeLists.txt``) carries them inside the package:

* ``iif_ref/_lib/``: ``libiif_host.so`` and ``libiif_cuda_emulation.so``;
* ``iif_ref/_kernels/``: the CUDA sources (``*.cu``, ``*.cuh``) that the CuPy backend compiles
  with NVRTC, and the ``*.fatbin`` files where the build found nvcc.

They are looked up in the package's own directories (``iif_ref.__path__``, which in a
scikit-build-core editable install also names the directory holding the built files). When
the package is imported from a source checkout (an editable install, or ``PYTHONPATH``),
recognised by the ``CMakeLists.txt`` beside the package, the checkout's ``kernels/`` come
first, so that an edited kernel is the one compiled, and its developer build ``build/``
comes after the package's libraries. An environment variable overrides each lookup.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["KERNEL_DIR_ENV", "package_dirs", "source_checkout", "find"]

#: Environment variable naming the directory of the CUDA sources explicitly.
KERNEL_DIR_ENV = "IIF_REF_KERNEL_DIR"


def package_dirs():
    """The directories of the ``iif_ref`` package, in import order."""
    import iif_ref
    return [Path(p) for p in iif_ref.__path__]


def source_checkout():
    """The source checkout the package is imported from, or ``None`` when installed."""
    for directory in package_dirs():
        root = directory.resolve().parent
        if (root / "CMakeLists.txt").is_file() and (root / "kernels").is_dir():
            return root
    return None


def find(subdir, name, *, checkout_dir, checkout_first=False):
    """First existing ``<package dir>/<subdir>/<name>`` or ``<checkout>/<checkout_dir>/<name>``.

    Parameters
    ----------
    subdir : str
        Folder inside the package (``"_lib"`` or ``"_kernels"``).
    name : str
        File name; ``""`` asks for the folder itself.
    checkout_dir : str
        Folder of a source checkout that holds the same file (``"build"`` or ``"kernels"``).
    checkout_first : bool, optional
        Look in the source checkout before the package (for sources, which a build copies).

    Returns
    -------
    pathlib.Path
        The file found, or, when there is none, where an installed package would hold it
        (so that an error message can name it).
    """
    candidates = [d / subdir / name for d in package_dirs()]
    root = source_checkout()
    if root is not None:
        candidates.insert(0 if checkout_first else len(candidates), root / checkout_dir / name)
    for path in candidates:
        if path.exists():
            return path
    return candidates[0]
