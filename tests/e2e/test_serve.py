"""`cifar-dist serve`: the API contract, the same answers as `cifar-dist predict`, batches that really
form, every kind of bad input refused in one JSON error and one log line, a full queue, a start that
fails in one line, a graceful SIGTERM, and the upload page in a real headless Chromium.

One tiny run and one server serve the module (a real process on a free port); the SIGTERM and
start-failure tests start their own."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cifar_dist import cli
from cifar_dist.config import load_config
from cifar_dist.data import load_dataset
from cifar_dist.rundir import MODEL, RunDir, load_weights
from tests.helpers import PY, TINY, run, train_cmd
from tests.helpers.serving import Server, start_server

LIMITS = ["--max-body-mb", "1", "--max-files", "4", "--max-delay-ms", "20"]


@pytest.fixture(scope="module")
def module_env(tmp_path_factory, cache_dir) -> dict[str, str]:
    return dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), WANDB_MODE="offline", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, module_env) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "s"
    run(train_cmd(*TINY, f"run.dir={run_dir}"), module_env)
    return run_dir


@pytest.fixture(scope="module")
def server(trained, module_env, tmp_path_factory):
    s = start_server(trained, tmp_path_factory.mktemp("serve") / "serve.log", module_env, *LIMITS)
    yield s
    assert s.stop() == 0, s.log.read_text()[-2000:]
    assert "Traceback" not in s.log.read_text()


@pytest.fixture(scope="module")
def images(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """Real test images of the run's data set, and images of other sizes, modes and formats."""
    d = tmp_path_factory.mktemp("images")
    ds = load_dataset(load_config(None, TINY + [f"data.cache_dir={cache_dir}"]).data, announce=lambda s: None)
    out = {}
    for i in range(3):
        out[f"test{i}.png"] = d / f"test{i}_{ds.classes[int(ds.test_y[i])]}.png"
        Image.fromarray(ds.test_x[i].numpy()).save(out[f"test{i}.png"])
    big = Image.fromarray(ds.test_x[3].numpy()).resize((100, 60))
    out["rgba.png"] = d / "rgba.png"
    big.convert("RGBA").save(out["rgba.png"])
    out["grey.jpg"] = d / "grey.jpg"
    big.convert("L").save(out["grey.jpg"], quality=90)
    out["palette.gif"] = d / "palette.gif"
    Image.fromarray(ds.test_x[4].numpy()).convert("P").save(out["palette.gif"])
    out["sixteen.png"] = d / "sixteen.png"
    Image.fromarray(np.asarray(big.convert("L"), dtype=np.uint16) * 257).save(out["sixteen.png"])
    out["photo.jpg"] = d / "photo.jpg"  # over 64 KB: decoded in a worker thread, not in the event loop
    noise = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(out["photo.jpg"], quality=95)
    assert 64 * 1024 < out["photo.jpg"].stat().st_size < 1024 * 1024
    return out


def post(server: Server, content: bytes | None = None, content_type: str | None = "image/png", top_k: int | str = 5,
         files: list[tuple[str, bytes]] | None = None) -> httpx.Response:
    headers = {"content-type": content_type} if content_type and files is None else {}
    return httpx.post(f"{server.url}/v1/predict", params={"top_k": top_k}, content=content, headers=headers,
                      files=[("files", (name, data, "image/png")) for name, data in files] if files else None, timeout=60)


def cli_predict(trained: Path, env: dict[str, str], files: list[Path], top_k: int = 5) -> dict[str, list]:
    proc = run([PY, "-m", "cifar_dist.cli", "predict", "--checkpoint", str(trained), *map(str, files), "--json",
                "--top-k", str(top_k)], env)
    return {Path(r["file"]).name: r["top"] for r in json.loads(proc.stdout)}


def metric(server: Server, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when absent)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def one_line_error(proc, *said: str) -> None:
    """Exit 2 and one `error:` line on stderr holding each of `said`: no traceback, nothing on stdout."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == "" and all(s in proc.stderr for s in said), proc.stderr


# ---------------------------------------------------------------------------- the API


def test_api_contract(server, trained, images):
    model = httpx.get(f"{server.url}/v1/model").json()
    weights, summary = load_weights(trained / MODEL), RunDir(trained).summary()
    assert model["name"] == "blitz" and model["backend"] == "torch" and model["run_id"] == summary["run_id"]
    assert model["classes"] == weights["classes"] and model["test_accuracy"] == summary["test_accuracy"]
    assert model["normalisation"] == {"mean": weights["mean"], "std": weights["std"]}
    assert model["input"]["size"] == [32, 32] and len(model["config_hash"]) == 16
    import hashlib

    assert model["sha256"] == hashlib.sha256((trained / MODEL).read_bytes()).hexdigest()
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready"}

    names = ["test0.png", "rgba.png"]
    r = post(server, files=[(n, images[n].read_bytes()) for n in names], top_k=3)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == {k: model[k] for k in ("name", "run_id", "sha256", "backend")}
    assert [p["file"] for p in answer["predictions"]] == names
    for p in answer["predictions"]:
        probs = [t["probability"] for t in p["top"]]
        assert len(p["top"]) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert {t["class"] for t in p["top"]} <= set(model["classes"])
    raw = post(server, images["test0.png"].read_bytes(), top_k=50).json()["predictions"]  # top_k past the classes: all
    assert raw[0]["file"] is None and len(raw[0]["top"]) == len(model["classes"])

    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(body)
    assert any(p["name"] == "top_k" for p in spec["paths"]["/v1/predict"]["post"]["parameters"])
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("cifar_dist_requests_total", "cifar_dist_predict_latency_seconds_bucket", "cifar_dist_batch_size_bucket",
                 "cifar_dist_queue_depth"):
        assert name in text, name
    assert metric(server, "cifar_dist_requests_total", path="/v1/predict", status="200") >= 2
    assert metric(server, "cifar_dist_predict_latency_seconds_count") >= 2


def test_the_service_answers_as_predict_does(server, trained, images, module_env):
    files = list(images.values())
    expected = cli_predict(trained, module_env, files)
    for f in files:  # one request each: a batch of one, as predict runs
        r = post(server, f.read_bytes(), "application/octet-stream")
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["top"] == expected[f.name], f.name
    # Several files in one request may share a batch with each other: the same classes, in the same order.
    r = post(server, files=[(f.name, f.read_bytes()) for f in files[:4]])
    for p in r.json()["predictions"]:
        want = expected[p["file"]]
        assert [t["class"] for t in p["top"]] == [t["class"] for t in want]
        assert all(abs(a["probability"] - b["probability"]) <= 2e-4 for a, b in zip(p["top"], want))


def test_concurrent_clients_are_served_in_batches(server, images):
    before = {k: metric(server, f"cifar_dist_batch_size_{k}") for k in ("count", "sum")}
    singles_before = metric(server, "cifar_dist_batch_size_bucket", le="1.0")
    body = images["test1.png"].read_bytes()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: post(server, body), range(96)))
    assert [a.status_code for a in answers] == [200] * 96
    assert len({json.dumps(a.json()["predictions"][0]["top"][0]["class"]) for a in answers}) == 1
    batches = metric(server, "cifar_dist_batch_size_count") - before["count"]
    imgs = metric(server, "cifar_dist_batch_size_sum") - before["sum"]
    singles = metric(server, "cifar_dist_batch_size_bucket", le="1.0") - singles_before
    assert imgs == 96 and batches < 96, (batches, imgs)  # some images shared a batch
    assert batches - singles >= 1 and imgs / batches > 1.5, (batches, singles, imgs)


def test_it_binds_localhost_by_default(server):
    port = int(server.url.rsplit(":", 1)[1])
    assert server.url.startswith("http://127.0.0.1:")
    listening = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    mine = [f[1] for f in listening if f[1].endswith(f":{port:04X}") and f[3] == "0A"]  # 0A: LISTEN
    assert mine == [f"0100007F:{port:04X}"], mine  # 127.0.0.1 only


# ---------------------------------------------------------------------------- bad input


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height RGB pixels, with a few rows of data: a few KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 8, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def encoded(fmt: str, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, fmt, quality=95)
    return buf.getvalue()


def test_bad_input_is_one_json_error_and_one_log_line_and_the_service_goes_on(server, trained, images, module_env):
    png, jpeg = encoded("PNG"), encoded("JPEG")
    bomb = png_claiming(30000, 30000)
    assert len(bomb) < 8000
    small = images["test0.png"].read_bytes()

    def chunked(data: bytes):
        for i in range(0, len(data), 64 * 1024):
            yield data[i:i + 64 * 1024]

    form_without_files = b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--x--\r\n'
    catalogue = [  # (what, request, status, words of the error)
        ("not an image", lambda: post(server, b"these bytes are not an image"), 400, "not a readable image"),
        ("truncated PNG", lambda: post(server, png[: len(png) // 2]), 400, "not a readable image"),
        ("truncated JPEG", lambda: post(server, jpeg[: len(jpeg) // 2], "image/jpeg"), 400, "not a readable image"),
        ("decompression bomb", lambda: post(server, bomb), 400, "too large"),
        ("80 megapixels", lambda: post(server, png_claiming(10000, 8000)), 400, "10000x8000 pixels"),
        ("body over the limit", lambda: post(server, b"\0" * (1024 * 1024 + 1)), 413, "over the limit"),
        ("chunked body over the limit", lambda: post(server, chunked(b"\0" * 1_500_000)), 413, "over the limit"),
        ("too many files", lambda: post(server, files=[(f"{i}.png", small) for i in range(5)]), 413, "more than 4 files"),
        ("wrong content type", lambda: post(server, small, "text/plain"), 415, "'text/plain' is not accepted"),
        ("JSON", lambda: post(server, b'{"image": "cat.png"}', "application/json"), 415, "is not accepted"),
        ("no content type", lambda: post(server, small, None), 415, "'missing' is not accepted"),
        ("empty request", lambda: post(server, b""), 400, "empty request"),
        ("a form without files", lambda: post(server, form_without_files, "multipart/form-data; boundary=x"), 400,
         "the form holds no files"),
        ("a bad multipart body", lambda: post(server, b"--x\r\nnonsense\r\n\r\ndata\r\n--x--\r\n",
                                              "multipart/form-data; boundary=x"), 400, "malformed multipart"),
        ("top_k 0", lambda: post(server, small, top_k=0), 400, "top_k: must be >= 1"),
        ("top_k not a number", lambda: post(server, small, top_k="five"), 400, "top_k"),
    ]
    lines_before = len(server.lines())
    for what, send, status, words in catalogue:
        r = send()
        assert r.status_code == status, (what, r.status_code, r.text)
        body = r.json()
        assert list(body) == ["error"] and words in body["error"] and "\n" not in body["error"], (what, body)
    r = post(server, small)
    assert r.status_code == 200
    assert r.json()["predictions"][0]["top"] == cli_predict(trained, module_env, [images["test0.png"]])[images["test0.png"].name]

    time.sleep(0.5)  # the last line is written after the answer is sent
    new = server.lines()[lines_before:]
    assert len(new) == len(catalogue) + 1, "\n".join(new)  # one line per request
    for (what, _, status, words), line in zip(catalogue, new):
        assert f"POST /v1/predict {status} " in line and words in line, (what, line)
    assert "POST /v1/predict 200" in new[-1]
    assert "Traceback" not in server.log.read_text()


# ---------------------------------------------------------------------------- a full queue


@contextlib.contextmanager
def gated_server(trained: Path, limits) -> Iterator[tuple[str, Any, threading.Event, threading.Event]]:
    """The app in this process, on uvicorn in a thread, with the real model behind a gate the test
    holds shut: the only way to keep the worker busy for as long as a test needs without timing it."""
    import uvicorn

    from cifar_dist.serve.app import create_app
    from cifar_dist.serve.command import bind
    from cifar_dist.serve.model import load_served

    served = load_served(trained, "torch")
    gate, entered, real = threading.Event(), threading.Event(), served.probabilities
    gate.set()  # open for the warm-up

    def gated(pixels):
        entered.set()
        gate.wait(60)
        return real(pixels)

    served.probabilities = gated
    app = create_app(served, limits)
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        while not server.started or httpx.get(f"{url}/readyz").status_code != 200:
            time.sleep(0.05)
        gate.clear()
        entered.clear()
        yield url, app, gate, entered
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)


def send_png(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", content=encoded("PNG", 32), headers={"content-type": "image/png"}, timeout=60)


def hold_one_in_the_worker(pool: ThreadPoolExecutor, url: str, entered: threading.Event) -> Future:
    """A request whose image the worker has taken and holds, behind the gate."""
    first = pool.submit(send_png, url)
    assert entered.wait(60)
    return first


def test_a_full_queue_answers_503_with_retry_after(trained):
    from cifar_dist.serve.app import Limits

    with gated_server(trained, Limits(max_batch=1, max_delay_ms=0, max_queue=2)) as (url, app, gate, entered), \
            ThreadPoolExecutor(3) as pool:
        first = hold_one_in_the_worker(pool, url, entered)
        held = [pool.submit(send_png, url) for _ in range(2)]
        while app.state.batcher.depth < 2:  # the queue's two places taken
            time.sleep(0.01)
        refused = send_png(url)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"].startswith("busy: 2 images are waiting (at most 2)")
        gate.set()
        assert [f.result().status_code for f in [first, *held]] == [200, 200, 200]
        assert send_png(url).status_code == 200
        text = httpx.get(f"{url}/metrics").text
        assert 'cifar_dist_requests_total{path="/v1/predict",status="503"} 1.0' in text


def test_too_many_requests_in_progress_answer_503(trained):
    from cifar_dist.serve.app import Limits

    with gated_server(trained, Limits(max_batch=1, max_delay_ms=0, max_queue=100, max_requests=2)) as (url, app, gate, entered), \
            ThreadPoolExecutor(2) as pool:
        first = hold_one_in_the_worker(pool, url, entered)
        second = pool.submit(send_png, url)
        while app.state.batcher.depth < 1:
            time.sleep(0.01)
        refused = send_png(url)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"].startswith("busy: 2 requests in progress (at most 2)")
        gate.set()
        assert [first.result().status_code, second.result().status_code] == [200, 200]
        assert send_png(url).status_code == 200


# ---------------------------------------------------------------------------- life cycle


def test_a_start_that_cannot_work_is_one_error_line(trained, tmp_path, capsys):
    """In this process (cli.main, as the command runs it): each fails before anything listens."""

    def serve(*args: str) -> subprocess.CompletedProcess:
        code = cli.main(["serve", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    damaged = bytearray((trained / MODEL).read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    (tmp_path / MODEL).write_bytes(bytes(damaged))
    one_line_error(serve(str(tmp_path / MODEL), "--port", "0"), "damaged (its contents do not match the sha256 saved with them)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(serve(str(trained), "--port", str(port)), f"cannot listen on 127.0.0.1:{port}: port {port} is in use")
    one_line_error(serve(str(trained), "--backend", "trt"), "--backend: unknown backend 'trt'; choose one of torch, onnx")
    one_line_error(serve(str(trained), "--backend", "onnx"), "no model.onnx in this run directory")
    one_line_error(serve(str(trained), "--max-batch", "0"), "--max-batch: must be >= 1, got 0")


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(trained, module_env, tmp_path, images):
    server = start_server(trained, tmp_path / "serve.log", module_env)
    body = images["test2.png"].read_bytes()
    first_sent, stopped = threading.Event(), threading.Event()

    def slow_body():  # the request is on the wire, half sent, when SIGTERM comes
        yield body[:100]
        first_sent.set()
        stopped.wait(30)
        time.sleep(0.5)
        yield body[100:]

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(lambda: httpx.post(f"{server.url}/v1/predict", content=slow_body(),
                                                headers={"content-type": "image/png"}, timeout=60))
        assert first_sent.wait(30)
        time.sleep(1.0)  # its headers read by the server
        server.proc.send_signal(15)
        while "Shutting down" not in server.log.read_text():
            time.sleep(0.05)
        with pytest.raises(httpx.ConnectError):  # no new connections while it drains
            httpx.get(f"{server.url}/healthz", timeout=5)
        stopped.set()
        r = answer.result()
    assert r.status_code == 200 and r.json()["predictions"][0]["top"]
    assert server.proc.wait(60) == 0
    log = server.log.read_text()
    assert log.index("Shutting down") < log.index("POST /v1/predict 200") < log.index("Finished server process")
    assert "Traceback" not in log


# ---------------------------------------------------------------------------- the upload page


CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (make test installs it: make browser-packages)")
def test_the_upload_page_in_headless_chromium(server, images, tmp_path):
    from playwright.sync_api import sync_playwright

    pick, drop = images["test1.png"], images["test2.png"]
    want = {f: post(server, f.read_bytes()).json()["predictions"][0]["top"] for f in (pick, drop)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 700})
            page.goto(server.url + "/")
            page.wait_for_function("!document.getElementById('model').textContent.startsWith('loading')")
            assert page.text_content("#model").startswith("blitz net (torch), 10 classes")

            def shown() -> list[dict]:
                page.wait_for_selector("#result li")
                return page.locator("#result li").evaluate_all(
                    "els => els.map(e => ({class: e.dataset.class, probability: Number(e.dataset.probability),"
                    " text: e.textContent, width: e.querySelector('.bar').style.width}))")

            page.set_input_files("#file", str(pick))  # pick a file
            rows = shown()
            assert [{"class": r["class"], "probability": r["probability"]} for r in rows] == want[pick]
            assert rows[0]["text"].startswith(want[pick][0]["class"])
            assert rows[0]["width"] == f"{100 * want[pick][0]['probability']:.1f}%"
            assert page.text_content("#status") == f"{pick.name}: {want[pick][0]['class']}"
            page.screenshot(path=str(tmp_path / "upload_page.png"))

            page.evaluate("""async ([name, b64]) => {  // drop a file on the drop zone
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const data = new DataTransfer();
                data.items.add(new File([bytes], name, {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
            }""", [drop.name, __import__("base64").b64encode(drop.read_bytes()).decode()])
            page.wait_for_function(f"document.getElementById('status').textContent.startsWith({json.dumps(drop.name)})")
            assert [{"class": r["class"], "probability": r["probability"]} for r in shown()] == want[drop]

            page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
            page.wait_for_selector("#status.error")
            assert page.text_content("#status").startswith("error: notes.png: not a readable image")
        finally:
            browser.close()
    shot = Image.open(tmp_path / "upload_page.png").convert("RGB")
    assert shot.size == (800, 700)
    bar_pixels = (np.abs(np.asarray(shot).astype(int) - [0x2A, 0x6A, 0xD8]).sum(2) < 30).sum()
    assert bar_pixels > 500, bar_pixels  # the bars were drawn
