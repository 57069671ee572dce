"""The ``slow`` marker (registered in pyproject.toml): every test that trains a model on real data or runs
Flower, Ray or a SIGKILL end to end. ``pytest -m "not slow"`` is the fast loop; the full suite before a commit.

A test is slow where it trains, and is marked there: a test that trains in its own body carries
``@pytest.mark.slow``; a test on a module fixture that trains (Step 1, DPMs, attackers) or starts a Flower run
is marked here by that fixture's name, so a new test on one of them is marked too. ``--durations`` on the fast
loop shows a test that slipped through."""

from __future__ import annotations

import os

import pytest
import torch

# Module fixtures that train or start runs before any test can use them (test_defences' ``world`` and
# ``paper`` train Step 1 and DPMs on real images).
SLOW_FIXTURES = {"grid", "report", "tiny_run", "sim_run", "image_runs", "deployment", "model", "world", "paper"}


# Tests that start Flower runs, or a Ray cluster that a Flower simulation's ray.init() would join: one
# pytest-xdist worker runs them one after another.
ONE_AT_A_TIME = "flower-and-ray-clusters"
JOINS_CLUSTERS = {"tests/test_table5.py::test_address_auto_joins_a_running_cluster"}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores as torch threads (and its subprocesses, by
    OMP_NUM_THREADS), not all of them: two workers of two threads each on two cores run slower than one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks slow tests, and groups tests for ``--dist loadgroup``: a file's tests on one worker, so its module
    fixtures (trained models, runs) are computed once; Flower and Ray-cluster tests on one worker together."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        path = item.nodeid.split("::")[0]
        together = path == "tests/test_flower.py" or item.nodeid in JOINS_CLUSTERS
        item.add_marker(pytest.mark.xdist_group(ONE_AT_A_TIME if together else path))
