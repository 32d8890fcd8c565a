"""Reproductions of the paper's tables and figures, run as ``iif-ref reproduce NAME``.

Each module ``iif_ref.reproduce.NAME`` (one of :data:`PAPER`) has a ``main(argv)`` entry
point that parses its own options and returns the exit code; the first paragraph of its
docstring is its one-line description in ``iif-ref reproduce --help``. The linear ones
(Tables 1 and 4, Figure 1) share ``_linear_protocol``, the neural ones (Tables 2 and 3,
Figure 2) ``_neural_protocol``. Modules are imported only when run, so that listing them
needs no optional dependency.
"""

#: The paper's tables and figures, in the order the listing shows them.
PAPER = ("table1", "table2", "table3", "table4", "figure1", "figure2")
