"""Step 1-2 end to end on about a thousand real images: the DPM must hide images, not the classes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from entities.data import DataError, find_archive
from entities.entity import Entity
from entities.pipeline import ArtefactStore, load_task
from entities.presets import load_config
from entities.sharing import step1
from sim.reproduce import reproduce


def _tiny_config(tmp_path):
    try:
        find_archive("cifar10")
        dataset = "cifar10"
    except DataError:
        dataset = "digits"
    return load_config("tiny", {"results_root": str(tmp_path), "data.dataset": dataset})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = _tiny_config(tmp)
    return cfg, reproduce(cfg, ["table1", "table2", "figure4"])


def test_dpm_lowers_ssim_and_keeps_accuracy(tiny_run):
    _, f = tiny_run
    chance = 100 / 5
    assert f["top1_original"] > chance + 15, f  # the pretrained decider learned something
    assert f["top1_poisoned"] >= f["top1_original"] - 10, f  # poisoned features still classify
    assert f["ssim_original"] > 0.15, f  # ψ inverts φ1 ...
    assert f["ssim_poisoned"] < f["ssim_original"] - 0.08, f  # ... but not P ∘ φ1
    assert abs(f["ssim_poisoned"]) < 0.1 and f["ssim_inverted_poisoned"] < 0.1, f  # and no photographic negative
    assert f["l1_poisoned"] > f["l1_original"], f


def test_reproduce_writes_tables_and_figure(tiny_run):
    cfg, f = tiny_run
    out = cfg.results_dir() / "reproduce" / "tiny"
    for name in ("table1.csv", "table1.md", "table2.csv", "table2.md", "figure4.png", "config.json"):
        assert (out / name).is_file(), name
    assert "paper ResNet101 poisoned" in (out / "table2.md").read_text()
    assert json.loads((out / "figures.json").read_text())["top1_original"] == f["top1_original"]
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["git"]["commit"]) == 40 and isinstance(prov["git"]["dirty"], bool)  # tests run in a checkout
    assert prov["precision"] in ("bf16", "fp32") and prov["device"] == "cpu" and prov["cpu"]
    assert prov["packages"]["torch"] == torch.__version__.split("+")[0] and prov["wall_seconds"] > 0
    # the curves train.fit returned, one line per epoch and figure, for every model the run trained
    curves = pd.read_csv(out / "curves.csv")
    epochs = curves.groupby("model")["epoch"].max().to_dict()
    assert epochs == {"Φ pretrain (resnet20)": cfg.pretrain.epochs, "ψ (px2s2)": cfg.reconstructor.epochs,
                      "DPM": cfg.dpm.epochs}
    assert curves["value"].notna().all() and not curves.duplicated(["model", "epoch", "figure"]).any()
    assert (out / "curves.png").stat().st_size > 1000


def test_provenance_of_an_installed_copy_says_it_has_no_commit():
    from entities.provenance import git_state

    assert git_state(None) == {"commit": None, "dirty": None, "source": "installed package (no git checkout)"}


def test_artefacts_are_reused_and_dpms_stay_private(tiny_run):
    cfg, _ = tiny_run
    store = ArtefactStore(cfg)
    shared = sorted(p.name for p in (store.root / "shared").iterdir())
    assert "backbone.pt" in shared and any(n.startswith("psi-px2s2") for n in shared)
    assert not any("dpm" in n for n in shared)  # no DPM next to shared artefacts
    assert list((store.root / "private" / "S").glob("dpm-*.pt"))
    # A second run is served from the store: same weights, no retraining.
    split = load_task(cfg)
    again = step1(cfg, split, store)
    saved = torch.load(store.shared("backbone.pt"), weights_only=True)
    assert all(torch.equal(v, again.backbone.state_dict()[k]) for k, v in saved.items())
    # A changed setting gets a different store: never a stale artefact.
    assert ArtefactStore(load_config("tiny", {"pretrain.epochs": 1, "results_root": str(cfg.results_root)})).key \
        != store.key


def test_entity_pool_is_poisoned_features_with_its_labels(tiny_run):
    cfg, _ = tiny_run
    split = load_task(cfg)
    store = ArtefactStore(cfg)
    shared = step1(cfg, split, store)
    entity = Entity("S", split.S.train_images, split.S.train_labels, store)
    entity.train_dpm(shared, cfg, seed=0)  # loaded from its private store
    pool = entity.poisoned_pool()
    assert pool.features.shape == entity.features.shape
    assert not torch.allclose(pool.features, entity.features)
    assert (pool.labels == split.S.train_labels).all()


def test_table3_reports_both_x_dpm_readings_and_figure6(tiny_run):
    """Table 3 scores X+DPM with the DPM trained on unperturbed features and with one trained after X;
    Figure 6 shows ψ under each operation. The extra DPMs stay private."""
    cfg, _ = tiny_run
    reproduce(cfg, ["table3", "figure6"])
    out = cfg.results_dir() / "reproduce" / "tiny"
    table = pd.read_csv(out / "table3.csv")
    by_name = table.set_index("poisoning")
    for x in ("GN", "GF", "MF"):
        plain, trained = by_name.loc[[f"{x}+DPM", f"{x}+DPM (trained after {x})"]].to_dict("records")
        assert plain["top1"] != trained["top1"] or plain["ssim"] != trained["ssim"]  # two DPMs, two figures
    assert table.loc[table.poisoning == "GF+DPM (trained after GF)", "paper top1"].item() == 78.77
    assert (out / "figure6.png").is_file()
    store = ArtefactStore(cfg)
    assert len(list((store.root / "private" / "S").glob("dpm-after-*.pt"))) == 3
    assert not list((store.root / "shared").glob("dpm-*"))
