"""Table 4's parts: CelebA's attribute loader, the mAP metric, the adversarial obfuscator and the command.

The loader is checked on a small archive in CelebA's own format built here (so it runs without
../shared), and on the real CelebA-10k where it is present; the obfuscator's training step on a few
hundred real faces (skipped without the archive).
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from entities import data, runtime
from entities.backbone import build_backbone
from entities.data import load_celeba, split_attributes
from entities.entity import Entity
from entities.metrics import average_precision, mean_average_precision
from entities.obfuscator import DeepObfuscator, Obfuscator, ObfuscatorSettings, train_obfuscator
from entities.pipeline import ArtefactStore, entity_shards, load_task
from entities.presets import load_config
from entities.reconstructors import build_reconstructor
from entities.sharing import contribute, step1
from entities.train import extract_features
from sim.reproduce import reproduce
from strategies.records import pack_shared, unpack_shared

HAVE_CELEBA = any((root / data.ARCHIVES["celeba"]).is_file() for root in data.data_roots())
needs_celeba = pytest.mark.skipif(not HAVE_CELEBA, reason="../shared/data/celeba-10k.tar.gz is not present")
NAMES = [f"attr{i:02d}" for i in range(40)]


def _tiny_celeba(folder, signs: np.ndarray) -> None:
    """An archive laid out like celeba-10k.tar.gz: 89x109 JPEGs and the ±1 attribute list."""
    with tarfile.open(folder / "celeba-10k.tar.gz", "w:gz") as tar:
        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        lines = [str(len(signs)), " ".join(NAMES)]
        for i, row in enumerate(signs, start=1):
            buf = io.BytesIO()
            Image.new("RGB", (89, 109), (i * 20 % 256, 100, 50)).save(buf, "JPEG")
            add(f"celebA/{i:06d}.jpg", buf.getvalue())
            lines.append(f"{i:06d}.jpg  " + " ".join(f"{v:2d}" for v in row))
        add("list_attr_celeba_first20000.txt", "\n".join(lines).encode())


def test_attribute_loader_reads_plus_minus_one_as_binary_and_splits_20_20(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONPOOL_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    signs = rng.choice([-1, 1], size=(10, 40))
    signs[:, 0] = [1, -1] * 5  # both classes of attribute 0, which the train/test split stratifies on
    _tiny_celeba(tmp_path, signs)
    ds = load_celeba(tmp_path, size=16)
    assert ds.train_images.shape[1:] == (3, 16, 16) and ds.attribute_names == NAMES
    assert len(ds.train_attributes) + len(ds.test_attributes) == 10
    assert ds.train_attributes.shape[1] == 40 and set(np.unique(ds.train_attributes)) <= {0, 1}
    # each image's row is its own: the red channel encodes the file number
    for images, attrs in ((ds.train_images, ds.train_attributes), (ds.test_images, ds.test_attributes)):
        for img, row in zip(images, attrs):
            number = next(i for i in range(1, 11) if abs(int(img[0].mean()) - i * 20 % 256) <= 3)
            assert (row == (signs[number - 1] > 0)).all()
    assert (ds.train_labels == ds.train_attributes[:, 0]).all()  # the binary label stays attribute 0
    split = split_attributes(ds.train_attributes, ds.attribute_names, 20)
    assert split.utility.shape[1] == split.private.shape[1] == 20
    assert split.utility_names == NAMES[:20] and split.private_names == NAMES[20:]
    assert (np.concatenate([split.utility, split.private], 1) == ds.train_attributes).all()
    with pytest.raises(ValueError, match="table4.utility_attributes"):
        split_attributes(ds.train_attributes, NAMES, 40)


@needs_celeba
def test_real_celeba_has_the_papers_attribute_split():
    ds = load_celeba(size=32)
    assert ds.train_attributes.shape == (8000, 40) and ds.test_attributes.shape == (2000, 40)
    split = split_attributes(ds.train_attributes, ds.attribute_names, 20)
    assert split.utility_names[0] == "5_o_Clock_Shadow" and split.utility_names[-1] == "High_Cheekbones"
    assert split.private_names[0] == "Male" and split.private_names[-1] == "Young"
    assert 0.3 < split.private[:, 0].mean() < 0.6  # Male: about 42% of CelebA


def test_mean_average_precision_against_a_hand_computed_case():
    scores = torch.tensor([[0.9, 0.4, 0.2], [0.8, 0.3, 0.1], [0.7, 0.2, 0.5], [0.6, 0.1, 0.9]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0]])
    # attribute 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; attribute 1: ranks 3, 4 -> (1/3 + 2/4) / 2;
    # attribute 2 has no positive: NaN, left out of the mean.
    ap = average_precision(scores, targets)
    assert ap[0].item() == pytest.approx(5 / 6) and ap[1].item() == pytest.approx(5 / 12)
    assert torch.isnan(ap[2])
    assert mean_average_precision(scores, targets) == pytest.approx(100 * (5 / 6 + 5 / 12) / 2)
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    s, t = rng.random((60, 4)), rng.random((60, 4)) < 0.3
    np.testing.assert_allclose(average_precision(torch.tensor(s), torch.tensor(t)).numpy(),
                               sklearn.average_precision_score(t, s, average=None), rtol=1e-5)


def _obfuscator_run(feats, images, split, phi2, weights: float, epochs: int = 3):
    torch.manual_seed(0)
    deep = DeepObfuscator(Obfuscator(feats.shape[1], 1, "random"), phi2,
                          build_backbone("vgg11-half", 20).split("conv2_1")[1],
                          build_reconstructor("px2s2", tuple(feats.shape[1:]), images.shape[1:]))
    history = train_obfuscator(deep, feats, images, split.utility, split.private,
                               ObfuscatorSettings(epochs, 64, 2e-3, weights, weights), seed=0)
    return deep, history


@needs_celeba
@pytest.mark.slow
def test_obfuscator_training_keeps_utility_and_fights_its_adversaries():
    """On 1,024 real faces: the utility loss falls, and both adversaries' losses (the privacy classifier's BCE,
    the reconstructor's L1) end higher than in the control run with α = β = 0 (same modules, seeds and
    batches; the adversaries learn, O does not fight them)."""
    ds = load_celeba(size=32)
    images = ds.train_images[:1024]
    split = split_attributes(ds.train_attributes[:1024], ds.attribute_names, 20)
    torch.manual_seed(0)
    phi1, phi2 = build_backbone("vgg11-half", 20).split("conv2_1")
    feats = extract_features(phi1, images)
    state = phi2.state_dict()
    _, control = _obfuscator_run(feats, images, split, phi2, 0.0)
    phi2.load_state_dict(state)
    deep, adversarial = _obfuscator_run(feats, images, split, phi2, 3.0)
    assert adversarial[-1]["utility"] < adversarial[0]["utility"]
    assert adversarial[-1]["privacy"] > control[-1]["privacy"] + 0.01
    assert adversarial[-1]["recon_l1"] > control[-1]["recon_l1"] + 0.03
    out = deep.obfuscator(feats[:4])
    assert out.shape == feats[:4].shape and torch.isfinite(out).all()


@needs_celeba
@pytest.mark.slow
def test_table4_command_writes_table_and_figure_and_resumes(tmp_path):
    cfg = load_config("table4-tiny", {"results_root": str(tmp_path), "threads": "2"})
    figures = reproduce(cfg, ["table4", "figure7"])
    out = tmp_path / "reproduce" / "table4-tiny"
    rows = {r["protection"]: r for r in figures["table4"]}
    assert list(rows) == ["w/o protection", "DeepObfuscator", "DPM"]
    assert rows["DPM"]["paper sharing recon SSIM"] == "Denied"
    assert all(0 <= r["utility mAP"] <= 100 and 0 <= r["privacy mAP"] <= 100 for r in rows.values())
    assert (out / "table4.md").is_file() and (out / "table4.csv").is_file() and (out / "figure7.png").is_file()
    assert json.loads((out / "figures.json").read_text())["table4"][0]["protection"] == "w/o protection"
    stored = sorted(p for p in tmp_path.glob("artefacts/table4-*/**/*.pt"))
    assert len(stored) == 11  # Φ, ψ, the obfuscator, 2 DPMs, 3 privacy classifiers, 3 decoders
    mtimes = [p.stat().st_mtime_ns for p in stored]
    again = reproduce(cfg, ["table4"])
    assert [p.stat().st_mtime_ns for p in stored] == mtimes  # everything reused, nothing retrained
    assert again["table4"] == figures["table4"]


@pytest.mark.slow
def test_obfuscator_sharing_mode_publishes_one_obfuscator_and_packs_it(tmp_path):
    """``collab.share = obfuscator`` on the bundled digits: Step 1 publishes the obfuscator, an entity shares
    O(φ1(S_k)), and the Flower record carries O to receivers (and is refused in another mode)."""
    cfg = load_config("tiny", {"results_root": str(tmp_path), "threads": "2", "data.dataset": "digits",
                               "data.max_task_train": "200", "data.max_public_train": "200", "data.max_test": "50",
                               "pretrain.epochs": "1", "reconstructor.epochs": "1", "table4.obfuscator_epochs": "1",
                               "collab.share": "obfuscator"})
    runtime.configure(cfg)
    split = load_task(cfg)
    store = ArtefactStore(cfg)
    shared = step1(cfg, split, store)
    assert shared.obfuscator is not None and list(store.root.glob("shared/obfuscator-*.pt"))
    idx = entity_shards(cfg, split)["E1"]
    entity = Entity("E1", split.S.train_images[idx], split.S.train_labels[idx], store)
    sent = contribute(entity, shared, cfg, seed=0)
    own = entity.featurize(shared).features
    assert sent.mode == "obfuscator" and sent.data.shape == own.shape and not torch.allclose(sent.data, own)
    received = unpack_shared(pack_shared(shared), cfg, split.S.image_shape)
    for a, b in zip(received.obfuscator.state_dict().values(), shared.obfuscator.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    dpm_cfg = load_config("tiny", {"data.dataset": "digits", "collab.share": "dpm"})
    with pytest.raises(ValueError, match="keys outside"):
        unpack_shared(pack_shared(shared), dpm_cfg, split.S.image_shape)
