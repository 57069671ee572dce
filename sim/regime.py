"""Where does feature sharing matter? Table 5's rows 1, 6 and 7 (in both label-only floor modes) and all4,
over several seeds, for each setting of the levers the utility question turns on.

    python -m sim.regime [--levers NAME ...] [--seeds 3] [--sequential] [--results-root DIR]

A lever setting (:data:`LEVERS`, data like Table 5's rows) is a preset and overrides: the classes, images per
class per entity, the split point, how Φ is pretrained and the decider's recipe. For each, the grid reports row 1
(E1 alone), row 6 (E1's and E2's clean φ1 features), row 7 with E2 sharing only class prototypes or class
statistics (the label-only floors), all4 (every entity's clean features), and the two gaps a regime must show
before a defence can be judged in it: row 6 − row 1 (what sharing features gives) and row 6 − the better floor
(what it gives beyond labels), each a mean over seeds with its spread. Rows are Table 5's, stored and resumed by
its row store under ``<results-root>/table5/regime-<lever>/``; the summary goes to
``<results-root>/utility/regime/regime.md|csv``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from entities.files import write_text
from entities.provenance import command_line, write_provenance
from entities.report import markdown_table
from sim import table5
from sim.cli import command_parser, run_main

FLOORS = ("prototypes", "class-stats")
ROWS = ("1", "6", "7", "all4")
# S = CIFAR-10 classes 0-4 has 25,000 training images: 0.0256 of them is 128 per class, the paper's scale.
PER_CLASS_128 = "data.shard_fractions=[0.0256,0.0256,0.0256,0.00256]"
# All ten classes: Q is 10,000 training images held out of S (no public classes are left), so S keeps 40,000.
TEN_CLASSES = ("data.task_classes=[0,1,2,3,4,5,6,7,8,9]", "data.public_classes=[]", "data.public_holdout=10000",
               "data.shard_fractions=[0.032,0.032,0.032,0.0032]")


@dataclass(frozen=True)
class Lever:
    """One setting of the levers: a name, what it changes, the preset and its overrides."""

    name: str
    what: str
    overrides: tuple[str, ...]
    preset: str = "collab"


BASE = ("backbone.hook=conv3_1", PER_CLASS_128)
LEVERS: tuple[Lever, ...] = (
    Lever("128pc-conv3_1", "5 classes, 128 per class per entity, split at conv3_1", BASE),
    Lever("128pc-conv3_1-views4", "… decider on 4 views (own augmented, senders share per view)",
          (*BASE, "decider.views=4")),
    Lever("128pc-conv3_1-views8", "… 8 views", (*BASE, "decider.views=8")),
    Lever("128pc-conv2_1-views4", "… split at conv2_1, 4 views", ("backbone.hook=conv2_1", PER_CLASS_128,
                                                                  "decider.views=4")),
    Lever("128pc-conv3_1-views4-e5", "… 4 views, decider 5 epochs (the image-epochs of 20 without views)",
          (*BASE, "decider.views=4", "decider.epochs=5")),
    Lever("64pc-conv3_1-views4", "5 classes, 64 per class per entity, 4 views",
          ("backbone.hook=conv3_1", "data.shard_fractions=[0.0128,0.0128,0.0128,0.00128]", "decider.views=4")),
    Lever("10cls-128pc-conv3_1", "10 classes (Q held out of S), 128 per class, conv3_1",
          ("backbone.hook=conv3_1", *TEN_CLASSES)),
    Lever("10cls-128pc-conv3_1-views4", "… 4 views", ("backbone.hook=conv3_1", *TEN_CLASSES, "decider.views=4")),
)
LEVER_NAMES = tuple(lever.name for lever in LEVERS)


def measure(lever: Lever, seeds: int, extra: list[str]) -> dict:
    """Table 5's rows for one lever setting in both floor modes; mean and sd over the seeds."""
    t0 = time.time()
    argv = ["--config", lever.preset, "--rows", *ROWS, "--seeds", str(seeds), "--share", *FLOORS,
            "--run-name", f"regime-{lever.name}", *extra, "--set", *lever.overrides]
    runs = table5.main(argv)

    def top1(mode: str, row: str) -> np.ndarray:
        run = runs[mode]
        return np.array([v["top1"] for (r, _), v in sorted(run.results.items()) if r == row])

    rows = {"1": top1(FLOORS[0], "1"), "6": top1(FLOORS[0], "6"), "all4": top1(FLOORS[0], "all4")}
    floors = {m: top1(m, "7") for m in FLOORS}
    best = max(FLOORS, key=lambda m: floors[m].mean())
    out = {"lever": lever.name, "what": lever.what, "settings": " ".join(lever.overrides), "seeds": seeds}
    for name, values in (("row 1", rows["1"]), ("row 6", rows["6"]), *((f"row 7 {m}", floors[m]) for m in FLOORS),
                         ("all4", rows["all4"]), ("row 6 − row 1", rows["6"] - rows["1"]),
                         ("row 6 − floor", rows["6"] - floors[best])):
        out[name] = float(values.mean())
        out[f"{name} sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    out["better floor"] = best
    out["seconds"] = time.time() - t0
    return out


def verdict(r: pd.Series) -> str:
    """The issue's bar: row 6 − row 1 ≥ +5 and row 6 − the better floor ≥ +3, each gap above its spread."""
    ok = (r["row 6 − row 1"] >= 5 and r["row 6 − floor"] >= 3 and r["row 6 − row 1 sd"] < r["row 6 − row 1"]
          and r["row 6 − floor sd"] < r["row 6 − floor"])
    return "yes" if ok else "no"


def write(table: pd.DataFrame, out_dir, command: str) -> None:
    write_text(out_dir / "regime.csv", table.to_csv(index=False))

    def cell(name: str) -> list[str]:
        return [f"{m:.2f} ± {s:.2f}" for m, s in zip(table[name], table[f"{name} sd"])]

    shown = pd.DataFrame({"lever": table["lever"], "what": table["what"],
                          **{n: cell(n) for n in ("row 1", "row 6", *(f"row 7 {m}" for m in FLOORS), "all4",
                                                  "row 6 − row 1", "row 6 − floor")},
                          "regime?": table.apply(verdict, axis=1), "seconds": table["seconds"].round(0)})
    text = (f"# Where feature sharing matters: Table 5's rows by lever\n\n{markdown_table(shown)}\n\n"
            "Top-1 (%) on S's held-out test split, mean ± sd over seeds "
            f"{', '.join(map(str, range(int(table['seeds'].max()))))} (Table 5's seeds: each raw row retrained, each "
            "decider refined with that seed; Φ and the shards are data.seed's). Row 1: E1 on its own images (Φ). "
            "Row 6: Φ's φ2 refined on φ1(S1) ∪ φ1(S2). Row 7 prototypes / class-stats: the same with E2 sharing only "
            "its class prototypes or per-class statistics (label-only floors). all4: every entity's clean features. "
            "row 6 − floor: against the better of the two floors. regime?: row 6 − row 1 ≥ +5 and row 6 − floor ≥ +3, "
            "each larger than its spread (the utility issue's bar).\n\n"
            f"Command: `{command}`.\n")
    write_text(out_dir / "regime.md", text)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    started = time.time()
    parser = command_parser("python -m sim.regime", __doc__)
    parser.add_argument("--levers", nargs="+", default=None, metavar="NAME",
                        help=f"lever settings to run (default all): {', '.join(LEVER_NAMES)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row")
    parser.add_argument("--sequential", action="store_true", help="each grid in this process, without Ray")
    parser.add_argument("--results-root", default=None, metavar="DIR", help="where results go (default: results/)")
    args = parser.parse_args(argv)
    if unknown := [n for n in args.levers or () if n not in LEVER_NAMES]:
        parser.error(f"unknown lever setting(s) {unknown}; choose from {', '.join(LEVER_NAMES)}")
    extra = ["--sequential"] * args.sequential + ["--no-dashboard"] * (not args.sequential)
    extra += ["--results-root", args.results_root] if args.results_root else []
    chosen = [lever for lever in LEVERS if args.levers is None or lever.name in args.levers]
    table = pd.DataFrame([measure(lever, args.seeds, extra) for lever in chosen])
    out_dir = Path(args.results_root or "results") / "utility" / "regime"
    previous = out_dir / "regime.csv"
    if previous.is_file():  # levers measured by earlier invocations stay in the table
        old = pd.read_csv(previous)
        table = pd.concat([old[~old["lever"].isin(table["lever"])], table])
        table = table.set_index("lever").loc[[n for n in LEVER_NAMES if n in set(table["lever"])]].reset_index()
    write(table, out_dir, " ".join(command_line("python -m sim.regime", argv)))
    write_provenance(out_dir, started, command_line("python -m sim.regime", argv))
    print((out_dir / "regime.md").read_text())
    return table


if __name__ == "__main__":
    run_main(main)
