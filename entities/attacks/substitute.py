"""``substitute``: FORA/SDAR-style, without a single (poisoned feature, image) pair of the victim.

FORA (Xu et al., CVPR 2024) trains a substitute of the victim's feature extractor whose outputs
match the distribution of the victim's features (MMD), then an inversion model on the substitute's
(output, image) pairs; SDAR (Zhu et al., NDSS 2025) aligns adversarially. Here the attacker learns
G, a map of the DPM's shape that starts from its own DPM (the nearest point of the published recipe
it knows), so that G applied to its own labelled features,
perturbed as the recipe says, matches the victim's pool class by class (labels are shared):
class-conditional MMD, plus φ2's cross-entropy, because the victim's DPM was trained to keep φ2
right. It then fine-tunes its transfer decoder on (G(φ1(x)), x) pairs of its shard and Q, and
inverts the victim's pool with that. In the modes without a DPM the recipe has no private part to
substitute: G is the identity and the attack is the transfer decoder's.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from entities import runtime
from entities.attacks.base import Family, Knowledge, Model, Target, recipe, uses_dpm
from entities.attacks.decoder import capped, train_decoder
from entities.attacks.transfer import own_pairs, transfer_decoder, transfer_model
from entities.config import Config
from entities.decoders import build_decoder
from entities.train import batch, fit, freeze, infer, labels_of

BANDWIDTHS = (0.25, 1.0, 4.0)  # Gaussian kernels at these multiples of the median squared distance


def mmd2(x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """Biased squared MMD between two samples with a sum of Gaussian kernels, in fp32."""
    with torch.autocast(x.device.type, enabled=False):
        xy = torch.cat([x, y]).flatten(1).float()
        d = torch.cdist(xy, xy).pow(2)
        k = sum(torch.exp(-d / (s * scale)) for s in BANDWIDTHS)
        n = len(x)
        return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def median_scale(features: torch.Tensor, seed: int, n: int = 500) -> float:
    """The median squared distance between pool items: the kernels' unit, so one setting fits any layer."""
    rows = capped(len(features), n, seed)
    d = torch.cdist(features[rows].flatten(1), features[rows].flatten(1)).pow(2)
    return float(d[d > 0].median()) if (d > 0).any() else 1.0


def pool_digest(target: Target) -> str:
    """The pool's content: what G is fitted to, so a stored G is never reused for another pool."""
    h = hashlib.sha1(target.features.numpy().tobytes())
    h.update(np.asarray(target.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:10]


def substitute_map(know: Knowledge, target: Target, tag: str) -> nn.Module:
    """G fitted to the victim's pool by class-conditional MMD and φ2's cross-entropy."""
    own, a = know.own, know.cfg.attack
    published = recipe(target.mode, nn.Identity(), know.seed, know.shared.obfuscator)
    inputs = infer(published, own.features)  # the recipe's perturbation only

    def build() -> nn.Module:
        return copy.deepcopy(own.dpm)

    def train(g: nn.Module) -> None:
        rt = runtime.current()
        phi2 = rt.module(copy.deepcopy(know.shared.phi2))
        freeze(phi2)
        rt.module(g).train()
        by_class = {c: np.flatnonzero(target.labels == c) for c in np.unique(target.labels)}
        scale = median_scale(target.features, know.seed)
        rng = np.random.default_rng(know.seed)

        def step(idx):
            out = g(batch(inputs[idx]))
            y = own.labels[idx]
            ce = F.cross_entropy(phi2(out).float(), labels_of(y))
            terms = []
            for c in np.unique(y):
                mine = np.flatnonzero(y == c)
                if c in by_class and len(mine) > 1:
                    theirs = batch(target.features[rng.choice(by_class[c], len(mine))])
                    terms.append(mmd2(out[torch.as_tensor(mine, device=out.device)], theirs, scale))
            mmd = torch.stack(terms).mean() if terms else ce.new_zeros(())
            return ce + a.mmd_weight * mmd, {"ce": ce.item(), "mmd": mmd.item()}

        torch.manual_seed(know.seed)
        fit(g.parameters(), step, len(inputs), a.substitute_epochs, a.batch_size, a.lr,
            f"attack substitute map for {target.victim} {target.mode}", seed=know.seed)

    return know.trained(f"substitute-map-{tag}", build, train)


def substitute_tag(target: Target) -> str:
    return f"{target.victim}-{target.mode}-{pool_digest(target)}"


def substitute_decoder(know: Knowledge, target: Target) -> nn.Module:
    """The transfer decoder of the mode, fine-tuned on (G(φ1(x)), x) pairs of the attacker's shard and Q."""
    tag = substitute_tag(target)
    g = substitute_map(know, target, tag)

    def build() -> nn.Module:
        model = build_decoder(know.feature_shape, know.image_shape)
        model.load_state_dict(transfer_decoder(know, target.mode).state_dict())
        return model

    def train(model: nn.Module) -> None:
        features, images = own_pairs(know)
        rows = capped(len(features), know.cfg.attack.max_pairs, know.seed)
        published = recipe(target.mode, nn.Identity(), know.seed, know.shared.obfuscator)
        mapped = infer(nn.Sequential(published, g), features[rows])
        train_decoder(model, mapped, images[rows], know.cfg.attack, know.seed,
                      f"attack substitute decoder for {target.victim} {target.mode}",
                      epochs=know.cfg.attack.substitute_epochs)

    return know.trained(f"substitute-decoder-{tag}", build, train)


def _reconstruct(know: Knowledge, target: Target, name: str) -> torch.Tensor:
    if not uses_dpm(target.mode):  # no private map to substitute: G is the identity, the decoder transfer's
        return infer(transfer_decoder(know, target.mode), target.features[target.rows])
    return infer(substitute_decoder(know, target), target.features[target.rows])


def _attackers(cfg: Config) -> list[str]:
    return ["substitute"]


def substitute_models(cfg: Config, victim: str, mode: str, name: str) -> list[Model]:
    """The transfer decoder of the mode and, where a DPM is shared, G and the decoder through it, fitted
    to this victim's pool: the substitute and optimize cells of that pool share both."""
    transfer = transfer_model(mode)
    if not uses_dpm(mode):
        return [transfer]
    return [transfer, Model(f"substitute-{victim}-{mode}", lambda know, target: substitute_decoder(know, target),
                            pool=True, after=(transfer.tag,))]


FAMILY = Family("substitute", "FORA-style: a map fitted to the victim's pool by class-conditional MMD, then "
                "a decoder on the attacker's pairs through it", _attackers, _reconstruct, substitute_models)
