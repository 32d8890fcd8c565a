"""Command-line entry point: ``iif-ref reproduce NAME [options]``.

The paper's tables and figures are the modules of :mod:`iif_ref.reproduce`, each with a
``main(argv)`` function; they run from any install and any folder and write to
``./results/`` (``--out DIR`` elsewhere; see :mod:`iif_ref.reproduce._output` for
``--full`` and the caches). ``iif-ref reproduce --help`` lists them with their
descriptions, and ``iif-ref reproduce NAME --help`` shows the options of one.

The benchmark and sweep scripts ``validation/NAME.py`` of a source checkout run the same
way and are listed apart; their folder is ``$IIF_REF_VALIDATION_DIR`` if set, else the
``validation/`` of the checkout the package is imported from, else ``./validation`` (an
installed package run inside a checkout).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import shutil
import sys
import textwrap
from pathlib import Path

import iif_ref
from iif_ref import _resources, reproduce
from iif_ref._optional import MissingDependencyError, require

#: Environment variable naming the folder of the benchmark and sweep scripts explicitly.
VALIDATION_DIR_ENV = "IIF_REF_VALIDATION_DIR"

_USAGE = "iif-ref reproduce [-h] [--list] NAME [options of NAME]"


def validation_dir():
    """The folder of the benchmark and sweep scripts (see the module docstring); ``None``
    when none exists.

    Returns
    -------
    pathlib.Path or None
    """
    env = os.environ.get(VALIDATION_DIR_ENV)
    if env:
        return Path(env)
    root = _resources.source_checkout()
    for candidate in ([root / "validation"] if root is not None else []) + [
            Path.cwd() / "validation"]:
        if candidate.is_dir():
            return candidate
    return None


def paper_reproductions():
    """``{name: source file}`` of the paper's tables and figures, in the paper's order."""
    return {name: Path(importlib.util.find_spec(f"iif_ref.reproduce.{name}").origin)
            for name in reproduce.PAPER}


def checkout_scripts():
    """``{name: path}`` of the benchmark and sweep scripts with a ``main`` (may be empty)."""
    directory = validation_dir()
    if directory is None or not directory.is_dir():
        return {}
    return {p.stem: p for p in sorted(directory.glob("*.py"))
            if not p.stem.startswith("_") and p.stem not in reproduce.PAPER
            and "def main(" in p.read_text()}


def describe(path):
    """Description of a reproduction: the first paragraph of its docstring, whole.

    Read without importing the module, so that listing needs no optional dependency.
    """
    return reproduce.description(ast.get_docstring(ast.parse(Path(path).read_text())))


def _load(name, path):
    if name in reproduce.PAPER:
        return importlib.import_module(f"iif_ref.reproduce.{name}")
    spec = importlib.util.spec_from_file_location(f"iif_ref_validation_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _section(title, available, width):
    pad = max(len(n) for n in available) + 2
    lines = [title]
    for name, path in available.items():
        lines.append(textwrap.fill(describe(path), width=width, initial_indent=f"  {name:<{pad}}",
                                   subsequent_indent=" " * (pad + 2)))
    return lines


def _listing(paper, scripts):
    width = max(60, min(100, shutil.get_terminal_size((100, 24)).columns))
    lines = _section("the paper's tables and figures (quick by default, written to ./results/; "
                     "--full runs the paper's protocol):", paper, width)
    if scripts:
        lines += [""] + _section("benchmarks and sweeps of this source checkout "
                                 f"({validation_dir()}):", scripts, width)
    return "\n".join(lines)


def _reproduce_parser(sub):
    rep = sub.add_parser(
        "reproduce", add_help=False, usage=_USAGE,
        help="run a reproduction of one of the paper's tables or figures",
        description="Run a reproduction of one of the paper's tables or figures. Results go "
                    "to ./results/ (or --out DIR); only --full, run from a source checkout, "
                    "writes its published record docs/results/.")
    rep.add_argument("name", nargs="?", metavar="NAME",
                     help="the reproduction to run (listed below); the arguments after it "
                          "are its own options")
    rep.add_argument("--list", action="store_true",
                     help="print the names: the paper's tables and figures, then the "
                          "checkout's benchmarks and sweeps")
    rep.add_argument("-h", "--help", action="store_true",
                     help="show this help, or with NAME the options of that reproduction")
    return rep


def _check_needs(name):
    """Import what reproduction ``name`` needs, or raise with the extra to install."""
    for module in reproduce.NEEDS.get(name, ()):
        require(module, f"iif-ref reproduce {name}")


def main(argv=None):
    """Run ``iif-ref``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="iif-ref", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {iif_ref.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rep = _reproduce_parser(sub)
    args, rest = parser.parse_known_args(argv)

    paper, scripts = paper_reproductions(), checkout_scripts()
    if args.list:
        print("the paper's tables and figures:", ", ".join(paper))
        if scripts:
            print("benchmarks and sweeps of this source checkout:", ", ".join(scripts))
        return 0
    if args.name is None:
        print(rep.format_help() + "\n" + _listing(paper, scripts))
        return 0
    available = {**paper, **scripts}
    if args.name not in available:
        print(f"unknown reproduction {args.name!r}; the paper's: {', '.join(paper)}"
              + (f"; this checkout's benchmarks and sweeps: {', '.join(scripts)}"
                 if scripts else ""), file=sys.stderr)
        return 2
    try:
        if not args.help:
            _check_needs(args.name)
        result = _load(args.name, available[args.name]).main(
            (["--help"] if args.help else []) + rest)
    except MissingDependencyError as exc:
        print(exc, file=sys.stderr)
        return 1
    except SystemExit as exc:  # argparse's --help and usage errors inside the reproduction
        if isinstance(exc.code, str):   # SystemExit("message"): the message is the error
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
