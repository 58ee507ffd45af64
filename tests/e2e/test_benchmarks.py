"""The GPU benchmark script's plumbing, tried on the CPU: benchmarks/bench_fast.py runs the project
and a peer speed-run script side by side and appends one table. The real peer (airbench) is
CUDA-only and not part of this repository, so a stand-in peer plays it here: it reads the data
files the script hands it and prints a table in airbench's format, with numbers taken from that
data, so the test sees whether the hand-off and the reading of its output are right."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import torch

from tests.helpers import PY, ROOT, TINY, run, table_rows
from tests.helpers.data import write_image_tree

CLASSES = [f"c{i}" for i in range(10)]
TINY_FAST = ["model.compile=false", "train.epochs=2", "train.batch_size=50", "train.warmup_epochs=0.5",
             "train.whiten_bias_epochs=1", "train.log_every=2", "eval.batch_size=40"]

# The stand-in: airbench's table (a warm-up run, then runs 0..2, the run number on a run's first row
# only, an 'eval' row per run). Its "accuracy" is the share of test images of class 0 plus run/100, and
# it fails unless the images are uint8 N x 32 x 32 x 3 with one label per image.
PEER = '''
import sys, torch
train, test = (torch.load(f"cifar10/{s}.pt") for s in ("train", "test"))
for d in (train, test):
    assert d["images"].dtype == torch.uint8 and d["images"].shape[1:] == (32, 32, 3), d["images"].shape
    assert len(d["labels"]) == len(d["images"]) and len(d["classes"]) == 10
share = float((test["labels"] == 0).float().mean())
cols = ["run   ", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds"]
print("-" * 40); print("".join("|  %s  " % c for c in cols) + "|"); print("-" * 40)
for run in ["warmup", 0, 1, 2]:
    for epoch in [0, 1, "eval"]:
        tta = "%.4f" % (share + (run if run != "warmup" else 50) / 100) if epoch == "eval" else ""
        secs = "%.4f" % (1.5 + (run if run != "warmup" else 9)) if epoch == "eval" else "0.1000"
        first = str(run) if epoch == 0 else ""
        print("".join("|  %s  " % v for v in [first.rjust(6), str(epoch), "2.0000", "0.5000", "", tta, secs]) + "|")
'''


def make_archive(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_image_tree(root, CLASSES, {"train": 10, "test": 4})
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar10")
    return archive


def bench_fast(tmp_path: Path, env: dict, peer_code: str, repeats: int, *options: str) -> str:
    peer = tmp_path / "peer.py"
    peer.write_text(peer_code)
    results = tmp_path / "RESULTS.md"
    run([PY, "benchmarks/bench_fast.py", "--data", str(make_archive(tmp_path)), "--repeats", str(repeats),
         "--bare-steps", "3", "--peer", str(peer), *options, "--extra", *TINY_FAST],
        dict(env, CIFAR_DIST_RESULTS=str(results)))
    return results.read_text()


def test_bench_fast_runs_the_project_and_the_peer_on_the_same_images(env, tmp_path):
    text = bench_fast(tmp_path, env, PEER, repeats=2)
    header, project, peer = table_rows(text)
    assert header[:4] == ["side", "runs", "mean test accuracy %", "test accuracy %"]
    assert project[:2] == ["`cifar-dist train --config fast`", "2"] and "seeds 0..1" in text
    assert 0 <= float(project[2]) <= 100 and project[4].endswith(", 2 runs)")  # train seconds of both runs
    share = 100 * (torch.tensor([c for c in range(10) for _ in range(4)]) == 0).float().mean().item()
    assert peer[:2] == ["peer.py (peer)", "3"]  # the warm-up run is left out
    assert float(peer[2]) == round(share + 1.0, 2)  # mean of share + 0, 1, 2 (%): the peer saw the test labels
    assert peer[4] == "2.50 (1.50-3.50, 3 runs)"
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text().count(text) == 0  # the record is untouched


def test_a_failing_peer_costs_only_its_own_row(env, tmp_path):
    text = bench_fast(tmp_path, env, "raise SystemExit('RuntimeError: Found no NVIDIA driver')", repeats=1)
    header, project, peer = table_rows(text)
    assert project[1] == "1" and 0 <= float(project[2]) <= 100
    assert peer[0] == "peer.py (peer)"
    assert peer[1].startswith("failed (exit 1, 0 runs read): RuntimeError: Found no NVIDIA driver")


def test_a_peer_past_its_time_is_stopped_and_its_finished_runs_kept(env, tmp_path):
    text = bench_fast(tmp_path, env, PEER + "import time; time.sleep(600)\n", 1, "--peer-timeout", "20")
    header, project, peer = table_rows(text)
    assert project[1] == "1"
    assert peer[:2] == ["peer.py (peer, stopped after 20 s)", "3"]  # its rows were read although it never ended


# The seed tutorials' loop is ../shared/baselines/seed_loop.py, outside this repository (CI's clone has
# no ../shared): this stand-in prints its RESULT line, with a "test accuracy" of 1% per test image in
# the image tree it was given, so the test sees that the archive was unpacked for it.
SEED_LOOP = '''
import pathlib, sys
which, root, epochs = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
n = len(list((root / "test").rglob("*.jpg")))
with open(pathlib.Path(__file__).with_name("seed_loop_ran"), "a") as ran:
    ran.write(f"{epochs}\\n")
print(f"RESULT {which} device=cpu epochs={epochs} train_secs={7.5 * epochs:.1f} img_per_s=1 test_acc={n:.2f}")
'''


VS_SEED_TINY = ["train.epochs=2", "train.batch_size=20", "train.warmup_epochs=0.5", "eval.batch_size=40"]


def bench_vs_seed(tmp_path: Path, env: dict, *options: str) -> str:
    """The script on the tiny archive (tmp_path/tiny.tar.gz) with the stand-in seed loop: its stdout;
    its table is in tmp_path/RESULTS.md."""
    seed_loop = tmp_path / "seed_loop.py"
    seed_loop.write_text(SEED_LOOP)
    return run([PY, "benchmarks/bench_vs_seed.py", "--data", str(make_archive(tmp_path)), "--runs", "blitz:blitz",
                "--repeats", "1", "--seed-loop", str(seed_loop), *options, "--extra", *VS_SEED_TINY],
               dict(env, CIFAR_DIST_RESULTS=str(tmp_path / "RESULTS.md"))).stdout


def test_bench_vs_seed_times_the_seed_loop_on_the_unpacked_archive(env, tmp_path):
    bench_vs_seed(tmp_path, env)
    header, row = table_rows((tmp_path / "RESULTS.md").read_text())
    assert row[0] == "blitz (`--config blitz`)"
    assert row[1] == "2 epochs here: 15 s, 40.0%"  # the stand-in counted the 40 test images it was given
    assert 0 <= float(row[5].split("%")[0]) <= 100  # the project's final accuracy
    assert (tmp_path / "seed_loop_ran").exists()


def test_bench_vs_seed_with_a_recorded_seed_loop_runs_no_seed_loop(env, tmp_path):
    bench_vs_seed(tmp_path, env, "--recorded", "blitz=87:0.05")
    header, row = table_rows((tmp_path / "RESULTS.md").read_text())
    assert row[1] == "2 epochs: 87 s recorded, 5.0%"
    assert not (tmp_path / "seed_loop_ran").exists()


def test_bench_vs_seed_times_the_seed_epochs_before_each_project_run(env, tmp_path):
    bench_vs_seed(tmp_path, env, "--recorded", "blitz=87:0.05", "--seed-epochs", "blitz=1", "--repeats", "2")
    header, row = table_rows((tmp_path / "RESULTS.md").read_text())
    assert (tmp_path / "seed_loop_ran").read_text() == "1\n1\n"  # one epoch, before each of the 2 runs
    assert row[1] == "2 epochs: 87 s recorded, 5.0%; here 8 (8-8, 2 runs) s/epoch (1 timed before each run)"
    # a ratio for each run, to the seed epochs timed before it (with --recorded alone this column is "n/a")
    assert row[4].endswith("x, 2 runs)"), row[4]


def test_bench_vs_seed_first_seed_trains_the_runs_with_the_seeds_named(env, tmp_path):
    """--first-seed 3: run 0 trains with seed 3 (seeds held out from choosing a recipe): its test loss
    is that of the same run made by hand with seed=3, and not that of seed 0."""
    out = bench_vs_seed(tmp_path, env, "--recorded", "blitz=87:0.05", "--first-seed", "3")
    losses = {}
    for seed in (0, 3):
        direct = tmp_path / f"direct-{seed}"
        run([PY, "-m", "cifar_dist.train", "--config", "blitz", "data.source=imagefolder",
             f"data.path={tmp_path / 'tiny.tar.gz'}", *VS_SEED_TINY, f"seed={seed}", f"run.dir={direct}",
             "run.progress=none"], env)
        losses[seed] = f"test loss {json.loads((direct / 'summary.json').read_text())['test_loss']:.6f}"
    assert losses[0] != losses[3]  # else this test could not tell the seeds apart
    assert "run 0 (seed 3)" in out and losses[3] in out, out


def test_bench_ddp_runs_one_process_and_one_rank_per_core_in_turn(env, tmp_path):
    """The CPU half: the same config as one process of every core's threads and as one gloo rank per
    core, a row each, with the ratio of each round's images/s."""
    results = tmp_path / "RESULTS.md"
    tiny = [o for o in TINY if not o.startswith("run.progress")] + ["train.epochs=1"]
    run([PY, "benchmarks/bench_ddp.py", "--config", "debug", "--repeats", "2", "--extra", *tiny],
        dict(env, CIFAR_DIST_RESULTS=str(results)))
    cores = os.cpu_count() or 1
    text = results.read_text()
    assert f"1 process of {cores} threads vs {cores} gloo ranks" in text and "the arms in turn in each of 2 rounds" in text
    header, one, per_core = table_rows(text)
    assert header == ["arm", "images/s", "ratio to 1 process"]
    assert one[0] == f"1 process, {cores} threads" and one[1].endswith(", 2 runs)")
    assert per_core[0] == f"{cores} gloo ranks, 1 thread each" and per_core[2].endswith(", 2 runs)")
    assert float(per_core[2].split()[0]) > 0


def test_bench_options_runs_each_arm_with_its_overrides_and_seed(env, tmp_path):
    results = tmp_path / "RESULTS.md"
    tiny = [o for o in TINY if not o.startswith("run.progress")] + ["train.epochs=1"]
    run([PY, "benchmarks/bench_options.py", "--config", "debug", "--ranks", "1", "--rounds", "1",
         "--arm", "reference", "--arm", "smaller-batches", "train.batch_size=32", "--extra", *tiny],
        dict(env, CIFAR_DIST_RESULTS=str(results)))
    header, reference, smaller = table_rows(results.read_text())
    assert header[:4] == ["arm", "overrides", "images/s", "vs `reference`"]
    assert reference[:2] == ["`reference`", "(none)"] and reference[3] == "1.00x"
    assert smaller[:2] == ["`smaller-batches`", "train.batch_size=32"]
    # The arm's row is the run its overrides and round 0's seed make: the same run made by hand (one
    # rank with every core, as the script runs it) agrees.
    direct = tmp_path / "direct"
    run([PY, "-m", "cifar_dist.train", "--config", "debug", *tiny, "train.batch_size=32", "seed=0",
         f"run.dir={direct}", "run.progress=none"], dict(env, OMP_NUM_THREADS=str(os.cpu_count() or 1)))  # as the script sets
    accuracy = json.loads((direct / "summary.json").read_text())["test_accuracy"]
    assert smaller[-1] == f"{100 * accuracy:.2f} (1 run)"


def test_bench_options_refuses_two_arms_of_one_name(env, tmp_path):
    proc = run([PY, "benchmarks/bench_options.py", "--arm", "a", "--arm", "a", "train.lr=0.1"],
               dict(env, CIFAR_DIST_RESULTS=str(tmp_path / "RESULTS.md")), check=False)
    assert proc.returncode == 2 and "each arm needs its own name" in proc.stderr
    assert not (tmp_path / "RESULTS.md").exists()
