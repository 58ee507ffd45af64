"""Helpers for the sweep and Slurm tests: the real dev cluster (slurm/dev-cluster.sh), the real
`python jobs/submit.py` command, and waits with deadlines (a failing test dumps the job logs)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from cifar_dist.rundir import RunDir
from tests.helpers import PY, ROOT, TINY

DEV_CLUSTER = ROOT / "slurm" / "dev-cluster.sh"
SUBMIT = ROOT / "jobs" / "submit.py"
SLURM_CONF = Path(os.environ.get("CIFAR_DIST_SLURM_DIR", "/tmp/cifar-dist-slurm")) / "slurm.conf"
CLUSTER_LOCK = Path("/tmp/cifar-dist-slurm-tests.lock")

# TINY as a spec's `overrides` mapping: typed YAML values, as a user would write them.
TINY_OVERRIDES: dict[str, Any] = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in TINY)}


def cluster_skip_reason(nodes: int) -> str | None:
    if os.geteuid() != 0:
        return "the dev Slurm cluster needs root (slurmd, munged, network namespaces)"
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", "srun") if not shutil.which(t)]
    if nodes > 1:
        missing += [t for t in ("ip", "nsenter", "unshare") if not shutil.which(t)]
    if missing:
        return f"Slurm packages missing ({', '.join(missing)}): apt-get install slurm-wlm munge iproute2 (make test does)"
    return None


@contextlib.contextmanager
def dev_cluster(nodes: int) -> Iterator[dict[str, str]]:
    """A running dev cluster of `nodes` nodes for the block; taken down afterwards, always. There is
    one per machine: a second test run on it (another checkout) waits here for its turn."""
    reason = cluster_skip_reason(nodes)
    if reason:
        pytest.skip(reason)
    with open(CLUSTER_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        munge_before = munged_running()
        up = dev_cluster_cmd("up", "--nodes", str(nodes))
        try:
            assert up.returncode == 0, f"dev-cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
            yield {"SLURM_CONF": str(SLURM_CONF)}
        finally:
            down = dev_cluster_cmd("down")
            assert down.returncode == 0, f"dev-cluster.sh down failed:\n{down.stdout}\n{down.stderr}"
            assert leftovers(munge_before) == [], "dev-cluster.sh down left these behind"


def dev_cluster_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEV_CLUSTER), *args], capture_output=True, text=True, timeout=180)


def munged_running() -> bool:
    return any(p.info["name"] == "munged" for p in psutil.process_iter(["name"]))


def leftovers(munge_before: bool) -> list[str]:
    """Everything `up` makes that is still there: daemons, job steps, namespaces, the bridge and
    veths, /etc/hosts lines, the state dir (and munged, if `up` started it)."""
    found = [f"process {p.info['name']} ({p.pid})" for p in psutil.process_iter(["name"])
             if p.info["name"] in ("slurmctld", "slurmd", "slurmstepd")]
    if munged_running() and not munge_before:
        found.append("munged")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"namespace {line.split()[0]}" for line in netns.splitlines() if line.startswith("cdsl-")]
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if ": cdsl-" in line]
    found += [f"/etc/hosts: {line}" for line in Path("/etc/hosts").read_text().splitlines() if "cifar-dist-slurm" in line]
    if SLURM_CONF.parent.exists():
        found.append(str(SLURM_CONF.parent))
    return found


def slurm_env(cache_dir: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """What a user's shell would hold: a data cache, wandb offline. SLURM_CONF is deliberately
    absent: the `local` profiles find the dev cluster by themselves."""
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("SLURM_", "SUBMITIT_")) or k in ("MASTER_ADDR", "MASTER_PORT")]:
        del env[key]
    env.update(CIFAR_DIST_CACHE=str(cache_dir), WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp),
               PYTHONUNBUFFERED="1", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def with_conf(env: dict[str, str]) -> dict[str, str]:
    """For the tests' own Slurm commands (squeue, scontrol, scancel)."""
    return {**env, "SLURM_CONF": str(SLURM_CONF)}


def write_spec(path: Path, name: str, sweep: dict[str, Any], cluster: str = "local", base: str = "debug",
               overrides: dict[str, Any] | None = None, resources: dict[str, Any] | None = None) -> Path:
    spec = {"name": name, "cluster": cluster, "base": base, "overrides": {**TINY_OVERRIDES, **(overrides or {})},
            "sweep": sweep, "resources": {"time_min": 10, "signal_delay_s": 30, **(resources or {})}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def submit(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(SUBMIT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """`python jobs/submit.py ARGS` in the background (for races and for `wait` across an outage)."""
    return subprocess.Popen([PY, str(SUBMIT), *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def submitted(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = submit(args, env, cwd)
    assert proc.returncode == 0, f"submit {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def record(sweep_dir: Path) -> dict[str, Any]:
    return json.loads((sweep_dir / "sweep.json").read_text())


def job_ids(sweep_dir: Path) -> list[str]:
    return [p["job_id"] for p in record(sweep_dir)["points"]]


def status(sweep_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    proc = submit(["status", str(sweep_dir), "--json"], env, sweep_dir)
    assert proc.returncode == 0, f"status exited {proc.returncode}\n{proc.stderr}"
    return json.loads(proc.stdout)


def logs(sweep_dir: Path, tail: int = 3000) -> str:
    parts = []
    for f in sorted((sweep_dir / "submitit").glob("*_log.*")):
        parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
    return "\n".join(parts)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, sweep_dir: Path | None = None,
             poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs(sweep_dir) if sweep_dir else ''}")
        time.sleep(poll)


def wait_done(sweep_dir: Path, env: dict[str, str], timeout: float = 240) -> list[dict[str, Any]]:
    """`wait` until nothing is queued; every point must be done."""
    proc = submit(["wait", str(sweep_dir), "--poll", "1", "--timeout", str(timeout)], env, sweep_dir, timeout=timeout + 60)
    assert proc.returncode == 0, f"wait exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{logs(sweep_dir)}"
    states = status(sweep_dir, env)
    assert [s["state"] for s in states] == ["done"] * len(states), states
    return states


def newest_step(run_dir: Path) -> int:
    # The run dir's own reader: it stops at a line the training process is still writing.
    return max((r.get("step", 0) for r in RunDir(run_dir).metrics()), default=0)


def squeue(env: dict[str, str]) -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], env=with_conf(env), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n")[:-1]


def scontrol(args: list[str], env: dict[str, str], check: bool = True) -> None:
    proc = subprocess.run(["scontrol", *args], env=with_conf(env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 or not check, f"scontrol {args}: {proc.stderr}"


def job_fields(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` of one job as {field: value} (it knows ended jobs for MinJobAge, 300 s by default)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=with_conf(env), capture_output=True, text=True,
                          timeout=30)
    return dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)


def job_state(job_id: str, env: dict[str, str]) -> str:
    """Slurm's own state of a job."""
    return job_fields(job_id, env).get("JobState", "UNKNOWN")


ENDED = ("FAILED", "COMPLETED", "CANCELLED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL")


def job_over(job_id: str, env: dict[str, str]) -> bool:
    """Slurm is done with the job: scontrol names an ended state and squeue, which lists a job until
    it has finished completing, no longer does (scontrol can say COMPLETED first)."""
    return job_state(job_id, env) in ENDED and not any(line.split()[0] == job_id for line in squeue(env))


def restart_requeued(job_id: str, sweep_dir: Path, env: dict[str, str], timeout: float = 240,
                     until_running: bool = False) -> None:
    """Start a requeued sweep point's job now rather than after Slurm's two-minute hold, and see
    the point through to done (or, `until_running`, until its next life runs)."""

    def done() -> bool:
        state = job_state(job_id, env)  # first: a job that ended before `status` looks has its summary by then
        [point] = [p for p in status(sweep_dir, env) if p["job_id"] == job_id]
        return point["state"] == "done" or until_running and state == "RUNNING"

    start_requeued(job_id, env, done, timeout, f"requeued job {job_id} to run again{'' if until_running else ' and finish'}",
                   sweep_dir)


def start_requeued(job_id: str, env: dict[str, str], until: Callable[[], Any], timeout: float, what: str,
                   sweep_dir: Path | None = None) -> None:
    """Start a requeued job now, rather than after Slurm's two-minute hold, and wait until `until()`.
    Slurm holds a requeued job (PENDING, Reason=BeginTime) until its nodes can no longer confuse its
    old life with its new one: a node revokes the old life's job credential when it ends it, and
    refuses a launch whose credential is not newer than that revocation (whole seconds: "Job
    credential revoked", and the job ends FAILED). So the job is released once Slurm holds it, no
    step of its old life is left on any node (its slurmstepd gone: the revocation is done), and the
    clock has passed that second; once only. A job that then ends without `until()` fails here."""

    def held() -> float | None:
        fields = job_fields(job_id, env)
        if (fields.get("JobState"), fields.get("Reason")) != ("PENDING", "BeginTime") or steps_on_nodes(fields["JobId"]):
            return None
        return time.time()

    old_life_gone = wait_for(held, timeout, f"requeued job {job_id} held by Slurm, its old life gone", sweep_dir, poll=0.2)
    wait_for(lambda: int(time.time()) > int(old_life_gone), 5, "the next second", poll=0.05)
    scontrol(["update", f"JobId={job_id}", "StartTime=now"], env)

    def ready() -> Any:
        over = job_over(job_id, env)  # looked at before until(): a job seen over here is over for until() too
        if value := until():
            return value
        assert not over, f"{what}: the released job ended instead: {job_fields(job_id, env)}\n" + (
            logs(sweep_dir) if sweep_dir else "")
        return False

    wait_for(ready, timeout, what, sweep_dir, poll=1)


def steps_on_nodes(raw_job_id: str) -> list[int]:
    """The pids of the slurmstepd processes of job `raw_job_id` (Slurm's JobId, not an array's id) on
    this machine, where every dev-cluster node runs: each is named `slurmstepd: [<job id>.<step>]`."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "slurmstepd" and f"[{raw_job_id}." in " ".join(proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def task_pids(job_id: str, rank: int) -> list[int]:
    """The pids of Slurm task `rank` (SLURM_PROCID) of job `job_id` ("12" or "12_3")."""
    raw, _, index = job_id.partition("_")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "submitit.core._submit" not in (proc.info["cmdline"] or []):
                continue
            e = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ids = (e.get("SLURM_ARRAY_JOB_ID"), e.get("SLURM_ARRAY_TASK_ID")) if index else (e.get("SLURM_JOB_ID"), "")
        if ids == (raw, index) and e.get("SLURM_PROCID") == str(rank):
            found.append(proc.pid)
    return found


# The golden dry run's resources, in the internal form and then in each other spelling a user brings.
INTERNAL = {"nodes": 2, "gpus_per_node": 8, "tasks_per_node": 8, "cpus_per_task": 8, "mem": 400, "time_min": 240,
            "signal_delay_s": 120, "array_parallelism": 2, "max_timeouts": 3, "partition": "gpu-preempt",
            "account": "my-lab", "qos": "high", "constraint": "a100&ib",
            "sbatch": {"gres": "gpu:a100:8", "exclude": "node[1-3]", "reservation": "maint-x", "mail_type": "END,FAIL",
                       "exclusive": True, "nice": 10}}


SPELLINGS = {
    "slurm": {"nodes": 2, "gpus-per-node": 8, "ntasks-per-node": 8, "cpus-per-task": 8, "mem": "400G",
              "time": "4:00:00", "signal_delay_s": 120, "array_parallelism": 2, "partition": "gpu-preempt",
              "account": "my-lab", "qos": "high", "constraint": "a100&ib", "gres": "gpu:a100:8", "exclusive": True,
              "reservation": "maint-x", "sbatch": {"exclude": "node[1-3]", "mail-type": "END,FAIL", "nice": 10}},
    "submitit": {"nodes": 2, "gpus_per_node": 8, "tasks_per_node": 8, "cpus_per_task": 8, "mem_gb": 400,
                 "timeout_min": 240, "slurm_signal_delay_s": 120, "slurm_array_parallelism": 2, "max_num_timeout": 3,
                 "slurm_partition": "gpu-preempt", "slurm_account": "my-lab", "slurm_qos": "high",
                 "slurm_constraint": "a100&ib", "slurm_gres": "gpu:a100:8", "slurm_exclusive": True,
                 "sbatch": {"exclude": "node[1-3]", "reservation": "maint-x", "mail_type": "END,FAIL", "nice": 10}},
    "sbatch lines": {"signal_delay_s": 120, "array_parallelism": 2, "sbatch": {
        "nodes": 2, "gpus-per-node": 8, "ntasks-per-node": 8, "cpus-per-task": 8, "mem": "409600", "time": "0-04:00",
        "partition": "gpu-preempt", "account": "my-lab", "qos": "high", "constraint": "a100&ib", "gres": "gpu:a100:8",
        "exclude": "node[1-3]", "reservation": "maint-x", "mail-type": "END,FAIL", "exclusive": True, "nice": 10}},
}
