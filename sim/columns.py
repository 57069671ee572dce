"""What the columns of the collaboration's tables mean, said once.

The Flower run's ``summary.md`` and Table 5's ``pools.md`` report the same per-entity figures (the
senders' disclosure, the shared decider on poisoned features, ...); each explains the columns it has
from :data:`GLOSSARY`, so a column means the same in both and a new one is explained in one place.
"""

from __future__ import annotations

from collections.abc import Iterable

_DISCLOSURE = ("the sender's mean SSIM between each shared item and the real image it shows (raw: the image "
               "itself, 1; MDP/AugMDP: the selected image the modified one is built to resemble; DPM: the larger "
               "of SSIM(ψ(pool), x) and SSIM(1 - ψ(pool), x), ψ only: the one reconstructor every DPM was trained "
               "against, not an attacker who adapts)")
_BYTES = "float32 bytes shared per own image, labels included"

GLOSSARY: dict[str, str] = {
    "items_shared": "items in the entity's pool",
    "bytes_per_image": _BYTES,
    "pool_bytes_per_image": _BYTES + ", as sent",
    "disclosure_ssim": _DISCLOSURE,
    "disclosure_by": "what disclosure_ssim measures",
    "label_ssim": "the same against the real image whose label the item carries",
    "worst_attack_ssim": "the worst disclosure over the attackers of `python -m sim.attack` on this entity's pool "
                         "for the same settings",
    "worst_attacker": "who reached it",
    "worst_identification": "the worst identification rate of those attackers",
    "local_disclosure_ssim": "the most the sender's own local attacks recovered from its pool before sending (its "
                             "reported disclosure and, for DPM pools, a decoder trained on half of its own (pool, "
                             "image) pairs and scored on the other half)",
    "disclosure_ceiling": "the most its operator's policy accepts (above it the entity refuses to send)",
    "top1_original": "DPM only: the shared decider φ2 of the pretrained Φ on the original test features of S, "
                     "before any refinement",
    "top1_poisoned": "DPM only: the same on the test features poisoned by this entity's DPM",
    "ssim_pool": "DPM only: SSIM between ψ(pool) and the entity's own images",
    "ssim_pool_inverted": "the same with 1 - ψ(pool)",
    "l1_pool": "L1 between ψ(pool) and the entity's own images",
    "ssim_clean": "ψ's disclosure on the entity's clean φ1 features, the control without which a low ssim_pool "
                  "means nothing",
    "top1_own": "φ2 refined on the entity's own φ1 features only",
    "top5_own": "the same, top-5",
    "received_images": "items received from the other healthy entities, in one pool",
    "pools_refused": "senders whose pools the entity refused whole by its screening policy (run.json says whose and "
                     "why, and which pools it repaired)",
    "top1_refined": "φ2 refined on its own features plus the pools received from the other healthy entities (φ1 "
                    "of the images in the image modes) that it kept",
    "top5_refined": "the same, top-5",
}


def explain(columns: Iterable[str]) -> str:
    """One sentence per table: each of its columns the glossary knows, in the table's order, with its meaning."""
    known = [c for c in columns if c in GLOSSARY]
    if not known:
        return ""
    return "Columns: " + "; ".join(f"{c} = {GLOSSARY[c]}" for c in known) + ". Accuracies in % on S's test split."
