"""The table of ``benchmarks/attack_vs_commit.sh``: the default attack suite at an older commit and now.

    python benchmarks/attack_vs_commit.py --before COMMIT --old ROOT --new ROOT --seconds OLD_S NEW_S
                                          [--noise ROOT] [--out results/benchmark]

Reads each results root's ``attack/collab/report.csv`` and writes ``<out>/attack-vs-<commit>.md|csv``: per victim
and mode, the worst case (disclosure and identification) at both commits and their difference, beside the
difference between two runs of this checkout with other attacker seeds (``--noise``: a root run with
``--set attack.seed=2``), which is the noise a difference must stay within; and
``<out>/attack-vs-<commit>-profile.md|csv``: the cells' own seconds summed per attacker family (at the older
commit the first cell that needs a model trains it; now models are tasks of their own, their time spread over
the cells that use them, and each Ray task runs one torch thread where the older single process ran torch's
default, every core). Prints the wall-time ratio.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd

from entities.attacks.card import worst_cases
from entities.report import write_table

RUN = Path("attack") / "collab"


def cells(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / RUN / "report.csv")


def worst(root: Path) -> pd.DataFrame:
    return worst_cases(cells(root)).set_index(["victim", "mode"])


def profile(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Seconds and share of the cells' time per attacker family, before and now."""
    out = pd.DataFrame({"cells": old.groupby("family").size(), "seconds before": old.groupby("family")["seconds"].sum(),
                        "seconds now": new.groupby("family")["seconds"].sum()})
    out["share before"] = out["seconds before"] / out["seconds before"].sum()
    out["share now"] = out["seconds now"] / out["seconds now"].sum()
    return out.sort_values("seconds before", ascending=False).reset_index(names="family")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the older commit")
    parser.add_argument("--old", type=Path, required=True, help="the older commit's results root")
    parser.add_argument("--new", type=Path, required=True, help="this checkout's results root")
    parser.add_argument("--seconds", type=float, nargs=2, required=True, metavar=("OLD", "NEW"))
    parser.add_argument("--noise", type=Path, help="this checkout's results root with another attack.seed")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args()
    old, new = worst(args.old), worst(args.new)
    df = pd.DataFrame({"worst before": old["disclosure"], "worst now": new["disclosure"],
                       "worst now − before": new["disclosure"] - old["disclosure"],
                       "identification before": old["identification"], "identification now": new["identification"],
                       "identification now − before": new["identification"] - old["identification"]})
    if args.noise:
        other = worst(args.noise)
        df["worst, seed 2 − seed 1"] = other["disclosure"] - new["disclosure"]
        df["identification, seed 2 − seed 1"] = other["identification"] - new["identification"]
    df = df.reset_index()
    ratio = args.seconds[1] / args.seconds[0]
    noise = ""
    if args.noise:
        bound = df["worst, seed 2 − seed 1"].abs().max()
        within = (df["worst now − before"].abs() <= bound).all()
        noise = (f" The largest worst-case difference between two seeds of the attacker is {bound:.3f}; the largest "
                 f"between the commits is {df['worst now − before'].abs().max():.3f}: "
                 f"{'every figure within the noise' if within else 'NOT every figure within the noise'}.")
    md = write_table(df, args.out, f"attack-vs-{args.before}",
                     f"Default `python -m sim.attack` from an empty cell store: {args.before} vs now",
                     f"Wall time {args.seconds[0]:.0f} s at {args.before}, {args.seconds[1]:.0f} s now: "
                     f"**{ratio:.0%}** of before (target at most 50%). One run after the other on a "
                     f"{os.cpu_count()}-core machine, each from an empty cell store with no attacker model stored "
                     "and Step 1, the DPMs and MDP sets stored (`benchmarks/attack_vs_commit.sh`)." + noise)
    prof = profile(cells(args.old), cells(args.new))
    write_table(prof, args.out, f"attack-vs-{args.before}-profile",
                f"Where the default attack suite spends its time: cell seconds per attacker family, {args.before} "
                "vs now",
                f"Sums of each cell's own seconds in report.csv: {prof['seconds before'].sum():.0f} s before (one "
                f"process, torch on every core), {prof['seconds now'].sum():.0f} s now (Ray tasks of one torch "
                "thread each, two at a time; the raw-image cells of learned attackers are copies of their clean "
                "twins, 0 s).")
    print(md.read_text())


if __name__ == "__main__":
    main()
