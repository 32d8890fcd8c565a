"""The package as installed: where it finds its compiled libraries and CUDA sources.

CI (``.ci/run``) installs the wheel into a fresh environment and sets
``IIF_REF_EXPECT_INSTALLED=1``; the tests marked ``installed`` then prove that the suite runs
against that wheel, not the checkout, and that the wheel carries every file CMake built.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import iif_ref
from iif_ref import _resources
from iif_ref.kernels import _cupy_backend, _host

REPO = Path(__file__).resolve().parents[1]
installed = pytest.mark.skipif(
    os.environ.get("IIF_REF_EXPECT_INSTALLED") != "1",
    reason="checks of the installed wheel; .ci/run sets IIF_REF_EXPECT_INSTALLED=1")


@installed
def test_suite_imports_the_installed_wheel_not_the_checkout():
    package = Path(iif_ref.__file__).resolve()
    assert REPO not in package.parents, f"iif_ref imported from the checkout: {package}"
    assert _resources.source_checkout() is None


@installed
def test_wheel_carries_both_libraries_and_they_load():
    # Not library_path(): the host tests' fixture may point IIF_REF_HOST_LIB at a fresh
    # CMake build, which would hide a library missing from the wheel.
    package_dir = Path(iif_ref.__file__).resolve().parent
    for name in (_host._LIB_NAME, _host._EMULATION_LIB_NAME):
        path = _resources.find("_lib", name, checkout_dir="build")
        assert path.is_file() and package_dir in path.resolve().parents, path
    lib = _resources.find("_lib", _host._LIB_NAME, checkout_dir="build")
    code = ("import iif_ref.kernels._host as h; "
            "print(h.library_path(), h.load().iif_host_abi_version())")
    env = {k: v for k, v in os.environ.items() if k != _host.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    assert out == [str(lib), str(_host._ABI_VERSION)]


@installed
def test_wheel_carries_every_cuda_source_the_backend_compiles():
    kernel_dir = Path(_cupy_backend.KERNEL_DIR)
    package_dir = Path(iif_ref.__file__).resolve().parent
    assert kernel_dir.resolve() == package_dir / "_kernels"
    shipped = {p.name for p in kernel_dir.iterdir()}
    in_checkout = {p.name for p in (REPO / "kernels").glob("*.cu*")}
    assert in_checkout <= shipped, f"missing from the wheel: {in_checkout - shipped}"
    for name in _cupy_backend.KERNELS:
        assert '#include "' not in _cupy_backend.kernel_source(name)


def _layout(tmp_path, *, checkout):
    """A fake site-packages package and (optionally) a checkout beside a package copy."""
    site = tmp_path / "site" / "iif_ref"
    (site / "_lib").mkdir(parents=True)
    (site / "_lib" / "lib.so").write_text("installed")
    (site / "_kernels").mkdir()
    (site / "_kernels" / "k.cu").write_text("installed")
    dirs = [site]
    if checkout:
        root = tmp_path / "checkout"
        (root / "iif_ref").mkdir(parents=True)
        (root / "CMakeLists.txt").write_text("")
        (root / "kernels").mkdir()
        (root / "kernels" / "k.cu").write_text("edited")
        (root / "build").mkdir()
        (root / "build" / "lib.so").write_text("developer build")
        dirs.append(root / "iif_ref")
    return dirs


def test_installed_lookup_uses_the_package_directory_only(tmp_path, monkeypatch):
    dirs = _layout(tmp_path, checkout=False)
    monkeypatch.setattr(_resources, "package_dirs", lambda: dirs)
    assert _resources.source_checkout() is None
    assert _resources.find("_lib", "lib.so", checkout_dir="build").read_text() == "installed"
    kernels = _resources.find("_kernels", "", checkout_dir="kernels", checkout_first=True)
    assert (kernels / "k.cu").read_text() == "installed"
    # A missing file is reported where an installed package would hold it.
    assert _resources.find("_lib", "none.so", checkout_dir="build") == \
        tmp_path / "site" / "iif_ref" / "_lib" / "none.so"


def test_editable_lookup_prefers_built_libraries_and_checkout_sources(tmp_path, monkeypatch):
    # An editable install: the built files sit in site-packages, the sources in the checkout;
    # an edited kernel must be the one compiled, and the installed build beats a stale build/.
    dirs = _layout(tmp_path, checkout=True)
    monkeypatch.setattr(_resources, "package_dirs", lambda: dirs)
    assert _resources.source_checkout() == tmp_path / "checkout"
    assert _resources.find("_lib", "lib.so", checkout_dir="build").read_text() == "installed"
    kernels = _resources.find("_kernels", "", checkout_dir="kernels", checkout_first=True)
    assert (kernels / "k.cu").read_text() == "edited"


def test_environment_variables_override_both_lookups(tmp_path):
    env = dict(os.environ, IIF_REF_KERNEL_DIR=str(tmp_path / "k"),
               IIF_REF_HOST_LIB=str(tmp_path / "h.so"))
    code = ("from iif_ref.kernels import _cupy_backend as c, _host as h; "
            "print(c.KERNEL_DIR); print(h.library_path()); print(h.emulation_library_path())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    assert out == [str(tmp_path / "k"), str(tmp_path / "h.so"),
                   str(tmp_path / _host._EMULATION_LIB_NAME)]


def test_documented_installs_come_from_a_checkout_or_a_wheel():
    # The package is on no index: `pip install "iif_ref[...]"` fails for a new user.
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    commands = [(doc.name, m.group(1)) for doc in docs
                for m in re.finditer(r"pip install ([^`\n]+)", doc.read_text(encoding="utf-8"))]
    assert any(name == "user-guide.md" for name, _ in commands)
    for name, command in commands:
        for arg in shlex.split(command.split("#")[0].split("&&")[0]):
            if re.match(r"iif[_-]ref\b", arg):
                assert "@ file://" in arg, f"{name}: {command!r} installs from an index"
