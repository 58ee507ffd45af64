"""`cifar-dist serve RUN_DIR_OR_MODEL [--host 127.0.0.1] [--port 8000] [--max-batch 64]
[--max-delay-ms 5] [--backend torch|onnx]`: the model behind HTTP, on uvicorn.

Everything that can be wrong is found before anything listens: the options, the model (its sha256
checked) and the port; each is one `error:` line and exit code 2. SIGTERM (or Ctrl-C) stops
accepting connections, lets the requests in flight finish, and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from cifar_dist.errors import UserError, run_command

DRAIN_TIMEOUT_S = 30  # after SIGTERM, the longest the requests in flight are waited for
# How long a thread waiting for the GIL waits before the holder is made to let go (Python's default: 5 ms).
# The inference thread takes the GIL back after each batch (and Pillow's decoders after each image);
# behind a busy event loop each of those waited up to the whole interval.
SWITCH_INTERVAL_S = 0.0005


class ServeError(UserError):
    """The service cannot start; the message says why."""


def main(argv: list[str] | None = None) -> int:
    from cifar_dist.serve.model import BACKENDS

    parser = argparse.ArgumentParser(prog="cifar-dist serve", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("model", type=Path, metavar="RUN_DIR_OR_MODEL",
                        help="a run directory, its model.pt or a checkpoint; with --backend onnx an exported .onnx file "
                             "(a run directory: its model.onnx)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port (the log line names it)")
    parser.add_argument("--backend", default="torch", help=" | ".join(BACKENDS) + " (default torch)")
    parser.add_argument("--max-batch", type=int, default=64, help="images per batch (default 64; 1 turns batching off)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0,
                        help="the longest an image waits for its batch to fill (default 5 ms)")
    parser.add_argument("--max-queue", type=int, default=1024, help="images waiting at most; more get 503 (default 1024)")
    parser.add_argument("--max-requests", type=int, default=128,
                        help="predictions in progress at most (each holds up to --max-body-mb); more get 503 (default 128)")
    parser.add_argument("--max-body-mb", type=float, default=10.0, help="request body limit (default 10 MB); more get 413")
    parser.add_argument("--max-files", type=int, default=64, help="images per request (default 64); more get 413")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="threads the model computes on (default: half the cores; the rest serve HTTP)")
    args = parser.parse_args(argv)
    if args.backend not in BACKENDS:
        raise ServeError(f"--backend: unknown backend {args.backend!r}; choose one of {', '.join(BACKENDS)}")
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-requests", args.max_requests, 1),
                             ("--max-files", args.max_files, 1), ("--max-delay-ms", args.max_delay_ms, 0),
                             ("--max-body-mb", args.max_body_mb, 0.001), ("--port", args.port, 0),
                             ("--threads", args.threads, 1)):
        if value < low:
            raise ServeError(f"{name}: must be >= {low}, got {value}")
    if args.port > 65535:
        raise ServeError(f"--port: must be <= 65535, got {args.port}")
    try:
        import uvicorn

        from cifar_dist.serve.app import Limits, create_app
    except ImportError as e:
        raise ServeError(f"serve needs its packages ({e}): pip install 'cifar-dist[serve]'") from None
    from cifar_dist.serve.model import load_served

    served = load_served(args.model, args.backend, args.threads)
    limits = Limits(args.max_batch, args.max_delay_ms, args.max_queue, args.max_requests, int(args.max_body_mb * 1024 * 1024),
                    args.max_files)
    sock = bind(args.host, args.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    # A line per request: records without the thread and process fields, which the format never shows.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    host, port = sock.getsockname()[:2]
    logging.getLogger("cifar_dist.serve").info(
        "serving %s (%s net, %s backend, sha256 %s) on http://%s:%d (upload page /, API docs /docs)", served.file,
        served.card.model, served.backend, served.sha256[:16], f"[{host}]" if ":" in host else host, port)
    config = uvicorn.Config(create_app(served, limits), log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=DRAIN_TIMEOUT_S)
    server = uvicorn.Server(config)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers in place of
    # the defaults that re-raise is a no-op, so a drained shutdown exits 0 (not killed by SIGTERM).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, made here so a port in use is a one-line error before anything starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"--host: cannot resolve {host!r} ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = f"port {port} is in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise ServeError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
