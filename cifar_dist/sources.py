"""Data sources: where a data set's images come from, each decoded to one `Dataset` of uint8
images (N, 32, 32, 3), int64 labels, class names and the training images' statistics. `data.py`
caches and serves them.

A new source is one reader registered with `@register("name", needs_path=...)`: a function of
the `data.*` options that returns a `Dataset`, and (for the cache) the files it reads.
`data.source=name` then selects it everywhere. Decoding an image file is images.py's; listing an
image folder's files (or a tar archive's) is image_folders.py's.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from cifar_dist.errors import DataError
from cifar_dist.image_folders import folder_members, tar_members
from cifar_dist.images import IMAGE_READER, IMAGE_SIZE, read_image

STATS_DECIMALS = 4  # plenty for normalising, and short enough to read in model.pt and `data prepare`
# Statistics within this of CIFAR-10's constants, each of the six, are CIFAR-10's (the original: 4e-5 off;
# the JPEG archive: 0.0018 off) and keep the constants: its runs keep their results. CIFAR-100 (published) is 0.02 off.
CIFAR10_TOLERANCE = 0.005


@dataclass(frozen=True)
class Stats:
    """Per-channel (R, G, B) mean and standard deviation of a data set's training images, for pixels in [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# CIFAR-10's published statistics: the normalisation of a model.pt or checkpoint that stores none (mean, std).
CIFAR10_STATS = Stats((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def image_stats(x_u8_nhwc: torch.Tensor) -> Stats:
    """Mean and (population) standard deviation per channel, from a histogram of each channel's 256
    levels: exact and independent of order and device; rounded to 4 decimals. A channel without
    spread gets one grey level (1/255) as its std, not 0, so normalising never divides by zero.
    CIFAR-10, in any encoding, gets exactly the constants its runs were always normalised with:
    the JPEG archive's own statistics (0.0018 off) cost blitz 0.35 points of accuracy (measured)."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(3):
        counts = torch.bincount(x_u8_nhwc[..., c].flatten().cpu(), minlength=256).double()
        m = float((counts * levels).sum() / counts.sum())
        s = float(((counts * (levels - m) ** 2).sum() / counts.sum()).sqrt())
        mean.append(round(m, STATS_DECIMALS))
        std.append(round(max(s, 1 / 255), STATS_DECIMALS))
    pairs = zip((*mean, *std), (*CIFAR10_STATS.mean, *CIFAR10_STATS.std))
    if all(abs(a - b) <= CIFAR10_TOLERANCE for a, b in pairs):
        return CIFAR10_STATS
    return Stats(tuple(mean), tuple(std))  # type: ignore[arg-type]


@dataclass
class Dataset:
    train_x: torch.Tensor  # (N, 32, 32, 3) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    # The training images' statistics: computed from train_x when a reader leaves them out (data.py
    # then stores them with the cache), given when read back, kept by subsets and moves.
    stats: Stats = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.stats is None:
            self.stats = image_stats(self.train_x)

    def to(self, device: torch.device | str) -> Dataset:
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        return Dataset(**move, classes=self.classes, stats=self.stats)


class SourceOptions(Protocol):
    """The `data.*` options a reader may use (config.DataConfig has them all)."""

    path: str
    download: bool
    labels: str
    synthetic_train: int
    synthetic_test: int
    synthetic_classes: int


@dataclass(frozen=True)
class Source:
    read: Callable[[SourceOptions], Dataset]
    # What the decoded images depend on, as JSON-able values: the cache is rebuilt when it changes.
    identity: Callable[[SourceOptions], list]
    needs_path: bool  # data.path is required
    downloads: bool  # with data.download=true, data.path need not exist yet


SOURCES: dict[str, Source] = {}  # data.source -> its reader


def register(name: str, identity: Callable[[SourceOptions], list], needs_path: bool = True, downloads: bool = False):
    def add(read: Callable[[SourceOptions], Dataset]) -> Callable[[SourceOptions], Dataset]:
        SOURCES[name] = Source(read, identity, needs_path, downloads)
        return read

    return add


def files_identity(files: list[Path]) -> list:
    """Each file's path, size and modification time: a changed or replaced file changes it."""
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


# ---- cifar10, cifar100: torchvision's python-pickle layouts


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a batch file can never run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


@dataclass(frozen=True)
class PickleLayout:
    """Where one of the CIFAR python versions keeps its batches, labels and class names."""

    name: str  # as people write it: CIFAR-10
    source: str  # data.source
    archive: str  # the python version's archive
    folder: str  # what it unpacks to, under data.path
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    torchvision: str  # the torchvision.datasets class that downloads it

    @property
    def files(self) -> list[str]:
        return [*self.train, *self.test, self.meta]


CIFAR10 = PickleLayout("CIFAR-10", "cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                       train=tuple(f"data_batch_{i}" for i in range(1, 6)), test=("test_batch",), meta="batches.meta",
                       torchvision="CIFAR10")
CIFAR100 = PickleLayout("CIFAR-100", "cifar100", "cifar-100-python.tar.gz", "cifar-100-python",
                        train=("train",), test=("test",), meta="meta", torchvision="CIFAR100")
# data.labels -> (the batches' label key, the meta file's class-name key); CIFAR-10 has one kind of label.
CIFAR10_LABELS = {"fine": (b"labels", b"label_names")}
CIFAR100_LABELS = {"fine": (b"fine_labels", b"fine_label_names"), "coarse": (b"coarse_labels", b"coarse_label_names")}


def _pickle_files(layout: PickleLayout) -> Callable[[SourceOptions], list]:
    def identity(o: SourceOptions) -> list:
        folder = Path(o.path).resolve() / layout.folder
        return [*files_identity([folder / f for f in layout.files if (folder / f).exists()]), o.labels]

    return identity


@register("cifar10", identity=_pickle_files(CIFAR10), downloads=True)
def _cifar10(o: SourceOptions) -> Dataset:
    return read_cifar(Path(o.path), CIFAR10, CIFAR10_LABELS[o.labels], o.download)


@register("cifar100", identity=_pickle_files(CIFAR100), downloads=True)
def _cifar100(o: SourceOptions) -> Dataset:
    return read_cifar(Path(o.path), CIFAR100, CIFAR100_LABELS[o.labels], o.download)


def read_cifar(root: Path, layout: PickleLayout, keys: tuple[bytes, bytes], download: bool) -> Dataset:
    """The python version of CIFAR-10 or CIFAR-100 under `root`; `keys`: (label key, class-name key)."""
    folder = root / layout.folder
    missing = [f for f in layout.files if not (folder / f).exists()]
    if missing and download:
        _download(root, layout)
        missing = [f for f in layout.files if not (folder / f).exists()]
    if missing:
        raise DataError(
            f"{folder}: missing {', '.join(missing)}; put the python version of {layout.name} there "
            f"({layout.archive} unpacked) or run "
            f"'cifar-dist data prepare data.source={layout.source} data.path={root}' on a machine with internet"
        )
    label_key, names_key = keys

    def unpickle(name: str) -> dict:
        try:
            with open(folder / name, "rb") as f:
                return _ArrayUnpickler(f, encoding="bytes").load()
        except Exception as e:
            raise DataError(f"{folder / name}: not a {layout.name} batch file ({e})") from None

    def split(names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in names:
            batch = unpickle(name)
            try:
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
                labels = np.asarray(batch[label_key], dtype=np.int64)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{folder / name}: unexpected batch layout ({type(e).__name__}: {e})") from None
            if len(labels) != len(data):
                raise DataError(f"{folder / name}: {len(labels)} labels for {len(data)} images")
            outside = labels[(labels < 0) | (labels >= len(classes))]
            if len(outside):
                raise DataError(f"{folder / name}: label {outside[0]} outside 0..{len(classes) - 1} "
                                f"({len(classes)} class names in {layout.meta})")
            xs.append(data.transpose(0, 2, 3, 1))  # planes (R, G, B) -> pixels (H, W, RGB)
            ys.append(labels)
        return torch.from_numpy(np.concatenate(xs)).contiguous(), torch.from_numpy(np.concatenate(ys))

    meta = unpickle(layout.meta)
    try:
        classes = [n.decode() for n in meta[names_key]]
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{folder / layout.meta}: no class names under {names_key.decode()!r} ({e})") from None
    train_x, train_y = split(layout.train)
    test_x, test_y = split(layout.test)
    return Dataset(train_x, train_y, test_x, test_y, classes)


def _download(root: Path, layout: PickleLayout) -> None:
    import torchvision

    try:
        getattr(torchvision.datasets, layout.torchvision)(str(root), train=True, download=True)
    except Exception as e:  # no network on this machine: say how to provide the data instead
        raise DataError(
            f"{root}: {layout.name} is not there and could not be downloaded ({type(e).__name__}: {e}); "
            f"on a machine with internet run 'cifar-dist data prepare data.source={layout.source} "
            f"data.path={root}' (or unpack {layout.archive} into {root})"
        ) from None


# ---- imagefolder: train/<class>/* and test/<class>/*, a folder or a .tar.gz of one


def _imagefolder_files(o: SourceOptions) -> list:
    """The files the reader reads, found as it finds them: a class folder that is a symbolic link is
    followed by both (rglob would skip it, and images added to it would leave a stale cache)."""
    root = Path(o.path).resolve()
    if root.is_file():
        return [IMAGE_READER, *files_identity([root])]
    members = folder_members(root)
    return [IMAGE_READER, *files_identity([src for by_class in members.values() for items in by_class.values()
                                           for _, src in items])]


@register("imagefolder", identity=_imagefolder_files)
def _imagefolder(o: SourceOptions) -> Dataset:
    return read_imagefolder(Path(o.path))


def read_imagefolder(path: Path) -> Dataset:
    files = tar_members(path) if path.is_file() else folder_members(path)
    splits = {}
    for split in ("train", "test"):
        by_class = files.get(split)
        if not by_class:
            raise DataError(f"{path}: no {split}/<class>/<image> files found")
        for name, items in by_class.items():
            if not items:
                raise DataError(f"{path}: class folder {split}/{name} holds no images")
        splits[split] = by_class
    train_classes, test_classes = sorted(splits["train"]), sorted(splits["test"])
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"{path}: train and test classes differ (only in train: {only_train}; only in test: {only_test})")
    return Dataset(*_decode_split(splits["train"], train_classes), *_decode_split(splits["test"], train_classes), train_classes)


def _decode_split(by_class: dict[str, list[tuple[str, bytes | Path]]], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [(name, src, label) for label, c in enumerate(classes) for name, src in by_class[c]]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes outside the GIL
        images = list(pool.map(lambda it: _decode_image(it[0], it[1]), items))
    return torch.from_numpy(np.stack(images)), torch.tensor([label for _, _, label in items], dtype=torch.int64)


def _decode_image(name: str, src: bytes | Path) -> np.ndarray:
    try:
        return read_image(src)
    except Exception as e:
        raise DataError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


# ---- synthetic: learnable, made here, for tests and demos


SYNTHETIC_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@register("synthetic", identity=lambda o: [o.synthetic_train, o.synthetic_test, o.synthetic_classes], needs_path=False)
def _synthetic(o: SourceOptions) -> Dataset:
    return make_synthetic(o.synthetic_train, o.synthetic_test, o.synthetic_classes)


def make_synthetic(n_train: int, n_test: int, n_classes: int = 10) -> Dataset:
    """Each class is a smooth colour pattern; each image is its class's pattern, randomly
    shifted and scaled, plus noise. A small net learns ten classes in one epoch, not trivially.
    Ten classes take CIFAR-10's names; any other number is class00, class01, ..."""
    g = torch.Generator().manual_seed(1234)
    protos = F.interpolate(torch.rand(n_classes, 3, 4, 4, generator=g) * 2 - 1, size=IMAGE_SIZE, mode="bilinear",
                           align_corners=False)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % n_classes
        y = y[torch.randperm(n, generator=g)]
        shift = torch.randint(-4, 5, (n, 2), generator=g)
        x = torch.stack([torch.roll(protos[c], tuple(s.tolist()), dims=(1, 2)) for c, s in zip(y, shift)])
        x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.5 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        x = ((x.clamp(-1.5, 1.5) + 1.5) / 3 * 255).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).contiguous(), y

    digits = len(str(n_classes - 1))
    classes = list(SYNTHETIC_CLASSES) if n_classes == 10 else [f"class{i:0{digits}d}" for i in range(n_classes)]
    return Dataset(*split(n_train), *split(n_test), classes)
