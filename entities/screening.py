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

A refused pool is a loss too: the liar's items were real, only its labels lied, and a receiver that drops them
loses what they would have taught (at collab-scale, up to a point of top-1, more than the one-class lie itself
cost). With ``repair`` the receiver keeps what it can trust of a pool it would refuse, trying three repairs in turn:

1. Relabel. If the class that each claimed label's items agree with most (the largest mean pointwise mutual
   information) is a one-to-one map that moves some class, and every class of the pool relabelled by it is
   trusted, it learns from the relabelled pool: labels permuted, whether by a liar or by another numbering.
2. Split. If the pool lacks classes that the others send (a class relabelled as another leaves its own empty),
   each item of a class that is not trusted gets the class, among its claimed one and the missing ones, that φ2
   sees most in it; kept if every class so filled is then trusted. A class relabelled as another is one that
   then holds two, and φ2 tells two classes apart far better than it names one of K (kept whole, class 0's items
   would teach class 1; left out, as repair 3 does, they teach nothing: at collab-scale that cost an honest
   receiver a point). The items so split carry φ2's own labels, not the sender's: the most a liar makes a
   receiver learn there is what φ2 already says. Every item is split, also where φ2 is unsure: on E2's one-class
   lie at collab-scale that puts 15% of them in the wrong class, and yet an honest receiver learns more from them
   than from the 58% that φ2 prefers by 2 nats (95% right) with the rest left out. Leaving items out starves the
   classes they belong to: against the honest collaboration, E4 (64 images of its own) lost 1.07 ± 0.34 points of
   top-1 with that margin and −0.25 ± 0.21 splitting every item (the same eight refinement seeds; 1.33, 0.66 and
   −0.46 at margins of 2, 1 and 0 nats over four), and E3 0.02 ± 0.35 and −0.28 ± 0.25 (four seeds).
3. Keep the trusted classes, if they are more than half of the judged ones, and leave out the rest. Any other
   pool is refused whole, since a lie the check missed hides best in the classes a weak φ2 confuses (on
   collab-tiny, shifted pools kept their class 3, all class 2, when only a majority of failing classes refused
   them).

A pool caught lying is held to more than the check: a class is trusted if it passes the check and its labels
clearly agree with φ2 (mean lift two standard errors above 0), since where φ2 is weak the median is low and a lie
can pass it (on collab-tiny a shifted pool's classes 3 and 4 did). Classes with fewer than :data:`MIN_ITEMS`
items, or that no vote has (a relabelling's target nobody else sends), are left out of a repaired pool: too few
to judge or map.
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


@dataclass(frozen=True)
class Repair:
    """What a receiver kept of a pool it would refuse: ``labels`` per item of the pool, the label it learns for
    that item (-1: left out); ``why`` says what failed and what was done."""

    labels: np.ndarray
    why: str

    def apply(self, pool: Pool) -> Pool:
        keep = self.labels >= 0
        return Pool(pool.data[torch.as_tensor(keep)], self.labels[keep])

    def moves(self, claimed: np.ndarray) -> dict[int, dict[int, int]]:
        """Per claimed label, how many of its items it learns under each label (left out: -1)."""
        claimed = np.asarray(claimed)
        return {int(c): {int(t): int(n) for t, n in zip(*np.unique(self.labels[claimed == c], return_counts=True))}
                for c in np.unique(claimed)}


@dataclass
class Screening:
    """What a receiver decided: per sender and class the agreement (nats) and its standard error, the
    reference per class, the senders whose pools it keeps (whole, or as ``repaired``), and why it refused the
    others."""

    agreement: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    reference: dict[int, float] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    repaired: dict[str, Repair] = field(default_factory=dict)

    def record(self, pools: dict[str, Pool] | None = None) -> dict:
        """The decisions; with the ``pools`` screened, each repair's moves (claimed label → learned → items)."""
        return {"agreement": self.agreement, "reference": self.reference, "kept": self.kept, "refused": self.refused,
                "repaired": {s: {"why": r.why} | ({"moves": r.moves(pools[s].labels)} if pools else {})
                             for s, r in self.repaired.items()}}

    def apply(self, pools: dict[str, Pool]) -> dict[str, Pool]:
        """The pools the receiver learns from: those kept, each repaired one as repaired."""
        return {s: self.repaired[s].apply(pools[s]) if s in self.repaired else pools[s] for s in self.kept}

    def changed(self) -> dict[str, str]:
        """Per sender the check refused or repaired, what it did and why (for run records)."""
        return {**{s: f"refused: {w}" for s, w in self.refused.items()},
                **{s: f"repaired: {r.why}" for s, r in self.repaired.items()}}


def lift(phi2: nn.Module, pool: Pool) -> np.ndarray:
    """Per item and class, log φ2(class | item) − log q(class), q φ2's mean output over the pool."""
    log_p = torch.log_softmax(infer(phi2, pool.features).float(), 1)
    return (log_p - torch.log(log_p.exp().mean(0))).numpy()


def by_class(lifts: np.ndarray, labels: np.ndarray) -> dict[int, tuple[float, float]]:
    """Per label with at least :data:`MIN_ITEMS` items: the mean lift of the items at their label, and its
    standard error."""
    labels = np.asarray(labels)
    picked = lifts[np.arange(len(labels)), labels]
    out = {}
    for c in np.unique(labels):
        values = picked[labels == c]
        if len(values) >= MIN_ITEMS:
            out[int(c)] = (float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))))
    return out


def agreement(phi2: nn.Module, pool: Pool) -> dict[int, tuple[float, float]]:
    """Per class with at least :data:`MIN_ITEMS` items: the mean over the items labelled c of log φ2(c | item)
    − log q(c) (q: φ2's mean output over the pool), and the standard error of that mean."""
    return by_class(lift(phi2, pool), pool.labels)


def relabelling(lifts: np.ndarray, labels: np.ndarray) -> dict[int, int] | None:
    """Claimed label → the class its items agree with most, over the labels with at least :data:`MIN_ITEMS`
    items; None unless that map is one-to-one and moves some label."""
    labels = np.asarray(labels)
    judged = [int(c) for c in np.unique(labels) if (labels == c).sum() >= MIN_ITEMS]
    target = {c: int(lifts[labels == c].mean(0).argmax()) for c in judged}
    if len(set(target.values())) < len(target) or all(c == t for c, t in target.items()):
        return None
    return target


def _low(by_cls: dict[int, tuple[float, float]], reference: dict[int, float], margin: float) -> dict:
    return {c: (a, se) for c, (a, se) in by_cls.items() if a + 2 * se < reference[c] - margin}


def _trusted(by_cls: dict[int, tuple[float, float]], reference: dict[int, float], margin: float) -> set[int]:
    """The classes of a pool caught lying that it may keep: within the margin, and its labels clearly agreeing
    with φ2 (mean lift two standard errors above 0), not merely close to a reference a weak φ2 leaves low."""
    judged = {c: v for c, v in by_cls.items() if c in reference}
    return {c for c, (a, se) in judged.items() if a - 2 * se > 0} - set(_low(judged, reference, margin))


def _mapped(mapping: dict[int, int], labels: np.ndarray) -> np.ndarray:
    """Each item's label under ``mapping``; -1 where its claimed label is not mapped."""
    return np.array([mapping.get(int(c), -1) for c in labels])


def _split(lifts: np.ndarray, labels: np.ndarray, failing: set[int], trusted: set[int], missing: list[int]
           ) -> np.ndarray:
    """Each item of a ``failing`` class given the class, among its claimed one and the pool's ``missing``
    classes, that it agrees with most; trusted classes kept as they are, every other item left out (-1)."""
    out = np.where(np.isin(labels, list(trusted)), labels, -1)
    for c in failing:
        rows = np.flatnonzero(labels == c)
        candidates = np.array([c, *missing])
        out[rows] = candidates[lifts[np.ix_(rows, candidates)].argmax(1)]
    return out


def _repair(lifts: np.ndarray, labels: np.ndarray, reference: dict[int, float], margin: float) -> Repair | None:
    """The pool relabelled class by class, if every class of it is then trusted; else its failing classes split
    between themselves and the classes it lacks, if every class they then fill is trusted; else its trusted
    classes, if they are more than half of its classes; else None."""
    mapping = relabelling(lifts, labels)
    if mapping is not None:
        mended = _mapped(mapping, labels)
        keep = mended >= 0
        if _trusted(by_class(lifts[keep], mended[keep]), reference, margin) == set(mapping.values()):
            moved = ", ".join(f"{c}→{t}" for c, t in mapping.items() if c != t)
            return Repair(mended, f"labels relabelled ({moved}), which then agree with φ2")
    by_cls = by_class(lifts, labels)
    trusted = _trusted(by_cls, reference, margin)
    missing = sorted(set(reference) - set(by_cls))
    failing = set(by_cls) - trusted
    if missing and failing:
        split = _split(lifts, labels, failing, trusted, missing)
        filled = set(np.unique(split[split >= 0]).tolist()) - trusted
        judged = by_class(lifts[split >= 0], split[split >= 0])
        if filled and filled <= set(judged) and filled <= _trusted(judged, reference, margin):
            names = ", ".join(str(c) for c in sorted(failing))
            moved = np.isin(labels, list(failing))
            given = ", ".join(f"{int((split[moved] == c).sum())} to {c}" for c in sorted(set(split[moved])))
            return Repair(split, f"the items of class(es) {names} split by φ2 between their label and the missing "
                                 f"class(es) {', '.join(str(c) for c in missing)}, which then agree with φ2 "
                                 f"({given})")
    if 2 * len(trusted) <= len(by_cls):
        return None  # a pool caught lying is kept only where most of its classes clearly agree with φ2
    return Repair(np.where(np.isin(labels, list(trusted)), labels, -1),
                  f"only classes {', '.join(str(c) for c in sorted(trusted))} kept (the others disagree with φ2)")


def screen(phi2: nn.Module, own: Pool, pools: dict[str, Pool], margin: float, repair: bool = False) -> Screening:
    """Keep the pools whose per-class agreement with ``phi2`` is within ``margin`` nats of the reference;
    ``repair``: keep what passes of the others (module docstring) instead of refusing them whole."""
    if margin < 0:
        raise ValueError(f"screening margin {margin} must be at least 0 nats")
    lifts = {s: lift(phi2, p) for s, p in pools.items()}
    out = Screening({s: by_class(lifts[s], p.labels) for s, p in pools.items()})
    votes = {**out.agreement, OWN: agreement(phi2, own)}
    classes = sorted({c for a in votes.values() for c in a})
    out.reference = {c: float(np.median([a[c][0] for a in votes.values() if c in a])) for c in classes}
    for sender, by_cls in out.agreement.items():
        low = _low(by_cls, out.reference, margin)
        if not low:
            out.kept.append(sender)
            continue
        why = "; ".join(f"class {c}: its labels agree with φ2 by {a:+.2f} ± {se:.2f} nats against "
                        f"{out.reference[c]:+.2f} (median), more than {margin:g} lower" for c, (a, se) in low.items())
        fixed = _repair(lifts[sender], np.asarray(pools[sender].labels), out.reference, margin) if repair else None
        if fixed is None:
            out.refused[sender] = why
        else:
            out.kept.append(sender)
            out.repaired[sender] = Repair(fixed.labels, f"{fixed.why}; {why}")
    return out
