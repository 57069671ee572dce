"""Unit tests of the core library: split identity, shapes, registries, metrics, shards, configs, errors."""

from __future__ import annotations

import contextlib

import pytest
import torch

from entities.backbone import build_backbone
from entities.config import parse_overrides
from entities.dpm import DeepPoisoningModule, ssim_privacy_loss
from entities.metrics import l1_per_image, psnr_per_image, ssim_per_image, topk_correct
from entities.presets import load_config
from entities.reconstructors import RECONSTRUCTORS, build_reconstructor
from entities.train import fit, folded


@pytest.mark.parametrize("name,size,hook", [("resnet20", 32, "conv4_1"), ("resnet32", 32, "conv3_2"),
                                            ("resnet18", 64, "conv4_1")])
def test_split_identity(name, size, hook):
    torch.manual_seed(0)
    model = build_backbone(name, 5).eval()
    x = torch.rand(4, 3, size, size)
    phi1, phi2 = model.split(hook)
    with torch.no_grad():
        assert torch.allclose(phi2(phi1(x)), model(x), atol=1e-5)


def test_folded_phi1_is_the_same_function_without_batchnorm():
    """The copy the optimize attacker searches through: every BatchNorm folded away, same output and input
    gradient as φ1 in eval mode, φ1 itself untouched."""
    torch.manual_seed(0)
    phi1, _ = build_backbone("resnet20", 5).split("conv4_1")
    for bn in (m for m in phi1.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # as after training
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.5)
    phi1.eval()
    fused = folded(phi1)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in phi1.modules())
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    want = phi1(x)
    (grad_want,) = torch.autograd.grad(want.pow(2).sum(), x)
    got = fused(x)
    (grad_got,) = torch.autograd.grad(got.pow(2).sum(), x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(grad_got, grad_want, atol=1e-5 * grad_want.abs().max().item())


def test_conv4_1_feature_shape_matches_paper_stage():
    model = build_backbone("resnet20", 5).eval()
    phi1, _ = model.split("conv4_1")
    assert phi1(torch.rand(2, 3, 32, 32)).shape == (2, 64, 8, 8)
    # torchvision ResNet at 224 px: conv4_1 gives the paper's 14x14 maps.
    phi1, _ = build_backbone("resnet18", 5).eval().split("conv4_1")
    assert phi1(torch.rand(1, 3, 224, 224)).shape[-2:] == (14, 14)


def test_unknown_hook_and_backbone_list_the_valid_names():
    model = build_backbone("resnet20", 5)
    with pytest.raises(ValueError, match="conv4_1"):
        model.split("conv9_9")
    with pytest.raises(ValueError, match="resnet20"):
        build_backbone("alexnet", 5)


@pytest.mark.parametrize("name", sorted(RECONSTRUCTORS))
def test_every_reconstructor_maps_features_to_images_in_unit_range(name):
    psi = build_reconstructor(name, (64, 8, 8), (3, 32, 32)).eval()
    out = psi(torch.randn(3, 64, 8, 8))
    assert out.shape == (3, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 1
    if not RECONSTRUCTORS[name].clamp:  # min-max normalisation spans [0, 1] per image
        assert torch.allclose(out.flatten(1).amax(1), torch.ones(3), atol=1e-4)


def test_reconstructor_registry_has_the_papers_six_and_rejects_others():
    assert set(RECONSTRUCTORS) == {"px2s2", "px4s2", "rx2s2", "rx4s2", "rx4s4", "rx2s2_c"}
    with pytest.raises(ValueError, match="px2s2"):
        build_reconstructor("gan", (64, 8, 8), (3, 32, 32))
    with pytest.raises(ValueError, match="cannot upscale"):
        build_reconstructor("rx4s4", (64, 16, 16), (3, 32, 32))


def test_dpm_keeps_shape_and_rejects_other_features():
    dpm = DeepPoisoningModule(64, blocks=4)
    f = torch.randn(2, 64, 8, 8)
    assert dpm(f).shape == f.shape
    with pytest.raises(ValueError, match="64-channel"):
        dpm(torch.randn(2, 32, 16, 16))


def test_identity_dpm_starts_as_the_identity_on_post_relu_features():
    f = torch.relu(torch.randn(8, 64, 8, 8))
    assert torch.equal(DeepPoisoningModule(64, blocks=4, init="identity").train()(f), f)
    assert not torch.allclose(DeepPoisoningModule(64, blocks=4).train()(f), f)
    with pytest.raises(ValueError, match="identity"):
        DeepPoisoningModule(64, init="zeros")


def test_ssim_sanity():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(ssim_per_image(x, x), torch.ones(4), atol=1e-5)
    smooth = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert (ssim_per_image(1 - smooth, smooth) < 0).all()  # a negative is anti-correlated structure
    noise = torch.rand(4, 3, 32, 32)
    assert ssim_per_image(noise, x).abs().max() < 0.1
    assert torch.allclose(l1_per_image(x, x), torch.zeros(4))
    assert (psnr_per_image(x, x) == 100).all()
    assert torch.allclose(psnr_per_image(x, (x + 0.1)), torch.full((4,), 20.0), atol=0.01)


@pytest.mark.parametrize("shape,size", [((4, 64, 8, 8), (16, 16)), ((4, 64, 8, 8), (32, 32)),
                                        ((4, 16, 7, 5), (28, 20)), ((4, 16, 8, 8), (8, 8))])
def test_decoder_bilinear_is_torchs(shape, size):
    """The decoder's resizing by matrix products is F.interpolate's, value and gradient, channels-last or not."""
    from entities.decoders import bilinear

    torch.manual_seed(0)
    for x in (torch.randn(shape), torch.randn(shape).contiguous(memory_format=torch.channels_last)):
        x.requires_grad_(True)
        ours = bilinear(x, size)
        torchs = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        weights = torch.randn_like(torchs)
        (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
        (grad_torchs,) = torch.autograd.grad((torchs * weights).sum(), x)
        assert ours.shape == torchs.shape
        assert torch.allclose(ours, torchs, atol=1e-5)
        assert torch.allclose(grad_ours, grad_torchs, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 3, 32, 32), (6, 1, 64, 48), (6, 1, 8, 8)])  # CIFAR, faces, digits
def test_ssim_is_pytorch_msssims(shape):
    """The window-matrix SSIM is pytorch-msssim's, value and gradient (an axis under the window unfiltered)."""
    from pytorch_msssim import ssim

    torch.manual_seed(0)
    y = torch.nn.functional.avg_pool2d(torch.rand(shape), 3, 1, 1)
    x = (y + 0.1 * torch.randn(shape)).clamp(0, 1).requires_grad_(True)
    ours = ssim_per_image(x, y)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    with pytest.warns(UserWarning) if shape[-1] < 11 else contextlib.nullcontext():
        theirs = ssim(x, y, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), x)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert (grad_ours - grad_theirs).abs().max() <= 1e-5 * grad_theirs.abs().max()


def test_privacy_loss_is_zero_only_when_both_direct_and_inverted_ssim_are_not_positive():
    torch.manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(4, 3, 32, 32), 3, 1, 1)
    assert ssim_privacy_loss(x, x) > 0.9  # a perfect reconstruction costs the most
    assert ssim_privacy_loss(1 - x, x) > 0.9  # and so does its photographic negative
    assert ssim_privacy_loss(torch.rand(4, 3, 32, 32), x) < 0.1


def test_topk_correct_caps_k_at_class_count():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05]])
    y = torch.tensor([1, 2])
    assert topk_correct(logits, y, 1).tolist() == [True, False]
    assert topk_correct(logits, y, 5).tolist() == [True, True]


def test_nan_loss_names_what_and_where():
    w = torch.nn.Parameter(torch.ones(1))

    def step(idx):
        return w * float("nan"), {}

    with pytest.raises(FloatingPointError, match=r"E2 dpm: .* epoch 1, batch 1/"):
        fit([w], step, n=10, epochs=1, batch_size=5, lr=0.1, what="E2 dpm")


def test_config_presets_overrides_and_errors():
    cfg = load_config("default")
    assert cfg.backbone.hook == "conv4_1" and cfg.dpm.lam == 1.0
    tiny = load_config("tiny", parse_overrides(["dpm.lam=0.5", "data.task_classes=[1,2]", "data.seed=3"]))
    assert tiny.dpm.lam == 0.5 and tiny.data.task_classes == [1, 2] and tiny.data.seed == 3
    assert tiny.data.max_task_train < cfg.data.max_task_train  # extends default, changes a few values
    assert tiny.digest("dpm") != cfg.digest("dpm")
    with pytest.raises(ValueError, match="unknown setting"):
        load_config("default", {"dpm.lambda": 1})
    with pytest.raises(ValueError, match="known presets"):
        load_config("no-such-preset")
    with pytest.raises(ValueError, match="dpm.init 'zeros'"):
        load_config("default", {"dpm.init": "zeros"})
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["lam"])


def test_perturbation_registry_keeps_shape_and_changes_features():
    from entities.perturbations import PERTURBATIONS, build_perturbation

    torch.manual_seed(0)
    f = torch.randn(2, 64, 8, 8)
    for name in PERTURBATIONS:
        out = build_perturbation(name)(f)
        assert out.shape == f.shape and not torch.allclose(out, f), name
    const = torch.ones(1, 4, 8, 8)
    assert torch.allclose(build_perturbation("MF")(const), const)  # filters are normalised
    assert build_perturbation("GF")(f).std() < f.std()  # blurring removes high frequencies
    with pytest.raises(ValueError, match="GN"):
        build_perturbation("JPEG")


@pytest.mark.slow
def test_pretraining_killed_mid_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import numpy as np

    import entities.train as train
    from entities.config import TrainConfig

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 3, 64)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, augment=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order in all three runs
    try:
        torch.manual_seed(0)
        whole = build_backbone("resnet20", 3)
        train.pretrain(whole, images, labels, cfg)

        calls, real_augment = [], train.augment

        def dies_in_epoch_2(x):
            calls.append(1)
            if len(calls) == 3:  # first batch of epoch 2 (two batches per epoch)
                raise KeyboardInterrupt
            return real_augment(x)

        ckpt = tmp_path / "partial.pt"
        torch.manual_seed(0)
        killed = build_backbone("resnet20", 3)
        monkeypatch.setattr(train, "augment", dies_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            train.pretrain(killed, images, labels, cfg, checkpoint=ckpt)
        assert torch.load(ckpt, weights_only=True)["epoch"] == 1
        monkeypatch.setattr(train, "augment", real_augment)
        torch.manual_seed(123)  # a fresh process: other weights and random state until the checkpoint loads
        resumed = build_backbone("resnet20", 3)
        history = train.pretrain(resumed, images, labels, cfg, checkpoint=ckpt)
    finally:
        torch.set_num_threads(threads)
    assert len(history) == 3
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_set_refuses_a_positional_argument_instead_of_swallowing_it(capsys):
    import argparse

    from sim.cli import add_config_args

    parser = argparse.ArgumentParser()
    parser.add_argument("experiments", nargs="*")
    add_config_args(parser)
    args = parser.parse_args(["table1", "--set", "dpm.lam=0.5", "threads=1"])
    assert args.experiments == ["table1"] and args.set == ["dpm.lam=0.5", "threads=1"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--set", "dpm.lam=0.5", "table1"])
    assert "'table1' is not KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["reproduce", "table5", "attack", "run", "mdp"])
def test_every_command_spells_the_shared_options_alike_and_shows_defaults(command, capsys, monkeypatch):
    import importlib
    import re

    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: argparse would wrap inside hyphenated names
    with pytest.raises(SystemExit):
        importlib.import_module(f"sim.{command}").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--results-root DIR" in text and "presets: attack-tiny, collab" in text and "(default: " in text
    assert ("--run-name NAME" in text) == (command != "mdp")  # mdp's folders are its data sets' presets
    assert not re.search(r"--run\b(?!-)", text) and "(default: None)" not in text


def test_results_root_option_is_the_setting_made_absolute(tmp_path, monkeypatch):
    import argparse

    from sim.cli import add_config_args, config_from_args, run_name

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args(["--config", "tiny", "--results-root", "out", "--run-name", "x1"]))
    assert cfg.results_dir() == tmp_path / "out"
    given = config_from_args(parser.parse_args(["--config", "tiny", "--set", f"results_root={tmp_path}/set"]))
    assert given.results_dir() == tmp_path / "set"  # --set still counts when the option is absent
    assert run_name(parser.parse_args(["--run-name", "x1"]), "tiny") == "x1"
    assert run_name(parser.parse_args([]), "tiny") == "tiny"
    with pytest.raises(ValueError, match="run-name .* is not a plain folder name"):
        run_name(parser.parse_args(["--run-name", "../up"]), "tiny")
