"""``python -m iif_ref``: the ``iif-ref`` command (see :mod:`iif_ref.cli`)."""
import sys

from iif_ref.cli import main

if __name__ == "__main__":
    sys.exit(main())
