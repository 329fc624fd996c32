#!/usr/bin/env bash
# The engine benchmark on one accelerator, in about 9 minutes (an H100's estimate; never run yet).
#
# Run from the repository root (a copy of it is enough: no install, no Ray, no network):
#     bash rollout/bench/accelerator.sh
# On this workplace's device machine: run(command="bash rollout/bench/accelerator.sh", timeout_s=600).
#
# Three parts, each `python3 -m rollout.bench engine` (rollout/bench/engine.py) in bfloat16 with
# JAX on the GPU and transformers on the same GPU, under its own `timeout`, so a slow part
# leaves the others' results:
#   qwen3-0.6b   batches 1 16 64 256
#   qwen3-8b     batches 1 16 64                 (its checkpoint, 16 GB, is written once, to $WORK)
#   qwen3-8b-256 batch 256, only if the budget has time left for it (reuses that checkpoint)
# Each writes $OUT/<part>.json (rows, host and device figures, roofline) and $OUT/<part>.log
# (the table as printed, and progress lines: checkpoint, loading, each batch's first call,
# which compiles, and its figures). $OUT/env.txt: the GPU and the package versions.
# If the first part fails (not by its timeout), the others are skipped: they would fail alike.
#
# Settings (environment): OUT (default ./accelerator-out), WORK (checkpoints; /tmp/rollout-accelerator),
# BUDGET_S (seconds for all parts; 540), PLATFORM (gpu), DTYPE (bfloat16), SMALL / LARGE (the two
# shapes), SMALL_BATCHES, LARGE_BATCHES, EXTRA_BATCHES (the third part's; empty: skipped),
# NEW_TOKENS (64), PROMPT_LEN (32), REPEATS (2). E.g. a check on a CPU in a minute:
#     PLATFORM=cpu DTYPE=bfloat16 SMALL=tiny LARGE=tiny SMALL_BATCHES=2 LARGE_BATCHES=2 EXTRA_BATCHES=4 \
#         NEW_TOKENS=4 PROMPT_LEN=8 REPEATS=1 bash rollout/bench/accelerator.sh

set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 1  # the repository root: rollout/ is imported from here

OUT=${OUT:-$PWD/accelerator-out}
WORK=${WORK:-/tmp/rollout-accelerator}
BUDGET_S=${BUDGET_S:-540}
PLATFORM=${PLATFORM:-gpu}
DTYPE=${DTYPE:-bfloat16}
SMALL=${SMALL:-qwen3-0.6b}
LARGE=${LARGE:-qwen3-8b}
SMALL_BATCHES=${SMALL_BATCHES:-1 16 64 256}
LARGE_BATCHES=${LARGE_BATCHES:-1 16 64}
EXTRA_BATCHES=${EXTRA_BATCHES-256}
NEW_TOKENS=${NEW_TOKENS:-64}
PROMPT_LEN=${PROMPT_LEN:-32}
REPEATS=${REPEATS:-2}

mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1

log() { echo "[accelerator.sh +$((SECONDS))s] $*"; }
left() { echo $((BUDGET_S - SECONDS)); }

# part NAME TIMEOUT_S SHAPE BATCHES...: one benchmark run; its exit status (124: timed out)
part() {
    local name=$1 limit=$2 shape=$3
    shift 3
    log "$name: start, timeout ${limit}s: --shape $shape --batches $*"
    timeout -k 15 "$limit" python3 -m rollout.bench engine --platform "$PLATFORM" --dtype "$DTYPE" \
        --shape "$shape" --batches "$@" --new-tokens "$NEW_TOKENS" --prompt-len "$PROMPT_LEN" \
        --repeats "$REPEATS" --workdir "$WORK" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        log "$name: TIMED OUT after ${limit}s (rc $rc); what it printed is in $OUT/$name.log"
    else
        log "$name: done, rc $rc"
    fi
    return "$rc"
}

log "start: budget ${BUDGET_S}s, platform $PLATFORM, $DTYPE, results in $OUT"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    python3 - <<'EOF'
import importlib.metadata as m, platform
names = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "torch", "transformers", "safetensors", "numpy")
print("python", platform.python_version())
for name in names:
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        pass
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

part small "$(( $(left) < 210 ? $(left) : 210 ))" "$SMALL" $SMALL_BATCHES
rc=$?
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ]; then
    log "the first part failed (rc $rc): the others are skipped; see $OUT/small.log"
    exit "$rc"
fi
if [ "$(left)" -gt 60 ]; then
    part large "$(left)" "$LARGE" $LARGE_BATCHES
else
    log "large: skipped, $(left)s of the budget left"
fi
if [ -n "$EXTRA_BATCHES" ] && [ "$(left)" -gt 150 ]; then
    part large-extra "$(( $(left) - 5 ))" "$LARGE" $EXTRA_BATCHES
else
    log "large-extra: skipped (${EXTRA_BATCHES:-no batches}; $(left)s of the budget left, it needs 150)"
fi
log "end: results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
