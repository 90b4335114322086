#!/usr/bin/env bash
# Session 5, change I (normal image ops as one autograd function) and the SDS noise term made with
# the draw: CUDA tests, bench and scripts/host_window.py before (_before = the tree with G and H)
# and after, then three target-mesh quality runs side by side on the GPU.
#   . .whl/gpu_env.sh .whl && docs/benchmarks/perf/session5/run_i.sh   (results tarred into $OUT)
set -u
R=/tmp/r2; mkdir -p $R
python3 scripts/make_tiny_sd.py /tmp/sd21z --full-size --zero-output > $R/make_sd.log 2>&1
python3 -m pytest -q -m gpu tests/test_normal_render.py tests/test_sd.py tests/test_dmtet.py > $R/gpu_tests.log 2>&1; tail -1 $R/gpu_tests.log
docs/benchmarks/perf/session4/run_bench.sh $R _before "coarse" "coarse"
python3 scripts/host_window.py --config configs/car_geometry.json --sd-model /tmp/sd21z --out $R/host_window.json coarse_iter=1000 2>&1 | tail -1
(cd _before && python3 scripts/host_window.py --config configs/car_geometry.json --sd-model /tmp/sd21z --out $R/host_window_before.json coarse_iter=1000 2>&1 | tail -1) || true
tar czf $OUT/perf.tgz -C /tmp r2
python3 scripts/make_reference_meshes.py /tmp/quality_refs > /dev/null
# Quality: three target-mesh runs side by side on the one GPU (timings not comparable, metrics are)
for job in grid128_cup grid128_thin_parts grid128_mug; do
  (RUNS=/tmp/q_$job scripts/full_scale_quality.sh $R/q $job > $R/quality_$job.log 2>&1; tail -3 /tmp/q_$job/$job.stdout >> $R/quality_$job.log) &
done
wait
tail -2 $R/quality_*.log
tar czf $OUT/quality.tgz -C /tmp r2/q $(cd /tmp && ls r2/quality_*.log)
for f in $R/q/eval_*.json; do python3 -c "import json,sys;d=json.load(open('$f'));e=d['eval'];print(d['job'],d['wall_s'],round(e['chamfer']*100,3),round(e['iou'],3),e.get('psnr'))"; done
