"""Beyond CIFAR-10: the cifar100 source in its real pickled format, statistics computed from the
data, and a 100-class run end to end (console, summary, plots, compare, wandb, predict, data show)."""

from __future__ import annotations

import collections
import glob
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PY, TINY, run, train_cmd
from PIL import Image
from wandb_records import history

from cifar_dist.config import ConfigError, DataConfig, load_config
from cifar_dist.data import DataError, cache_path, load_cached, load_dataset, normalize
from cifar_dist.report import CONFUSION_PNG, CURVES_PNG, PER_CLASS_PNG, confusion_grid
from cifar_dist.rundir import CLASS_PLOT, MODEL, RunDir, load_weights
from cifar_dist.sources import CIFAR10_STATS, image_stats

# CIFAR-100's class names, in its label order (fine: 100 classes; coarse: the 20 superclasses).
_FINE_TEXT = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
"""
_COARSE_TEXT = """
aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices
household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes
large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees
vehicles_1 vehicles_2
"""
FINE, COARSE = _FINE_TEXT.split(), _COARSE_TEXT.split()


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 100) -> dict[str, tuple[np.ndarray, list, list]]:
    """root/cifar-100-python/{train,test,meta} as torchvision unpacks them: pickles of bytes-keyed
    dicts, images as (N, 3072) uint8 rows (1024 red, 1024 green, 1024 blue values, each row-major)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in np.arange(n) % 100]
        coarse = [f % 20 for f in fine]
        written[name] = (data, fine, coarse)
        with open(folder / name, "wb") as f:
            pickle.dump({b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                         b"fine_labels": fine, b"coarse_labels": coarse, b"data": data}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [c.encode() for c in FINE], b"coarse_label_names": [c.encode() for c in COARSE]},
                    f)
    return written


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


# ---- 100 classes end to end

HUNDRED = [*TINY, "data.synthetic_classes=100", "data.synthetic_train=2000", "data.synthetic_test=500",
           "train.batch_size=100", "train.log_every=10"]


@pytest.fixture(scope="module")
def hundred(tmp_path_factory, cache_dir):
    """Two finished 100-class runs (wandb offline in the first) and their console output."""
    import os

    root = tmp_path_factory.mktemp("hundred")
    env = dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_DIR=str(root))
    env.pop("WANDB_API_KEY", None)
    first = run(train_cmd(*HUNDRED, f"run.dir={root / 'a'}", "tracking.backend=wandb", "tracking.log_images=4"), env)
    run(train_cmd(*HUNDRED, f"run.dir={root / 'b'}", "seed=1", "train.epochs=1"), env)
    return root, first.stdout


def test_a_hundred_classes_print_a_summary_and_the_best_and_worst(hundred):
    root, stdout = hundred
    summary = RunDir(root / "a").summary()
    per_class = summary["per_class_accuracy"]
    assert len(per_class) == 100 and np.array(summary["confusion_matrix"]).shape == (100, 100)
    final = stdout[stdout.rindex("\nepoch 2  step 40  test accuracy"):].splitlines()[2:]  # after the accuracy line
    values = sorted(per_class.values())
    assert final[0] == (f"  100 classes: per-class accuracy mean {np.mean(values):.2%}, median {np.median(values):.2%}, "
                        f"{values.count(0.0)} at 0%; the 5 best and the 5 worst:")
    ranked = sorted(per_class, key=lambda c: -per_class[c])  # stable: ties stay in class order
    shown = [line.split()[0] for line in final[1:12]]
    assert shown == ranked[:5] + ["..."] + ranked[-5:]
    assert sum(line.startswith("  class") for line in final) == 10  # and no 100-line table


def test_a_hundred_classes_plots_compare_and_wandb(hundred, env, tmp_path):
    root, _ = hundred
    with Image.open(root / "a" / CLASS_PLOT) as im:
        assert im.size[0] > 1500 and len(im.convert("L").getcolors()) > 10  # wide enough for 100 labels
    proc = run([PY, "-m", "cifar_dist.cli", "compare", str(root / "a"), str(root / "b"), "--out", str(tmp_path)], env)
    blocks = proc.stdout.split("\n\n")
    lines = blocks[1].splitlines()
    assert lines[0] == "per-class test accuracy (final evaluation), 100 classes, best first by the mean over runs"
    assert lines[1].split() == ["class", "a", "b"] and len(lines) == 102  # a row per class
    a, b = (RunDir(root / k).summary()["per_class_accuracy"] for k in "ab")
    means = [(a[c] + b[c]) / 2 for c in (line.split()[0] for line in lines[2:])]
    assert means == sorted(means, reverse=True) and sorted(line.split()[0] for line in lines[2:]) == sorted(a)
    rows, cols, panel = confusion_grid(2, 100, len("class00"))
    assert (rows, cols) == (1, 2) and panel == pytest.approx(11.315) and confusion_grid(5, 100, 7)[:2] == (3, 2)
    confusion = (100 * panel * cols, 100 * panel * rows)
    for name, size in ((CURVES_PNG, None), (PER_CLASS_PNG, (1800, 500)), (CONFUSION_PNG, confusion)):
        with Image.open(tmp_path / name) as im:
            assert size is None or np.abs(np.subtract(im.size, size)).max() <= 1, (name, im.size)  # pixels, rounded
            assert len(im.convert("L").getcolors()) > 10, f"{name} is blank"

    # wandb: a key per class and a per-class table, as wandb itself recorded them.
    (log,) = [Path(p) for p in glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))]  # WANDB_DIR=root
    evals = [row for row in history(log) if "test/accuracy" in row]
    assert len(evals) == 2 and all({f"test/acc/{c}" for c in a} <= row.keys() for row in evals)
    table = json.loads((log.parent / "files" / evals[-1]["test/per_class/path"]).read_text())
    assert table["columns"] == ["class", "accuracy", "correct", "images"] and len(table["data"]) == 100
    confusion = np.array(RunDir(root / "a").summary()["confusion_matrix"])
    assert [row[0] for row in table["data"]] == list(a) and [row[1] for row in table["data"]] == list(a.values())
    assert [row[2] for row in table["data"]] == confusion.diagonal().tolist()
    assert [row[3] for row in table["data"]] == confusion.sum(1).tolist()


def test_a_hundred_class_model_predicts_with_its_own_statistics(hundred, env, tmp_path):
    root, _ = hundred
    weights = load_weights(root / "a" / MODEL)
    assert len(weights["classes"]) == 100 and tuple(weights["mean"]) != CIFAR10_STATS.mean
    Image.new("RGB", (40, 30), (20, 140, 220)).save(tmp_path / "x.jpg")
    proc = run([PY, "-m", "cifar_dist.cli", "predict", "--checkpoint", str(root / "a"), str(tmp_path / "x.jpg"),
                "--json", "--top-k", "5"], env)
    (result,) = json.loads(proc.stdout)
    assert len(result["top"]) == 5 and all(t["class"] in weights["classes"] for t in result["top"])


# ---- data show


def test_data_show_draws_what_the_net_sees(tmp_path, env):
    shown = tmp_path / "grid.png"
    base = [PY, "-m", "cifar_dist.cli", "data", "show", "--config", "debug", "data.synthetic_train=500",
            "data.synthetic_test=100"]
    proc = run([*base, "--out", str(shown), "data.cutout=8"], env)
    assert proc.stdout.strip().endswith(f"{shown}: 6 training images per class for 10 classes")
    with Image.open(shown) as im:
        assert im.format == "PNG" and len(im.convert("RGB").getcolors(2**20)) > 1000
    hundred = tmp_path / "grid100.png"
    run([*base, "data.synthetic_classes=100", "--per-class", "4", "--epoch", "3", "--out", str(hundred)], env)
    with Image.open(hundred) as big, Image.open(shown) as small:
        assert big.size[0] * big.size[1] > 4 * small.size[0] * small.size[1]
    bad = run([*base, "--out", str(tmp_path / "grid.jpg")], env, check=False)
    assert bad.returncode == 2 and bad.stderr == f"error: data show: --out must name a .png file, got {tmp_path / 'grid.jpg'}\n"


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
