"""Training and evaluation loops for Φ, ψ, P and the deciders φ2.

φ1 is frozen after pretraining, so every loop after it works on cached φ1 features
(:func:`extract_features`) instead of running φ1 again each epoch.

Every loop runs on :func:`entities.runtime.current`: its modules go through ``rt.module`` and its
batches through :func:`batch`, the forward pass of each step under ``rt.autocast()`` (bf16 where the
hardware runs it fast). Losses are taken on fp32 logits and images, and whatever a loop returns
(features, pools, scores) is fp32 on the CPU, so stored artefacts look the same in every precision.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse
from tqdm.auto import tqdm

from entities import runtime
from entities.config import DPMConfig, ReconstructorConfig, TrainConfig
from entities.defences import build_terms
from entities.dpm import task_accuracy, task_loss, utility_loss
from entities.files import save_torch
from entities.metrics import reconstruction_scores, topk_correct

log = logging.getLogger("poisonpool")

Step = Callable[[np.ndarray], tuple[torch.Tensor, dict[str, float]]]


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images to float in [0, 1]."""
    t = torch.as_tensor(images)
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


def batch(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A batch as the current runtime wants it: float (images in [0, 1]), on its device, channels_last."""
    return runtime.current().tensor(to_float(x))


def labels_of(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    return runtime.current().tensor(np.asarray(labels, dtype=np.int64))


def augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop with reflect padding and horizontal flip: the standard CIFAR augmentation."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,)).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,)).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def augmented_views(images: np.ndarray | torch.Tensor, views: int, seed: int) -> list[np.ndarray | torch.Tensor]:
    """The images themselves, then ``views`` − 1 augmented copies in [0, 1] (:func:`augment`), each drawn
    from its own seed, so a decider refined on cached features still sees what a raw-image row sees."""
    out = [images]
    for v in range(1, views):
        with torch.random.fork_rng():
            torch.manual_seed(seed * 1000 + v)
            out.append(augment(to_float(images)))
    return out


def fit(
    params,
    step: Step,
    n: int,
    epochs: int,
    batch_size: int,
    lr: float,
    what: str,
    sgd: bool = False,
    weight_decay: float = 0.0,
    seed: int = 0,
    checkpoint: tuple[nn.Module, Path] | None = None,
) -> list[dict[str, float]]:
    """The one optimisation loop: shuffled mini-batches, cosine LR, progress, NaN guard.

    ``step`` takes the batch's row indices and returns (loss, figures to log); it runs under the
    runtime's autocast and the backward pass outside it. Returns the mean
    figures of each epoch. A non-finite loss stops with the module, epoch and batch named.
    ``checkpoint = (module, path)``: after every epoch the module, optimiser, schedule and random
    streams are written to ``path``, and a run that finds that file carries on after its epoch, so a
    killed run of the long loops loses at most one epoch. The caller deletes the file when done.
    """
    params = [p for p in params if p.requires_grad]
    opt = (
        torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
        if sgd
        else torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    )
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    rng = np.random.default_rng(seed)
    rt = runtime.current()
    history: list[dict[str, float]] = []
    start = 1
    if checkpoint is not None and checkpoint[1].is_file():
        state = torch.load(checkpoint[1], weights_only=True, map_location=rt.device)
        checkpoint[0].load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["epoch"] + 1
        log.info("%s: resuming after epoch %d/%d from %s", what, state["epoch"], epochs, checkpoint[1])
    for epoch in range(start, epochs + 1):
        t0 = time.time()
        perm = rng.permutation(n)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"{what} {epoch}/{epochs}", leave=False, disable=None)
        for b in bar:
            idx = np.sort(perm[b * batch_size:(b + 1) * batch_size])
            with rt.autocast():
                loss, figures = step(idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{what}: loss became {loss.item()} at epoch {epoch}, batch {b + 1}/{steps_per_epoch} "
                    f"(try a lower learning rate); artefacts written before this point are kept"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in figures.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            bar.set_postfix({k: f"{v:.3f}" for k, v in figures.items()})
        means = {k: v / n for k, v in sums.items()}
        history.append(means)
        shown = " ".join(f"{k}={v:.4f}" for k, v in means.items())
        log.info("%s epoch %d/%d %s (%.1fs)", what, epoch, epochs, shown, time.time() - t0)
        if checkpoint is not None:
            state = {"module": checkpoint[0].state_dict(), "optimizer": opt.state_dict(),
                     "schedule": sched.state_dict(), "rng": rng.bit_generator.state,
                     "torch_rng": torch.get_rng_state(), "history": history, "epoch": epoch}
            save_torch(state, checkpoint[1])  # whole or absent: a kill mid-write leaves the last epoch's
    return history


def freeze(*modules: nn.Module) -> None:
    for m in modules:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)


def folded(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` with every BatchNorm folded into the convolution before it (torch.fx):
    the same function in eval mode (to 1e-6), and a tenth less time per step for a search that
    backpropagates through a fixed network hundreds of times (the ``optimize`` attacker through φ1)."""
    out = fuse(module)
    freeze(out)
    return out


def pretrain(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, seed: int = 0,
             checkpoint: Path | None = None):
    """Step 1: train Φ with cross-entropy (Eq. 1) on raw images; resumable from ``checkpoint``. (N, A)
    attribute ``labels`` train it multi-label with binary cross-entropy (Table 4)."""
    runtime.current().module(model)
    model.train()

    def step(idx):
        x = to_float(images[idx])
        logits = model(batch(augment(x) if cfg.augment else x)).float()
        y = labels_of(labels[idx])
        loss = task_loss(logits, y)
        return loss, {"loss": loss.item(), "acc": task_accuracy(logits, y)}

    torch.manual_seed(seed)
    history = fit(model.parameters(), step, len(labels), cfg.epochs, cfg.batch_size, cfg.lr, "pretrain",
                  sgd=True, weight_decay=cfg.weight_decay, seed=seed,
                  checkpoint=None if checkpoint is None else (model, checkpoint))
    model.eval()
    return history


@torch.no_grad()
def extract_features(phi1: nn.Module, images: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    """φ1(x) for all images, computed once; every later step trains on these."""
    return infer(phi1, images, batch_size)


@torch.no_grad()
def infer(module: nn.Module, inputs: np.ndarray | torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``module`` over all inputs in batches, in eval mode: fp32 on the CPU, whatever the runtime."""
    rt = runtime.current()
    rt.module(module).eval()
    out = []
    for i in range(0, len(inputs), batch_size):
        with rt.autocast():
            out.append(module(batch(inputs[i:i + batch_size])).float().cpu().contiguous())
    return torch.cat(out) if out else torch.empty(0)


def train_reconstructor(
    psi: nn.Module, features: torch.Tensor, images: np.ndarray, cfg: ReconstructorConfig, seed: int = 0
):
    """ψ learns to invert φ1 with the L1 loss of Eq. 3 (on the public set Q only)."""
    runtime.current().module(psi)
    psi.train()

    def step(idx):
        loss = (psi(batch(features[idx])).float() - batch(images[idx])).abs().mean()
        return loss, {"l1": loss.item()}

    torch.manual_seed(seed)
    history = fit(psi.parameters(), step, len(features), cfg.epochs, cfg.batch_size, cfg.lr,
                  "reconstructor", seed=seed)
    psi.eval()
    return history


def train_dpm(
    dpm: nn.Module,
    phi2: nn.Module,
    psi: nn.Module,
    features: torch.Tensor,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: DPMConfig,
    seed: int = 0,
    what: str = "dpm",
):
    """Step 2: P minimises U(φ2(P(f))) + λ·Σ privacy terms, with φ2 and ψ frozen (Eq. 6 by default:
    U the cross-entropy and the one term ψ's SSIM; ``cfg.utility`` and ``cfg.privacy`` choose others)."""
    rt = runtime.current()
    for m in (dpm, phi2, psi):
        rt.module(m)
    freeze(phi2, psi)
    dpm.train()
    terms = build_terms(cfg, psi, seed)
    distill = cfg.utility == "distill"

    def step(idx):
        f, x = batch(features[idx]), batch(images[idx])
        poisoned = dpm(f)
        with torch.no_grad():
            original = phi2(f).float() if distill else None
        util = utility_loss(cfg.utility, phi2(poisoned).float(), labels_of(labels[idx]), original)
        privacy = [t.loss(poisoned, x) for t in terms]
        loss = util + cfg.lam * sum(privacy) if privacy else util
        return loss, {"kl" if distill else "ce": util.item(), **{t.name: p.item() for t, p in zip(terms, privacy)}}

    torch.manual_seed(seed)
    history = fit(dpm.parameters(), step, len(features), cfg.epochs, cfg.batch_size, cfg.lr, what, seed=seed)
    dpm.eval()
    return history


@torch.no_grad()
def poison(dpm: nn.Module, features: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """P(φ1(x)) for cached features: what an entity shares."""
    return infer(dpm, features, batch_size)


def train_decider(phi2: nn.Module, features: torch.Tensor, labels: np.ndarray, cfg: TrainConfig,
                  seed: int = 0, what: str = "decider"):
    """Step 3: refine (or train) a decider φ2 on a pool of features, original and poisoned (multi-label
    with BCE for (N, A) attribute ``labels``, as Table 4's fresh privacy classifier)."""
    for p in phi2.parameters():
        p.requires_grad_(True)
    runtime.current().module(phi2)
    phi2.train()

    def step(idx):
        logits = phi2(batch(features[idx])).float()
        y = labels_of(labels[idx])
        loss = task_loss(logits, y)
        return loss, {"loss": loss.item(), "acc": task_accuracy(logits, y)}

    torch.manual_seed(seed)
    history = fit(phi2.parameters(), step, len(features), cfg.epochs, cfg.batch_size, cfg.lr, what,
                  sgd=True, weight_decay=cfg.weight_decay, seed=seed)
    phi2.eval()
    return history


@torch.no_grad()
def evaluate_classifier(model: nn.Module, inputs: torch.Tensor | np.ndarray, labels: np.ndarray,
                        batch_size: int = 1000) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-5 is 100% by definition with ≤ 5 classes)."""
    logits = infer(model, inputs, batch_size)
    y = torch.as_tensor(labels)
    c1 = topk_correct(logits, y, 1).sum().item()
    c5 = topk_correct(logits, y, 5).sum().item()
    return {"top1": 100.0 * c1 / len(y), "top5": 100.0 * c5 / len(y)}


@torch.no_grad()
def evaluate_reconstruction(psi: nn.Module, features: torch.Tensor, images: np.ndarray,
                            batch_size: int = 500) -> dict[str, float]:
    """Mean L1, SSIM, SSIM of the inverted reconstruction and PSNR of ψ(features) against x."""
    sums: dict[str, float] = {}
    for i in range(0, len(features), batch_size):
        recon = infer(psi, features[i:i + batch_size], batch_size)
        scores = reconstruction_scores(recon, to_float(images[i:i + batch_size]))
        for k, v in scores.items():
            sums[k] = sums.get(k, 0.0) + v.sum().item()
    return {k: v / len(features) for k, v in sums.items()}
