"""The attack suite as tasks (`python -m sim.attack` on Ray or `--sequential`) on the attack-tiny preset:
the same stored figures either way, `--plan` naming exactly the missing cells, and a run whose worker
or driver is SIGKILLed losing nothing and recomputing nothing that was stored.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

import sim.attack as attack
from entities.attacks.base import CLEAN, DPM, RAW
from entities.attacks.card import CellStore
from entities.data import DataError, find_archive

try:
    find_archive("cifar10")
    DATA = []
except DataError:
    DATA = ["data.dataset=digits"]

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["prior", "psi", "decoder", "transfer", "substitute"]  # optimize: per-image steps, no model to share
SHARE = [CLEAN, DPM, RAW]


def settings(root: Path, *extra: str) -> list[str]:
    return ["--config", "attack-tiny", "--attacks", *FAMILIES, "--share", *SHARE, "--results-root", str(root),
            "--set", "threads=1", *DATA, *extra]


def figures(run_dir: Path) -> pd.DataFrame:
    cells = pd.read_csv(run_dir / "report.csv").set_index(["victim", "mode", "attacker"])
    return cells[["status", "disclosure", "identification", "ssim", "psnr"]].sort_index()


def stored(run_dir: Path) -> dict[str, int]:
    """Each stored cell's key and the time its record was written."""
    return {p.stem: p.stat().st_mtime_ns for p in (run_dir / "artefacts" / "cells").glob("*.json")}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    """The cells in one process; the root keeps Step 1, the DPMs and the attacker's trained models."""
    root = tmp_path_factory.mktemp("sequential")
    attack.main(["--sequential", *settings(root)])
    return root


def without_attack_models(src: Path, dst: Path) -> None:
    """A copy of ``src``'s artefacts less everything the attacker trained, so a run on ``dst`` trains it again."""
    shutil.copytree(src / "artefacts", dst / "artefacts")
    for folder in (dst / "artefacts").glob("*/private/*/attack"):
        shutil.rmtree(folder)


def test_ray_stores_the_same_figures_as_one_process(sequential, tmp_path):
    without_attack_models(sequential, tmp_path)
    attack.main(["--num-cpus", "2", "--no-dashboard", *settings(tmp_path)])
    ours = tmp_path / "attack" / "attack-tiny"
    assert list((tmp_path / "artefacts").glob("*/private/*/attack/decoder-*.pt")), "Ray tasks trained the models"
    pd.testing.assert_frame_equal(figures(ours), figures(sequential / "attack" / "attack-tiny"), atol=1e-6)
    report = json.loads((ours / "report.json").read_text())
    assert {(w["victim"], w["mode"]) for w in report["worst"]} == {(v, m) for v in ("E1", "E4") for m in SHARE}


def test_plan_lists_exactly_the_missing_cells(sequential, capsys):
    run_dir = sequential / "attack" / "attack-tiny"
    keys = sorted(stored(run_dir))
    gone = keys[::7]
    for key in gone:
        (run_dir / "artefacts" / "cells" / f"{key}.json").unlink()
    kept = stored(run_dir)
    table = attack.main(["--plan", *settings(sequential)])
    out = capsys.readouterr().out
    assert set(table.loc[~table["stored"], "key"]) == set(gone)
    assert set(table["key"]) == set(keys)
    assert f"{len(keys)} cells: {len(keys) - len(gone)} stored, {len(gone)} to run" in out
    assert " of work, " in out and "no estimate" not in out  # estimated from the stored cells' seconds
    assert sum(line.startswith("to run") for line in out.splitlines()) == len(gone)
    run = attack.main(["--sequential", *settings(sequential)])
    assert len(run) == len(keys)
    after = stored(run_dir)
    assert set(after) == set(keys)
    assert {k: after[k] for k in kept} == kept  # only the missing cells were computed and written


def start(root: Path, run_name: str) -> subprocess.Popen:
    """The suite on a local Ray instance of two CPUs, as its own process (and process group)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "sim.attack", "--num-cpus", "2", "--no-dashboard",
                             "--run-name", run_name, *settings(root)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_cells(run_dir: Path, proc: subprocess.Popen, n: int, timeout: float = 300) -> None:
    end = time.time() + timeout
    while len(stored(run_dir)) < n:
        assert proc.poll() is None, f"the run ended before {n} cells were stored: {proc.stderr.read()[-2000:]}"
        assert time.time() < end, "no progress"
        time.sleep(0.2)


def busy_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The driver's Ray workers running a cell now (Ray titles a busy worker ``ray::<task name>``)."""
    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and " vs " in title:
            out.append(p)
    return out


def test_a_killed_worker_is_retried_and_a_rerun_recomputes_nothing(sequential):
    run_dir = sequential / "attack" / "killed-worker"
    proc = start(sequential, "killed-worker")
    try:
        wait_for_cells(run_dir, proc, 3)
        end = time.time() + 60
        while not (workers := busy_workers(proc)):
            assert time.time() < end and proc.poll() is None, "no worker was busy"
            time.sleep(0.1)
        workers[0].send_signal(signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = stored(run_dir)
    cells = attack.main(["--sequential", "--run-name", "killed-worker", *settings(sequential)])
    assert len(before) == len(cells) and stored(run_dir) == before  # nothing lost, nothing rewritten
    pd.testing.assert_frame_equal(figures(run_dir), figures(sequential / "attack" / "attack-tiny"), atol=1e-6)


def test_a_killed_driver_resumes_with_only_the_missing_cells(sequential):
    run_dir = sequential / "attack" / "killed-driver"
    proc = start(sequential, "killed-driver")
    try:
        wait_for_cells(run_dir, proc, 5)
    finally:
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in family:  # the driver, its Ray processes and workers: nothing is left to finish a cell
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    before = stored(run_dir)
    assert before, "cells finished before the kill are stored"
    store = CellStore(run_dir)
    assert all(store.get(k)["key"] == k for k in before)
    table = attack.main(["--plan", "--run-name", "killed-driver", *settings(sequential)])
    missing = set(table.loc[~table["stored"], "key"])
    assert missing and not missing & set(before)
    attack.main(["--sequential", "--run-name", "killed-driver", *settings(sequential)])
    after = stored(run_dir)
    assert set(after) == set(before) | missing
    assert {k: after[k] for k in before} == before  # the stored cells were not written again
    pd.testing.assert_frame_equal(figures(run_dir), figures(sequential / "attack" / "attack-tiny"), atol=1e-6)
