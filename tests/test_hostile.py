"""Hostile input, tried as a participant or an operator would: settings, data roots and caches, pools,
policies, run names, locks, stored artefacts, and a fault-injecting grid in front of the real strategy
and ServerApp. Each case asserts the clear error (naming the setting, file or node) or the recorded
refusal, and that the honest entities finish. All in process and fast: no training.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from entities import data
from entities.config import parse_overrides
from entities.data import DataError, find_archive, load_dataset
from entities.files import (
    ArtefactError,
    LockedError,
    artefact_key,
    check_run_name,
    load_torch,
    results_lock,
    save_torch,
    write_bytes,
)
from entities.policy import EntityPolicy, PolicyRefusal, load_policy
from entities.pools import Pool, PoolError, PoolSpec
from entities.presets import load_config
from entities.sharing import get_mode
from sim import server_app
from sim.client_app import local as client_local
from sim.grid import InProcessGrid
from sim.server_app import parse_roster
from strategies.pool_exchange import CollaborationError, CollaborationResult, PoolExchange

# --- settings, checked when read, every error naming its key --------------------------------------

BAD_SETTINGS = [
    ("dpm.epochs=abc", r"setting dpm\.epochs: expected an integer, got 'abc'"),
    ("pretrain.epochs=2.5", r"setting pretrain\.epochs: expected an integer, got '2\.5'"),
    ("dpm.epochs=true", r"setting dpm\.epochs: expected an integer, got 'true'"),
    ("dpm.lam=-5", r"setting dpm\.lam = -5\.0 is out of range: it must be >= 0"),
    ("dpm.lam=nan", r"setting dpm\.lam: expected a number"),
    ("dpm.lam=inf", r"setting dpm\.lam: expected a number"),
    ("dpm.epochs=-1", r"setting dpm\.epochs = -1 is out of range"),
    ("decider.batch_size=0", r"setting decider\.batch_size = 0 is out of range: it must be >= 1"),
    ("reconstructor.lr=0", r"setting reconstructor\.lr = 0\.0 is out of range: it must be > 0"),
    ("table5.fedavg_local_epochs=-2", r"setting table5\.fedavg_local_epochs = -2"),
    ("mdp.rounds=0", r"setting mdp\.rounds = 0 is out of range"),
    ("data.alpha=0", r"setting data\.alpha = 0\.0 is out of range"),
    ("threads=-1", r"setting threads = -1 is out of range"),
    ("dpm.init=bogus", r"dpm\.init"),
    ("data.partition=bogus", r"setting data\.partition = 'bogus' is not one of: iid, dirichlet"),
    ("mdp.norm=l3", r"setting mdp\.norm = 'l3' is not one of: linf, l2"),
    ("device=tpu", r"device"),
    ("backbone.name=alexnet", r"setting backbone\.name = 'alexnet' is not one of: resnet20"),
    ("reconstructor.name=gan", r"setting reconstructor\.name = 'gan' is not one of: px2s2"),
    ("collab.share=bogus", r"unknown sharing mode 'bogus' \(collab\.share\)"),
    ("collab.max_pool=0", r"setting collab\.max_pool = 0 is out of range"),
    ("data.shard_fractions=[0.5,0.7]", r"setting data\.shard_fractions = \[0\.5, 0\.7\]: .* sum"),
    ("data.shard_fractions=abc", r"setting data\.shard_fractions: expected a list, got 'abc'"),
    ("data.task_classes=[0.5]", r"setting data\.task_classes\[0\]: expected an integer, got 0\.5"),
    ("data.allow_download=maybe", r"setting data\.allow_download: expected true or false, got 'maybe'"),
    ("backbone.pretrain_on=E9", r"setting backbone\.pretrain_on = 'E9': use 'S' or one of E1, E2, E3, E4"),
    ("dpm.epochs.deep=1", r"override dpm\.epochs\.deep: dpm\.epochs is a setting, not a section"),
    ("dpm=3", r"setting dpm is a section \(\[dpm\]\), not a value"),
    ("dpm.bogus=1", r"unknown setting\(s\) \['bogus'\] in \[dpm\]"),
]


@pytest.mark.parametrize("override,message", BAD_SETTINGS, ids=[o for o, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_naming_its_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("collab-tiny", parse_overrides([override]))


@pytest.mark.parametrize("item", ["=5", "dpm.lam"])
def test_malformed_override_is_refused(item):
    with pytest.raises(ValueError, match="override"):
        parse_overrides([item])


def test_edge_values_that_mean_something_are_accepted():
    cfg = load_config("collab-tiny", parse_overrides(["dpm.lam=0", "dpm.epochs=0", "decider.lr=1"]))
    assert (cfg.dpm.lam, cfg.dpm.epochs, cfg.decider.lr) == (0.0, 0, 1.0) and isinstance(cfg.decider.lr, float)


@pytest.mark.parametrize("toml,message", [
    ('[pretrain]\nepochs = 2.5\n', r"setting pretrain\.epochs: expected an integer, got 2\.5 \(float\)"),
    ('[dpm]\nepochs = true\n', r"setting dpm\.epochs: expected an integer, got True \(bool\)"),
    ('[data]\nshard_fractions = ["a"]\n', r"setting data\.shard_fractions\[0\]: expected a number"),
])
def test_bad_preset_values_name_their_key(tmp_path, toml, message):
    preset = tmp_path / "hostile.toml"
    preset.write_text('extends = "collab-tiny"\n' + toml)
    with pytest.raises(ValueError, match=message):
        load_config(str(preset))


# --- data roots and the decoded-image cache -----------------------------------------------------------


def test_explicit_data_root_without_the_archive_does_not_fall_back(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / data.ARCHIVES["att"]).write_bytes(b"not used")  # $POISONPOOL_DATA has one: must not be taken
    monkeypatch.setenv("POISONPOOL_DATA", str(elsewhere))
    named = tmp_path / "named"
    named.mkdir()
    with pytest.raises(DataError, match=rf"att-faces\.tar\.gz not found \(searched: {re.escape(str(named))}\)"):
        load_dataset("att", data_root=named)


def test_corrupt_cache_file_is_one_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONPOOL_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "archive.bin"
    archive.write_bytes(b"x")
    data._cached("probe", archive, lambda: {"a": np.arange(3)})  # writes the cache
    (cached,) = (tmp_path / "cache").glob("probe-*.npz")
    cached.write_bytes(cached.read_bytes()[:20])  # truncated, as by a kill or a full disk
    with pytest.raises(DataError, match=rf"cache file {re.escape(str(cached))} is corrupt.*delete it"):
        data._cached("probe", archive, lambda: {"a": np.arange(3)})


def test_decoded_image_cache_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONPOOL_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "archive.bin"
    archive.write_bytes(b"x")
    data._cached("probe", archive, lambda: {"a": np.arange(3)})
    (cached,) = (tmp_path / "cache").glob("probe-*.npz")
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert not list((tmp_path / "cache").glob("*.tmp"))


# --- pools: bounds on magnitude, label shape and range, size --------------------------------------------

SHAPE, CLASSES = (4, 2, 2), 5


def _pool(n=6, value=None, labels=None, dtype=torch.float32, shape=SHAPE) -> Pool:
    f = torch.rand(n, *shape).to(dtype)
    if value is not None:
        f[0].view(-1)[0] = value
    return Pool(f, np.arange(n) % CLASSES if labels is None else labels)


BAD_POOLS = [
    ("huge", _pool(value=1e30), r"feature values up to 1e\+30 in magnitude, above the bound 10"),
    ("huge-negative", _pool(value=-1e6), r"above the bound"),
    ("nan", _pool(value=float("nan")), r"1 non-finite features values"),
    ("inf", _pool(value=float("inf")), r"non-finite"),
    ("labels-column", _pool(labels=np.zeros((6, 1), dtype=np.int64)), r"labels of shape \(6, 1\), expected one"),
    ("labels-float", _pool(labels=np.zeros(6)), r"labels must be integers"),
    ("labels-negative", _pool(labels=np.full(6, -1)), r"labels must be integers in \[0, 5\)"),
    ("labels-too-high", _pool(labels=np.full(6, 5)), r"labels must be integers in \[0, 5\)"),
    ("labels-strings", _pool(labels=np.array(list("abcdef"))), r"labels must be integers"),
    ("fewer-labels", _pool(labels=np.zeros(5, dtype=np.int64)), r"6 feature maps but 5 labels"),
    ("empty", _pool(n=0, labels=np.zeros(0, dtype=np.int64)), r"0 feature maps but 0 labels"),
    ("float64", _pool(dtype=torch.float64), r"features are torch\.float64, expected torch\.float32"),
    ("wrong-shape", _pool(shape=(4, 1, 1)), r"features of shape \(4, 1, 1\), expected \(4, 2, 2\)"),
    ("flat", Pool(torch.rand(6), np.arange(6) % 5), r"features of shape \(\), expected"),
    ("oversized", _pool(n=40), r"40 feature maps, more than the 10 allowed"),
]


@pytest.mark.parametrize("case,pool,message", BAD_POOLS, ids=[c for c, _, _ in BAD_POOLS])
def test_hostile_pool_is_rejected_with_a_clear_reason(case, pool, message):
    with pytest.raises(PoolError, match=message):
        get_mode("dpm").validate("E2", pool, PoolSpec(SHAPE, CLASSES, max_items=10, bound=10.0))


def test_honest_pool_within_the_bounds_passes():
    get_mode("dpm").validate("E2", _pool(n=10), PoolSpec(SHAPE, CLASSES, max_items=10, bound=10.0))


@pytest.mark.parametrize("value", [1.5, -0.1, 1e30])
def test_image_pool_outside_unit_range_is_rejected(value):
    with pytest.raises(PoolError, match=r"pixel values must lie in \[0, 1\]"):
        get_mode("raw").validate("E3", _pool(value=value, shape=(3, 4, 4)), PoolSpec(SHAPE, CLASSES, (3, 4, 4)))


# --- the entity's own policy --------------------------------------------------------------------------


def test_default_policy_allows_dpm_only_and_refuses_raw():
    policy = load_policy({"partition-id": 0})
    assert policy.allow == ("dpm",) and policy.source == "defaults"
    policy.check_mode("E1", "dpm")
    with pytest.raises(PolicyRefusal, match=r"E1 refuses sharing mode 'raw': its policy \(defaults\) allows only dpm"):
        policy.check_mode("E1", "raw")


def test_policy_file_and_node_config_node_config_wins(tmp_path):
    file = tmp_path / "policy.toml"
    file.write_text('allow-share = ["dpm", "mdp"]\ndisclosure-ceiling = 0.2\nprivate-store = "/srv/e1"\n'
                    'screen-repair = true\n')
    policy = load_policy({"policy": str(file), "disclosure-ceiling": 0.1})
    assert policy.allow == ("dpm", "mdp") and policy.ceiling == 0.1 and policy.store_root() == Path("/srv/e1")
    assert policy.screen_repair and not load_policy({"screen-repair": "false"}).screen_repair
    assert str(file) in policy.source and "node config disclosure-ceiling" in policy.source


@pytest.mark.parametrize("node_config,message", [
    ({"disclosure-ceiling": "abc"}, r"entity policy disclosure-ceiling = 'abc' \(node config\)"),
    ({"disclosure-ceiling": 1.5}, r"disclosure-ceiling = 1\.5 \(node config\): must lie in \[0, 1\]"),
    ({"allow-share": "dpm,everything"}, r"allow-share = 'dpm,everything' .*unknown sharing mode\(s\) \['everything'\]"),
    ({"attack-epochs": 0}, r"attack-epochs = 0 \(node config\): must be >= 1"),
    ({"attack-epochs": 2.5}, r"attack-epochs = 2\.5 \(node config\): expected an integer"),
    ({"screen-repair": "yes"}, r"screen-repair = 'yes' \(node config\): expected true or false"),
    ({"policy": "/nonexistent/policy.toml"}, r"entity policy file /nonexistent/policy\.toml is unreadable"),
])
def test_bad_policy_is_refused_naming_the_key(node_config, message):
    with pytest.raises(ValueError, match=message):
        load_policy(node_config)


def test_data_root_and_private_store_come_from_the_policy_not_the_run_config(tmp_path):
    """The run config names a results root and a data root; the entity reads and writes where its own
    policy says (and a policy's data root without the archive is an error naming it, not a fall-back)."""
    submitter, store, empty = tmp_path / "submitter", tmp_path / "e2-store", tmp_path / "e2-data"
    empty.mkdir()
    run_config = {"preset": "collab-test", "overrides": f"data.dataset=cifar10 data.data_root={submitter}",
                  "results-root": str(submitter)}
    context = Context(run_id=8, node_id=5, node_config={"partition-id": 1, "num-partitions": 4, "private-store":
                      str(store), "data-root": str(empty)}, state=RecordDict(), run_config=run_config)
    with pytest.raises(DataError, match=rf"cifar10-jpeg\.tar\.gz not found \(searched: {re.escape(str(empty))}\)"):
        client_local(context)
    context.node_config.pop("data-root")
    try:
        find_archive("cifar10")
    except DataError:
        pytest.skip("no CIFAR-10 archive in the default roots of this machine")
    here = client_local(context)  # the run config's data root (which does not exist) is not used
    assert here.entity.name == "E2" and here.entity.store.root.is_relative_to(store)
    assert not submitter.exists()


def test_policy_file_with_an_unknown_key_names_the_file(tmp_path):
    file = tmp_path / "policy.toml"
    file.write_text('share = "raw"\n')
    with pytest.raises(ValueError, match=rf"entity policy file {file}: unknown key\(s\) \['share'\]"):
        load_policy({"policy": str(file)})


def test_disclosure_above_the_ceiling_is_refused_with_the_measurements():
    policy = EntityPolicy(ceiling=0.3)
    policy.check_disclosure("E2", "dpm", {"psi": 0.05, "decoder on own pairs": 0.29})
    with pytest.raises(PolicyRefusal, match=r"E2 refuses to send its dpm pool: measured disclosure SSIM 0\.410 "
                                            r"\(decoder on own pairs\) is above its ceiling 0\.3"):
        policy.check_disclosure("E2", "dpm", {"psi": 0.05, "decoder on own pairs": 0.41})


# --- files: run names, locks, whole-or-nothing writes, private modes, keys ----------------------------


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", ".hidden", "", "x" * 101, "two words", "..", "e\n"])
def test_run_name_that_could_leave_its_folder_is_refused(name):
    with pytest.raises(ValueError, match="run-name"):
        check_run_name(name)


def test_second_run_on_a_results_root_is_refused_while_the_first_holds_it(tmp_path):
    held = rf"results root {re.escape(str(tmp_path))} is in use by pid {os.getpid()}"
    with results_lock(tmp_path):
        with pytest.raises(LockedError, match=held):
            with results_lock(tmp_path):
                pass
    with results_lock(tmp_path):  # released when the holder is done
        pass


def test_truncated_artefact_is_an_error_naming_the_file(tmp_path):
    path = save_torch({"w": torch.ones(100)}, tmp_path / "dpm-x.pt", private=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ArtefactError, match=rf"E1's DPM {re.escape(str(path))} is unreadable"):
        load_torch(path, "E1's DPM")


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = write_bytes(tmp_path / "a.json", b"old")
    with pytest.raises(TypeError):
        write_bytes(path, object())  # type: ignore[arg-type]  # fails once the temp file exists
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_artefact_key_changes_with_every_input():
    base = {"dpm": {"lam": 1.0}, "seed": 0, "shared": "abc"}
    keys = {artefact_key(base), artefact_key({**base, "seed": 1}), artefact_key({**base, "shared": "abd"}),
            artefact_key({**base, "dpm": {"lam": 0.5}})}
    assert len(keys) == 4


# --- a fault-injecting grid in front of the real strategy and ServerApp ----------------------------------

FEATURES = (4, 2, 2)


def reply(msg: Message, **records) -> Message:
    return Message(content=RecordDict(records), reply_to=msg)


class HostileGrid(InProcessGrid):
    """Nodes 100.. answer like honest entities E1..E4 unless ``behaviour`` says otherwise.

    ``claims`` maps node -> the entity it claims (default: its own); ``behaviour`` maps node -> what it
    does wrong in step 2 (a pool of ``huge`` values, ``column`` labels, ``oversized``, a policy
    ``refusal``) or in step 1 (``no-scale``: the pretrainer publishes no feature scale).
    """

    def __init__(self, claims: dict[int, str] | None = None, behaviour: dict[int, str] | None = None,
                 nodes: int = 4, shard: int = 6) -> None:
        self.claims = {100 + k: f"E{k + 1}" for k in range(nodes)} | (claims or {})
        self.behaviour = behaviour or {}
        self.shard = shard
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.claims)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = str(len(self.sent) + i)
            out.append(self.answer(msg, msg.metadata.dst_node_id, self.behaviour.get(msg.metadata.dst_node_id, "")))
        self.sent += list(messages)
        return out

    def answer(self, msg: Message, node: int, bad: str) -> Message:
        kind = msg.metadata.message_type
        metrics = MetricRecord({"num-examples": self.shard})
        if kind == "query.entity":
            return reply(msg, entity=ConfigRecord({"name": self.claims[node]}))
        if kind == "train.pretrain":
            info = {"feature-shape": list(FEATURES), "image-shape": [3, 4, 4], "feature-scale": 2.0}
            if bad == "no-scale":
                del info["feature-scale"]
            return reply(msg, shared=ArrayRecord({"phi1.w": Array(np.ones(3, dtype=np.float32))}),
                         info=ConfigRecord(info), metrics=metrics)
        if kind == "train.pool":
            if bad == "refusal":
                return Message(Error(code=1, reason="PolicyRefusal('E3 refuses to send its dpm pool: measured "
                                                    "disclosure SSIM 0.9 above its ceiling 0.3')"), reply_to=msg)
            n = 40 * self.shard if bad == "oversized" else self.shard
            features = np.random.default_rng(node).random((n, *FEATURES), dtype=np.float32)
            labels = np.arange(n, dtype=np.int64) % 5
            if bad == "huge":
                features[0, 0, 0, 0] = 1e30
            if bad == "column":
                labels = labels[:, None]
            pool = ArrayRecord({"features": Array(features), "labels": Array(labels)})
            return reply(msg, pool=pool, metrics=metrics)
        return reply(msg, metrics=MetricRecord({"num-examples": self.shard, "top1_refined": 50.0}))


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """What a ServerApp process has set when the strategy creates its messages."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 8, 0, 0


def exchange(**kwargs) -> PoolExchange:
    return PoolExchange(["E1", "E2", "E3", "E4"], "E1", 5, node_wait=0, **kwargs)


def collaborate(grid: InProcessGrid, **kwargs) -> CollaborationResult:
    """Run the strategy as Flower's ``Strategy.start`` would be run; return what the server collected."""
    strategy = exchange(**kwargs)
    strategy.start(grid, ArrayRecord())
    return strategy.result


def test_start_has_flowers_strategy_signature_and_returns_its_result():
    import inspect

    from flwr.serverapp.strategy import Result, Strategy

    ours, theirs = inspect.signature(PoolExchange.start), inspect.signature(Strategy.start)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]
    result = exchange().start(HostileGrid(), ArrayRecord())
    assert isinstance(result, Result) and set(result.train_metrics_clientapp) == {1, 2, 3}
    assert any(k.startswith("phi1.") for k in result.arrays)  # the shared modules, what step 1 made
    assert result.train_metrics_clientapp[3]["top1_refined"] == 50.0
    with pytest.raises(ValueError, match="num_rounds=5"):
        exchange().start(HostileGrid(), ArrayRecord(), num_rounds=5)


def test_second_node_claiming_an_entity_is_refused_and_the_run_goes_on():
    result = collaborate(HostileGrid(claims={104: "E2"}, nodes=5))
    assert result.healthy() == ["E1", "E2", "E3", "E4"] and result.entities["E2"].node_id == 101
    assert result.refused == ["node 104: claims to be E2, already answered for by node 101"]


def test_unknown_claim_is_refused_and_recorded():
    result = collaborate(HostileGrid(claims={104: "E9"}, nodes=5))
    assert result.refused == ["node 104: claims to be 'E9', which is not among E1, E2, E3, E4"]
    assert len(result.healthy()) == 4


def test_with_a_roster_the_authenticated_node_decides_not_the_claim():
    roster = {100: "E1", 101: "E2", 102: "E3", 103: "E4"}
    # node 102 (E3 by the roster) claims E4 before the real E4 answers; node 104 is not on the roster.
    result = collaborate(HostileGrid(claims={102: "E4", 104: "E1"}, nodes=5), roster=roster)
    assert result.entities["E4"].node_id == 103 and result.entities["E1"].node_id == 100
    assert "node 102: claims to be E4 but the roster lists it as E3" in result.refused
    assert "node 104: claims to be E1 but the roster lists it as no entity (not an authenticated member)" \
        in result.refused
    assert result.entities["E3"].failure == "step 0: no SuperNode answered for this entity"
    assert result.healthy() == ["E1", "E2", "E4"]


@pytest.mark.parametrize("text,message", [("E1=abc", "not of the form"), ("E1=1 E2=1", "node 1 twice"),
                                          ("E1=1 E1=2", "one entity several nodes"), ("=3", "not of the form")])
def test_bad_roster_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_roster(text)


@pytest.mark.parametrize("bad,reason", [
    ("huge", "feature values up to 1e+30 in magnitude, above the bound 20"),
    ("column", "labels of shape (6, 1)"),
    ("oversized", "240 feature maps, more than the 6 allowed"),
    ("refusal", "E3 refuses to send its dpm pool"),
])
def test_hostile_pool_or_refusal_is_recorded_and_the_others_finish(bad, reason):
    result = collaborate(HostileGrid(behaviour={102: bad}))
    assert reason in result.entities["E3"].failure and result.entities["E3"].failure.startswith("step 2:")
    assert result.healthy() == ["E1", "E2", "E4"]
    assert all(s.metrics.get("top1_refined") == 50.0 for s in result.entities.values() if s.healthy)


def test_pool_above_the_configured_cap_is_rejected_even_if_declared():
    strategy = exchange(max_pool=5)
    with pytest.raises(CollaborationError, match="only 0 healthy entities"):
        strategy.start(HostileGrid(), ArrayRecord())
    assert all("6 feature maps, more than the 5 allowed" in s.failure for s in strategy.result.entities.values())


def test_pretrainer_without_published_feature_scale_stops_the_run():
    with pytest.raises(CollaborationError, match="step 1 failed: E1 returned no shared modules"):
        collaborate(HostileGrid(behaviour={100: "no-scale"}))


def run_server(results: Path, grid: InProcessGrid, run_name: str = "hostile", **extra) -> Path:
    run_config = {"preset": "collab-tiny", "overrides": "threads=1", "results-root": str(results),
                  "run-name": run_name, "timeout": 5, "node-wait": 0, **extra}
    server_app.app(grid, Context(run_id=8, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return results / "flower" / run_name


def test_server_crash_marks_the_run_failed_and_keeps_the_previous_results(tmp_path):
    previous = tmp_path / "flower" / "hostile"
    previous.mkdir(parents=True)
    (previous / "run.json").write_text(json.dumps({"status": "completed", "run_id": 1}))

    class Crashing(HostileGrid):
        def answer(self, msg, node, bad):
            if msg.metadata.message_type == "train.refine":
                raise RuntimeError("grid lost")
            return super().answer(msg, node, bad)

    with pytest.raises(RuntimeError, match="grid lost"):
        run_server(tmp_path, Crashing())
    failed = json.loads((tmp_path / "flower" / "hostile.failed" / "run.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: grid lost"
    assert json.loads((previous / "run.json").read_text()) == {"status": "completed", "run_id": 1}
    assert not list((tmp_path / "flower").glob(".hostile.*"))  # no staging folder left


def test_completed_rerun_replaces_the_results_and_records_refusals(tmp_path):
    out = run_server(tmp_path, HostileGrid(claims={104: "E2"}, behaviour={103: "huge"}, nodes=5))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["refused"] == ["node 104: claims to be E2, already answered for "
                                                               "by node 101"]
    assert "above the bound" in run["failures"]["E4"]
    assert sorted(p.name for p in (out / "artefacts" / "pools").iterdir()) == ["E1.pt", "E2.pt", "E3.pt"]
    out = run_server(tmp_path, HostileGrid())
    assert sorted(p.name for p in (out / "artefacts" / "pools").iterdir()) == ["E1.pt", "E2.pt", "E3.pt", "E4.pt"]
    assert not json.loads((out / "run.json").read_text())["failures"]


def test_run_name_escaping_the_results_root_is_refused_before_any_message(tmp_path):
    grid = HostileGrid()
    with pytest.raises(ValueError, match=r"run-name '\.\./\.\./etc' is not a plain folder name"):
        run_server(tmp_path, grid, run_name="../../etc")
    assert not grid.sent


def test_bad_roster_fails_the_run_on_record_before_any_message(tmp_path):
    grid = HostileGrid()
    with pytest.raises(ValueError, match=r"roster names \['E9'\], which are not among the entities"):
        run_server(tmp_path, grid, roster="E1=100 E9=101")
    run = json.loads((tmp_path / "flower" / "hostile.failed" / "run.json").read_text())
    assert run["status"] == "failed" and run["error"].startswith("ValueError: roster names ['E9']") and not grid.sent


def test_run_on_a_locked_results_root_is_refused(tmp_path):
    with results_lock(tmp_path):
        with pytest.raises(LockedError, match="is in use by"):
            run_server(tmp_path, HostileGrid())


# --- a real SIGKILL during a DPM save -----------------------------------------------------------------

TRAIN_DPM = """
import sys, time
import numpy as np, torch
from pathlib import Path
import entities.files as files
from entities.backbone import build_backbone
from entities.presets import load_config
from entities.entity import Entity
from entities.pipeline import ArtefactStore, SharedModules
from entities.reconstructors import build_reconstructor

root, hold = Path(sys.argv[1]), sys.argv[2] == "hold"
torch.set_num_threads(1)
if hold:  # stop inside the save, after the bytes are written and before they are in place, until killed
    real_fsync = files.os.fsync
    def fsync(fd):
        real_fsync(fd)
        (root / "saving").write_text("now")
        time.sleep(120)
    files.os.fsync = fsync
cfg = load_config("collab-tiny", {"dpm.epochs": "1", "threads": "1", "results_root": str(root)})
torch.manual_seed(0)
backbone = build_backbone("resnet20", 5)
phi1, phi2 = backbone.split("conv4_1")
shared = SharedModules(backbone, phi1, phi2, build_reconstructor("px2s2", (64, 8, 8), (3, 32, 32)))
images = np.random.default_rng(0).integers(0, 255, (16, 3, 32, 32), dtype=np.uint8)
entity = Entity("E1", images, np.arange(16) % 5, ArtefactStore(cfg))
entity.train_dpm(shared, cfg, seed=0)
print(entity.dpm_path(cfg, shared, 0))
"""


@pytest.mark.slow
def test_sigkill_during_a_dpm_save_loses_nothing_and_the_rerun_completes(tmp_path):
    script = tmp_path / "train_dpm.py"
    script.write_text(TRAIN_DPM)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), "hold"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "saving").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    private = next((tmp_path / "artefacts").glob("*/private/E1"))
    assert not list(private.glob("dpm-*.pt")) and len(list(private.glob(".dpm-*.tmp"))) == 1  # never half a DPM
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "go"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dpm = Path(done.stdout.strip().splitlines()[-1])
    assert torch.load(dpm, weights_only=True) and stat.S_IMODE(dpm.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.stat().st_mode) == 0o700 and stat.S_IMODE(private.parent.stat().st_mode) == 0o700
