"""How every artefact reaches the disk: whole or not at all, private where it must be, under one key.

A process may be killed at any instruction (a SIGKILL, a full disk, a lost node), and two runs may
share a results root. So every file is written to a temp file with a name no other writer uses, in
the destination's folder, and renamed over the destination: a reader sees the old file or the new
one, never half of one. Files that only their entity may read (DPMs, MDP sets, decoded images) are
created 0600 in folders 0700, whatever the umask. A results root is held by one run at a time
(:func:`results_lock`), and run names cannot leave the folder they name (:func:`check_run_name`).

Artefact keys go through :func:`artefact_key` alone, so a key lists its inputs in one place: the
settings, the seed and the digest of the shared modules an entity actually received
(:func:`module_digest`), never a hand-kept subset that silently serves one run another's file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ArtefactError(RuntimeError):
    """A stored artefact cannot be read; the message names the file and what to do."""


class LockedError(RuntimeError):
    """Another run holds the results root."""


def make_dir(path: Path, private: bool = False) -> Path:
    """``path`` and its parents; a private folder is 0700 even where it already existed."""
    path.mkdir(parents=True, exist_ok=True)
    if private:
        os.chmod(path, PRIVATE_DIR)
    return path


def write_bytes(path: Path, data: bytes, private: bool = False) -> Path:
    """``data`` at ``path`` via a uniquely named temp file in the same folder, fsynced, then renamed."""
    make_dir(path.parent, private)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, PRIVATE_FILE if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: Path, text: str, private: bool = False) -> Path:
    return write_bytes(path, text.encode(), private)


def write_json(obj: Any, path: Path, private: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str), private)


def save_torch(obj: Any, path: Path, private: bool = False) -> Path:
    """``torch.save`` with the same guarantee: the file at ``path`` is always a whole one."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue(), private)


def load_torch(path: Path, what: str) -> Any:
    """``torch.load`` (weights only) that names the file when it is truncated or not a checkpoint."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:  # zip/pickle errors are RuntimeError
        raise ArtefactError(f"{what} {path} is unreadable ({type(err).__name__}: {str(err)[:200]}); delete it "
                            f"and rerun to recompute it") from err


def check_run_name(name: str) -> str:
    """A run name is one folder name: letters, digits, ``.``, ``_``, ``-``, not starting with a dot."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise ValueError(f"run-name {name!r} is not a plain folder name: use 1-100 letters, digits, '.', '_' or "
                         f"'-', starting with a letter or digit (no '/', '..' or spaces)")
    return name


@contextlib.contextmanager
def results_lock(root: Path) -> Iterator[Path]:
    """Hold ``root/.lock`` for the duration (an OS lock: a killed holder releases it)."""
    make_dir(root)
    path = root / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise LockedError(f"results root {root} is in use by {holder} (lock {path}); wait for that run or "
                              f"use another results root") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the lock


def module_digest(*modules: nn.Module) -> str:
    """SHA-1 of the modules' state (names and values): which shared φ1, φ2, ψ a result was made with."""
    h = hashlib.sha1()
    for module in modules:
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def artefact_key(inputs: dict[str, Any], length: int = 10) -> str:
    """The one key function: a short hash of every input that shaped an artefact (settings, seed,
    module digests, format versions). Callers pass everything; nothing is added or dropped here.
    ``length`` hex digits: the attack suite's cells use 12, the length they were first stored under."""
    return hashlib.sha1(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:length]
