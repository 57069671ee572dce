"""A receiver's check of each sender's pool before it learns from it: do the pool's labels agree with what the
shared decider sees in its items as often as honest labels do?

Privacy is about what a pool shows; a collaborator may also lie in it: flip every label, or relabel one class
as another, and each honest receiver's decider learns the lie. Labels travel in the clear, so only a receiver
can judge them, and only against what it trusts: Φ's φ2, which it runs anyway, and its own labelled images.
For each class c and each sender s the check measures the agreement a(s, c), the share of s's items labelled c
that φ2 classifies as c; the reference r(c) is the median of a(·, c) over the senders and the receiver's own
images, so one liar among three senders cannot move it. A pool is refused if for some class a(s, c) < r(c) −
``margin`` points.

The statistic reads every item of a pool, so it is steady where a receiver's held-out accuracy is not. The
first design tried refined φ2 with and without each pool and scored a held-out quarter of the receiver's shard:
on collab-tiny E4's quarter is 14 images, and an honest pool scored 57.1% there in one run and 35.7% in a
rerun (refused); and the pretraining entity has no held-out part at all (Φ has seen its whole shard), so it
refused an honest pool too. Honest pools cost nothing but the check's inference:
the receiver's refinement on the pools it keeps is what it would have been without the check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from entities.entity import Pool
from entities.train import infer

MIN_ITEMS = 5  # a class with fewer items in a pool is not judged in it: too few to measure agreement
OWN = "own"  # the receiver's own images, one more reference vote


@dataclass
class Screening:
    """What a receiver decided: per sender and class the agreement (%), the reference per class, the senders
    whose pools it keeps, and why it refused the others."""

    agreement: dict[str, dict[int, float]] = field(default_factory=dict)
    reference: dict[int, float] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict:
        return {"agreement": self.agreement, "reference": self.reference, "kept": self.kept, "refused": self.refused}


def agreement(phi2: nn.Module, pool: Pool) -> dict[int, float]:
    """Per class with at least :data:`MIN_ITEMS` items: the share (%) of the pool's items labelled c that
    ``phi2`` classifies as c."""
    predicted = infer(phi2, pool.features).argmax(1).numpy()
    labels = np.asarray(pool.labels)
    return {int(c): 100.0 * float((predicted[labels == c] == c).mean())
            for c in np.unique(labels) if (labels == c).sum() >= MIN_ITEMS}


def screen(phi2: nn.Module, own: Pool, pools: dict[str, Pool], margin: float) -> Screening:
    """Keep the pools whose per-class agreement with ``phi2`` is within ``margin`` points of the reference."""
    if margin < 0:
        raise ValueError(f"screening margin {margin} must be at least 0 points")
    out = Screening({s: agreement(phi2, p) for s, p in pools.items()})
    votes = {**out.agreement, OWN: agreement(phi2, own)}
    classes = sorted({c for a in votes.values() for c in a})
    out.reference = {c: float(np.median([a[c] for a in votes.values() if c in a])) for c in classes}
    for sender, by_class in out.agreement.items():
        low = {c: a for c, a in by_class.items() if a < out.reference[c] - margin}
        if low:
            out.refused[sender] = "; ".join(f"class {c}: {a:.0f}% of its labels agree with φ2 against "
                                            f"{out.reference[c]:.0f}% (median), more than {margin:g} points lower"
                                            for c, a in low.items())
        else:
            out.kept.append(sender)
    return out
