"""Defences: the privacy terms a DPM is trained against (``dpm.privacy``), one module each.

Adding one is a module defining ``DEFENCE`` (:class:`~entities.defences.base.Defence`) and a line
below. The utility side of P's objective (``dpm.utility``: labels or distillation of φ2's logits)
is in :mod:`entities.dpm`. Every defence is a setting, so the Flower app, Table 5, the attack suite
and the frontier (``python -m sim.attack frontier``) run it unchanged.
"""

from __future__ import annotations

from torch import nn

from entities.config import DPMConfig
from entities.defences import dcor, decoder, psi
from entities.defences.base import Defence, Term

DEFENCES: dict[str, Defence] = {d.name: d for d in (psi.DEFENCE, decoder.DEFENCE, dcor.DEFENCE)}


def build_terms(cfg: DPMConfig, shared_psi: nn.Module, seed: int) -> list[Term]:
    """The privacy terms of one DPM, in the order ``dpm.privacy`` names them."""
    unknown = [n for n in cfg.privacy if n not in DEFENCES]
    if unknown:
        raise ValueError(f"unknown defence(s) {unknown} in dpm.privacy; valid: {', '.join(DEFENCES)}")
    return [DEFENCES[n].build(cfg, shared_psi, seed + k) for k, n in enumerate(cfg.privacy)]
