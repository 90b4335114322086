#!/usr/bin/env bash
# Session-4 GPU measurements: CUDA tests of the changed paths, then bench.py before (the session-3
# code, unpacked into BEFORE_DIR with `git archive`) and after (this tree) in one process each.
#   . .whl/gpu_env.sh .whl && docs/benchmarks/perf/session4/run_bench.sh OUT_DIR BEFORE_DIR "coarse fine" "coarse"
# args: output folder, the old tree, stages to bench with this tree (profiled), stages with the old one.
set -u
out=$1; before=$2; after_stages=${3:-"coarse fine appearance"}; before_stages=${4:-""}
mkdir -p "$out"
cfg_for() { [ "$1" = appearance ] && echo configs/car_appearance_strategy0.json || echo configs/car_geometry.json; }
[ -f /tmp/sd21z/model_index.json ] || python3 scripts/make_tiny_sd.py /tmp/sd21z --full-size --zero-output > "$out/make_sd.log" 2>&1
if [ -n "${RUN_TESTS:-}" ]; then
  python3 -m pytest -q -m gpu tests/test_dmtet.py tests/test_train_appearance.py tests/test_trainer_step.py \
    tests/test_sd.py tests/test_normal_render.py tests/test_raster.py > "$out/gpu_tests.log" 2>&1
  tail -3 "$out/gpu_tests.log"
fi
for stage in $before_stages; do
  (cd "$before" && timeout 300 python3 scripts/bench.py --config "$(cfg_for $stage)" --stage "$stage" \
     --sd-model /tmp/sd21z --out "$out/before_$stage.json") > "$out/before_$stage.log" 2>&1
  tail -1 "$out/before_$stage.log"
done
for stage in $after_stages; do
  timeout 400 python3 scripts/bench.py --config "$(cfg_for $stage)" --stage "$stage" --sd-model /tmp/sd21z \
    --out "$out/bench_$stage.json" --profile "/tmp/prof_$stage" > "$out/bench_$stage.log" 2>&1
  tail -1 "$out/bench_$stage.log"
  cp "/tmp/prof_$stage/ops_by_self_device_time_total.txt" "$out/ops_device_$stage.txt" 2>/dev/null
  cp "/tmp/prof_$stage/ops_by_self_cpu_time_total.txt" "$out/ops_cpu_$stage.txt" 2>/dev/null
done
