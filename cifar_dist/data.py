"""Data: a source (sources.py) -> one decoded uint8 cache on disk -> batches augmented on the device.

Every source ends as `Dataset`: uint8 images (N, 32, 32, 3), int64 labels, class names and the
training images' per-channel mean and std, which every consumer normalises with (training,
evaluation, the final weights, predict). Decoding happens once per source and is cached, with a
sha256 of its contents: a damaged cache is decoded again, with a warning. A file lock and an atomic
rename keep concurrent ranks and jobs from corrupting the cache. Batches are drawn from the whole data set
held on the training device, and every random choice (order, flip, shift, cutout) derives from
(seed, epoch, sample index) alone, so the batches do not depend on the number of ranks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from filelock import FileLock

from cifar_dist.config import DataConfig
from cifar_dist.errors import DataError
from cifar_dist.images import IMAGE_SIZE
from cifar_dist.rundir import content_digest, torch_save_atomic
from cifar_dist.sources import SOURCES, Dataset, Stats

CACHE_FORMAT = 2  # bump when the cached layout changes (2: statistics and a sha256 stored with the images)
TENSORS = ("train_x", "train_y", "test_x", "test_y")


# ---------------------------------------------------------------------------- sources -> cache


def load_dataset(cfg: DataConfig, announce: Callable[[str], None] = print) -> Dataset:
    """The decoded data set for `cfg`, from the cache when it is there, subset as configured. The
    statistics are the whole training set's, whatever the subset."""
    ds = load_cached(cfg, announce)
    return Dataset(
        *_subset(ds.train_x, ds.train_y, cfg.train_subset, len(ds.classes)),
        *_subset(ds.test_x, ds.test_y, cfg.test_subset, len(ds.classes)),
        classes=ds.classes, stats=ds.stats,
    )


def load_cached(cfg: DataConfig, announce: Callable[[str], None] = print) -> Dataset:
    """The cache when it is whole; else decoded once (one process decodes, the others wait on the
    lock, then read) and written. A damaged cache is decoded again with a warning. A cache folder
    that cannot be written means decoding in memory, with a warning, every time."""
    path = cache_path(cfg)
    ds, damage = read_cache(path)
    if ds is not None:
        return ds
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DataError(f"data.cache_dir: {path.parent} is not a folder (it, or a folder above it, is a file)") from None
    lock = FileLock(path.with_suffix(".lock"))
    try:
        lock.acquire()
    except OSError as e:  # read-only: a shared cache can still be read, but not written
        why = f"damaged ({damage}) and cannot be rewritten" if damage else "cannot be written"
        announce(f"warning: data cache {path} {why} ({e.strerror}); decoding {cfg.source} data in memory, as every "
                 "run will until data.cache_dir (or $CIFAR_DIST_CACHE) names a writable folder")
        return decode(cfg)
    try:
        ds, damage = read_cache(path)  # another process may have written it while this one waited
        if ds is not None:
            return ds
        if damage:
            announce(f"warning: data cache {path} is damaged ({damage}); decoding it again")
        announce(f"decoding {cfg.source} data once into the cache {path}")
        ds = decode(cfg)
        try:
            torch_save_atomic(path, cache_contents(ds))  # readers see no cache or the whole one
        except OSError as e:
            announce(f"warning: cannot write the data cache {path} ({e.strerror}); using the data decoded in memory")
    finally:
        lock.release()
    return ds


def cache_contents(ds: Dataset) -> dict:
    """What the cache file holds: the data set as plain data, and a sha256 of all of it."""
    contents = {**{k: getattr(ds, k) for k in TENSORS}, "classes": ds.classes,
                "mean": list(ds.stats.mean), "std": list(ds.stats.std)}
    return {**contents, "sha256": content_digest(contents)}


def read_cache(path: Path) -> tuple[Dataset | None, str | None]:
    """(the cached data set, None) when the cache is whole; (None, what is wrong) when it is damaged;
    (None, None) when there is none. Verifying costs one sha256 pass over the images."""
    if not path.exists():
        return None, None
    try:
        contents = torch.load(path, weights_only=True)
        stored = contents.pop("sha256")
        if stored != content_digest(contents):
            return None, "its contents do not match their sha256"
        stats = Stats(tuple(contents.pop("mean")), tuple(contents.pop("std")))
        return Dataset(**contents, stats=stats), None
    except Exception as e:  # a truncated or overwritten file fails in many ways; each means: decode again
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'unreadable'}"


def cache_path(cfg: DataConfig) -> Path:
    root = Path(cfg.cache_dir or os.environ.get("CIFAR_DIST_CACHE") or Path.home() / ".cache" / "cifar-dist")
    return root / f"{cfg.source}-{_source_fingerprint(cfg)}.pt"


def _source_fingerprint(cfg: DataConfig) -> str:
    """Changes when the source's files change, so a stale cache is never used."""
    key = [CACHE_FORMAT, cfg.source, *SOURCES[cfg.source].identity(cfg)]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def decode(cfg: DataConfig) -> Dataset:
    return SOURCES[cfg.source].read(cfg)


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


def normalize(x_u8_nhwc: torch.Tensor, stats: Stats) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) normalised with the training images' statistics."""
    mean, std = _mean_std(stats, x_u8_nhwc.device)
    return (x_u8_nhwc.permute(0, 3, 1, 2).float() / 255 - mean) / std


def denormalize(x: torch.Tensor, stats: Stats) -> torch.Tensor:
    """`normalize` undone, for pictures: float (N, 3, H, W) -> uint8 (N, H, W, 3) (cutout shows as the mean colour)."""
    mean, std = _mean_std(stats, x.device)
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@functools.cache
def _mean_std(stats: Stats, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per data set and device: a tensor built from Python numbers on a GPU is a copy that
    waits for the GPU's queue to drain, which every training step would otherwise pay."""
    return (torch.tensor(stats.mean, device=device).view(1, 3, 1, 1), torch.tensor(stats.std, device=device).view(1, 3, 1, 1))


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


class Batches(Protocol):
    """What the loop trains on: `steps_per_epoch` batches an epoch, batch (epoch, step) a function
    of that pair alone, so that a resume mid-epoch gets the very batches an unbroken run gets."""

    steps_per_epoch: int

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (images, labels) of global step `step` of `epoch`."""
        ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` from step `start` on (a resume starts mid-epoch)."""
        for step in range(start, self.steps_per_epoch):
            yield self.batch(epoch, step)


class TrainBatches(Batches):
    """The training set as one tensor on the device, served as this rank's share of each global batch.

    Epoch e is one permutation drawn from (seed, e); global step s of the epoch takes positions
    [s*B, (s+1)*B) of it and rank r the r-th of `world` equal slices. The last partial batch is
    dropped so that every step has the same global batch. Flip, shift and cutout for sample i
    in epoch e are drawn for the whole epoch at once from the same seed, indexed by i.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, *, global_batch: int,
                 rank: int, world: int, seed: int, memory_format: torch.memory_format = torch.contiguous_format,
                 stats: Stats):
        if global_batch > len(labels):
            raise DataError(f"train.batch_size={global_batch} is larger than the training set ({len(labels)} images)")
        self.images, self.labels, self.cfg, self.stats = images, labels, cfg, stats
        self.global_batch, self.local_batch = global_batch, global_batch // world
        self.rank, self.seed, self.memory_format = rank, seed, memory_format
        self.steps_per_epoch = len(labels) // global_batch
        self._plan: tuple[int, dict[str, torch.Tensor]] | None = None

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = step * self.global_batch + self.rank * self.local_batch
        idx = self.plan(epoch)["order"][first : first + self.local_batch]
        return self.augmented(idx, epoch).contiguous(memory_format=self.memory_format), self.labels[idx]

    def augmented(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """Samples `idx` as epoch `epoch` augments them, normalised: what the net is given."""
        plan = self.plan(epoch)
        return augment(self.images, idx, {k: v[idx] for k, v in plan.items() if k != "order"}, self.cfg, self.stats)

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


def augment(images: torch.Tensor, idx: torch.Tensor, draws: dict[str, torch.Tensor], cfg: DataConfig,
            stats: Stats) -> torch.Tensor:
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
    x = normalize(images.view(-1, 3).index_select(0, pixel.view(-1)).view(len(idx), size, size, 3), stats)
    if cfg.cutout:
        start = draws["cutout"] - cfg.cutout // 2  # (B, 2): top-left corner; may lie outside
        inside_r = ((base >= start[:, :1]) & (base < start[:, :1] + cfg.cutout)).view(-1, 1, size, 1)
        inside_c = ((base >= start[:, 1:]) & (base < start[:, 1:] + cfg.cutout)).view(-1, 1, 1, size)
        x = x.masked_fill(inside_r & inside_c, 0.0)  # 0 is the mean after normalisation
    return x


def shown_samples(ds: Dataset, cfg: DataConfig, seed: int, per_class: int, epoch: int) -> torch.Tensor:
    """The first `per_class` training images of each class as epoch `epoch` of a run with `seed`
    augments them, un-normalised for pictures: uint8 (classes, per_class, 32, 32, 3). Fewer per
    class when the smallest class has fewer."""
    counts = torch.bincount(ds.train_y, minlength=len(ds.classes))
    if int(counts.min()) == 0:
        raise DataError(f"class {ds.classes[int(counts.argmin())]!r} has no training images (data.train_subset too small?)")
    k = min(per_class, int(counts.min()))
    idx = torch.cat([(ds.train_y == c).nonzero().flatten()[:k] for c in range(len(ds.classes))])
    batches = TrainBatches(ds.train_x, ds.train_y, cfg, global_batch=1, rank=0, world=1, seed=seed, stats=ds.stats)
    return denormalize(batches.augmented(idx, epoch), ds.stats).reshape(len(ds.classes), k, *ds.train_x.shape[1:])


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect indices that fall off either edge back inside (-1 -> 1, size -> size - 2)."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def eval_shard(n: int, rank: int, world: int) -> range:
    """Rank r's contiguous share of n test images: every image once, none padded or repeated."""
    return range(rank * n // world, (rank + 1) * n // world)
