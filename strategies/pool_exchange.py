"""PoolExchange: a Flower strategy that exchanges shared pools instead of averaging weights.

Deep Poisoning's collaboration (Sec. 3.1 and 4.3 of the paper) has three steps, and each is one
round of messages here:

1. ``train.pretrain`` goes to the designated entity only. It pretrains Φ on its own images, trains
   ψ on the public set and returns the weights of φ1, φ2 and ψ (the only weights that ever
   travel) with the shapes of φ1's features and of the images.
2. ``train.pool`` broadcasts those weights. Each entity builds its contribution in the run's
   sharing mode (``collab.share``, :mod:`entities.sharing`) and returns it with labels and local
   metrics: in ``dpm`` mode its poisoned pool P_k(φ1(S_k)), from a private DPM P_k that never
   leaves it; in ``mdp``/``augmdp`` mode MDP's modified images, in ``raw`` mode its images (both
   float32 in [0, 1]). The strategy validates every pool against the shape the mode sends;
   an entity whose pool is malformed is left out and recorded.
3. ``train.refine`` sends each entity the union of the *other* healthy entities' pools. Each
   refines its decider φ2 on its own features plus what it received (φ1 of the images in the
   image modes) and reports top-1/top-5 on the common test split.

Before step 1 a ``query.entity`` round asks every SuperNode which entity it is, so the strategy
can address the pretrainer and name entities in its results. A claim is only a claim: with a
``roster`` (node id -> entity, the ids the SuperLink assigned when each node's public key was
registered, so the SuperLink has authenticated the node) a node is the entity the roster names and
a node that claims another entity, or is not on the roster, is refused; without one, a second node
claiming an entity already taken is refused. Refusals are recorded and the run goes on. Any entity
that raises, times out, refuses by its policy or sends a bad pool is recorded in
:attr:`PoolExchange.result` and the others carry on; fewer than ``min_healthy`` healthy entities
stop the run with :class:`CollaborationError`.

Pools are checked as hostile input (:mod:`entities.pools`): shape, dtype, label shape and range,
at most as many items as the sender declared (times the items per image of the mode) and
``max_pool``, and feature values within ``feature_bound`` times the largest |φ1 feature| the
pretrainer published.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from entities.pools import Pool, PoolSpec
from entities.sharing import DPM, IMAGES, get_mode
from strategies.records import pack_pool, pack_senders, unpack_pool

log = logging.getLogger("poisonpool")

INTRODUCE = "query.entity"
PRETRAIN = "train.pretrain"
SHARE_POOL = "train.pool"
REFINE = "train.refine"
STEPS = {1: PRETRAIN, 2: SHARE_POOL, 3: REFINE}


class CollaborationError(RuntimeError):
    """The collaboration cannot go on (no pretrainer, or fewer than two healthy entities)."""


@dataclass
class EntityStatus:
    """What the server knows about one entity: its node, the metrics it reported, why it failed."""

    name: str
    node_id: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    failure: str = ""

    @property
    def healthy(self) -> bool:
        return self.node_id is not None and not self.failure


@dataclass
class CollaborationResult:
    """Everything a run produced on the server side, filled in as the rounds go."""

    entities: dict[str, EntityStatus]
    share: str = DPM  # the sharing mode: what the pools hold
    shared: ArrayRecord = field(default_factory=ArrayRecord)
    pools: dict[str, Pool] = field(default_factory=dict)
    pool_bytes: dict[str, int] = field(default_factory=dict)
    feature_shape: tuple[int, ...] = ()
    image_shape: tuple[int, ...] = ()  # from the pretrainer's reply; checked in the image modes only
    feature_scale: float = 0.0  # the largest |φ1 feature| on the pretrainer's shard, from its reply
    phases: list[tuple[str, float]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # nodes refused at step 0, and why
    screening: dict[str, dict[str, str]] = field(default_factory=dict)  # receiver -> sender -> why it refused

    def healthy(self) -> list[str]:
        return [n for n, s in self.entities.items() if s.healthy]


class PoolExchange(Strategy):
    """Drive pretraining, pool sharing and decider refinement across the entities' SuperNodes.

    Parameters
    ----------
    entities : list[str]
        The entity names (E1..En), one per SuperNode, in partition-id order.
    pretrain_on : str
        The entity that pretrains Φ and trains ψ (step 1).
    num_classes : int
        Number of task classes; pool labels must lie in ``[0, num_classes)``.
    min_healthy : int (default: 2)
        Fewest healthy entities with which exchanging pools still makes sense.
    node_wait : float (default: 120)
        Seconds to wait for all SuperNodes to register before starting.
    share : str (default: "dpm")
        The sharing mode (``collab.share``): what the pools hold, hence how they are checked.
        An unknown mode raises ValueError before any message is sent.
    roster : dict[int, str] | None (default: None)
        Authenticated node id -> entity. None: nodes are the entities they claim, first come.
    max_pool : int (default: 100000)
        The most items any pool may hold (``collab.max_pool``).
    feature_bound : float (default: 10)
        Pool feature values may reach this many times the pretrainer's published feature scale.
    items_per_image : int (default: 1)
        Items a sender may share per image it declared (AugMDP(T) shares T).
    """

    def __init__(self, entities: list[str], pretrain_on: str, num_classes: int, min_healthy: int = 2,
                 node_wait: float = 120.0, share: str = DPM, roster: dict[int, str] | None = None,
                 max_pool: int = 100_000, feature_bound: float = 10.0, items_per_image: int = 1) -> None:
        if pretrain_on not in entities:
            raise ValueError(f"pretrain_on={pretrain_on!r} must be one of the entities {entities}")
        unknown = sorted(set((roster or {}).values()) - set(entities))
        if unknown:
            raise ValueError(f"roster names {unknown}, which are not among the entities {entities}")
        self.mode = get_mode(share)
        self.share = self.mode.name
        self.entities = list(entities)
        self.pretrain_on = pretrain_on
        self.num_classes = num_classes
        self.min_healthy = min_healthy
        self.node_wait = node_wait
        self.roster = roster
        self.max_pool = max_pool
        self.feature_bound = feature_bound
        self.items_per_image = items_per_image
        self.result = CollaborationResult({n: EntityStatus(n) for n in entities}, self.share)
        self._sent: dict[int, str] = {}  # node id -> entity of the messages in flight

    def summary(self) -> None:
        log.info("PoolExchange: entities %s, pretraining on %s, %d classes, at least %d healthy entities, "
                 "sharing mode %s", ", ".join(self.entities), self.pretrain_on, self.num_classes, self.min_healthy,
                 self.share)

    # --- the three steps as train rounds -------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """Round 1: the pretrainer alone; round 2: the shared modules to all; round 3: others' pools.

        Every node gets a fresh RecordDict, so no two messages share a payload object.
        """
        config["server-round"] = server_round
        status = self.result.entities
        targets = [self.pretrain_on] if server_round == 1 else self.result.healthy()
        self._sent = {status[n].node_id: n for n in targets}
        messages = []
        for name in targets:
            content = RecordDict({"config": ConfigRecord(dict(config))})
            if server_round == 2:
                content["shared"] = arrays
            elif server_round == 3:
                others = {o: self.result.pools[o] for o in targets if o != name}
                content["pool"] = pack_pool(Pool.union(list(others.values())), self.share)
                content["senders"] = pack_senders(others)
            messages.append(Message(content=content, dst_node_id=status[name].node_id,
                                    message_type=STEPS[server_round]))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record each entity's metrics (and validate its pool in round 2); failures are recorded.

        Returns the shared modules (round 1 only) and the metrics averaged over the entities that
        answered, weighted by their number of images.
        """
        arrays = None
        answered = []
        for name, content in self._replies(server_round, replies):
            try:
                metrics = content["metrics"]
                if "num-examples" not in metrics:
                    raise KeyError("its metrics lack num-examples")
                if server_round == 1:
                    info = content["info"]
                    self.result.feature_shape = tuple(int(d) for d in info["feature-shape"])
                    scale = float(info["feature-scale"])
                    if not 0 < scale < float("inf"):
                        raise ValueError(f"published feature scale {scale} is not a positive finite number")
                    self.result.feature_scale = scale
                    if self.mode.sends == IMAGES:
                        self.result.image_shape = tuple(int(d) for d in info["image-shape"])
                    arrays = self.result.shared = content["shared"]  # only once the whole reply checked out
                elif server_round == 2:
                    pool = unpack_pool(content["pool"], self.share)
                    declared = int(metrics["num-examples"])
                    self.mode.validate(name, pool, PoolSpec(
                        self.result.feature_shape, self.num_classes, self.result.image_shape,
                        max_items=min(self.items_per_image * declared, self.max_pool),
                        bound=self.feature_bound * self.result.feature_scale))
                    self.result.pools[name] = pool
                    self.result.pool_bytes[name] = content["pool"].count_bytes()
                elif server_round == 3 and "screening" in content:  # the pools this receiver refused, and why
                    refused = content["screening"]
                    self.result.screening[name] = dict(zip(refused["senders"], refused["reasons"]))
            except (KeyError, TypeError, ValueError) as err:  # PoolError is a ValueError
                self._fail(name, server_round, f"rejected reply: {err}")
                continue
            self.result.entities[name].metrics.update(metrics)
            answered.append(RecordDict({"metrics": metrics}))
        return arrays, aggregate_metricrecords(answered, "num-examples") if answered else None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        """No separate evaluation round: each entity scores its refined decider inside step 3."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    # --- driving the rounds ---------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600.0,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's ``Strategy.start`` for the collaboration: the introduction round, then the three
        steps as train rounds 1-3. Returns Flower's :class:`Result` (the shared modules as ``arrays``, each
        step's mean metrics in ``train_metrics_clientapp``); everything else the server collected,
        failures and refusals included, is in :attr:`result`.

        ``initial_arrays`` must be empty and ``num_rounds`` 3: step 1 makes the weights, and the
        collaboration has exactly three steps. There is no evaluation round (each entity scores its
        refined decider in step 3), so ``evaluate_config`` and ``evaluate_fn`` must stay unset.
        Raises :class:`CollaborationError` when the pretrainer fails or fewer than ``min_healthy``
        entities remain; :attr:`result` still holds everything recorded so far.
        """
        if len(initial_arrays) or num_rounds != len(STEPS) or evaluate_config or evaluate_fn:
            raise ValueError(f"PoolExchange runs its {len(STEPS)} steps from no initial arrays and has no evaluation "
                             f"round: got {len(initial_arrays)} initial arrays, num_rounds={num_rounds}, "
                             f"evaluate_config={evaluate_config}, evaluate_fn={evaluate_fn}")
        self.summary()
        config = train_config if train_config is not None else ConfigRecord()
        out = Result()
        with self._phase("connect: wait for SuperNodes and ask which entity each is"):
            self._introduce(grid, timeout)
        with self._phase(f"step 1: {self.pretrain_on} pretrains Φ and trains ψ"):
            shared, metrics = self._round(grid, 1, initial_arrays, config, timeout)
        if shared is None:
            raise CollaborationError(f"step 1 failed: {self.pretrain_on} returned no shared modules "
                                     f"({self.result.entities[self.pretrain_on].failure or 'no reply'})")
        log.info("shared modules: %d arrays, %.2f MB", len(shared), shared.count_bytes() / 1e6)
        out.arrays = shared
        out.train_metrics_clientapp[1] = metrics
        share = ("every entity trains its private DPM and shares its poisoned pool" if self.share == DPM
                 else f"every entity shares its pool in sharing mode {self.share}")
        for server_round, what in ((2, share),
                                   (3, "every entity refines its decider on its features plus the others' pools")):
            with self._phase(f"step {server_round}: {what}"):
                _, metrics = self._round(grid, server_round, shared, config, timeout)
            log.info("step %d: healthy %s; mean metrics %s", server_round, self.result.healthy(),
                     {k: round(float(v), 4) for k, v in (metrics or {}).items()})
            self._require_healthy(f"step {server_round}")
            if metrics is not None:
                out.train_metrics_clientapp[server_round] = metrics
        return out

    def _round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float
               ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        messages = list(self.configure_train(server_round, arrays, config, grid))
        replies = grid.send_and_receive(messages, timeout=timeout)
        return self.aggregate_train(server_round, replies)

    def _replies(self, server_round: int, replies: Iterable[Message]) -> Iterator[tuple[str, RecordDict]]:
        """(entity, content) of each good reply; errors and missing replies are recorded as failures."""
        pending = dict(self._sent)
        for msg in replies:
            name = pending.pop(msg.metadata.src_node_id, None)
            if name is None:
                log.warning("step %d: ignoring a reply from unexpected node %d", server_round,
                            msg.metadata.src_node_id)
            elif msg.has_error():
                self._fail(name, server_round, msg.error.reason)
            else:
                yield name, msg.content
        for name in pending.values():
            self._fail(name, server_round, "no reply before the timeout")

    def _introduce(self, grid: Grid, timeout: float) -> None:
        """Wait for the SuperNodes, then map node ids to entity names (partition-id order)."""
        deadline = time.monotonic() + self.node_wait
        while len(node_ids := list(grid.get_node_ids())) < len(self.entities) and time.monotonic() < deadline:
            time.sleep(1.0)
        log.info("%d SuperNode(s) connected for %d entities", len(node_ids), len(self.entities))
        messages = [Message(content=RecordDict(), dst_node_id=node, message_type=INTRODUCE) for node in node_ids]
        refusals: dict[str, str] = {}  # entity -> why a node answering for it was refused
        for msg in grid.send_and_receive(messages, timeout=timeout):
            node = msg.metadata.src_node_id
            if msg.has_error():
                claim = (self.roster or {}).get(node)
                self._refuse(node, f"could not say which entity it is: {msg.error.reason}")
                if claim:
                    refusals[claim] = msg.error.reason
                continue
            try:
                name = str(msg.content["entity"]["name"])
            except (KeyError, TypeError) as err:
                self._refuse(node, f"sent no entity name ({err})")
                continue
            status = self.result.entities.get(name)
            if status is None:
                self._refuse(node, f"claims to be {name!r}, which is not among {', '.join(self.entities)}")
            elif self.roster is not None and self.roster.get(node) != name:
                listed = self.roster.get(node)
                self._refuse(node, f"claims to be {name} but the roster lists it as "
                                   f"{listed if listed else 'no entity (not an authenticated member)'}")
            elif status.node_id is not None:
                self._refuse(node, f"claims to be {name}, already answered for by node {status.node_id}")
            else:
                status.node_id = node
        for status in self.result.entities.values():
            if status.node_id is None:
                why = refusals.get(status.name)
                status.failure = f"step 0: {'refused: ' + why if why else 'no SuperNode answered for this entity'}"
        log.info("entities: %s", ", ".join(f"{s.name}=node {s.node_id}" for s in self.result.entities.values()))
        if not self.result.entities[self.pretrain_on].healthy:
            refused = "; ".join(self.result.refused)
            raise CollaborationError(f"the pretraining entity {self.pretrain_on} has no SuperNode "
                                     f"({self.result.entities[self.pretrain_on].failure})"
                                     + (f"; refused: {refused}" if refused else ""))

    def _refuse(self, node: int, reason: str) -> None:
        reason = " ".join(str(reason).split())[:500]
        log.warning("node %d refused: %s", node, reason)
        self.result.refused.append(f"node {node}: {reason}")

    def _fail(self, name: str, server_round: int, reason: str) -> None:
        reason = " ".join(str(reason).split())[:500]
        log.warning("%s left out at step %d: %s", name, server_round, reason)
        self.result.entities[name].failure = f"step {server_round}: {reason}"

    def _require_healthy(self, where: str) -> None:
        healthy = self.result.healthy()
        if len(healthy) < self.min_healthy:
            failures = "; ".join(f"{s.name}: {s.failure}" for s in self.result.entities.values() if s.failure)
            raise CollaborationError(f"after {where} only {len(healthy)} healthy entities "
                                     f"({', '.join(healthy) or 'none'}); at least {self.min_healthy} are needed "
                                     f"to share pools. Failures: {failures}")

    @contextmanager
    def _phase(self, what: str) -> Iterator[None]:
        log.info("%s ...", what)
        t0 = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - t0
            self.result.phases.append((what, seconds))
            log.info("%s: done in %.1fs", what, seconds)
