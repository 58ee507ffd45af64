"""`cifar-dist serve` under load: closed-loop clients, batching on and off, torch and onnx, and
LitServe (with its own batching) serving the same net, side by side in one run; one table appended
to benchmarks/RESULTS.md.

    python benchmarks/bench_serve.py --run runs/medium [--clients 1 8 32 64] [--requests 2000] [--rounds 3]

Each server starts on 127.0.0.1 on a free port, alone, and is stopped before the next starts:

    torch, batched      cifar-dist serve RUN --max-batch 64 --max-delay-ms 5
    torch, batch 1      cifar-dist serve RUN --max-batch 1
    onnx, batched       cifar-dist serve MODEL.onnx --backend onnx ...   (exported from RUN first)
    onnx, batch 1       cifar-dist serve MODEL.onnx --backend onnx --max-batch 1
    LitServe, batched   benchmarks/litserve_peer.py RUN, max_batch_size 64, batch_timeout 5 ms

Every request is the same for every server: one of 64 of the run's test images, a 32x32 PNG, as
the multipart file `files` (the bytes built once). For each number of clients, that many clients
each send a request, wait for its answer and send the next, until `--requests` answers have come
back (after a warm-up the table leaves out). A request not answered 200 is an error. The servers
take turns, `--rounds` times (a shared machine's load drifts; turns spread the drift over all):
a row gives the median throughput of its rounds (and their range) and the p50 and p99 of all its
latencies. For cifar-dist's servers the mean batch size comes from their /metrics. The first row
times GET /healthz at the most clients: what the client itself can send beside a server here.

The clients are aiohttp's, in this process: httpx's async client, tried first, fell from 917 to
286 GET /healthz a second between 8 and 32 clients on this CPU (aiohttp: 5,338 and 4,321), and
would have measured itself.

Goals (issue 26): with batching at 32 clients, at least 2x the throughput of batch-1 serving and
at least LitServe's; p99 <= 50 ms at 8 clients; no errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
from common import PY, ROOT, append_table, spread
from PIL import Image

from cifar_dist import schema
from cifar_dist.config import Config, config_from_dict
from cifar_dist.data import load_dataset
from cifar_dist.rundir import CONFIG, RunDir

WARMUP = 200  # requests at 8 clients after a server starts, before its measured runs
IMAGES = 64
CONTENT_TYPE = "multipart/form-data; boundary=cifar-dist-bench"  # one boundary for every body
PEER = ROOT / "benchmarks" / "litserve_peer.py"
PEER_NAME = "LitServe, batched"


@dataclass
class Server:
    name: str
    command: list[str]  # "{port}" stands for the port it is given
    predict_path: str
    ready_path: str
    ours: bool  # cifar-dist serve: its /metrics tell the batch sizes


@dataclass
class Row:
    """One server at one number of clients, over the rounds."""

    server: str
    clients: int
    throughputs: list[float] = field(default_factory=list)  # answers per second, one per round
    latencies: list[float] = field(default_factory=list)  # seconds, of every answered request
    errors: int = 0
    batches: float = 0.0
    images: float = 0.0

    @property
    def throughput(self) -> float:
        return statistics.median(self.throughputs)

    def percentile(self, q: int) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] * 1000 if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1] * 1000

    def cells(self, ours: bool) -> list[str]:
        batch = f"{self.images / self.batches:.2f}" if ours and self.batches else "n/a"
        return [self.server, str(self.clients), f"{len(self.latencies):,}", spread(self.throughputs, "{:,.0f}"),
                f"{self.percentile(50):.1f}", f"{self.percentile(99):.1f}", str(self.errors), batch]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_bodies(cfg: Config) -> list[bytes]:
    """IMAGES of the run's test images, each a multipart body holding one PNG file."""
    ds = load_dataset(cfg.data, announce=lambda s: print(s, file=sys.stderr))
    bodies = []
    for i in range(min(IMAGES, len(ds.test_y))):
        png = io.BytesIO()
        Image.fromarray(ds.test_x[i].numpy()).save(png, "PNG")
        req = httpx.Request("POST", "http://127.0.0.1/", files=[("files", (f"{i}.png", png.getvalue(), "image/png"))],
                            headers={"content-type": CONTENT_TYPE})
        bodies.append(req.read())
    return bodies


@contextlib.contextmanager
def running(server: Server, log: Path, env: dict[str, str]) -> Iterator[str]:
    """The server started on a free port, ready (its ready path answers 200), and stopped (SIGTERM) afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        command = [a.replace("{port}", str(port)) for a in server.command]
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: LitServe's workers stop with it
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


async def closed_loop(url: str, bodies: list[bytes], clients: int, requests: int) -> tuple[int, list[float], float]:
    """`clients` clients, each sending its next request when its last is answered, until `requests`
    have been sent: (errors, latencies of the answered, seconds). Each request POSTs the next of
    `bodies`; with no bodies each is a GET."""
    latencies: list[float] = []
    errors = 0
    counter = itertools.count()
    headers = {"content-type": CONTENT_TYPE}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one_client() -> None:
            nonlocal errors
            while (k := next(counter)) < requests:
                start = time.perf_counter()
                try:
                    request = (session.post(url, data=bodies[k % len(bodies)], headers=headers) if bodies
                               else session.get(url))
                    async with request as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
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


def measure(server: Server, url: str, bodies: list[bytes], rows: dict[int, Row], requests: int) -> None:
    """One round of `server`: every number of clients, added to its rows."""
    asyncio.run(closed_loop(url + server.predict_path, bodies, 8, WARMUP))
    for clients, row in rows.items():
        before = batch_totals(url) if server.ours else (0.0, 0.0)
        errors, latencies, seconds = asyncio.run(closed_loop(url + server.predict_path, bodies, clients, requests))
        if server.ours:
            after = batch_totals(url)
            row.batches += after[0] - before[0]
            row.images += after[1] - before[1]
        row.throughputs.append(len(latencies) / seconds)
        row.latencies += latencies
        row.errors += errors
        print(f"{server.name}, {clients} clients: {len(latencies) / seconds:,.0f} req/s, {errors} errors", file=sys.stderr)


def lscpu_model() -> str:
    proc = subprocess.run(["lscpu"], capture_output=True, text=True)
    return next((line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("Model name")),
                "unknown (no lscpu)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run (its model.pt, config and test set)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=2000, help="answers per number of clients and round (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every server (default 3)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a stopped benchmark still stops its server (finally)
    summary = RunDir(args.run).summary()
    if summary is None:
        raise SystemExit(f"error: {args.run}: no summary.json (not a finished run)")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    load_before = os.getloadavg()
    cfg = config_from_dict(schema.read_yaml_mapping(args.run / CONFIG, "run config"))
    bodies = request_bodies(cfg)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    onnx_file = work / "model.onnx"
    exported = subprocess.run([PY, "-m", "cifar_dist.cli", "export", str(args.run), "--format", "onnx", "--out",
                               str(onnx_file)], cwd=ROOT, env=env, capture_output=True, text=True)
    batching = ["--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    serve = [PY, "-m", "cifar_dist.cli", "serve", "--port", "{port}"]
    torch_model, onnx_model = [str(args.run)], [str(onnx_file), "--backend", "onnx"]
    predict = "/v1/predict?top_k=5"
    servers = [
        Server("torch, batched", [*serve, *torch_model, *batching], predict, "/readyz", True),
        Server("torch, batch 1", [*serve, *torch_model, "--max-batch", "1"], predict, "/readyz", True),
        Server("onnx, batched", [*serve, *onnx_model, *batching], predict, "/readyz", True),
        Server("onnx, batch 1", [*serve, *onnx_model, "--max-batch", "1"], predict, "/readyz", True),
        Server(PEER_NAME, [PY, str(PEER), str(args.run), "--port", "{port}", *batching], "/predict", "/health", False),
    ]
    failed: dict[str, str] = {}
    if exported.returncode != 0:
        why = f"export failed: {(exported.stderr.strip().splitlines() or ['?'])[-1]}"
        failed.update({s.name: why for s in servers if s.name.startswith("onnx")})
    if importlib.util.find_spec("litserve") is None:
        failed[PEER_NAME] = "not installed: pip install 'cifar-dist[bench]'"
    rows = {s.name: {c: Row(s.name, c) for c in args.clients} for s in servers}
    ceiling = Row("client ceiling: GET /healthz", max(args.clients))
    for _ in range(args.rounds):
        for server in servers:
            if server.name in failed:
                continue
            try:
                with running(server, work / f"{server.name.replace(', ', '_').replace(' ', '')}.log", env) as url:
                    if server.name == servers[0].name:  # what the client can send: a route that does no work
                        errors, latencies, seconds = asyncio.run(closed_loop(url + "/healthz", [], ceiling.clients,
                                                                             args.requests))
                        ceiling.throughputs.append(len(latencies) / seconds)
                        ceiling.latencies += latencies
                        ceiling.errors += errors
                    measure(server, url, bodies, rows[server.name], args.requests)
            except RuntimeError as e:
                failed[server.name] = f"failed: {e}"
    load_after = os.getloadavg()

    done = {s.name: rows[s.name] for s in servers if s.name not in failed}
    table = [ceiling.cells(False)] if ceiling.throughputs else []
    table += [row.cells(s.ours) for s in servers if s.name in done for row in done[s.name].values()]
    table += [[name, why, "", "", "", "", "", ""] for name, why in failed.items()]
    notes = [
        f"CPU (lscpu): {lscpu_model()}; load average (1, 5, 15 min) {_load(load_before)} before, {_load(load_after)} after: "
        f"the machine is shared, other work ran beside this benchmark",
        f"model served: {args.run.name}, the {summary.get('model')} net, run {summary.get('run_id')}: "
        f"{summary.get('epochs')} epoch(s), {summary.get('precision')}, data.source={cfg.data.source} "
        f"({Path(cfg.data.path).name or 'no path'}), test accuracy {summary.get('test_accuracy', 0):.2%}",
        f"requests: one of {len(bodies)} test images (32x32 PNG) as a multipart file, top 5; {args.requests:,} answers per "
        f"row and round after {WARMUP} of warm-up; {args.rounds} rounds; closed-loop aiohttp clients in one process "
        f"beside the server",
        f"batching: --max-batch {args.max_batch} --max-delay-ms {args.max_delay_ms:g} (LitServe: max_batch_size and "
        f"batch_timeout the same); cifar-dist serve's default --threads (half the cores) for the model",
        "req/s: median of the rounds (min-max, rounds); p50 and p99: of every answered request of the row",
        *goals(done, failed),
    ]
    append_table("Serving: cifar-dist serve, batching on and off, torch and onnx, vs LitServe (bench_serve.py)", notes,
                 ["server", "clients", "answered", "req/s", "p50 ms", "p99 ms", "errors", "mean batch"], table)


def goals(done: dict[str, dict[int, Row]], failed: dict[str, str]) -> list[str]:
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = []
    for backend in ("torch", "onnx"):
        on, off = done.get(f"{backend}, batched", {}).get(32), done.get(f"{backend}, batch 1", {}).get(32)
        if on and off:
            ratio = on.throughput / off.throughput
            out.append(f"goal, {backend} at 32 clients: batching {ratio:.2f}x batch-1's throughput (>= 2x: {met(ratio >= 2)})")
        peer = done.get(PEER_NAME, {}).get(32)
        if on and peer:
            ratio = on.throughput / peer.throughput
            out.append(f"goal, {backend} batched at 32 clients: {ratio:.2f}x LitServe's throughput (>= 1x: {met(ratio >= 1)})")
        if eight := done.get(f"{backend}, batched", {}).get(8):
            p99 = eight.percentile(99)
            out.append(f"goal, {backend} batched at 8 clients: p99 {p99:.1f} ms (<= 50 ms: {met(p99 <= 50)})")
    errors = sum(r.errors for rows in done.values() for r in rows.values())
    out.append(f"goal, errors: {errors} ({met(errors == 0 and not failed)}"
               f"{'; did not run: ' + ', '.join(failed) if failed else ''})")
    return out


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in load)


if __name__ == "__main__":
    main()
