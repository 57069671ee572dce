"""Write ``results/README.md`` from the results' own Markdown files, so the two cannot drift apart.

    python -m sim.results_readme            # (re)write results/README.md
    python -m sim.results_readme --check    # exit 1 if results/README.md is not what the files give

Every table a command writes (``table5.md``, ``report.md``, ...) and every reading written by hand beside
the results it reads (``reading.md``: how the run was made, what it took, what it shows) is copied in
whole, under the section :data:`SECTIONS` puts it in; nothing is typed twice. To show a new result, add
one line to :data:`SECTIONS`. A pattern that matches no file is said so in the output (and on stderr),
so a missing run shows as missing instead of stopping the rest.
"""

from __future__ import annotations

import argparse
import sys
from itertools import groupby
from pathlib import Path

from entities.files import write_text

ROOT = Path(__file__).resolve().parent.parent / "results"
GENERATOR = "python -m sim.results_readme"

# (section title, a file or glob under results/), in reading order. Consecutive lines with the same title
# form one section; a glob's files come in sorted order.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("Speed: device and precision", "benchmark/throughput.md"),
    ("Speed: device and precision", "benchmark/end-to-end.md"),
    ("Speed: device and precision", "benchmark/reading.md"),
    ("Deep Poisoning Tables 1–3, Figures 4–6", "reproduce/default/table1.md"),
    ("Deep Poisoning Tables 1–3, Figures 4–6", "reproduce/default/table2.md"),
    ("Deep Poisoning Tables 1–3, Figures 4–6", "reproduce/default/table3.md"),
    ("Deep Poisoning Tables 1–3, Figures 4–6", "reproduce/default/figure5.md"),
    ("Deep Poisoning Tables 1–3, Figures 4–6", "reproduce/default/reading.md"),
    ("Table 4 and Figure 7: DeepObfuscator against private DPMs", "reproduce/table4/table4.md"),
    ("Table 4 and Figure 7: DeepObfuscator against private DPMs", "reproduce/table4/reading.md"),
    ("The Flower collaboration", "flower/collab-idle/summary.md"),
    ("The Flower collaboration", "flower/collab-idle/reading.md"),
    ("Table 5: the E1–E4 collaboration grid", "table5/collab/table5.md"),
    ("Table 5: the E1–E4 collaboration grid", "table5/collab/pools.md"),
    ("Table 5: the E1–E4 collaboration grid", "table5/collab/reading.md"),
    ("Table 5: the E1–E4 collaboration grid", "table5/collab-seeds3/table5.md"),
    ("Table 5: the E1–E4 collaboration grid", "table5/collab-128pc/table5.md"),
    ("Table 5: the E1–E4 collaboration grid", "table5/collab-128pc-seeds3/table5.md"),
    ("Table 5: the E1–E4 collaboration grid", "table5/collab-128pc-conv3_1/table5.md"),
    ("Table 5: why the refinement rows do not gain", "table5/collab/decider-unions.md"),
    ("Table 5: why the refinement rows do not gain", "table5/collab/privacy-utility.md"),
    ("Table 5: why the refinement rows do not gain", "table5/collab/privacy-utility-reading.md"),
    ("Table 5 on Ray: the speed-up", "table5/benchmark/speedup.md"),
    ("The attack suite as tasks: speed", "benchmark/attack-vs-bdf8fb6.md"),
    ("The attack suite as tasks: speed", "benchmark/attack-vs-bdf8fb6-profile.md"),
    ("The attack suite as tasks: speed", "benchmark/attack-kernels.md"),
    ("The attack suite as tasks: speed", "benchmark/attack-speed.md"),
    ("The attack suite as tasks: speed", "benchmark/optimize-budget.md"),
    ("The attack suite as tasks: speed", "benchmark/attack-reading.md"),
    ("MDP: the paper's tables at CPU scale", "mdp/mdp/table1.md"),
    ("MDP: the paper's tables at CPU scale", "mdp/mdp/table2.md"),
    ("MDP: the paper's tables at CPU scale", "mdp/mdp/ssim.md"),
    ("MDP: the paper's tables at CPU scale", "mdp/mdp-l2/table1.md"),
    ("MDP: the paper's tables at CPU scale", "mdp/mdp-l2/table2.md"),
    ("MDP: the paper's tables at CPU scale", "mdp/mdp-l2/ssim.md"),
    ("MDP: the paper's tables at CPU scale", "mdp/mdp/reading.md"),
    ("MDP: the paper's tables at CPU scale", "mdp/mdp-step1/NOTE.md"),
    ("MDP at fidelity: a crafting model that has learned CIFAR-10", "mdp/mdp-full/table1.md"),
    ("MDP at fidelity: a crafting model that has learned CIFAR-10", "mdp/mdp-full/table2.md"),
    ("MDP at fidelity: a crafting model that has learned CIFAR-10", "mdp/mdp-full/ssim.md"),
    ("MDP at fidelity: a crafting model that has learned CIFAR-10", "mdp/mdp-full/scale.md"),
    ("MDP at fidelity: a crafting model that has learned CIFAR-10", "mdp/mdp-full/init-probe.md"),
    ("MDP at fidelity: a crafting model that has learned CIFAR-10", "mdp/mdp-full/reading.md"),
    ("MDP as a sharing mode", "mdp/mdp-collab/compare.md"),
    ("MDP as a sharing mode", "table5/mdp-collab/sharing.md"),
    ("MDP as a sharing mode", "table5/mdp-collab/reading.md"),
    ("Privacy under attack", "attack/collab/report.md"),
    ("Privacy under attack", "attack/collab/reading.md"),
    ("The privacy-utility frontier", "attack/collab/frontier.md"),
    ("The privacy-utility frontier", "attack/collab/frontier-reading.md"),
    ("Utility against the label-only floors", "utility/regime/regime.md"),
    ("Utility against the label-only floors", "table5/collab-scale/table5.md"),
    ("Utility against the label-only floors", "table5/collab-scale-floors/sharing.md"),
    ("Utility against the label-only floors", "attack/collab-scale/frontier-excess.md"),
    ("Utility against the label-only floors", "utility/dishonest-collab-scale/dishonest.md"),
    ("Utility against the label-only floors", "utility/dishonest-collab-scale/dishonest-E4.md"),
    ("Utility against the label-only floors", "utility/dishonest-collab-scale/screening.md"),
    ("Utility against the label-only floors", "utility/dishonest-collab-scale-test5000/dishonest-E4-merge-repair.md"),
    ("Utility against the label-only floors",
     "utility/dishonest-collab-scale-test5000/dishonest-E4-merge-withhold-none-repair.md"),
    ("Utility against the label-only floors",
     "utility/dishonest-collab-scale-test5000/dishonest-E1-E3-merge-repair.md"),
    ("Utility against the label-only floors", "utility/dishonest-collab-scale-test5000/screening.md"),
    ("Utility against the label-only floors",
     "utility/dishonest-collab-scale-seed100/dishonest-E4-merge-none-repair.md"),
    ("Utility against the label-only floors",
     "utility/dishonest-collab-scale-seed100/dishonest-E1-E3-merge-repair.md"),
    ("Utility against the label-only floors", "utility/dishonest-collab-scale-seed100/dishonest-E3-merge-repair.md"),
    ("Utility against the label-only floors", "utility/dishonest-collab-scale-seed100/screening.md"),
    ("Utility against the label-only floors", "utility/reading.md"),
)


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, spaces to hyphens, punctuation but hyphens dropped."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def demoted(text: str, levels: int) -> str:
    """``text`` with every Markdown heading outside code fences ``levels`` deeper, so a file's own title
    sits below the section that holds it."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def render(root: Path = ROOT, sections: tuple[tuple[str, str], ...] = SECTIONS) -> tuple[str, list[str]]:
    """The whole README, and the patterns that matched no file."""
    titles = [title for title, _ in groupby(t for t, _ in sections)]
    parts = [f"# Results\n\nWritten by `{GENERATOR}` from the files it names below (the tables the commands "
             "wrote, and the readings written by hand beside them): edit those and run it again, never this "
             "file. How to run each experiment: [the README](../README.md#experiments).\n",
             "\n".join(f"- [{t}](#{anchor(t)})" for t in titles) + "\n"]
    missing = []
    for title, group in groupby(sections, key=lambda s: s[0]):
        parts.append(f"## {title}\n")
        for _, pattern in group:
            paths = sorted(root.glob(pattern))
            if not paths:
                missing.append(pattern)
                parts.append(f"*No results yet: `{pattern}` matches no file.*\n")
            for path in paths:
                rel = path.relative_to(root).as_posix()
                parts.append(f"### [`{rel}`]({rel})\n\n{demoted(path.read_text().strip(), 3)}\n")
    return "\n".join(parts), missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=GENERATOR, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if results/README.md is out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="the results folder (default: the checkout's)")
    args = parser.parse_args(argv)
    text, missing = render(args.root)
    for pattern in missing:
        print(f"no file matches results/{pattern}", file=sys.stderr)
    target = args.root / "README.md"
    if args.check:
        current = target.read_text() if target.is_file() else ""
        if current != text:
            print(f"{target} is out of date: run `{GENERATOR}`", file=sys.stderr)
            return 1
        return 0
    write_text(target, text)
    print(f"wrote {target} ({len(text.encode()):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
