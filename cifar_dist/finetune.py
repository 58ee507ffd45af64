"""Fine-tuning (`train.init_from`): a new run starts from another run's weights instead of a fresh
initialisation. Weights only: the optimiser, the LR schedule and the step count start anew.

PATH is a model.pt, a run dir (its model.pt, else its newest valid checkpoint) or a checkpoint
(`step_N/` or its state.pt). The weights taken are those the source run evaluated: its model.pt's,
or a checkpoint's moving average when that run evaluated it (eval.ema). Every tensor must fit the
config's net by name and shape, except the classifier head (the net's last linear layer), which
keeps its fresh initialisation when the source's classes are not the data's (another count, or
other names). Anything else that does not fit is one error naming every such tensor.

The file's sha256 goes into the config (`train.init_sha256`, so config.yaml holds it) before the
run dir is opened, and into summary.json; a file that no longer matches it is refused.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_dist import checkpoint
from cifar_dist.config import Config
from cifar_dist.errors import ConfigError, UserError
from cifar_dist.rundir import load_weights

SHOWN = 8  # mismatched tensors named in the error before "and N more"


@dataclass
class InitWeights:
    path: str  # as given (train.init_from)
    file: Path  # the file the weights came from
    sha256: str  # of that file
    model: str  # the source's model.name
    classes: list[str]
    state_dict: dict[str, torch.Tensor]
    weights: str  # which of the source's weights: "trained", or "ema" (its moving average)

    def record(self, head_replaced: bool) -> dict[str, Any]:
        """What summary.json says about the start."""
        return {"path": self.path, "file": str(self.file), "sha256": self.sha256, "weights": self.weights,
                "model": self.model, "classes": len(self.classes), "head": "replaced" if head_replaced else "loaded"}


def read_init(cfg: Config) -> InitWeights | None:
    """The weights `train.init_from` names (None when it is empty); fills in `train.init_sha256`,
    or checks the file against it when it was given."""
    given = cfg.train.init_from
    if not given:
        return None
    # Read when a run starts, not when its config is validated: a run dir's config.yaml stays readable (evaluate,
    # compare) after the source is gone.
    try:
        file = checkpoint.weights_file(Path(given))
    except UserError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    digest = checkpoint.file_sha256(file)
    if cfg.train.init_sha256 and cfg.train.init_sha256 != digest:
        raise ConfigError(f"train.init_from: {file} has sha256 {digest}, not train.init_sha256={cfg.train.init_sha256} "
                          "(the file changed)")
    cfg.train.init_sha256 = digest
    try:
        blob = load_weights(file)
    except UserError:
        raise
    except pickle.UnpicklingError as e:
        raise ConfigError(f"train.init_from: {file} refused, not a plain-data file ({_first_line(e)})") from None
    except Exception as e:  # a truncated or foreign file fails in torch's zip reader in many ways
        raise ConfigError(f"train.init_from: {file} is not a PyTorch file ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(blob, dict) and "state_dict" in blob:  # model.pt
        model, state, weights = blob.get("model"), blob["state_dict"], blob.get("weights", "trained")
    elif isinstance(blob, dict) and "model" in blob and "config" in blob:  # a training checkpoint
        model = blob["config"].get("model", {}).get("name")
        ema = blob.get("ema") or {}
        if blob["config"].get("eval", {}).get("ema") and ema:  # the weights that run evaluated
            state, weights = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}, "ema"
        else:
            state, weights = blob["model"], "trained"
    else:
        raise ConfigError(f"train.init_from: {file} is not a cifar-dist model.pt or checkpoint")
    classes = blob.get("classes")
    if not (isinstance(state, dict) and isinstance(classes, list) and isinstance(model, str)):
        raise ConfigError(f"train.init_from: {file} holds no weights, model name and class names")
    return InitWeights(given, file, digest, model, classes, state, weights)


def load_init(net: nn.Module, init: InitWeights, model_name: str, classes: list[str]) -> tuple[str, bool]:
    """Copy `init`'s weights into `net` (a fresh `model_name` net for `classes`); the line to print,
    and whether the head was replaced. A ConfigError names every tensor that does not fit."""
    where = f"train.init_from: {init.file}"
    if init.model != model_name:
        raise ConfigError(f"{where} holds a {init.model} net, not model.name={model_name}")
    head = last_linear(net)
    replace = init.classes != classes
    skipped = {k for k in net.state_dict() if k.rpartition(".")[0] == head} if replace else set()
    own = net.state_dict()
    problems = [f"{k} missing" for k in own if k not in init.state_dict and k not in skipped]
    problems += [f"{k} unexpected" for k in init.state_dict if k not in own]
    problems += [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in init.state_dict.items()
                 if k in own and k not in skipped and v.shape != own[k].shape]
    if problems:
        more = f" and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise ConfigError(f"{where} does not fit the {model_name} net: {'; '.join(problems[:SHOWN])}{more}")
    net.load_state_dict({k: v for k, v in init.state_dict.items() if k not in skipped}, strict=not skipped)
    loaded = len(init.state_dict) - len(skipped)
    line = f"train.init_from: {loaded} tensors of {init.weights} weights from {init.file} (sha256 {init.sha256[:12]})"
    if replace:
        why = (f"{len(init.classes)} classes -> {len(classes)}" if len(init.classes) != len(classes)
               else "other class names")
        line += f"; head {head} replaced ({why}), freshly initialised"
    return line, replace


def last_linear(net: nn.Module) -> str:
    """The name of the net's classifier head: its last linear layer (every registered net ends in one)."""
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError("train.init_from: the net has no linear head to replace")
    return names[-1]


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:160]
