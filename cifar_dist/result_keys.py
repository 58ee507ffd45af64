"""Which config keys decide what a run computes (`result_keys`), their hash (`config_hash`: a
resume across a change to them is refused; a sweep's status tells a run dir of another config),
and what changed between two configs (`diff_result_keys`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cifar_dist.config import Config
from cifar_dist.schema import flatten

# Keys whose value changes what a run computes; resuming across a change to one of them is refused.
RESULT_KEYS = ("seed", "model.name", "model.dropout", "data", "train", "eval.ema")
# ... except these, which may change on resume: more epochs, different logging or device, the
# NaN watch (it only reads values: a run can resume with it on to find where a NaN comes from), and
# init_from's sha256, which a run fills in (run_opening.py refuses a file that changed under a run).
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.device", "data.cache_dir", "data.download",
                     "train.detect_anomaly", "train.init_sha256")


# Result keys hashed only when they differ from their default: a run whose saved config lacks
# one of them (it came later) keeps its hash and resumes.
HASHED_WHEN_SET = ("train.optimizer", "train.betas", "train.eps", "train.decay_norms_and_biases", "train.accumulate",
                   "train.clip_grad_norm", "train.ema.decay", "train.ema.start_step", "train.early_stop.metric",
                   "train.early_stop.patience", "train.early_stop.min_delta", "train.init_from", "eval.ema",
                   "model.dropout")


def result_keys(cfg: Config) -> dict[str, Any]:
    """The flat `key -> value` map that decides the result of a run."""
    flat, defaults = flatten(cfg.to_dict()), flatten(Config().to_dict())
    keep = {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in RESULT_KEYS)
            and k not in RESUMABLE_CHANGES and not (k in HASHED_WHEN_SET and v == defaults[k])}
    if cfg.train.early_stop.metric:  # which evaluations the stop rule sees decides where the run ends
        keep["eval.every"] = cfg.eval.every
    return keep


def config_hash(cfg: Config) -> str:
    blob = json.dumps(result_keys(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_result_keys(old: Config, new: Config) -> list[str]:
    a, b = result_keys(old), result_keys(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
