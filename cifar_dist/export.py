"""`cifar-dist export RUN_DIR --format onnx|torchscript|safetensors [--out PATH]`: a trained model as
one file that other runtimes load, checked against the torch net before it is kept.

Every format takes the same input and gives the same output (INPUT, OUTPUT):

    pixels  uint8 (N, 32, 32, 3): RGB, 0-255, N any (the batch axis is dynamic); an image of
            another size is first resized to 32x32 as `cifar-dist predict` does (bilinear)
    logits  float32 (N, classes); softmax gives the probabilities

The normalisation with the training images' mean and std is inside the graph (onnx, torchscript);
a safetensors file holds weights only, with the mean and std as the tensors `normalize.mean` and
`normalize.std` and the net's weights under `net.`. Each file carries the model card (CARD_KEY, JSON):
net name, class names, mean, std, input and output layout, run id, config hash, summary.json's test
accuracy and the source model's sha256. An onnx file also carries `cifar_dist.graph_sha256`, a
digest of its graph and weights, which `cifar-dist serve --backend onnx` checks before serving.

The check, on the run's own test set (its config says where; key=value overrides it): the exported
file's logits against torch's on the first CHECK_IMAGES images (max abs difference <= MAX_DIFF,
the same top-1 on >= MIN_AGREEMENT of them), then the exported file's accuracy on the whole test
set, which must be within MAX_ACCURACY_GAP points of summary.json's. The file is written beside
PATH and renamed onto it only when the check passes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_dist import schema
from cifar_dist.config import Config, config_from_dict, load_config, validate
from cifar_dist.errors import DataError, UserError, run_command
from cifar_dist.images import IMAGE_SIZE
from cifar_dist.models import MODELS, build_model
from cifar_dist.predict import LoadedModel, load_model
from cifar_dist.result_keys import config_hash
from cifar_dist.rundir import CONFIG, MODEL, RunDir
from cifar_dist.sources import Stats

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
INPUT = (f"pixels: uint8 (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), RGB, 0-255, N any; other image sizes are first resized "
         f"to {IMAGE_SIZE}x{IMAGE_SIZE} (bilinear, as cifar-dist predict does); normalisation is inside the model")
OUTPUT = "logits: float32 (N, classes); softmax gives the probabilities"
CARD_KEY = "cifar_dist"  # the model card's key in the file's metadata (torchscript: an extra file of this name + .json)
GRAPH_KEY = "cifar_dist.graph_sha256"  # onnx only
CHECK_IMAGES = 1000
MAX_DIFF = 1e-4  # fp32 logits
MIN_AGREEMENT = 0.999  # share of images with the same top-1
MAX_ACCURACY_GAP = 0.05  # percentage points
BATCH = 500  # images per forward pass in the check


class ExportError(UserError):
    """The model cannot be exported or an exported file cannot be read; the message names the file."""


@dataclass
class ModelCard:
    """What a trained model is: written into every exported file, answered by `serve`'s /v1/model."""

    model: str  # the net's name (models.MODELS)
    classes: list[str]
    mean: list[float]  # per channel (R, G, B), for pixels in [0, 1]
    std: list[float]
    run_id: str | None
    config_hash: str | None  # result_keys.config_hash of the run's config.yaml
    test_accuracy: float | None  # summary.json's
    source_sha256: str  # of the model file the card was made from
    input: str = INPUT
    output: str = OUTPUT

    @property
    def stats(self) -> Stats:
        return Stats(tuple(self.mean), tuple(self.std))  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path) -> ModelCard:
        try:
            card = cls(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise ExportError(f"{where}: its {CARD_KEY} model card is damaged ({e})") from None
        if card.model not in MODELS or not card.classes or len(card.mean) != 3 or len(card.std) != 3:
            raise ExportError(f"{where}: its {CARD_KEY} model card is damaged (model {card.model!r}, "
                              f"{len(card.classes)} classes, mean {card.mean}, std {card.std})")
        return card


def run_dir_of(model_file: Path) -> Path:
    """The run directory of a model.pt (its folder) or a checkpoint's state.pt (checkpoints/step_N/)."""
    return model_file.parent if model_file.name == MODEL else model_file.parent.parent.parent


def run_config(run_dir: Path) -> Config | None:
    saved = run_dir / CONFIG
    return config_from_dict(schema.read_yaml_mapping(saved, "run config")) if saved.is_file() else None


def model_card(m: LoadedModel) -> ModelCard:
    run = RunDir(run_dir_of(m.file))
    summary = run.summary() or {}
    cfg = run_config(run.path)
    return ModelCard(m.name, list(m.classes), list(m.stats.mean), list(m.stats.std), summary.get("run_id"),
                     config_hash(cfg) if cfg else None, summary.get("test_accuracy"), m.file_sha256)


class Normalized(nn.Module):
    """A net with its input normalisation in front: uint8 pixels (N, 32, 32, 3) -> logits (N, classes).
    The arithmetic is data.normalize's, so its logits equal `predict`'s."""

    def __init__(self, net: nn.Module, stats: Stats):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(stats.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(stats.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std)


# ---------------------------------------------------------------------------- writing each format


def write_onnx(module: Normalized, card: ModelCard, path: Path) -> None:
    import onnx

    example = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    with contextlib.redirect_stdout(sys.stderr):  # the exporter reports its steps on stdout
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["pixels"], output_names=["logits"],
                                    dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, verbose=False)
    proto = program.model_proto
    proto.doc_string = f"cifar-dist {card.model}: {INPUT}. {OUTPUT}."
    del proto.metadata_props[:]
    for key, value in ((CARD_KEY, card.to_json()), (GRAPH_KEY, graph_sha256(proto))):
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, path)


def graph_sha256(proto: Any) -> str:
    """sha256 of an onnx model's graph, weights included, metadata not (it holds this digest)."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


@contextlib.contextmanager
def torchscript_quietly() -> Iterator[None]:
    """torch deprecates TorchScript (for torch.export), yet its runtimes load it: no warning for using it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def traced(module: nn.Module) -> torch.jit.ScriptModule:
    """`module` (uint8 pixels in) traced by TorchScript; the nets have no data-dependent control flow."""
    with torchscript_quietly():
        return torch.jit.trace(module, torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8))


def write_torchscript(module: Normalized, card: ModelCard, path: Path) -> None:
    with torchscript_quietly():
        torch.jit.save(traced(module), path, _extra_files={f"{CARD_KEY}.json": card.to_json()})


def write_safetensors(module: Normalized, card: ModelCard, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"net.{k}": v.contiguous() for k, v in module.net.state_dict().items()}
    tensors.update({"normalize.mean": module.mean.flatten(), "normalize.std": module.std.flatten()})
    save_file(tensors, path, metadata={CARD_KEY: card.to_json()})


WRITERS: dict[str, Callable[[Normalized, ModelCard, Path], None]] = {
    "onnx": write_onnx, "torchscript": write_torchscript, "safetensors": write_safetensors}


# ---------------------------------------------------------------------------- reading each format back

Logits = Callable[[np.ndarray], np.ndarray]  # uint8 (N, 32, 32, 3) -> float32 (N, classes)


def read_onnx(path: Path, threads: int = 0) -> tuple[ModelCard, Logits]:
    """An exported onnx file, checked against its graph digest, run by onnxruntime on the CPU on
    `threads` threads (0: onnxruntime's default)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(f"onnx files need onnx and onnxruntime ({e}): pip install 'cifar-dist[export]'") from None
    if not path.is_file():
        raise ExportError(f"{path}: no such onnx file")
    raw = path.read_bytes()
    try:
        proto = onnx.load_from_string(raw)
    except Exception as e:  # protobuf's DecodeError and onnx's own, for a truncated or foreign file
        raise ExportError(f"{path}: damaged or not an onnx file ({type(e).__name__}: {e})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if CARD_KEY not in meta or GRAPH_KEY not in meta:
        raise ExportError(f"{path}: not exported by cifar-dist export (no {CARD_KEY} model card in its metadata)")
    if graph_sha256(proto) != meta[GRAPH_KEY]:
        raise ExportError(f"{path}: damaged (its graph does not match the sha256 saved with it); export it again")
    card = ModelCard.from_json(meta[CARD_KEY], path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if threads:  # a thread count that leaves cores to others: no spinning on them while idle
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
    return card, lambda pixels: session.run(None, {"pixels": pixels})[0]


def read_torchscript(path: Path) -> tuple[ModelCard, Logits]:
    extra = {f"{CARD_KEY}.json": ""}
    with torchscript_quietly():
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra).eval()
    card = ModelCard.from_json(extra[f"{CARD_KEY}.json"], path)
    return card, lambda pixels: module(torch.from_numpy(pixels)).detach().numpy()


def read_safetensors(path: Path) -> tuple[ModelCard, Logits]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        card = ModelCard.from_json((f.metadata() or {}).get(CARD_KEY, ""), path)
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), not iteration
    net = build_model(card.model, len(card.classes))
    net.load_state_dict({k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")})
    mean, std = (tuple(tensors[f"normalize.{k}"].tolist()) for k in ("mean", "std"))
    module = Normalized(net, Stats(mean, std)).eval()  # type: ignore[arg-type]

    @torch.no_grad()
    def logits(pixels: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(pixels)).numpy()

    return card, logits


READERS: dict[str, Callable[[Path], tuple[ModelCard, Logits]]] = {
    "onnx": read_onnx, "torchscript": read_torchscript, "safetensors": read_safetensors}


# ---------------------------------------------------------------------------- the check


@dataclass
class CheckResult:
    images: int  # compared with torch
    max_diff: float
    agreement: float  # share with the same top-1
    accuracy: float  # the exported file's, on the whole test set
    test_images: int
    reference: float  # the accuracy it is held to (summary.json's, or torch's own when that is not comparable)
    reference_name: str

    @property
    def passed(self) -> bool:
        return self.max_diff <= MAX_DIFF and self.agreement >= MIN_AGREEMENT and self.gap <= MAX_ACCURACY_GAP

    @property
    def gap(self) -> float:
        """Percentage points between the exported file's accuracy and the reference."""
        return abs(self.accuracy - self.reference) * 100


def batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(x[i:i + BATCH]) for i in range(0, len(x), BATCH)])


def check(module: Normalized, exported: Logits, images: torch.Tensor, labels: torch.Tensor, card: ModelCard,
          cfg: Config | None, precision: str | None) -> CheckResult:
    """The exported file against the torch net (fp32), and its test accuracy against summary.json's."""
    pixels = images.numpy()
    n = min(CHECK_IMAGES, len(pixels))
    with torch.no_grad():
        reference = batched(lambda x: module(torch.from_numpy(x)).numpy(), pixels[:n])
    mine = batched(exported, pixels)
    diff = float(np.abs(mine[:n] - reference).max())
    agreement = float((mine[:n].argmax(1) == reference.argmax(1)).mean())
    accuracy = float((mine.argmax(1) == labels.numpy()).mean())
    # summary.json's accuracy is comparable when the run evaluated as the exported file computes: one
    # fp32 forward pass per image. Test-time augmentation or bf16 evaluation is compared with torch's own.
    plain = cfg is not None and not cfg.eval.tta_flip and not cfg.eval.tta_translate and precision == "fp32"
    if card.test_accuracy is not None and plain:
        return CheckResult(n, diff, agreement, accuracy, len(pixels), card.test_accuracy, "summary.json's")
    with torch.no_grad():
        torch_accuracy = float((batched(lambda x: module(torch.from_numpy(x)).numpy(), pixels).argmax(1)
                                == labels.numpy()).mean())
    why = "no summary.json" if card.test_accuracy is None else (
        f"summary.json's {card.test_accuracy:.2%} was measured with test-time augmentation or {precision} evaluation")
    return CheckResult(n, diff, agreement, accuracy, len(pixels), torch_accuracy, f"the torch net's fp32 ({why})")


# ---------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cifar-dist export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, metavar="RUN_DIR", help="a run directory (or its model.pt)")
    parser.add_argument("--format", required=True, help=" | ".join(FORMATS))
    parser.add_argument("--out", type=Path, help="the file to write (default: model<suffix of the format> in RUN_DIR)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="changes to the run's config for the check, e.g. data.path=... where the data moved")
    args = parser.parse_intermixed_args(argv)
    if args.format not in FORMATS:
        raise ExportError(f"--format: unknown format {args.format!r}; choose one of {', '.join(FORMATS)}")
    m = load_model(args.run)
    run_dir = run_dir_of(m.file)
    out = args.out or run_dir / f"model{FORMATS[args.format]}"
    if not out.parent.is_dir():
        raise ExportError(f"--out: folder {out.parent} does not exist")
    card = model_card(m)
    cfg = run_config(run_dir) or load_config()
    for item in args.overrides:
        key, _, value = item.partition("=")
        schema.set_key(cfg, key, value, from_text=True)
    validate(cfg)
    from cifar_dist.data import load_dataset

    data = load_dataset(cfg.data, announce=lambda s: print(s, file=sys.stderr))
    if data.classes != m.classes:
        raise DataError(f"the model's classes {m.classes} are not the test data's {data.classes} (data.source={cfg.data.source})")
    precision = (RunDir(run_dir).summary() or {}).get("precision")

    module = Normalized(m.net, m.stats).eval()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        WRITERS[args.format](module, card, tmp)
        _, exported = READERS[args.format](tmp)
        result = check(module, exported, data.test_x, data.test_y, card, cfg, precision)
        report(out, args.format, tmp.stat().st_size, result)
        if not result.passed:
            print(f"error: {out}: the exported model fails its check; nothing written", file=sys.stderr)
            return 1
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return 0


def report(out: Path, fmt: str, size: int, r: CheckResult) -> None:
    def mark(ok: bool) -> str:
        return "ok" if ok else "FAILED"

    print(f"{out} ({fmt}, {size / 1e6:.2f} MB): uint8 pixels (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) RGB in, "
          f"float32 logits out, normalisation inside")
    print(f"check on {r.images:,} test images against torch: max |logit difference| {r.max_diff:.2g} "
          f"(<= {MAX_DIFF:g}: {mark(r.max_diff <= MAX_DIFF)}), same top-1 on {r.agreement:.2%} "
          f"(>= {MIN_AGREEMENT:.1%}: {mark(r.agreement >= MIN_AGREEMENT)})")
    print(f"test accuracy of the exported model: {r.accuracy:.2%} on {r.test_images:,} test images; {r.reference_name}: "
          f"{r.reference:.2%} ({r.gap:.2f} points apart, <= {MAX_ACCURACY_GAP}: {mark(r.gap <= MAX_ACCURACY_GAP)})")


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
