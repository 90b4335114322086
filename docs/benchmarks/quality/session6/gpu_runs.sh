#!/usr/bin/env bash
# The full-scale runs planned in README.md: each job on all GPUs of the machine through torchrun
# (on an H200 x4 a job's emulate_gpus=8 is 2 micro-steps per rank), one job after another.
#   . .whl/gpu_env.sh .whl && bash docs/benchmarks/quality/session6/gpu_runs.sh JOB...
# Writes $OUT/eval_<job>.json and $OUT/<job>.stdout.end; prints a table last.
set -u
cd "$(dirname "$0")/../../../.."
[ -f /tmp/quality_refs/manifest.json ] || python3 scripts/make_reference_meshes.py /tmp/quality_refs > /dev/null
gpus=$(nvidia-smi -L | wc -l)
for job in "$@"; do
  LAUNCH="torchrun --standalone --nproc_per_node=$gpus" RUNS=/tmp/q6 \
    scripts/full_scale_quality.sh "$OUT" "$job" > "$OUT/$job.log" 2>&1 || echo "$job failed: $(tail -3 "$OUT/$job.log")"
  tail -c 2000 "/tmp/q6/$job.stdout" | tr '\r' '\n' | tail -5 > "$OUT/$job.stdout.end"
done
for f in "$OUT"/eval_*.json; do
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); e = d['eval']
print(d['job'], d['wall_s'], 's', 'chamfer %.3f%%' % (100 * e['chamfer']), 'iou %.3f' % e['iou'], 'psnr %.2f' % e['psnr'], e['image_kind'])" "$f"
done
