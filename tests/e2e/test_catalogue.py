"""A catalogue of bad inputs, through the real command line as a user types it. Each case: the
documented exit code, a last stderr line starting with `error:` (or the documented warning), no
Python traceback, and the case's whole sandbox (run dirs, the data cache, sweep dirs, inputs)
byte-identical before and after, unless the case documents what it (re)writes.

Each case gets a copy of one prepared sandbox: a finished tiny run, the decoded data cache for
it, image folders, a spec file, and a finished two-trial study (its sweep dir)."""

from __future__ import annotations

import fcntl
import fnmatch
import functools
import hashlib
import json
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cifar_dist.rundir import CONFIG, LOCK, METRICS, SUMMARY
from tests.helpers import FAULT_SCRIPT, PY, ROOT, TINY
from tests.helpers.data import write_image_tree

CLI = [PY, "-m", "cifar_dist.cli"]
SUBMIT = [PY, str(ROOT / "jobs" / "submit.py")]
TRAIN = [*CLI, "train", *TINY]
CLASSES = ["cat", "dog", "emu"]
DECODES = {"cache/*.lock"}  # a source being decoded takes the cache entry's lock file, which stays


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]  # the command, given the sandbox
    code: int  # the documented exit code
    said: str  # what the last line of stderr says
    setup: Callable[[Path], None] = lambda box: None
    changes: set[str] = field(default_factory=set)  # sandbox paths (glob patterns) the documented answer (re)writes
    env: dict[str, str] = field(default_factory=dict)  # set for the command (a fault to inject, a stray variable)


def sandbox_template(root: Path) -> Path:
    box = root / "box"
    env = dict(os.environ, CIFAR_DIST_CACHE=str(box / "cache"))
    subprocess.run([*TRAIN, f"run.dir={box / 'run'}", "checkpoint.every_steps=20"], env=env, cwd=root, check=True,
                   capture_output=True, timeout=300)
    write_image_tree(box / "images", CLASSES, {"train": 4, "test": 2})
    (box / "photo.png").write_bytes((box / "run" / "loss.png").read_bytes())
    (box / "spec.yaml").write_text(json.dumps({
        "name": "cat", "cluster": "local", "base": "debug", "overrides": {"train.epochs": 1},
        "sweep": {"grid": {"seed": [0, 1]}}, "resources": {"time_min": 30}}))
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in TINY)}
    (root / "study.yaml").write_text(json.dumps({
        "name": "cst", "cluster": "local", "base": "debug", "overrides": {**overrides, "train.epochs": 1},
        "search": {"trials": 2, "sampler": "random", "pruner": "none", "params": {"train.lr": {"choice": [0.05, 0.1]}}},
        "resources": {"time_min": 30}}))
    subprocess.run([*SUBMIT, str(root / "study.yaml"), "--executor", "debug", "--sweep-dir", str(box / "study")], env=env,
                   cwd=root, check=True, capture_output=True, timeout=300)
    return box


def snapshot(box: Path) -> dict[str, str]:
    return {str(p.relative_to(box)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(box.rglob("*"))}


def junk_bytes(size: int) -> bytes:
    """The same random bytes every time: which error a random file meets depends on its first bytes
    (from os.urandom, a file that is no checkpoint was refused as not plain data in most runs and
    failed in the pickle reader in some)."""
    return random.Random(0).randbytes(size)


def write(rel: str, data: str | bytes) -> Callable[[Path], None]:
    def setup(box: Path) -> None:
        (box / rel).parent.mkdir(parents=True, exist_ok=True)
        (box / rel).write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def spec_with(**changes) -> Callable[[Path], None]:
    def setup(box: Path) -> None:
        spec = json.loads((box / "spec.yaml").read_text())
        spec.update(changes)
        (box / "spec.yaml").write_text(json.dumps(spec))
    return setup


def remove(rel: str) -> Callable[[Path], None]:
    return lambda box: shutil.rmtree(box / rel) if (box / rel).is_dir() else (box / rel).unlink()


def empty(rel: str) -> Callable[[Path], None]:
    def setup(box: Path) -> None:
        for p in (box / rel).iterdir():
            p.unlink()
    return setup


def not_a_tar(box: Path) -> None:
    (box / "junk.tar.gz").write_bytes(junk_bytes(4096))


def tar_without_test(box: Path) -> None:
    with tarfile.open(box / "half.tar.gz", "w:gz") as tar:
        tar.add(box / "images" / "train", arcname="data/train")


def cut_before_last_trial(rel: str) -> Callable[[Path], None]:
    """A study journal as a restore from an older copy leaves it: its last trial's lines gone."""
    def setup(box: Path) -> None:
        lines = (box / rel).read_bytes().splitlines(keepends=True)
        last = max(i for i, line in enumerate(lines) if json.loads(line)["op_code"] == 4)  # Optuna's CREATE_TRIAL
        (box / rel).write_bytes(b"".join(lines[:last]))
    return setup


def new_run(box: Path) -> str:
    return f"run.dir={box / 'new'}"


FAULTED = [PY, str(ROOT / FAULT_SCRIPT), *TINY]  # a run with CIFAR_DIST_FAULT injected (tests/helpers/run_with_faults.py)
LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['lol'] * 10)}]\n" for i in range(9))


@functools.cache
def memory_limit_kb() -> int:
    """Virtual memory (ulimit -v) in which a run starts but a batch of 8,192 images through the medium
    net (~5 GB of activations) cannot fit: what importing the trainer maps (torch's libraries: GBs of
    address space) plus 1.5 GB."""
    probe = ("import accelerate, cifar_dist.cli, cifar_dist.train; "
             "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])")
    return int(subprocess.run([PY, "-c", probe], capture_output=True, text=True, check=True).stdout) + 1_500_000


def in_memory_limit(box: Path) -> list[str]:
    return ["sh", "-c", f'ulimit -v {memory_limit_kb()} && exec "$@"', "sh", *TRAIN, "model.name=medium",
            "data.synthetic_train=8192", "train.batch_size=8192", "train.device=cpu", new_run(box)]


def wide_tiff(box: Path) -> None:
    values = np.arange(32 * 32, dtype=np.int32).reshape(32, 32) * 1000  # up to ~10^6: beyond 16 bits
    Image.fromarray(values, mode="I").save(box / "images" / "train" / "dog" / "0001.tif")


CASES = [
    # ---- the config
    Case("unknown key", lambda b: [*TRAIN, "bogus=1", new_run(b)], 2, "error: bogus: unknown key"),
    Case("unknown nested key", lambda b: [*TRAIN, "train.epochz=1", new_run(b)], 2, "error: train.epochz: unknown key"),
    Case("text for a number", lambda b: [*TRAIN, "train.epochs=three", new_run(b)], 2, "expected an integer"),
    Case("a fraction for an integer", lambda b: [*TRAIN, "train.epochs=2.5", new_run(b)], 2, "expected an integer"),
    Case("zero epochs", lambda b: [*TRAIN, "train.epochs=0", new_run(b)], 2, "train.epochs: must be >= 1"),
    Case("infinite lr", lambda b: [*TRAIN, "train.lr=.inf", new_run(b)], 2, "train.lr: must be a finite number"),
    Case("nan lr", lambda b: [*TRAIN, "train.lr=.nan", new_run(b)], 2, "train.lr: must be a finite number"),
    Case("negative lr", lambda b: [*TRAIN, "train.lr=-1e-3", new_run(b)], 2, "train.lr: must be > 0"),
    Case("unknown model", lambda b: [*TRAIN, "model.name=vgg", new_run(b)], 2, "model.name: must be one of"),
    Case("unknown source", lambda b: [*TRAIN, "data.source=imagenet", new_run(b)], 2, "data.source: must be one of"),
    Case("source without a path", lambda b: [*TRAIN, "data.source=imagefolder", new_run(b)], 2, "data.path: is required"),
    Case("a path that is not there", lambda b: [*TRAIN, "data.source=imagefolder", f"data.path={b / 'nowhere'}",
                                                new_run(b)], 2, "data.path: does not exist"),
    Case("warm-up longer than training", lambda b: [*TRAIN, "train.warmup_epochs=5", new_run(b)], 2,
         "train.warmup_epochs: must be in [0, train.epochs]"),
    Case("an override without =", lambda b: [*TRAIN, "train", new_run(b)], 2, "expected dotted.key=value"),
    Case("unknown config name", lambda b: [*CLI, "train", "--config", "nope", new_run(b)], 2, "unknown config 'nope'"),
    Case("config file not YAML", lambda b: [*CLI, "train", "--config", str(b / "bad.yaml"), new_run(b)], 2,
         "is not valid YAML", write("bad.yaml", "train: {epochs: [\n")),
    Case("config file that is its own base", lambda b: [*CLI, "train", "--config", str(b / "loop.yaml"), new_run(b)], 2,
         "loop.yaml is already in the chain of bases (a cycle)", write("loop.yaml", "base: loop.yaml\n")),
    Case("config file with an unknown base", lambda b: [*CLI, "train", "--config", str(b / "b.yaml"), new_run(b)], 2,
         "base: unknown config 'mediun'", write("b.yaml", "base: mediun\n")),
    Case("a comma list for one number", lambda b: [*TRAIN, "train.lr=0.01,0.1", new_run(b)], 2,
         "to sweep over comma-separated values use cifar-dist sweep -m"),
    Case("launch of a launcher that is not there", lambda b: [*CLI, "launch", str(b / "no-torchrun")], 2,
         "launch: cannot run"),
    Case("config file holding a list", lambda b: [*CLI, "train", "--config", str(b / "list.yaml"), new_run(b)], 2,
         "must hold a mapping", write("list.yaml", "- 1\n- 2\n")),
    Case("config file with a typo", lambda b: [*CLI, "train", "--config", str(b / "typo.yaml"), new_run(b)], 2,
         "train.lrr: unknown key", write("typo.yaml", "train: {lrr: 0.1}\n")),
    Case("a config key given twice", lambda b: [*CLI, "train", "--config", str(b / "twice.yaml"), new_run(b)], 2,
         "train is given twice (lines 1 and 3)", write("twice.yaml", "train: {lr: 0.1}\nseed: 1\ntrain: {epochs: 1}\n")),
    Case("a config key in both spellings", lambda b: [*CLI, "train", "--config", str(b / "both.yaml"), new_run(b)], 2,
         "train.lr is given twice (lines 1 and 3)", write("both.yaml", "train.lr: 0.1\ntrain:\n  lr: 0.2\n")),
    Case("a billion laughs", lambda b: [*CLI, "train", "--config", str(b / "laughs.yaml"), new_run(b)], 2,
         "aliases expand it to more than 10,000 nodes", write("laughs.yaml", LAUGHS + "run: {name: *l8}\n")),
    Case("a config file that is not UTF-8", lambda b: [*CLI, "train", "--config", str(b / "latin1.yaml"), new_run(b)], 2,
         "is not UTF-8 text (byte 0xe9 at offset 15)", write("latin1.yaml", "run: {name: caf\u00e9}\n".encode("latin-1"))),
    Case("a config nested too deeply", lambda b: [*CLI, "train", "--config", str(b / "deep.yaml"), new_run(b)], 2,
         "is nested too deeply", write("deep.yaml", "a: " + "[" * 3000 + "]" * 3000 + "\n")),
    # ---- data
    Case("an archive that is not one", lambda b: [*TRAIN, "data.source=imagefolder", f"data.path={b / 'junk.tar.gz'}",
                                                  new_run(b)], 2, "not a readable tar archive", not_a_tar, DECODES),
    Case("an archive without test images", lambda b: [*TRAIN, "data.source=imagefolder",
                                                      f"data.path={b / 'half.tar.gz'}", new_run(b)], 2,
         "no test/<class>/<image> files found", tar_without_test, DECODES),
    Case("a class folder without images", lambda b: [*TRAIN, "data.source=imagefolder", f"data.path={b / 'images'}",
                                                     new_run(b)], 2, "class folder test/emu holds no images",
         empty("images/test/emu"), changes=DECODES),
    Case("an image that is not one", lambda b: [*TRAIN, "data.source=imagefolder", f"data.path={b / 'images'}",
                                                new_run(b)], 2, "0001.jpg: not a readable image",
         write("images/train/dog/0001.jpg", "this is text"), DECODES),
    Case("train and test classes differ", lambda b: [*TRAIN, "data.source=imagefolder", f"data.path={b / 'images'}",
                                                     new_run(b)], 2, "train and test classes differ",
         remove("images/test/emu"), DECODES),
    Case("CIFAR-10 files missing, no download", lambda b: [*TRAIN, "data.source=cifar10", f"data.path={b / 'images'}",
                                                           "data.download=false", new_run(b)], 2, "missing data_batch_1",
         changes=DECODES),
    Case("a batch larger than the data", lambda b: [*TRAIN, "train.batch_size=5000", new_run(b)], 2,
         "train.batch_size=5000 is larger than the training set"),
    Case("an image of 32-bit values", lambda b: [*TRAIN, "data.source=imagefolder", f"data.path={b / 'images'}",
                                                 new_run(b)], 2, "0001.tif: not a readable image", wide_tiff, DECODES),
    Case("a batch that does not fit in memory", in_memory_limit, 2, "out of memory on cpu",
         changes={"cache/synthetic-*"}),  # its data, valid, is decoded into the cache first
    Case("WORLD_SIZE with no launcher", lambda b: [*TRAIN, new_run(b)], 2, "WORLD_SIZE=2 is set but",
         env={"WORLD_SIZE": "2"}),
    # ---- the run directory
    Case("run.dir is a file", lambda b: [*TRAIN, f"run.dir={b / 'photo.png'}"], 2, "exists and is not a directory"),
    Case("run.dir under a file", lambda b: [*TRAIN, f"run.dir={b / 'photo.png' / 'run'}"], 2, "run.dir: cannot create"),
    Case("a run.dir name too long", lambda b: [*TRAIN, f"run.dir={b / ('a' * 300)}"], 2,
         "run.dir: cannot create"),
    Case("the run dir removed mid-run", lambda b: [*FAULTED, new_run(b)], 2, "was removed or replaced while the run",
         env={"CIFAR_DIST_FAULT": "remove_dir:0:7"}),
    Case("the run dir replaced mid-run", lambda b: [*FAULTED, new_run(b)], 2, "was removed or replaced while the run",
         changes={"new"}, env={"CIFAR_DIST_FAULT": "remove_dir:1:2:replace"}),
    Case("run.dir holds something else", lambda b: [*TRAIN, f"run.dir={b / 'images'}"], 2, "holds no cifar-dist run"),
    Case("run.dir holds another config", lambda b: [*TRAIN, "seed=9", f"run.dir={b / 'run'}"], 2,
         "holds a run with a different config (seed: 0 -> 9)"),
    Case("run.dir belongs to another run id", lambda b: [*TRAIN, "run.id=other", f"run.dir={b / 'run'}"], 2,
         "belongs to run id"),
    Case("an empty config.yaml", lambda b: [*TRAIN, f"run.dir={b / 'run'}"], 2, "is damaged (no run.id)",
         write(f"run/{CONFIG}", "")),
    Case("config.yaml that is not YAML", lambda b: [*TRAIN, f"run.dir={b / 'run'}"], 2, "is not a readable run config",
         write(f"run/{CONFIG}", "seed: [\n")),
    Case("a busy run dir", lambda b: [*TRAIN, f"run.dir={b / 'run'}"], 2, "is in use by"),  # locked by the test itself
    Case("a checkpoint of another net", lambda b: [*TRAIN, "model.name=medium", "checkpoint.allow_config_change=true",
                                                   f"run.dir={b / 'run'}"], 2, "does not fit this config's model",
         remove(f"run/{SUMMARY}")),
    # ---- evaluate
    Case("evaluate --json into a missing folder", lambda b: [*CLI, "evaluate", str(b / "run"), "--json",
                                                             str(b / "no" / "e.json")], 2, "--json: folder"),
    Case("evaluate what is not a run", lambda b: [*CLI, "evaluate", str(b / "images")], 2,
         "no model.pt and no valid checkpoint"),
    Case("evaluate on other classes", lambda b: [*CLI, "evaluate", str(b / "run"), "data.source=imagefolder",
                                                 f"data.path={b / 'images'}"], 2, "are not the data's",
         changes={"cache/imagefolder-*"}),  # valid data is decoded into the cache before the classes are compared
    Case("evaluate with a bad override", lambda b: [*CLI, "evaluate", str(b / "run"), "eval.batch_size=0"], 2,
         "eval.batch_size: must be >= 1"),
    Case("evaluate --json naming a folder", lambda b: [*CLI, "evaluate", str(b / "run"), "--json", str(b / "images")],
         2, "is a folder; name the file to write"),
    # ---- predict
    Case("predict from nothing", lambda b: [*CLI, "predict", "--checkpoint", str(b / "none.pt"), str(b / "photo.png")],
         2, "no such checkpoint file"),
    Case("predict from a file that is no checkpoint", lambda b: [*CLI, "predict", "--checkpoint", str(b / "junk.pt"),
                                                                 str(b / "photo.png")], 2,
         "refused, not a plain-data checkpoint", write("junk.pt", junk_bytes(2000))),
    Case("predict with --top-k 0", lambda b: [*CLI, "predict", "--checkpoint", str(b / "run"), str(b / "photo.png"),
                                              "--top-k", "0"], 2, "--top-k: must be >= 1"),
    Case("predict on a file that is no image", lambda b: [*CLI, "predict", "--checkpoint", str(b / "run"),
                                                          str(b / "notes.png")], 1, "not a readable image",
         write("notes.png", "plain text")),
    # ---- compare
    Case("compare what is not a folder", lambda b: [*CLI, "compare", str(b / "photo.png")], 2, "not a directory"),
    Case("compare a folder without runs", lambda b: [*CLI, "compare", str(b / "images")], 2, "holds no run directory"),
    Case("compare --out naming a file", lambda b: [*CLI, "compare", str(b / "run"), "--out", str(b / "photo.png")], 2,
         "--out: cannot make the folder"),
    Case("compare an empty summary.json", lambda b: [*CLI, "compare", str(b / "run"), "--out", str(b / "plots")], 2,
         "summary.json: damaged", write(f"run/{SUMMARY}", "")),
    Case("compare a torn metrics.jsonl", lambda b: [*CLI, "compare", str(b / "run"), "--out", str(b / "plots")], 0, "",
         lambda b: (b / "run" / METRICS).write_text((b / "run" / METRICS).read_text() + '{"step": 99, "tra'),
         changes={"plots", "plots/compare_curves.png", "plots/compare_per_class.png", "plots/compare_confusion.png"}),
    # ---- sweep specs and sweep dirs
    Case("spec with an unknown key", lambda b: [*SUBMIT, str(b / "spec.yaml"), "--sweep-dir", str(b / "sw")], 2,
         "colour: unknown key", spec_with(colour="red")),
    Case("spec with a bad name", lambda b: [*SUBMIT, str(b / "spec.yaml"), "--sweep-dir", str(b / "sw")], 2,
         "name: 'a b' may hold only", spec_with(name="a b")),
    Case("spec with an unknown base", lambda b: [*SUBMIT, str(b / "spec.yaml"), "--sweep-dir", str(b / "sw")], 2,
         "base: unknown config 'nope'", spec_with(base="nope")),
    Case("spec sweeping a key in both spellings", lambda b: [*SUBMIT, str(b / "twice.yaml"), "--sweep-dir", str(b / "sw")],
         2, "sweep.grid.train.lr is given twice (lines 6 and 7)",
         write("twice.yaml", "name: cat\ncluster: local\nbase: debug\nsweep:\n  grid:\n    train.lr: [0.1]\n"
                             "    train: {lr: [0.2]}\nresources: {time_min: 30}\n")),
    Case("spec sweeping an unknown key", lambda b: [*SUBMIT, str(b / "spec.yaml"), "--sweep-dir", str(b / "sw")], 2,
         "train.lrr: unknown key", spec_with(sweep={"grid": {"train.lrr": [0.1]}})),
    Case("spec asking more nodes than the cluster has", lambda b: [*SUBMIT, str(b / "spec.yaml"), "--sweep-dir",
                                                                   str(b / "sw")], 2, "resources.nodes: 4 nodes",
         spec_with(resources={"nodes": 4})),
    Case("spec with two spellings of the memory", lambda b: [*SUBMIT, str(b / "spec.yaml"), "--sweep-dir", str(b / "sw")],
         2, "resources.mem, resources.mem_gb: two spellings of the memory per node", spec_with(resources={
             "mem": "4G", "mem_gb": 4})),
    Case("spec and a command-line sweep", lambda b: [*CLI, "sweep", str(b / "spec.yaml"), "--grid", "seed=0,1"], 2,
         "give a spec file or a sweep on the command line, not both"),
    Case("command-line sweep of an unknown key", lambda b: [*CLI, "sweep", "--config", "debug", "--grid", "train.lrr=1,2",
                                                             "--sweep-dir", str(b / "sw")], 2, "train.lrr: unknown key"),
    Case("--cluster beside a spec", lambda b: [*CLI, "sweep", str(b / "spec.yaml"), "--cluster", "local"], 2,
         "where its points run is --executor"),
    Case("status of what is not a sweep", lambda b: [*SUBMIT, "status", str(b / "images")], 2, "not a sweep dir"),
    Case("status of a damaged sweep.json", lambda b: [*SUBMIT, "status", str(b / "sw")], 2, "damaged, not a sweep record",
         write("sw/sweep.json", '{"name": "cat", "poi')),
    Case("submit with no room to write", lambda b: ["prlimit", "--fsize=0", *SUBMIT, str(b / "spec.yaml"), "--executor",
                                                    "local", "--sweep-dir", str(b / "sw")], 1,
         "cannot write (File too large); nothing submitted"),  # RLIMIT_FSIZE: the kernel refuses every write, as a full disk
    # ---- a study's journal
    Case("status of a study with an empty journal", lambda b: [*SUBMIT, "status", str(b / "study")], 2,
         "study.journal: damaged, no readable study in it", write("study/study.journal", "")),
    Case("status of a study with a damaged journal", lambda b: [*SUBMIT, "status", str(b / "study")], 2,
         "study.journal: damaged, no readable study in it",
         lambda b: (b / "study/study.journal").write_bytes(b"\x00\xff\n" + (b / "study/study.journal").read_bytes())),
    Case("status of a study whose journal lost its tail", lambda b: [*SUBMIT, "status", str(b / "study")], 2,
         "study.journal: truncated: it holds 1 trial(s), but runs/ holds trial(s) 001",
         cut_before_last_trial("study/study.journal")),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return sandbox_template(tmp_path_factory.mktemp("catalogue"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, template: Path, tmp_path: Path):
    box = tmp_path / "box"
    shutil.copytree(template, box, symlinks=True)
    case.setup(box)
    before = snapshot(box)
    env = dict(os.environ, CIFAR_DIST_CACHE=str(box / "cache"), WANDB_MODE="offline", **case.env)
    env.pop("SLURM_CONF", None)
    held = open(box / "run" / LOCK, "a") if case.name == "a busy run dir" else None  # noqa: SIM115
    if held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        proc = subprocess.run(case.argv(box), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        if held:
            held.close()
    assert proc.returncode == case.code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if case.code:
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and case.said in last, last
    after = snapshot(box)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    unexplained = {k for k in changed if not any(fnmatch.fnmatch(k, pattern) for pattern in case.changes)}
    assert not unexplained, f"changed: {sorted(unexplained)}"
    assert not any(tmp_path.joinpath(p).exists() for p in ("runs", "sweeps")), "a default run or sweep dir appeared"


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
