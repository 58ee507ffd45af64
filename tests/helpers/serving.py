"""`cifar-dist serve` as the tests run it: a real process on a free port, its log in a file."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers import PY, ROOT

SERVING = re.compile(r"serving .* on (http://\S+) ")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def serve_cmd(model: Path, *options: str) -> list[str]:
    return [PY, "-m", "cifar_dist.cli", "serve", str(model), *options]


def start_server(model: Path, log: Path, env: dict[str, str], *options: str, timeout: float = 180) -> Server:
    """Start `cifar-dist serve MODEL --port 0 OPTIONS` and wait until /readyz answers 200."""
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_cmd(model, "--port", "0", *options), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if url is None and (m := SERVING.search(log.read_text())):
            url = m.group(1)
        if url is not None:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    return Server(proc, url, log)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"serve did not get ready in {timeout} s:\n{log.read_text()[-3000:]}")
