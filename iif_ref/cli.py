"""Command-line entry point: ``iif-ref reproduce NAME [options]``.

Each reproduction is a module ``validation/NAME.py`` of the source checkout with a
``main(argv)`` function; ``iif-ref reproduce --list`` shows them. Reproductions use only
the public API of :mod:`iif_ref`.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

VALIDATION_DIR = Path(__file__).resolve().parent.parent / "validation"


def _reproductions():
    if not VALIDATION_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(VALIDATION_DIR.glob("*.py"))
            if not p.stem.startswith("_") and "def main(" in p.read_text()}


def _load(path):
    spec = importlib.util.spec_from_file_location(f"iif_ref_validation_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    """Run ``iif-ref``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="iif-ref", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run a reproduction of the paper's tables/figures",
                         add_help=False)
    rep.add_argument("name", nargs="?", help="reproduction name (see --list)")
    rep.add_argument("--list", action="store_true", help="list the reproductions")
    args, rest = parser.parse_known_args(argv)

    available = _reproductions()
    if args.list or args.name is None:
        if not available:
            print(f"no reproductions found: {VALIDATION_DIR} is missing "
                  "(reproductions run from a source checkout)", file=sys.stderr)
            return 2
        print("available reproductions:", ", ".join(available))
        return 0
    if args.name not in available:
        print(f"unknown reproduction {args.name!r}; available: {', '.join(available) or 'none'}",
              file=sys.stderr)
        return 2
    result = _load(available[args.name]).main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
