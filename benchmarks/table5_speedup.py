"""How much faster the Table 5 grid runs as Ray tasks than in one process, on the same grid.

    python benchmarks/table5_speedup.py [--config table5-bench] [--num-cpus 2] [--out results/table5/benchmark]

Step 1 and the DPMs are made once first (both modes would load them from the store anyway), then
every row is computed from scratch three times into fresh run directories: sequentially with torch
using every core for one row at a time (the fair baseline), sequentially with one thread, and with
Ray, one 1-CPU task per row. Only the grid is timed, not Ray's start-up. Prints the speed-ups and
writes them as a small table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pandas as pd
import ray
import torch

from entities.config import load_config
from entities.grid import prepare, select_rows
from entities.report import write_table
from sim.cli import setup_logging
from sim.table5 import RayPool, Sequential, run_grid, start_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="table5-bench")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("results/table5/benchmark"))
    args = parser.parse_args()
    setup_logging()
    root = Path(tempfile.mkdtemp(prefix="table5-bench-"))
    cfg = load_config(args.config, {"results_root": str(root)})
    rows, seeds = select_rows(None), [cfg.data.seed]
    prepare(cfg)  # Step 1 and the four DPMs, stored: every pass below loads them

    timings, load = {}, {}
    default_threads = torch.get_num_threads()
    for name, threads in ((f"sequential, torch threads = {default_threads}", 0), ("sequential, 1 thread", 1)):
        load[name] = os.getloadavg()[0]
        run = run_grid(cfg, rows, seeds, Sequential(threads), root / "table5" / f"seq{threads}")
        torch.set_num_threads(default_threads)
        timings[name] = run.seconds
    start_ray(num_cpus=args.num_cpus, dashboard=False)
    ray_load = os.getloadavg()[0]
    try:
        run = run_grid(cfg, rows, seeds, RayPool(1), root / "table5" / "ray")
    finally:
        ray.shutdown()
    ray_name = f"Ray, {args.num_cpus} CPUs, 1 per row"
    timings[ray_name] = run.seconds
    load[ray_name] = ray_load

    df = pd.DataFrame([{"run": k, "seconds": v, "Ray speed-up": v / timings[ray_name], "load average at start": load[k]}
                       for k, v in timings.items()])
    md = write_table(df, args.out, "speedup", f"Table 5 grid ({args.config}, {len(rows)} rows): Ray vs one process",
                     f"Same rows, seeds and stored Step 1 on a {os.cpu_count()}-core machine; grid wall time only "
                     "(Ray's start-up excluded). Ray runs one row per core with one torch thread each; the first "
                     "sequential run gives one row at a time all cores through torch's intra-op threads, the "
                     "second only one thread. Other processes on the machine (see the 1-minute load average) "
                     "add noise.")
    print(md.read_text())


if __name__ == "__main__":
    main()
