"""The attack suite (`python -m sim.attack`) on the attack-tiny preset: real CIFAR-10 images when the
shared archive is present, else scikit-learn's digits.

One report (every attacker, the two controls) is computed once per session; the other tests read it
or reuse its stored cells.
"""

from __future__ import annotations

import importlib
import json
import pkgutil

import numpy as np
import pandas as pd
import pytest
import torch

import sim.attack as attack
from entities.attacks import ATTACKS
from entities.attacks.base import CLEAN, RAW, check_attack_mode
from entities.attacks.card import CellStore, card_table, cell_key, find_worst, worst_cases
from entities.attacks.scoring import gallery_rows, gallery_ssim, score
from entities.attacks.suite import entity_seed, run_suite
from entities.data import DataError, find_archive
from entities.entity import Entity
from entities.metrics import ssim_per_image
from entities.pipeline import ArtefactStore, entity_shards, load_task
from entities.pools import Pool, save_pool
from entities.presets import load_config
from entities.reconstructors import RECONSTRUCTORS
from entities.report import write_json
from entities.sharing import DPM, contribute, step1
from entities.train import to_float

try:
    find_archive("cifar10")
    DATA = []
except DataError:
    DATA = ["data.dataset=digits"]

LEARNED = ("psi", "reconstructors", "decoder", "transfer", "dpm-agnostic", "substitute", "optimize")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("attack")


def settings(root, *extra: str) -> list[str]:
    """In this process: the attacks are under test here, Ray's runner in tests/test_attack_scale.py."""
    return ["--sequential", "--config", "attack-tiny", "--set", f"results_root={root}", "threads=2", *DATA, *extra]


def cfg_of(root, *extra: str):
    return load_config("attack-tiny", {"results_root": str(root), "threads": "1",
                                       **dict(s.split("=", 1) for s in [*DATA, *extra])})


@pytest.fixture(scope="module")
def report(root):
    """Every attacker against E1 and E4 in the two controls (clean φ1 features, raw images)."""
    cells = attack.main(["--share", CLEAN, RAW, *settings(root)])
    return cells, root / "attack" / "attack-tiny"


def test_registry_holds_every_family_and_rejects_unknown_names(root):
    """Every module of entities/attacks/ that defines a family is registered, image first (report rows follow
    the registry's order); the names are the registry's own, not a copy kept here."""
    package = importlib.import_module("entities.attacks")
    modules = [importlib.import_module(m.name) for m in pkgutil.iter_modules(package.__path__, "entities.attacks.")]
    assert list(ATTACKS)[0] == "image" and set(ATTACKS) == {m.FAMILY.name for m in modules if hasattr(m, "FAMILY")}
    cfg = cfg_of(root)
    for name, family in ATTACKS.items():
        assert family.name == name and family.summary and family.attackers(cfg)
    assert ATTACKS["reconstructors"].attackers(cfg) == [f"reconstructors/{n}" for n in RECONSTRUCTORS]
    with pytest.raises(ValueError, match="unknown attack.*psi"):
        run_suite(cfg, ["gan"], [CLEAN], CellStore(root / "unused"))
    with pytest.raises(ValueError, match="unknown sharing mode 'jpeg'.*GN\\+dpm"):
        check_attack_mode("jpeg")
    with pytest.raises(ValueError, match="also a victim"):
        run_suite(cfg_of(root, "attack.victims=[\"E1\", \"E2\"]"), ["psi"], [CLEAN], CellStore(root / "unused"))
    with pytest.raises(SystemExit):
        attack.main(["--attacks", "gan", *settings(root)])


def test_every_learned_attacker_inverts_clean_features(report):
    """The positive control: an attacker that cannot invert unpoisoned φ1 features proves nothing."""
    cells, _ = report
    clean = cells[(cells["mode"] == CLEAN) & cells["family"].isin(LEARNED)]
    assert set(clean["family"]) == set(LEARNED) and set(clean["victim"]) == {"E1", "E4"}
    ok = clean[clean["status"] == "ok"]
    # at conv3_1 (16-pixel maps) no stage of factor 4 reaches 32 pixels: rx4s4 alone does not apply
    assert set(clean.loc[clean["status"] != "ok", "attacker"]) == {"reconstructors/rx4s4"}
    assert (ok["disclosure"] > 0.3).all(), ok[["victim", "attacker", "disclosure"]].to_string()
    assert (ok["identification"] > 5 * ok["chance"]).all(), ok[["victim", "attacker", "identification"]].to_string()
    raw = cells[(cells["mode"] == RAW) & (cells["attacker"] == "image")]
    assert np.allclose(raw["disclosure"], 1) and (raw["identification"] == 1).all()
    assert (cells.loc[(cells["mode"] == CLEAN) & (cells["attacker"] == "image"), "status"] == "n/a").all()
    # the floor: the label's mean image identifies no one, and every learned attacker beats it on clean features
    prior = cells[(cells["attacker"] == "prior") & (cells["status"] == "ok")].set_index(["victim", "mode"])
    assert len(prior) == 4 and (prior["identification"] <= 3 * prior["chance"]).all(), prior.to_string()
    assert (prior["disclosure"] < 0.25).all() and (prior["disclosure"] > 0.05).all()  # a mean image scores > 0
    for _, cell in ok.iterrows():
        assert cell["disclosure"] > prior.loc[(cell["victim"], CLEAN), "disclosure"] + 0.05


def test_identification_is_certain_for_identical_images_and_chance_for_unrelated_ones(root):
    split = load_task(cfg_of(root))
    shard = split.S.train_images[:300]
    truth = {"shown": np.arange(300)}
    same = score(to_float(shard), shard, truth, gallery=100, seed=0)
    assert same["identification"] == 1 and same["disclosure"] == pytest.approx(1) and same["chance"] == 0.01
    other = score(to_float(split.Q.train_images[:300]), shard, truth, gallery=100, seed=0)
    assert other["identification"] < 0.05 and other["disclosure"] < 0.3
    # the gallery's fast SSIM is entities.metrics' SSIM, both ways round
    recon, images = to_float(split.Q.train_images[:20]), to_float(shard)
    rows = gallery_rows(len(images), np.arange(20), 30, 0)
    pairs = recon.repeat_interleave(30, 0), images[torch.as_tensor(rows.reshape(-1))]
    want = torch.maximum(ssim_per_image(*pairs), ssim_per_image(1 - pairs[0], pairs[1])).view(20, 30)
    torch.testing.assert_close(gallery_ssim(recon, images, rows), want, atol=1e-5, rtol=0)


def test_the_cards_worst_case_is_the_maximum_of_its_rows(report):
    cells, run_dir = report
    worst = worst_cases(cells).set_index(["victim", "mode"])
    ok = cells[cells["status"] == "ok"]
    for (victim, mode), group in ok.groupby(["victim", "mode"]):
        assert worst.loc[(victim, mode), "disclosure"] == group["disclosure"].max()
        assert worst.loc[(victim, mode), "identification"] == group["identification"].max()
        assert worst.loc[(victim, mode), "attacker"] == group.loc[group["disclosure"].idxmax(), "attacker"]
    stored = pd.DataFrame(json.loads((run_dir / "report.json").read_text())["worst"]).set_index(["victim", "mode"])
    assert np.allclose(stored.loc[worst.index, "disclosure"], worst["disclosure"])
    sections = (run_dir / "report.md").read_text().split("## Victim ")[1:]
    for section in sections:
        victim = section.split()[0]
        line = next(row for row in section.splitlines() if row.startswith("| **worst case**"))
        cells_of_line = line.split(" | ")[1:]
        assert len(cells_of_line) == len(worst.loc[victim])
        for w, cell in zip(worst.loc[victim].itertuples(), cells_of_line):
            assert cell.startswith(f"**{w.disclosure:.3f}** ({w.attacker})"), (victim, cell)
    assert (run_dir / "report.png").stat().st_size > 10_000
    # the bold cell of a column is its maximum, also with attackers that do not apply
    toy = pd.DataFrame([{"victim": "E1", "mode": m, "attacker": a, "status": s, "disclosure": d,
                         "identification": i, "chance": 0.01}
                        for m, a, s, d, i in [("dpm", "psi", "ok", 0.1, 0.5), ("dpm", "decoder", "ok", 0.4, 0.2),
                                              ("dpm", "image", "n/a", np.nan, np.nan)]])
    table = card_table(toy, "E1", ["dpm"], 2).set_index("attacker")["DPM pools"]
    assert table["decoder"] == "**0.400 · 20%**" and table["psi"] == "0.100 · 50%" and table["image"] == "–"
    assert table["**worst case**"] == "**0.400** (decoder) · **50%** (psi)"


def test_a_changed_setting_never_serves_a_stale_cell(report, root):
    cfg = cfg_of(root)
    base = cell_key(cfg, "psi", "E1", CLEAN, "own")
    for change in ("data.seed=1", "backbone.hook=conv4_1", "pretrain.epochs=3", "reconstructor.lr=0.002",
                   "dpm.lam=0.5", "mdp.steps=3", "attack.epochs=2", "attack.seed=2", "attack.attacker=E3",
                   "attack.gallery=50", "precision=fp32"):
        assert cell_key(cfg_of(root, change), "psi", "E1", CLEAN, "own") != base, change
    for same in ("threads=2", "attack.victims=[\"E4\"]", "name=other"):
        assert cell_key(cfg_of(root, same), "psi", "E1", CLEAN, "own") == base, same
    assert cell_key(cfg, "psi", "E1", CLEAN, "flower:0123456789") != base
    store = CellStore(root / "attack" / "attack-tiny")
    again = run_suite(cfg, ["psi"], [CLEAN], store)
    assert again.computed == [] and len(again.reused) == 2  # E1 and E4, as stored by the report
    changed = run_suite(cfg_of(root, "attack.gallery=50"), ["psi"], [CLEAN], store)
    assert len(changed.computed) == 2 and changed.reused == []
    assert [r["chance"] for r in changed.records] == [1 / 50, 1 / 50]


def test_flower_summary_and_sharing_table_label_psi_and_show_the_worst_case(report, root):
    from sim.server_app import with_worst_case
    from sim.table5 import sharing_table

    cfg = cfg_of(root, "collab.share=raw")
    worst = find_worst(cfg, cfg.results_dir())
    assert set(worst) == {CLEAN, RAW} and worst[RAW]["E1"]["disclosure"] == pytest.approx(1)
    summary = pd.DataFrame({"entity": ["E1", "E2", "E3", "E4"], "disclosure_ssim": [1.0] * 4})
    assert with_worst_case(summary, cfg)
    assert list(summary.columns[:4]) == ["entity", "disclosure_ssim", "disclosure_by", "worst_attack_ssim"]
    assert summary["worst_attack_ssim"][0] == pytest.approx(1) and summary["worst_attack_ssim"].isna()[1]
    assert summary["worst_attacker"][0] == "image"
    dpm = pd.DataFrame({"entity": ["E1"], "disclosure_ssim": [0.1]})
    assert with_worst_case(dpm, cfg_of(root)) == "" and dpm["disclosure_by"][0] == "ψ only"
    table = pd.DataFrame({"row": ["7"], "top-1": [50.0]})
    sent = {"E1": {"bytes_per_image": 3072, "disclosure_ssim": 0.1, "label_ssim": 0.1}}
    md = sharing_table({"dpm": table, "raw": table}, {"dpm": sent, "raw": sent}, 2, root / "sharing", worst).read_text()
    assert "ψ only" in md and "worst attack SSIM" in md and "image on E1" in md


@pytest.mark.slow  # trains on real data in its body
def test_from_flower_attacks_the_pools_a_flower_run_stored(root):
    """The victims' DPM pools as a Flower run stores them are what is attacked, under keys of their own. The
    stored E4 pool is E4's DPM pool; the stored E1 pool holds clean φ1 features, which must then score as such."""
    cfg = cfg_of(root)
    split = load_task(cfg)
    store = ArtefactStore(cfg)
    shared = step1(cfg, split, store)
    shards = entity_shards(cfg, split)
    flower = root / "flower" / "run"
    for name in ("E1", "E4"):
        entity = Entity(name, split.S.train_images[shards[name]], split.S.train_labels[shards[name]], store)
        sent = contribute(entity, shared, cfg, entity_seed(cfg, name), DPM)
        pool = Pool(entity.features, sent.labels) if name == "E1" else sent.pool()
        save_pool(pool, flower / "artefacts" / "pools" / f"{name}.pt", {"store_key": store.key})
    write_json({"share": DPM}, flower / "config.json")
    own = attack.main(["--attacks", "psi", "--share", DPM, "--run-name", "own-pools", *settings(root)])
    theirs = attack.main(["--attacks", "psi", "--share", DPM, "--from-flower", str(flower),
                          "--run-name", "flower-pools", *settings(root)])
    clean, own, theirs = (c[c["mode"] == m].set_index("victim")["disclosure"]
                          for c, m in ((own, CLEAN), (own, DPM), (theirs, DPM)))
    assert theirs["E4"] == pytest.approx(own["E4"]) and theirs["E1"] == pytest.approx(clean["E1"]) != own["E1"]
    write_json({"share": "mdp"}, flower / "config.json")
    with pytest.raises(ValueError, match="takes DPM pools"):
        attack.main(["--from-flower", str(flower), *settings(root)])


def test_optimize_fits_the_features_better_than_its_start():
    """The white-box search must move its start toward images whose features match the shared ones."""
    from entities.attacks.optimize import invert

    torch.manual_seed(0)
    phi1 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2)).eval()
    truth = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        features = phi1(truth)
    start = torch.rand(6, 3, 16, 16)
    found = invert(phi1, features, start)
    assert found.shape == truth.shape and 0 <= found.min() and found.max() <= 1
    with torch.no_grad():
        assert (phi1(found) - features).pow(2).mean() < 0.5 * (phi1(start) - features).pow(2).mean()


@pytest.mark.slow  # trains on real data in its body
def test_a_collaborator_reverses_deepobfuscators_shared_obfuscator(root):
    """Table 4's image-sharing column on the suite: the obfuscator is published, so a collaborator trains a
    decoder on its own (O(φ1(x)), x) pairs and inverts every pool far better than ψ, which O never saw."""
    cells = attack.main(["--share", "obfuscator", "--attacks", "psi", "transfer", *settings(root)])
    mode = cells[(cells["mode"] == "obfuscator") & (cells["status"] == "ok")].set_index(["victim", "attacker"])
    for victim in ("E1", "E4"):
        assert mode.loc[(victim, "transfer"), "disclosure"] > mode.loc[(victim, "psi"), "disclosure"] + 0.1, mode
        assert mode.loc[(victim, "transfer"), "identification"] > 0.5, mode
