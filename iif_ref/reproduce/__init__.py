"""Reproductions of the paper's tables and figures, run as ``iif-ref reproduce NAME``.

Each module ``iif_ref.reproduce.NAME`` (one of :data:`PAPER`) has a ``main(argv)`` entry
point that parses its own options and returns the exit code; the first paragraph of its
docstring is its description in ``iif-ref reproduce --help``. The linear ones (Tables 1
and 4, Figure 1) share ``_linear_protocol``, the neural ones (Tables 2 and 3, Figure 2)
``_neural_protocol``; where they write and cache is in ``_output``. Modules are imported
only when run, so that listing them needs no optional dependency.
"""

#: The paper's tables and figures, in the order the listing shows them.
PAPER = ("table1", "table2", "table3", "table4", "figure1", "figure2")

#: Optional modules each reproduction imports (see :data:`iif_ref._optional.EXTRAS` for
#: the extra that installs each); ``iif-ref reproduce`` checks them before it starts, so a
#: missing one fails at once instead of after the computation.
NEEDS = {"table1": (), "table4": (), "figure1": ("matplotlib",),
         "table2": ("torch", "numba", "sklearn", "matplotlib"),
         "table3": ("torch", "numba", "sklearn"),
         "figure2": ("torch", "numba", "sklearn", "matplotlib")}


def description(doc):
    """A module docstring's first paragraph on one line: its whole first sentence(s)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())
