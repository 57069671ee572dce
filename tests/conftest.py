"""The ``slow`` marker (registered in pyproject.toml): every test that trains a model on real data or runs
Flower, Ray or a SIGKILL end to end. ``pytest -m "not slow"`` is the fast loop; the full suite before a commit.

A test is slow where it trains, and is marked there: a test that trains in its own body carries
``@pytest.mark.slow``; a test on a module fixture that trains (Step 1, DPMs, attackers) or starts a Flower run
is marked here by that fixture's name, so a new test on one of them is marked too. ``--durations`` on the fast
loop shows a test that slipped through."""

from __future__ import annotations

import pytest

# Module fixtures that train or start runs before any test can use them (test_defences' ``world`` and
# ``paper`` train Step 1 and DPMs on real images).
SLOW_FIXTURES = {"grid", "report", "tiny_run", "sim_run", "image_runs", "deployment", "model", "world", "paper"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
