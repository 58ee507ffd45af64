"""The network path's overhead: 2 gloo ranks on 1 Slurm node vs 2 ranks on 2 nodes.

The `fast` net's DDP training step (CPU, one core per rank, a fixed per-rank batch) runs as real
Slurm tasks of the dev cluster (slurm/dev-cluster.sh): first one node with both ranks, then two
namespace nodes with one rank each, talking over the virtual bridge. Per configuration it
records images/s of the DDP step, the time of one all-reduce of the gradients (the bytes DDP
moves each step, timed alone), and the same step without gradient sync (model.no_sync()), so
that step minus no-sync is the communication the step could not hide. Both configurations use
the same cores, so the difference is what the network path costs, not more compute.

    python benchmarks/bench_multinode.py [--steps 20] [--repeats 3] [--batch 32]

Needs root and the Slurm packages; it takes the dev cluster down at the end. It appends a table
to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_table, spread  # noqa: E402

DEV_CLUSTER = ROOT / "slurm" / "dev-cluster.sh"
SLURM_CONF = Path(os.environ.get("CIFAR_DIST_SLURM_DIR", "/tmp/cifar-dist-slurm")) / "slurm.conf"


def measure(steps: int, repeats: int, batch: int, env: dict[str, str]) -> dict[str, Any]:
    """One Slurm task (rank): `repeats` windows of `steps` DDP steps; rank 0's timings in seconds."""
    import socket
    import time

    import submitit
    import torch
    import torch.distributed as tdist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from cifar_dist.models import build_model

    os.environ.update(env)
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
    tdist.init_process_group("gloo")
    torch.manual_seed(0)
    net = build_model("fast")
    net.init_from_data(torch.randn(512, 3, 32, 32))
    net = net.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    grads = torch.zeros(sum(p.numel() for p in net.parameters() if p.requires_grad))

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        tdist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        tdist.barrier()
        return (time.perf_counter() - start) / steps

    for _ in range(3):  # warm-up: allocator, DDP buckets, gloo connections
        step()
    windows = []
    for _ in range(repeats):
        ddp = timed(step)
        allreduce = timed(lambda: tdist.all_reduce(grads))
        with model.no_sync():
            local = timed(step)
        windows.append({"step": ddp, "allreduce": allreduce, "no_sync": local})
    hosts = [None] * tdist.get_world_size()
    tdist.all_gather_object(hosts, socket.gethostname())
    result = {"hosts": hosts, "windows": windows, "grad_mb": grads.numel() * 4 / 1e6,
              "world": tdist.get_world_size(), "rank": tdist.get_rank()}
    tdist.destroy_process_group()
    return result


def run_config(nodes: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from submitit.slurm.slurm import SlurmExecutor

    up = subprocess.run(["bash", str(DEV_CLUSTER), "up", "--nodes", str(nodes)], capture_output=True, text=True)
    if up.returncode != 0:
        sys.exit(f"dev-cluster.sh up --nodes {nodes} failed: {up.stderr.strip()}")
    os.environ["SLURM_CONF"] = str(SLURM_CONF)
    ex = SlurmExecutor(folder / f"nodes{nodes}")
    ex.update_parameters(nodes=nodes, ntasks_per_node=2 // nodes, cpus_per_task=1, time=30, job_name="bench-multinode")
    env = {"GLOO_SOCKET_IFNAME": "eth0"} if nodes > 1 else {}  # as the local2 profile sets it
    job = ex.submit(measure, args.steps, args.repeats, args.batch, env)
    # Wait on the result files and squeue: submitit's own wait asks sacct, which the dev cluster lacks.
    pickles = [job.task(i).paths.result_pickle for i in range(job.num_tasks)]
    while not all(p.exists() for p in pickles):
        queued = subprocess.run(["squeue", "-h", "-j", job.job_id], capture_output=True, text=True).stdout.strip()
        if not queued and not all(p.exists() for p in pickles):
            break  # ended without results: results() below raises with the job's logs
        time.sleep(2)
    return next(r for r in job.results() if r["rank"] == 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timing window")
    parser.add_argument("--repeats", type=int, default=3, help="timing windows per configuration")
    parser.add_argument("--batch", type=int, default=32, help="images per rank per step")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: it starts the dev Slurm cluster")
    rows, grad_mb = [], 0.0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for nodes, label in ((1, "2 ranks, 1 node"), (2, "2 ranks, 2 namespace nodes")):
                r = run_config(nodes, args, Path(tmp))
                w = r["windows"]
                rate = [2 * args.batch / x["step"] for x in w]
                rows.append([label, ", ".join(r["hosts"]), spread(rate, "{:,.0f}"),
                             spread([1e3 * x["step"] for x in w]), spread([1e3 * x["allreduce"] for x in w]),
                             spread([1e3 * (x["step"] - x["no_sync"]) for x in w])])
                grad_mb = r["grad_mb"]
    finally:
        subprocess.run(["bash", str(DEV_CLUSTER), "down"], capture_output=True)
    notes = [
        "measures the network path's overhead: the same 2 ranks and cores, once over loopback on one node, once "
        "between two network namespaces over a veth bridge (the dev cluster's two nodes)",
        f"fast net, DDP over gloo, CPU, 1 thread per rank, {args.batch} images per rank per step (global "
        f"{2 * args.batch}); {args.steps} steps per window, {args.repeats} windows (median, min-max over windows); "
        f"{grad_mb:.1f} MB of fp32 gradients all-reduced per step",
        "all-reduce ms: one all-reduce of a gradient-sized buffer, alone; sync cost ms: DDP step minus the same "
        "step under no_sync() (the communication the backward pass did not hide)",
        f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs may share the machine)",
    ]
    append_table("2 ranks on 1 node vs 2 nodes: the network path (fast net, CPU, Slurm dev cluster)", notes,
                 ["configuration", "hosts", "images/s", "step ms", "all-reduce ms", "sync cost ms"], rows)


if __name__ == "__main__":
    main()
