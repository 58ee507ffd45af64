"""train.detect_anomaly: stop at the first non-finite loss or gradient, naming the step and the first
module whose output, or gradient, was not finite; the bad step is not recorded or saved."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from cifar_dist.distributed import Distributed
from cifar_dist.errors import UserError

NOTICE = ("detect_anomaly: a non-finite loss or gradient stops the run, naming the step and the first module that "
          "made one (one device sync per step)")


class AnomalyError(UserError):
    """train.detect_anomaly found a non-finite loss or gradient; the step is not recorded or saved."""


class AnomalyDetector:
    """Forward hooks on every module and gradient hooks on every trainable parameter note, as device
    booleans (no sync), whether each output and each gradient is finite, in the order they are made.
    After the step one check (one sync; every rank agrees) stops the run at the first non-finite
    loss or gradient, naming the first module whose output, or gradient, was not finite."""

    def __init__(self, net: nn.Module, dist: Distributed):
        self.dist = dist
        self.outputs: list[tuple[str, torch.Tensor]] = []  # (module, output not finite), as the forward ran
        self.grads: list[tuple[str, torch.Tensor]] = []  # (parameter, gradient not finite), as backward made them
        modules = dict(net.named_modules())
        for name, module in modules.items():
            module.register_forward_hook(functools.partial(self._output, _module_label(name, module)))
        for name, p in net.named_parameters():
            if p.requires_grad:
                owner = name.rpartition(".")[0]
                p.register_hook(functools.partial(self._grad, f"{_module_label(owner, modules[owner])}, parameter {name}"))

    def _output(self, label: str, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:  # evaluation's forwards are not a step's
            return
        values = [t for t in (output if isinstance(output, (tuple, list)) else [output])
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if values:
            self.outputs.append((label, torch.stack([_not_finite(t) for t in values]).any()))

    def _grad(self, label: str, grad: torch.Tensor) -> None:
        self.grads.append((label, _not_finite(grad)))

    def check(self, loss: torch.Tensor, step: int) -> None:
        """Raise AnomalyError, on every rank, when any rank's step `step` made a non-finite loss or gradient."""
        outputs, grads, dist = self.outputs, self.grads, self.dist
        self.outputs, self.grads = [], []
        flags = torch.stack([~torch.isfinite(loss), *(f for _, f in outputs), *(f for _, f in grads)]).tolist()
        found = _explain(step, flags[0], [label for (label, _), bad in zip(outputs, flags[1:]) if bad],
                         [label for (label, _), bad in zip(grads, flags[1 + len(outputs):]) if bad])
        if not dist.sum(torch.tensor(int(found is not None), device=loss.device)):
            return
        rank, why = next((r, why) for r, why in enumerate(dist.gather(found)) if why)  # the same line on every rank
        raise AnomalyError(f"train.detect_anomaly: {f'on rank {rank}: ' if dist.world > 1 else ''}{why}")


def _not_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether any value is NaN or infinite, as a device boolean. A float64 sum is non-finite exactly
    then (finite fp32 values cannot overflow it) and costs less than isfinite(t).all() (measured ~2x
    on a CPU), which makes a boolean copy of t first."""
    return ~torch.isfinite(t.sum(dtype=torch.float64))


def _module_label(name: str, module: nn.Module) -> str:
    kind = type(module).__name__
    return f"module {name} ({kind})" if name else f"the net's own forward ({kind})"


def _explain(step: int, loss_bad: bool, bad_outputs: list[str], bad_grads: list[str]) -> str | None:
    if loss_bad:
        where = f"first non-finite output in {bad_outputs[0]}" if bad_outputs else \
            "every module's output was finite, the loss is not (check the labels)"
        return f"non-finite loss at step {step}: {where}"
    if bad_grads:  # the first made, nearest the loss: where backward first went wrong
        return f"non-finite gradient at step {step}: first in {bad_grads[0]}"
    return None
