"""The ClientApp: one SuperNode is one entity, E1..En by its ``partition-id``, with its own shard.

It answers the four messages of :mod:`strategies.pool_exchange`. What its pool holds is the run's
sharing mode (``collab.share``, :mod:`entities.sharing`). In the default ``dpm`` mode its images never
leave it, and neither does its DPM: the DPM is written only to the entity's private store and the
replies carry the shared modules (from the pretrainer only), the poisoned pool, labels and
metrics. In the ``mdp``/``augmdp`` modes the pool holds MDP's modified images (which look like
real images of its shard), in ``raw`` mode the images themselves: those modes share images by
design, and every entity reports how much they disclose (``disclosure_ssim``).

The run config does not decide what the entity discloses: its SuperNode's policy does
(:mod:`entities.policy`, from the node config). The entity refuses a sharing mode its policy does
not allow, measures its pool locally and refuses to send it above its disclosure ceiling, reads its
data and keeps its private files where the policy says, and checks every pool it receives.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from entities.config import Config
from entities.data import TaskSplit
from entities.entity import Entity
from entities.pipeline import ArtefactStore, entity_names, entity_shards, load_task
from entities.policy import EntityPolicy, load_policy, local_disclosure
from entities.pools import Pool, PoolSpec, feature_scale
from entities.screening import screen
from entities.sharing import get_mode, step1
from entities.train import extract_features
from sim.app_config import config_from_run_config, setup_app_logging
from strategies.records import pack_pool, pack_shared, unpack_pool, unpack_senders, unpack_shared

app = ClientApp()


@dataclass
class Local:
    """What one SuperNode holds: the settings, its operator's policy, the task data, its entity and its seed."""

    cfg: Config
    policy: EntityPolicy
    split: TaskSplit
    entity: Entity
    seed: int

    @property
    def test_labels(self) -> np.ndarray:
        return self.split.S.test_labels

    def test_features(self, phi1: torch.nn.Module) -> torch.Tensor:
        """φ1 of the common test split of S, on which every entity is scored."""
        return extract_features(phi1, self.split.S.test_images)


def entity_name(cfg: Config, context: Context) -> str:
    """Partition-id k is entity E{k+1}; a node without a matching entity is a setup error."""
    names = entity_names(cfg)
    k = int(context.node_config.get("partition-id", -1))
    if not 0 <= k < len(names):
        raise ValueError(f"partition-id {k} has no entity: the settings define {len(names)} entities "
                         f"({', '.join(names)}), one per data.shard_fractions; start the SuperNode with "
                         f"--node-config 'partition-id=<0..{len(names) - 1}> num-partitions={len(names)}'")
    return names[k]


def local(context: Context) -> Local:
    """The entity this node plays, with its shard of S read from the policy's data root and its
    private store at the policy's place (whatever the run config says about either)."""
    setup_app_logging()
    cfg = config_from_run_config(context.run_config)
    policy = load_policy(context.node_config)
    name = entity_name(cfg, context)
    cfg.data.data_root = policy.data_root
    split = load_task(cfg)
    shard = entity_shards(cfg, split)[name]
    store = ArtefactStore(cfg, policy.store_root())
    entity = Entity(name, split.S.train_images[shard], split.S.train_labels[shard], store)
    return Local(cfg, policy, split, entity, cfg.data.seed + entity_names(cfg).index(name))


def reply(msg: Message, metrics: dict[str, float], **records) -> Message:
    content = RecordDict({**records, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.query("entity")
def introduce(msg: Message, context: Context) -> Message:
    """Say which entity this node is (without loading any data, so it answers at once), or refuse
    the run at once when its sharing mode is outside this node's policy."""
    cfg = config_from_run_config(context.run_config)
    name = entity_name(cfg, context)
    policy = load_policy(context.node_config)
    policy.check_mode(name, cfg.collab.share)
    policy.check_views(name, cfg.decider.views)
    return Message(content=RecordDict({"entity": ConfigRecord({"name": name})}), reply_to=msg)


@app.train("pretrain")
def pretrain(msg: Message, context: Context) -> Message:
    """Step 1 on the designated entity: Φ on its own shard, ψ on the public set Q."""
    t0 = time.time()
    here = local(context)
    cfg = here.cfg
    if here.entity.name != cfg.backbone.pretrain_on:
        raise ValueError(f"{here.entity.name} was asked to pretrain, but backbone.pretrain_on is "
                         f"{cfg.backbone.pretrain_on!r}")
    # Nothing else runs during step 1, so it may use every core even where a simulated SuperNode is
    # given one CPU (Ray then starts torch with one thread); ``threads`` in the settings wins.
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    try:
        shared = step1(cfg, here.split, here.entity.store)
    finally:
        torch.set_num_threads(threads)
    feature_shape = list(here.test_features(shared.phi1).shape[1:])
    image_shape = list(here.entity.images.shape[1:])  # what image-sharing modes' pools are checked against
    metrics = {"num-examples": len(here.entity.labels), "pretrain_seconds": time.time() - t0}
    # The scale of honest φ1 features, against which the server bounds every pool's values.
    scale = feature_scale(here.entity.featurize(shared).features)
    info = ConfigRecord({"feature-shape": feature_shape, "image-shape": image_shape, "feature-scale": scale})
    return reply(msg, metrics, shared=pack_shared(shared), info=info)


@app.train("pool")
def share_pool(msg: Message, context: Context) -> Message:
    """Step 2: build the contribution in the run's sharing mode, return it and the local metrics.

    Every mode reports the sender's own measure of what its pool discloses (only the sender holds
    the real images): ``disclosure_ssim`` against the real image each item shows, ``label_ssim``
    against the image whose label it carries. DPM mode adds the decider and ψ scores of its pool.
    """
    t0 = time.time()
    here = local(context)
    cfg, entity = here.cfg, here.entity
    here.policy.check_mode(entity.name, cfg.collab.share)
    here.policy.check_views(entity.name, cfg.decider.views)
    mode = get_mode(cfg.collab.share)
    shared = unpack_shared(msg.content["shared"], cfg, entity.images.shape[1:])
    context.state["shared"] = msg.content["shared"]  # kept on this node for step 3
    sent = mode.contribute(entity, shared, cfg, here.seed)
    measured = local_disclosure(entity, sent, here.policy, cfg.attack, here.seed)
    here.policy.check_disclosure(entity.name, sent.mode, measured)
    # With decider.views > 1 it contributes on each augmented view of its shard too (measured on the shard).
    pool = Pool.union([sent.pool(), *(mode.contribute(view, shared, cfg, here.seed).pool()
                                      for view in entity.views(cfg.decider.views, cfg.data.seed)[1:])])
    metrics = {"num-examples": len(entity.labels), "items_shared": len(pool), "disclosure_ssim": sent.disclosure,
               "label_ssim": sent.label_disclosure, "local_disclosure_ssim": max(measured.values()),
               "disclosure_ceiling": here.policy.ceiling}
    metrics |= mode.metrics(entity, shared, here.test_features(shared.phi1), here.test_labels)
    metrics["pool_seconds"] = time.time() - t0
    return reply(msg, metrics, pool=pack_pool(pool, sent.mode))


@app.train("refine")
def refine(msg: Message, context: Context) -> Message:
    """Step 3: refine φ2 on own features alone and with the received pools; score both on the test split.

    The sharing mode turns what was received into training data (φ1 of the images in the image modes).
    """
    t0 = time.time()
    here = local(context)
    cfg, entity = here.cfg, here.entity
    mode = get_mode(cfg.collab.share)
    shared = unpack_shared(context.state["shared"], cfg, entity.images.shape[1:])
    received = unpack_pool(msg.content["pool"], mode.name)
    test_features = here.test_features(shared.phi1)
    # The server checked every pool; a receiver checks again against its own measure of φ1's scale.
    bound = cfg.collab.feature_bound * feature_scale(entity.featurize(shared).features)
    mode.validate("received", received, PoolSpec(
        tuple(test_features.shape[1:]), len(cfg.data.task_classes), tuple(entity.images.shape[1:]),
        max_items=cfg.collab.max_pool * cfg.decider.views * (len(entity_names(cfg)) - 1), bound=bound))
    senders = unpack_senders(received, msg.content["senders"])
    pools = {s: mode.training_pool(p, shared.phi1) for s, p in senders.items()}
    records, refused = {}, 0
    if here.policy.screen_margin is not None:  # the entity's own rule for what it learns from
        decision = screen(shared.phi2, entity.featurize(shared), pools, here.policy.screen_margin,
                          here.policy.screen_repair)
        refused = len(decision.refused)
        pools = decision.apply(pools)
        records["screening"] = ConfigRecord({"senders": list(decision.changed()),
                                             "reasons": list(decision.changed().values())})
    views = [view.featurize(shared) for view in entity.views(cfg.decider.views, cfg.data.seed)[1:]]  # its own
    _, own = entity.refine(shared, views, cfg, test_features, here.test_labels, seed=here.seed)
    _, refined = entity.refine(shared, [*views, *pools.values()], cfg, test_features, here.test_labels, seed=here.seed)
    metrics = {
        "num-examples": len(entity.labels),
        "received_images": len(received),
        "pools_refused": refused,
        "top1_own": own["top1"],
        "top5_own": own["top5"],
        "top1_refined": refined["top1"],
        "top5_refined": refined["top5"],
        "refine_seconds": time.time() - t0,
    }
    return reply(msg, metrics, **records)
