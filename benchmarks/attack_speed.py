"""How much faster the attack suite runs as Ray tasks than in one process, on the same cells.

    python benchmarks/attack_speed.py [--config attack-tiny] [--share dpm] [--attacks ...] [--num-cpus 2]
                                      [--out results/benchmark]

The victims' side (Step 1, the DPMs, MDP sets, the attacker's own DPM) is made once first, as every
run would load it from the store; then the same cells are computed from an empty cell store, with
every model the attacker trains deleted before each pass, three times: in one process with torch
using every core (what ``python -m sim.attack`` did before its cells were tasks), in one process
with one thread, and as Ray tasks of one CPU each (Ray's start-up and its workers' first imports
excluded, as in ``benchmarks/table5_speedup.py``). Prints the ratios, checks that the three passes
stored the same figures, and writes the table to ``<out>/attack-speed.md|csv``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import torch
from table5_speedup import core_scaling, warm_up

from entities import runtime
from entities.attacks import ATTACKS
from entities.attacks.card import CellStore
from entities.attacks.suite import run_suite
from entities.presets import load_config
from entities.provenance import write_provenance
from entities.report import write_table
from sim.attack import modes_to_run
from sim.cli import setup_logging
from sim.executors import RayPool, Sequential, start_ray


def forget_attacker_models(root: Path) -> None:
    """Every model the attacker trained, so the next pass trains them again."""
    for folder in (root / "artefacts").glob("*/private/*/attack"):
        shutil.rmtree(folder)


def idle_share(events: list[dict], cpus: int) -> float:
    """From Ray's timeline: the share of the suite's span during which fewer tasks ran than there are CPUs
    (a core waiting for a task whose inputs were not done, or left idle at the end)."""
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("ph") == "X" and e.get("cat", "").startswith("task::") and e["cat"] != "task::_warm"]
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    running, last, short = 0, edges[0][0], 0.0
    for t, step in edges:
        if running < cpus:
            short += t - last
        running, last = running + step, t
    return short / (edges[-1][0] - edges[0][0])


def figures(run) -> pd.DataFrame:
    cells = pd.DataFrame(run.records).set_index(["victim", "mode", "attacker"]).sort_index()
    return cells[["status", "disclosure", "identification"]]


def main() -> None:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="attack-tiny")
    parser.add_argument("--share", nargs="+", default=["dpm"], help="modes besides the controls clean and raw")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args()
    setup_logging()
    root = Path(tempfile.mkdtemp(prefix="attack-bench-"))
    cfg = load_config(args.config, {"results_root": str(root)})
    runtime.configure(cfg)
    modes = modes_to_run(args.share)
    run_suite(cfg, ["prior"], modes, CellStore(root / "prepare"))  # the victims' side and the attacker's DPM
    ceiling = core_scaling(args.num_cpus)

    default_threads = torch.get_num_threads()
    timings, runs, load = {}, {}, {}
    for name, threads in ((f"one process, torch threads = {default_threads} (before)", 0),
                          ("one process, 1 thread", 1)):
        forget_attacker_models(root)
        load[name] = os.getloadavg()[0]
        run = run_suite(cfg, args.attacks, modes, CellStore(root / f"seq{threads}"), executor=Sequential(threads))
        torch.set_num_threads(default_threads)
        timings[name], runs[name] = run.seconds, run
    start_ray(num_cpus=args.num_cpus, dashboard=False)
    warm_up(args.num_cpus)
    forget_attacker_models(root)
    ray_load = os.getloadavg()[0]
    try:
        run = run_suite(cfg, args.attacks, modes, CellStore(root / "ray"), executor=RayPool(1))
        idle = idle_share(ray.timeline(), args.num_cpus)
    finally:
        ray.shutdown()
    ray_name = f"Ray, {args.num_cpus} CPUs, 1 per task"
    timings[ray_name], runs[ray_name], load[ray_name] = run.seconds, run, ray_load

    reference = figures(runs[ray_name])
    same = {k: bool(((figures(r)[["disclosure", "identification"]] - reference[["disclosure", "identification"]])
                     .abs().fillna(0) <= 1e-6).all().all()) for k, r in runs.items()}
    df = pd.DataFrame([{"run": k, "seconds": v, "Ray speed-up": v / timings[ray_name],
                        "same figures as Ray": same[k], "load average at start": load[k]} for k, v in timings.items()])
    cells = len(reference)
    md = write_table(df, args.out, "attack-speed",
                     f"Attack suite ({args.config}, {cells} cells: {len(args.attacks)} families, modes "
                     f"{', '.join(modes)}): Ray vs one process",
                     f"Same cells from an empty cell store, every attacker model trained anew in each pass, on a "
                     f"{os.cpu_count()}-core machine, runtime {runtime.current().describe()}; suite wall time only "
                     "(Step 1, the DPMs and MDP sets stored beforehand; Ray's start-up and each worker's first "
                     f"imports excluded). Ceiling of any {args.num_cpus}-task runner over one thread on this machine "
                     f"(measured): {ceiling:.2f}x. During {idle:.0%} of the Ray pass's span fewer tasks ran than "
                     "there are CPUs (Ray's timeline).")
    write_provenance(args.out, started, ["python", "benchmarks/attack_speed.py", *sys.argv[1:]],
                     name="provenance-attack-speed.json")
    print(md.read_text())
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
