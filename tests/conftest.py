"""The ``slow`` marker (registered in pyproject.toml): every test that needs a model trained on real data
or runs Flower, Ray or a SIGKILL end to end. ``pytest -m "not slow"`` is the fast loop; the full suite
before a commit. Marked by the fixtures a test uses, so a new test on one of them is marked too."""

from __future__ import annotations

import pytest

# Module fixtures that train (Step 1, DPMs, attackers) or start Flower runs before any test can use them.
SLOW_FIXTURES = {"grid", "report", "tiny_run", "sim_run", "image_runs", "deployment", "model"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
