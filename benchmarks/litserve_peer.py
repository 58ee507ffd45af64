"""The serving benchmark's peer: LitServe, with its own dynamic batching, serving the same net with
the same preprocessing and answer as `cifar-dist serve` (cifar_dist.predict's model_input,
probabilities and top_classes), at POST /predict with the image as a multipart file `files`.

    python benchmarks/litserve_peer.py RUN_DIR --port 8001 [--max-batch 64] [--max-delay-ms 5]

LitServe (pip install 'cifar-dist[bench]') runs its HTTP server and its inference worker as two
processes; `decode_request` runs in the worker, so decoding the images is part of its batch loop.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run time,
# and only the class itself (not the string "Request") makes it parse the form before its queue.
import argparse
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from fastapi import Request

from cifar_dist.predict import load_model, model_input, probabilities, top_classes


class CifarAPI(ls.LitAPI):
    def __init__(self, run: Path, max_batch: int, max_delay_s: float):
        super().__init__(max_batch_size=max_batch, batch_timeout=max_delay_s)
        self.run = run

    def setup(self, device: str) -> None:
        self.model = load_model(self.run)

    def decode_request(self, request: Request) -> np.ndarray:
        return model_input(request["files"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, pixels: np.ndarray) -> torch.Tensor:
        return probabilities(self.model.net, self.model.stats, torch.from_numpy(np.ascontiguousarray(pixels)))

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probs: torch.Tensor) -> dict[str, Any]:
        return {"predictions": [{"top": top_classes(probs.tolist(), self.model.classes, 5)}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    args = parser.parse_args()
    api = CifarAPI(args.run, args.max_batch, args.max_delay_ms / 1000)
    ls.LitServer(api, accelerator="cpu").run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
