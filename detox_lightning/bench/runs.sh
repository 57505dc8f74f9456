#!/usr/bin/env bash
# The goal runs of the benchmark README, in sequence, on a quiet host (nothing else on the cores).
#
#   bash detox_lightning/bench/runs.sh [OUT_DIR]      # default OUT_DIR: bench_runs/
#
# Each run writes its whole output to OUT_DIR/<name>.txt and its JSON line to OUT_DIR/<name>.json;
# OUT_DIR/times.txt gets each run's wall time. Measured total on the 2-core AMD EPYC (AVX2 only): 34 min
# (build 0.7, defaults_small 12, int8_small 5, defaults_base 7.4, notebook_shape_base 4, threads 1 and 2
# 3.6, grpo pair ~3).
# Models are built first into MODELS (default /tmp/detox_bench_models) so that no timed run builds them.
# The base-shape runs time one iteration after the warm-up (--iters 1) to keep the whole within ~35 min.
set -euo pipefail

OUT=${1:-bench_runs}
MODELS=${MODELS:-/tmp/detox_bench_models}
SMALL=$MODELS/small
BASE=$MODELS/base
mkdir -p "$OUT"
: > "$OUT/times.txt"

run() {  # run NAME ARGS...: one benchmark invocation, its output and JSON line kept
    local name=$1
    shift
    local t0=$SECONDS
    echo "== $name: python -m detox_lightning.bench $*" | tee -a "$OUT/times.txt"
    python -m detox_lightning.bench "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"
    tail -n 1 "$OUT/$name.txt" > "$OUT/$name.json"
    echo "   $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"
}

# 0. build the random-weight models once (not timed: one short iteration each)
BUILD=(--iters 1 --new-tokens 1 --batch-size 4 --mini-batch-size 4 --skip-notebook --skip-floor --skip-memory --skip-eval --peak-size 256)
run build_small --model-dir "$SMALL" "${BUILD[@]}"
run build_base --shape base --model-dir "$BASE" "${BUILD[@]}"

# 1. defaults (fp32, exact, fast sampling), small shape: speedup >= 2.5x vs the notebook's loop, ratio to
#    floor <= 1.10, evaluation >= 3x, peak RSS <= 1.05x the floor's (rss_ratio_to_floor), the FLOP table
#    (every phase >= 50% of the matmul peak or the reason), generate's per-step overhead
run defaults_small --model-dir "$SMALL" --threads 2

# 2. opt-in int8 reward, small shape: >= 3.5x
run int8_small --model-dir "$SMALL" --threads 2 --reward-quantize int8 --skip-memory --skip-eval

# 3. defaults, base shape: >= 2.3x
run defaults_base --shape base --model-dir "$BASE" --threads 2 --iters 1 --skip-memory --skip-eval

# 4. the notebook's own shape: FLAN-T5-base, 250 new tokens (the mean of its 100-400 draw), this module only;
#    relate s/iter to the ~95 s an iteration the course logs on its 8-vCPU machine
run notebook_shape_base --shape base --model-dir "$BASE" --threads 2 --iters 1 --new-tokens 250 \
    --skip-notebook --skip-floor --skip-memory --skip-eval

# 5. thread scaling, small shape, this module only: 1 and 2 threads, the same flags
run threads1_small --model-dir "$SMALL" --threads 1 --skip-notebook --skip-floor --skip-memory --skip-eval
run threads2_small --model-dir "$SMALL" --threads 2 --skip-notebook --skip-floor --skip-memory --skip-eval

# 6. GRPO with beta 0 skips the reference pass: the same GRPO run with and without a KL coefficient
run grpo_beta0_small --model-dir "$SMALL" --threads 2 --estimator grpo --batch-size 8 --samples-per-prompt 2 \
    --init-kl-coef 0 --fixed-kl --skip-notebook --skip-floor --skip-memory --skip-eval
run grpo_beta_small --model-dir "$SMALL" --threads 2 --estimator grpo --batch-size 8 --samples-per-prompt 2 \
    --init-kl-coef 0.05 --fixed-kl --skip-notebook --skip-floor --skip-memory --skip-eval

# Not in that budget (each ~6-10 min here), worth a run when there is time:
#   python -m detox_lightning.bench --shape base --model-dir "$BASE" --threads 2 --new-tokens-range 100 400 \
#       --skip-notebook --skip-floor --skip-memory --skip-eval      # the notebook's per-prompt draw
#   python -m detox_lightning.bench --model-dir "$SMALL" --threads 2 --generation plain --skip-memory --skip-eval  # the opt-out
echo "done: $OUT" | tee -a "$OUT/times.txt"
