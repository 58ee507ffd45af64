"""What `cifar-dist train` imports: the optional and heavy packages only when a run needs them, so
that start-up stays close to `import torch` (benchmarks/bench_startup.py measures it)."""

from __future__ import annotations

import re

from tests.helpers import PY, TINY, run

# Never imported by the train command's modules themselves: each is imported where it is used (the
# trackers when chosen, the plots when drawn, accelerate when the process group is built, dynamo
# and inductor only to compile), so a module-level import of any of them is a regression.
NOT_AT_IMPORT = ["matplotlib", "wandb", "tensorboard", "torch.utils.tensorboard", "accelerate", "torch._dynamo",
                 "torch._inductor", "torch.distributed.tensor", "optuna", "submitit", "cifar_dist.sweep"]
# Never imported by a whole debug run with tracking.backend=none: the trackers are not chosen; the
# run's plots are drawn on a bare matplotlib Figure (plots.figure), without pyplot; the optimiser
# steps without torch.optim's dynamo wrappers (recipe.SGD); one process skips accelerate's prepare
# and with it torch.distributed.tensor; deterministic mode leaves inductor's flag alone.
NOT_IN_RUN = ["wandb", "tensorboard", "torch.utils.tensorboard", "matplotlib.pyplot", "optuna", "submitit",
              "torch._dynamo", "torch._inductor", "torch.distributed.tensor"]


def imported(stderr: str) -> set[str]:
    """The modules `python -X importtime` reported importing."""
    return {m[1] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", stderr, re.M)}


def among(modules: set[str], packages: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def test_the_train_command_modules_import_no_optional_or_heavy_package(env):
    proc = run([PY, "-X", "importtime", "-c", "import cifar_dist.cli; from cifar_dist import smoke, train"], env)
    modules = imported(proc.stderr)
    assert {"torch", "cifar_dist.train", "cifar_dist.plots", "cifar_dist.trackers"} <= modules
    assert among(modules, NOT_AT_IMPORT) == []


def test_a_debug_run_imports_no_tracker_and_no_pyplot(env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run([PY, "-X", "importtime", "-m", "cifar_dist.cli", "train", "--config", "debug", *TINY,
                "train.epochs=1", f"run.dir={run_dir}"], env)
    modules = imported(proc.stderr)
    assert (run_dir / "summary.json").is_file() and (run_dir / "loss.png").is_file()
    assert {"torch", "accelerate", "matplotlib.figure"} <= modules  # the group was built, the plots drawn
    assert among(modules, NOT_IN_RUN) == []
