"""`cifar-dist serve` under load: closed-loop clients, batching on and off, torch and onnx, and
LitServe (with its own batching) serving the same net, side by side in one run; one table appended
to benchmarks/RESULTS.md.

    python benchmarks/bench_serve.py --run runs/medium [--clients 1 8 32 64] [--requests 2000]

Each server starts on 127.0.0.1 on a free port, alone, and is stopped before the next starts:

    torch, batched    cifar-dist serve RUN --max-batch 64 --max-delay-ms 5
    torch, batch 1    cifar-dist serve RUN --max-batch 1
    onnx, batched     cifar-dist serve MODEL.onnx --backend onnx ...   (exported from RUN first)
    onnx, batch 1     cifar-dist serve MODEL.onnx --backend onnx --max-batch 1
    LitServe          benchmarks/litserve_peer.py RUN, max_batch_size 64, batch_timeout 5 ms

Every request is the same kind for every server: one of 64 of the run's test images, a 32x32 PNG,
as the multipart file `files` (built once by httpx, sent as bytes). For each number of clients,
that many clients each send a request, wait for its answer, and send the next, until `--requests`
answers have come back (after a warm-up the table leaves out). A request that is not answered
200 counts as an error. For cifar-dist's servers the mean batch size comes from their /metrics.
A first row times GET /healthz at the most clients: what the client itself can send on this CPU.

Goals (issue 26): with batching at 32 clients, at least 2x the throughput of batch-1 serving and
at least LitServe's; p99 <= 50 ms at 8 clients; no errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import PY, ROOT, append_table
from PIL import Image

from cifar_dist import schema
from cifar_dist.config import config_from_dict
from cifar_dist.data import load_dataset
from cifar_dist.rundir import CONFIG, RunDir

WARMUP = 200  # requests at 8 clients before a server's measured runs
IMAGES = 64
PEER = ROOT / "benchmarks" / "litserve_peer.py"


@dataclass
class Server:
    name: str
    command: list[str]
    predict_path: str  # with its query
    ready_path: str
    ours: bool  # cifar-dist serve: its /metrics tell the batch sizes


@dataclass
class Result:
    server: str
    clients: int
    answered: int
    errors: int
    seconds: float
    latencies: list[float]  # of the answered requests, seconds
    mean_batch: float | None

    @property
    def throughput(self) -> float:
        return self.answered / self.seconds

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1] * 1000 if len(self.latencies) > 1 \
            else (self.latencies[0] * 1000 if self.latencies else float("nan"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_bodies(run: Path) -> tuple[list[bytes], str]:
    """IMAGES of the run's test images as multipart bodies (one PNG file each), and their content type."""
    cfg = config_from_dict(schema.read_yaml_mapping(run / CONFIG, "run config"))
    ds = load_dataset(cfg.data, announce=lambda s: print(s, file=sys.stderr))
    content_type = "multipart/form-data; boundary=cifar-dist-bench"  # one boundary: one content type for all
    bodies = []
    for i in range(min(IMAGES, len(ds.test_y))):
        png = io.BytesIO()
        Image.fromarray(ds.test_x[i].numpy()).save(png, "PNG")
        req = httpx.Request("POST", "http://127.0.0.1/", files=[("files", (f"{i}.png", png.getvalue(), "image/png"))],
                            headers={"content-type": content_type})
        bodies.append(req.read())
    return bodies, content_type


@contextlib.contextmanager
def running(server: Server, port: int, log: Path, env: dict[str, str]) -> Iterator[str]:
    """The server started, ready (its ready path answers 200), and stopped (SIGTERM) afterwards."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(server.command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # LitServe's worker processes go with it
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode}: {log.read_text().strip().splitlines()[-1:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + server.ready_path, timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("not ready after 300 s")
            time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def closed_loop(url: str, bodies: list[bytes], content_type: str, clients: int,
                      requests: int) -> tuple[int, list[float], float]:
    """`clients` clients, each sending its next request when its last is answered: (errors, latencies, seconds)."""
    latencies: list[float] = []
    errors = 0
    counter = itertools.count()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def one_client() -> None:
            nonlocal errors
            while (k := next(counter)) < requests:
                start = time.perf_counter()
                try:
                    r = await client.post(url, content=bodies[k % len(bodies)], headers={"content-type": content_type})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return errors, latencies, time.perf_counter() - start


def batch_totals(url: str) -> tuple[float, float]:
    """(batches, images) the server has run so far, from its /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(("cifar_dist_batch_size_count ", "cifar_dist_batch_size_sum ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("cifar_dist_batch_size_count", 0.0), values.get("cifar_dist_batch_size_sum", 0.0)


def measure(server: Server, url: str, bodies: list[bytes], content_type: str, clients: list[int], requests: int) -> list[Result]:
    asyncio.run(closed_loop(url + server.predict_path, bodies, content_type, 8, WARMUP))
    results = []
    for c in clients:
        before = batch_totals(url) if server.ours else None
        errors, latencies, seconds = asyncio.run(closed_loop(url + server.predict_path, bodies, content_type, c, requests))
        mean_batch = None
        if before is not None:
            after = batch_totals(url)
            mean_batch = (after[1] - before[1]) / max(after[0] - before[0], 1)
        results.append(Result(server.name, c, len(latencies), errors, seconds, latencies, mean_batch))
        r = results[-1]
        print(f"{server.name}, {c} clients: {r.throughput:.0f} req/s, p50 {r.percentile(50):.1f} ms, "
              f"p99 {r.percentile(99):.1f} ms, {errors} errors", file=sys.stderr)
    return results


def lscpu_model() -> str:
    proc = subprocess.run(["lscpu"], capture_output=True, text=True)
    return next((line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("Model name")),
                "unknown (no lscpu)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run (its model.pt, config and test set)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=2000, help="answers per number of clients (default 2000)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    args = parser.parse_args()
    summary = RunDir(args.run).summary()
    if summary is None:
        raise SystemExit(f"error: {args.run}: no summary.json (not a finished run)")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    load_before = os.getloadavg()
    bodies, content_type = request_bodies(args.run)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    onnx_file = work / "model.onnx"
    exported = subprocess.run([PY, "-m", "cifar_dist.cli", "export", str(args.run), "--format", "onnx", "--out",
                               str(onnx_file)], cwd=ROOT, env=env, capture_output=True, text=True)
    batching = ["--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    serve = [PY, "-m", "cifar_dist.cli", "serve"]
    servers = [
        Server("torch, batched", [*serve, str(args.run), *batching], "/v1/predict?top_k=5", "/readyz", True),
        Server("torch, batch 1", [*serve, str(args.run), "--max-batch", "1"], "/v1/predict?top_k=5", "/readyz", True),
        Server("onnx, batched", [*serve, str(onnx_file), "--backend", "onnx", *batching], "/v1/predict?top_k=5", "/readyz", True),
        Server("onnx, batch 1", [*serve, str(onnx_file), "--backend", "onnx", "--max-batch", "1"], "/v1/predict?top_k=5",
               "/readyz", True),
        Server("LitServe, batched", [PY, str(PEER), str(args.run), "--max-batch", str(args.max_batch), "--max-delay-ms",
                                     str(args.max_delay_ms)], "/predict", "/health", False),
    ]
    results: list[Result] = []
    failed: dict[str, str] = {}
    ceiling = None
    for server in servers:
        if server.name.startswith("onnx") and exported.returncode != 0:
            failed[server.name] = f"export failed: {(exported.stderr.strip().splitlines() or ['?'])[-1]}"
            continue
        if not server.ours and not _litserve_installed():
            failed[server.name] = "not installed: pip install 'cifar-dist[bench]'"
            continue
        try:
            with running(server, free_port(), work / f"{server.name.replace(', ', '_').replace(' ', '')}.log", env) as url:
                if ceiling is None:  # what the client can send: a route that does no work
                    errors, lat, secs = asyncio.run(closed_loop(url + "/healthz", [b""], "text/plain", max(args.clients),
                                                                args.requests))
                    ceiling = Result("client ceiling: GET /healthz", max(args.clients), len(lat), errors, secs, lat, None)
                results += measure(server, url, bodies, content_type, args.clients, args.requests)
        except RuntimeError as e:
            failed[server.name] = f"failed: {e}"
    load_after = os.getloadavg()

    def row(r: Result) -> list[str]:
        batch = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "n/a"
        return [r.server, str(r.clients), f"{r.answered:,}", f"{r.throughput:,.0f}", f"{r.percentile(50):.1f}",
                f"{r.percentile(99):.1f}", str(r.errors), batch]

    rows = [row(ceiling)] if ceiling else []
    rows += [row(r) for r in results]
    rows += [[name, why, "", "", "", "", "", ""] for name, why in failed.items()]
    notes = [
        f"CPU (lscpu): {lscpu_model()}; load average (1, 5, 15 min) {_load(load_before)} before, {_load(load_after)} after "
        f"(the machine is shared: other work ran beside this benchmark)",
        f"model: {args.run.name}, the {summary.get('model')} net, run {summary.get('run_id')}: {summary.get('epochs')} epochs, "
        f"{summary.get('precision')}, test accuracy {summary.get('test_accuracy', 0):.2%}",
        f"requests: one of {len(bodies)} test images (32x32 PNG) as a multipart file, top 5; {args.requests:,} answers "
        f"per row after {WARMUP} of warm-up; closed-loop clients (httpx, asyncio) in one process beside the server",
        f"batching: --max-batch {args.max_batch} --max-delay-ms {args.max_delay_ms:g} (LitServe: max_batch_size, "
        f"batch_timeout the same); mean batch from cifar-dist's /metrics",
        *goals(results, failed),
    ]
    append_table("Serving: cifar-dist serve, batching on and off, torch and onnx, vs LitServe (bench_serve.py)", notes,
                 ["server", "clients", "answered", "req/s", "p50 ms", "p99 ms", "errors", "mean batch"], rows)


def goals(results: list[Result], failed: dict[str, str]) -> list[str]:
    def find(server: str, clients: int) -> Result | None:
        return next((r for r in results if r.server == server and r.clients == clients), None)

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = []
    for backend in ("torch", "onnx"):
        on, off = find(f"{backend}, batched", 32), find(f"{backend}, batch 1", 32)
        if on and off:
            ratio = on.throughput / off.throughput
            out.append(f"goal, {backend} at 32 clients: batching {ratio:.2f}x batch-1's throughput (>= 2x: {met(ratio >= 2)})")
    peer = find("LitServe, batched", 32)
    for backend in ("torch", "onnx"):
        on = find(f"{backend}, batched", 32)
        if on and peer:
            ratio = on.throughput / peer.throughput
            out.append(f"goal, {backend} at 32 clients: {ratio:.2f}x LitServe's throughput (>= 1x: {met(ratio >= 1)})")
    for backend in ("torch", "onnx"):
        if r := find(f"{backend}, batched", 8):
            p99 = r.percentile(99)
            out.append(f"goal, {backend} batched at 8 clients: p99 {p99:.1f} ms (<= 50 ms: {met(p99 <= 50)})")
    errors = sum(r.errors for r in results)
    out.append(f"goal, errors: {errors} in all rows ({met(errors == 0 and not failed)}"
               f"{'; rows that did not run: ' + ', '.join(failed) if failed else ''})")
    return out


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in load)


def _litserve_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("litserve") is not None


if __name__ == "__main__":
    main()
