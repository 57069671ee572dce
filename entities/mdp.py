"""Mapping Distortion Protection (MDP) and AugMDP (Liu, Li, Jiang and Xia, ICASSP 2021).

For every target pair (x_t, y_t) of a data set, MDP draws a random *selected* image x_s of the same
set, starts x_m = x_s and runs PGD in input space so that a trained model's features f(x_m) approach
f(x_t) (Eq. 1). The shared pair is (x_m, y_t): it looks like x_s but carries y_t, so the image-label
mapping is distorted while the invisible, predictive features of x_t ride along. AugMDP(T) is the
union of T such sets built with different selections (Algorithm 1).

Step size and norm. The paper runs "PGD-100 with step size 0.1" under ℓ∞ and reports a mean SSIM
of 0.969 between selected and modified images. A sign step of 0.1 in the [0, 1] range moves every
pixel by a tenth of the range per iteration and cannot keep that SSIM, so with ``norm = "linf"``
(the default, as the paper's text says) the step is read in 8-bit levels: 0.1/255 per iteration,
at most 10/255 after 100 iterations without projection. The authors' released code does
something else: each step follows the image's gradient scaled to ℓ2 length ``step_size`` in the
[0, 1] range (0.1 there, about 4.6 times the ℓ2 length of a 0.1/255 sign step on a 32 x 32 RGB
image). ``norm = "l2"`` does that, with ``step_size`` and ``epsilon`` as ℓ2 lengths in [0, 1] units.

Storage. Modified images are kept as float16 in [0, 1] (never JPEG, no 8-bit rounding that would
erase sub-level perturbations; float16's spacing below 1 is at most 2^-11, finer than the step),
with the target index, selected index and both labels of every image. Construction runs in batches,
each saved on its own, so an interrupted run continues where it stopped; a resumed run with other
settings, another model or other images stops with an error and keeps the finished batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from entities import runtime
from entities.backbone import Backbone
from entities.config import MDPConfig
from entities.files import save_torch, write_json
from entities.metrics import ssim_per_image
from entities.train import to_float

log = logging.getLogger("poisonpool")

LEVEL = 1.0 / 255.0  # one 8-bit intensity level: the unit of step_size and epsilon under ℓ∞
NORMS = ("linf", "l2")
FORMAT = 1  # version of the on-disk batch layout
# The settings a stored batch depends on; rounds, image_size and transfer do not change a batch.
CONSTRUCTION_KEYS = ("steps", "step_size", "norm", "p", "layer", "epsilon", "batch_size")


class MDPError(ValueError):
    """Bad MDP input or a resumed construction that does not match what is on disk."""


@dataclass
class ModifiedSet:
    """Modified images (float16, [0, 1]) with everything needed to trace each one back.

    ``labels`` are the target labels: the labels a model trained on the set learns from.
    ``draw`` numbers the selection (0 for MDP, 0..T-1 within AugMDP(T)).
    """

    images: torch.Tensor
    labels: np.ndarray
    target_index: np.ndarray
    selected_index: np.ndarray
    original_labels: np.ndarray
    draw: np.ndarray
    distance_start: np.ndarray  # ||f(x_s) - f(x_t)||_p before PGD
    distance_end: np.ndarray  # ||f(x_m) - f(x_t)||_p after PGD

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def union(sets: list[ModifiedSet]) -> ModifiedSet:
        """AugMDP's ∪ of several modified sets."""
        return ModifiedSet(
            torch.cat([s.images for s in sets]),
            *(np.concatenate([getattr(s, k) for s in sets]) for k in _ARRAY_FIELDS),
        )

    def select(self, rows: np.ndarray) -> ModifiedSet:
        return ModifiedSet(self.images[rows], *(getattr(self, k)[rows] for k in _ARRAY_FIELDS))

    def of_draw(self, draw: int) -> ModifiedSet:
        """One MDP set out of an AugMDP union."""
        return self.select(np.flatnonzero(self.draw == draw))


_ARRAY_FIELDS = ("labels", "target_index", "selected_index", "original_labels", "draw",
                 "distance_start", "distance_end")


def feature_fn(model: Backbone, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """f of Eq. 1 as flat vectors: the penultimate layer (paper), the logits, or a hook point."""
    if layer == "penultimate":
        return model.penultimate
    if layer == "logits":
        return model
    names = model.hook_points()
    if layer not in names:
        raise MDPError(f"unknown MDP layer {layer!r}; valid: penultimate, logits, {', '.join(names)}")
    phi1, _ = model.split(layer)
    return lambda x: phi1(x).flatten(1)


def as_unit_images(images: np.ndarray | torch.Tensor, what: str = "images") -> torch.Tensor:
    """uint8 or float NCHW images as float32 in [0, 1]; a float image outside [0, 1] is an error."""
    x = to_float(images)
    if x.ndim != 4:
        raise MDPError(f"{what}: expected N x C x H x W images, got shape {tuple(x.shape)}")
    if len(x) and not (torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise MDPError(f"{what}: pixel values must lie in [0, 1] (got {x.min().item():.4g} .. "
                       f"{x.max().item():.4g}); pass uint8 images or floats scaled to [0, 1]")
    return x


def select_images(n: int, seed: int) -> np.ndarray:
    """A seeded random selected index for every target, never the target itself."""
    if n < 2:
        raise MDPError(f"MDP needs at least 2 images to select from, got {n}")
    pick = np.random.default_rng(seed).integers(0, n - 1, size=n)
    return pick + (pick >= np.arange(n))


def feature_distance(a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    return torch.linalg.vector_norm(a - b, ord=p, dim=1)


def pgd_modify(f, selected: torch.Tensor, target_features: torch.Tensor, cfg: MDPConfig) -> torch.Tensor:
    """Eq. 1 by PGD from x_s: steps down ||f(x) - f(x_t)||_p, clipped to [0, 1] (and the ε-ball).

    ℓ∞: sign steps of ``step_size`` 8-bit levels; ℓ2: each image's gradient scaled to length
    ``step_size`` (see the module docstring).
    """
    linf = cfg.norm == "linf"
    step, eps = (cfg.step_size * LEVEL, cfg.epsilon * LEVEL) if linf else (cfg.step_size, cfg.epsilon)
    rt = runtime.current()
    x = selected.clone()
    for _ in range(cfg.steps):
        x.requires_grad_(True)
        with rt.autocast():
            feats = f(x).float()
        loss = feature_distance(feats, target_features, cfg.p).sum()  # rows are independent in eval mode
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            if linf:
                x = x - step * grad.sign()
            else:
                length = torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(1e-12)
                x = x - step * grad / length.view(-1, 1, 1, 1)
            if eps > 0:
                x = _project(x, selected, eps, linf)
            x = x.clamp(0.0, 1.0)
    return x.detach()


def sets_folder(cfg: MDPConfig, seed: int, view: str = "") -> str:
    """Where a construction's batches live: one folder per seed, norm (ℓ∞ keeps the plain name it has
    always had) and augmented view of the shard (``Entity.view``; the shard itself keeps the plain name), so
    both readings of the paper and every view can be stored side by side. Any other changed setting finds
    the folder taken and stops with :class:`MDPError`."""
    return f"mdp-sets-seed{seed}" + ("" if cfg.norm == "linf" else f"-{cfg.norm}") + (f"-{view}" if view else "")


def describe_pgd(cfg: MDPConfig) -> str:
    """The PGD settings as tables state them, in their units."""
    step = f"ℓ∞ sign steps of {cfg.step_size:g}/255" if cfg.norm == "linf" else f"ℓ2 steps of length {cfg.step_size:g}"
    ball = "no ε-ball" if not cfg.epsilon else f"ε = {cfg.epsilon:g}{'/255' if cfg.norm == 'linf' else ''}"
    return f"PGD-{cfg.steps}, {step}, {ball}"


def _project(x: torch.Tensor, center: torch.Tensor, eps: float, linf: bool) -> torch.Tensor:
    """x moved back into the ℓ∞ or ℓ2 ball of radius eps around center."""
    if linf:
        return torch.minimum(torch.maximum(x, center - eps), center + eps)
    delta = (x - center).flatten(1)
    scale = (eps / torch.linalg.vector_norm(delta, dim=1).clamp_min(1e-12)).clamp(max=1.0)
    return center + (delta * scale.view(-1, 1)).view_as(x)


def _fingerprint(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        t = torch.as_tensor(a).detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _check_meta(out_dir: Path, meta: dict) -> None:
    """Write the construction's settings on first use; refuse to resume under different ones."""
    path = out_dir / "meta.json"
    if not path.is_file():
        write_json(meta, path, private=True)
        return
    # A setting added after a construction was stored is read at its default, so old batches stay usable.
    old = {**asdict(MDPConfig()), **json.loads(path.read_text())}
    diff = {k: (old.get(k), meta.get(k)) for k in sorted(set(meta)) if old.get(k) != meta.get(k)}
    if diff:
        done = len(list(out_dir.glob("batch-*.pt")))
        shown = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise MDPError(
            f"{out_dir} holds an MDP construction made with other settings ({shown}). Its {done} finished "
            f"batch(es) are kept: resume with the stored settings, or delete that folder to start afresh."
        )


def build_modified_set(
    model: Backbone,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    cfg: MDPConfig,
    seed: int = 0,
    out_dir: Path | None = None,
    draw: int = 0,
) -> ModifiedSet:
    """MDP: one modified set of the same size as ``images`` (targets in order, selections seeded).

    ``model`` is a trained classifier; it is used in eval mode and not changed. With ``out_dir``
    every finished batch is saved there and reused by the next call with the same settings.
    """
    f = feature_fn(model, cfg.layer)
    if cfg.norm not in NORMS:
        raise MDPError(f"unknown MDP norm {cfg.norm!r}; valid: {', '.join(NORMS)}")
    if cfg.steps < 0 or cfg.step_size <= 0 or cfg.batch_size < 1 or cfg.epsilon < 0:
        raise MDPError(f"MDP needs steps >= 0, step_size > 0, epsilon >= 0 and batch_size >= 1, got {cfg}")
    x_all = as_unit_images(images)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(x_all):
        raise MDPError(f"{len(x_all)} images but {len(labels)} labels")
    n = len(labels)
    selected = select_images(n, seed)
    if out_dir is not None:
        settings = {k: v for k, v in asdict(cfg).items() if k in CONSTRUCTION_KEYS}
        _check_meta(Path(out_dir), {
            "format": FORMAT, "seed": seed, "draw": draw, "n": n, **settings,
            "model": _fingerprint(*model.state_dict().values()), "images": _fingerprint(x_all, labels),
        })
    t0 = time.time()
    was_training = model.training
    runtime.current().module(model).eval()
    batches = []
    try:
        n_batches = math.ceil(n / cfg.batch_size)
        for b in tqdm(range(n_batches), desc=f"MDP draw {draw}", leave=False, disable=None):
            path = Path(out_dir) / f"batch-{b:05d}.pt" if out_dir is not None else None
            if path is not None and path.is_file():
                batches.append(torch.load(path, weights_only=True, map_location="cpu"))
                continue
            rows = np.arange(b * cfg.batch_size, min(n, (b + 1) * cfg.batch_size))
            batch = _modify_batch(f, x_all, rows, selected[rows], cfg)
            if path is not None:
                save_torch(batch, path, private=True)  # whole or absent, 0600: images derived from the shard
            batches.append(batch)
            log.info("MDP draw %d: batch %d/%d done (%d images, %.0fs)", draw, b + 1, n_batches, len(rows),
                     time.time() - t0)
    finally:
        model.train(was_training)
    cat = {k: torch.cat([bt[k] for bt in batches]) for k in batches[0]}
    rows = cat["target_index"].numpy()
    sel = cat["selected_index"].numpy()
    return ModifiedSet(
        cat["images"], labels[rows], rows, sel, labels[sel], np.full(n, draw),
        cat["distance_start"].numpy(), cat["distance_end"].numpy(),
    )


def _modify_batch(f, x_all: torch.Tensor, rows: np.ndarray, sel: np.ndarray, cfg: MDPConfig) -> dict:
    rt = runtime.current()
    x_t, x_s = rt.tensor(x_all[rows]), rt.tensor(x_all[sel])
    with torch.no_grad(), rt.autocast():
        target = f(x_t).float()
        start = feature_distance(f(x_s).float(), target, cfg.p)
    x_m = pgd_modify(f, x_s, target, cfg).half()
    with torch.no_grad(), rt.autocast():
        end = feature_distance(f(x_m.float()).float(), target, cfg.p)
    return {"images": x_m.cpu().contiguous(), "target_index": torch.as_tensor(rows),
            "selected_index": torch.as_tensor(sel), "distance_start": start.cpu(), "distance_end": end.cpu()}


def build_augmented_set(
    model: Backbone,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    cfg: MDPConfig,
    seed: int = 0,
    out_dir: Path | None = None,
    rounds: int | None = None,
) -> ModifiedSet:
    """AugMDP(T) (Algorithm 1): T modified sets with selection seeds seed, seed+1, ...; draw 0 is MDP."""
    t = cfg.rounds if rounds is None else rounds
    if t < 1:
        raise MDPError(f"AugMDP needs T >= 1 modified sets, got T = {t}")
    sets = []
    for d in range(t):
        where = Path(out_dir) / f"draw-{d}" if out_dir is not None else None
        sets.append(build_modified_set(model, images, labels, cfg, seed + d, where, draw=d))
        log.info("MDP draw %d/%d: %d images, feature distance %.3g -> %.3g", d + 1, t, len(sets[-1]),
                 sets[-1].distance_start.mean(), sets[-1].distance_end.mean())
    return ModifiedSet.union(sets)


@torch.no_grad()
def ssim_to(mset: ModifiedSet, images: np.ndarray | torch.Tensor, which: str = "selected",
            batch_size: int = 500) -> np.ndarray:
    """Per-image SSIM of each modified image with its selected (or target) original image."""
    index = {"selected": mset.selected_index, "target": mset.target_index}[which]
    x_all = as_unit_images(images)
    out = [
        ssim_per_image(mset.images[i:i + batch_size].float(), x_all[index[i:i + batch_size]])
        for i in range(0, len(mset), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.empty(0)
