"""The run's files taken away from it mid-run: its disk full, its folders read-only, a file's place
taken, memory too small, a locale that cannot spell its class names. Each stops in one `error:` line
with nothing half-written, and once the cause is gone the same command finishes the run as an
uninterrupted one would (issue #28). The one-line refusals themselves are in the bad-input
catalogue (test_catalogue.py); benchmarks/fault_campaign.py draws these faults at random moments."""

from __future__ import annotations

import os
import subprocess

import pytest

from cifar_dist.rundir import CLASS_PLOT, LOSS_PLOT, MODEL, SUMMARY, RunDir, load_weights
from tests.helpers import FAULTS, PY, TINY, assert_same_run, run, train_cmd
from tests.helpers.data import write_image_tree

CONFIG = [*TINY, "checkpoint.every_steps=7"]  # 40 steps of the blitz net, a checkpoint every 7
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs or drops root's rights: run as root")


@pytest.fixture(scope="module")
def module_env(cache_dir):
    return dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, module_env):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run(train_cmd(*CONFIG, f"run.dir={run_dir}"), module_env)
    return run_dir


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB file system of its own (tmpfs): room for the tiny run (~2 MB), not for a filler file too."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The faulted run's refusal: exit code 2, no traceback, its last line an `error:` line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


@ROOT_ONLY
def test_a_full_disk_stops_in_one_line_and_the_run_resumes_identical_once_space_is_freed(small_disk, reference,
                                                                                        module_env):
    run_dir, filler = small_disk / "run", small_disk / "filler"
    faulted = run([*FAULTS, *CONFIG, f"run.dir={run_dir}"], {**module_env, "CIFAR_DIST_FAULT": f"fill_disk:0:10:{filler}"},
                  check=False)
    said = one_error_line(faulted)
    assert said.startswith(f"error: cannot write checkpoint {run_dir}/checkpoints/step_") and \
        "(No space left on device)" in said
    assert not list(run_dir.rglob(".*tmp*")), "a temporary file is left to fill the disk again"
    refused = run(train_cmd(*CONFIG, f"run.dir={run_dir}"), module_env, check=False)  # still full: refused again
    assert "(No space left on device)" in one_error_line(refused) and not list(run_dir.rglob(".*tmp*"))
    filler.unlink()
    resumed = run(train_cmd(*CONFIG, f"run.dir={run_dir}"), module_env)
    assert f"resumed from {run_dir}/checkpoints/step_00000007" in resumed.stdout
    assert_same_run(reference, run_dir)


@ROOT_ONLY
def test_a_run_dir_made_read_only_stops_in_one_line_and_resumes_identical_once_writable(tmp_path, reference,
                                                                                       module_env):
    """Root may write anywhere: the run trains without that right (setpriv), as a user would."""
    run_dir = tmp_path / "run"
    no_override = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    faulted = run([*no_override, *FAULTS, *CONFIG, f"run.dir={run_dir}"],
                  {**module_env, "CIFAR_DIST_FAULT": "deny_writes:1:5"}, check=False)
    said = one_error_line(faulted)
    assert said.startswith("error: cannot write checkpoint") and "(Permission denied)" in said
    assert not list(run_dir.rglob(".*tmp*"))
    for d in (run_dir, run_dir / "checkpoints"):
        d.chmod(0o755)
    resumed = run(train_cmd(*CONFIG, f"run.dir={run_dir}"), module_env)
    assert f"resumed from {run_dir}/checkpoints/step_00000021" in resumed.stdout
    assert_same_run(reference, run_dir)


@ROOT_ONLY
def test_a_data_cache_on_a_full_disk_is_decoded_in_memory_with_a_warning(small_disk, module_env, tmp_path):
    """The cache of 2,560 synthetic images (7.9 MB) cannot fit on the 4 MB disk: the run goes on."""
    env = {**module_env, "CIFAR_DIST_CACHE": str(small_disk)}
    proc = run(train_cmd(*TINY, "data.synthetic_train=2560", "train.epochs=1", f"run.dir={tmp_path / 'run'}"), env)
    assert "warning: cannot write the data cache" in proc.stdout and "(No space left on device)" in proc.stdout
    assert "Traceback" not in proc.stderr and RunDir(tmp_path / "run").summary()
    assert [p.suffix for p in small_disk.iterdir()] == [".lock"]  # no half-written cache, no temporary file


def test_outputs_that_fail_before_summary_json_are_completed_by_the_rerun(tmp_path, reference, module_env):
    """A run is finished once every output is written: a plot that cannot be written (its place taken
    by a folder here; a full disk likewise) leaves no summary.json, and the same command completes
    the plots, the tracker's end and summary.json from the last checkpoint."""
    run_dir = tmp_path / "run"
    args = [*CONFIG, "tracking.backend=tensorboard", f"run.dir={run_dir}"]
    faulted = run([*FAULTS, *args], {**module_env, "CIFAR_DIST_FAULT": f"mkdir:0:3:{LOSS_PLOT}"}, check=False)
    assert one_error_line(faulted).startswith(f"error: cannot write {run_dir / LOSS_PLOT} (Is a directory)")
    assert not (run_dir / SUMMARY).exists() and (run_dir / MODEL).exists()
    (run_dir / LOSS_PLOT).rmdir()
    completed = run(train_cmd(*args), module_env)
    assert f"resumed from {run_dir}/checkpoints/step_00000040" in completed.stdout
    assert (run_dir / LOSS_PLOT).is_file() and (run_dir / CLASS_PLOT).is_file()
    assert_same_run(reference, run_dir)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert "summary/text_summary" in events.Tags()["tensors"]  # the tracker's finish ran
    again = run(train_cmd(*args), module_env)
    assert "already finished" in again.stdout


def test_a_start_out_of_memory_leaves_nothing_and_the_smaller_batch_runs_in_the_same_run_dir(tmp_path, module_env):
    """ulimit -v: room to start a run, not to put 8,192 images through the medium net (~5 GB)."""
    probe = ("import accelerate, cifar_dist.cli, cifar_dist.train; "
             "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])")
    limit = int(run([PY, "-c", probe], module_env).stdout) + 1_500_000  # KB: what the trainer maps, + 1.5 GB

    def limited(*overrides: str) -> subprocess.CompletedProcess:
        cmd = ["sh", "-c", f'ulimit -v {limit} && exec "$@"', "sh", *train_cmd(*TINY, "model.name=medium",
               "data.synthetic_train=8192", "train.device=cpu", "train.epochs=1", f"run.dir={tmp_path / 'run'}", *overrides)]
        return run(cmd, module_env, check=False)

    said = one_error_line(limited("train.batch_size=8192"))
    assert said.startswith("error: out of memory on cpu (DefaultCPUAllocator") and "lower train.batch_size (now 8192)" in said
    assert not (tmp_path / "run").exists()
    smaller = limited("train.batch_size=64", "data.train_subset=640")
    assert smaller.returncode == 0, smaller.stderr[-2000:]
    assert RunDir(tmp_path / "run").summary()["steps"] == 10


def test_class_names_outside_ascii_without_utf8_mode(tmp_path, module_env):
    """LC_ALL=C with Python's UTF-8 mode off: file names arrive as undecodable bytes. The classes
    keep their UTF-8 names (as in any other locale), the plots draw them, the console escapes them."""
    write_image_tree(tmp_path / "images", ["chat", "caf\u00e9", "\u732b"], {"train": 4, "test": 2})
    args = ["model.name=blitz", "data.source=imagefolder", f"data.path={tmp_path / 'images'}", "train.epochs=1",
            "train.batch_size=4", "run.progress=lines"]
    run(train_cmd(*args, f"run.dir={tmp_path / 'utf8'}"), module_env)
    env = {**module_env, "LC_ALL": "C", "PYTHONUTF8": "0", "CIFAR_DIST_CACHE": str(tmp_path / "cache")}
    proc = run(train_cmd(*args, f"run.dir={tmp_path / 'ascii'}"), env)
    assert "caf\\xe9" in proc.stdout and "Traceback" not in proc.stderr
    summary = RunDir(tmp_path / "ascii").summary()
    assert list(summary["per_class_accuracy"]) == ["caf\u00e9", "chat", "\u732b"]
    assert (tmp_path / "ascii" / CLASS_PLOT).is_file()
    assert load_weights(tmp_path / "ascii" / MODEL)["classes"] == load_weights(tmp_path / "utf8" / MODEL)["classes"]


def test_the_run_dir_replaced_mid_run_is_left_alone_and_the_rerun_starts_over(tmp_path, reference, module_env):
    run_dir = tmp_path / "run"
    faulted = run([*FAULTS, *CONFIG, f"run.dir={run_dir}"], {**module_env, "CIFAR_DIST_FAULT": "remove_dir:0:12:replace"},
                  check=False)
    assert "was removed or replaced while the run was writing in it" in one_error_line(faulted)
    assert list(run_dir.iterdir()) == [], "wrote into the directory that replaced its own"
    again = run(train_cmd(*CONFIG, f"run.dir={run_dir}"), module_env)
    assert "resumed from" not in again.stdout
    assert_same_run(reference, run_dir)

