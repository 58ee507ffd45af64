"""The plots of one run, drawn from its run directory: loss.png and per_class_accuracy.png, which the
trainer writes at the end of a run; and the grid of augmented training images `cifar-dist data show`
draws. Matplotlib is imported when a plot is drawn, not with this module, and these plots draw on a
bare `Figure` (`figure()`): pyplot's figure registry and backend machinery are not needed to write
a file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from cifar_dist.metrics import MANY_CLASSES
from cifar_dist.rundir import CLASS_PLOT, LOSS_PLOT, RunDir, write_atomic

INCHES_PER_CLASS = 0.16  # width of a class on a per-class axis once there are many (7-point labels fit)


def text_as_written() -> None:
    """Text is drawn as written: a class or run named with `$` signs is a name, not TeX to parse."""
    import matplotlib

    matplotlib.rcParams["text.parse_math"] = False


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on cluster nodes), imported on first
    use (compare.py's figures)."""
    import matplotlib

    matplotlib.use("Agg")
    text_as_written()
    import matplotlib.pyplot as plt

    return plt


def figure(**kwargs: Any) -> Any:
    """A matplotlib `Figure(**kwargs)` of its own, outside pyplot: nothing to close, and saved as a PNG
    by the Agg renderer (no display needed)."""
    text_as_written()
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_png(fig: Any, path: Path) -> None:
    """`fig` as a PNG at `path`, atomically (a full disk leaves no half picture)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getbuffer())


def write_plots(run: RunDir, summary: dict[str, Any]) -> None:
    """The plots the trainer leaves in a run's directory before its summary.json (`summary`)."""
    plot_loss(run)
    plot_class_accuracy(run, summary)


def plot_loss(run: RunDir) -> None:
    """loss.png: train and test loss against epochs."""
    records = run.metrics()
    train = [r for r in records if "train_loss" in r]
    test = [r for r in records if "test_loss" in r]
    fig = figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot([r["epoch"] for r in train], [r["train_loss"] for r in train], label="train loss (label-smoothed)")
    ax.plot([r["epoch"] for r in test], [r["test_loss"] for r in test], "o-", label="test loss")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"loss: {run.path.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, run / LOSS_PLOT)


def plot_class_accuracy(run: RunDir, summary: dict[str, Any]) -> None:
    """per_class_accuracy.png: the final test accuracy of each class, the overall one dashed across;
    past MANY_CLASSES classes, best first (the spread reads at a glance, a class is found by its rank)
    on a figure that widens with the classes."""
    per_class = summary["per_class_accuracy"]
    many = len(per_class) > MANY_CLASSES
    if many:
        per_class = dict(sorted(per_class.items(), key=lambda kv: -kv[1]))
    fig = figure(figsize=(max(7, INCHES_PER_CLASS * len(per_class) + 1.5), 4.5), dpi=100)
    ax = fig.subplots()
    ax.bar(list(per_class), [100 * v for v in per_class.values()], width=0.8)
    ax.axhline(100 * summary["test_accuracy"], color="k", ls="--", lw=1)  # named in the title: a legend would cover bars
    title = f"per-class accuracy: {run.path.name}, overall {summary['test_accuracy']:.1%} (dashed)"
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title=title + (f"; {len(per_class)} classes, best first" if many else ""))
    ax.set_xlim(-0.7, len(per_class) - 0.3)
    ax.tick_params(axis="x", rotation=90 if many else 45, labelsize=7 if many else None)
    fig.tight_layout()
    save_png(fig, run / CLASS_PLOT)


GRID_IMAGE = 0.64  # inches per 32-pixel image at 100 dpi: exactly 2x, no resampling blur
GRID_LABEL, GRID_GAP, GRID_MARGIN, GRID_TITLE = 0.22, 0.15, 0.3, 0.75  # inches


def plot_image_grid(images: Any, classes: list[str], title: str, out: Path) -> None:
    """uint8 images (classes, k, 32, 32, 3) as one block of k per class, its name above it; blocks
    side by side, as many to a row as keep the figure about square (one to a row at ten classes)."""
    import numpy as np

    n, k = images.shape[:2]
    per_row = max(1, round((1.4 * n / k) ** 0.5))
    rows = -(-n // per_row)
    block = k * GRID_IMAGE
    width = max(7.0, per_row * block + (per_row - 1) * GRID_GAP + 2 * GRID_MARGIN)
    height = GRID_TITLE + rows * (GRID_LABEL + GRID_IMAGE + GRID_GAP) + GRID_MARGIN
    fig = figure(figsize=(width, height), dpi=100)
    fig.suptitle(title, fontsize=9, y=1 - 0.1 / height, va="top")
    white = np.full((images.shape[2], 2, 3), 255, dtype=np.uint8)  # 2 pixels between images
    for c in range(n):
        row, col = divmod(c, per_row)
        left = GRID_MARGIN + col * (block + GRID_GAP)
        top = GRID_TITLE + row * (GRID_LABEL + GRID_IMAGE + GRID_GAP) + GRID_LABEL
        ax = fig.add_axes((left / width, 1 - (top + GRID_IMAGE) / height, block / width, GRID_IMAGE / height))
        strip = np.concatenate([part for img in images[c] for part in (img, white)][:-1], axis=1)
        ax.imshow(strip, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        ax.set_title(classes[c], fontsize=8, loc="left", pad=2)
    save_png(fig, out)
