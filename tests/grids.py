"""A Flower Grid for tests that drive the real ServerApp in-process: only what the strategy calls.

The strategy uses ``get_node_ids`` and ``send_and_receive``; every other method of Flower's abstract
Grid raises, so a test whose code path reaches one learns it at once.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.serverapp import Grid


class OfflineGrid(Grid):
    """Subclasses implement ``get_node_ids`` and ``send_and_receive``."""

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
