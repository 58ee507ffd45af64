"""The served model: uint8 pixels (N, 32, 32, 3) in, each image's probabilities out (a list of N
lists, one number per class), whichever backend.

torch: a run dir, its model.pt or a checkpoint, loaded as `predict` loads it (its sha256 checked),
and computed as `predict.probabilities` computes it, traced by TorchScript. onnx: a file written by
`cifar-dist export --format onnx` (a run dir means its model.onnx), its graph digest checked, run by
onnxruntime.

Each backend runs a batch in one call that releases the GIL until it is done. The net in eager mode
takes the GIL back after each of its ops, and each time waits while the event loop holds it: up to
Python's switch interval, so a busy service ran a batch of one in 20-280 ms instead of 1 ms.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_dist.errors import UserError
from cifar_dist.export import FORMATS, ModelCard, Normalized, model_card, read_onnx, traced
from cifar_dist.predict import load_model
from cifar_dist.sources import Stats

BACKENDS = ("torch", "onnx")


@dataclass
class ServedModel:
    card: ModelCard
    backend: str
    file: Path
    sha256: str  # of the file's bytes, as `sha256sum` prints it
    probabilities: Callable[[np.ndarray], list[list[float]]]  # uint8 (N, 32, 32, 3) -> N rows of one number a class

    def identity(self) -> dict[str, str | None]:
        return {"name": self.card.model, "run_id": self.card.run_id, "sha256": self.sha256, "backend": self.backend}


def load_served(path: Path, backend: str, threads: int | None = None) -> ServedModel:
    """The model at `path` for `backend`, computing on `threads` threads (None: the runtime's default)."""
    if backend == "torch":
        if threads:
            torch.set_num_threads(threads)
        m = load_model(path)
        net = traced(Probabilities(m.net, m.stats).eval().requires_grad_(False))
        return ServedModel(model_card(m), backend, m.file, m.file_sha256,
                           lambda pixels: net(torch.from_numpy(pixels)).tolist())
    if backend == "onnx":
        file = path / f"model{FORMATS['onnx']}" if path.is_dir() else path
        if path.is_dir() and not file.is_file():
            raise UserError(f"{path}: no model.onnx in this run directory; make it with "
                            f"`cifar-dist export {path} --format onnx`")
        card, logits = read_onnx(file, threads or 0)
        return ServedModel(card, backend, file, hashlib.sha256(file.read_bytes()).hexdigest(),
                           lambda pixels: torch.softmax(torch.from_numpy(logits(pixels)), 1).tolist())
    raise UserError(f"--backend: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


class Probabilities(torch.nn.Module):
    """`predict.probabilities` as one module, to trace: uint8 pixels (N, 32, 32, 3) -> float32 (N, classes)."""

    def __init__(self, net: torch.nn.Module, stats: Stats):
        super().__init__()
        self.normalized = Normalized(net, stats)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.normalized(pixels).float(), 1)
