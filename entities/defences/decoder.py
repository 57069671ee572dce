"""``decoder``: train P against a decoder that retrains on the entity's own current pairs.

The strongest attacker there is holds the victim's own (P(φ1(x)), x) pairs; only the entity itself
has them. So while P learns, the entity trains the attack suite's residual decoder
(:mod:`entities.decoders`, L1 + (1 − SSIM)) on each batch's current pairs for
``dpm.adversary_steps`` steps, then scores P by that decoder's SSIM on the same batch (clipped at
zero in both polarities, as the paper's term, :func:`entities.dpm.ssim_privacy_loss`). Alternating
like this is the min-max of adversarial representation learning (e.g. ResSFL, Li et al. 2022); a P
that only outruns its current adversary is caught by the fresh decoders of the attack suite, which
is why the suite, not this term's training figure, measures the result.
"""

from __future__ import annotations

import torch
from torch import nn

from entities import runtime
from entities.config import DPMConfig
from entities.decoders import build_decoder, decoder_loss
from entities.defences.base import Defence, Term
from entities.dpm import ssim_privacy_loss


class AdversaryTerm(Term):
    name = "adversary_ssim_loss"

    def __init__(self, steps: int, lr: float, seed: int) -> None:
        self.steps, self.lr, self.seed = steps, lr, seed
        self.decoder: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None

    def _ready(self, poisoned: torch.Tensor, images: torch.Tensor) -> nn.Module:
        if self.decoder is None:  # shapes are known at the first batch
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                decoder = build_decoder(tuple(poisoned.shape[1:]), tuple(images.shape[1:]))
            self.decoder = runtime.current().module(decoder).train()
            self.opt = torch.optim.Adam(self.decoder.parameters(), lr=self.lr)
        return self.decoder

    def loss(self, poisoned: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        decoder = self._ready(poisoned, images)
        target = poisoned.detach()
        for _ in range(self.steps):
            d_loss, _, _ = decoder_loss(decoder(target).float(), images, ssim_weight=1.0)
            self.opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt.step()
        # P's gradient flows through the decoder; the decoder's own gradients from this pass are
        # dropped at its next zero_grad, so P's loss never trains it.
        return ssim_privacy_loss(decoder(poisoned).float(), images)


def _build(cfg: DPMConfig, psi: nn.Module, seed: int) -> Term:
    return AdversaryTerm(cfg.adversary_steps, cfg.adversary_lr, seed)


DEFENCE = Defence("decoder", "a residual decoder retrained on the entity's own current (pool, image) pairs "
                  "while P learns (adversarial)", _build)
