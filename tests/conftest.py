"""Shared pytest configuration: hypothesis profiles, and skips folded per file and reason.

``ci`` (selected when the CI environment variable is set) is derandomised so a red
CI run is reproducible; ``dev`` explores with fresh randomness.
``HYPOTHESIS_EXAMPLES_SCALE=10`` multiplies every property test's ``max_examples`` by 10,
those set with ``@settings(max_examples=...)`` included (a profile alone cannot: explicit
settings override it), for an occasional long exploratory run.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "dev", max_examples=50, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(items):
    scale = int(os.environ.get("HYPOTHESIS_EXAMPLES_SCALE", "1"))
    if scale == 1:
        return
    seen = set()
    for item in items:
        fn = getattr(item, "obj", None)
        current = getattr(fn, "_hypothesis_internal_use_settings", None)
        if current is None or id(fn) in seen:   # not a property test, or already scaled
            continue
        seen.add(id(fn))
        fn._hypothesis_internal_use_settings = settings(
            current, max_examples=current.max_examples * scale)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # The short summary (-ra) folds skips by (file, line, reason), so a backend missing
    # here (cupy without a GPU) printed one line per skipping test function. Located at
    # the test's own file without a line, they fold per test file and reason: every skip
    # is still counted and shown with its reason (raised in a helper or in pytest's
    # unittest support, it is shown at the test that skipped), and a skipped test still
    # counts as skipped, never as passed.
    report = yield
    if (report.skipped and not hasattr(report, "wasxfail")
            and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3):
        report.longrepr = (str(item.path), None, report.longrepr[2])
    return report
