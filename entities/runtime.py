"""Where the loops run and in what precision: one place decides, every loop asks it.

Settings ``device = auto | cpu | cuda`` and ``precision = auto | bf16 | fp32`` resolve here once per
process (:func:`configure`). ``auto`` picks CUDA when a GPU is visible, and bf16 where the hardware
runs it fast: a CUDA GPU with bf16 support, or a CPU with AMX-BF16 or AVX512-BF16 (detected from
the CPU's flags, never assumed); fp32 otherwise. bf16 means autocast: weights, optimiser state,
BatchNorm statistics, losses, SSIM/PSNR and every sum over a data set stay fp32, only the
convolutions and matrix products run in bf16. The conv nets run in channels_last, which pays on
CPUs (oneDNN) and on GPUs alike.

bf16 changes the trained weights, so the resolved precision is part of every artefact key
(:func:`key_part`); fp32 keys are those of the releases before bf16 existed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("poisonpool")

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


class RuntimeSettingError(ValueError):
    """``device`` or ``precision`` names something this machine cannot run; the message says which."""


@cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's bf16 instruction sets (``amx_bf16``, ``avx512_bf16``) from the kernel's flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    found = tuple(f for f in ("amx_bf16", "avx512_bf16") if f in flags)
    if not found and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        found = ("avx512_bf16",)  # no /proc/cpuinfo (not Linux): ask torch's own CPU probe
    return found


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise RuntimeSettingError(f"unknown device {device!r} (setting `device`); valid: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeSettingError(
            "device = 'cuda' but torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False); "
            "set device = 'cpu' or 'auto'")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_precision(device: torch.device, precision: str) -> str:
    if precision not in PRECISIONS:
        raise RuntimeSettingError(
            f"unknown precision {precision!r} (setting `precision`); valid: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16_flags() else "fp32"


@dataclass(frozen=True)
class Runtime:
    """The resolved device and precision, and the few operations the loops need from them."""

    device: torch.device
    precision: str  # "bf16" or "fp32", never "auto"
    channels_last: bool = True

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the forward pass (a no-op under fp32); backward runs outside it."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def module(self, m: nn.Module) -> nn.Module:
        """The module on the device (in place), conv weights in channels_last."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return m.to(self.device, memory_format=fmt)

    def tensor(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A batch on the device; 4-d batches in channels_last."""
        t = torch.as_tensor(x).to(self.device, non_blocking=True)
        if self.channels_last and t.ndim == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def describe(self) -> str:
        return f"{self.device.type} {self.precision}" + (" channels_last" if self.channels_last else "")


_current: Runtime | None = None


def resolve(device: str = "auto", precision: str = "auto") -> Runtime:
    d = resolve_device(device)
    return Runtime(d, resolve_precision(d, precision))


def configure(cfg, threads: int = 0) -> Runtime:
    """This process's runtime from a Config's ``device``, ``precision`` and ``threads`` (``threads``
    given here wins: a Ray task gets as many torch threads as the CPUs it reserved)."""
    global _current
    if threads or cfg.threads:
        torch.set_num_threads(threads or cfg.threads)
    _current = resolve(cfg.device, cfg.precision)
    log.info("runtime: %s, %d torch thread(s)", _current.describe(), torch.get_num_threads())
    return _current


def use(rt: Runtime) -> None:
    """Make ``rt`` the current runtime (benchmarks compare two in one process)."""
    global _current
    _current = rt


def current() -> Runtime:
    """The configured runtime, or ``auto``/``auto`` for a process that never configured one."""
    global _current
    if _current is None:
        _current = resolve()
    return _current


def key_part(device: str, precision: str) -> dict[str, str]:
    """What the artefact keys add for these settings: nothing for fp32, ``{"precision": "bf16"}``
    otherwise. Resolved, so ``auto`` on a bf16 machine and ``bf16`` share artefacts."""
    p = resolve_precision(resolve_device(device), precision)
    return {} if p == "fp32" else {"precision": p}
