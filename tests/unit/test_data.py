"""The three data sources in their real on-disk formats, the cache, and batches/augmentation. `data
prepare` as a user runs it: tests/e2e/test_data.py."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_dist.config import DataConfig
from cifar_dist.data import TrainBatches, cache_path, eval_shard, load_cached, load_dataset
from cifar_dist.errors import DataError
from cifar_dist.images import read_image
from cifar_dist.sources import CIFAR10_STATS
from tests.helpers.data import write_archive, write_cifar_pickles, write_image_tree

CLASSES = ["cat", "dog", "frog"]


def cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def test_synthetic_is_uint8_nhwc_with_ten_balanced_classes(tmp_path):
    ds = load_dataset(cfg(tmp_path, source="synthetic", synthetic_train=500, synthetic_test=100))
    assert ds.train_x.shape == (500, 32, 32, 3) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (100, 32, 32, 3) and ds.train_y.dtype == torch.int64
    assert len(ds.classes) == 10 and torch.bincount(ds.train_y).tolist() == [50] * 10


def test_imagefolder_directory_and_tar_gz_decode_the_same(tmp_path):
    root = tmp_path / "cifar-mini"
    write_image_tree(root, CLASSES, {"train": 4, "test": 2}, suffix=".jpg")
    archive = tmp_path / "cifar-mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-mini")
    from_dir = load_dataset(cfg(tmp_path, source="imagefolder", path=str(root)))
    from_tar = load_dataset(cfg(tmp_path, source="imagefolder", path=str(archive)))
    assert from_dir.classes == from_tar.classes == CLASSES
    assert from_dir.train_x.shape == (12, 32, 32, 3) and from_dir.test_x.shape == (6, 32, 32, 3)
    assert torch.equal(from_dir.train_x, from_tar.train_x) and torch.equal(from_dir.test_y, from_tar.test_y)
    assert from_dir.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # The pixels are the decoded JPEGs, not something else.
    first = np.asarray(Image.open(root / "train" / "cat" / "0000.jpg").convert("RGB"))
    assert np.array_equal(from_tar.train_x[0].numpy(), first)


def test_imagefolder_resizes_and_converts_any_image(tmp_path):
    root = tmp_path / "odd"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.new("L", (64, 48), 128).save(root / split / c / "gray.png")
            Image.new("RGBA", (20, 20), (10, 20, 30, 40)).save(root / split / c / "rgba.png")
    ds = load_dataset(cfg(tmp_path, source="imagefolder", path=str(root)))
    assert ds.train_x.shape == (4, 32, 32, 3)


def test_cifar10_pickle_layout(tmp_path):
    batches = write_cifar_pickles(tmp_path / "c10")
    ds = load_dataset(cfg(tmp_path, source="cifar10", path=str(tmp_path / "c10"), download=False))
    assert ds.train_x.shape == (100, 32, 32, 3) and ds.test_x.shape == (20, 32, 32, 3)
    data, labels = batches["data_batch_1"]
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert ds.train_x[0, 0, 1].tolist() == [data[0, 1], data[0, 1024 + 1], data[0, 2048 + 1]]
    assert ds.train_x[3, 2, 5, 2] == data[3, 2048 + 2 * 32 + 5]
    assert ds.train_y[:20].tolist() == labels and ds.classes[0] == "airplane"


def test_cifar10_batch_file_that_would_run_code_is_refused(tmp_path):
    write_cifar_pickles(tmp_path / "c10")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset(cfg(tmp_path, source="cifar10", path=str(tmp_path / "c10"), download=False))
    assert not marker.exists()


def test_cifar10_missing_offline_says_how_to_provide_it(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(cfg(tmp_path, source="cifar10", path=str(tmp_path / "none"), download=False))
    assert "cifar-10-batches-py" in str(e.value) and "data prepare" in str(e.value)


def test_cifar10_missing_and_download_fails_offline(tmp_path, monkeypatch):
    # This machine has no internet: torchvision's download fails, and the message says what to do.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    with pytest.raises(DataError) as e:
        load_dataset(cfg(tmp_path, source="cifar10", path=str(tmp_path / "none"), download=True))
    assert "could not be downloaded" in str(e.value) and "data prepare" in str(e.value)


def test_corrupt_image_is_named(tmp_path):
    root = tmp_path / "bad"
    write_image_tree(root, CLASSES, {"train": 2, "test": 1})
    (root / "train" / "dog" / "0001.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"train/dog/0001\.jpg: not a readable image"):
        load_dataset(cfg(tmp_path, source="imagefolder", path=str(root)))


def test_corrupt_image_inside_a_tar_is_named(tmp_path):
    root = tmp_path / "bad"
    write_image_tree(root, CLASSES, {"train": 2, "test": 1})
    (root / "test" / "frog" / "0000.jpg").write_bytes(b"\xff\xd8 truncated")
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="bad")
    with pytest.raises(DataError, match=r"bad\.tar\.gz:bad/test/frog/0000\.jpg: not a readable image"):
        load_dataset(cfg(tmp_path, source="imagefolder", path=str(archive)))


def test_empty_class_folder_is_named(tmp_path):
    root = tmp_path / "empty"
    write_image_tree(root, CLASSES, {"train": 2, "test": 1})
    for f in (root / "train" / "frog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder train/frog holds no images"):
        load_dataset(cfg(tmp_path, source="imagefolder", path=str(root)))


def test_mismatched_train_and_test_classes(tmp_path):
    root = tmp_path / "mismatch"
    write_image_tree(root, CLASSES, {"train": 2})
    write_image_tree(root, ["cat", "dog", "horse"], {"test": 1})
    with pytest.raises(DataError, match=r"only in train: \['frog'\]; only in test: \['horse'\]"):
        load_dataset(cfg(tmp_path, source="imagefolder", path=str(root)))


def test_not_a_tar_archive(tmp_path):
    bogus = tmp_path / "data.tar.gz"
    bogus.write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable tar archive"):
        load_dataset(cfg(tmp_path, source="imagefolder", path=str(bogus)))


def test_cache_is_reused_and_refreshed_when_the_source_changes(tmp_path):
    root = tmp_path / "src"
    write_image_tree(root, CLASSES, {"train": 2, "test": 1})
    c = cfg(tmp_path, source="imagefolder", path=str(root))
    said = []
    load_cached(c, announce=said.append)
    load_cached(c, announce=said.append)
    assert len(said) == 1 and cache_path(c).exists()
    Image.new("RGB", (32, 32)).save(root / "train" / "cat" / "9999.png")
    ds = load_cached(c, announce=said.append)
    assert len(said) == 2 and len(ds.train_y) == 7


def _load_in_child(args):
    path, cache = args
    ds = load_cached(DataConfig(source="imagefolder", path=path, cache_dir=cache), announce=lambda m: None)
    return ds.train_x.sum().item(), len(ds.train_y)


def test_concurrent_loaders_never_corrupt_the_cache(tmp_path):
    root = tmp_path / "src"
    write_image_tree(root, CLASSES, {"train": 30, "test": 5})
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.map(_load_in_child, [(str(root), str(tmp_path / "cache"))] * 4)
    assert len(set(results)) == 1 and results[0][1] == 90
    assert list((tmp_path / "cache").glob("*.tmp*")) == []


def test_subset_keeps_equal_class_quotas(tmp_path):
    ds = load_dataset(cfg(tmp_path, source="synthetic", synthetic_train=1000, synthetic_test=200, train_subset=300,
                          test_subset=55))
    assert torch.bincount(ds.train_y).tolist() == [30] * 10
    assert torch.bincount(ds.test_y).tolist() == [6] * 5 + [5] * 5


# ---- batches


def make_batches(n=200, world=1, rank=0, seed=0, **aug):
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(n)  # the label is the sample index, to see which samples a batch holds
    return TrainBatches(images, labels, DataConfig(**aug), global_batch=40, rank=rank, world=world, seed=seed,
                        stats=CIFAR10_STATS)


def test_rank_shards_are_disjoint_and_make_up_the_global_batch():
    torch.manual_seed(0)
    one = make_batches()
    two = [make_batches(world=2, rank=r) for r in (0, 1)]
    for b in [two[0], two[1]]:
        b.images = one.images
    for step in range(one.steps_per_epoch):
        x1, y1 = one.batch(3, step)
        (xa, ya), (xb, yb) = two[0].batch(3, step), two[1].batch(3, step)
        assert set(ya.tolist()).isdisjoint(yb.tolist())
        assert torch.equal(torch.cat([ya, yb]), y1)
        assert torch.equal(torch.cat([xa, xb]), x1)  # same augmentation at any world size


def test_epochs_are_permutations_from_seed_and_epoch():
    b = make_batches()
    epoch0 = torch.cat([y for _, y in b.epoch(0)])
    assert sorted(epoch0.tolist()) == list(range(200))
    assert not torch.equal(epoch0, torch.cat([y for _, y in b.epoch(1)]))
    assert torch.equal(epoch0, torch.cat([y for _, y in make_batches().epoch(0)]))
    assert not torch.equal(epoch0, torch.cat([y for _, y in make_batches(seed=1).epoch(0)]))
    # Resuming mid-epoch gives the same remaining batches.
    assert torch.equal(torch.cat([y for _, y in b.epoch(0, start=2)]), epoch0[80:])


def test_augmentation_flip_translate_cutout():
    torch.manual_seed(0)
    plain = make_batches(flip=False, translate=0)
    x, y = plain.batch(0, 0)
    flipped = make_batches(flip=True, translate=0)
    flipped.images = plain.images
    xf, _ = flipped.batch(0, 0)
    same = [(torch.equal(a, b), torch.equal(a.flip(2), b)) for a, b in zip(x, xf)]
    assert all(s or f for s, f in same) and 5 < sum(f for _, f in same) < 35  # about half flipped
    shifted = make_batches(flip=False, translate=2)
    shifted.images = plain.images
    xs, _ = shifted.batch(0, 0)
    assert not torch.equal(xs, x) and xs.shape == x.shape
    shift = shifted.plan(0)["shift"][y]  # (dy, dx) drawn for each sample of the batch
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i, (dy, dx) in enumerate(shift.tolist()):
        assert torch.equal(xs[i], padded[i, :, 2 + dy : 34 + dy, 2 + dx : 34 + dx])
    cut = make_batches(flip=False, translate=0, cutout=8)
    cut.images = plain.images
    xc, _ = cut.batch(0, 0)
    zeroed = (xc == 0).all(1).flatten(1).sum(1)
    assert (zeroed > 0).all() and (zeroed <= 64).all()


def test_eval_shards_cover_every_image_once():
    for n in (10000, 7, 1001):
        for world in (1, 2, 3, 4):
            shards = [eval_shard(n, r, world) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))


def test_batch_larger_than_the_data_is_an_error():
    with pytest.raises(DataError, match="larger than the training set"):
        TrainBatches(torch.zeros(10, 32, 32, 3, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64),
                     DataConfig(), global_batch=64, rank=0, world=1, seed=0, stats=CIFAR10_STATS)


# ---- damaged inputs: an error naming the file, never part of the data and never a traceback


def test_a_damaged_archive_is_an_error_naming_it_never_a_smaller_data_set(tmp_path):
    root, archive = write_archive(tmp_path)
    good = archive.read_bytes()
    whole = load_dataset(cfg(tmp_path, source="imagefolder", path=str(root)))
    # Seeded offsets anywhere, and the gzip header's flags, its trailer's CRC and length.
    offsets = [*np.random.default_rng(0).integers(10, len(good) - 8, 12).tolist(), 3, len(good) - 8, len(good) - 1]
    damaged = []
    for i, offset in enumerate(offsets):
        data = bytearray(good)
        data[offset] ^= 0x5A
        damaged.append(tmp_path / f"flipped{i}.tar.gz")
        damaged[-1].write_bytes(bytes(data))
    for keep in (len(good) // 2, len(good) - 4):  # cut short: mid-stream, and in the trailer
        damaged.append(tmp_path / f"truncated{keep}.tar.gz")
        damaged[-1].write_bytes(good[:keep])
    for path in damaged:
        c = cfg(tmp_path, source="imagefolder", path=str(path))
        with pytest.raises(DataError) as e:
            load_dataset(c)
        assert str(e.value).startswith(f"{path}: damaged") and "\n" not in str(e.value), str(e.value)
        assert not cache_path(c).exists()  # nothing cached
    assert len(whole.train_y) == 90


def test_a_damaged_member_header_in_a_plain_tar_is_an_error(tmp_path):
    root = tmp_path / "src"
    write_image_tree(root, CLASSES, {"train": 4, "test": 2}, suffix=".png")
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="src")
    with tarfile.open(archive) as tar:
        fifth = tar.getmembers()[5].offset  # a member header mid-archive
    data = bytearray(archive.read_bytes())
    data[fifth + 1] ^= 0x20  # its name: the header checksum no longer matches, and tarfile stops there silently
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{archive}: damaged tar archive \(no valid member header at byte"):
        load_dataset(cfg(tmp_path, source="imagefolder", path=str(archive)))


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_a_damaged_cache_is_decoded_again_with_a_warning(tmp_path, damage):
    root = tmp_path / "src"
    write_image_tree(root, CLASSES, {"train": 20, "test": 4}, suffix=".png")
    c = cfg(tmp_path, source="imagefolder", path=str(root))
    fresh = load_cached(c, announce=lambda m: None)
    path = cache_path(c)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01  # a pixel of train_x: torch.load reads the file without complaint
    path.write_bytes(bytes(data))
    if damage == "flipped byte":
        assert not torch.equal(torch.load(path, weights_only=True)["train_x"], fresh.train_x)  # silently different
    said = []
    again = load_cached(c, announce=said.append)
    assert len(said) == 2 and said[0].startswith(f"warning: data cache {path} is damaged (") and "\n" not in said[0]
    assert said[1].startswith("decoding imagefolder data once")
    assert all(torch.equal(getattr(again, k), getattr(fresh, k)) for k in ("train_x", "train_y", "test_x", "test_y"))
    assert again.stats == fresh.stats and again.classes == fresh.classes
    said.clear()
    assert torch.equal(load_cached(c, announce=said.append).train_x, fresh.train_x) and said == []  # rewritten whole


def test_16_bit_greyscale_decodes_as_its_8_bit_twin(tmp_path):
    grey = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "eight.png")
    Image.fromarray(grey * 257).save(tmp_path / "sixteen.png")  # 0..65535: what a 16-bit scanner writes
    with Image.open(tmp_path / "sixteen.png") as im:
        assert im.mode.startswith("I")
    assert np.array_equal(read_image(tmp_path / "sixteen.png"), read_image(tmp_path / "eight.png"))
    assert read_image(tmp_path / "sixteen.png")[..., 0].std() > 50  # not clipped to white


def test_images_added_to_or_removed_from_a_symlinked_class_folder_are_not_missed(tmp_path):
    """The cache key lists the files the reader reads: a class folder that is a symbolic link is
    followed by both, so a changed folder behind a link decodes again instead of reusing the cache."""
    write_image_tree(tmp_path / "elsewhere", ["dog"], {"train": 3})
    root = tmp_path / "src"
    write_image_tree(root, ["cat"], {"train": 2, "test": 1})
    (root / "train" / "dog").symlink_to(tmp_path / "elsewhere" / "train" / "dog", target_is_directory=True)
    (root / "test" / "dog").symlink_to(tmp_path / "elsewhere" / "train" / "dog", target_is_directory=True)
    c = cfg(tmp_path, source="imagefolder", path=str(root))
    assert len(load_cached(c, announce=lambda _: None).train_y) == 5
    Image.new("RGB", (32, 32)).save(tmp_path / "elsewhere" / "train" / "dog" / "9999.png")
    assert len(load_cached(c, announce=lambda _: None).train_y) == 6
    (tmp_path / "elsewhere" / "train" / "dog" / "9999.png").unlink()
    (tmp_path / "elsewhere" / "train" / "dog" / "0000.jpg").unlink()
    assert len(load_cached(c, announce=lambda _: None).train_y) == 4


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_greyscale_of_8_bit_values_keeps_its_brightness(tmp_path, mode):
    grey = np.arange(32 * 32).reshape(32, 32) % 256
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.int32 if mode == "I" else np.float32), mode=mode).save(tmp_path / "wide.tif")
    with Image.open(tmp_path / "wide.tif") as im:
        assert im.mode == mode
    assert np.array_equal(read_image(tmp_path / "wide.tif"), read_image(tmp_path / "eight.png"))


def test_float_greyscale_in_0_to_1_is_scaled_and_wide_values_are_refused(tmp_path):
    grey = np.arange(32 * 32).reshape(32, 32) % 256
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "eight.png")
    Image.fromarray((grey / 255).astype(np.float32), mode="F").save(tmp_path / "unit.tif")
    assert np.array_equal(read_image(tmp_path / "unit.tif"), read_image(tmp_path / "eight.png"))
    for name, values in (("negative.tif", grey - 1), ("huge.tif", grey * 100_000)):
        Image.fromarray(values.astype(np.int32), mode="I").save(tmp_path / name)
        with pytest.raises(DataError, match="negative or not finite|beyond 16 bits"):
            read_image(tmp_path / name)
