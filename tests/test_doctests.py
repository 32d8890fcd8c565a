"""Every ``Examples`` section of the package's docstrings runs, as the user would type it.

Modules are found by scanning the installed package's sources for ``>>>`` (no import at
collection); each runs with the optional dependencies it needs, else skips saying which.
"""
from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import iif_ref

OPTIONAL = ("torch", "numba", "dask", "distributed", "zarr", "matplotlib", "sklearn", "cupy")


def _modules_with_examples():
    names = []
    for root in map(Path, iif_ref.__path__):
        for path in sorted(root.rglob("*.py")):
            if ">>>" in path.read_text(encoding="utf-8"):
                parts = path.relative_to(root).with_suffix("").parts
                parts = parts[:-1] if parts[-1] == "__init__" else parts
                names.append(".".join(("iif_ref",) + parts))
    return sorted(set(names))


MODULES = _modules_with_examples()


def test_the_scan_finds_the_documented_modules():
    assert {"iif_ref.linear", "iif_ref.metrics"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {exc.name}, which is not installed")
        raise
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name)
             if t.examples and t.name.startswith(name)]
    assert tests, f"{name} has '>>>' in its source but no docstring example was found"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
