"""Mapping Distortion Protection on small real data (CIFAR-10 from ../shared/data, else digits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from entities.backbone import build_backbone
from entities.config import MDPConfig, TrainConfig
from entities.data import DataError, find_archive, load_dataset_or_fallback
from entities.mdp import (
    LEVEL,
    MDPError,
    build_augmented_set,
    build_modified_set,
    feature_fn,
    select_images,
    ssim_to,
)
from entities.train import pretrain, to_float

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    ds = load_dataset_or_fallback("cifar10")
    rows = np.random.default_rng(0).choice(len(ds.train_labels), 240, replace=False)
    return ds.train_images[rows], ds.train_labels[rows]


@pytest.fixture(scope="module")
def model(data):
    """A ResNet-20 trained briefly on 200 real images: MDP needs a trained f."""
    images, labels = data
    torch.manual_seed(0)
    net = build_backbone("resnet20", 10)
    pretrain(net, images[:200], labels[:200], TrainConfig(epochs=2, batch_size=50, lr=0.05))
    return net


def test_pgd_pulls_features_to_target_while_image_stays_the_selected_one(model, data):
    images, labels = data
    x, y = images[:40], labels[:40]
    cfg = MDPConfig(steps=30, step_size=0.5, batch_size=20)
    m = build_modified_set(model, x, y, cfg, seed=3)
    assert m.images.dtype == torch.float16 and m.images.shape == (40, *x.shape[1:])
    assert np.array_equal(m.target_index, np.arange(40)) and np.array_equal(m.labels, y)
    assert (m.selected_index != m.target_index).all()
    assert np.array_equal(m.original_labels, y[m.selected_index])
    assert m.distance_end.mean() < 0.8 * m.distance_start.mean()
    img = m.images.float()
    assert img.min() >= 0 and img.max() <= 1
    change = (img - to_float(x[m.selected_index])).abs().max().item()
    assert 0 < change <= cfg.steps * cfg.step_size * LEVEL + 1e-3
    assert ssim_to(m, x, "selected").mean() > 0.8
    assert ssim_to(m, x, "selected").mean() > ssim_to(m, x, "target").mean() + 0.3
    again = build_modified_set(model, x, y, cfg, seed=3)
    assert torch.equal(again.images, m.images)  # seeded selection, deterministic PGD


def test_epsilon_ball_bounds_the_change(model, data):
    images, labels = data
    cfg = MDPConfig(steps=10, step_size=1.0, epsilon=2.0, batch_size=20)
    m = build_modified_set(model, images[:20], labels[:20], cfg)
    change = (m.images.float() - to_float(images[m.selected_index])).abs().max().item()
    assert 1.5 * LEVEL < change <= 2 * LEVEL + 1e-3


def test_l2_steps_of_the_authors_code_bound_each_images_path(model, data):
    images, labels = data
    x, y = images[:20], labels[:20]
    cfg = MDPConfig(steps=10, step_size=0.2, norm="l2", batch_size=20)
    m = build_modified_set(model, x, y, cfg, seed=1)
    moved = torch.linalg.vector_norm((m.images.float() - to_float(x[m.selected_index])).flatten(1), dim=1)
    assert (moved > 0.2).all() and (moved <= cfg.steps * cfg.step_size + 1e-2).all()
    assert m.distance_end.mean() < m.distance_start.mean()
    ball = build_modified_set(model, x, y, MDPConfig(steps=10, step_size=0.2, norm="l2", epsilon=0.3,
                                                     batch_size=20), seed=1)
    moved = torch.linalg.vector_norm((ball.images.float() - to_float(x[ball.selected_index])).flatten(1), dim=1)
    assert (moved <= 0.3 + 1e-2).all() and moved.max() > 0.25
    with pytest.raises(MDPError, match="unknown MDP norm 'l1'"):
        build_modified_set(model, x, y, MDPConfig(steps=1, norm="l1"))


def test_selection_is_seeded_and_never_the_target():
    a, b = select_images(500, 0), select_images(500, 1)
    assert np.array_equal(a, select_images(500, 0)) and not np.array_equal(a, b)
    assert (a != np.arange(500)).all() and a.min() >= 0 and a.max() < 500
    assert len(np.unique(a)) > 250  # spread over the set, not a fixed offset


def test_augmdp_is_the_union_of_draws_with_different_selections(model, data):
    images, labels = data
    x, y = images[:30], labels[:30]
    cfg = MDPConfig(steps=2, batch_size=30)
    aug = build_augmented_set(model, x, y, cfg, seed=5, rounds=3)
    assert len(aug) == 90 and sorted(set(aug.draw.tolist())) == [0, 1, 2]
    first = build_modified_set(model, x, y, cfg, seed=5)
    assert torch.equal(aug.of_draw(0).images, first.images)
    assert not np.array_equal(aug.of_draw(0).selected_index, aug.of_draw(1).selected_index)
    assert np.array_equal(aug.of_draw(2).labels, y)


def test_resume_continues_and_refuses_other_settings(model, data, tmp_path):
    images, labels = data
    x, y = images[:50], labels[:50]
    cfg = MDPConfig(steps=3, batch_size=20)
    full = build_modified_set(model, x, y, cfg, seed=1, out_dir=tmp_path)
    batches = sorted(tmp_path.glob("batch-*.pt"))
    assert len(batches) == 3
    batches[2].unlink()  # an interrupted run: the last batch never finished
    kept = {p: p.stat().st_mtime_ns for p in batches[:2]}
    resumed = build_modified_set(model, x, y, cfg, seed=1, out_dir=tmp_path)
    assert torch.equal(resumed.images, full.images)
    assert np.array_equal(resumed.selected_index, full.selected_index)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # reused, not recomputed
    with pytest.raises(MDPError, match="other settings.*steps: stored 3, now 4.*3 finished batch"):
        build_modified_set(model, x, y, MDPConfig(steps=4, batch_size=20), seed=1, out_dir=tmp_path)
    other = build_backbone("resnet20", 10)
    with pytest.raises(MDPError, match="model"):
        build_modified_set(other, x, y, cfg, seed=1, out_dir=tmp_path)
    assert len(list(tmp_path.glob("batch-*.pt"))) == 3  # finished batches kept


def test_bad_input_gives_clear_errors(model, data):
    images, labels = data
    x, y = images[:10], labels[:10]
    with pytest.raises(MDPError, match="unknown MDP layer 'conv9_9'.*penultimate, logits, conv1"):
        build_modified_set(model, x, y, MDPConfig(layer="conv9_9", steps=1))
    with pytest.raises(MDPError, match="T >= 1"):
        build_augmented_set(model, x, y, MDPConfig(steps=1), rounds=0)
    with pytest.raises(MDPError, match=r"\[0, 1\]"):
        build_modified_set(model, to_float(x) * 255, y, MDPConfig(steps=1))
    with pytest.raises(MDPError, match="labels"):
        build_modified_set(model, x, y[:5], MDPConfig(steps=1))
    hooked = build_modified_set(model, x, y, MDPConfig(layer="conv3_1", steps=2))
    assert hooked.distance_end.mean() < hooked.distance_start.mean()
    assert feature_fn(model, "logits")(to_float(x)).shape == (10, 10)


def test_vgg_backbone_splits_and_has_penultimate_features():
    net = build_backbone("vgg11-half", 7)
    x = torch.rand(2, 3, 32, 32)
    assert net(x).shape == (2, 7) and net.penultimate(x).shape == (2, 256)
    phi1, phi2 = net.split("conv4_1")
    assert torch.allclose(phi2(phi1(x)), net(x))


def _need_archive():
    try:
        find_archive("cifar10")
    except DataError:
        pytest.skip("needs the CIFAR-10 archive in ../shared/data")


@pytest.mark.slow  # trains on real data in its body
def test_reproduce_command_writes_tables_and_figure(tmp_path):
    _need_archive()
    from sim.mdp import main

    main(["reproduce", "--config", "mdp-tiny", "--faces-config", "", "--set", "threads=1",
          f"results_root={tmp_path}"])
    out = tmp_path / "mdp" / "mdp-tiny"
    import pandas as pd

    t1 = pd.read_csv(out / "table1.csv")
    assert t1["data set"].str.contains("CIFAR-10").all() and len(t1) == 1
    assert t1["ours MDP"].between(0, 100).all() and (t1["paper MDP"] == 85.52).all()
    t2 = pd.read_csv(out / "table2.csv")
    assert list(t2["architecture"]) == ["resnet20", "vgg11-half", "ResNet-50 (paper)", "ResNet-154 (paper)",
                                        "DenseNet-154 (paper)"]
    assert t2["paper trained on MDP set"][:2].isna().all() and t2["ours trained on MDP set"][2:].isna().all()
    ssim = pd.read_csv(out / "ssim.csv")
    assert ssim["ours SSIM(selected, modified), MDP"][0] > 0.95  # 3 PGD steps barely change the selected image
    png = out / "figure4.png"
    assert png.is_file() and png.stat().st_size < 1_000_000
    with pytest.raises(MDPError, match="other settings"):  # same store, changed PGD settings
        main(["reproduce", "--config", "mdp-tiny", "--faces-config", "", "--set", "threads=1",
              "mdp.steps=4", f"results_root={tmp_path}"])


@pytest.mark.slow  # trains on real data in its body
def test_compare_command_scores_every_sharing_mode(tmp_path):
    _need_archive()
    from sim.mdp import main

    preset = tmp_path / "compare-tiny.toml"
    preset.write_text(
        'extends = "mdp-collab"\n[data]\nmax_task_train = 400\nmax_public_train = 300\nmax_test = 200\n'
        "shard_fractions = [0.25, 0.25, 0.25, 0.1]\n[pretrain]\nepochs = 1\n[reconstructor]\nepochs = 1\n"
        "[dpm]\nepochs = 1\n[decider]\nepochs = 1\n[mdp]\nsteps = 2\nbatch_size = 50\n"
    )
    main(["compare", "--config", str(preset), "--set", "threads=1", f"results_root={tmp_path}"])
    import pandas as pd

    df = pd.read_csv(tmp_path / "mdp" / "compare-tiny" / "compare.csv").set_index("shared by E2..En")
    assert list(df.index) == ["nothing (E1 alone)", "raw images", "MDP", "AugMDP(2)", "DPM pools"]
    shows = df["SSIM(shared, a real image it shows)"]
    assert shows["raw images"] == pytest.approx(1.0)
    assert shows["MDP"] > 0.95 and shows["DPM pools"] < 0.5  # MDP shows a real image; DPM does not
    assert df.loc["MDP", "SSIM(shared, image of its label)"] < 0.5
    assert df.loc["AugMDP(2)", "items shared"] == 2 * df.loc["MDP", "items shared"] == 2 * 240
    assert df["E1 top-1 (%)"].between(0, 100).all()


def test_table2_pairs_paper_figures_by_architecture_not_by_position():
    from sim.mdp import table2_frame

    readings = {"linf": {"pgd": "ℓ∞", "top1": {"MDP": 20.0}}, "l2": {"pgd": "ℓ2", "top1": {"MDP": 30.0}}}
    c10 = {"dataset": "cifar10", "arch": "resnet20", "original_top1": 50.0, "readings": readings,
           "crafter": {"top1": 90.0},
           "transfer": {"resnet56": {"original": 40.0, "linf": 15.0, "l2": 10.0},
                        "resnet154": {"original": 45.0, "linf": 18.0, "l2": 9.0}}}
    t2 = table2_frame(c10)
    assert list(t2["PGD"][:6]) == ["ℓ∞", "ℓ2"] * 3  # one row per architecture and reading
    t2 = t2[t2["PGD"] != "ℓ2"].set_index("architecture")
    assert np.isnan(t2.loc["resnet56", "paper trained on MDP set"])  # never beside the paper's ResNet-154
    assert t2.loc["resnet154", "paper trained on MDP set"] == 86.08 and "ResNet-154 (paper)" not in t2.index
    assert np.isnan(t2.loc["resnet20", "paper trained on MDP set"])  # crafting, but not the paper's ResNet-50
    assert t2.loc["resnet56", "ours retained (%)"] == pytest.approx(100 * 15 / 40)
    paper_only = t2.loc["ResNet-50 (paper)"]
    assert paper_only["role"] == "crafting" and np.isnan(paper_only["ours trained on MDP set"])
    faces = table2_frame({**c10, "dataset": "lfw", "transfer": {}})
    assert "IR-152 (paper)" in set(faces["architecture"])  # faces meet the paper's face column


def test_full_preset_is_the_issues_scale_and_pairs_its_faces():
    from entities.presets import load_config
    from sim.mdp import crafter_key, readings

    full = load_config("mdp-full")
    assert full.mdp.crafter == "all" and full.crafter.images == 0  # f learns all 50,000 training images
    assert full.data.max_task_train >= 10_000 and full.data.max_test == 0 and full.data.public_classes == []
    assert [r.mdp.norm for r in readings(full)] == ["linf", "l2"] and all(not r.mdp.readings for r in readings(full))
    assert any(a.startswith("resnet") for a in full.mdp.transfer) and "vgg11-half" in full.mdp.transfer
    faces = load_config("mdp-full-faces")
    assert faces.data.dataset == "lfw" and faces.data.max_task_train == 0 and faces.mdp.readings == ["linf", "l2"]
    # f's key holds what f learns from, never D: every D and test cap reuses the one model
    assert crafter_key(full) == crafter_key(load_config("mdp-full", {"data.max_task_train": 2000, "data.max_test": 9}))
    assert crafter_key(full) != crafter_key(load_config("mdp-full", {"crafter.epochs": 39}))
    assert crafter_key(full) != crafter_key(load_config("mdp-full", {"data.seed": 1}))
    with pytest.raises(ValueError, match="mdp.readings"):
        load_config("mdp-full", {"mdp.readings": ["linf", "l3"]})


@pytest.mark.slow  # trains on real data in its body
def test_reproduce_crafts_with_a_model_of_more_images_under_both_readings(tmp_path, monkeypatch):
    """f trained on 600 training images (not D's 120) crafts both readings' sets; ``scale`` then
    finds every model ``reproduce`` stored, so its figures for that cell are Table 1's."""
    _need_archive()
    import pandas as pd

    import sim.mdp as mdp

    args = ["--config", "mdp-tiny", "--faces-config", "", "--set", "threads=1", "mdp.crafter=all",
            "crafter.images=600", "crafter.epochs=2", 'mdp.readings=["linf", "l2"]', f"results_root={tmp_path}"]
    mdp.main(["reproduce", *args])
    out = tmp_path / "mdp" / "mdp-tiny"
    figures = json.loads((out / "figures.json").read_text())["figures"]
    assert figures["crafter"]["trained_on"] == "all" and figures["crafter"]["images"] == 600
    t1 = pd.read_csv(out / "table1.csv")
    assert len(t1) == 2 and t1["PGD"].str.contains("ℓ∞").sum() == 1 and t1["PGD"].str.contains("ℓ2").sum() == 1
    assert (t1["crafting top-1"] == figures["crafter"]["top1"]).all()
    assert t1["crafting model"].str.contains("600 training images").all()
    assert np.allclose(t1["ours MDP retained (%)"], 100 * t1["ours MDP"] / t1["ours original"])
    linf, l2 = (figures["readings"][n] for n in ("linf", "l2"))
    assert linf["max_abs_change"] <= 3 * 0.1 / 255 + 1e-3 < l2["max_abs_change"]  # each reading's own PGD
    assert (out / "figure4-linf.png").is_file() and (out / "figure4-l2.png").is_file()
    t2 = pd.read_csv(out / "table2.csv")
    assert (t2["architecture"] == "vgg11-half").sum() == 2  # one transfer row per reading
    curves = set(pd.read_csv(out / "curves.csv")["model"])
    assert {"crafting model: resnet20 on 600 training images, 2 epochs", "resnet20 on MDP, l2",
            "vgg11-half on MDP, linf", "resnet20 on original"} <= curves

    monkeypatch.setattr(mdp, "SCALE_GRID", [(60, "D"), (60, "all"), (0, "D"), (0, "all")])
    mdp.main(["scale", *args])
    scale = pd.read_csv(out / "scale.csv")
    assert list(scale["D images"]) == [60, 60, 120, 120] * 2
    cell = scale[(scale["D images"] == 120) & scale["crafting model"].str.contains("600")]
    for _, row in cell.iterrows():
        assert row["ours MDP"] == t1.set_index("PGD").loc[row["PGD"], "ours MDP"]
        assert row["ours original"] == t1["ours original"][0]
    assert (scale["retained gain over the first row (points)"][[0, 4]] == 0).all()
