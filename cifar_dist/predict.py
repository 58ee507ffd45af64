"""`cifar-dist predict --checkpoint RUN_DIR_OR_FILE IMAGE_OR_DIR...`: top-k classes per image.

Weights load with `torch.load(weights_only=True)`: a checkpoint is data and never runs code.
`model_input`, `probabilities` and `top_classes` are the whole path from an image file to its answer;
`cifar-dist serve` (serve/) answers with the same three, so the service and this command agree.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cifar_dist import checkpoint
from cifar_dist.data import normalize
from cifar_dist.errors import UserError, run_command
from cifar_dist.images import IMAGE_SUFFIXES, net_pixels
from cifar_dist.models import MODELS, build_model
from cifar_dist.rundir import MODEL, load_weights
from cifar_dist.sources import CIFAR10_STATS, Stats

# An image whose header claims more pixels is refused before they are decoded (a decompression bomb:
# a few KB that inflate to gigabytes). A 50-megapixel photo still passes.
MAX_PIXELS = 50_000_000


class PredictError(UserError):
    """The checkpoint or the images cannot be used; the message names the file or folder."""


class ImageError(ValueError):
    """Not a readable image, or one larger than it may be; the message says which."""


def load_classifier(path: Path) -> tuple[torch.nn.Module, list[str], Stats]:
    """A run dir (its model.pt, else its newest checkpoint), a model.pt, or a checkpoint state.pt:
    the net, its class names, and the statistics its inputs are normalised with."""
    m = load_model(path)
    return m.net, m.classes, m.stats


@dataclass
class LoadedModel:
    net: torch.nn.Module  # in eval mode
    name: str  # models.MODELS' name of the net
    classes: list[str]
    stats: Stats
    file: Path  # the file read: model.pt or a checkpoint's state.pt
    file_sha256: str  # of its bytes, as `sha256sum` prints it


def load_model(path: Path) -> LoadedModel:
    """`load_classifier`'s model, with its name and the file it came from."""
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
    except pickle.UnpicklingError as e:  # what weights_only=True raises for anything but plain data
        raise PredictError(f"{path}: refused, not a plain-data checkpoint ({_first_line(e)})") from None
    except UserError:
        raise
    except Exception as e:  # a truncated or overwritten file fails in torch's zip reader, in many ways
        raise PredictError(f"{path}: damaged or not a PyTorch file ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(blob, dict):
        raise PredictError(f"{path}: not a cifar-dist model or checkpoint (it holds a {type(blob).__name__})")
    if "state_dict" in blob:  # model.pt
        name, classes, state = blob.get("model"), blob.get("classes"), blob["state_dict"]
    elif "model" in blob and "config" in blob:  # a training checkpoint
        name, classes, state = blob["config"].get("model", {}).get("name"), blob.get("classes"), blob["model"]
        if blob["config"].get("eval", {}).get("ema") and blob.get("ema"):  # eval.ema: the weights it evaluated
            state = {k.removeprefix("module."): v for k, v in blob["ema"].items() if k.startswith("module.")}
    else:
        raise PredictError(f"{path}: not a cifar-dist model or checkpoint (no state_dict or model weights in it)")
    if name not in MODELS:
        raise PredictError(f"{path}: unknown model {name!r}")
    if not (isinstance(state, dict) and isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise PredictError(f"{path}: not a cifar-dist model or checkpoint (no weights and class names in it)")
    net = build_model(name, len(classes))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[1:])
        why = why if len(why) <= 200 else why[:197] + "..."
        raise PredictError(f"{path}: its weights do not fit the {name} net with {len(classes)} classes ({why})") from None
    # A file that stores no statistics was trained with CIFAR-10's.
    stats = Stats(tuple(blob["mean"]), tuple(blob["std"])) if "mean" in blob else CIFAR10_STATS
    return LoadedModel(net.eval(), name, classes, stats, path, hashlib.sha256(path.read_bytes()).hexdigest())


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:160]


def image_files(paths: list[Path]) -> list[Path]:
    """The files given, and the images in the folders given; a folder without any is an error."""
    out = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PredictError(f"{p}: no images in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        else:
            out.append(p)
    return out


def model_input(src: bytes | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Any image file (its bytes or path), of any size, mode or bit depth -> the net's input pixels:
    RGB uint8 (32, 32, 3), decoded and resized as the training images were (`read_image`). The
    header is read first: more than `max_pixels` is refused before a pixel is decoded."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(f"too large: {width}x{height} pixels, more than the {max_pixels:,} allowed")
            return net_pixels(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own, stricter-than-nothing limit, met on open
        raise ImageError(f"too large ({e})") from None
    except Exception as e:  # Pillow fails in many ways on bytes that are not (whole) images
        raise ImageError(f"not a readable image ({type(e).__name__}: {e})") from None


@torch.no_grad()
def probabilities(net: torch.nn.Module, stats: Stats, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) pixels -> float32 (N, classes) probabilities, normalised as in training."""
    return torch.softmax(net(normalize(pixels, stats)).float(), 1)


def top_classes(probs: Sequence[float], classes: list[str], top_k: int) -> list[dict[str, Any]]:
    """One image's probabilities, a number per class -> its `top_k` classes, most probable first (ties:
    in class order). Plain Python: the service calls it in its event loop, where a torch call would
    hand the GIL to the inference thread and wait to get it back."""
    best = sorted(range(len(classes)), key=lambda i: -probs[i])[:top_k]
    return [{"class": classes[i], "probability": round(float(probs[i]), 4)} for i in best]


def predict(net: torch.nn.Module, classes: list[str], stats: Stats, files: list[Path], top_k: int) -> list[dict[str, Any]]:
    results = []
    for f in files:
        try:
            x = torch.from_numpy(model_input(f)).unsqueeze(0)
        except ImageError as e:
            results.append({"file": str(f), "error": str(e)})
            continue
        results.append({"file": str(f), "top": top_classes(probabilities(net, stats, x)[0].tolist(), classes, top_k)})
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
    files = image_files(args.images)
    net, classes, stats = load_classifier(args.checkpoint)
    results = predict(net, classes, stats, files, args.top_k)
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
