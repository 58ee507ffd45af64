"""`cifar-dist predict --checkpoint RUN_DIR_OR_FILE IMAGE_OR_DIR...`: top-k classes per image.

Weights load with `torch.load(weights_only=True)`: a checkpoint is data and never runs code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cifar_dist import checkpoint
from cifar_dist.data import normalize
from cifar_dist.errors import UserError, run_command
from cifar_dist.models import MODELS, build_model
from cifar_dist.rundir import MODEL, load_weights
from cifar_dist.sources import IMAGE_SIZE, IMAGE_SUFFIXES


class PredictError(UserError):
    """The checkpoint cannot be used."""


def load_classifier(path: Path) -> tuple[torch.nn.Module, list[str]]:
    """A run dir (its model.pt, else its newest checkpoint), a model.pt, or a checkpoint state.pt."""
    if path.is_dir():
        newest_first = reversed(checkpoint.list_checkpoints(path))
        candidates = [path / MODEL] + [c.path / checkpoint.STATE for c in newest_first]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise PredictError(f"{path}: no {MODEL} and no valid checkpoint in this run directory")
        path = found
    if not path.is_file():
        raise PredictError(f"{path}: no such checkpoint file")
    try:
        blob = load_weights(path)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        raise PredictError(f"{path}: refused, not a plain-data checkpoint ({why})") from None
    if "state_dict" in blob:  # model.pt
        name, classes, state = blob["model"], blob["classes"], blob["state_dict"]
    elif "model" in blob and "config" in blob:  # a training checkpoint
        name, state = blob["config"]["model"]["name"], blob["model"]
        classes = blob.get("classes") or [str(i) for i in range(state[next(reversed(state))].shape[0])]
    else:
        raise PredictError(f"{path}: not a cifar-dist model or checkpoint")
    if name not in MODELS:
        raise PredictError(f"{path}: unknown model {name!r}")
    net = build_model(name, len(classes))
    net.load_state_dict(state)
    return net.eval(), classes


def image_files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def read_image(path: Path) -> np.ndarray:
    """Any size or mode -> RGB 32x32 uint8 (H, W, 3)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


@torch.no_grad()
def predict(net: torch.nn.Module, classes: list[str], files: list[Path], top_k: int) -> list[dict[str, Any]]:
    results = []
    for f in files:
        try:
            x = torch.from_numpy(read_image(f)).unsqueeze(0)
        except Exception as e:
            results.append({"file": str(f), "error": f"not a readable image ({type(e).__name__}: {e})"})
            continue
        probs = torch.softmax(net(normalize(x)).float(), 1)[0]
        p, idx = probs.topk(min(top_k, len(classes)))
        results.append({"file": str(f), "top": [{"class": classes[i], "probability": round(float(q), 4)}
                                                for q, i in zip(p.tolist(), idx.tolist())]})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cifar-dist predict", description="Classify images with a trained model.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run directory, its model.pt or a checkpoint")
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders of them")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise PredictError(f"--top-k: must be >= 1, got {args.top_k}")
    net, classes = load_classifier(args.checkpoint)
    results = predict(net, classes, image_files(args.images), args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"error: {r['file']}: {r['error']}", file=sys.stderr)
            else:
                print(f"{r['file']}: " + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"]))
    failed = sum("error" in r for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
