"""A record of every message the ServerApp sends and receives, to show what crosses between entities.

:class:`AuditedGrid` wraps the run's Grid and notes, for each message, every item of every record:
arrays by name, dtype, shape, size and a SHA-256 of their values; metrics and configs by value;
errors by reason. The server writes the rows to ``messages.csv`` beside the results, so anyone can
check what travelled: in the ``dpm`` sharing mode only the shared modules, poisoned features,
labels and metrics; in the image modes (``mdp``, ``augmdp``, ``raw``) images instead of features,
which :func:`matching_images` compares with an entity's real images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from entities.files import write_text
from entities.train import to_float

AUDIT_COLUMNS = ["direction", "message_type", "node_id", "record", "kind", "item", "dtype", "shape", "bytes",
                 "sha256", "value"]


def array_digest(values: np.ndarray) -> str:
    """SHA-256 of an array's values (C order), comparable with any tensor's ``.numpy()``."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def matching_images(sent: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Indices of the ``sent`` images that are one of the ``real`` (uint8) images, value for value.

    A real image counts as sent when it arrives as float32 x/255 (what raw sharing sends) or
    rounded through float16 (how MDP stores its images, so an unmodified selected image would be
    caught too). Per-image digests make the comparison exact and linear in the number of images.
    """
    real_f = to_float(real).numpy()
    known = {array_digest(x) for x in real_f} | {array_digest(x.astype(np.float16).astype(np.float32)) for x in real_f}
    return np.array([i for i, x in enumerate(np.asarray(sent, dtype=np.float32)) if array_digest(x) in known],
                    dtype=np.int64)


def message_rows(msg: Message, direction: str) -> list[dict]:
    """One row per array, metric, config entry or error in a message."""
    node = msg.metadata.dst_node_id if direction == "sent" else msg.metadata.src_node_id
    base = {"direction": direction, "message_type": msg.metadata.message_type, "node_id": node}
    if msg.has_error():
        return [{**base, "kind": "error", "value": msg.error.reason}]
    rows = []
    for record_name, record in msg.content.items():
        if record_name in msg.content.array_records:
            for item, array in record.items():
                values = array.numpy()
                rows.append({**base, "record": record_name, "kind": "array", "item": item, "dtype": array.dtype,
                             "shape": "x".join(map(str, array.shape)), "bytes": values.nbytes,
                             "sha256": array_digest(values)})
        else:
            kind = "metric" if record_name in msg.content.metric_records else "config"
            rows += [{**base, "record": record_name, "kind": kind, "item": k, "value": v} for k, v in record.items()]
    return rows or [{**base, "kind": "empty"}]


class AuditedGrid(Grid):
    """A Grid that records each message before passing it on to (or back from) the real one."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.rows: list[dict] = []

    @property
    def run(self):
        return self.grid.run

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def _record(self, messages: Iterable[Message], direction: str) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            self.rows += message_rows(msg, direction)
        return messages

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self._record(messages, "sent"))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._record(self.grid.pull_messages(message_ids), "received")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = self.grid.send_and_receive(self._record(messages, "sent"), timeout=timeout)
        return self._record(replies, "received")

    def write(self, path: Path) -> Path:
        df = pd.DataFrame(self.rows, columns=AUDIT_COLUMNS)
        df["bytes"] = df["bytes"].astype("Int64")  # integers, blank where a row has no array
        return write_text(path, df.to_csv(index=False))
