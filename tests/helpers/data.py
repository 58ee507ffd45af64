"""Data sets written in their real on-disk formats, small: image folders, CIFAR-10's and CIFAR-100's
python pickles (as torchvision unpacks them)."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
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


def write_image_tree(root: Path, classes: list[str], per_class: dict[str, int], suffix: str = ".jpg", seed: int = 0) -> None:
    """root/<split>/<class>/NNNN<suffix>: random 32x32 RGB images, a distinct mean colour per class."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array([(ci * 25) % 256, (ci * 70) % 256, (255 - ci * 25) % 256])
                img = np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}{suffix}")


def write_archive(tmp_path: Path) -> tuple[Path, Path]:
    """tmp_path/src, a small image folder of three classes (PNG: lossless, so the archive and the folder
    decode alike), and tmp_path/src.tar.gz holding it."""
    root = tmp_path / "src"
    write_image_tree(root, ["cat", "dog", "frog"], {"train": 30, "test": 5}, suffix=".png")
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="src")
    return root, archive


def write_cifar_pickles(root: Path, n_per_batch: int = 20) -> dict[str, tuple[np.ndarray, list[int]]]:
    """root/cifar-10-batches-py/ as torchvision unpacks it: five training batches and a test batch of
    n_per_batch random images with random labels, and batches.meta; returns what each batch holds."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, f)
    return batches


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
