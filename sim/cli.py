"""Command-line plumbing shared by every ``python -m sim.*`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from entities import runtime
from entities.config import Config, load_config, parse_overrides, preset_names
from entities.data import DataError
from entities.files import ArtefactError, LockedError


def override_item(item: str) -> str:
    """One ``--set`` item; anything without ``=`` is refused, so ``--set`` never swallows a positional
    argument that followed it (argparse's ``nargs="*"`` would take it as an override)."""
    if "=" not in item:
        raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE: put positional arguments before --set")
    return item


def add_config_args(parser: argparse.ArgumentParser) -> None:
    presets = ", ".join(preset_names())
    parser.add_argument("--config", default="default",
                        help=f"preset in entities/presets/ or a .toml path (default: %(default)s); presets: {presets}")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", type=override_item,
                        help="override settings, e.g. --set dpm.lam=0.5 pretrain.epochs=3 precision=fp32")
    parser.add_argument("--data-root", default=None, help="folder with the data archives (default: search)")
    parser.add_argument("--allow-download", action="store_true",
                        help="let torchvision download CIFAR-10 if no archive is found (connected machines)")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = parse_overrides(args.set)
    if args.data_root:
        overrides["data.data_root"] = args.data_root
    if args.allow_download:
        overrides["data.allow_download"] = "true"
    cfg = load_config(args.config, overrides)
    runtime.configure(cfg)
    return cfg


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_main(main) -> None:
    """Run a command's main; known input errors print one line instead of a traceback."""
    setup_logging()
    try:
        main()
    except (DataError, ValueError, FloatingPointError, ArtefactError, LockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
