"""Command-line entry point: ``iif-ref reproduce NAME [options]``.

The paper's reproductions are the modules of :mod:`iif_ref.reproduce`, each with a
``main(argv)`` function; ``iif-ref reproduce --help`` lists them with a one-line description
each, and ``iif-ref reproduce NAME --help`` shows the options of one. The benchmark and sweep
scripts ``validation/NAME.py`` of a source checkout run the same way; their folder is
``$IIF_REF_VALIDATION_DIR`` if set, else the ``validation/`` of the checkout the package is
imported from, else ``./validation`` (a package installed from a wheel, run inside its
checkout).
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

from iif_ref import _resources

#: Environment variable naming the folder of the reproductions explicitly.
VALIDATION_DIR_ENV = "IIF_REF_VALIDATION_DIR"

_USAGE = "iif-ref reproduce [-h] [--list] NAME [options of NAME]"


def validation_dir():
    """The folder of the reproductions (see the module docstring); ``None`` when none exists.

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


def _paper_reproductions():
    from iif_ref import reproduce
    return {name: Path(importlib.util.find_spec(f"iif_ref.reproduce.{name}").origin)
            for name in reproduce.PAPER}


def _reproductions():
    available = _paper_reproductions()
    directory = validation_dir()
    if directory is not None and directory.is_dir():
        available.update({p.stem: p for p in sorted(directory.glob("*.py"))
                          if not p.stem.startswith("_") and p.stem not in available
                          and "def main(" in p.read_text()})
    return available


def describe(path):
    """One-line description of a reproduction: the first paragraph of its docstring.

    Read without importing the module, so that listing needs no optional dependency.
    """
    doc = ast.get_docstring(ast.parse(Path(path).read_text())) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _load(path):
    if path.parent == Path(importlib.util.find_spec("iif_ref.reproduce").origin).parent:
        return importlib.import_module(f"iif_ref.reproduce.{path.stem}")
    spec = importlib.util.spec_from_file_location(f"iif_ref_validation_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _listing(available):
    width = max(60, min(100, shutil.get_terminal_size((100, 24)).columns))
    pad = max(len(n) for n in available) + 2
    lines = ["reproductions (quick by default; --full runs the paper's protocol and writes the "
             "published record docs/results/):"]
    for name, path in available.items():
        lines.append(textwrap.fill(describe(path), width=width, initial_indent=f"  {name:<{pad}}",
                                   subsequent_indent=" " * (pad + 2)))
    return "\n".join(lines)


def _reproduce_parser(sub):
    rep = sub.add_parser(
        "reproduce", add_help=False, usage=_USAGE,
        help="run a reproduction of one of the paper's tables or figures",
        description="Run a reproduction of one of the paper's tables or figures. Quick runs "
                    "write to the scratch folder results/ (or --out DIR); only --full writes "
                    "the published record in docs/results/.")
    rep.add_argument("name", nargs="?", metavar="NAME",
                     help="the reproduction to run (listed below); the arguments after it "
                          "are its own options")
    rep.add_argument("--list", action="store_true", help="print the reproductions' names")
    rep.add_argument("-h", "--help", action="store_true",
                     help="show this help, or with NAME the options of that reproduction")
    return rep


def main(argv=None):
    """Run ``iif-ref``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="iif-ref", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rep = _reproduce_parser(sub)
    args, rest = parser.parse_known_args(argv)

    available = _reproductions()
    if not available and (args.list or args.name is None or args.help):
        print(f"usage: {_USAGE}\nno reproductions found (looked in ${VALIDATION_DIR_ENV}, "
              "the checkout's validation/ and ./validation; they run from a source checkout)",
              file=sys.stderr)
        return 2
    if args.list:
        print("available reproductions:", ", ".join(available))
        return 0
    if args.name is None:
        print(rep.format_help() + "\n" + _listing(available))
        return 0
    if args.name not in available:
        print(f"unknown reproduction {args.name!r}; available: {', '.join(available) or 'none'}",
              file=sys.stderr)
        return 2
    try:
        result = _load(available[args.name]).main((["--help"] if args.help else []) + rest)
    except SystemExit as exc:  # argparse's --help and usage errors inside the reproduction
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
