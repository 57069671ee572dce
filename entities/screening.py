"""A receiver's check of each sender's pool before it learns from it: do the pool's labels agree with what the
shared decider sees in its items as well as honest labels do?

Privacy is about what a pool shows; a collaborator may also lie in it: flip every label, or relabel one class
as another, and each honest receiver's decider learns the lie. Labels travel in the clear, so only a receiver
can judge them, and only against what it trusts: Φ's φ2, which it runs anyway, and its own labelled images.
For each class c and each sender s the check measures the agreement a(s, c): over s's items labelled c, the
mean of log φ2(c | item) − log q(c), q(c) the mean of φ2(c | ·) over all of s's items (a pointwise mutual
information between label and φ2's output, in nats: the second term takes out φ2's own leaning, since a φ2
that calls most items c "agrees" with any label c, true or not). The reference r(c) is the median of a(·, c)
over the senders and the receiver's own images, so one liar among three senders cannot move it. A pool is
refused if for some class a(s, c) + 2 se(s, c) < r(c) − ``margin``, se the standard error of that mean: a small
honest pool is not refused for its noise.

The statistic reads every item of a pool, so it is steady where a receiver's held-out accuracy is not. The
first design tried refined φ2 with and without each pool and scored a held-out quarter of the receiver's shard:
on collab-tiny E4's quarter is 14 images, and an honest pool scored 57.1% there in one run and 35.7% in a
rerun (refused); and the pretraining entity has no held-out part at all (Φ has seen its whole shard), so it
refused an honest pool too. The second counted argmax agreements, which a φ2 leaning to one class blurs. Honest
pools cost nothing but the check's inference: the receiver's refinement on the pools it keeps is what it
would have been without the check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from entities.pools import Pool
from entities.train import infer

MIN_ITEMS = 5  # a class with fewer items in a pool is not judged in it: too few to measure agreement
OWN = "own"  # the receiver's own images, one more reference vote


@dataclass
class Screening:
    """What a receiver decided: per sender and class the agreement (nats) and its standard error, the
    reference per class, the senders whose pools it keeps, and why it refused the others."""

    agreement: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    reference: dict[int, float] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict:
        return {"agreement": self.agreement, "reference": self.reference, "kept": self.kept, "refused": self.refused}


def agreement(phi2: nn.Module, pool: Pool) -> dict[int, tuple[float, float]]:
    """Per class with at least :data:`MIN_ITEMS` items: the mean over the items labelled c of log φ2(c | item)
    − log q(c) (q: φ2's mean output over the pool), and the standard error of that mean."""
    log_p = torch.log_softmax(infer(phi2, pool.features).float(), 1)
    log_q = torch.log(log_p.exp().mean(0))
    labels = np.asarray(pool.labels)
    lift = (log_p[torch.arange(len(labels)), torch.as_tensor(labels)] - log_q[torch.as_tensor(labels)]).numpy()
    out = {}
    for c in np.unique(labels):
        values = lift[labels == c]
        if len(values) >= MIN_ITEMS:
            out[int(c)] = (float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))))
    return out


def screen(phi2: nn.Module, own: Pool, pools: dict[str, Pool], margin: float) -> Screening:
    """Keep the pools whose per-class agreement with ``phi2`` is within ``margin`` nats of the reference."""
    if margin < 0:
        raise ValueError(f"screening margin {margin} must be at least 0 nats")
    out = Screening({s: agreement(phi2, p) for s, p in pools.items()})
    votes = {**out.agreement, OWN: agreement(phi2, own)}
    classes = sorted({c for a in votes.values() for c in a})
    out.reference = {c: float(np.median([a[c][0] for a in votes.values() if c in a])) for c in classes}
    for sender, by_class in out.agreement.items():
        low = {c: (a, se) for c, (a, se) in by_class.items() if a + 2 * se < out.reference[c] - margin}
        if low:
            out.refused[sender] = "; ".join(
                f"class {c}: its labels agree with φ2 by {a:+.2f} ± {se:.2f} nats against {out.reference[c]:+.2f} "
                f"(median), more than {margin:g} lower" for c, (a, se) in low.items())
        else:
            out.kept.append(sender)
    return out
