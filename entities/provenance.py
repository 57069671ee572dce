"""Where a results folder came from: the code, the packages, the machine, the command and its time.

Every command writes ``provenance.json`` into each results folder it fills (atomically, through
:mod:`entities.files`), so a table can be traced to the commit that made it, and one made from a
dirty tree, in another precision or on another CPU is recognisable as such without rerunning it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from entities import runtime
from entities.data import SOURCE_ROOT
from entities.files import write_json

PACKAGES = ("poisonpool", "torch", "torchvision", "flwr", "ray", "numpy", "pandas", "pytorch-msssim",
            "scikit-learn", "matplotlib")
FILENAME = "provenance.json"


def git_state(root: Path | None = SOURCE_ROOT) -> dict[str, object]:
    """The checkout's commit and whether tracked or untracked files differ from it. An installed copy
    (no checkout) or a machine without git says so instead of guessing."""
    if root is None:
        return {"commit": None, "dirty": None, "source": "installed package (no git checkout)"}
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                                  check=True).stdout.strip()
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
                "source": str(root)}
    except (OSError, subprocess.SubprocessError) as err:
        return {"commit": None, "dirty": None, "source": f"{root} (git unavailable: {type(err).__name__})"}


def package_versions() -> dict[str, str | None]:
    """Installed versions, read from the distributions' metadata (nothing is imported)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what the platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(prog: str, argv: list[str] | None) -> list[str]:
    """``prog`` and the arguments a command's ``main(argv)`` parsed (``sys.argv`` when called as a command)."""
    return [prog, *(sys.argv[1:] if argv is None else argv)]


def collect(started: float, argv: list[str] | None = None) -> dict[str, object]:
    """Everything :data:`FILENAME` records; ``started`` is the command's ``time.time()`` at its start,
    ``argv`` its command line (default ``sys.argv``)."""
    rt = runtime.current()
    return {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "device": rt.device.type,
        "precision": rt.precision,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if rt.device.type == "cuda" else None,
        "host": platform.node(),
        "command": list(sys.argv if argv is None else argv),
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 3),
    }


def write_provenance(out_dir: Path, started: float, argv: list[str] | None = None, name: str = FILENAME) -> Path:
    """``out_dir/provenance.json``, written whole; a rerun into the same folder replaces it. A command that
    adds files to another's folder (a benchmark beside Table 5's tables) names its own, e.g.
    ``provenance-decider-unions.json``."""
    return write_json(collect(started, argv), Path(out_dir) / name)
