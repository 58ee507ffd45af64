"""A study's journal in optuna-dashboard, as a person would see it: the dashboard on 127.0.0.1,
a headless Chromium on the study's page, its text checked and a screenshot written.

    python slurm/check_dashboard.py SWEEP_DIR [--screenshot dashboard.png]

Needs what the project does not install (so this is a script, not a test that would skip in CI):
`pip install optuna-dashboard` into the venv and `apt-get install chromium`. SWEEP_DIR is a search's
sweep dir (its study.journal), e.g. one made on this machine without Slurm by
`python jobs/submit.py search.yaml --executor local` (docs/search.md).
Exit 0: the page names the study and shows its history and trials; 1: it does not; 2: a mistake.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

from cifar_dist.errors import UserError, run_command
from cifar_dist.sweep.study import JOURNAL

WINDOW = (1400, 1000)
START_S = 60  # the dashboard's start (it reads the whole journal first)
PAGE_S = 120  # Chromium's load and render of one page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def studies(port: int) -> list | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
            return json.loads(r.read())["study_summaries"]
    except OSError:
        return None


def check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python slurm/check_dashboard.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--screenshot", type=Path, default=Path("dashboard.png"), help="default: dashboard.png")
    args = parser.parse_args(argv)
    journal = args.sweep_dir / JOURNAL
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which("optuna-dashboard")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not journal.is_file():
        raise UserError(f"{args.sweep_dir}: no {JOURNAL} (not a search's sweep dir)")
    if not dashboard or not chromium:
        raise UserError("needs optuna-dashboard (pip install optuna-dashboard) and chromium (apt-get install chromium)")
    port = free_port()
    server = subprocess.Popen([dashboard, str(journal), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_S
        while (listed := studies(port)) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if not listed:
            print(f"optuna-dashboard listed no study within {START_S} s", file=sys.stderr)
            return 1
        study = listed[0]
        page = f"http://127.0.0.1:{port}/dashboard/studies/{study['study_id']}"
        browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                   f"--window-size={WINDOW[0]},{WINDOW[1]}"]
        dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=PAGE_S).stdout
        texts = re.findall(r">([^<>]+)<", dom)
        wanted = [f"{study['study_name']} (id={study['study_id']})", "History", "Trial"]
        missing = [t for t in wanted if t not in texts]
        subprocess.run([*browser, f"--screenshot={args.screenshot.absolute()}", page], capture_output=True,
                       timeout=PAGE_S, check=True)
        with Image.open(args.screenshot) as img:
            blank = img.size != WINDOW or len(img.convert("L").getcolors(1 << 16)) <= 20
    finally:
        server.terminate()
        server.wait(timeout=30)
    if missing or blank:
        print(f"{page}: " + (f"missing {missing}" if missing else "a blank page") + f"; screenshot {args.screenshot}",
              file=sys.stderr)
        return 1
    print(f"{page}: study {study['study_name']}, its history and trials shown; screenshot {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(check, sys.argv[1:]))
