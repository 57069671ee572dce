"""The Flower app end to end: ``flwr run sim/`` in simulation, the message audit, faulty entities and
Flower's deployment engine with one SuperNode process per entity on 127.0.0.1.

Every Flower process a test starts is stopped by PID (with the processes it spawned). The runs use
their own $FLWR_HOME and ports, so a SuperLink someone else left running is never touched.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from flwr.app import Array, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from entities.backbone import build_backbone
from entities.data import DataError, find_archive
from entities.pipeline import ArtefactStore, entity_names, entity_shards, load_task
from entities.pools import Pool, PoolError, PoolSpec, load_pool, validate_features
from entities.sharing import SHARING_MODES
from entities.train import extract_features
from sim import server_app
from sim.app_config import config_from_run_config
from sim.audit import array_digest, matching_images
from sim.certs import main as certs_main
from sim.client_app import app as client_app
from sim.grid import InProcessGrid
from strategies.pool_exchange import CollaborationError
from strategies.records import SHARED_PARTS, pack_pool


def _settings() -> list[str]:
    """One thread per process; the bundled digits where the CIFAR-10 archive is missing."""
    try:
        find_archive("cifar10")
        return ["threads=1"]
    except DataError:
        return ["threads=1", "data.dataset=digits"]


SETTINGS = _settings()
# ψ reconstructs clean features at this preset and the DPMs beat it, so the privacy assertions can fail.
PRESET = "collab-test"
FEATURES = (32, 16, 16)  # φ1 at conv3_1 of the ResNet-20
OFFLINE = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def superlinks_on(port: int) -> list[int]:
    """The managed ``flower-superlink`` processes listening on ``port`` (the one a test started)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmd and f"--port {port}" in cmd:
            found.append(proc.pid)
    return found


def stop(pids: list[int], grace: float = 15.0) -> None:
    """SIGTERM the given processes and everything they spawned; SIGKILL what is left after ``grace``."""
    procs = []
    for pid in pids:
        try:
            parent = psutil.Process(pid)
            procs += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.2)


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sim_run_cmd(results: Path, run_name: str, *extra: str, settings: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "sim.run", "--config", PRESET, "--set", *SETTINGS, *settings,
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
        stop(superlinks_on(port))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = config_from_run_config({"preset": PRESET, "overrides": " ".join(SETTINGS),
                                  "results-root": str(results)})
    return SimpleNamespace(out=results / "flower" / "sim", cfg=cfg, stdout=proc.stdout)


def test_simulation_runs_all_steps_and_writes_results(sim_run):
    out, cfg = sim_run.out, sim_run.cfg
    run = pd.read_json(out / "run.json", typ="series")
    assert run["status"] == "completed" and not run["failures"]
    assert [p[0].split(":")[0] for p in run["phases"]] == ["connect", "step 1", "step 2", "step 3"]
    assert all(seconds > 0 for _, seconds in run["phases"])
    prov = json.loads((out / "provenance.json").read_text())  # written by the ServerApp, in the Flower process
    assert prov["wall_seconds"] >= sum(seconds for _, seconds in run["phases"]) and prov["packages"]["flwr"]
    df = pd.read_csv(out / "summary.csv")
    assert list(df["entity"]) == entity_names(cfg) and set(df["status"]) == {"ok"}
    assert df[["top1_original", "top1_refined", "top5_refined"]].apply(lambda c: c.between(0, 100)).all().all()
    # Controls that can fail: ψ does reconstruct each entity's clean features, and its pool hides them from ψ.
    assert (df["ssim_clean"] > 0.5).all() and (df["disclosure_ssim"] < df["ssim_clean"] - 0.3).all(), df
    # ψ understates: a decoder trained on the entity's own (pool, image) pairs sees more (the default policy
    # measures and reports it; a ceiling below it would refuse to send).
    assert (df["local_disclosure_ssim"] > df["disclosure_ssim"] + 0.1).all() and set(df["disclosure_ceiling"]) == {1}
    # 32x16x16 float32 features and an int64 label per image, plus the .npy headers of two arrays
    item = int(np.prod(FEATURES)) * 4 + 8
    assert df["pool_bytes_per_image"].between(item, item + 300).all()
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
        validate_features(name, pool, PoolSpec(FEATURES, len(cfg.data.task_classes)))
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
    assert array_digest(pool.data.numpy()) in digests
    original = extract_features(phi1, split.S.train_images[idx])
    assert (pool.data - original).abs().mean() > 0.05 * original.abs().mean()
    assert array_digest(split.S.train_images[idx]) not in digests


class LocalGrid(InProcessGrid):
    """The real ClientApp called in this process, one Context per node, with faults injected.

    ``faults`` maps a partition-id to what its entity does wrong in step 2: ``raise`` (the ClientApp
    raises), ``nan`` (its pool has a NaN), ``shape`` (its pool has the wrong feature shape),
    ``range`` (a value of 1.5, outside an image's [0, 1]), ``flip`` (every label of its pool shifted by one
    class: a liar) or ``hang`` (it never answers: the test kills the process).
    ``policies`` adds node-config keys (the entity's policy) per partition-id to
    :data:`TEST_POLICY`, which keeps private files in the results root and allows every mode.
    """

    def __init__(self, run_config: dict, num_nodes: int, faults: dict[int, str],
                 policies: dict[int, dict] | None = None) -> None:
        base = {"private-store": run_config["results-root"], **TEST_POLICY}
        self.contexts = {1000 + k: Context(run_id=7, node_id=1000 + k, state=RecordDict(), run_config=run_config,
                                           node_config={"partition-id": k, "num-partitions": num_nodes, **base,
                                                        **(policies or {}).get(k, {})})
                         for k in range(num_nodes)}
        self.faults = {1000 + k: f for k, f in faults.items()}
        self.ids = itertools.count()
        self.payloads: list = []  # the RecordDicts themselves: holding them keeps id() from being recycled

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
                if fault == "hang":  # tell the test where it hangs, then wait to be killed
                    Path(self.contexts[node].run_config["results-root"], "hanging").touch()
                    time.sleep(600)
                reply = client_app(msg, self.contexts[node])
            except Exception as err:  # what a SuperNode does with a ClientApp exception
                replies.append(Message(Error(code=1, reason=repr(err)), reply_to=msg))
                continue
            if fault == "flip":  # a liar: every label of its pool shifted by one class
                labels = reply.content["pool"]["labels"].numpy()
                reply.content["pool"]["labels"] = Array((labels + 1) % (labels.max() + 1))
            if fault in ("nan", "shape", "range"):
                key = "features" if "features" in reply.content["pool"] else "images"
                features = reply.content["pool"][key].numpy().copy()
                features = features[:, :, :4, :4].copy() if fault == "shape" else features
                features[0, 0, 0, 0] = {"nan": np.nan, "range": 1.5}.get(fault, features[0, 0, 0, 0])
                reply.content["pool"][key] = Array(features)
            replies.append(reply)
        return replies


# The in-process runs' entities allow every mode and any disclosure unless a test says otherwise; a short
# local attack keeps them quick (the simulation keeps the default budget).
TEST_POLICY = {"allow-share": "dpm mdp augmdp raw", "disclosure-ceiling": 1.0, "attack-epochs": 5}


def run_in_process(results: Path, run_name: str, faults: dict[int, str], settings: tuple[str, ...] = (),
                   policies: dict[int, dict] | None = None) -> tuple[Path, LocalGrid]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 0
    run_config = {"preset": PRESET, "overrides": " ".join((*SETTINGS, *settings)), "results-root": str(results),
                  "run-name": run_name, "timeout": 60, "node-wait": 1}
    grid = LocalGrid(run_config, 4, faults, policies)
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

    # A receiver checks what the server sends it, too: a tampered union of 1e30 values is refused.
    features = torch.rand(10, *FEATURES)
    features[3, 0, 0, 0] = 1e30
    hostile = Message(RecordDict({"pool": pack_pool(Pool(features, np.zeros(10, dtype=np.int64)), "dpm")}),
                      dst_node_id=1000, message_type="train.refine")
    hostile.metadata.__dict__["_message_id"] = "hostile"
    with pytest.raises(PoolError, match="pool received: feature values up to 1e\\+30 in magnitude, above the bound"):
        client_app(hostile, grid.contexts[1000])


def test_fewer_than_two_healthy_entities_stop_with_a_clear_error(sim_run, results):
    # E4's own policy accepts no disclosure at all: it measures its pool and refuses to send it.
    with pytest.raises(CollaborationError, match="only 1 healthy entities \\(E1\\)"):
        run_in_process(results, "too-few", {1: "shape", 2: "nan"}, policies={3: {"disclosure-ceiling": 0.0}})
    assert not (results / "flower" / "too-few").exists()  # a failed run's results go beside, never in place
    run = pd.read_json(results / "flower" / "too-few.failed" / "run.json", typ="series")
    assert run["status"] == "failed" and "at least 2" in run["error"]
    assert f"features of shape ({FEATURES[0]}, 4, 4)" in run["failures"]["E2"]
    assert "E4 refuses to send its dpm pool: measured disclosure SSIM" in run["failures"]["E4"]
    assert "above its ceiling 0 (policy node config" in run["failures"]["E4"]


def test_a_run_config_asking_for_raw_images_is_refused_by_every_entity(results):
    """Whoever submits the run cannot make entities send their images: their own policies allow dpm only."""
    dpm_only = {k: {"allow-share": "dpm"} for k in range(4)}
    with pytest.raises(CollaborationError, match="the pretraining entity E1 has no SuperNode"):
        run_in_process(results, "all-refuse", {}, ("collab.share=raw",), policies=dpm_only)
    run = pd.read_json(results / "flower" / "all-refuse.failed" / "run.json", typ="series")
    assert run["status"] == "failed" and len(run["refused"]) == 4
    assert all("refuses sharing mode 'raw': its policy (node config allow-share" in r for r in run["refused"])
    msgs = pd.read_csv(results / "flower" / "all-refuse.failed" / "messages.csv", keep_default_na=False)
    assert set(msgs["message_type"]) == {"query.entity"} and not (msgs["kind"] == "array").any()


def test_an_entity_shares_augmented_views_only_as_far_as_its_policy_allows(sim_run, results):
    """decider.views = 2 asks each entity for a second poisoned item per image (on an augmented copy of its shard):
    E3 keeps the default policy (max-views 1) and refuses the run; the others allow two views and send them."""
    two = {k: {"max-views": 2} for k in (0, 1, 3)}
    out, _ = run_in_process(results, "views", {}, ("decider.views=2",), policies=two)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and len(run["refused"]) == 1
    assert "E3 refuses to share 2 views of each image" in run["refused"][0] and "max-views = 1" in run["refused"][0]
    df = pd.read_csv(out / "summary.csv").set_index("entity")
    n = df["num-examples"]
    assert list(df.loc[["E1", "E2", "E4"], "items_shared"]) == [2 * n["E1"], 2 * n["E2"], 2 * n["E4"]]
    assert df.loc["E1", "received_images"] == 2 * (n["E2"] + n["E4"])
    assert df.loc[["E1", "E2", "E4"], "top1_refined"].notna().all()


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
            assert meta["share"] == mode and array_digest(pool.data.numpy()) in digests  # what crossed
            shown = matching_images(pool.data.numpy(), split.S.train_images[idx])
            if mode == "raw":
                assert np.array_equal(shown, np.arange(len(idx))), f"raw: {name} sent {len(shown)} real images"
            else:
                assert len(shown) == 0, f"{mode}: {name} sent {len(shown)} of its real images unmodified"


def test_image_pool_outside_unit_range_is_left_out(sim_run, results):
    # E3's operator allows DPM pools only: it refuses this raw-image run, the others go on.
    out, _ = run_in_process(results, "share-raw-range", {3: "range"}, ("collab.share=raw",),
                            policies={2: {"allow-share": "dpm"}})
    run = pd.read_json(out / "run.json", typ="series")
    assert run["status"] == "completed" and set(run["failures"]) == {"E3", "E4"}
    assert "pixel values must lie in [0, 1]" in run["failures"]["E4"] and "1.5" in run["failures"]["E4"]
    assert run["failures"]["E3"] == "step 0: no SuperNode answered for this entity"
    (refused,) = run["refused"]
    assert refused.startswith("node 1002: could not say which entity it is: PolicyRefusal")
    assert "E3 refuses sharing mode 'raw': its policy (node config allow-share" in refused and "only dpm" in refused


def test_unknown_sharing_mode_fails_naming_the_valid_ones(results):
    valid = rf"unknown sharing mode 'bogus' \(collab\.share\); valid: {re.escape(', '.join(SHARING_MODES))}$"
    with pytest.raises(ValueError, match=valid):  # raised by the strategy before any message is sent
        run_in_process(results, "bad-mode", {}, ("collab.share=bogus",))


def _flwr_json(*args: str, env: dict) -> dict:
    proc = subprocess.run(["flwr", *args, "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
    try:
        return json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError as err:
        raise AssertionError(f"flwr {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}") from err


@pytest.fixture
def deployment(tmp_path, results) -> SimpleNamespace:
    """A SuperLink over TLS with SuperNode authentication and four registered SuperNodes on 127.0.0.1, plus
    three that must be refused: a registered one that is not on the roster and claims E2 (the ServerApp
    refuses it), one with an unregistered key and one speaking plain text (the SuperLink refuses both).

    The certificates and keys come from ``python -m sim.certs`` (a fresh CA per test). Every entity's
    policy (node config) puts its private store in the module's results root.
    """
    certs = tmp_path / "certs"
    assert certs_main([str(certs), "--nodes", "6"]) == 0  # E5 is registered but not on the roster, E6 never
    link = free_port()
    (tmp_path / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{link}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n\n[superlink.plain]\naddress = "127.0.0.1:{link}"\n'
        f'insecure = true\n')
    env = {**os.environ, **OFFLINE, "FLWR_HOME": str(tmp_path)}
    procs = []
    logs = {}

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "w") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    def supernode(k: int, *options: str) -> list[str]:
        return ["flower-supernode", *options, "--superlink", f"127.0.0.1:{link}", "--port", str(free_port()),
                "--node-config", f'partition-id={k} num-partitions=4 private-store="{results}" attack-epochs=5']

    try:
        start("superlink", ["flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile",
                            str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                            "--enable-supernode-auth", "--port", str(link)])
        deadline = time.monotonic() + 60
        while not (ls := _flwr_json("supernode", "list", "deploy", env=env)).get("success"):
            assert time.monotonic() < deadline, f"the SuperLink did not come up: {ls}"
            time.sleep(1)
        ids = {f"E{k}": _flwr_json("supernode", "register", str(certs / f"E{k}.pub"), "deploy", env=env)["node-id"]
               for k in range(1, 6)}
        tls = ("--root-certificates", str(certs / "ca.crt"))
        for k in range(5):  # E5 plays partition-id 1: it claims to be E2
            start(f"E{k + 1}", supernode(k if k < 4 else 1, *tls, "--auth-supernode-private-key",
                                         str(certs / f"E{k + 1}.key")))
        give_up = ("--max-retries", "3", "--max-wait-time", "20")  # the intruders stop trying after a while
        intruder = start("unregistered", supernode(1, *tls, "--auth-supernode-private-key", str(certs / "E6.key"),
                                                   *give_up))
        plain = start("plain-text", supernode(2, "--insecure", *give_up))
        deadline = time.monotonic() + 90  # all five registered nodes online, so the ServerApp asks every one
        while sum(n["status"] == "online" for n in _flwr_json("supernode", "list", "deploy", env=env)["nodes"]) < 5:
            assert time.monotonic() < deadline, {name: log.read_text()[-500:] for name, log in logs.items()}
            time.sleep(1)
        roster = {name: ids[name] for name in ("E1", "E2", "E3", "E4")}
        yield SimpleNamespace(connection="deploy", env=env, logs=logs, roster=roster, impostor=ids["E5"],
                              intruders=(intruder, plain))
    finally:
        stop([p.pid for p in procs])
    # A process whose main thread has exited shows as a zombie while its other threads
    # (gRPC) still wind down, so reap each with a bounded wait, not a single poll: one still
    # running after it fails the test with TimeoutExpired.
    for p in procs:
        p.wait(timeout=30)


def test_deployment_over_tls_with_authenticated_supernodes(sim_run, results, deployment):
    roster = " ".join(f"{name}={node}" for name, node in deployment.roster.items())
    ok = subprocess.run(sim_run_cmd(results, "deploy", "--superlink", deployment.connection, "--roster", roster),
                        env=deployment.env, capture_output=True, text=True, timeout=900)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    out = results / "flower" / "deploy"
    df = pd.read_csv(out / "summary.csv")
    assert set(df["status"]) == {"ok"} and df["top1_refined"].notna().all()
    run = json.loads((out / "run.json").read_text())
    assert run["nodes"] == deployment.roster  # each entity is its authenticated node, whatever the others claim
    assert run["refused"] == [f"node {deployment.impostor}: claims to be E2 but the roster lists it as no entity "
                              "(not an authenticated member)"]
    assert sorted(p.stem for p in (out / "artefacts" / "pools").glob("*.pt")) == ["E1", "E2", "E3", "E4"]
    # The unregistered key and the plain-text SuperNode never joined: the SuperLink knows the five registered.
    nodes = _flwr_json("supernode", "list", "deploy", env=deployment.env)["nodes"]
    assert sorted(int(n["node-id"]) for n in nodes) == sorted([*deployment.roster.values(), deployment.impostor])
    for intruder in deployment.intruders:
        intruder.wait(timeout=120)
        assert intruder.returncode != 0
    assert "fail" in deployment.logs["unregistered"].read_text().lower()
    # A plain-text `flwr` client is refused by the TLS SuperLink.
    plain = subprocess.run(["flwr", "list", "plain", "--format", "json"], env=deployment.env, capture_output=True,
                           text=True, timeout=120)
    assert '"success": false' in plain.stdout.replace("'", '"') or plain.returncode != 0, plain.stdout
    # A run that fails in the ServerApp (its roster names no such entity) makes the command exit 1.
    bad = subprocess.run(sim_run_cmd(results, "bad", "--superlink", deployment.connection, "--roster", "E9=1"),
                         env=deployment.env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "finished:failed" in bad.stderr, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "roster names ['E9']" in json.loads((results / "flower" / "bad.failed" / "run.json").read_text())["error"]


KILLED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_flower import run_in_process
run_in_process(Path(sys.argv[1]), "killed", {1: "hang"} if sys.argv[3] == "hang" else {})
"""


def test_sigkill_during_a_flower_run_loses_nothing_and_the_rerun_completes(sim_run, results):
    """SIGKILL the ServerApp's process mid-run (E2 never answers step 2): the previous results of that run
    name stay as they were, the results root is free again, and a rerun completes and replaces them."""
    previous = results / "flower" / "killed"
    shutil.copytree(sim_run.out, previous)  # the last completed results under this run name
    before = {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    (results / "hanging").unlink(missing_ok=True)
    cmd = [sys.executable, "-c", KILLED_RUN, str(results), str(Path(__file__).parent)]
    proc = subprocess.Popen([*cmd, "hang"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (results / "hanging").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()} == before
    done = subprocess.run([*cmd, "go"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((previous / "run.json").read_text())
    assert run["status"] == "completed" and run["run_id"] == 7 and not run["failures"]
    assert sorted(p.stem for p in (previous / "artefacts" / "pools").glob("*.pt")) == ["E1", "E2", "E3", "E4"]
    assert not list((results / "flower").glob(".killed.*"))  # no staging or set-aside folder left


def test_receivers_that_screen_refuse_a_liars_pool_and_record_it(results):
    """E2 shifts every label of its pool; the others screen what they receive (policy screen-margin) and each
    refuses E2's pool alone, recorded in run.json and in its metrics; they also ask to repair what they can, and this
    φ2 is too weak to trust any repair of it. Φ trains longer than the preset's two epochs: a φ2 that calls every
    item one class cannot tell a true label from a false one (the check then keeps all)."""
    screening = {k: {"screen-margin": 0.5, "screen-repair": True} for k in range(4)}
    out, _ = run_in_process(results, "liar", {1: "flip"}, settings=("pretrain.epochs=15",), policies=screening)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    assert {r: sorted(s) for r, s in run["pools_refused"].items()} == {"E1": ["E2"], "E2": [], "E3": ["E2"],
                                                                       "E4": ["E2"]}
    assert all(why.startswith("refused: ") and "agree with φ2" in why
               for r in run["pools_refused"].values() for why in r.values())
    df = pd.read_csv(out / "summary.csv").set_index("entity")
    assert list(df.loc[["E1", "E3", "E4"], "pools_refused"]) == [1, 1, 1]
