"""What a defence is: a privacy term the DPM minimises beside its utility term.

The paper trains P against one frozen reconstructor ψ (Eq. 6). A DPM that defeats ψ need not defeat
an attacker that retrains, so the privacy part of P's objective is a list of terms
(``dpm.privacy``), each a :class:`Defence` of this package's registry. A term sees each batch's
poisoned features (differentiable) and real images and returns a loss to minimise, weighted by
``dpm.lam``; a term with a model of its own (the adversarial decoder) updates that model inside
:meth:`Term.loss` before scoring P, so P always plays against the adversary's latest move.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from entities.config import DPMConfig


class Term:
    """One privacy term of P's objective; ``name`` labels its figure in the training log."""

    name = "term"

    def loss(self, poisoned: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Defence:
    """A registry entry: the name used in ``dpm.privacy``, a line for tables and the README, and how to
    build the term for one DPM from its settings, the shared ψ and the DPM's seed."""

    name: str
    summary: str
    build: Callable[[DPMConfig, nn.Module, int], Term]
