"""The attack suite's three hot loops, each timed as it was and as it is, side by side in one process.

    python benchmarks/attack_kernels.py [--repeats 20] [--out results/benchmark]

- A decoder training step (the decoder, transfer, substitute and dpm-agnostic attackers, and the
  entity's disclosure check): before, L1 + (1 − SSIM) by pytorch-msssim's grouped convolutions and the
  decoder's resizing by ``F.interpolate``; after, :func:`entities.metrics.ssim_per_image`'s window matrices
  and :func:`entities.decoders.bilinear`'s matrix products (each equal to 1e-6 in fp32).
- The identification test of one cell (:func:`entities.attacks.scoring.gallery_ssim`, 300 items against
  galleries of 100 of 1,000 images): 25 items at a time, and one at a time (the same figures, bit for bit).
- Five steps of the ``optimize`` attacker's search (:func:`entities.attacks.optimize.invert`): backpropagating to
  the images through φ1, and through :func:`entities.train.folded` φ1 (BatchNorm folded into the convolutions).

One torch thread, as a Ray task of the suite runs, under the resolved runtime (bf16 autocast and
channels_last where the CPU runs them fast), the default preset's shapes (CIFAR-10, ResNet-20 split at
conv4_1, batch 128 for the decoder, 100 images for the search). Timing does not depend on the weights, so
the networks are freshly built. Each variant is warmed up, then called ``--repeats`` times in turns, the order
alternating, so a load change on the machine hits both; the median counts. Writes ``attack-kernels.md|csv``
with the ratio old / new.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as msssim

from entities import decoders, runtime
from entities.attacks.optimize import invert_path
from entities.attacks.scoring import gallery_rows, gallery_ssim
from entities.backbone import build_backbone
from entities.decoders import build_decoder
from entities.metrics import DATA_RANGE, SSIM_SIGMA, SSIM_WINDOW, ssim_per_image
from entities.presets import load_config
from entities.report import write_table
from entities.train import batch, folded, freeze

SEARCH_STEPS = 5


def msssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The SSIM the library used before: pytorch-msssim's, in fp32."""
    with torch.autocast(x.device.type, enabled=False):
        return msssim(x.float(), y.float(), data_range=DATA_RANGE, size_average=False, win_size=SSIM_WINDOW,
                      win_sigma=SSIM_SIGMA)


def interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The decoder's resizing as it was."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def decoder_step(ssim: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], phi1: torch.nn.Module,
                 resize: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]) -> Callable[[], None]:
    rt = runtime.current()
    images = torch.rand(128, 3, 32, 32)
    with torch.no_grad():
        features = phi1(images)
    decoder = rt.module(build_decoder(tuple(features.shape[1:]), (3, 32, 32)))
    opt = torch.optim.Adam(decoder.parameters(), 1e-3)
    f, x = batch(features), batch(images)

    def step() -> None:
        with mock.patch.object(decoders, "bilinear", resize), rt.autocast():
            recon = decoder(f).float()
            loss = (recon - x).abs().mean() + 1 - ssim(recon, x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def search_step(model: torch.nn.Module, phi1: torch.nn.Module) -> Callable[[], None]:
    """Five steps of the suite's own search (:func:`entities.attacks.optimize.invert_path`) on 100 images."""
    truth, start = torch.rand(100, 3, 32, 32), torch.rand(100, 3, 32, 32)
    with torch.no_grad():
        target = phi1(truth)
    return lambda: invert_path(model, target, start, (SEARCH_STEPS,))


def timed(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Milliseconds per call of each, median of ``repeats``, after one warm-up call each. The order alternates
    from one repeat to the next: what one call leaves behind (freed memory, a cold cache) slows the next, and a
    fixed order would charge it to one side."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args()
    cfg = load_config("default")
    runtime.configure(cfg)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    phi1, _ = build_backbone(cfg.backbone.name, len(cfg.data.task_classes)).split(cfg.backbone.hook)
    freeze(phi1)
    rows = []
    images, recon = torch.rand(1000, 3, 32, 32), torch.rand(300, 3, 32, 32)
    galleries = gallery_rows(len(images), np.arange(len(recon)), 100, seed=0)
    for loop, before, after in (
            ("identification scoring of one cell, 300 items x 100 gallery images",
             lambda: gallery_ssim(recon, images, galleries, chunk=25), lambda: gallery_ssim(recon, images, galleries)),
            ("decoder training step, L1 + (1 − SSIM), batch 128", decoder_step(msssim_per_image, phi1, interpolate),
             decoder_step(ssim_per_image, phi1, decoders.bilinear)),
            (f"optimize search, {SEARCH_STEPS} steps through φ1 on 100 images", search_step(phi1, phi1),
             search_step(folded(phi1), phi1))):
        ms = timed({"before": before, "after": after}, args.repeats)
        rows.append({"loop": loop, "ms before": round(ms["before"], 1), "ms after": round(ms["after"], 1),
                     "before / after": round(ms["before"] / ms["after"], 2)})
        print(f"{loop}: {ms['before']:.1f} ms -> {ms['after']:.1f} ms, {ms['before'] / ms['after']:.2f}x", flush=True)
    write_table(pd.DataFrame(rows), args.out, "attack-kernels",
                "The attack suite's hot loops before and after their exact-math changes",
                f"Median milliseconds per call, one torch thread ({runtime.current().describe()}), {args.repeats} "
                "calls each, in turns, the order alternating, in one process (`python benchmarks/attack_kernels.py`). "
                "Before: SSIM by "
                "pytorch-msssim's grouped convolutions and the decoder's resizing by F.interpolate; the search "
                "through φ1 with its BatchNorms; scoring 25 items at a time. After: SSIM by window matrices and "
                "resizing by matrix products (each equal to 1e-6 in fp32); φ1 with each BatchNorm folded into its "
                "convolution; scoring one item at a time (the same figures bit for bit).")


if __name__ == "__main__":
    main()
