"""Resuming a run: from the newest valid checkpoint in its own run dir, or (`--resume-from`) from
another run's checkpoint as a new run; what the resume hands the loop besides the training state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifar_dist import checkpoint, schema
from cifar_dist.config import Config
from cifar_dist.distributed import Distributed
from cifar_dist.result_keys import config_hash, diff_result_keys
from cifar_dist.rundir import RunDir, RunDirError
from cifar_dist.state import TrainState


@dataclass
class Resumed:
    """What a resume hands the loop besides the training state: this rank's losses and gradient norms
    since the last record (tensors: no sync per step), and the checkpoint of another run this run
    started from (`--resume-from`), for summary.json."""

    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    started_from: dict[str, Any] | None = None


def resume(run: RunDir, cfg: Config, dist: Distributed, state: TrainState, resume_from: Path | None = None) -> Resumed:
    """Continue from the newest valid checkpoint in the run dir; without one, from `resume_from` (a
    checkpoint of another run, `--resume-from`), as a new run; else start afresh."""
    found = checkpoint.load_latest(run.path, warn=lambda m: dist.print(f"warning: {m}"))
    # Every rank must pick the same checkpoint; rank 0's choice wins.
    chosen = dist.broadcast(str(found[0].path) if found else None)
    elsewhere = chosen is None and resume_from is not None
    if elsewhere:
        chosen = str(resume_from)
    elif chosen is None:
        return Resumed()
    elif resume_from is not None:
        dist.print(f"note: {run.path} holds checkpoints of its own; it resumes from those, not from --resume-from")
    saved = found[1] if found and str(found[0].path) == chosen else checkpoint.load_state(Path(chosen) / checkpoint.STATE)
    if saved.get("config_hash") != config_hash(cfg) and not cfg.checkpoint.allow_config_change:
        then = Config()
        schema.update(then, saved["config"])  # as saved, not validated again: its data may have moved
        changed = "; ".join(diff_result_keys(then, cfg)) or "an older version's keys"
        raise RunDirError(f"checkpoint {chosen} was written by a different config ({changed}); "
                          "use checkpoint.allow_config_change=true")
    try:
        state.load_state_dict(saved)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # another net's weights (allow_config_change)
        why = " ".join(str(e).split())[:200]
        raise RunDirError(f"checkpoint {chosen} does not fit this config's model or optimiser ({why})") from None
    resumed = Resumed(started_from=saved.get("started_from"))
    if saved["world_size"] == dist.world:
        mine = saved["ranks"][dist.rank]
        checkpoint.set_rng_state(mine["rng"])
        resumed.losses = [torch.tensor(v, device=dist.device) for v in mine["pending"]]
        resumed.grad_norms = [torch.tensor(v, device=dist.device) for v in mine.get("pending_grad_norms", [])]
    else:  # the data order does not depend on the world size; per-rank RNG streams and losses do
        dist.print(f"note: resuming {saved['world_size']} ranks' checkpoint on {dist.world}; dropout RNG streams restart")
    pos = state.position
    if elsewhere:  # a new run: its own records start empty
        pos.records = 0
        marker = json.loads((Path(chosen) / checkpoint.MARKER).read_text())
        resumed.started_from = {"checkpoint": chosen, "run_id": saved.get("run_id"), "step": pos.step,
                                "sha256": marker["sha256"]}
        dist.print(f"started from {chosen} of run {saved.get('run_id')} (step {pos.step}, epoch {pos.epoch}, "
                   f"{pos.offset} steps into it): its whole training state, in this new run")
    else:
        dist.print(f"resumed from {chosen} (step {pos.step}, epoch {pos.epoch}, {pos.offset} steps into it)")
    if (before := saved["config"]["train"]["epochs"]) != cfg.train.epochs:
        lr_then = saved["scheduler"]["_last_lr"][0]
        lr_now = cfg.train.lr * state.scheduler.lr_lambdas[0](pos.step)
        dist.print(f"note: train.epochs {before} -> {cfg.train.epochs}: the LR schedule is stretched to the new length, "
                   f"so the LR at step {pos.step} goes from {lr_then:.4g} to {lr_now:.4g} and decays from there")
    return resumed
