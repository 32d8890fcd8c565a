"""The package boundary: light imports and the command-line dispatcher."""
import subprocess
import sys

import pytest

from iif_ref import cli


def test_import_needs_no_optional_dependency():
    # One direction of dependency (STYLE.md): the NumPy layers never pull in torch,
    # numba, cupy or dask; a fresh interpreter shows what an import really loads.
    code = ("import sys, iif_ref, iif_ref.linear, iif_ref.metrics, iif_ref.kernels, "
            "iif_ref.testing, iif_ref.synthetic; "
            "print(sorted(m for m in ('torch', 'numba', 'cupy', 'dask', 'hypothesis') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_attribute_is_exposed_lazily():
    import iif_ref
    from iif_ref.neural import attribute

    assert iif_ref.attribute is attribute
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        iif_ref.nonexistent  # noqa: B018


def test_subpackages_load_on_attribute_access_and_dir_lists_them():
    # A fresh interpreter: in this one the test modules have imported the subpackages already.
    code = ("import iif_ref, sys; print(iif_ref.linear.__name__, 'torch' in sys.modules); "
            "print(' '.join(n for n in dir(iif_ref) if not n.startswith('_')))")
    first, names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.splitlines()
    assert first == "iif_ref.linear False"
    public = set(names.split())
    assert {"attribute", "linear", "metrics", "kernels", "neural", "testing",
            "distributed"} <= public
    import iif_ref
    assert public == set(iif_ref.__all__) - {"__version__"}


def test_cli_lists_every_reproduction(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("table1", "table2", "table3", "table4", "figure1", "figure2"):
        assert name in listed


def test_cli_unknown_reproduction_is_an_error(capsys):
    assert cli.main(["reproduce", "table99"]) == 2
    assert "unknown reproduction 'table99'" in capsys.readouterr().err
