"""The DPM's defence settings (entities/defences/, dpm.utility, dpm.bottleneck) and the frontier, on real
CIFAR-10 at the attack-tiny split (conv3_1), or scikit-learn's digits without the shared archive.

The adaptive attacker of these tests is the strongest the threat model has: a decoder trained on the
victim's own (pool, image) pairs and scored on the victim's other images. Its positive control is the
paper's DPM, whose pool that decoder must clearly invert, or a lower figure elsewhere proves nothing.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import sim.attack as attack
from entities import runtime
from entities.attacks.decoder import train_decoder
from entities.attacks.scoring import score
from entities.data import DataError, find_archive
from entities.decoders import build_decoder
from entities.defences import DEFENCES
from entities.defences.dcor import distance_correlation
from entities.dpm import build_dpm
from entities.entity import Entity
from entities.pipeline import ArtefactStore, cached_features, entity_shards, load_task
from entities.presets import load_config
from entities.sharing import step1
from entities.train import evaluate_classifier, infer, poison, train_dpm

try:
    find_archive("cifar10")
    DATA = {}
except DataError:
    DATA = {"data.dataset": "digits"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Step 1 of attack-tiny, and a victim of 450 images (E1-E3's shards): 300 to train its DPM and the
    attacker's decoder on, 150 the attack is scored on."""
    root = tmp_path_factory.mktemp("defences")
    cfg = load_config("attack-tiny", {"results_root": str(root), "threads": "2", **DATA})
    runtime.configure(cfg)
    split = load_task(cfg)
    shards = entity_shards(cfg, split)
    store = ArtefactStore(cfg)
    shared = step1(cfg, split, store)
    rows = np.concatenate([shards[n] for n in ("E1", "E2", "E3")])
    victim = Entity("E1", split.S.train_images[rows], split.S.train_labels[rows], store)
    test = cached_features(store, "S-test", shared.phi1, split.S.test_images)
    return cfg, split, shared, victim, test, root


def defend(world, **settings) -> dict:
    """Train the victim's DPM with these dpm settings on 300 images; the strongest attacker's scores on
    the other 150 and the shared φ2's top-1 on the poisoned test features."""
    cfg, split, shared, victim, test, _ = world
    dpm_cfg = dataclasses.replace(cfg.dpm, **{"epochs": 12, "lr": 0.003, **settings})
    feats = victim.featurize(shared).features
    fit, held = np.arange(300), np.arange(300, len(feats))
    torch.manual_seed(0)
    dpm = build_dpm(dpm_cfg, tuple(feats.shape[1:]), shared.phi2)
    history = train_dpm(dpm, copy.deepcopy(shared.phi2), shared.psi, feats[fit], victim.images[fit],
                        victim.labels[fit], dpm_cfg, seed=0)
    pool = poison(dpm, feats)
    decoder = build_decoder(tuple(pool.shape[1:]), tuple(victim.images.shape[1:]))
    train_decoder(decoder, pool[fit], victim.images[fit], dataclasses.replace(cfg.attack, epochs=10, batch_size=32),
                  seed=1, what="own-pairs attacker")
    attacked = score(infer(decoder, pool[held]), victim.images, {"shown": held}, gallery=100, seed=1)
    top1 = evaluate_classifier(nn.Sequential(dpm, shared.phi2), test, split.S.test_labels)["top1"]
    return {"history": history, "attack": attacked, "top1": top1}


@pytest.fixture(scope="module")
def paper(world):
    return defend(world)


def test_distance_correlation_reads_dependence():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    assert distance_correlation(x, x).item() == pytest.approx(1, abs=1e-4)
    assert distance_correlation(x, 2 * x + 1).item() == pytest.approx(1, abs=1e-4)
    assert distance_correlation(x, x.flatten(1)[:, :50].exp()).item() > 0.3  # a quarter of x, bent
    # independent high-dimensional batches: near 0 (the plain V-statistic estimate gives about 0.8 here)
    assert abs(distance_correlation(x, torch.rand(64, 4096)).item()) < 0.1


def test_every_objective_trains_and_unknown_terms_are_refused(world):
    cfg = world[0]
    for privacy in (["decoder"], ["dcor"], []):
        history = defend(world, privacy=privacy, utility="distill")["history"]
        first, last = history[0], history[-1]
        assert set(first) == {"kl", *(DEFENCES[n].build(cfg.dpm, None, 0).name for n in privacy)}
        assert last["kl"] < first["kl"], history
    with pytest.raises(ValueError, match="dpm.privacy.*psi, decoder, dcor"):
        load_config("attack-tiny", {"dpm.privacy": '["nopeek"]'})
    with pytest.raises(ValueError, match="dpm.bottleneck"):
        load_config("attack-tiny", {"dpm.bottleneck": "pca"})


def test_the_adversarial_term_trains_its_decoder_on_the_pairs_it_is_shown(world):
    """The ``decoder`` term's adversary learns the current pairs: its reconstruction error falls over calls
    on the same batch (a P trained against an adversary that does not learn beats nobody)."""
    from entities.decoders import decoder_loss
    from entities.defences.decoder import AdversaryTerm
    from entities.train import batch

    _, _, shared, victim, _, _ = world
    f, x = batch(victim.featurize(shared).features[:64]), batch(victim.images[:64])
    term = AdversaryTerm(steps=1, lr=3e-3, seed=0)
    errors = []
    for _ in range(30):
        term.loss(f, x)
        with torch.no_grad():
            errors.append(decoder_loss(term.decoder(f).float(), x, ssim_weight=1.0)[0].item())
    assert errors[-1] < 0.8 * errors[0], errors


def test_the_paper_objective_keeps_its_artefact_keys(world):
    """Settings at the paper's values stay out of keys, so DPMs stored before them are still found."""
    cfg, _, shared, victim, _, _ = world
    assert "privacy" not in cfg.key_dict()["dpm"] and "bottleneck" not in cfg.key_dict()["dpm"]
    other = dataclasses.replace(cfg, dpm=dataclasses.replace(cfg.dpm, bottleneck="spatial"))
    assert other.key_dict()["dpm"]["bottleneck"] == "spatial"
    assert victim.dpm_path(cfg, shared, 0) != victim.dpm_path(other, shared, 0)
    # a section added later stays out whole at its defaults, and a changed value of it is in
    assert "table4" not in cfg.key_dict()
    blocks = cfg.table4.obfuscator_blocks + 1
    faces = dataclasses.replace(cfg, table4=dataclasses.replace(cfg.table4, obfuscator_blocks=blocks))
    assert faces.key_dict()["table4"] == {"obfuscator_blocks": blocks}


def test_bottlenecks_deny_the_own_pairs_attacker_that_inverts_the_papers_dpm(world, paper):
    """The paper's DPM defeats ψ, yet a decoder on the victim's own pairs inverts its pool and identifies
    most images; the spatial and logits bottlenecks bring that attacker to near chance at close utility."""
    assert paper["attack"]["identification"] > 0.3 and paper["attack"]["disclosure"] > 0.3, paper["attack"]
    for bottleneck, lr in (("spatial", 0.003), ("logits", 0.01)):
        defended = defend(world, bottleneck=bottleneck, utility="distill", lr=lr)
        a = defended["attack"]
        assert a["identification"] < 0.1 and a["disclosure"] < paper["attack"]["disclosure"] - 0.1, (bottleneck, a)
        assert defended["top1"] > paper["top1"] - 10, (bottleneck, defended["top1"], paper["top1"])


def test_frontier_writes_every_point_with_its_worst_case_and_gains(world):
    root = world[5]
    args = ["frontier", "--sequential", "--config", "attack-tiny", "--points", "paper DPM", "spatial bottleneck",
            "raw images", "--attacks", "image", "prior", "psi", "decoder", "transfer", "--results-root", str(root),
            "--set", "threads=2", *(f"{k}={v}" for k, v in DATA.items())]
    table = attack.main([*args, "--attack-seeds", "2"])
    run_dir = root / "attack" / "attack-tiny"
    stored = pd.read_csv(run_dir / "frontier.csv")
    assert list(stored["point"]) == ["paper DPM", "raw images", "spatial bottleneck"]
    assert {"E1 disclosure", "E4 identification", "E1 ψ", "poisoned top-1", "E1 gain", "E4 gain"} <= set(stored)
    raw = stored.set_index("point").loc["raw images"]
    assert raw["E1 disclosure"] == pytest.approx(1) and raw["E1 by"] == "image"
    for _, line in table.iterrows():
        assert line["E4 gain"] == pytest.approx(line["row 12"] - line["row 4"])
        assert line["E1 disclosure"] >= line["E1 ψ"]  # the worst case includes ψ
    text = (run_dir / "frontier.md").read_text()
    assert "spatial bottleneck" in text and "lower bound" in text and (run_dir / "frontier.png").is_file()
    # the attacks again with the attacker's next seed: the excess is the mean of both, with their spread
    seeds = [stored[f"E4 disclosure attack seed {s}"] for s in (1, 2)]
    assert (seeds[0] == stored["E4 disclosure"]).all() and (seeds[0] != seeds[1]).any()
    ex = pd.read_csv(run_dir / "frontier-excess.csv")
    priors = [stored[f"E4 prior attack seed {s}"] for s in (1, 2)]
    assert np.allclose(ex["E4 excess disclosure"], (seeds[0] - priors[0] + seeds[1] - priors[1]) / 2)
    assert "mean ± sd over the attacker's 2 seeds" in (run_dir / "frontier-excess.md").read_text()
    # --plan: everything this run stored is stored; a third attacker seed's cells and a second seed's rows are not
    planned = attack.main([*args, "--plan", "--attack-seeds", "2"]).set_index("point")
    assert (planned["cells to run"] == 0).all() and (planned["rows to run"] == 0).all(), planned
    more = attack.main([*args, "--plan", "--attack-seeds", "3", "--seeds", "2"]).set_index("point")
    assert (more["cells to run"] * 3 == more["cells"]).all() and (more["rows to run"] == 4).all(), more
    assert list(more["rows missing"]) == ["1@1 4@1 7@1 12@1"] * 3


def test_the_defended_preset_is_the_frontiers_logits_point():
    """configs/collab-defended.toml recommends what the frontier measured: the two must not drift apart."""
    from sim.frontier import POINTS, point_config

    point = next(p for p in POINTS if p.name == "logits bottleneck")
    assert load_config("collab-defended").dpm == point_config("collab", {}, point).dpm


def test_augmdp_runs_in_mdps_task_after_it():
    """AugMDP's sets start with MDP's: run as two tasks at once, both points crafted MDP's sets (the frontier on Ray
    at collab-scale spent 16 MDP crafts twice). Where both run, AugMDP is one task with MDP, after it."""
    from sim.frontier import POINTS, chains

    named = {p.name: p for p in POINTS}
    dpm, mdp, aug = named["paper DPM"], named["MDP"], named["AugMDP"]
    assert chains([aug, dpm, mdp]) == [[dpm], [mdp, aug]]
    assert chains([aug, dpm]) == [[dpm], [aug]]
    assert sorted(p.name for c in chains(list(POINTS)) for p in c) == sorted(p.name for p in POINTS)
