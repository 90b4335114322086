#!/usr/bin/env bash
# Session 5, the final code against change J (not committed, see README.md): CUDA tests, bench
# (coarse, fine) with the final code in _before (`git archive` of this commit's parent tree with the
# median-reporting scripts/bench.py) and J in the working tree, and scripts/host_window.py.
#   . .whl/gpu_env.sh .whl && docs/benchmarks/perf/session5/run_final.sh   (results tarred into $OUT)
set -u
R=/tmp/r6; mkdir -p $R
python3 scripts/make_tiny_sd.py /tmp/sd21z --full-size --zero-output > $R/make_sd.log 2>&1
python3 -m pytest -q -m gpu tests/test_normal_render.py tests/test_dmtet.py tests/test_sd.py tests/test_train_geometry.py tests/test_trainer_step.py > $R/gpu_tests.log 2>&1; tail -1 $R/gpu_tests.log
docs/benchmarks/perf/session4/run_bench.sh $R _before "coarse fine" "coarse fine"
python3 scripts/host_window.py --config configs/car_geometry.json --sd-model /tmp/sd21z --out $R/host_window.json coarse_iter=1000 2>&1 | tail -1
tar czf $OUT/perf.tgz -C /tmp r6
