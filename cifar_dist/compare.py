"""`cifar-dist compare`: a table and plots made from run directories alone (config.yaml,
metrics.jsonl, summary.json, and a search trial's trial.json), for any number of runs or a sweep.

Past MANY_CLASSES classes the per-class outputs summarise: the table turns to a row per class,
curves replace grouped bars, and confusion matrices lose their per-cell numbers and grow."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cifar_dist.errors import UserError, run_command
from cifar_dist.metrics import MANY_CLASSES, direction
from cifar_dist.plots import INCHES_PER_CLASS, pyplot
from cifar_dist.rundir import CONFIG, TRIAL, RunDir, read_json
from cifar_dist.schema import flatten
from cifar_dist.tables import format_table

# Keys that name a run rather than configure it; they differ between any two runs.
IDENTITY_KEYS = ("run.dir", "run.id", "run.name")
CURVES_PNG, PER_CLASS_PNG, CONFUSION_PNG = "compare_curves.png", "compare_per_class.png", "compare_confusion.png"
PARAMS_PNG = "compare_params.png"  # a search: the final metric against each swept parameter
PARAM_PANEL = (4.5, 4)  # inches per parameter's panel
PRUNED_COLOR = "0.75"  # pruned trials' curves and points: grey, behind the others
CURVES_SIZE = (14, 4.5)  # inches at 100 dpi
PER_CLASS_SIZE = (12, 5)
CONFUSION_PANEL = 4.5  # inches per run's confusion matrix, at least
# Inches a cell and a class name's character take: with counts written in (a 4-digit count at 6 points,
# 7-point names) and without (5-point names), plus what the title, axis labels and colour bar take.
CONFUSION_CELL, CONFUSION_CHAR = {True: 0.25, False: 0.1}, {True: 0.06, False: 0.045}
CONFUSION_FRAME = 1.0
CONFUSION_COLUMNS = {True: 4, False: 2}  # panels to a row


class CompareError(UserError):
    """A path given to compare is not a run or sweep directory."""


@dataclass
class ComparedRun:
    """What a run directory says about its run."""

    label: str  # the path relative to the runs' common folder
    config: dict[str, Any]  # flattened: "train.lr" -> 0.05
    summary: dict[str, Any] | None  # None while the run is unfinished
    metrics: list[dict[str, Any]]
    path: Path | None = None
    trial: dict[str, Any] | None = None  # a search trial's TRIAL record, once it ended
    values: str = ""  # the swept keys' values ("train.lr=0.1 seed=0"): its name in plots

    @property
    def pruned(self) -> bool:
        """Stopped early: pruned, or failed."""
        return (self.trial or {}).get("state") in ("pruned", "fail")

    @property
    def name(self) -> str:
        return self.values or self.label


def find_runs(paths: list[Path]) -> list[Path]:
    """Each path is a run directory, or a sweep directory searched recursively for run directories
    (not inside a run: its checkpoints and wandb folders hold none)."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise CompareError(f"{path}: not a directory")
        inside = []
        for root, dirs, _ in os.walk(path):
            dirs.sort()
            if RunDir(root).is_run():
                inside.append(Path(root))
                dirs.clear()
        if not inside:
            raise CompareError(f"{path}: holds no run directory (none with summary.json or config.yaml)")
        found += inside
    return list(dict.fromkeys(p.resolve() for p in found))


def load_runs(paths: list[Path]) -> list[ComparedRun]:
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    runs = []
    for path in paths:
        run = RunDir(path)
        try:
            config = yaml.safe_load((run / CONFIG).read_text()) if (run / CONFIG).is_file() else {}
        except yaml.YAMLError as e:
            raise CompareError(f"{run / CONFIG}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(config or {}, dict):
            raise CompareError(f"{run / CONFIG}: not a run config")
        runs.append(ComparedRun(str(path.relative_to(common)), flatten(config or {}), run.summary(), run.metrics(), path,
                                read_json(run / TRIAL)))
    keys = differing_keys(runs)
    for r in runs:
        r.values = " ".join(f"{k}={_short(r.config.get(k))}" for k in keys)
    if len({r.values for r in runs}) < len(runs):  # the same values twice: only the paths tell them apart
        for r in runs:
            r.values = ""
    return runs


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ",".join(map(str, v)) if isinstance(v, list) else str(v)


def differing_keys(runs: list[ComparedRun]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config} - set(IDENTITY_KEYS))
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def compare_tables(runs: list[ComparedRun]) -> str:
    """The config keys that differ, accuracies, time, speed and world size; then per-class accuracy."""
    keys = differing_keys(runs)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    def number(v: float | None, decimals: int) -> str:
        return "-" if v is None else f"{v:.{decimals}f}"

    head = ["run", *keys, "final_acc", "best_acc", "train_s", "images/s", "world"]
    rows = [head]
    for r in runs:
        s = r.summary or {}
        rows.append([r.label, *(_short(r.config.get(k, "-")) for k in keys), pct(s.get("test_accuracy")),
                     pct(s.get("best_test_accuracy")), number(s.get("train_seconds"), 1),
                     number(s.get("images_per_second"), 0), number(s.get("world_size"), 0)])
    classes = list(dict.fromkeys(c for r in runs for c in (r.summary or {}).get("per_class_accuracy", {})))
    heading = "per-class test accuracy (final evaluation)"
    if len(classes) <= MANY_CLASSES:  # a row per run
        per_class = [["run", *classes]] + [[r.label, *(pct(class_accuracy(r, c)) for c in classes)] for r in runs]
    else:  # a row per class: a hundred columns would not fit a terminal
        classes = ranked_classes(runs, classes)
        per_class = [["class", *(r.label for r in runs)]] + [[c, *(pct(class_accuracy(r, c)) for r in runs)] for c in classes]
        heading += f", {len(classes)} classes, best first by the mean over runs"
    differ = ", ".join(keys) if keys else "none"
    return f"{len(runs)} runs; config keys that differ: {differ}\n{format_table(rows)}\n\n{heading}\n{format_table(per_class)}"


def class_accuracy(run: ComparedRun, name: str) -> float | None:
    return (run.summary or {}).get("per_class_accuracy", {}).get(name)


def ranked_classes(runs: list[ComparedRun], classes: list[str]) -> list[str]:
    """`classes` by their mean accuracy over the runs that have one for them, best first."""
    def mean(c: str) -> float:
        found = [a for a in (class_accuracy(r, c) for r in runs) if a is not None]
        return sum(found) / len(found) if found else 0.0

    return sorted(classes, key=lambda c: -mean(c))


def study_tables(runs: list[ComparedRun]) -> str:
    """A search's trials: the best one's values and config, then every trial ranked (complete ones
    by their final metric, then pruned ones by how far they got)."""
    trials = [r for r in runs if r.trial]
    metric = trials[0].trial["metric"]
    sign = 1 if direction(metric) == "maximize" else -1

    def rank(r: ComparedRun) -> tuple:
        value = r.trial["value"]
        return (r.pruned, -_epochs(r), -sign * value if value is not None else float("inf"))

    ranked = sorted(trials, key=rank)
    rows = [["rank", "trial", "state", metric, "epochs", "values"]]
    rows += [[str(i + 1), r.label, r.trial["state"], "-" if r.trial["value"] is None else f"{r.trial['value']:.4f}",
              f"{_epochs(r):g}", r.values or "-"] for i, r in enumerate(ranked)]
    counts = ", ".join(f"{sum(r.trial['state'] == s for r in trials)} {s}" for s in ("complete", "pruned", "fail"))
    text = f"study: {len(trials)} trials ended ({counts}); {metric}, {sum(_epochs(r) for r in trials):g} epochs trained\n"
    best = ranked[0]
    if not best.pruned:
        text += f"best trial: {best.label}, {metric} {best.trial['value']:.4f}: {best.values}\nits config: {best.path / CONFIG}\n"
    return text + format_table(rows)


def _epochs(r: ComparedRun) -> float:
    return RunDir(r.path or ".").epochs_trained(r.metrics)


def plot_params(runs: list[ComparedRun], out: Path) -> None:
    """The final metric against each swept parameter, one panel each: complete trials in colour,
    pruned ones grey (at their last evaluation). Log axes for positive values over > 1.5 decades."""
    plt = pyplot()
    trials = [r for r in runs if r.trial and r.trial["value"] is not None]
    keys = differing_keys(runs)
    metric = trials[0].trial["metric"]
    scale = 100 if metric.endswith("accuracy") else 1
    fig, axes = plt.subplots(1, len(keys), figsize=(PARAM_PANEL[0] * len(keys), PARAM_PANEL[1]), dpi=100, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs = [r.config.get(key) for r in trials]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:  # choices: one position per value
            names = list(dict.fromkeys(map(str, xs)))
            ax.set_xticks(range(len(names)), names)
            xs = [names.index(str(x)) for x in xs]
        elif min(xs) > 0 and max(xs) / min(xs) > 30:
            ax.set_xscale("log")
        for pruned, style in ((True, {"color": PRUNED_COLOR, "label": "pruned"}), (False, {"color": "C0", "label": "complete"})):
            points = [(x, scale * r.trial["value"]) for x, r in zip(xs, trials) if r.pruned == pruned]
            if points:
                ax.scatter(*zip(*points), s=30, edgecolors="k", linewidths=0.5, **style)
        ax.set(xlabel=key, ylabel=f"{metric}{' (%)' if scale == 100 else ''}", title=key)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / PARAMS_PNG)
    plt.close(fig)


def plot_curves(runs: list[ComparedRun], out: Path) -> None:
    """Test accuracy, training loss and test loss against epochs, one line per run, named by its
    swept values; pruned trials in grey, behind the others, named once."""
    plt = pyplot()
    fig, (acc, train, test) = plt.subplots(1, 3, figsize=CURVES_SIZE, dpi=100)
    pruned = [r for r in runs if r.pruned]
    for r in sorted(runs, key=lambda r: not r.pruned):  # grey first: the others drawn over them
        tr = [m for m in r.metrics if "train_loss" in m]
        te = [m for m in r.metrics if "test_accuracy" in m]
        grey = {"color": PRUNED_COLOR, "zorder": 1} if r.pruned else {}
        line, = acc.plot([m["epoch"] for m in te], [100 * m["test_accuracy"] for m in te], "o-", **grey)
        grey = {"color": line.get_color(), "zorder": 1 if r.pruned else 2}
        train.plot([m["epoch"] for m in tr], [m["train_loss"] for m in tr], **grey)
        label = (f"stopped early ({len(pruned)})" if r is pruned[0] else "_") if r.pruned else r.name  # "_": no entry
        test.plot([m["epoch"] for m in te], [m["test_loss"] for m in te], "o-", label=label, **grey)
    acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    train.set(xlabel="epoch", ylabel="cross-entropy", title="training loss (label-smoothed)")
    test.set(xlabel="epoch", ylabel="cross-entropy", title="test loss")
    for ax in (acc, train, test):
        ax.grid(alpha=0.3)
    run_legend(test, len(runs) - len(pruned) + bool(pruned))
    fig.tight_layout()
    fig.savefig(out / CURVES_PNG)
    plt.close(fig)


def plot_per_class(runs: list[ComparedRun], out: Path) -> None:
    """Final per-class test accuracy: one group of bars per class, one bar per run; past
    MANY_CLASSES classes, one line per run over the classes sorted by their mean accuracy."""
    plt = pyplot()
    done = [r for r in runs if r.summary]
    classes = list(dict.fromkeys(c for r in done for c in r.summary["per_class_accuracy"]))
    many = len(classes) > MANY_CLASSES
    size = (max(PER_CLASS_SIZE[0], INCHES_PER_CLASS * len(classes) + 2), PER_CLASS_SIZE[1]) if many else PER_CLASS_SIZE
    fig, ax = plt.subplots(figsize=size, dpi=100)
    title = "per-class test accuracy (final evaluation)"
    if many:
        classes = ranked_classes(done, classes)
        for r in done:
            ax.plot(range(len(classes)), [100 * (class_accuracy(r, c) or 0) for c in classes], "o-", ms=3, lw=1,
                    label=r.name)
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_xlim(-0.7, len(classes) - 0.3)
        title += f": {len(classes)} classes, best first by the mean over runs"
    else:
        width = 0.8 / max(1, len(done))
        for i, r in enumerate(done):
            xs = [c + (i - (len(done) - 1) / 2) * width for c in range(len(classes))]
            ax.bar(xs, [100 * (class_accuracy(r, c) or 0) for c in classes], width, label=r.name)
        ax.set_xticks(range(len(classes)), classes, rotation=30)
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title=title)
    ax.grid(axis="y", alpha=0.3)
    run_legend(ax, len(done))
    fig.tight_layout()
    fig.savefig(out / PER_CLASS_PNG)
    plt.close(fig)


def confusion_grid(n_runs: int, n_classes: int, longest_name: int) -> tuple[int, int, float]:
    """(rows, columns, inches per panel) of the confusion-matrix figure: a panel grows with the
    number of classes and the length of their names; four to a row with counts written in, two without."""
    counts = n_classes <= MANY_CLASSES
    panel = max(CONFUSION_PANEL, CONFUSION_CELL[counts] * n_classes + CONFUSION_CHAR[counts] * longest_name + CONFUSION_FRAME)
    cols = min(n_runs, CONFUSION_COLUMNS[counts])
    return -(-n_runs // cols), cols, panel


def plot_confusions(runs: list[ComparedRun], out: Path) -> None:
    """Each finished run's final confusion matrix: rows true, columns predicted, coloured by the
    share of the true class, with the counts written in; past MANY_CLASSES classes, an image with
    a colour bar instead of numbers that could not be read."""
    import numpy as np

    plt = pyplot()
    done = [r for r in runs if r.summary]
    names = {c for r in done for c in r.summary["per_class_accuracy"]}
    rows, cols, panel = confusion_grid(len(done), max(len(r.summary["per_class_accuracy"]) for r in done),
                                       max(map(len, names)))
    # Constrained layout: tight_layout clips titles beside long rotated names and colour bars.
    fig, axes = plt.subplots(rows, cols, figsize=(panel * cols, panel * rows), dpi=100, squeeze=False, layout="constrained")
    for ax in axes.flat[len(done):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, done):
        counts = np.array(r.summary["confusion_matrix"])
        classes = list(r.summary["per_class_accuracy"])
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        if len(classes) <= MANY_CLASSES:
            for i, j in np.ndindex(counts.shape):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if share[i, j] > 0.5 else "black")
        else:
            fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="share of the true class")
        labels = 7 if len(classes) <= MANY_CLASSES else 5
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=labels)
        ax.set_yticks(range(len(classes)), classes, fontsize=labels)
        ax.set(xlabel="predicted", ylabel="true", title=f"{r.name}: {r.summary['test_accuracy']:.2%}")
    fig.savefig(out / CONFUSION_PNG)
    plt.close(fig)


def run_legend(ax, n_runs: int) -> None:
    """The legend of the runs beside the axes, on the right (tight_layout makes room): it never
    covers a line or bar, however many runs; a column per 20 runs."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, ncols=1 + (n_runs - 1) // 20)


def compare_main(argv: list[str]) -> int:
    return run_command(_compare, argv)


def _compare(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="cifar-dist compare",
        description="Compare runs from their run directories alone (config.yaml, summary.json, metrics.jsonl): "
                    "print a table of the config keys that differ, final and best test accuracy, training seconds, "
                    f"images/s, world size and per-class accuracy; write {CURVES_PNG} (test accuracy and losses "
                    f"against epochs, named by the swept values), {PER_CLASS_PNG} (per-class accuracy grouped by run) "
                    f"and {CONFUSION_PNG} (a confusion matrix per run). On a search's sweep dir also: the best trial, "
                    f"the trials ranked, {PARAMS_PNG} (the final metric against each parameter); pruned trials grey.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="a run directory, or a folder searched recursively for run directories")
    parser.add_argument("--out", type=Path, metavar="DIR", help="folder for the plots (default: the first sweep directory given, "
                        "else the current directory)")
    args = parser.parse_args(argv)
    runs = load_runs(find_runs(args.paths))
    out = args.out or next((p for p in args.paths if not RunDir(p).is_run()), Path.cwd())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, a file on the way, no permission
        why = "a file of that name is there" if out.is_file() else e.strerror
        raise UserError(f"--out: cannot make the folder {out} ({why}); name a folder for the plots") from None
    print(compare_tables(runs))
    study = any(r.trial for r in runs)
    if study:
        print("\n" + study_tables(runs))
    plot_curves(runs, out)
    written = [CURVES_PNG]
    if study and differing_keys(runs) and any(r.trial and r.trial["value"] is not None for r in runs):
        plot_params(runs, out)
        written.append(PARAMS_PNG)
    if any(r.summary for r in runs):  # per-class accuracy and confusion counts come from summary.json
        plot_per_class(runs, out)
        plot_confusions(runs, out)
        written += [PER_CLASS_PNG, CONFUSION_PNG]
    print(f"\nplots: {', '.join(str(out / name) for name in written)}")
    return 0
