"""Data loading from the real archives (when ../shared/data is there), splits, shards and clear errors."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from entities import data
from entities.data import DataError, find_archive, load_dataset, make_shards, task_public_split

HAVE_ARCHIVES = all(
    any((root / name).is_file() for root in data.data_roots()) for name in data.ARCHIVES.values()
)
needs_archives = pytest.mark.skipif(not HAVE_ARCHIVES, reason="../shared/data is not present")


@pytest.fixture
def dataset():
    """Real CIFAR-10 where the archive is, else the bundled digits."""
    return data.load_dataset_or_fallback("cifar10")


def test_loaded_images_are_uint8_nchw_with_labels(dataset):
    assert dataset.train_images.dtype == np.uint8 and dataset.train_images.ndim == 4
    assert dataset.train_images.shape[1:] == (3, 32, 32)
    assert len(dataset.train_images) == len(dataset.train_labels)
    assert set(np.unique(dataset.train_labels)) == set(range(10))


def test_task_and_public_sets_are_class_disjoint(dataset):
    split = task_public_split(dataset, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert split.S.classes == dataset.classes[:5] and split.Q.classes == dataset.classes[5:]
    assert set(np.unique(split.S.train_labels)) == set(range(5))
    # Q's images are exactly the originals of classes 5-9: nothing of S leaks into it.
    n_q = int(np.isin(dataset.train_labels, [5, 6, 7, 8, 9]).sum())
    assert len(split.Q.train_labels) == n_q
    with pytest.raises(ValueError, match="overlap"):
        task_public_split(dataset, [0, 1], [1, 2])


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_shards_are_disjoint_seeded_and_sized(dataset, partition):
    labels = task_public_split(dataset, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]).S.train_labels
    shards = make_shards(labels, [0.1, 0.1, 0.1, 0.01], seed=0, partition=partition, alpha=0.3)
    sizes = [len(s) for s in shards]
    assert sizes == [round(f * len(labels)) for f in [0.1, 0.1, 0.1, 0.01]]
    joined = np.concatenate(shards)
    assert len(np.unique(joined)) == len(joined)
    again = make_shards(labels, [0.1, 0.1, 0.1, 0.01], seed=0, partition=partition, alpha=0.3)
    assert all((a == b).all() for a, b in zip(shards, again))
    other = make_shards(labels, [0.1, 0.1, 0.1, 0.01], seed=1, partition=partition, alpha=0.3)
    assert not (shards[0] == other[0]).all()


def test_dirichlet_shards_are_skewed_compared_to_iid(dataset):
    labels = task_public_split(dataset, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]).S.train_labels

    def max_class_share(shards):
        return np.mean([np.bincount(labels[s], minlength=5).max() / len(s) for s in shards])

    iid = make_shards(labels, [0.2] * 3, seed=0)
    skewed = make_shards(labels, [0.2] * 3, seed=0, partition="dirichlet", alpha=0.1)
    assert max_class_share(skewed) > max_class_share(iid) + 0.2


def test_missing_archive_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONPOOL_DATA", str(tmp_path))
    monkeypatch.setattr(data, "SOURCE_ROOT", tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"cifar10-jpeg.tar.gz not found .*--data-root"):
        find_archive("cifar10")


def test_corrupt_archive_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONPOOL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "att-faces.tar.gz"
    bad.write_bytes(gzip.compress(b"this is not a tar archive" * 100)[:200])
    with pytest.raises(DataError, match="att-faces.tar.gz is corrupt"):
        load_dataset("att", data_root=tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet")


def test_image_folder_loader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path))
    assert ds.classes == ["cats", "dogs"] and ds.image_shape == (3, 32, 32)
    assert len(ds.train_labels) + len(ds.test_labels) == 10


@needs_archives
def test_real_archives_decode_and_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONPOOL_CACHE", str(tmp_path))
    att = load_dataset("att")
    assert att.image_shape == (1, 64, 64) and len(att.classes) == 40
    assert len(att.train_labels) + len(att.test_labels) == 400
    cached = list(tmp_path.glob("att-64-*.npz"))
    assert len(cached) == 1
    mtime = os.path.getmtime(cached[0])
    again = load_dataset("att")  # served from the cache, not decoded again
    assert os.path.getmtime(cached[0]) == mtime
    assert (again.train_images == att.train_images).all()


@needs_archives
def test_real_cifar10_has_the_full_split():
    ds = load_dataset("cifar10")
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.test_images.shape == (10000, 3, 32, 32)
    assert (np.bincount(ds.train_labels) == 5000).all()
