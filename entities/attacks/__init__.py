"""The attack suite: every attacker family the threat model allows, by name (``--attacks``).

Adding a family is one module here that defines ``FAMILY`` (:class:`~entities.attacks.base.Family`)
and one line below. Report rows follow this order; attacker 0 of the image modes comes first.
"""

from __future__ import annotations

from entities.attacks import decoder, dpm_agnostic, image, optimize, prior, psi, reconstructors, substitute, transfer
from entities.attacks.base import Family

ATTACKS: dict[str, Family] = {
    image.FAMILY.name: image.FAMILY,
    prior.FAMILY.name: prior.FAMILY,
    psi.FAMILY.name: psi.FAMILY,
    reconstructors.FAMILY.name: reconstructors.FAMILY,
    decoder.FAMILY.name: decoder.FAMILY,
    transfer.FAMILY.name: transfer.FAMILY,
    dpm_agnostic.FAMILY.name: dpm_agnostic.FAMILY,
    substitute.FAMILY.name: substitute.FAMILY,
    optimize.FAMILY.name: optimize.FAMILY,
}
