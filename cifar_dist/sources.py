"""Data sources: where a data set's images come from, each decoded to one `Dataset` of uint8
images (N, 32, 32, 3), int64 labels and class names. `data.py` caches and serves them.

A new source is one reader registered with `@register("name", needs_path=...)`: a function of
the `data.*` options that returns a `Dataset`, and (for the cache) the files it reads.
`data.source=name` then selects it everywhere.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cifar_dist.errors import UserError

IMAGE_SIZE = 32  # pixels; other sizes are resized on decode
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


class DataError(UserError):
    """Input data that cannot be used; the message names the file or folder."""


@dataclass
class Dataset:
    train_x: torch.Tensor  # (N, 32, 32, 3) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]

    def to(self, device: torch.device | str) -> Dataset:
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        return Dataset(**move, classes=self.classes)


class SourceOptions(Protocol):
    """The `data.*` options a reader may use (config.DataConfig has them all)."""

    path: str
    download: bool
    synthetic_train: int
    synthetic_test: int


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


# ---- cifar10: torchvision's python-pickle layout


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


def _cifar10_files(o: SourceOptions) -> list:
    folder = Path(o.path).resolve() / "cifar-10-batches-py"
    return files_identity([folder / f for f in CIFAR_FILES if (folder / f).exists()])


@register("cifar10", identity=_cifar10_files, downloads=True)
def _cifar10(o: SourceOptions) -> Dataset:
    return read_cifar10(Path(o.path), o.download)


def read_cifar10(root: Path, download: bool) -> Dataset:
    folder = root / "cifar-10-batches-py"
    missing = [f for f in CIFAR_FILES if not (folder / f).exists()]
    if missing and download:
        _download_cifar10(root)
        missing = [f for f in CIFAR_FILES if not (folder / f).exists()]
    if missing:
        raise DataError(
            f"{folder}: missing {', '.join(missing)}; put the python version of CIFAR-10 there "
            f"(cifar-10-python.tar.gz unpacked) or run 'cifar-dist data prepare data.source=cifar10 "
            f"data.path={root}' on a machine with internet"
        )

    def unpickle(name: str) -> dict:
        try:
            with open(folder / name, "rb") as f:
                return _ArrayUnpickler(f, encoding="bytes").load()
        except Exception as e:
            raise DataError(f"{folder / name}: not a CIFAR-10 batch file ({e})") from None

    def split(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in names:
            batch = unpickle(name)
            try:
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
                labels = np.asarray(batch[b"labels"], dtype=np.int64)
            except (KeyError, ValueError) as e:
                raise DataError(f"{folder / name}: unexpected batch layout ({e})") from None
            xs.append(data.transpose(0, 2, 3, 1))  # planes (R, G, B) -> pixels (H, W, RGB)
            ys.append(labels)
        return torch.from_numpy(np.concatenate(xs)).contiguous(), torch.from_numpy(np.concatenate(ys))

    classes = [n.decode() for n in unpickle("batches.meta")[b"label_names"]]
    train_x, train_y = split(CIFAR_FILES[:5])
    test_x, test_y = split(["test_batch"])
    return Dataset(train_x, train_y, test_x, test_y, classes)


def _download_cifar10(root: Path) -> None:
    import torchvision

    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # no network on this machine: say how to provide the data instead
        raise DataError(
            f"{root}: CIFAR-10 is not there and could not be downloaded ({type(e).__name__}: {e}); "
            "on a machine with internet run 'cifar-dist data prepare data.source=cifar10 "
            f"data.path={root}' (or unpack cifar-10-python.tar.gz into {root})"
        ) from None


# ---- imagefolder: train/<class>/* and test/<class>/*, a folder or a .tar.gz of one


def _imagefolder_files(o: SourceOptions) -> list:
    root = Path(o.path).resolve()
    return files_identity([root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()))


@register("imagefolder", identity=_imagefolder_files)
def _imagefolder(o: SourceOptions) -> Dataset:
    return read_imagefolder(Path(o.path))


def read_imagefolder(path: Path) -> Dataset:
    files = _tar_members(path) if path.is_file() else _folder_members(path)
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


Members = dict[str, dict[str, list[tuple[str, object]]]]  # split -> class -> [(name, bytes or path)]


def _folder_members(root: Path) -> Members:
    out: Members = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        out[split] = {}
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            out[split][class_dir.name] = [(str(p), p) for p in images]
    return out


def _tar_members(path: Path) -> Members:
    out: Members = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                # Any leading folder is accepted: .../train/<class>/<file>, .../test/<class>/<file>.
                parts = Path(m.name).parts
                if m.isdir() and len(parts) >= 2 and parts[-2] in ("train", "test"):
                    out.setdefault(parts[-2], {}).setdefault(parts[-1], [])
                elif (m.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test")
                      and Path(m.name).suffix.lower() in IMAGE_SUFFIXES):
                    data = tar.extractfile(m).read()  # type: ignore[union-attr]
                    out.setdefault(parts[-3], {}).setdefault(parts[-2], []).append((f"{path}:{m.name}", data))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from None
    for by_class in out.values():
        for items in by_class.values():
            items.sort(key=lambda item: item[0])
    return out


def _decode_split(by_class: dict[str, list[tuple[str, object]]], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [(name, src, label) for label, c in enumerate(classes) for name, src in by_class[c]]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes outside the GIL
        images = list(pool.map(lambda it: _decode_image(it[0], it[1]), items))
    return torch.from_numpy(np.stack(images)), torch.tensor([label for _, _, label in items], dtype=torch.int64)


def _decode_image(name: str, src: object) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:  # type: ignore[arg-type]
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


# ---- synthetic: learnable, made here, for tests and demos


SYNTHETIC_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@register("synthetic", identity=lambda o: [o.synthetic_train, o.synthetic_test], needs_path=False)
def _synthetic(o: SourceOptions) -> Dataset:
    return make_synthetic(o.synthetic_train, o.synthetic_test)


def make_synthetic(n_train: int, n_test: int) -> Dataset:
    """Each class is a smooth colour pattern; each image is its class's pattern, randomly
    shifted and scaled, plus noise. A small net learns it in one epoch, not trivially."""
    g = torch.Generator().manual_seed(1234)
    protos = F.interpolate(torch.rand(10, 3, 4, 4, generator=g) * 2 - 1, size=IMAGE_SIZE, mode="bilinear", align_corners=False)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        y = y[torch.randperm(n, generator=g)]
        shift = torch.randint(-4, 5, (n, 2), generator=g)
        x = torch.stack([torch.roll(protos[c], tuple(s.tolist()), dims=(1, 2)) for c, s in zip(y, shift)])
        x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.5 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        x = ((x.clamp(-1.5, 1.5) + 1.5) / 3 * 255).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).contiguous(), y

    return Dataset(*split(n_train), *split(n_test), list(SYNTHETIC_CLASSES))
