"""Image data sets read from local archives, the paper's S/Q split and the entity shards.

Nothing here downloads by default: the archives in ``../shared/data`` (or wherever the data root
points) are decoded once into a cache of uint8 arrays so a second run does not decode 60k JPEGs
again. torchvision's CIFAR-10 download is available only behind an explicit ``allow_download``.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from entities.files import artefact_key, make_dir, write_bytes

_ABOVE = Path(__file__).resolve().parent.parent
# The source checkout this package runs from, if it does: its sibling ../shared/data is where the
# project's archives live. An installed copy (site-packages) has none, so nothing is looked up there.
SOURCE_ROOT: Path | None = _ABOVE if (_ABOVE / "pyproject.toml").is_file() else None

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

ARCHIVES = {
    "cifar10": "cifar10-jpeg.tar.gz",
    "celeba": "celeba-10k.tar.gz",
    "lfw": "lfw-min20.tar.gz",
    "att": "att-faces.tar.gz",
}


class DataError(RuntimeError):
    """A data set cannot be read; the message names the file and how to get it."""


@dataclass
class ImageSet:
    """Images as uint8 NCHW arrays with integer labels, split into train and test.

    ``attributes`` holds extra per-image label columns (CelebA's 40 binary attributes), aligned
    with the images of each split.
    """

    name: str
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    train_attributes: np.ndarray | None = None
    test_attributes: np.ndarray | None = None
    attribute_names: list[str] = field(default_factory=list)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def subset(self, train_idx: np.ndarray, test_idx: np.ndarray | None = None) -> ImageSet:
        """A view of some train (and test) rows; used to cap sizes for CPU-scale runs."""
        test_idx = np.arange(len(self.test_labels)) if test_idx is None else test_idx
        return ImageSet(
            name=self.name,
            classes=self.classes,
            train_images=self.train_images[train_idx],
            train_labels=self.train_labels[train_idx],
            test_images=self.test_images[test_idx],
            test_labels=self.test_labels[test_idx],
            train_attributes=None if self.train_attributes is None else self.train_attributes[train_idx],
            test_attributes=None if self.test_attributes is None else self.test_attributes[test_idx],
            attribute_names=self.attribute_names,
        )


def data_roots(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Where archives are looked for: an explicit root alone (a root someone named must not be silently
    replaced by another copy of the data), else $POISONPOOL_DATA, then ../shared/data."""
    if explicit:
        return [Path(explicit)]
    roots = []
    if os.environ.get("POISONPOOL_DATA"):
        roots.append(Path(os.environ["POISONPOOL_DATA"]))
    if SOURCE_ROOT is not None:
        roots.append(SOURCE_ROOT.parent / "shared" / "data")
    roots.append(Path.cwd().parent / "shared" / "data")
    return roots


def cache_dir() -> Path:
    """Decoded arrays live here ($POISONPOOL_CACHE, default ~/.cache/poisonpool), outside the repo."""
    path = Path(os.environ.get("POISONPOOL_CACHE", Path.home() / ".cache" / "poisonpool"))
    return make_dir(path, private=True)  # decoded images are as sensitive as the archive


def find_archive(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """The archive of data set ``name``; a clear error naming the file if it is nowhere."""
    filename = ARCHIVES[name]
    roots = data_roots(data_root)
    for root in roots:
        if (root / filename).is_file():
            return root / filename
    searched = ", ".join(str(r) for r in roots)
    raise DataError(
        f"{filename} not found (searched: {searched}). Put the archive from the project's shared data "
        f"folder there, or point --data-root / $POISONPOOL_DATA at the folder that holds it."
    )


def _cached(key: str, archive: Path, build) -> dict[str, np.ndarray]:
    """Load arrays cached under the archive's size and mtime, or build and cache them."""
    stat = archive.stat()
    tag = artefact_key({"archive": archive.name, "size": stat.st_size, "mtime": int(stat.st_mtime), "arrays": key})
    path = cache_dir() / f"{key}-{tag}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"cache file {path} is corrupt ({type(err).__name__}: {err}); delete it and rerun "
                            f"to decode {archive.name} again") from err
    try:
        arrays = build()
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise DataError(
            f"{archive} is corrupt or incomplete ({err}). Copy it again from the shared data folder "
            f"(its README lists the sha256)."
        ) from err
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue(), private=True)
    return arrays


def _decode(data: bytes, mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert(mode)
    if size is not None and img.size != size:
        img = img.resize(size, Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _iter_tar(archive: Path, suffixes: tuple[str, ...]):
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(suffixes):
                yield member.name, tar.extractfile(member).read()


def load_cifar10(data_root=None, allow_download: bool = False) -> ImageSet:
    """CIFAR-10 from ``cifar10-jpeg.tar.gz``; torchvision's download only if ``allow_download``."""
    try:
        archive = find_archive("cifar10", data_root)
    except DataError:
        if not allow_download:
            raise
        return _download_cifar10()

    def build():
        split = {"train": ([], []), "test": ([], [])}
        for name, data in sorted(_iter_tar(archive, (".jpg",))):
            part, cls, _ = name.split("/")[-3:]
            split[part][0].append(_decode(data, "RGB"))
            split[part][1].append(CIFAR10_CLASSES.index(cls))
        return {
            f"{p}_{k}": np.stack(v[i]) if k == "images" else np.asarray(v[i], dtype=np.int64)
            for p, v in split.items()
            for i, k in enumerate(("images", "labels"))
        }

    a = _cached("cifar10", archive, build)
    return ImageSet("cifar10", list(CIFAR10_CLASSES), a["train_images"], a["train_labels"],
                    a["test_images"], a["test_labels"])


def _download_cifar10() -> ImageSet:
    from torchvision.datasets import CIFAR10

    root = cache_dir() / "torchvision"
    train, test = (CIFAR10(root, train=t, download=True) for t in (True, False))
    return ImageSet(
        "cifar10", list(CIFAR10_CLASSES),
        train.data.transpose(0, 3, 1, 2).copy(), np.asarray(train.targets, dtype=np.int64),
        test.data.transpose(0, 3, 1, 2).copy(), np.asarray(test.targets, dtype=np.int64),
    )


def _split_by_class(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded stratified train/test split for sets that ship without one."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(len(idx) * test_fraction))) if len(idx) > 1 else 0
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def _from_arrays(name, classes, images, labels, attrs=None, attr_names=(), test_fraction=0.2, seed=0):
    tr, te = _split_by_class(labels, test_fraction, seed)
    return ImageSet(
        name, list(classes), images[tr], labels[tr], images[te], labels[te],
        None if attrs is None else attrs[tr], None if attrs is None else attrs[te], list(attr_names),
    )


def load_face_folder(name: str, data_root=None, size: int = 64, seed: int = 0) -> ImageSet:
    """LFW-min20 (62 people) or AT&T (40 people): identity classification, resized to ``size``."""
    archive = find_archive(name, data_root)
    suffix, mode = {"lfw": (".jpg", "RGB"), "att": (".pgm", "L")}[name]

    def build():
        images, people = [], []
        for path, data in sorted(_iter_tar(archive, (suffix,))):
            images.append(_decode(data, mode, (size, size)))
            people.append(path.split("/")[-2])
        classes = sorted(set(people))
        return {
            "images": np.stack(images),
            "labels": np.asarray([classes.index(p) for p in people], dtype=np.int64),
            "classes": np.asarray(classes),
        }

    a = _cached(f"{name}-{size}", archive, build)
    return _from_arrays(name, a["classes"].tolist(), a["images"], a["labels"], seed=seed)


def load_celeba(data_root=None, size: int = 64, seed: int = 0) -> ImageSet:
    """CelebA-10k: images centre-cropped to a square and resized, labels = attribute 0, and all 40 attributes
    (the archive's ±1 read as {0, 1}) with their names on ``train_attributes``/``test_attributes``."""
    archive = find_archive("celeba", data_root)

    def build():
        images, attr_rows, names = {}, {}, []
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    img = Image.open(io.BytesIO(data)).convert("RGB")
                    w, h = img.size
                    side = min(w, h)
                    top = (h - side) // 2
                    img = img.crop((0, top, side, top + side)).resize((size, size), Image.BILINEAR)
                    images[Path(member.name).name] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
                elif member.name.endswith("list_attr_celeba_first20000.txt"):
                    lines = data.decode().splitlines()
                    names = lines[1].split()
                    for line in lines[2:]:
                        parts = line.split()
                        attr_rows[parts[0]] = [int(v) > 0 for v in parts[1:]]
        files = sorted(images)
        return {
            "images": np.stack([images[f] for f in files]),
            "attributes": np.asarray([attr_rows[f] for f in files], dtype=np.int64),
            "attribute_names": np.asarray(names),
        }

    a = _cached(f"celeba-{size}", archive, build)
    attrs = a["attributes"]
    names = a["attribute_names"].tolist()
    return _from_arrays("celeba", [f"not {names[0]}", names[0]], a["images"], attrs[:, 0].copy(),
                        attrs, names, seed=seed)


@dataclass
class AttributeSplit:
    """CelebA's 40 binary attributes as Table 4 uses them: the first ``k`` are the utility task that the
    features must keep, the remaining ones the private attributes they should hide (Deep Poisoning
    Sec. 4.2.4, after DeepObfuscator). Matrices are {0, 1} int64 of shape (N, k) and (N, 40 - k)."""

    utility: np.ndarray
    private: np.ndarray
    utility_names: list[str]
    private_names: list[str]


def split_attributes(attributes: np.ndarray, names: Sequence[str], utility: int = 20) -> AttributeSplit:
    """The utility/private split of an (N, A) attribute matrix; ``utility`` must leave both parts non-empty."""
    if attributes.ndim != 2 or attributes.shape[1] != len(names):
        raise ValueError(f"attribute matrix of shape {attributes.shape} does not match {len(names)} attribute names")
    if not 0 < utility < len(names):
        raise ValueError(f"table4.utility_attributes = {utility}: it must leave utility and private attributes "
                         f"(1..{len(names) - 1} of {len(names)})")
    return AttributeSplit(attributes[:, :utility], attributes[:, utility:], list(names[:utility]),
                          list(names[utility:]))


def load_digits_rgb(size: int = 32, seed: int = 0) -> ImageSet:
    """scikit-learn's bundled 8x8 digits, upscaled to ``size`` RGB: the offline fallback for tests."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    images = (x.repeat(1, 3, 1, 1) * 255).round().to(torch.uint8).numpy()
    return _from_arrays("digits", [str(i) for i in range(10)], images, d.target.astype(np.int64), seed=seed)


def load_image_folder(root: str | os.PathLike, size: int = 32, seed: int = 0) -> ImageSet:
    """A user's own data: ``root/<class>/<image>`` (train/test split made here, seeded)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; expected {root}/<class>/<image files>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for ci, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() in {".jpg", ".jpeg", ".png", ".pgm", ".bmp", ".webp"}:
                images.append(_decode(f.read_bytes(), "RGB", (size, size)))
                labels.append(ci)
    if not images:
        raise DataError(f"no images found under {root}/<class>/")
    return _from_arrays(root.name, classes, np.stack(images), np.asarray(labels, dtype=np.int64), seed=seed)


def load_dataset(name: str, data_root=None, allow_download: bool = False, size: int | None = None) -> ImageSet:
    """One entry point for every data set name the configs use (or a path to an image folder)."""
    if name == "cifar10":
        return load_cifar10(data_root, allow_download)
    if name in ("lfw", "att"):
        return load_face_folder(name, data_root, size or 64)
    if name == "celeba":
        return load_celeba(data_root, size or 64)
    if name == "digits":
        return load_digits_rgb(size or 32)
    if Path(name).is_dir():
        return load_image_folder(name, size or 32)
    raise DataError(f"unknown data set {name!r}: use cifar10, celeba, lfw, att, digits or an image folder path")


def load_dataset_or_fallback(name: str, data_root=None) -> ImageSet:
    """The named set where its archive is present, else the bundled digits (for tests and demos)."""
    try:
        return load_dataset(name, data_root)
    except DataError:
        return load_digits_rgb()


@dataclass
class TaskSplit:
    """The paper's S (task, sensitive) and Q (public, class-disjoint) sets, labels renumbered 0..k-1."""

    S: ImageSet
    Q: ImageSet
    task_classes: list[int]
    public_classes: list[int]


def _restrict(ds: ImageSet, classes: Sequence[int], name: str) -> ImageSet:
    remap = {c: i for i, c in enumerate(classes)}
    tr = np.flatnonzero(np.isin(ds.train_labels, classes))
    te = np.flatnonzero(np.isin(ds.test_labels, classes))
    out = ds.subset(tr, te)
    out.name = name
    out.classes = [ds.classes[c] for c in classes]
    out.train_labels = np.asarray([remap[c] for c in out.train_labels], dtype=np.int64)
    out.test_labels = np.asarray([remap[c] for c in out.test_labels], dtype=np.int64)
    return out


def task_public_split(ds: ImageSet, task_classes: Sequence[int], public_classes: Sequence[int],
                      holdout: int = 0, seed: int = 0) -> TaskSplit:
    """S and Q with disjoint classes; overlapping class lists are an error, not a silent leak.

    ``holdout`` > 0 (no public classes then: every class is the task's): Q is ``holdout`` training images of the
    task's classes drawn with ``seed`` and removed from S's training part, disjoint images rather than disjoint
    classes. That Q is a stronger public set for an attacker (ψ and every attacker model learn on images
    of the very classes the pools show), which the threat model then has to say.
    """
    overlap = set(task_classes) & set(public_classes)
    if overlap:
        raise ValueError(f"task and public classes overlap: {sorted(overlap)}")
    bad = [c for c in [*task_classes, *public_classes] if not 0 <= c < len(ds.classes)]
    if bad:
        raise ValueError(f"class ids {bad} out of range for {ds.name} ({len(ds.classes)} classes)")
    if holdout:
        S = _restrict(ds, task_classes, f"{ds.name}-S")
        n = len(S.train_labels)
        if public_classes or holdout >= n:
            raise ValueError(f"data.public_holdout = {holdout} holds Q out of S's {n} training images: it must be "
                             f"below {n}, with data.public_classes empty (got {list(public_classes)})")
        q = np.zeros(n, dtype=bool)
        q[np.random.default_rng(seed).choice(n, holdout, replace=False)] = True
        Q = S.subset(np.flatnonzero(q))
        Q.name = f"{ds.name}-Q-holdout"
        return TaskSplit(S.subset(np.flatnonzero(~q)), Q, list(task_classes), [])
    return TaskSplit(
        _restrict(ds, task_classes, f"{ds.name}-S"),
        _restrict(ds, public_classes, f"{ds.name}-Q"),
        list(task_classes),
        list(public_classes),
    )


def make_shards(
    labels: np.ndarray,
    fractions: Sequence[float],
    seed: int,
    partition: str = "iid",
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Disjoint index arrays, one per entity, each ``fraction`` of ``labels`` in size.

    ``iid`` draws uniformly; ``dirichlet`` gives each entity class proportions drawn from
    Dir(alpha) (small alpha = skewed entities) while keeping the shard sizes.
    """
    n = len(labels)
    sizes = [int(round(f * n)) for f in fractions]
    if any(s < 1 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"shard fractions {list(fractions)} do not fit {n} images")
    rng = np.random.default_rng(seed)
    if partition == "iid":
        perm = rng.permutation(n)
        bounds = np.cumsum([0, *sizes])
        return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    if partition != "dirichlet":
        raise ValueError(f"unknown partition {partition!r}: use iid or dirichlet")
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    shards = []
    for size in sizes:
        props = rng.dirichlet([alpha] * len(classes))
        want = np.floor(props * size).astype(int)
        want[np.argmax(props)] += size - want.sum()
        picked = []
        for c, k in zip(classes, want):
            take = min(k, len(pools[c]))
            picked += [pools[c].pop() for _ in range(take)]
        short = size - len(picked)
        while short > 0:  # a class ran dry: top up from the fullest remaining classes
            c = max(pools, key=lambda k: len(pools[k]))
            picked.append(pools[c].pop())
            short -= 1
        shards.append(np.sort(np.asarray(picked, dtype=np.int64)))
    return shards
