"""The runtime module: settings resolve, errors name the setting, bf16 keeps fp32 where it must."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entities import runtime
from entities.backbone import build_backbone
from entities.config import TrainConfig
from entities.metrics import ssim_per_image
from entities.presets import load_config
from entities.runtime import Runtime
from entities.train import evaluate_classifier, extract_features, pretrain


@pytest.fixture
def restore_runtime():
    before = runtime.current()
    yield
    runtime.use(before)


def test_settings_resolve_and_auto_follows_the_cpu_flags(monkeypatch):
    assert runtime.resolve("cpu", "fp32") == Runtime(torch.device("cpu"), "fp32")
    assert runtime.resolve("cpu", "bf16").precision == "bf16"
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    assert runtime.resolve("cpu", "auto").precision == "bf16"
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda: ())
    assert runtime.resolve("cpu", "auto").precision == "fp32"
    if not torch.cuda.is_available():
        assert runtime.resolve("auto", "fp32").device.type == "cpu"


def test_cuda_without_a_gpu_is_a_clear_error_naming_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(runtime.RuntimeSettingError, match="device = 'cuda'.*no CUDA GPU"):
        runtime.resolve("cuda", "auto")
    cfg = load_config("tiny", {"device": "cuda"})  # loading is fine: the aggregator may have no GPU
    with pytest.raises(ValueError, match="device = 'cuda'"):
        runtime.configure(cfg)


def test_unknown_values_are_refused_when_the_config_is_read():
    with pytest.raises(ValueError, match="unknown precision 'fp8'.*auto, bf16, fp32"):
        load_config("tiny", {"precision": "fp8"})
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        load_config("tiny", {"device": "tpu"})


def test_precision_is_part_of_every_artefact_key_and_fp32_keys_stay_as_they_were():
    fp32, bf16 = load_config("tiny", {"precision": "fp32"}), load_config("tiny", {"precision": "bf16"})
    assert fp32.digest("data", "backbone", "pretrain") != bf16.digest("data", "backbone", "pretrain")
    assert fp32.digest("dpm", "reconstructor") != bf16.digest("dpm", "reconstructor")
    # fp32 adds nothing to the key, so stores made before precision existed are still found
    assert runtime.key_part("cpu", "fp32") == {}
    assert runtime.key_part("cpu", "bf16") == {"precision": "bf16"}


def test_ssim_stays_fp32_inside_a_bf16_autocast_region():
    x = torch.rand(4, 3, 32, 32)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ssim_per_image(x, y)
    assert inside.dtype == torch.float32
    assert torch.allclose(inside, ssim_per_image(x, y))


def test_bf16_loops_learn_and_return_fp32_cpu_tensors(restore_runtime):
    """A short bf16 pretraining on a separable toy task learns it; what loops return is fp32 and
    contiguous on the CPU, as the stores and the Flower records expect."""
    g = torch.Generator().manual_seed(0)
    labels = np.arange(256) % 2
    images = (torch.rand(256, 3, 32, 32, generator=g) * 80).to(torch.uint8)
    images[labels == 1, 0] += 150  # class 1 has a bright red channel
    runtime.use(Runtime(torch.device("cpu"), "bf16"))
    torch.manual_seed(0)
    model = build_backbone("resnet20", 2)
    pretrain(model, images.numpy(), labels, TrainConfig(epochs=4, batch_size=32, lr=0.05, augment=False))
    assert evaluate_classifier(model, images.numpy(), labels)["top1"] > 90
    phi1, _ = model.split("conv4_1")
    feats = extract_features(phi1, images.numpy()[:10])
    assert feats.dtype == torch.float32 and feats.device.type == "cpu" and feats.is_contiguous()
    assert all(p.dtype == torch.float32 for p in model.parameters())
