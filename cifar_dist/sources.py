"""Data sources: where a data set's images come from, each decoded to one `Dataset` of uint8
images (N, 32, 32, 3), int64 labels, class names and the training images' statistics. `data.py`
caches and serves them.

A new source is one reader registered with `@register("name", needs_path=...)`: a function of
the `data.*` options that returns a `Dataset`, and (for the cache) the files it reads.
`data.source=name` then selects it everywhere.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import tarfile
import zlib
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
# Greyscale modes of more than 8 bits ("I": 32-bit TIFF, older Pillow's 16-bit PNG; "F": 32-bit float TIFF); Pillow's
# convert("RGB") clips them at 255 (wide_to_8bit reads them instead).
WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
IMAGE_READER = 2  # bump when read_image decodes some file differently (2: modes "I" and "F" by their range)
STATS_DECIMALS = 4  # plenty for normalising, and short enough to read in model.pt and `data prepare`
# Statistics within this of CIFAR-10's constants, each of the six, are CIFAR-10's (the original: 4e-5 off;
# the JPEG archive: 0.0018 off) and keep the constants: its runs keep their results. CIFAR-100 (published) is 0.02 off.
CIFAR10_TOLERANCE = 0.005


class DataError(UserError):
    """Input data that cannot be used; the message names the file or folder."""


@dataclass(frozen=True)
class Stats:
    """Per-channel (R, G, B) mean and standard deviation of a data set's training images, for pixels in [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# CIFAR-10's published statistics: what every model.pt and checkpoint written before stats were stored was trained with.
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
    members = _folder_members(root)
    return [IMAGE_READER, *files_identity([src for by_class in members.values() for items in by_class.values()
                                           for _, src in items])]


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


Members = dict[str, dict[str, list[tuple[str, bytes | Path]]]]  # split -> class -> [(name, bytes or path)]


def _folder_members(root: Path) -> Members:
    out: Members = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        out[split] = {}
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            out[split][class_name(class_dir.name)] = [(str(p), p) for p in images]
    return out


def class_name(name: str) -> str:
    """A class's name from its folder's name, decoded as UTF-8 whatever the locale: under LC_ALL=C
    without Python's UTF-8 mode a file name's non-ASCII bytes arrive as lone surrogates, which no
    plot or JSON reader shows, and the same data would get other names in another locale."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def _tar_members(path: Path) -> Members:
    out: Members = {}
    raw = _unpacked(path)
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for m in tar:
                # Any leading folder is accepted: .../train/<class>/<file>, .../test/<class>/<file>.
                parts = Path(m.name).parts
                if m.isdir() and len(parts) >= 2 and parts[-2] in ("train", "test"):
                    out.setdefault(parts[-2], {}).setdefault(class_name(parts[-1]), [])
                elif (m.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test")
                      and Path(m.name).suffix.lower() in IMAGE_SUFFIXES):
                    data = tar.extractfile(m).read()  # type: ignore[union-attr]
                    out.setdefault(parts[-3], {}).setdefault(class_name(parts[-2]), []).append((f"{path}:{m.name}", data))
            end = tar.offset  # where the member headers stopped
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from None
    # tarfile ends without a word at a damaged header; a whole archive has only zero blocks after its last member.
    if raw[end:].strip(b"\0"):
        raise DataError(f"{path}: damaged tar archive (no valid member header at byte {end:,} of {len(raw):,} "
                        "unpacked); nothing was used")
    for by_class in out.values():
        for items in by_class.values():
            items.sort(key=lambda item: item[0])
    return out


# First bytes of a compressed archive -> its decompressor; each checks its stream's checksum and length.
DECOMPRESSORS: dict[bytes, Callable[[bytes], bytes]] = {b"\x1f\x8b": gzip.decompress, b"BZh": bz2.decompress,
                                                        b"\xfd7zXZ\x00": lzma.decompress}


def _unpacked(path: Path) -> bytes:
    """The archive's tar bytes, decompressed in memory as a whole: tarfile reading a stream checks
    no gzip CRC unless it reads to the end, so a damaged archive could otherwise pass for a shorter one."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    decompress = next((d for magic, d in DECOMPRESSORS.items() if data.startswith(magic)), None)
    if decompress is None:
        return data  # a plain .tar: its headers carry checksums, its contents none
    try:
        return decompress(data)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise DataError(f"{path}: damaged archive ({type(e).__name__}: {e}); nothing was used") from None


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


def read_image(src: bytes | Path) -> np.ndarray:
    """An image file's bytes or path as RGB uint8 (32, 32, 3), whatever its size, mode or bit depth."""
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        if im.mode in WIDE_MODES:
            im = Image.fromarray(wide_to_8bit(np.asarray(im), im.mode))
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def wide_to_8bit(pixels: np.ndarray, mode: str) -> np.ndarray:
    """A greyscale image of more than 8 bits as uint8 (Pillow's convert clips such values at 255).
    16-bit modes keep their high byte, as Pillow does for 16-bit RGB. Modes "I" (32-bit integers) and
    "F" (32-bit floats) say nothing of the range their values use, so the image's own values decide:
    the smallest of [0, 1] (floats only), [0, 255] and [0, 65535] that holds them is full scale, so
    a 32-bit TIFF of 8-bit values stays as bright as it is, not black. Values that are negative, not
    finite or beyond 16 bits are refused: no full scale can be read from them."""
    if mode.startswith("I;16"):
        return (pixels.astype(np.int64) >> 8).astype(np.uint8)
    values = pixels.astype(np.float64)
    if not np.isfinite(values).all() or values.min() < 0:
        raise DataError(f"mode {mode} pixels from {values.min():g} to {values.max():g}: negative or not finite, "
                        "no brightness to read from them")
    if mode == "F" and values.max() <= 1:
        return np.rint(values * 255).astype(np.uint8)
    bits = next((b for b in (8, 16) if values.max() < 2**b), None)
    if bits is None:  # a 32-bit range: which part of it the image meant to use is anyone's guess
        raise DataError(f"mode {mode} pixels up to {values.max():g}, beyond 16 bits: save it with 8 or 16 bits a pixel")
    return (values.astype(np.int64) >> (bits - 8)).astype(np.uint8)  # the high byte, as for 16 bits


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
