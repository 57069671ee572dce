"""Command-line plumbing shared by every ``python -m sim.*`` command: one parser style (each option's
default in ``--help``) and one spelling of the options they share (preset, settings, results root,
run name, data root)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from entities import runtime
from entities.config import Config, parse_overrides
from entities.data import DataError
from entities.files import ArtefactError, LockedError, check_run_name
from entities.presets import load_config, preset_names
from sim.help import DefaultsHelp


def override_item(item: str) -> str:
    """One ``--set`` item; anything without ``=`` is refused, so ``--set`` never swallows a positional
    argument that followed it (argparse's ``nargs="*"`` would take it as an override)."""
    if "=" not in item:
        raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE: put positional arguments before --set")
    return item


def command_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A command's parser: the first line of its docstring, and every option's default in ``--help``."""
    return argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0], formatter_class=DefaultsHelp)


def add_config_args(parser: argparse.ArgumentParser, run_name: bool = True) -> None:
    """The options every command shares. ``--results-root`` and ``--run-name`` are absent from the
    parsed arguments unless given (``argparse.SUPPRESS``), so a ``--set results_root=...`` still counts."""
    parser.add_argument("--config", default="default",
                        help=f"preset in configs/ or a .toml path; presets: {', '.join(preset_names())}")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", type=override_item,
                        help="override settings, e.g. --set dpm.lam=0.5 pretrain.epochs=3 precision=fp32")
    parser.add_argument("--results-root", default=argparse.SUPPRESS, metavar="DIR",
                        help="where results and artefacts go (default: results/ in the current directory)")
    if run_name:
        parser.add_argument("--run-name", default=argparse.SUPPRESS, metavar="NAME",
                            help="the run's folder under <results-root>/<command>/ (default: the preset's name)")
    parser.add_argument("--data-root", default=None, help="folder with the data archives "
                        "(default: $POISONPOOL_DATA, then ../shared/data)")
    parser.add_argument("--allow-download", action="store_true",
                        help="let torchvision download CIFAR-10 if no archive is found (connected machines)")


def run_name(args: argparse.Namespace, default: str) -> str:
    """``--run-name`` if given, else ``default`` (the preset's name), checked as one plain folder name."""
    return check_run_name(getattr(args, "run_name", None) or default)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = parse_overrides(args.set)
    if getattr(args, "results_root", None):
        overrides["results_root"] = str(Path(args.results_root).resolve())
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
