"""Data: three sources -> one decoded uint8 cache on disk -> batches augmented on the device.

Every source ends as `Dataset`: uint8 images (N, 32, 32, 3), int64 labels and class names.
Decoding happens once per source and is cached; a file lock and an atomic rename keep
concurrent ranks and jobs from corrupting the cache. Batches are drawn from the whole data set
held on the training device, and every random choice (order, flip, shift, cutout) derives from
(seed, epoch, sample index) alone, so the batches do not depend on the number of ranks.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import os
import pickle
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cifar_dist.config import DataConfig

CACHE_FORMAT = 1  # bump when the cached layout changes
IMAGE_SIZE = 32  # pixels; other sizes are resized on decode
# Per-channel mean and std of the CIFAR-10 training images, for inputs in [0, 1].
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


class DataError(ValueError):
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


# ---------------------------------------------------------------------------- sources -> cache


def load_dataset(cfg: DataConfig, announce=print) -> Dataset:
    """The decoded data set for `cfg`, from the cache when it is there, subset as configured."""
    ds = load_cached(cfg, announce)
    return Dataset(
        *_subset(ds.train_x, ds.train_y, cfg.train_subset, len(ds.classes)),
        *_subset(ds.test_x, ds.test_y, cfg.test_subset, len(ds.classes)),
        classes=ds.classes,
    )


def load_cached(cfg: DataConfig, announce=print) -> Dataset:
    path = cache_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # One process decodes; the others (ranks, concurrent jobs) wait on the lock, then read.
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                announce(f"decoding {cfg.source} data once into the cache {path}")
                ds = decode(cfg)
                tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
                torch.save(ds.__dict__, tmp)
                os.replace(tmp, path)  # atomic: readers see the old state or the whole file
    return Dataset(**torch.load(path, weights_only=True))


def cache_path(cfg: DataConfig) -> Path:
    root = Path(cfg.cache_dir or os.environ.get("CIFAR_DIST_CACHE") or Path.home() / ".cache" / "cifar-dist")
    return root / f"{cfg.source}-{_source_fingerprint(cfg)}.pt"


def _source_fingerprint(cfg: DataConfig) -> str:
    """Changes when the source's files change, so a stale cache is never used."""
    key: list[object] = [CACHE_FORMAT, cfg.source]
    if cfg.source == "synthetic":
        key += [cfg.synthetic_train, cfg.synthetic_test]
    else:
        root = Path(cfg.path).resolve()
        if cfg.source == "cifar10":
            root = root / "cifar-10-batches-py"
            files = [root / f for f in CIFAR_FILES if (root / f).exists()]
        else:
            files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        key.append(str(root))
        key += [(str(f.relative_to(root.parent)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def decode(cfg: DataConfig) -> Dataset:
    if cfg.source == "synthetic":
        return make_synthetic(cfg.synthetic_train, cfg.synthetic_test)
    if cfg.source == "cifar10":
        return read_cifar10(Path(cfg.path), cfg.download)
    return read_imagefolder(Path(cfg.path))


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


def _subset(x: torch.Tensor, y: torch.Tensor, n: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` images in a fixed shuffled order with equal quotas per class (0 = all)."""
    if n == 0 or n >= len(y):
        return x, y
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    keep = []
    for c in range(n_classes):
        quota = n // n_classes + (1 if c < n % n_classes else 0)
        keep.append(order[y[order] == c][:quota])
    idx = torch.cat(keep).sort().values
    return x[idx], y[idx]


# ---------------------------------------------------------------------------- batches


def normalize(x_u8_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W)."""
    mean, std = _mean_std(x_u8_nhwc.device)
    return (x_u8_nhwc.permute(0, 3, 1, 2).float() / 255 - mean) / std


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a tensor built from Python numbers on a GPU is a copy that waits for
    the GPU's queue to drain, which every training step would otherwise pay."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1))


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


class TrainBatches:
    """The training set as one tensor on the device, served as this rank's share of each global batch.

    Epoch e is one permutation drawn from (seed, e); global step s of the epoch takes positions
    [s*B, (s+1)*B) of it and rank r the r-th of `world` equal slices. The last partial batch is
    dropped so that every step has the same global batch. Flip, shift and cutout for sample i
    in epoch e are drawn for the whole epoch at once from the same seed, indexed by i.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, global_batch: int,
                 rank: int, world: int, seed: int, memory_format: torch.memory_format = torch.contiguous_format):
        if global_batch > len(labels):
            raise DataError(f"train.batch_size={global_batch} is larger than the training set ({len(labels)} images)")
        self.images, self.labels, self.cfg = images, labels, cfg
        self.global_batch, self.local_batch = global_batch, global_batch // world
        self.rank, self.seed, self.memory_format = rank, seed, memory_format
        self.steps_per_epoch = len(labels) // global_batch
        self._plan: tuple[int, dict[str, torch.Tensor]] | None = None

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(start, self.steps_per_epoch):
            yield self.batch(epoch, step)

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan(epoch)
        first = step * self.global_batch + self.rank * self.local_batch
        idx = plan["order"][first : first + self.local_batch]
        x = augment(self.images, idx, {k: v[idx] for k, v in plan.items() if k != "order"}, self.cfg)
        return x.contiguous(memory_format=self.memory_format), self.labels[idx]

    def plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """The epoch's order and every sample's augmentation draws, indexed by sample. With
        `flip_alternate`, a sample's flip is its epoch-0 coin, inverted on odd epochs: every image
        is seen both ways round in any two consecutive epochs (airbench's derandomised flip)."""
        if self._plan is None or self._plan[0] != epoch:
            plan = self.draws(epoch)
            if self.cfg.flip_alternate:
                plan["flip"] = self.draws(0)["flip"] ^ bool(epoch % 2)
            self._plan = (epoch, {k: v.to(self.images.device) for k, v in plan.items()})
        return self._plan[1]

    def draws(self, epoch: int) -> dict[str, torch.Tensor]:
        n, t = len(self.labels), self.cfg.translate
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return {
            "order": torch.randperm(n, generator=g),
            "flip": torch.rand(n, generator=g) < 0.5,
            "shift": torch.randint(-t, t + 1, (n, 2), generator=g),
            "cutout": torch.randint(0, IMAGE_SIZE, (n, 2), generator=g),
        }


def augment(images: torch.Tensor, idx: torch.Tensor, draws: dict[str, torch.Tensor], cfg: DataConfig) -> torch.Tensor:
    """Images `idx` of the uint8 (N, H, W, 3) set, flipped, translated and cut out, normalised.

    Flip and translate are one gather of uint8 pixels: output pixel (i, j) of a sample shifted
    by (dy, dx) reads pixel (i + dy, j + dx), reflected at the borders (what a crop of the
    reflect-padded image gives), and a flipped sample reads its mirrored column. The gather takes
    whole RGB pixels by one flat index (2.2x faster on a CPU than indexing three dimensions).
    """
    size = images.shape[1]
    base = torch.arange(size, device=images.device)
    rows, cols = base.expand(len(idx), size), base.expand(len(idx), size)
    if cfg.translate:
        rows, cols = _reflect(rows + draws["shift"][:, :1], size), _reflect(cols + draws["shift"][:, 1:], size)
    if cfg.flip:
        cols = torch.where(draws["flip"].view(-1, 1), size - 1 - cols, cols)
    pixel = (idx.view(-1, 1, 1) * size + rows.unsqueeze(2)) * size + cols.unsqueeze(1)  # (B, H, W) flat
    x = normalize(images.view(-1, 3).index_select(0, pixel.view(-1)).view(len(idx), size, size, 3))
    if cfg.cutout:
        start = draws["cutout"] - cfg.cutout // 2  # (B, 2): top-left corner; may lie outside
        inside_r = ((base >= start[:, :1]) & (base < start[:, :1] + cfg.cutout)).view(-1, 1, size, 1)
        inside_c = ((base >= start[:, 1:]) & (base < start[:, 1:] + cfg.cutout)).view(-1, 1, 1, size)
        x = x.masked_fill(inside_r & inside_c, 0.0)  # 0 is the mean after normalisation
    return x


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect indices that fall off either edge back inside (-1 -> 1, size -> size - 2)."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def eval_shard(n: int, rank: int, world: int) -> range:
    """Rank r's contiguous share of n test images: every image once, none padded or repeated."""
    return range(rank * n // world, (rank + 1) * n // world)
