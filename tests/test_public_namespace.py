"""A public module shows its API and nothing else: dir(), tab completion and ``import *``."""
import rlcompleter

import iif_ref.linear as linear


def test_linear_namespace_is_exactly_its_api():
    public = sorted(name for name in dir(linear) if not name.startswith("_"))
    assert public == sorted(linear.__all__)
    for name in linear.__all__:
        assert getattr(linear, name).__module__ == "iif_ref.linear", name
    # What its imports used to expose (np, math, dataclass, ...) is not reachable as API.
    for leaked in ("np", "math", "numbers", "dataclass", "solve_triangular",
                   "as_float_array", "IndefiniteObjectiveError", "annotations"):
        assert not hasattr(linear, leaked), leaked


def test_tab_completion_of_linear_offers_only_its_api():
    completer = rlcompleter.Completer({"linear": linear})
    offered, state = [], 0
    while (match := completer.complete("linear.", state)) is not None:
        offered.append(match)
        state += 1
    public = sorted(m.removeprefix("linear.").rstrip("(") for m in offered
                    if not m.removeprefix("linear.").startswith("_"))
    assert public == sorted(linear.__all__)


def test_star_import_of_linear_is_its_api():
    namespace = {}
    exec("from iif_ref.linear import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(linear.__all__)
