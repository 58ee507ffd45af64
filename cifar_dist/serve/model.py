"""The served model: uint8 pixels (N, 32, 32, 3) in, probabilities (N, classes) out, whichever backend.

torch: a run dir, its model.pt or a checkpoint, loaded as `predict` loads it (its sha256 checked),
and run with `predict.probabilities`. onnx: a file written by `cifar-dist export --format onnx`
(a run dir means its model.onnx), its graph digest checked, run by onnxruntime.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_dist.errors import UserError
from cifar_dist.export import FORMATS, ModelCard, model_card, read_onnx
from cifar_dist.predict import load_model, probabilities

BACKENDS = ("torch", "onnx")


@dataclass
class ServedModel:
    card: ModelCard
    backend: str
    file: Path
    sha256: str  # of the file's bytes, as `sha256sum` prints it
    probabilities: Callable[[np.ndarray], torch.Tensor]  # uint8 (N, 32, 32, 3) -> float32 (N, classes)

    def identity(self) -> dict[str, str | None]:
        return {"name": self.card.model, "run_id": self.card.run_id, "sha256": self.sha256, "backend": self.backend}


def load_served(path: Path, backend: str, threads: int | None = None) -> ServedModel:
    """The model at `path` for `backend`, computing on `threads` threads (None: the runtime's default)."""
    if backend == "torch":
        if threads:
            torch.set_num_threads(threads)
        m = load_model(path)
        return ServedModel(model_card(m), backend, m.file, m.file_sha256,
                           lambda pixels: probabilities(m.net, m.stats, torch.from_numpy(pixels)))
    if backend == "onnx":
        file = path / f"model{FORMATS['onnx']}" if path.is_dir() else path
        if path.is_dir() and not file.is_file():
            raise UserError(f"{path}: no model.onnx in this run directory; make it with "
                            f"`cifar-dist export {path} --format onnx`")
        card, logits = read_onnx(file, threads or 0)
        return ServedModel(card, backend, file, hashlib.sha256(file.read_bytes()).hexdigest(),
                           lambda pixels: torch.softmax(torch.from_numpy(logits(pixels)), 1))
    raise UserError(f"--backend: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
