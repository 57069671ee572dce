"""Images per second of every training and inference loop, fp32 against the resolved runtime.

    python benchmarks/throughput.py [--images 2048] [--variants] [--out results/benchmark]

Each loop is the library's own function (``entities.train`` and MDP's PGD) on real CIFAR-10
images of classes 0-4 (the bundled digits where ``../shared`` is absent), with the default
preset's ResNet-20 split at conv4_1, ψ ``px2s2`` and a 4-block DPM. Every loop runs once to warm up,
then is timed, first under the loops as they were before the runtime module (fp32, NCHW), then
under ``device = precision = auto`` (bf16 autocast and channels_last on a CPU with AMX-BF16 or
AVX512-BF16). ``--variants`` adds fp32 + channels_last and bf16 without channels_last, to show
what each part brings. The FLOPs of one batch of each loop are counted by torch's FlopCounterMode
(convolutions and matrix products, forward and backward), and the achieved FLOP/s are set against an
fp32 and a bf16 4096² matmul timed in the same run. Writes ``throughput.md|csv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from entities import runtime
from entities.backbone import build_backbone
from entities.data import load_dataset_or_fallback, task_public_split
from entities.dpm import DeepPoisoningModule
from entities.mdp import build_modified_set
from entities.presets import load_config
from entities.provenance import write_provenance
from entities.reconstructors import build_reconstructor
from entities.report import write_table
from entities.runtime import Runtime
from entities.train import extract_features, pretrain, train_decider, train_dpm, train_reconstructor
from sim.cli import setup_logging

MDP_STEPS = 10  # PGD steps per image in the timed MDP loop (the presets use 100)


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 4, trials: int = 3) -> float:
    """FLOP/s of an n x n matmul in ``dtype``, the best of a few trials: the ceiling the loops are
    measured against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def loops(images: np.ndarray, labels: np.ndarray) -> dict[str, Callable[[int], object]]:
    """Each loop as ``run(n)``, n images' worth of work (for MDP, n PGD image-steps: a forward pass and
    the gradient with respect to the image, which FlopCounterMode cannot follow through
    ``autograd.grad``, so :func:`pgd_flops` counts it)."""
    cfg = load_config("default")
    one = dataclasses.replace
    torch.manual_seed(0)
    model = build_backbone("resnet20", int(labels.max()) + 1, images.shape[1])
    phi1, phi2 = model.split(cfg.backbone.hook)
    feats = extract_features(phi1, images)
    psi = build_reconstructor("px2s2", tuple(feats.shape[1:]), images.shape[1:])
    mdp_cfg = one(cfg.mdp, steps=MDP_STEPS)

    def fresh_dpm():
        return DeepPoisoningModule(feats.shape[1], cfg.dpm.blocks)

    return {
        "pretrain (ResNet-20, augmented)":
            lambda n: pretrain(build_backbone("resnet20", 5, 3), images[:n], labels[:n], one(cfg.pretrain, epochs=1)),
        "ψ (px2s2, L1)":
            lambda n: train_reconstructor(build_reconstructor("px2s2", tuple(feats.shape[1:]), images.shape[1:]),
                                          feats[:n], images[:n], one(cfg.reconstructor, epochs=1)),
        "DPM (4 blocks, CE + SSIM)":
            lambda n: train_dpm(fresh_dpm(), phi2, psi, feats[:n], images[:n], labels[:n], one(cfg.dpm, epochs=1)),
        "decider φ2": lambda n: train_decider(phi2, feats[:n], labels[:n], one(cfg.decider, epochs=1)),
        "feature extraction φ1": lambda n: extract_features(phi1, images[:n]),
        f"MDP PGD ({MDP_STEPS} steps)":
            lambda n: build_modified_set(model, images[: n // MDP_STEPS], labels[: n // MDP_STEPS], mdp_cfg),
    }


def flops_per_image(run: Callable[[int], object], n: int) -> float:
    with FlopCounterMode(display=False) as counter:
        run(n)
    return counter.get_total_flops() / n


def pgd_flops(images: np.ndarray, classes: int) -> float:
    """FLOPs of one PGD step on one image: the forward pass to the penultimate features, and a
    backward pass to the input of the same cost (no weight gradients are taken)."""
    torch.manual_seed(0)
    model = build_backbone("resnet20", classes, images.shape[1]).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.penultimate(torch.as_tensor(images[:128]).float() / 255)
    return 2 * counter.get_total_flops() / 128


def measure(run: Callable[[int], object], n: int) -> float:
    run(min(n, 256))  # warm up: oneDNN picks and caches its kernels per shape and format
    t0 = time.perf_counter()
    run(n)
    return n / (time.perf_counter() - t0)


def main() -> None:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048, help="images per timed loop")
    parser.add_argument("--variants", action="store_true", help="also fp32 + channels_last and bf16 alone")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args()
    setup_logging()
    split = task_public_split(load_dataset_or_fallback("cifar10"), [0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    images, labels = split.S.train_images[: args.images], split.S.train_labels[: args.images]
    n = len(labels)
    auto = runtime.resolve()
    before = Runtime(auto.device, "fp32", channels_last=False)
    settings = {"fp32 (before)": before}
    if args.variants:
        settings |= {"fp32 channels_last": Runtime(auto.device, "fp32"),
                     "bf16": Runtime(auto.device, "bf16", channels_last=False)}
    settings[f"auto = {auto.describe()}"] = auto
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, "
          f"{torch.get_num_threads()} threads; bf16 CPU flags: {', '.join(runtime.cpu_bf16_flags()) or 'none'}")
    rows = []
    runtime.use(before)
    table = loops(images, labels)
    for loop, run in table.items():
        runtime.use(before)
        flops = pgd_flops(images, int(labels.max()) + 1) if loop.startswith("MDP") else flops_per_image(run, 128)
        row: dict = {"loop": loop, "GFLOP/image": flops / 1e9}
        for name, rt in settings.items():
            runtime.use(rt)
            rate = measure(run, n)
            row[f"{name} img/s"] = rate
            row[f"{name} % of {rt.precision} peak"] = 100 * rate * flops / peaks[rt.precision]
        row["auto / fp32"] = row[f"{list(settings)[-1]} img/s"] / row["fp32 (before) img/s"]
        rows.append(row)
        print(f"{loop}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k != "loop"), flush=True)
    df = pd.DataFrame(rows)
    note = (f"{n} real images per loop ({split.S.name}), one warm-up pass first; MDP's rate counts PGD steps "
            f"(image-steps/s). Matmul peak in the same run: fp32 {peaks['fp32'] / 1e9:.0f}, bf16 "
            f"{peaks['bf16'] / 1e9:.0f} GFLOP/s with {torch.get_num_threads()} torch threads.")
    write_table(df, args.out, "throughput", "Loop throughput: fp32 (the loops before the runtime module) against "
                f"auto ({auto.describe()})", notes=note)
    write_provenance(args.out, started)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
