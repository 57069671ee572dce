"""A dishonest collaborator: what one entity's lying pool costs the honest ones, with and without the receivers'
check (:mod:`entities.screening`), and with the check repairing what it can of a lying pool.

    python -m sim.dishonest [--config collab-scale] [--liar E2] [--margin 0.5] [--seeds 3] [--receivers E ...]
                            [--lies flip merge withhold] [--checks none check repair] [--sequential]

Every honest entity refines Φ's φ2 on its own φ1 features and every other entity's pool (the Flower app's
Step 3) in the preset's sharing mode. The liar changes the labels of its pool (:data:`LIES`, data like Table 5's
rows, with a bound beside the lies: :data:`WITHHELD`, the liar's class 0 not sent at all); the honest entities
keep every pool, or screen each sender's pool, keeping it only if its labels agree with what Φ's φ2 sees in its
items about as well as the others' do, or screen and repair: keep a failing pool relabelled, where its labels
are a permutation of what φ2 sees, else with the items of its failing classes split by φ2 between their label and
the classes it lacks, else without its failing classes
(:mod:`entities.screening`, run here: it only reads the pools). Each receiver's refinement on the pools it kept
is one task, stored as it finishes under a key of everything it depends on (settings that keep the same pools
share it), so a rerun resumes. Output:
``<results-root>/utility/dishonest-<run-name>/dishonest.md|csv`` (``dishonest-<receivers>.md|csv`` with
``--receivers``, and so on with ``--lies`` and ``--checks``: a narrower run, for more seeds where the noise is).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from entities import runtime
from entities.config import Config
from entities.entity import Pool
from entities.files import artefact_key, results_lock, write_json, write_text
from entities.pipeline import load_task
from entities.provenance import FILENAME, command_line, write_provenance
from entities.report import markdown_table
from entities.screening import screen
from entities.train import evaluate_classifier, train_decider
from sim.cli import add_config_args, command_parser, config_from_args, run_main, run_name
from sim.executors import RayPool, Sequential, start_ray
from sim.grid import GridInputs, contributions_key, prepare

log = logging.getLogger("poisonpool")


@dataclass(frozen=True)
class Lie:
    """What the liar does to its pool's labels (``relabel`` of the labels and the number of classes; -1: the
    item is not sent). ``bound``: not a lie but a reference, what a receiver would lose if the liar sent honestly
    all but what its lie takes away. ``tag``: its name on the command line (``--lies``)."""

    tag: str
    name: str
    relabel: Callable[[np.ndarray, int], np.ndarray] | None
    bound: bool = False


WITHHELD = "class 0 withheld (honest; what the one-class lie takes)"
LIES: tuple[Lie, ...] = (
    Lie("honest", "honest", None),
    Lie("flip", "every label flipped (y → y+1 mod K)", lambda y, k: (y + 1) % k),
    Lie("merge", "class 0 relabelled as class 1", lambda y, k: np.where(y == 0, 1, y)),
    # The one-class lie hides which of the claimed class-1 items are class 0. A check that undid its harm but
    # could not learn those labels back would do as well as this: the class-0 items not sent at all.
    Lie("withhold", WITHHELD, lambda y, k: np.where(y == 0, -1, y), bound=True),
)
MARGIN = 0.5  # nats of per-class agreement below the median
NO_CHECK, CHECK, REPAIR = "no check", "with check", "with check + repair"
CHECKS = (NO_CHECK, CHECK, REPAIR)
CHECK_TAGS = {"none": NO_CHECK, "check": CHECK, "repair": REPAIR}  # --checks
TARGETS = {"loss with the check": 0.5, "cost of the check when honest": 0.3}


def received(inputs: GridInputs, receiver: str, liar: str, lie: Lie, classes: int) -> dict[str, Pool]:
    """The pools ``receiver`` gets from every other entity, the liar's with its labels changed."""
    out = {}
    for sender, pool in inputs.pools.items():
        if sender == receiver:
            continue
        if sender == liar and lie.relabel is not None:
            labels = lie.relabel(np.asarray(pool.labels), classes)
            sent = labels >= 0
            pool = Pool(pool.features[torch.as_tensor(sent)], labels[sent])
        out[sender] = pool
    return out


def refine(inputs: GridInputs, cfg: Config, receiver: str, pools: list[Pool], seed: int, test_labels: np.ndarray,
           threads: int = 0) -> dict:
    """One receiver's Step 3: Φ's φ2 refined on its own features and ``pools``, scored on S's test split."""
    t0 = time.time()
    runtime.configure(cfg, threads)
    model = copy.deepcopy(inputs.backbone.split(cfg.backbone.hook)[1])
    data = Pool.union([inputs.own[receiver], *pools])
    train_decider(model, data.features, data.labels, cfg.decider, seed=seed, what=f"{receiver} decider")
    return {"top1": evaluate_classifier(model, inputs.test_features, test_labels)["top1"],
            "seconds": time.time() - t0}


def summarise(records: list[dict]) -> pd.DataFrame:
    """Per lie and honest receiver: top-1 without and with the check (mean ± sd over seeds), what each costs
    against the honest collaboration without a check, and the refusals.

    The loss is the mean over seeds of the paired difference (the honest run and this one refined with the same
    seed), with its standard error: a refinement's seed moves top-1 by up to a point at collab-scale, as much as
    the losses measured, and pairing takes out what the seed does to both runs alike."""
    df = pd.DataFrame(records)
    base = df[(df["lie"] == "honest") & (df["check"] == NO_CHECK)].set_index(["receiver", "seed"])["top1"]
    rows = []
    for (lie, receiver), part in df.groupby(["lie", "receiver"], sort=False):
        line = {"lie": lie, "receiver": receiver}
        for check in CHECKS:
            got = part[part["check"] == check]
            if got.empty:  # a check not run for this lie (--checks); the honest baseline is always run
                continue
            spread = f" ± {got['top1'].std(ddof=1):.2f}" if len(got) > 1 else ""
            line[f"top-1, {check}"] = f"{got['top1'].mean():.2f}{spread}"
            loss = base.loc[[(receiver, s) for s in got["seed"]]].to_numpy() - got["top1"].to_numpy()
            line[f"loss, {check}"] = round(float(loss.mean()), 2) + 0.0  # + 0.0: no "-0" in the table
            line[f"loss se, {check}"] = round(float(loss.std(ddof=1) / np.sqrt(len(loss))), 2) if len(loss) > 1 else 0.0
        for check, what in ((CHECK, "refused"), (REPAIR, "repaired")):
            senders = part[part["check"] == check][what]
            if senders.empty:
                continue
            line[f"{what}, {check}"] = "; ".join(sorted({", ".join(r) or "none" for r in senders}))
        rows.append(line)
    return pd.DataFrame(rows)


def screening_text(decisions: list[dict], cfg: Config, args) -> str:
    """Who refused or repaired whose pool under each lie, and why (the first seed's decisions: screening has no
    seed)."""
    first = [d for d in decisions if d["check"] != NO_CHECK and d["seed"] == cfg.data.seed]
    table = pd.DataFrame({"lie": [d["lie"] for d in first], "check": [d["check"] for d in first],
                          "receiver": [d["receiver"] for d in first],
                          "kept": [", ".join(d["kept"]) for d in first],
                          "refused": [", ".join(d["refused"]) or "none" for d in first],
                          "repaired": [", ".join(d["repaired"]) or "none" for d in first],
                          "why": ["; ".join(f"{s}: {w}" for s, w in d["why"].items()) or "–" for d in first]})
    return (f"# Screening: {cfg.name}, liar {args.liar}, sharing {cfg.collab.share}, margin {args.margin:g} nats\n\n"
            f"{markdown_table(table)}\n\nEach honest receiver's decision on every pool it received "
            "(entities/screening.py): per class, the pointwise mutual information between a pool's labels and Φ's "
            "φ2 on its items, against the median over the senders and the receiver's own images; with repair, a "
            "failing pool is kept relabelled (its labels a permutation of what φ2 sees), with the items of its failing "
            "classes split by φ2 between their label and the classes it lacks (each item to the one φ2 sees most in "
            "it), or without its failing classes.\n")


def checks(table: pd.DataFrame) -> list[str]:
    honest = table[table["lie"] == "honest"]
    bound = table["lie"].isin([lie.name for lie in LIES if lie.bound])
    bounds, lying = table[bound], table[(table["lie"] != "honest") & ~bound]
    out, most_cost, most_loss = [], TARGETS["cost of the check when honest"], TARGETS["loss with the check"]
    ran = [c for c in CHECKS if f"loss, {c}" in table and table.loc[~bound, f"loss, {c}"].notna().all()]
    for check in [c for c in (CHECK, REPAIR) if c in ran]:
        cost = float(honest[f"loss, {check}"].max())
        out.append(f"- {check}: its cost when everyone is honest, the largest over receivers: {cost:+.2f} points "
                   f"(target ≤ {most_cost}): {'yes' if cost <= most_cost else 'NO'}")
        if len(lying):
            worst = lying.loc[lying[f"loss, {check}"].idxmax()]
            loss, se = float(worst[f"loss, {check}"]), float(worst[f"loss se, {check}"])
            verdict = "yes" if loss <= most_loss else "NO"
            if abs(loss - most_loss) < 2 * se:
                verdict += ", but within two standard errors of the target: more seeds would be needed to tell"
            out.append(f"- {check}: the largest loss of an honest entity to a liar: {loss:+.2f} ± {se:.2f} points "
                       f"({worst['receiver']}, {worst['lie']}) (target ≤ {most_loss}): {verdict}")
    if len(lying) and NO_CHECK in ran:
        out.append(f"- {NO_CHECK}: the largest loss to a liar: {float(lying[f'loss, {NO_CHECK}'].max()):+.2f} points")
    for _, row in bounds.iterrows():
        out.append(f"- {row['receiver']}, {row['lie']}: {row[f'loss, {NO_CHECK}']:+.2f} ± "
                   f"{row[f'loss se, {NO_CHECK}']:.2f} points, what no check that cannot learn the withheld labels "
                   "back can save it from")
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    started = time.time()
    parser = command_parser("python -m sim.dishonest", __doc__)
    parser.add_argument("--liar", default="E2", help="the entity whose pool lies")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help="a receiver refuses a pool whose labels agree with φ2 this many nats less than the "
                             "median in some class (entities/screening.py)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds data.seed, data.seed+1, ...")
    parser.add_argument("--receivers", nargs="+", metavar="E", default=None,
                        help="only these honest receivers, written to dishonest-<receivers>.md|csv (default: every "
                             "entity but the liar, dishonest.md|csv)")
    parser.add_argument("--lies", nargs="+", choices=[lie.tag for lie in LIES if lie.relabel], default=None,
                        help="only these lies (and bounds) beside the honest run: flip (every label), merge (class 0 "
                             "relabelled as 1), withhold (class 0 not sent: the bound); default: all")
    parser.add_argument("--checks", nargs="+", choices=list(CHECK_TAGS), default=None,
                        help="only these receiver checks for the lies: none, check (refuse), repair (the honest run "
                             "without a check, the baseline, and each bound without a check always run); default: all")
    parser.add_argument("--sequential", action="store_true", help="every task in this process, without Ray")
    parser.add_argument("--screen-only", action="store_true",
                        help="write each receiver's screening decisions (screening.md) and stop before refining")
    add_config_args(parser)
    parser.set_defaults(config="collab-scale")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    names = [f"E{i + 1}" for i in range(len(cfg.data.shard_fractions))]
    if args.liar not in names:
        parser.error(f"--liar {args.liar}: choose from {', '.join(names)}")
    honest = [n for n in names if n != args.liar]
    receivers = args.receivers or honest
    if unknown := sorted(set(receivers) - set(honest)):
        parser.error(f"--receivers {' '.join(unknown)}: choose among the honest entities {', '.join(honest)}")
    lies = [lie for lie in LIES if lie.relabel is None or args.lies is None or lie.tag in args.lies]
    picked = CHECKS if args.checks is None else tuple(c for t, c in CHECK_TAGS.items() if t in args.checks)
    stem = "-".join(["dishonest", *(args.receivers or []), *(args.lies or []), *(args.checks or [])])
    out_dir = cfg.results_dir() / "utility" / f"dishonest-{run_name(args, cfg.name)}"
    cells = out_dir / "cells"
    seeds = [cfg.data.seed + i for i in range(args.seeds)]
    with results_lock(cfg.results_dir()):
        inputs = prepare(cfg)
        split = load_task(cfg)
        phi2 = inputs.backbone.split(cfg.backbone.hook)[1]
        classes = len(split.S.classes)
        common = {"pools": contributions_key(cfg, "own"), "decider": cfg.key_dict()["decider"], "liar": args.liar,
                  **runtime.key_part(cfg.device, cfg.precision)}
        # Screening reads the pools only (inference), so it runs here; a refinement depends only on which pools,
        # lying or not, the receiver kept, so settings that keep the same pools share one (honest receivers that
        # refuse nothing reuse the run without the check; every refused liar leaves the same pools).
        decisions, jobs = [], {}
        for lie in lies:
            for receiver in receivers:
                pools = received(inputs, receiver, args.liar, lie, classes)
                # the honest run without a check is every loss's baseline; a bound is a bound without a check
                for check in [c for c in CHECKS if c in picked or (c == NO_CHECK and (lie.bound or not lie.relabel))]:
                    decision = (screen(phi2, inputs.own[receiver], pools, args.margin, repair=check == REPAIR)
                                if check != NO_CHECK else None)
                    kept = decision.apply(pools) if decision else pools
                    repaired = decision.repaired if decision else {}
                    used = tuple((s, lie.name if s == args.liar else "honest")
                                 + ((repaired[s].labels.tolist(),) if s in repaired else ()) for s in kept)
                    for seed in seeds:
                        key = artefact_key({**common, "receiver": receiver, "pools used": used, "seed": seed})
                        jobs.setdefault(key, (receiver, list(kept.values()), seed))
                        decisions.append({"lie": lie.name, "check": check, "receiver": receiver, "seed": seed,
                                          "kept": list(kept), "refused": sorted(decision.refused) if decision else [],
                                          "repaired": sorted(repaired), "why": decision.changed() if decision else {},
                                          "key": key})
        if args.screen_only:
            text = screening_text(decisions, cfg, args)
            write_text(out_dir / "screening.md", text)
            write_provenance(out_dir, started, command_line("python -m sim.dishonest", argv),
                             name="provenance-screening.json")
            print(text)
            return pd.DataFrame(decisions)
        done = {k: json.loads((cells / f"{k}.json").read_text()) for k in jobs if (cells / f"{k}.json").is_file()}
        todo = {k: v for k, v in jobs.items() if k not in done}
        log.info("dishonest collaborator: %d refinements to run, %d stored in %s (for %d settings)", len(todo),
                 len(done), cells, len(decisions))
        if args.sequential:
            executor = Sequential(cfg.threads)
        else:
            if url := start_ray():
                print(f"Ray dashboard: http://{url}", flush=True)
            executor = RayPool(1)
        try:
            done |= run_tasks(executor, inputs, cfg, todo, cells, split.S.test_labels)
        finally:
            if not args.sequential:
                import ray

                ray.shutdown()
        records = [{**d, "top1": done[d["key"]]["top1"]} for d in decisions]
        table = summarise(records)
        write_text(out_dir / f"{stem}.csv", pd.DataFrame(records).drop(columns=["why"]).to_csv(index=False))
        command = " ".join(command_line("python -m sim.dishonest", argv))
        text = (f"# A dishonest collaborator: {cfg.name}, liar {args.liar}, sharing {cfg.collab.share}\n\n"
                f"{markdown_table(table)}\n\n"
                "Top-1 (%) of each honest entity's φ2 refined on its own φ1 features and every other entity's pool, "
                f"mean ± sd over seeds {seeds}. Loss: against the honest collaboration without the check, the mean "
                "over seeds of the paired difference (both refined with the same seed); loss se: its standard error. "
                "With the check, a receiver refuses a sender's pool if, for some class, its labels agree with what "
                f"Φ's φ2 sees in its items more than {args.margin:g} nats less than the median over the senders and "
                "the receiver's own images (entities/screening.py); with repair it keeps such a pool relabelled, "
                "where the classes its items agree with most are a one-to-one map of its labels that then passes, "
                "else with the items of its failing classes split by φ2 between their label and the classes the pool "
                "lacks (each item to the one φ2 sees most in it), if every class so filled then passes, else without "
                "the classes that fail.\n\n"
                + "\n".join(checks(table)) + f"\n\nCommand: `{command}`, {time.time() - started:.0f} s.\n")
        write_text(out_dir / f"{stem}.md", text)
        write_provenance(out_dir, started, command_line("python -m sim.dishonest", argv),
                         name=FILENAME if stem == "dishonest" else f"provenance-{stem}.json")
    print(text)
    return table


def run_tasks(executor, inputs: GridInputs, cfg: Config, todo: dict, cells, test_labels: np.ndarray) -> dict:
    """Every missing refinement through the executor, each stored as it finishes; failures are raised at the
    end, after the others are stored."""
    shared = executor.put(inputs)
    pending = {executor.submit(f"{receiver} seed {seed}", refine, shared, cfg, receiver, pools, seed, test_labels):
               key for key, (receiver, pools, seed) in todo.items()}
    done, failures = {}, []
    while pending:
        handle, result, err = executor.next_done(pending)
        key = pending.pop(handle)
        if err is not None:
            failures.append(f"{todo[key][0]} seed {todo[key][2]}: {err}")
            continue
        write_json(result, cells / f"{key}.json")
        done[key] = result
        log.info("[%d/%d] %s seed %d: top-1 %.2f (%.0fs)", len(done), len(todo), todo[key][0], todo[key][2],
                 result["top1"], result["seconds"])
    if failures:
        raise RuntimeError(f"{len(failures)} refinement(s) failed (the others are stored): {'; '.join(failures)}")
    return done


if __name__ == "__main__":
    run_main(main)
