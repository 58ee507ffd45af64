"""Beyond CIFAR-10: the cifar100 source in its real pickled format, statistics computed from the
data, and the images `data show` draws. A 100-class run end to end: tests/e2e/test_cifar100.py."""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_dist.config import ConfigError, DataConfig, load_config
from cifar_dist.data import cache_path, load_cached, load_dataset, normalize
from cifar_dist.errors import DataError
from cifar_dist.sources import CIFAR10_STATS, image_stats
from tests.helpers.data import COARSE, FINE, write_cifar100


def cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def test_cifar100_fine_and_coarse_labels_in_the_real_format(tmp_path):
    written = write_cifar100(tmp_path / "c100")
    fine = load_dataset(cfg(tmp_path, source="cifar100", path=str(tmp_path / "c100"), download=False))
    coarse = load_dataset(cfg(tmp_path, source="cifar100", path=str(tmp_path / "c100"), download=False, labels="coarse"))
    assert fine.classes == FINE and coarse.classes == COARSE
    assert fine.train_x.shape == (300, 32, 32, 3) and fine.test_x.shape == (100, 32, 32, 3)
    data, fine_labels, coarse_labels = written["train"]
    assert fine.train_y.tolist() == fine_labels and coarse.train_y.tolist() == coarse_labels
    assert fine.train_x[7, 3, 5].tolist() == [data[7, 3 * 32 + 5], data[7, 1024 + 3 * 32 + 5], data[7, 2048 + 3 * 32 + 5]]
    assert torch.equal(fine.train_x, coarse.train_x)
    # The labels are part of what is cached: two caches, not one served for both.
    paths = {cache_path(cfg(tmp_path, source="cifar100", path=str(tmp_path / "c100"), labels=k)) for k in ("fine", "coarse")}
    assert len(paths) == 2 and all(p.is_file() for p in paths)


def test_cifar100_missing_offline_says_how_to_provide_it(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(cfg(tmp_path, source="cifar100", path=str(tmp_path / "none"), download=False))
    assert "cifar-100-python: missing train, test, meta" in str(e.value)
    assert "cifar-100-python.tar.gz" in str(e.value) and "data prepare data.source=cifar100" in str(e.value)


def test_cifar100_file_that_would_run_code_or_has_labels_out_of_range_is_refused(tmp_path):
    write_cifar100(tmp_path / "c100")
    train = tmp_path / "c100" / "cifar-100-python" / "train"
    blob = pickle.loads(train.read_bytes())
    blob[b"fine_labels"][3] = 100
    train.write_bytes(pickle.dumps(blob))
    with pytest.raises(DataError, match=r"cifar-100-python/train: label 100 outside 0\.\.99 \(100 class names in meta\)"):
        load_dataset(cfg(tmp_path, source="cifar100", path=str(tmp_path / "c100"), download=False))
    train.write_bytes(pickle.dumps({b"data": collections.OrderedDict()}))  # a class no batch file holds
    with pytest.raises(DataError, match=r"cifar-100-python/train: not a CIFAR-100 batch file \(refusing to load"):
        load_dataset(cfg(tmp_path, source="cifar100", path=str(tmp_path / "c100"), download=False))


def test_config_keys_for_more_classes_are_checked():
    with pytest.raises(ConfigError, match="data.labels: coarse needs data.source=cifar100"):
        load_config("debug", ["data.labels=coarse"])
    with pytest.raises(ConfigError, match="data.labels: must be one of fine, coarse"):
        load_config("debug", ["data.source=cifar100", "data.path=data", "data.labels=superclass"])
    with pytest.raises(ConfigError, match=r"data.synthetic_test: must be >= data.synthetic_classes \(one image per class\)"):
        load_config("debug", ["data.synthetic_classes=100", "data.synthetic_test=99"])
    cfg100 = load_config("cifar100")
    assert (cfg100.data.source, cfg100.model.name, cfg100.train.epochs) == ("cifar100", "resnet18", 200)


# ---- statistics


def test_statistics_of_a_data_set_with_known_mean_and_std(tmp_path):
    """Red: half the images black, half white (mean 0.5, std 0.5). Green: 51 everywhere (mean 0.2;
    no spread, so one grey level as std). Blue: 0 and 102 in alternate columns (mean 0.2, std 0.2)."""
    root = tmp_path / "known"
    for split in ("train", "test"):
        for c, red in (("dark", 0), ("bright", 255)):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                img = np.zeros((32, 32, 3), dtype=np.uint8)
                img[..., 0], img[..., 1], img[:, ::2, 2] = red, 51, 102
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    c = cfg(tmp_path, source="imagefolder", path=str(root))
    ds = load_cached(c, announce=lambda m: None)
    assert ds.stats.mean == (0.5, 0.2, 0.2) and ds.stats.std == (0.5, round(1 / 255, 4), 0.2)
    # Stored with the cache, and what normalisation uses: red and blue become mean 0, std 1.
    assert load_cached(c, announce=print).stats == ds.stats
    x = normalize(ds.train_x, ds.stats)
    assert x[:, [0, 2]].mean().abs() < 1e-6 and torch.allclose(x[:, [0, 2]].std(dim=(0, 2, 3), correction=0), torch.ones(2))
    # A subset keeps the whole training set's statistics.
    assert load_dataset(DataConfig(**{**c.__dict__, "train_subset": 2})).stats == ds.stats


def test_statistics_are_exact_and_cifar10s_are_its_constants():
    x = torch.randint(0, 256, (500, 32, 32, 3), dtype=torch.uint8)
    pixels = x.double().view(-1, 3) / 255
    stats = image_stats(x)
    assert stats.mean == tuple(round(v, 4) for v in pixels.mean(0).tolist())
    assert stats.std == tuple(round(v, 4) for v in pixels.std(0, correction=0).tolist())
    # Half the pixels at CIFAR-10's mean minus its std, half at plus (to the nearest level): statistics
    # within 0.0012 of CIFAR-10's, as the JPEG archive's are within 0.0018, give exactly its constants.
    low, high = torch.tensor([62, 61, 47], dtype=torch.uint8), torch.tensor([188, 185, 181], dtype=torch.uint8)
    near = torch.stack([low, high]).repeat(500, 1).view(-1, 10, 10, 3)
    assert image_stats(near) == CIFAR10_STATS
    shifted = image_stats(near + 3)  # 3 levels brighter: 0.012 off, another data set
    assert shifted != CIFAR10_STATS and shifted.mean[0] == round((62 + 188 + 6) / 2 / 255, 4)


# ---- the images `data show` draws


def test_shown_samples_are_the_training_images_augmented_and_undone(tmp_path):
    from cifar_dist.data import TrainBatches, denormalize, shown_samples

    c = cfg(tmp_path, source="synthetic", synthetic_train=200, synthetic_test=20, flip=False, translate=0)
    ds = load_dataset(c)
    plain = shown_samples(ds, c, seed=0, per_class=3, epoch=0)
    assert plain.shape == (10, 3, 32, 32, 3)
    for k in range(10):  # without augmentation: each class's first three training images, exactly
        assert torch.equal(plain[k], ds.train_x[ds.train_y == k][:3])
    c.flip, c.translate, c.cutout = True, 2, 8
    augmented = shown_samples(ds, c, seed=4, per_class=3, epoch=2)
    idx = torch.cat([(ds.train_y == k).nonzero().flatten()[:3] for k in range(10)])
    net_sees = TrainBatches(ds.train_x, ds.train_y, c, global_batch=1, rank=0, world=1, seed=4, stats=ds.stats).augmented(idx, 2)
    assert torch.equal(augmented.flatten(0, 1), denormalize(net_sees, ds.stats))
    assert not torch.equal(augmented, plain)
