"""Settings of the Flower app: the run config names a preset (``configs/``) plus overrides.

``flwr run sim/ --run-config 'preset="collab-tiny" overrides="dpm.lam=0.5 decider.epochs=3"'`` means
the same as ``--config collab-tiny --set dpm.lam=0.5 decider.epochs=3`` for the ``python -m sim.*``
commands: both go through :func:`entities.config.load_config`. Flower only accepts run-config keys
that the app declares, so dotted settings travel inside the one ``overrides`` string.

The ServerApp runs in whatever directory the SuperLink was started from, so a relative (or empty,
i.e. ``results/``) results root is taken from there and made absolute here; ``python -m sim.run``
always passes the caller's own, absolute.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import UserConfig

from entities import runtime
from entities.config import Config, parse_overrides
from entities.files import check_run_name
from entities.presets import load_config

FAILED = ".failed"  # a failed run's results go to <run-name>.failed, beside the last completed ones


def setup_app_logging() -> None:
    """Show poisonpool's INFO lines in the Flower processes.

    Only our logger gets a handler: configuring the root logger would also print Flower's DEBUG
    lines and every HTTP request of the SuperLink client.
    """
    logger = logging.getLogger("poisonpool")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _absolute(path: str) -> str:
    return str(Path(path).resolve())


def config_from_run_config(run_config: UserConfig) -> Config:
    """The Config of a Flower run (``preset``, ``overrides``, ``results-root``).

    The results root is the ServerApp's. An entity takes its data root and private store from its
    own policy (:mod:`entities.policy`), never from here.
    """
    overrides = parse_overrides(str(run_config.get("overrides", "")).split())
    if run_config.get("results-root"):
        overrides["results_root"] = str(run_config["results-root"])
    cfg = load_config(str(run_config.get("preset", "collab")), overrides)  # checks every setting, the mode too
    if cfg.results_root:
        cfg.results_root = _absolute(cfg.results_root)
    runtime.configure(cfg)
    return cfg


def run_dir(cfg: Config, run_config: UserConfig) -> Path:
    """``<results>/flower/<run-name>``; the run name (default: the preset's name) is one plain folder name."""
    return cfg.results_dir() / "flower" / check_run_name(str(run_config.get("run-name") or cfg.name))
