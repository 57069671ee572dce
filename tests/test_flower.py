"""The Flower app end to end: ``flwr run sim/`` in simulation, the message audit, faulty entities and
Flower's deployment engine with one SuperNode process per entity on 127.0.0.1.

Every Flower process a test starts is stopped by PID (with the processes it spawned). The runs use
their own $FLWR_HOME and ports, so a SuperLink someone else left running is never touched.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from entities.backbone import build_backbone
from entities.data import DataError, find_archive
from entities.pipeline import ArtefactStore, entity_names, entity_shards, load_task
from entities.pools import load_pool, validate_pool
from entities.train import extract_features
from sim import server_app
from sim.app_config import config_from_run_config
from sim.audit import array_digest, matching_images
from sim.client_app import app as client_app
from strategies.pool_exchange import CollaborationError
from strategies.records import SHARED_PARTS


def _settings() -> list[str]:
    """One thread per process; the bundled digits where the CIFAR-10 archive is missing."""
    try:
        find_archive("cifar10")
        return ["threads=1"]
    except DataError:
        return ["threads=1", "data.dataset=digits"]


SETTINGS = _settings()
OFFLINE = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            table[int(entry.name)] = (ppid, cmd)
    return table


def with_descendants(pids: list[int]) -> list[int]:
    table = _proc_table()
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo += [p for p, (ppid, _) in table.items() if ppid == pid]
    return out


def stop(pids: list[int], grace: float = 15.0) -> None:
    """SIGTERM the given processes and everything they spawned; SIGKILL what is left after ``grace``."""
    pids = with_descendants(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in pids):
            time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def sim_run_cmd(results: Path, run_name: str, *extra: str, settings: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "sim.run", "--config", "collab-tiny", "--set", *SETTINGS, *settings,
            "--results-root", str(results), "--run-name", run_name, "--no-stream", *extra]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """One results root for the module: later runs reuse the artefacts of the first one."""
    return tmp_path_factory.mktemp("flower-results")


@pytest.fixture(scope="module")
def sim_run(results, tmp_path_factory) -> SimpleNamespace:
    """``python -m sim.run`` (i.e. ``flwr run sim/`` on the managed simulation SuperLink), tiny preset."""
    home = tmp_path_factory.mktemp("flwr-home")
    port = free_port()
    env = {**os.environ, **OFFLINE, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    try:  # started from another directory: the results root must not depend on the cwd
        proc = subprocess.run(sim_run_cmd(results, "sim"), env=env, cwd=home, capture_output=True, text=True,
                              timeout=900)
    finally:
        table = _proc_table()
        stop([pid for pid, (_, cmd) in table.items() if "flower-superlink" in cmd and f"--port {port}" in cmd])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = config_from_run_config({"preset": "collab-tiny", "overrides": " ".join(SETTINGS),
                                  "results-root": str(results)})
    return SimpleNamespace(out=results / "flower" / "sim", cfg=cfg, stdout=proc.stdout)


def test_simulation_runs_all_steps_and_writes_results(sim_run):
    out, cfg = sim_run.out, sim_run.cfg
    run = pd.read_json(out / "run.json", typ="series")
    assert run["status"] == "completed" and not run["failures"]
    assert [p[0].split(":")[0] for p in run["phases"]] == ["connect", "step 1", "step 2", "step 3"]
    assert all(seconds > 0 for _, seconds in run["phases"])
    df = pd.read_csv(out / "summary.csv")
    assert list(df["entity"]) == entity_names(cfg) and set(df["status"]) == {"ok"}
    assert df[["top1_original", "top1_refined", "top5_refined"]].apply(lambda c: c.between(0, 100)).all().all()
    assert (df["ssim_pool"].abs() < 0.5).all()
    # 64x8x8 float32 features and an int64 label per image, plus the .npy headers of two arrays
    assert df["pool_bytes_per_image"].between(64 * 8 * 8 * 4 + 8, 64 * 8 * 8 * 4 + 8 + 300).all()
    # The default sharing mode, and each sender's disclosure: the ψ SSIM of its pool, either way round.
    assert set(df["share"]) == {"dpm"} and (df["items_shared"] == df["num-examples"]).all()
    assert np.allclose(df["disclosure_ssim"], df[["ssim_pool", "ssim_pool_inverted"]].max(axis=1))
    split = load_task(cfg)
    shards = entity_shards(cfg, split)
    for name in entity_names(cfg):
        others = sum(len(shards[o]) for o in shards if o != name)
        assert df.set_index("entity").loc[name, "received_images"] == others
        pool, meta = load_pool(out / "artefacts" / "pools" / f"{name}.pt")
        assert meta["store_key"] == ArtefactStore(cfg).key and meta["config_digest"] == cfg.digest()
        validate_pool(name, pool, (64, 8, 8), len(cfg.data.task_classes))
        assert np.array_equal(pool.labels, split.S.train_labels[shards[name]])
    assert "Pool per shared image" in (out / "summary.md").read_text()


def test_message_audit_shows_no_dpm_and_no_image_crossing(sim_run):
    out, cfg = sim_run.out, sim_run.cfg
    msgs = pd.read_csv(out / "messages.csv", keep_default_na=False)
    counts = msgs.drop_duplicates(["direction", "message_type", "node_id"]).groupby(
        ["direction", "message_type"]).size().to_dict()
    assert counts == {(d, t): n for d in ("sent", "received") for t, n in
                      (("query.entity", 4), ("train.pretrain", 1), ("train.pool", 4), ("train.refine", 4))}
    arrays = msgs[msgs["kind"] == "array"]
    assert set(arrays["record"]) == {"shared", "pool"}
    pool_rows = arrays[arrays["record"] == "pool"]
    assert set(pool_rows["item"]) == {"features", "labels"}
    assert set(pool_rows.loc[pool_rows["item"] == "features", "dtype"]) == {"float32"}
    assert not arrays["dtype"].isin(["uint8"]).any()
    assert not arrays["shape"].str.endswith("x3x32x32").any()
    assert set(arrays.loc[arrays["record"] == "shared", "message_type"]) == {"train.pretrain", "train.pool"}

    # The shared record holds exactly φ1, φ2 and ψ: the state dicts of the modules, nothing more.
    store = ArtefactStore(cfg)
    backbone = build_backbone(cfg.backbone.name, len(cfg.data.task_classes))
    backbone.load_state_dict(torch.load(store.shared("backbone.pt"), weights_only=True))
    phi1, phi2 = backbone.split(cfg.backbone.hook)
    (psi_file,) = store.root.joinpath("shared").glob("psi-*.pt")
    psi = torch.load(psi_file, weights_only=True)
    expected = {f"phi1.{k}" for k in phi1.state_dict()} | {f"phi2.{k}" for k in phi2.state_dict()}
    expected |= {f"psi.{k}" for k in psi}
    assert set(arrays.loc[arrays["record"] == "shared", "item"]) == expected
    assert {i.split(".")[0] for i in expected} == set(SHARED_PARTS)

    digests = set(arrays["sha256"])
    # Positive control: the audit's digests do match real tensors (the pretrained φ1 crossed).
    assert array_digest(phi1.state_dict()["conv1.0.weight"].numpy()) in digests
    dpm_files = sorted(store.root.joinpath("private").glob("E*/dpm-*.pt"))
    assert len(dpm_files) == 4
    for path in dpm_files:
        for name, tensor in torch.load(path, weights_only=True).items():
            if tensor.numel() > 1:  # a scalar like num_batches_tracked=4 can equal any other counter
                assert array_digest(tensor.numpy()) not in digests, f"{path.parent.name}'s DPM {name} crossed"

    # What crossed as E2's pool is poisoned: not E2's φ1 features, and not its images.
    split = load_task(cfg)
    idx = entity_shards(cfg, split)["E2"]
    pool, _ = load_pool(out / "artefacts" / "pools" / "E2.pt")
    assert array_digest(pool.features.numpy()) in digests
    original = extract_features(phi1, split.S.train_images[idx])
    assert (pool.features - original).abs().mean() > 0.05 * original.abs().mean()
    assert array_digest(split.S.train_images[idx]) not in digests


class LocalGrid(Grid):
    """The real ClientApp called in this process, one Context per node, with faults injected.

    ``faults`` maps a partition-id to what its entity does wrong in step 2: ``raise`` (the ClientApp
    raises), ``nan`` (its pool has a NaN), ``shape`` (its pool has the wrong feature shape) or
    ``range`` (a value of 1.5, outside an image's [0, 1]).
    """

    def __init__(self, run_config: dict, num_nodes: int, faults: dict[int, str]) -> None:
        self.contexts = {1000 + k: Context(run_id=7, node_id=1000 + k, state=RecordDict(), run_config=run_config,
                                           node_config={"partition-id": k, "num-partitions": num_nodes})
                         for k in range(num_nodes)}
        self.faults = {1000 + k: f for k, f in faults.items()}
        self.ids = itertools.count()
        self.payloads: list = []  # the RecordDicts themselves: holding them keeps id() from being recycled

    @property
    def run(self):
        raise NotImplementedError

    def set_run(self, run) -> None:
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(next(self.ids))  # as the SuperLink does
            self.payloads.append(msg.content)
            node = msg.metadata.dst_node_id
            fault = self.faults.get(node) if msg.metadata.message_type == "train.pool" else None
            try:
                if fault == "raise":
                    raise RuntimeError("injected failure")
                reply = client_app(msg, self.contexts[node])
            except Exception as err:  # what a SuperNode does with a ClientApp exception
                replies.append(Message(Error(code=1, reason=repr(err)), reply_to=msg))
                continue
            if fault in ("nan", "shape", "range"):
                key = "features" if "features" in reply.content["pool"] else "images"
                features = reply.content["pool"][key].numpy().copy()
                features = features[:, :, :4, :4].copy() if fault == "shape" else features
                features[0, 0, 0, 0] = {"nan": np.nan, "range": 1.5}.get(fault, features[0, 0, 0, 0])
                reply.content["pool"][key] = Array(features)
            replies.append(reply)
        return replies


def run_in_process(results: Path, run_name: str, faults: dict[int, str], settings: tuple[str, ...] = ()
                   ) -> tuple[Path, LocalGrid]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 0
    run_config = {"preset": "collab-tiny", "overrides": " ".join((*SETTINGS, *settings)), "results-root": str(results),
                  "run-name": run_name, "timeout": 60, "node-wait": 1}
    grid = LocalGrid(run_config, 4, faults)
    server_app.app(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return results / "flower" / run_name, grid


def test_failed_entities_are_left_out_and_recorded(sim_run, results):
    out, grid = run_in_process(results, "faults", {2: "raise", 3: "nan"})
    run = pd.read_json(out / "run.json", typ="series")
    assert run["status"] == "completed"
    assert set(run["failures"]) == {"E3", "E4"}
    assert "injected failure" in run["failures"]["E3"] and "non-finite" in run["failures"]["E4"]
    df = pd.read_csv(out / "summary.csv").set_index("entity")
    assert list(df["status"][["E1", "E2"]]) == ["ok", "ok"]
    assert df.loc["E4", "status"].startswith("step 2:")
    assert df.loc["E1", "received_images"] == df.loc["E2", "num-examples"]  # only E2's pool reached E1
    assert df.loc[["E1", "E2"], "top1_refined"].notna().all() and pd.isna(df.loc["E3", "top1_refined"])
    assert sorted(p.stem for p in (out / "artefacts" / "pools").glob("*.pt")) == ["E1", "E2"]
    assert len({id(p) for p in grid.payloads}) == len(grid.payloads)  # a fresh RecordDict for every message


def test_fewer_than_two_healthy_entities_stop_with_a_clear_error(sim_run, results):
    with pytest.raises(CollaborationError, match="only 1 healthy entities \\(E1\\)"):
        run_in_process(results, "too-few", {1: "shape", 2: "nan", 3: "raise"})
    run = pd.read_json(results / "flower" / "too-few" / "run.json", typ="series")
    assert run["status"] == "failed" and "at least 2" in run["error"]
    assert "features of shape (64, 4, 4)" in run["failures"]["E2"]


# MDP small enough for a test: 5 PGD steps, one batch per entity (the store keeps the sets).
MDP_SETTINGS = ("mdp.steps=5", "mdp.batch_size=200")


@pytest.fixture(scope="module")
def image_runs(sim_run, results) -> dict[str, SimpleNamespace]:
    """The collaboration in process with ``collab.share`` mdp, augmdp and raw, reusing the DPM run's Step 1.

    Raw sharing is the audit's positive control: there the entities' real images do cross.
    """
    runs = {}
    for mode in ("mdp", "augmdp", "raw"):
        out, grid = run_in_process(results, f"share-{mode}", {}, (f"collab.share={mode}", *MDP_SETTINGS))
        runs[mode] = SimpleNamespace(out=out, grid=grid, summary=pd.read_csv(out / "summary.csv").set_index("entity"))
    return runs


def test_mdp_sharing_mode_sends_images_and_reports_their_disclosure(sim_run, image_runs):
    cfg, out, df = sim_run.cfg, image_runs["mdp"].out, image_runs["mdp"].summary
    run = pd.read_json(out / "run.json", typ="series")
    assert run["status"] == "completed" and not run["failures"] and run["share"] == "mdp"
    assert list(df.index) == entity_names(cfg) and set(df["status"]) == {"ok"} and set(df["share"]) == {"mdp"}
    assert df[["top1_own", "top1_refined", "top5_refined"]].apply(lambda c: c.between(0, 100)).all().all()
    assert (df["items_shared"] == df["num-examples"]).all()
    assert (df["received_images"] == df["items_shared"].sum() - df["items_shared"]).all()
    assert "sharing MDP" in (out / "summary.md").read_text()

    # Images crossed, in both directions, and never features.
    image_shape = load_task(cfg).S.train_images.shape[1:]
    msgs = pd.read_csv(out / "messages.csv", keep_default_na=False)
    pools = msgs[(msgs["kind"] == "array") & (msgs["record"] == "pool")]
    assert set(pools["item"]) == {"images", "labels"}
    images = pools[pools["item"] == "images"]
    assert set(images["dtype"]) == {"float32"} and set(images["message_type"]) == {"train.pool", "train.refine"}
    assert images["shape"].str.endswith("x" + "x".join(map(str, image_shape))).all()
    sent = [c["pool"]["images"].numpy() for c in image_runs["mdp"].grid.payloads if "pool" in c]
    assert len(sent) == 4 and all(x.min() >= 0 and x.max() <= 1 for x in sent)

    # What the senders report: MDP images look like real images of the sender, DPM pools do not.
    dpm = pd.read_csv(sim_run.out / "summary.csv")["disclosure_ssim"]
    mdp = df["disclosure_ssim"]
    assert mdp.min() > 0.9 and mdp.min() > dpm.max() + 0.3, (list(mdp), list(dpm))
    assert (df["label_ssim"] < mdp - 0.3).all()  # the label is another image's: the target, not the one shown


def test_message_audit_in_the_image_sharing_modes(sim_run, image_runs):
    """No DPM tensor crosses in any mode; (Aug)MDP sends no real image, raw sends every one (positive control)."""
    cfg = sim_run.cfg
    dpm_files = sorted(ArtefactStore(cfg).root.joinpath("private").glob("E*/dpm-*.pt"))
    assert len(dpm_files) == 4  # trained by the DPM run in the same store, so they could have leaked
    split = load_task(cfg)
    shards = entity_shards(cfg, split)
    for mode, run in image_runs.items():
        msgs = pd.read_csv(run.out / "messages.csv", keep_default_na=False)
        arrays = msgs[msgs["kind"] == "array"]
        assert set(arrays["record"]) == {"shared", "pool"}
        assert set(arrays.loc[arrays["record"] == "pool", "item"]) == {"images", "labels"}
        per_image = cfg.mdp.rounds if mode == "augmdp" else 1  # AugMDP(T) shares T modified sets
        assert (run.summary["items_shared"] == per_image * run.summary["num-examples"]).all()
        digests = set(arrays["sha256"])
        for path in dpm_files:
            for name, tensor in torch.load(path, weights_only=True).items():
                if tensor.numel() > 1:
                    assert array_digest(tensor.numpy()) not in digests, f"{mode}: {path.parent.name}'s DPM {name}"
        for name, idx in shards.items():
            pool, meta = load_pool(run.out / "artefacts" / "pools" / f"{name}.pt")
            assert meta["share"] == mode and array_digest(pool.features.numpy()) in digests  # what crossed
            shown = matching_images(pool.features.numpy(), split.S.train_images[idx])
            if mode == "raw":
                assert np.array_equal(shown, np.arange(len(idx))), f"raw: {name} sent {len(shown)} real images"
            else:
                assert len(shown) == 0, f"{mode}: {name} sent {len(shown)} of its real images unmodified"


def test_image_pool_outside_unit_range_is_left_out(sim_run, results):
    out, _ = run_in_process(results, "share-raw-range", {3: "range"}, ("collab.share=raw",))
    run = pd.read_json(out / "run.json", typ="series")
    assert run["status"] == "completed" and set(run["failures"]) == {"E4"}
    assert "pixel values must lie in [0, 1]" in run["failures"]["E4"] and "1.5" in run["failures"]["E4"]


def test_unknown_sharing_mode_fails_naming_the_valid_ones(results):
    valid = r"unknown sharing mode 'bogus' \(collab\.share\); valid: dpm, mdp, augmdp, raw"
    with pytest.raises(ValueError, match=valid):  # raised by the strategy before any message is sent
        run_in_process(results, "bad-mode", {}, ("collab.share=bogus",))


@pytest.fixture
def deployment(tmp_path) -> SimpleNamespace:
    """``flower-superlink --insecure`` and four ``flower-supernode``s on 127.0.0.1, and how to reach them."""
    link = free_port()
    (tmp_path / "config.toml").write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
                                          f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, **OFFLINE, "FLWR_HOME": str(tmp_path)}
    procs = []
    with open(tmp_path / "processes.log", "w") as logs:
        try:
            procs.append(subprocess.Popen(["flower-superlink", "--insecure", "--port", str(link)], env=env,
                                          stdout=logs, stderr=subprocess.STDOUT))
            time.sleep(3)
            for k in range(4):
                procs.append(subprocess.Popen(
                    ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(free_port()),
                     "--node-config", f"partition-id={k} num-partitions=4"],
                    env=env, stdout=logs, stderr=subprocess.STDOUT))
            yield SimpleNamespace(connection="deploy", env=env)
        finally:
            stop([p.pid for p in procs])
    # A process whose main thread has exited shows as a zombie in /proc while its other threads
    # (gRPC) still wind down, so reap each with a bounded wait, not a single poll: one still
    # running after it fails the test with TimeoutExpired.
    for p in procs:
        p.wait(timeout=30)


def test_deployment_engine_with_four_supernodes(sim_run, results, deployment):
    ok = subprocess.run(sim_run_cmd(results, "deploy", "--superlink", deployment.connection), env=deployment.env,
                        capture_output=True, text=True, timeout=900)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    out = results / "flower" / "deploy"
    df = pd.read_csv(out / "summary.csv")
    assert set(df["status"]) == {"ok"} and df["top1_refined"].notna().all()
    assert sorted(p.stem for p in (out / "artefacts" / "pools").glob("*.pt")) == ["E1", "E2", "E3", "E4"]
    # A run that fails (no such pretraining entity) makes the command exit non-zero.
    bad = subprocess.run(sim_run_cmd(results, "bad", "--superlink", deployment.connection,
                                     settings=("backbone.pretrain_on=E9",)),
                         env=deployment.env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "finished:failed" in bad.stderr, bad.stdout[-2000:] + bad.stderr[-2000:]
