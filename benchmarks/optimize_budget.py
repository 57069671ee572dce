"""How far the ``optimize`` attacker's budget takes it: its disclosure after each number of steps, per target.

    python benchmarks/optimize_budget.py [--config collab] [--results-root DIR] [--targets E1:clean E4:dpm ...]
                                         [--steps 0 20 40 60 90] [--lr 0.05 0.1] [--out results/benchmark]

The suite's most expensive family (a third of its cell time) is the one whose budget a speed-up would cut
first. This runs its search (:func:`entities.attacks.optimize.invert_path`, the suite's own code, from the
suite's own start) for each victim and mode, scores the images after each checkpoint as the suite scores a
cell, and writes ``<out>/optimize-budget.md|csv``. Step 0 is the start (the substitute decoder's
reconstruction in the DPM modes, the transfer decoder's otherwise). The attacker's models are loaded from the
store of ``--results-root`` where a suite stored them (trained otherwise).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from entities import runtime
from entities.attacks import optimize
from entities.attacks.base import check_attack_mode, uses_dpm
from entities.attacks.scoring import score
from entities.attacks.suite import attacker_knowledge, entity_seed, scored_rows, victim_target, with_obfuscator
from entities.entity import Entity
from entities.pipeline import ArtefactStore, entity_shards, load_task
from entities.presets import load_config
from entities.report import write_table
from entities.sharing import step1
from sim.cli import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="collab")
    parser.add_argument("--results-root", default="results")
    parser.add_argument("--targets", nargs="+", default=["E1:clean", "E1:obfuscator", "E1:mdp", "E4:dpm"],
                        metavar="VICTIM:MODE")
    parser.add_argument("--steps", nargs="+", type=int, default=[0, 20, 40, 60, 90])
    parser.add_argument("--lr", nargs="+", type=float, default=[optimize.LR])
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config, {"results_root": str(Path(args.results_root).resolve())})
    runtime.configure(cfg)
    targets = [tuple(t.split(":", 1)) for t in args.targets]
    modes = [check_attack_mode(m) for _, m in targets]
    split = load_task(cfg)
    shards = entity_shards(cfg, split)
    store = ArtefactStore(cfg)
    shared = with_obfuscator(step1(cfg, split, store), cfg, split, store, modes)
    know = attacker_knowledge(cfg, split, shared, store, shards)
    rows = []
    for (name, _), mode in zip(targets, modes):
        victim = Entity(name, split.S.train_images[shards[name]], split.S.train_labels[shards[name]], store)
        victim.featurize(shared)
        if uses_dpm(mode):
            victim.train_dpm(shared, cfg, entity_seed(cfg, name))
        target, refs = victim_target(victim, mode, shared, cfg, scored_rows(len(victim.labels), cfg), None)
        model, shown, start = optimize.search(know, target)
        for lr in args.lr:
            t0 = time.time()
            path = optimize.invert_path(model, shown, start, sorted(set(args.steps)), lr=lr)
            seconds = time.time() - t0
            for steps, images in path.items():
                s = score(images, victim.images, refs, cfg.attack.gallery, cfg.attack.seed)
                rows.append({"victim": name, "mode": mode, "lr": lr, "steps": steps, "disclosure": s["disclosure"],
                             "identification": s["identification"], "items": len(shown), "search seconds": seconds})
                print(f"{name} {mode} lr {lr:g} steps {steps}: disclosure {s['disclosure']:.4f}, identified "
                      f"{s['identification']:.1%}", flush=True)
    df = pd.DataFrame(rows)
    table = df.pivot_table(index=["victim", "mode", "lr"], columns="steps", values="disclosure").round(4)
    table.columns = [f"{c} steps" for c in table.columns]
    ident = df.pivot_table(index=["victim", "mode", "lr"], columns="steps", values="identification").round(3)
    table = table.reset_index()
    table[f"identification, {ident.columns[0]} → {ident.columns[-1]} steps"] = [
        f"{a:.3f} → {b:.3f}" for a, b in zip(ident.iloc[:, 0], ident.iloc[:, -1])]
    write_table(table, args.out, "optimize-budget",
                f"The optimize attacker's disclosure against its step count ({cfg.name}, suite default "
                f"{optimize.STEPS} steps at lr {optimize.LR:g})",
                "Disclosure SSIM of each victim's scored items ("
                + ", ".join(f"{v} {n}" for v, n in df.groupby("victim", sort=False)["items"].first().items())
                + ") after each number of Adam steps "
                f"(0: the start, the substitute decoder's reconstruction in the DPM modes, the transfer decoder's "
                f"otherwise), scored as a suite cell; the attacker's models from {args.results_root}. Search time "
                f"per target at {max(args.steps)} steps: "
                + ", ".join(f"{v}:{m} {s:.0f} s" for (v, m), s in
                            df.groupby(["victim", "mode"], sort=False)["search seconds"].first().items())
                + f" ({runtime.current().describe()}).")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
