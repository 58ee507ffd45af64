"""The HTTP app (FastAPI): what each route answers, the limits on what a request may send, the
metrics. Every error is one JSON object `{"error": "..."}` and one log line; one line is logged
per request. Nothing from a request is unpickled: images are decoded by Pillow, forms parsed by
python-multipart, query parameters by FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cifar_dist.images import IMAGE_SIZE
from cifar_dist.predict import MAX_PIXELS, ImageError, model_input, top_classes
from cifar_dist.serve.batcher import Batcher, QueueFull
from cifar_dist.serve.model import ServedModel

log = logging.getLogger("cifar_dist.serve")
logging.getLogger("python_multipart").setLevel(logging.CRITICAL)  # its parse errors are in the request's own line
RAW_TYPES = ("image/", "application/octet-stream")  # a body that is one image file
ROUTES = {"/", "/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}
RETRY_AFTER_S = 1  # what a 503 asks a client to wait
# Files up to this size decode in the event loop: a 32x32 PNG takes ~0.1 ms, less than the hop to a
# worker thread and back; larger ones (photos: milliseconds) decode in a thread.
INLINE_DECODE_BYTES = 64 * 1024


@dataclass
class Limits:
    max_batch: int = 64  # images per batch
    max_delay_ms: float = 5.0  # the longest an image waits for its batch to fill
    max_queue: int = 1024  # images waiting; more are refused with 503
    max_requests: int = 128  # predictions in progress (reading, decoding, waiting); more are refused with 503
    max_body: int = 10 * 1024 * 1024  # bytes per request
    max_files: int = 64  # images per request
    max_pixels: int = MAX_PIXELS  # what an image's header may claim


class RequestError(Exception):
    """A request the service refuses: its HTTP status and the message for `{"error": ...}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process: the tests)."""

    def __init__(self, queue_depth: Any):
        self.registry = CollectorRegistry()
        self.requests = Counter("cifar_dist_requests", "HTTP requests by route and status", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("cifar_dist_predict_latency_seconds", "POST /v1/predict: arrival to answer",
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_size = Histogram("cifar_dist_batch_size", "images per batch the inference worker ran",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.images = Counter("cifar_dist_images", "images classified", registry=self.registry)
        depth = Gauge("cifar_dist_queue_depth", "images waiting for the inference worker", registry=self.registry)
        depth.set_function(queue_depth)


class RequestLog:
    """ASGI middleware: per request, one log line (method, path, status, milliseconds, and the error
    when there is one), the requests counter, and the latency of predictions."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        state = scope.setdefault("state", {})

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            path = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(path, str(status)).inc()
            if path == "/v1/predict":
                self.metrics.latency.observe(seconds)
            error = state.get("error")
            log.info("%s %s %d %.1f ms%s", scope["method"], scope["path"], status, seconds * 1000,
                     f": {error}" if error else "")


def error_response(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    request.state.error = message  # for RequestLog's line
    return JSONResponse({"error": message}, status, headers=headers)


def create_app(served: ServedModel, limits: Limits) -> FastAPI:
    """The app: its routes, each a line or two; what a prediction and the model's card answer live
    in `Predictions` and `model_info`."""
    batcher: Batcher
    page = resources.files("cifar_dist.serve").joinpath("index.html").read_text()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start(asyncio.get_running_loop())
        yield
        batcher.close()  # after uvicorn let the requests in flight finish: the queue is empty by now

    app = FastAPI(title="cifar-dist serve", version="1", lifespan=lifespan,
                  description=f"Classify images with a trained `{served.card.model}` net: "
                              f"{len(served.card.classes)} classes ({', '.join(served.card.classes[:10])}"
                              f"{', ...' if len(served.card.classes) > 10 else ''}).")
    metrics = Metrics(lambda: batcher.depth)
    batcher = Batcher(served.probabilities, limits.max_batch, limits.max_delay_ms / 1000, limits.max_queue,
                      on_batch=metrics.batch_size.observe)
    app.add_middleware(RequestLog, metrics=metrics)
    add_error_handlers(app)
    predictions = Predictions(served, limits, batcher, metrics)

    @app.get("/", response_class=HTMLResponse, summary="The upload page: pick or drop an image, see its top 5 classes")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.post("/v1/predict", summary="Top-k classes of one or more images", openapi_extra=PREDICT_DOCS)
    async def predict(request: Request, top_k: int = 5) -> Any:
        return await predictions.answer(request, top_k)

    @app.get("/v1/model", summary="The model: classes, input, normalisation, config hash, test accuracy")
    async def model() -> dict[str, Any]:
        return model_info(served, limits)

    @app.get("/healthz", summary="Alive")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Ready: the model is loaded and warmed up")
    async def readyz(request: Request) -> Any:
        if batcher.warmup_error is not None:
            return error_response(request, 503, f"the model failed its warm-up: {batcher.warmup_error}")
        if not batcher.ready.is_set():
            return error_response(request, 503, "warming up")
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.batcher = batcher
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Starlette's and FastAPI's errors (an unknown route, a bad query parameter) as `{"error": ...}`."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = "not found" if e.status_code == 404 else str(e.detail).lower()
        return error_response(request, e.status_code, f"{message}: {request.method} {request.url.path}")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return error_response(request, 400, problems)


class Predictions:
    """POST /v1/predict: a request admitted while fewer than `max_requests` are in progress (with
    max_body, what bounds the memory they hold), read, decoded, batched with others, answered."""

    def __init__(self, served: ServedModel, limits: Limits, batcher: Batcher, metrics: Metrics):
        self.served, self.limits, self.batcher, self.metrics = served, limits, batcher, metrics
        self.in_progress = 0  # predictions between arrival and answer

    async def answer(self, request: Request, top_k: int) -> JSONResponse:
        limits = self.limits
        if self.in_progress >= limits.max_requests:
            return error_response(request, 503, f"busy: {self.in_progress} requests in progress (at most "
                                                f"{limits.max_requests}); retry after {RETRY_AFTER_S} s",
                                  {"Retry-After": str(RETRY_AFTER_S)})
        self.in_progress += 1
        try:
            return await self.classify(request, top_k)
        finally:
            self.in_progress -= 1

    async def classify(self, request: Request, top_k: int) -> JSONResponse:
        limits, served = self.limits, self.served
        try:
            if top_k < 1:
                raise RequestError(400, f"top_k: must be >= 1, got {top_k}")
            files = parse_images(await read_body(request, limits.max_body), request.headers.get("content-type", ""),
                                 limits.max_files)
            if sum(len(data) for _, data in files) <= INLINE_DECODE_BYTES:
                pixels = decode(files, limits.max_pixels)
            else:  # Pillow decodes outside the GIL: the event loop goes on meanwhile
                pixels = await run_in_threadpool(decode, files, limits.max_pixels)
            rows = await self.batcher.submit(pixels)
        except RequestError as e:
            return error_response(request, e.status, str(e))
        except QueueFull as e:
            return error_response(request, 503, f"busy: {e}; retry after {RETRY_AFTER_S} s",
                                  {"Retry-After": str(RETRY_AFTER_S)})
        self.metrics.images.inc(len(rows))
        return JSONResponse({"model": served.identity(),
                             "predictions": [{"file": name, "top": top_classes(row, served.card.classes, top_k)}
                                             for (name, _), row in zip(files, rows)]})


def model_info(served: ServedModel, limits: Limits) -> dict[str, Any]:
    """GET /v1/model: what a client needs to know of the model and of the service's limits."""
    c = served.card
    return {**served.identity(), "file": served.file.name, "classes": c.classes,
            "input": {"size": [IMAGE_SIZE, IMAGE_SIZE], "channels": "RGB",
                      "preprocessing": "any image Pillow reads, any size and mode: converted to RGB and resized "
                                       f"to {IMAGE_SIZE}x{IMAGE_SIZE} (bilinear), as cifar-dist predict does"},
            "normalisation": {"mean": c.mean, "std": c.std}, "config_hash": c.config_hash,
            "test_accuracy": c.test_accuracy,
            "batching": {"max_batch": limits.max_batch, "max_delay_ms": limits.max_delay_ms,
                         "max_queue": limits.max_queue},
            "limits": {"max_requests": limits.max_requests, "max_body_bytes": limits.max_body,
                       "max_files": limits.max_files, "max_pixels": limits.max_pixels}}


# ---------------------------------------------------------------------------- reading a request


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` (by its Content-Length, else while it streams in)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {int(declared):,} bytes is over the limit of {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body is over the limit of {limit:,} bytes")
    return bytes(body)


def parse_images(body: bytes, content_type: str, max_files: int) -> list[tuple[str | None, bytes]]:
    """(file name, bytes) of each image: the files of a multipart form, or the whole body."""
    if not body:
        raise RequestError(400, "empty request: send an image as the body or as multipart/form-data files")
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        files = multipart_files(body, content_type, max_files)
        if not files:
            raise RequestError(400, "the form holds no files: send each image as a file part")
        return files
    if kind.startswith(RAW_TYPES):
        return [(None, body)]
    raise RequestError(415, f"content type {kind or 'missing'!r} is not accepted: send one image as the body "
                            f"(Content-Type image/* or application/octet-stream) or images as multipart/form-data files")


def multipart_files(body: bytes, content_type: str, max_files: int) -> list[tuple[str | None, bytes]]:
    """The file parts of a multipart/form-data body (parts without a file name are ignored)."""
    _, params = parse_options_header(content_type)
    if not params.get(b"boundary"):
        raise RequestError(400, "multipart/form-data without a boundary")
    files: list[tuple[str | None, bytes]] = []
    part: dict[str, Any] = {}

    def on_part_begin() -> None:
        part.update(headers=[], field=b"", value=b"", data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"].append((part["field"].lower(), part["value"]))
        part.update(field=b"", value=b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["data"] += data[start:end]

    def on_part_end() -> None:
        disposition = dict(part["headers"]).get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        if b"filename" in options:
            if len(files) == max_files:
                raise RequestError(413, f"more than {max_files} files in one request")
            files.append((options[b"filename"].decode("utf-8", "replace"), bytes(part["data"])))

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise RequestError(400, f"malformed multipart/form-data body ({e})") from None
    return files


def decode(files: list[tuple[str | None, bytes]], max_pixels: int) -> list[np.ndarray]:
    """Each file as the net's input pixels (`predict.model_input`); the first that fails is a 400 naming it."""
    pixels = []
    for name, data in files:
        try:
            pixels.append(model_input(data, max_pixels))
        except ImageError as e:
            raise RequestError(400, f"{name or 'body'}: {e}") from None
    return pixels


PREDICT_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One image as the body, or one or more images as multipart/form-data files (any field name). "
                       "Any size and mode: each becomes RGB, is resized to 32x32 and normalised as in training.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {"description": "Each image's top-k classes and probabilities, and the model's identity",
                "content": {"application/json": {"example": {
                    "model": {"name": "medium", "run_id": "20261206-120000-ab12", "sha256": "9f2c...", "backend": "torch"},
                    "predictions": [{"file": "cat.png", "top": [{"class": "cat", "probability": 0.8123},
                                                                {"class": "dog", "probability": 0.1012}]}]}}}},
        "400": {"description": "Not an image, a damaged or truncated one, too many pixels, an empty request, a bad top_k"},
        "413": {"description": "A body over the size limit, or too many files"},
        "415": {"description": "A content type other than multipart/form-data, image/* or application/octet-stream"},
        "503": {"description": "The queue is full: retry after the Retry-After header's seconds"},
    },
}
