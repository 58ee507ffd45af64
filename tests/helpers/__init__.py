"""What the tests share, imported by name (`from tests.helpers import run, TINY`): the commands under
test and their runs. Beside it: data.py (data sets in their real formats), slurm.py (the dev
cluster and the sweep command), search.py (studies), wandb_records.py (wandb's own record of a run),
run_with_faults.py (a training run with a fault injected at an exact point; a script)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cifar_dist.rundir import METRICS, MODEL, RunDir, load_weights

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
FAULT_SCRIPT = "tests/helpers/run_with_faults.py"  # a path from ROOT, where commands run: a training run with a fault
FAULTS = [PY, FAULT_SCRIPT]

# A tiny run: the blitz net on 1,280 synthetic images, 2 epochs of 64-image steps (~2 s of training).
TINY = [
    "model.name=blitz", "data.source=synthetic", "data.synthetic_train=1280", "data.synthetic_test=300",
    "train.epochs=2", "train.batch_size=64", "train.lr=0.05", "train.warmup_epochs=0.5", "train.log_every=5",
    "run.progress=lines",
]


def run(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300, check: bool = True,
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def train_cmd(*overrides: str, config: str | None = None) -> list[str]:
    return [PY, "-m", "cifar_dist.train"] + (["--config", config] if config else []) + list(overrides)


def torchrun(n: int, *args: str) -> list[str]:
    """`torchrun --nproc_per_node N ARGS` on a free port."""
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "localhost:0", *args]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights and identical records (wall-clock fields aside)."""
    import torch

    wa = load_weights(a / MODEL)["state_dict"]
    wb = load_weights(b / MODEL)["state_dict"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
    assert without_timing(read_jsonl(b / METRICS)) == without_timing(read_jsonl(a / METRICS))
    sa, sb = (RunDir(d).summary() for d in (a, b))
    for key in ("test_accuracy", "confusion_matrix", "test_loss", "steps", "per_class_accuracy"):
        assert sa[key] == sb[key], key


def last_step(run_dir: Path) -> int:
    """The step of the newest record in the run's metrics.jsonl; 0 before the first."""
    f = run_dir / METRICS
    lines = f.read_text().splitlines() if f.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `predicate` until it holds, failing if `proc` (the run it waits on) ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"process ended early with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    """Records minus the wall-clock fields, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_second")} for r in records]


def table_rows(text: str) -> list[list[str]]:
    """The cells of a Markdown table's rows (header included), as a benchmark writes them."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


def our_frames(stderr: str) -> list[str]:
    """Traceback frames in the project's own code (a launcher's own traceback has none)."""
    return [line for line in stderr.splitlines() if line.strip().startswith('File "') and "cifar_dist" in line]
