#!/usr/bin/env bash
# Every GPU measurement of the project in ONE call on a lent GPU machine (the workplace's device tool,
# whose 15 minutes a session include the machine's start-up: no time for a second call):
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz ../shared/baselines/seed_loop.py .data/
#     (.data/ is git-ignored; ../shared does not travel to the GPU machine)
#   optional peer: fetch github:KellerJordan/cifar10-airbench with the search tool's fetch, then
#     mkdir -p .peer && git -C /work/.mirror/KellerJordan+cifar10-airbench/repo show HEAD:legacy/airbench94.py > .peer/airbench94.py
#     (.peer/ is git-ignored: the peer is never committed)
#   device run, carry [".data", ".peer"], timeout_s 600: bash benchmarks/gpu_session.sh
# Steps, most important first; each runs under what is left of DEADLINE (seconds, default 540), and
# one that fails or runs out of time costs only itself. After each, benchmarks/RESULTS.md (with the
# sections appended so far) and the log are copied to $OUT, so a call cut short still brings them back.
#   check     tests/e2e/test_gpu.py (pytest): the checks that need a GPU, e.g. that a training step never
#             waits for the GPU (seconds; a failure is known before anything is timed)
#   fast      bench_fast.py: the fast recipe x5, framework overhead vs a bare loop, the peer if carried
#             (its 25 runs, or as many as it finishes in 150 s)
#   medium    bench_vs_seed.py: medium_gpu x3 against the seed loop (its recorded 20-epoch 838 s / 72.9%,
#             1 epoch of it timed here: the whole loop takes ~14 min)
#   ddp       bench_ddp.py: the DDP wrapper's cost at N = 1
#   blitz     bench_vs_seed.py: blitz_gpu x3 against the seed loop's recorded 2 epochs (87 s, 23.5%)
#   autotune  bench_fast.py x3 with model.compile_mode=max-autotune (CUDA graphs + autotuned kernels,
#             as the compiled peer does), toward the 1.5 s goal
# It installs the project beside the machine's own torch (no wandb/submitit needed there).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}
OUT=${OUT:-/tmp/out}
SEED_LOOP=${SEED_LOOP:-.data/seed_loop.py}
DEADLINE=${DEADLINE:-540}
STEPS=${*:-check fast medium ddp blitz autotune}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CIFAR_DIST_CACHE=/tmp/cifar-dist-cache
LOG="$OUT/log.txt"
failed=()

step() {  # step NAME COMMAND...: run under the time left, log it, bring the results back whatever happens
  local name=$1 left=$((DEADLINE - SECONDS - 15))
  shift
  if ((left < 30)); then
    echo "== $name: skipped, ${left} s left of ${DEADLINE} s" | tee -a "$LOG"
    failed+=("$name(no time)")
    return
  fi
  echo "== $name: $* (up to ${left} s)" | tee -a "$LOG"
  timeout --kill-after=5 "$left" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $SECONDS s in all" | tee -a "$LOG"
  ((rc == 0)) || failed+=("$name(exit $rc)")
  cp "${CIFAR_DIST_RESULTS:-benchmarks/RESULTS.md}" "$OUT/RESULTS.md"
}

step install python3 -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
step data python3 -m cifar_dist.cli data prepare data.source=imagefolder "data.path=$DATA"
peer=()
[ -f .peer/airbench94.py ] && peer=(--peer .peer/airbench94.py --peer-timeout 150)
for s in $STEPS; do
  case $s in
    check) step check python3 -m pytest -q -p no:cacheprovider tests/e2e/test_gpu.py ;;
    fast) step fast python3 benchmarks/bench_fast.py --data "$DATA" --repeats 5 "${peer[@]}" ;;
    medium) step medium python3 benchmarks/bench_vs_seed.py --data "$DATA" --runs medium:medium_gpu --repeats 3 \
              --seed-loop "$SEED_LOOP" --recorded medium=838:0.729 --seed-epochs medium=1 ;;
    ddp) step ddp python3 benchmarks/bench_ddp.py --repeats 3 ;;
    blitz) step blitz python3 benchmarks/bench_vs_seed.py --data "$DATA" --runs blitz:blitz_gpu --repeats 3 \
             --seed-loop "$SEED_LOOP" --recorded blitz=87:0.235 ;;
    autotune) step autotune python3 benchmarks/bench_fast.py --data "$DATA" --repeats 3 --extra model.compile_mode=max-autotune ;;
    *) echo "unknown step $s (check, fast, medium, ddp, blitz, autotune)"; exit 2 ;;
  esac
done
echo "done in $SECONDS s; failed or skipped: ${failed[*]:-none}" | tee -a "$LOG"
((${#failed[@]} == 0))
