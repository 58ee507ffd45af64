"""`cifar-dist compare`: the table and plots made from run directories alone."""

from __future__ import annotations

import os
import subprocess

import pytest
from PIL import Image

from cifar_dist.compare import (
    CONFUSION_PANEL,
    CONFUSION_PNG,
    CURVES_PNG,
    CURVES_SIZE,
    PER_CLASS_PNG,
    PER_CLASS_SIZE,
    compare_main,
    confusion_grid,
)
from cifar_dist.rundir import RunDir
from tests.helpers import PY, ROOT, TINY, run, train_cmd

COMPARE = [PY, "-m", "cifar_dist.cli", "compare"]


@pytest.fixture(scope="module")
def sweep(cache_dir, tmp_path_factory):
    """A sweep folder with two finished runs that differ in seed and learning rate, trained side by side."""
    root = tmp_path_factory.mktemp("sweep")
    env = dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(train_cmd(*TINY, "data.synthetic_train=640", f"seed={seed}", f"train.lr={lr}",
                                        f"run.dir={root / 'grid' / name}"),
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, seed, lr in (("lr0.05", 0, 0.05), ("lr0.1", 1, 0.1))]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    return root


def parse_table(lines: list[str]) -> dict[str, dict[str, str]]:
    """A printed table (a header line, then one line per run; no cell holds a space) as run -> column -> cell."""
    head = lines[0].split()
    return {cells[0]: dict(zip(head, cells)) for cells in (line.split() for line in lines[1:])}


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def test_compare_table_and_plots_from_a_sweep_dir(sweep, env):
    proc = run(COMPARE + [str(sweep)], env)  # no --out: the plots go to the sweep folder
    text = proc.stdout.split("\n\n")
    main, per_class = text[0].splitlines(), text[1].splitlines()
    assert main[0] == "2 runs; config keys that differ: seed, train.lr"  # not run.dir or run.id: they always differ
    table, classes = parse_table(main[1:]), parse_table(per_class[1:])
    assert set(table) == set(classes) == {"lr0.05", "lr0.1"}  # named by their paths below the common folder
    for label, row in table.items():
        s = RunDir(sweep / "grid" / label).summary()
        assert (row["seed"], row["train.lr"]) == {"lr0.05": ("0", "0.05"), "lr0.1": ("1", "0.1")}[label]
        assert row["final_acc"] == pct(s["test_accuracy"]) and row["best_acc"] == pct(s["best_test_accuracy"])
        assert row["train_s"] == f"{s['train_seconds']:.1f}" and row["images/s"] == f"{s['images_per_second']:.0f}"
        assert row["world"] == str(s["world_size"]) == "1"
        assert {c: classes[label][c] for c in s["per_class_accuracy"]} == {
            c: pct(v) for c, v in s["per_class_accuracy"].items()}

    rows, cols, panel = confusion_grid(2, 10, len("automobile"))
    assert (rows, cols, panel) == (1, 2, CONFUSION_PANEL)
    assert confusion_grid(5, 10, 10) == (2, 4, CONFUSION_PANEL)  # CIFAR-10: the smallest panel, four to a row
    expected = {CURVES_PNG: CURVES_SIZE, PER_CLASS_PNG: PER_CLASS_SIZE,
                CONFUSION_PNG: (CONFUSION_PANEL * cols, CONFUSION_PANEL * rows)}
    for name, (w, h) in expected.items():
        with Image.open(sweep / name) as img:
            img.verify()  # a whole, valid PNG
        with Image.open(sweep / name) as img:
            assert (img.format, img.size) == ("PNG", (round(100 * w), round(100 * h))), name
            assert len(img.convert("L").getcolors()) > 10, f"{name} is blank"


def test_compare_run_dirs_writes_to_out_and_rejects_what_is_not_a_run(sweep, tmp_path, monkeypatch, capsys):
    runs = [str(sweep / "grid" / "lr0.05"), str(sweep / "grid" / "lr0.1")]
    assert compare_main(runs + ["--out", str(tmp_path / "plots")]) == 0
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {CURVES_PNG, PER_CLASS_PNG, CONFUSION_PNG}
    # Given run dirs only, the default is the current directory.
    monkeypatch.chdir(tmp_path)
    assert compare_main(runs) == 0
    assert (tmp_path / CURVES_PNG).is_file()

    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    for bad, said in ((tmp_path / "empty", "holds no run directory (none with summary.json or config.yaml)"),
                      (tmp_path / "missing", "not a directory")):
        assert compare_main([str(bad)]) == 2
        assert capsys.readouterr().err == f"error: {bad}: {said}\n"
