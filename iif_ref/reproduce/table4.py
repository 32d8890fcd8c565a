"""Reproduce Table 4 of the paper (appendix C): LDS of IIF, IF and TracIn on synthetic
linear regression with Gaussian (N) or Laplace (L) noise on training & test targets.

The paper does not state the noise levels of Table 4; σn = σs = 1 (the middle column of
Table 1) is used, and Laplace noise is scaled to the same standard deviation.
``iif-ref reproduce table4 [--full] [--sweep] [--out DIR]``.
"""
import sys

from iif_ref.reproduce._linear_protocol import Setting, run_table

SETTINGS = (
    Setting("N&L", "N&L", 1.0, 1.0, "gaussian", "laplace",
            paper={"IIF": 0.789, "IF": 0.688, "TracIn": 0.654}),
    Setting("L&N", "L&N", 1.0, 1.0, "laplace", "gaussian",
            paper={"IIF": 0.767, "IF": 0.571, "TracIn": 0.550}),
    Setting("L&L", "L&L", 1.0, 1.0, "laplace", "laplace",
            paper={"IIF": 0.801, "IF": 0.628, "TracIn": 0.601}),
)


def main(argv=None):
    return run_table("table4", "Table 4 — LDS under Gaussian/Laplace noise (σn = σs = 1)",
                     SETTINGS, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
