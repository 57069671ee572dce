"""How much faster the Table 5 grid runs as Ray tasks than in one process, on the same grid.

    python benchmarks/table5_speedup.py [--config table5-bench] [--num-cpus 2] [--out results/table5/benchmark]

Step 1 and the DPMs are made once first (both modes would load them from the store anyway), then
every row is computed from scratch three times into fresh run directories: sequentially with torch
using every core for one row at a time (the fair baseline), sequentially with one thread, and with
Ray, one 1-CPU task per row. Only the grid is timed, not Ray's start-up (its workers are
warmed up first). Prints the speed-ups and writes them as a small table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import ray
import torch
import torch.nn.functional as F

from entities import runtime
from entities.backbone import build_backbone
from entities.presets import load_config
from entities.provenance import write_provenance
from entities.report import write_table
from sim.cli import setup_logging
from sim.executors import RayPool, Sequential, start_ray
from sim.grid import prepare, select_rows
from sim.table5 import run_grid


def _train_steps(steps: int) -> float:
    """One thread training a ResNet-20 on CIFAR-sized batches in the resolved runtime (bf16 and
    channels_last where they pay, as the rows run): the kind of work the grid's rows do."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rt = runtime.current()
    model = rt.module(build_backbone("resnet20", 5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = rt.tensor(torch.rand(128, 3, 32, 32)), torch.randint(0, 5, (128,))
    t0 = time.time()
    for _ in range(steps):
        opt.zero_grad()
        with rt.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    return time.time() - t0


def _warm(steps: int) -> int:
    import sim.grid  # noqa: F401 - what every row imports

    _train_steps(steps)
    return os.getpid()


def warm_up(workers: int) -> None:
    """Start each Ray worker, import the grid and run a few training steps in it before the clock
    starts (torch's first convolutions in a process pay one-off set-up costs), as the sequential
    passes run in this process, which Step 1 warmed up before their clock started."""
    task = ray.remote(num_cpus=1)(_warm)
    pids = set(ray.get([task.remote(3) for _ in range(2 * workers)]))
    print(f"Ray workers warmed up: {len(pids)} processes")


def core_scaling(workers: int, steps: int = 30) -> float:
    """How much more work ``workers`` one-thread processes do at once than one alone: the ceiling
    of any row-parallel runner (Ray included) over the one-thread sequential run on this machine."""
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_train_steps, [2] * workers))  # every process started and torch imported first
        alone = pool.submit(_train_steps, steps).result()
        together = max(pool.map(_train_steps, [steps] * workers))
    return workers * alone / together


def main() -> None:
    started = time.time()
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
    ceiling = core_scaling(args.num_cpus)

    timings, load = {}, {}
    default_threads = torch.get_num_threads()
    for name, threads in ((f"sequential, torch threads = {default_threads}", 0), ("sequential, 1 thread", 1)):
        load[name] = os.getloadavg()[0]
        run = run_grid(cfg, rows, seeds, Sequential(threads), root / "table5" / f"seq{threads}")
        torch.set_num_threads(default_threads)
        timings[name] = run.seconds
    start_ray(num_cpus=args.num_cpus, dashboard=False)
    warm_up(args.num_cpus)
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
                     f"Same rows, seeds and stored Step 1 on a {os.cpu_count()}-core machine, runtime "
                     f"{runtime.current().describe()}; grid wall time only "
                     "(Ray's start-up, and each worker's first import and training steps, excluded). Ray runs one "
                     "row per core with one torch thread each, longest rows first; the first sequential run "
                     "gives one row at a time all cores through torch's intra-op threads, the second only one "
                     "thread. Other processes on the machine (see the 1-minute load average) "
                     f"add noise. Ceiling: {args.num_cpus} one-thread processes training a ResNet-20 at once "
                     f"do {ceiling:.2f}x the work of one alone on this machine, the most Ray's one-thread rows "
                     "can gain over the one-thread sequential run.")
    write_provenance(args.out, started)
    print(md.read_text())


if __name__ == "__main__":
    main()
