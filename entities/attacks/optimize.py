"""``optimize``: white-box inversion by optimisation, warm-started from the strongest learned decoder.

He, Zhang and Lee (ACSAC 2019, "Model inversion attacks against collaborative inference") invert
split features by regularised maximum likelihood: search for the image x whose features match the
shared ones, with a total-variation prior. The collaborator holds φ1 and, in the DPM modes, the map G
it fitted to the victim's pool (:mod:`entities.attacks.substitute`), so it searches for x in [0, 1]
whose G(φ1(x)) (φ1(x) where the recipe has no private part) matches each shared item, starting from
the substitute (or transfer) decoder's reconstruction. A decoder generalises from pairs; this fits
every pool item on its own, so it can sharpen what the decoder smoothed away, and it tests whether
the substitute is close enough to the victim's DPM to invert through.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from entities import runtime
from entities.attacks.base import Family, Knowledge, Target, recipe, uses_dpm
from entities.attacks.substitute import substitute_decoder, substitute_map, substitute_models, substitute_tag
from entities.attacks.transfer import transfer_decoder
from entities.config import Config
from entities.train import folded, freeze, infer

STEPS = 60  # Adam steps per batch of pool items
LR = 0.05  # on the images' logits
TV_WEIGHT = 0.05  # total-variation prior, against the feature error normalised by the features' power
BATCH = 100


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels: the prior that keeps the search on images."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert(model: nn.Module, features: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Images whose ``model`` output matches ``features``, searched from ``start`` (images in [0, 1])."""
    return invert_path(model, features, start, (STEPS,))[STEPS]


def invert_path(model: nn.Module, features: torch.Tensor, start: torch.Tensor, checkpoints: Sequence[int],
                lr: float = LR) -> dict[int, torch.Tensor]:
    """The search of :func:`invert` with the images after each of ``checkpoints`` steps (0: ``start``), to
    measure how far the budget takes it (``benchmarks/optimize_budget.py``)."""
    rt = runtime.current()
    rt.module(model)
    freeze(model)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in checkpoints}
    for i in range(0, len(features), BATCH):
        target = rt.tensor(features[i:i + BATCH]).float()
        power = target.pow(2).mean().clamp_min(1e-8)
        z = torch.logit(rt.tensor(start[i:i + BATCH]).float().clamp(1e-3, 1 - 1e-3)).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for step in range(max(checkpoints) + 1):
            if step in out:
                out[step].append(torch.sigmoid(z).detach().float().cpu().contiguous())
            if step == max(checkpoints):
                break
            x = torch.sigmoid(z)  # stays in [0, 1] without clipping the gradient
            with rt.autocast():
                pred = model(x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x).float()
            loss = (pred - target).pow(2).mean() / power + TV_WEIGHT * total_variation(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: torch.cat(v) for k, v in out.items()}


def search(know: Knowledge, target: Target) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """What the attacker inverts for ``target``: the map from images to shared items, the shared items, and the
    search's start."""
    shown = target.features[target.rows]
    if uses_dpm(target.mode):
        g = substitute_map(know, target, substitute_tag(target))
        start = infer(substitute_decoder(know, target), shown)
        return nn.Sequential(folded(know.shared.phi1), recipe(target.mode, g, know.seed)), shown, start
    # the published map: the identity, or DeepObfuscator's obfuscator, which every party holds
    start = infer(transfer_decoder(know, target.mode), shown)
    return (nn.Sequential(folded(know.shared.phi1), recipe(target.mode, None, know.seed, know.shared.obfuscator)),
            shown, start)


def _reconstruct(know: Knowledge, target: Target, name: str) -> torch.Tensor:
    return invert(*search(know, target))


def _attackers(cfg: Config) -> list[str]:
    return ["optimize"]


FAMILY = Family("optimize", "white-box inversion by optimisation through φ1 and the substitute map (He et al. 2019), "
                "from the substitute decoder's reconstruction", _attackers, _reconstruct, substitute_models,
                cost=15.0)  # per-item gradient steps through φ1: ~10 s a cell where the others take ~0.5 s
