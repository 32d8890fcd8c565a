"""Where the reproductions write their results and keep their caches.

* Results go to ``--out DIR`` when given, else to ``./results/`` (the folder the command
  is run from), quick or ``--full``. Only a ``--full`` run of the package imported from a
  source checkout (an editable install, or ``PYTHONPATH``) writes the checkout's published
  record ``docs/results/``; run from an installed package, ``--full`` writes
  ``./results/`` and says so.
* Caches (Table 2's retrained subsets, so that a rerun resumes) go to
  ``$IIF_REF_CACHE_DIR`` when set, else to the checkout's ``.iif_cache/`` (source
  checkout), else to the user cache folder ``$XDG_CACHE_HOME/iif_ref`` (default
  ``~/.cache/iif_ref``); never into the installed package.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from iif_ref import _resources

__all__ = ["CACHE_DIR_ENV", "add_out_argument", "cache_dir", "output_dir", "published_dir",
           "save_figure"]

#: Environment variable naming the cache folder explicitly.
CACHE_DIR_ENV = "IIF_REF_CACHE_DIR"


def published_dir():
    """The published record ``<checkout>/docs/results``, or ``None`` when installed."""
    root = _resources.source_checkout()
    return None if root is None else root / "docs" / "results"


def scratch_dir():
    """``./results``: where every run writes unless told otherwise."""
    return Path.cwd() / "results"


def add_out_argument(parser):
    """``--out DIR``, the output option of every reproduction (``--results-dir`` is its old
    name, still accepted)."""
    parser.add_argument("--out", metavar="DIR", type=Path, default=None,
                        help="output directory (default: ./results; --full run from a "
                             "source checkout: its published record docs/results/)")
    parser.add_argument("--results-dir", dest="out", type=Path, help=argparse.SUPPRESS)


def output_dir(args):
    """``args.out``; else ``docs/results`` of the checkout for a ``--full`` run from a
    source checkout; else ``./results`` (with a note when ``--full`` could not publish)."""
    if args.out is not None:
        return Path(args.out)
    if getattr(args, "full", False):
        published = published_dir()
        if published is not None:
            return published
        print(f"note: not run from a source checkout, so --full writes {scratch_dir()}, not "
              "the published record docs/results/", file=sys.stderr)
    return scratch_dir()


def cache_dir(name):
    """The cache folder of reproduction ``name`` (see the module docstring)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env) / name
    root = _resources.source_checkout()
    if root is not None:
        return root / ".iif_cache" / name
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "iif_ref" / name


def save_figure(fig, path, *, dpi=110):
    """Write a matplotlib figure to ``path`` atomically (a temporary file renamed over
    it, so an interrupted run leaves the old picture whole), close it, return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
