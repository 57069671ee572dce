"""`python -m sim.table5` on the table5-tiny preset: the grid, its resume logic, bad input, Ray.

One sequential grid (real CIFAR-10 images when the shared archive is present, else scikit-learn's
digits) is computed once per session; the other tests reuse its Step 1 artefacts and rows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch

import sim.table5 as table5
from entities.backbone import build_backbone
from entities.data import DataError, find_archive
from entities.pipeline import ArtefactStore, entity_shards, load_task
from entities.pools import Pool, PoolError, save_pool
from entities.presets import load_config
from entities.train import train_decider
from sim.grid import ROW_IDS, fedavg, prepare

try:
    find_archive("cifar10")
    DATA = []
except DataError:
    DATA = ["data.dataset=digits"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("table5")


def settings(root, *extra: str) -> list[str]:
    return ["--config", "table5-tiny", "--set", f"results_root={root}", "threads=1", *DATA, *extra]


def cfg_of(root, *extra: str):
    return load_config("table5-tiny", {"results_root": str(root), "threads": "1",
                                       **dict(s.split("=", 1) for s in [*DATA, *extra])})


@pytest.fixture(scope="module")
def grid(root):
    """The whole grid once, sequentially: every later test builds on its stored rows."""
    run = table5.main(["--sequential", *settings(root)])["dpm"]
    return run, root / "table5" / "table5-tiny"


def test_grid_writes_every_row_beside_the_paper(grid, root):
    run, run_dir = grid
    assert sorted(run.computed) == sorted((r, 0) for r in ROW_IDS)
    table = pd.read_csv(run_dir / "table5.csv", dtype={"row": str})
    assert list(table["row"]) == list(ROW_IDS)
    assert table["top-1"].between(0, 100).all() and table["top-5"].between(0, 100).all()
    assert table.loc[:11, "paper top-1"].notna().all() and table.loc[12:, "paper top-1"].isna().all()
    # each row trains on exactly the union the paper lists
    cfg = cfg_of(root)
    n = {k: len(v) for k, v in entity_shards(cfg, load_task(cfg)).items()}
    size = dict(zip(table["row"], table["train size"], strict=True))
    assert [size[r] for r in "1234"] == [n["E1"], n["E2"], n["E3"], n["E4"]]
    assert size["5"] == len(load_task(cfg).S.train_labels)
    assert size["6"] == size["7"] == size["8"] == n["E1"] + n["E2"]
    assert size["10"] == n["E1"] + n["E2"] + 2 * n["E3"]
    assert size["12"] == size["all4"] == size["fedavg"] == sum(n.values())
    md = (run_dir / "table5.md").read_text()
    assert "P1(φ1(S1)) ∪ P2(φ1(S2)) ∪ P3(φ1(S3)) ∪ φ1(S3)" in md and "row 12 − row 4" in md
    assert 0 < (run_dir / "table5.png").stat().st_size < 1_000_000
    pools = pd.read_csv(run_dir / "pools.csv")
    assert list(pools["entity"]) == ["E1", "E2", "E3", "E4"] and pools["ssim_pool"].notna().all()
    assert (pools["disclosure_ssim"] >= pools[["ssim_pool", "ssim_pool_inverted"]].max(axis=1) - 1e-6).all()
    curves = pd.read_csv(run_dir / "curves.csv")
    assert {f"DPM {e}" for e in n} < set(curves["model"]) and curves["value"].notna().all()
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert "--sequential" in prov["command"] and prov["wall_seconds"] > 0


def test_rerun_reuses_every_finished_row(grid, root):
    again = table5.main(["--sequential", *settings(root)])["dpm"]
    assert again.computed == [] and len(again.reused) == len(ROW_IDS)
    assert again.results == grid[0].results


def test_changed_setting_recomputes_only_rows_it_affects(grid, root):
    run = table5.main(["--sequential", "--rows", "4", "6", *settings(root, "decider.epochs=1")])["dpm"]
    assert run.computed == [("6", 0)] and run.reused == [("4", 0)]  # raw row 4 has no decider
    assert run.results[("6", 0)]["key"] != grid[0].results[("6", 0)]["key"]


def test_killed_run_keeps_finished_rows_and_resumes(grid, root, monkeypatch):
    fresh = settings(root, "decider.epochs=2")
    real = table5.feature_row

    def dies_on_row_8(row, *args, **kwargs):
        if row.id == "8":
            raise FloatingPointError("row 8 decider: loss became nan")
        return real(row, *args, **kwargs)

    monkeypatch.setattr(table5, "feature_row", dies_on_row_8)
    with pytest.raises(table5.GridError, match="row 8 seed 0 failed"):
        table5.main(["--sequential", "--rows", "7", "8", *fresh])
    monkeypatch.setattr(table5, "feature_row", real)
    resumed = table5.main(["--sequential", "--rows", "7", "8", *fresh])["dpm"]
    assert resumed.computed == [("8", 0)] and resumed.reused == [("7", 0)]


def test_seeds_give_mean_and_spread(grid, root):
    run = table5.main(["--sequential", "--rows", "4", "--seeds", "2", *settings(root)])["dpm"]
    assert run.reused == [("4", 0)] and run.computed == [("4", 1)]
    table = pd.read_csv(root / "table5" / "table5-tiny" / "table5.csv")
    top1 = [run.results[("4", s)]["top1"] for s in (0, 1)]
    assert table["top-1"][0] == pytest.approx(np.mean(top1))
    assert table["top-1 sd"][0] == pytest.approx(np.std(top1, ddof=1))


def test_unknown_row_id_is_named(grid, root):
    with pytest.raises(ValueError, match="'13'"):
        table5.main(["--sequential", "--rows", "7", "13", *settings(root)])


def flower_dir(root, name: str, cfg, pools: dict[str, Pool], store_key: str):
    out = root / "flower" / name
    (out / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"store_key": store_key}))
    for entity, pool in pools.items():
        save_pool(pool, out / "artefacts" / "pools" / f"{entity}.pt",
                  {"store_key": store_key, "entity": entity})
    return out


def test_pools_from_a_flower_run(grid, root):
    cfg = cfg_of(root)
    inputs = prepare(cfg)  # Step 1 and the DPMs are stored already: only featurizing runs
    good = flower_dir(root, "good", cfg, inputs.pools, ArtefactStore(cfg).key)
    run = table5.main(["--sequential", "--rows", "6", "7", "--from-flower", str(good), *settings(root)])["dpm"]
    # row 6 has no pools, so it is the stored one; row 7 is keyed by the pools' contents
    assert run.reused == [("6", 0)] and run.computed == [("7", 0)]
    assert run.results[("7", 0)]["top1"] == pytest.approx(grid[0].results[("7", 0)]["top1"], abs=2.0)

    other = flower_dir(root, "other-config", cfg, inputs.pools, "0123456789")
    with pytest.raises(PoolError, match="other-config.*store key 0123456789"):
        table5.main(["--sequential", "--rows", "7", "--from-flower", str(other), *settings(root)])

    broken = copy.deepcopy(inputs.pools)
    broken["E2"].features[0, 0, 0, 0] = float("nan")
    bad = flower_dir(root, "nan-pool", cfg, broken, ArtefactStore(cfg).key)
    before = sorted((root / "table5" / "table5-tiny" / "rows").iterdir())
    with pytest.raises(PoolError, match=r"nan-pool/artefacts/pools/E2\.pt.*non-finite"):
        table5.main(["--sequential", "--from-flower", str(bad), *settings(root)])
    assert sorted((root / "table5" / "table5-tiny" / "rows").iterdir()) == before

    shutil.rmtree(good / "artefacts")
    with pytest.raises(PoolError, match="E1.pt does not exist"):
        table5.main(["--sequential", "--rows", "9", "--from-flower", str(good), *settings(root)])


def test_dirichlet_partition_is_its_own_run(grid, root):
    run = table5.main(["--sequential", "--rows", "4", "--partition", "dirichlet", "--alpha", "0.3",
                       *settings(root)])["dpm"]
    assert run.computed == [("4", 0)]
    saved = json.loads((root / "table5" / "table5-tiny-dirichlet0.3" / "config.json").read_text())
    assert saved["data"]["partition"] == "dirichlet" and saved["data"]["alpha"] == 0.3


def test_fedavg_is_flowers_example_weighted_mean():
    cfg = load_config("table5-tiny", {"table5.fedavg_rounds": 1, "table5.fedavg_local_epochs": 1})
    phi2 = build_backbone("resnet20", 5).split("conv4_1")[1]
    gen = torch.Generator().manual_seed(0)
    clients = [Pool(torch.randn(n, 64, 8, 8, generator=gen), np.arange(n) % 5) for n in (40, 120)]
    expected = []
    for k, pool in enumerate(clients):
        local = copy.deepcopy(phi2)
        train_decider(local, pool.features, pool.labels, dataclasses.replace(cfg.decider, epochs=1), seed=1007 + k)
        expected.append(local.state_dict())
    merged = fedavg(copy.deepcopy(phi2), clients, cfg, seed=7).state_dict()
    for name, value in merged.items():
        if value.is_floating_point():
            want = (40 * expected[0][name] + 120 * expected[1][name]) / 160
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged["head.fc.weight"], expected[0]["head.fc.weight"])


def test_ray_runs_rows_as_tasks(grid, root, monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    run = table5.main(["--rows", "4", "6", "fedavg", "--no-dashboard", "--num-cpus", "2",
                       *settings(root, "decider.epochs=2", "table5.fedavg_rounds=1")])["dpm"]
    assert sorted(run.computed) == [("6", 0), ("fedavg", 0)] and run.reused == [("4", 0)]
    assert all(0 <= r["top1"] <= 100 for r in run.results.values())
    import ray

    assert not ray.is_initialized()  # the command shuts its Ray instance down


def test_sharing_modes_share_the_rows_that_need_no_pools(grid, root):
    mdp = ("mdp.steps=3", "mdp.batch_size=200")
    runs = table5.main(["--sequential", "--rows", "6", "7", "--share", "dpm", "mdp", "raw", *settings(root, *mdp)])
    assert list(runs) == ["dpm", "mdp", "raw"]
    assert runs["dpm"].reused == [("6", 0), ("7", 0)]  # the DPM rows of the first grid
    for mode in ("mdp", "raw"):  # row 6 shares nothing: stored once, reused by every mode
        assert runs[mode].reused == [("6", 0)] and runs[mode].computed == [("7", 0)]
    run_dir = root / "table5" / "table5-tiny"
    assert "φ1(MDP(S2))" in (run_dir / "table5-mdp.md").read_text()
    table = pd.read_csv(run_dir / "sharing.csv").set_index("shared")
    assert list(table.index) == ["DPM pools", "MDP", "raw images"]
    shown = table["SSIM(shared, real image it shows)"]
    assert shown["raw images"] == 1 and shown["DPM pools"] < 0.5 < shown["MDP"] < 1
    image_bytes = 4 * np.prod(load_task(cfg_of(root)).S.image_shape)
    assert table["bytes per image"]["MDP"] == image_bytes and table["row 7 top-1"].between(0, 100).all()
    with pytest.raises(ValueError, match="unknown sharing mode 'jpeg'.*dpm, mdp, augmdp, raw"):
        table5.main(["--sequential", "--rows", "7", "--share", "jpeg", *settings(root)])


def test_address_auto_joins_a_running_cluster(grid, root):
    """What users who outgrow one machine do: `ray start --head`, then the grid with `--address auto`."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --block in a session of its own: the cluster is this process group, stopped by its PID at the end
    # (`ray stop` would stop every Ray instance on the machine, a user's runs included).
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    current = Path("/tmp/ray/ray_current_cluster")  # what `--address auto` reads, written by `ray start`
    try:
        deadline = time.monotonic() + 180
        # Up, and named in the address file: `ray status` can answer before `ray start` has written it, and a
        # run started in between found no cluster (CI, once).
        while subprocess.run([ray_cli, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                             timeout=60).returncode != 0 or not (
                current.exists() and current.read_text().strip().endswith(f":{port}")):
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(1)
        run = table5.main(["--rows", "4", "6", "--address", "auto", *settings(root, "decider.lr=0.02")])["dpm"]
        assert run.reused == [("4", 0)] and run.computed == [("6", 0)]
        assert "Run: Ray, 2 CPUs, 1 per row" in (root / "table5" / "table5-tiny" / "table5.md").read_text()
        status = subprocess.run([ray_cli, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0 and "2.0 CPU" in status.stdout  # the command left the cluster up
        # Without --address a run starts its own instance, however many clusters `ray start` left running.
        table5.main(["--rows", "4", "--num-cpus", "1", *settings(root, "decider.lr=0.02")])
        assert "Run: Ray, 1 CPU" in (root / "table5" / "table5-tiny" / "table5.md").read_text()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # ray start --block stops its processes, then its reaper the group
        head.wait(timeout=120)
        # `ray stop` would also forget the cluster; otherwise ray.init() without an address (Flower's simulation)
        # would try to join the dead one.
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    time.sleep(2)
    assert not [p for p in psutil.process_iter() if _in_group(p, head.pid)], "a process of the cluster outlived it"


def _in_group(process: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(process.pid) == group
    except (ProcessLookupError, psutil.Error):
        return False


def test_sigkill_during_a_table5_run_keeps_finished_rows_and_the_rerun_completes(grid, root):
    """A real SIGKILL of ``python -m sim.table5`` once it has stored a new row: every stored row is whole,
    the results root is free again, and the rerun reuses the rows finished before the kill."""
    rows = root / "table5" / "table5-tiny" / "rows"
    args = ["--sequential", *settings(root), "--rows", "4", "--seeds", "4"]
    assert not list(rows.glob("row4-seed2-*.json"))  # seeds 0 and 1 are stored by the tests above, 2 and 3 not
    proc = subprocess.Popen([sys.executable, "-m", "sim.table5", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 300
        while not list(rows.glob("row4-seed2-*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    for path in rows.glob("*.json"):
        json.loads(path.read_text())  # whole: written to a temp file and renamed
    run = table5.main(args)["dpm"]
    assert {("4", 0), ("4", 1), ("4", 2)} <= set(run.reused)
    assert {*run.reused, *run.computed} == {("4", s) for s in range(4)}
