"""Attack every sharing mode's pools with adaptive attackers and write the privacy report card.

    python -m sim.attack [--config collab] [--from-flower results/flower/<run>] [--attacks psi decoder ...]
                         [--share dpm mdp ...] [--run-name NAME] [--set attack.images=200 threads=1]
                         [--plan] [--sequential | --address auto] [--cpus-per-cell 1] [--gpus-per-cell 0.5]
    python -m sim.attack frontier [--points NAME ...] [...]   (the privacy-utility frontier: sim/frontier.py)

A collaborator (``attack.attacker``, default E2) attacks the pools of ``attack.victims`` (default E1
and the data-poor E4) with every attacker of :mod:`entities.attacks`, in every sharing mode asked
for (default all: DPM pools, Table 3's GN/GF/MF in front of the DPM, MDP, AugMDP, raw images) and
in the two controls, clean φ1 features and raw images, which every report has. Step 1, the DPMs
and MDP sets are reused from ``results/artefacts/``; ``--from-flower`` takes the DPM pools of a
``flwr run sim/`` instead. Each finished cell is stored at once, so a killed run resumes.
The cells run as Ray tasks (a local instance, or the cluster of ``--address``), or in this process with
``--sequential``; the models many cells share are trained once, as tasks of their own, and each cell is
stored by this process as it finishes (:func:`entities.attacks.suite.run_suite`). ``--plan`` prints the
cells, which are stored, and an estimate of the time, and computes nothing. Output:
``results/attack/<run>/`` with ``report.md|csv`` (rows attackers, columns modes, cells disclosure
SSIM · identification rate, the worst case per mode in bold), ``report.png`` (real image, ψ and the
worst attacker per mode) and ``report.json`` (the worst cases, read by the Flower summary and by
Table 5's ``sharing.md``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from entities.attacks import ATTACKS
from entities.attacks.base import ATTACK_MODES, CONTROLS, LABEL_ONLY_MODES, attack_mode_name, check_attack_mode
from entities.attacks.card import REPORT_INDEX, CellStore, card_table, defence_key, settings_key, worst_cases
from entities.attacks.suite import SuiteRun, check_parties, plan_cells, run_suite
from entities.config import Config
from entities.entity import Pool
from entities.mdp import describe_pgd
from entities.pipeline import entity_shards, load_task
from entities.pools import PoolError
from entities.provenance import command_line, write_provenance
from entities.report import image_grid, markdown_table, write_json
from entities.sharing import DPM
from sim.cli import add_config_args, command_parser, config_from_args, run_main, run_name
from sim.executors import add_executor_args, executor_from_args, planned_slots
from sim.grid import feature_shape, load_flower_pools

log = logging.getLogger("poisonpool")

CSV_COLUMNS = ["victim", "mode", "attacker", "family", "status", "disclosure", "ssim", "ssim_inverted", "psnr", "l1",
               "identification", "chance", "n", "reference", "scored", "shard", "attacked_by", "seconds", "key"]
FIGURE_ROWS = 3  # images per victim in report.png


def modes_to_run(asked: list[str] | None) -> list[str]:
    """The modes asked for (default all but the label-only floors, which the frontier attacks) and the two
    controls, in the card's column order."""
    default = [m for m in ATTACK_MODES if m not in LABEL_ONLY_MODES]
    wanted = set(check_attack_mode(m) for m in (asked or default)) | set(CONTROLS)
    return [m for m in ATTACK_MODES if m in wanted]


def flower_pools(flower_dir: Path, cfg: Config) -> tuple[dict[str, Pool], str]:
    """The victims' DPM pools of a Flower run made with this Step 1, and a digest of them."""
    config = flower_dir / "config.json"
    if not config.is_file():
        raise PoolError(f"{flower_dir} is not a Flower results directory (no config.json)")
    share = json.loads(config.read_text()).get("share", DPM)
    if share != DPM:
        raise ValueError(f"--from-flower takes DPM pools; {flower_dir} shared {share!r} (its pools carry no record of "
                         "which real image each item shows)")
    split = load_task(cfg)
    shards = entity_shards(cfg, split)
    victims = check_parties(cfg)
    labels = {n: split.S.train_labels[shards[n]] for n in victims}
    shape = feature_shape(cfg, split.S.image_shape, len(split.S.classes))
    pools, digest = load_flower_pools(flower_dir, cfg, victims, labels, shape, len(split.S.classes))
    return pools, f"flower:{digest}"


def write_report(cfg: Config, run: SuiteRun, modes: list[str], run_dir: Path, store: CellStore, command: str,
                 pool_source: str) -> pd.DataFrame:
    """report.csv (one line per cell), report.md (one card per victim), report.json and report.png."""
    cells = pd.DataFrame(run.records)
    cells = cells.reindex(columns=CSV_COLUMNS)
    cells.to_csv(run_dir / "report.csv", index=False)
    rounds = cfg.mdp.rounds
    worst = worst_cases(cells)
    a, d = cfg.attack, cfg.data
    sections = []
    for victim in dict.fromkeys(cells["victim"]):
        mine = cells[cells["victim"] == victim]
        ok = mine[mine["status"] == "ok"]
        gallery = f"gallery of {round(1 / ok['chance'].iloc[0])}, chance {ok['chance'].iloc[0]:.0%}" if len(ok) else ""
        sections.append(f"## Victim {victim} ({int(mine['shard'].iloc[0]):,} images, {int(mine['scored'].iloc[0]):,} "
                        f"scored; {gallery})\n\n" + markdown_table(card_table(cells, victim, modes, rounds)))
    families = "\n".join(f"- `{name}`: {fam.summary}." for name, fam in ATTACKS.items()
                         if name in set(cells["family"]))
    mdp_note = (f"MDP/AugMDP({rounds}) ({describe_pgd(cfg.mdp)}) are crafted for the scored images only, as the "
                "MDP set of a shard of those images; an MDP item is scored against the real image it shows or the "
                "one whose label it carries, whichever it discloses more (`reference` in report.csv). "
                if set(modes) & {"mdp", "augmdp"} else "")
    notes = (
        f"Attacker: collaborator {a.attacker}, holding φ1, φ2, ψ, every pool with its labels, Q, the published "
        "recipe, its own shard and its own private DPM; never "
        "the victim's images or DPM. Cells: disclosure SSIM (the larger of SSIM(x̂, x) and SSIM(1 − x̂, x), mean "
        "over the scored images) · identification rate (the real image is the nearest by SSIM, either way round, "
        "among itself and gallery − 1 other images of the victim's shard). Bold: each mode's worst case; – : the "
        "attacker does not apply (attacker 0, `image`, exists only where images are shared; a reconstructor that "
        "cannot upscale φ1's maps to the image size). Controls: clean φ1 features (no DPM: an attacker that fails "
        f"there proves nothing) and raw images. {mdp_note}"
        f"Setting: {d.dataset}, {cfg.backbone.name} split at {cfg.backbone.hook}, Φ pretrained on "
        f"{cfg.backbone.pretrain_on}'s shard, ψ = {cfg.reconstructor.name}, DPMs of {cfg.dpm.blocks} blocks "
        f"(λ = {cfg.dpm.lam}, {cfg.dpm.init} start, {cfg.dpm.epochs} epochs); attacker decoders {a.epochs} epochs "
        f"on at most {a.max_pairs:,} pairs, substitute {a.substitute_epochs} + {a.substitute_epochs} epochs; pools: "
        f"{pool_source}. Settings key {settings_key(cfg)}, defence key {defence_key(cfg)}.\n\n"
        f"Attackers:\n\n{families}\n\n"
        f"Command: `{command}`; this invocation computed {len(run.computed)} cells and reused {len(run.reused)} in "
        f"{run.seconds:.0f} s."
    )
    title = f"# Privacy under attack: {cfg.name}, attacked by {a.attacker}"
    (run_dir / "report.md").write_text(f"{title}\n\n" + "\n\n".join(sections) + f"\n\n{notes}\n")
    psi = cells[(cells["attacker"] == "psi") & (cells["status"] == "ok")]
    write_json({"defence_key": defence_key(cfg), "settings_key": settings_key(cfg), "preset": cfg.name,
                "attacker": a.attacker, "victims": list(dict.fromkeys(cells["victim"])), "modes": modes,
                "pools": pool_source, "worst": worst.to_dict("records"),
                "psi": psi[["victim", "mode", "disclosure", "identification"]].to_dict("records")},
               run_dir / REPORT_INDEX)
    write_json(cfg.to_dict(), run_dir / "config.json")
    figure(cells, worst, run, modes, rounds, store, run_dir / "report.png")
    return cells


def _key(cells: pd.DataFrame, victim: str, mode: str, attacker: str) -> str | None:
    hit = cells[(cells["victim"] == victim) & (cells["mode"] == mode) & (cells["attacker"] == attacker)
                & (cells["status"] == "ok")]
    return hit.iloc[0]["key"] if len(hit) else None


def figure(cells: pd.DataFrame, worst: pd.DataFrame, run: SuiteRun, modes: list[str], rounds: int, store: CellStore,
           path: Path) -> None:
    """Per victim a few scored images: the real one, then ψ's and the worst attacker's reconstruction per
    mode (the worst attacker named under each image; blank where no item of the pool shows that image)."""
    panels = [(kind, mode) for mode in modes for kind in ("ψ", "worst")]
    titles = ["real"] + [f"{kind} · {attack_mode_name(mode, rounds)}" for kind, mode in panels]
    columns: dict[str, list[torch.Tensor]] = {t: [] for t in titles}
    captions: dict[str, list[str]] = {t: [] for t in titles}
    labels = []
    worst = worst.set_index(["victim", "mode"])
    for victim, real in run.figure_images.items():
        who = {}
        for kind, mode in panels:
            attacker = "psi" if kind == "ψ" else worst["attacker"].get((victim, mode))
            who[(kind, mode)] = (_key(cells, victim, mode, attacker) if attacker else None, attacker or "")
        thumbs = {key: store.thumbnails(key) for key, _ in who.values() if key}
        found = [t["present"] for t in thumbs.values() if t is not None]
        shown = torch.stack(found).sum(0) if found else torch.zeros(len(real))
        for j in torch.argsort(shown.float(), descending=True, stable=True)[:FIGURE_ROWS].tolist():
            labels.append(victim)
            columns["real"].append(real[j])
            captions["real"].append("")
            for title, (key, attacker) in zip(titles[1:], who.values()):
                t = thumbs.get(key) if key else None
                ok = t is not None and bool(t["present"][j])
                columns[title].append(t["images"][j].float() if ok else torch.zeros_like(real[j]))
                captions[title].append(attacker if ok else "")
    if labels:
        image_grid({t: torch.stack(v) for t, v in columns.items()}, path, labels, captions)


def cell_seconds(results_dir: Path) -> dict[str, float]:
    """Mean seconds per attacker over every stored cell under ``results_dir/attack`` (any settings): what
    ``--plan`` estimates with. A cell's seconds include its share of the pool and models it used."""
    seen: dict[str, list[float]] = {}
    for path in (results_dir / "attack").glob("*/artefacts/cells/*.json"):
        record = json.loads(path.read_text())
        seen.setdefault(record["attacker"], []).append(record.get("seconds", 0.0))
    return {a: sum(v) / len(v) for a, v in seen.items()}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def plan(cfg: Config, families: list[str], modes: list[str], store: CellStore, pool_source: str, slots: int
         ) -> pd.DataFrame:
    """Every cell of the report, whether it is stored, and the time the missing ones should take."""
    cells = plan_cells(cfg, families, modes, pool_source)
    table = pd.DataFrame([{"victim": c.victim, "mode": c.mode, "attacker": c.attacker, "key": c.key,
                           "stored": store.get(c.key) is not None} for c in cells])
    missing = table[~table["stored"]]
    means = cell_seconds(cfg.results_dir())
    known = missing["attacker"].map(means)
    for _, c in table.iterrows():
        state = "stored " if c["stored"] else "to run "
        print(f"{state} {c['victim']:<4} {c['mode']:<10} {c['attacker']:<24} {c['key']}")
    unknown = f" ({known.isna().sum()} cells of attackers never stored: not counted)" if known.isna().any() else ""
    estimate = (f"about {_duration(known.sum())} of work, {_duration(known.sum() / slots)} on {slots} task "
                f"slot(s), from the mean seconds of stored cells of the same attackers{unknown}"
                if known.notna().any() else "no estimate: no cell of these attackers is stored under this results root")
    print(f"{len(table)} cells: {int(table['stored'].sum())} stored, {len(missing)} to run; {estimate}", flush=True)
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["frontier"]:
        from sim import frontier  # the frontier runs this suite for every point; it is its own command

        return frontier.main(argv[1:])
    started = time.time()
    parser = command_parser("python -m sim.attack", __doc__)
    parser.add_argument("--attacks", nargs="+", default=None, metavar="FAMILY",
                        help=f"attacker families to run (default all): {', '.join(ATTACKS)}")
    parser.add_argument("--share", nargs="+", default=None, metavar="MODE",
                        help=f"sharing modes to attack (default all but the label-only floors; the controls "
                             f"clean and raw always run): "
                             f"{', '.join(ATTACK_MODES)}")
    parser.add_argument("--from-flower", type=Path, default=None, metavar="DIR",
                        help="attack the DPM pools of this `flwr run sim/` results directory (default: the "
                             "victims' own DPMs)")
    parser.add_argument("--plan", action="store_true",
                        help="print the cells, which are stored and a time estimate; compute nothing")
    add_executor_args(parser, "cell")
    add_config_args(parser)
    parser.set_defaults(config="collab")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    families = list(dict.fromkeys(args.attacks or ATTACKS))
    unknown = [f for f in families if f not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    modes = modes_to_run(args.share)
    check_parties(cfg)
    pools, source = (None, "own") if args.from_flower is None else flower_pools(args.from_flower, cfg)
    run_dir = cfg.results_dir() / "attack" / run_name(args, cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    store = CellStore(run_dir)
    if args.plan:
        slots = planned_slots(args)
        return plan(cfg, families, modes, store, source, slots)
    t0 = time.time()
    with executor_from_args(args, cfg.threads) as executor:
        run = run_suite(cfg, families, modes, store, pools, source, executor)
    command = "python -m sim.attack " + " ".join(argv)
    cells = write_report(cfg, run, modes, run_dir, store, command.strip(), source)
    write_provenance(run_dir, started, command_line("python -m sim.attack", argv))
    log.info("wrote %s in %.0fs", run_dir / "report.md", time.time() - t0)
    print((run_dir / "report.md").read_text())
    return cells


if __name__ == "__main__":
    run_main(main)
