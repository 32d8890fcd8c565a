"""Reproduce Table 1 of the paper: LDS of IIF, IF and TracIn on synthetic linear
regression under three (training, test) Gaussian noise levels.

``iif-ref reproduce table1 [--full] [--sweep] [--out DIR]``; see
``docs/reproduction-linear.md`` for the protocol and the choices the paper leaves open.
"""
import sys

from iif_ref.reproduce._linear_protocol import Setting, run_table

SETTINGS = (
    Setting("n0.1_s1", "σn=0.1, σs=1", 0.1, 1.0,
            paper={"IIF": 0.859, "IF": 0.856, "TracIn": 0.815}),
    Setting("n1_s1", "σn=1, σs=1", 1.0, 1.0,
            paper={"IIF": 0.744, "IF": 0.634, "TracIn": 0.607}),
    Setting("n1_s0.1", "σn=1, σs=0.1", 1.0, 0.1,
            paper={"IIF": 0.768, "IF": 0.423, "TracIn": 0.405}),
)


def main(argv=None):
    return run_table("table1", "Table 1 — LDS under Gaussian noise levels (σn, σs)",
                     SETTINGS, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
