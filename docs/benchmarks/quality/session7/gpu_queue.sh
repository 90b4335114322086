#!/usr/bin/env bash
# Session 7's GPU work as one queue that outlives a 10-minute call (H200 x8):
#   . .whl/gpu_env.sh .whl && bash docs/benchmarks/quality/session7/gpu_queue.sh start 570
#   . .whl/gpu_env.sh .whl && bash docs/benchmarks/quality/session7/gpu_queue.sh collect 570   # later calls
# `start` copies the tree to /tmp/q7/repo and runs the queue there in its own process session
# (it keeps running between calls); `start` and `collect` then wait up to N seconds and pack
# everything finished so far into $OUT/results.tgz, printing a table last.
# Queue: the hash-grid kernel check on this tree and on _before/ (the tree before the _corner
# change), the GPU tests, then the quality jobs of README.md, each on all GPUs through torchrun.
set -u
q=/tmp/q7
mode=$1; wait_s=${2:-570}
if [ "$mode" = start ]; then
  rm -rf $q; mkdir -p $q/out
  cp -r "$(cd "$(dirname "$0")/../../../.." && pwd)" $q/repo
  setsid nohup bash $q/repo/docs/benchmarks/quality/session7/gpu_queue.sh run > $q/queue.log 2>&1 < /dev/null &
elif [ "$mode" = run ]; then
  cd $q/repo; o=$q/out
  gpus=$(nvidia-smi -L | wc -l)
  python3 scripts/make_reference_meshes.py /tmp/quality_refs > /dev/null
  for tree in . _before; do   # the same GPU, one after the other
    (cd $tree && python3 scripts/gpu_check_hashgrid.py --out $o/hashgrid_$([ $tree = . ] && echo after || echo before).json) \
      > $o/hashgrid_$([ $tree = . ] && echo after || echo before).log 2>&1
  done
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -m gpu tests > $o/gpu_tests.log 2>&1
  echo "gpu tests rc $?" >> $o/gpu_tests.log
  while read -r job seed; do   # the queue, in priority order
    tag=$job${seed:+_seed$seed}
    LAUNCH="torchrun --standalone --nproc_per_node=$gpus" RUNS=$q/runs EXTRA="${seed:+seed=$seed}" \
      scripts/full_scale_quality.sh $q/evals/$tag "$job" > $o/$tag.log 2>&1 || echo "$tag failed" >> $o/failed.txt
    cp $q/evals/$tag/eval_$job.json $o/eval_$tag.json 2>/dev/null
    tail -c 3000 $q/runs/$job.stdout | tr '\r' '\n' | tail -8 > $o/$tag.stdout.end
    echo "$tag" >> $q/done.txt
  done <<'JOBS'
appearance_s1_e8
grid128_thin_parts_e8
grid128_bowl
grid128_cup_e8
custom_cup
grid256_thin_parts
grid128_thin_parts_e8 7
grid256_bowl
grid256_cup
grid128_mug
JOBS
  echo ALL_DONE >> $q/done.txt
  exit 0
fi
# start and collect: wait, then pack what is finished
[ -d $q ] || { echo "no queue on this machine (a fresh machine): run start again"; exit 1; }
end=$((SECONDS + wait_s))
while [ $SECONDS -lt $end ] && ! grep -q ALL_DONE $q/done.txt 2>/dev/null; do sleep 5; done
tar -czf "$OUT/results.tgz" -C $q out queue.log
echo "done: $(tr '\n' ' ' < $q/done.txt 2>/dev/null)"
tail -3 $q/out/gpu_tests.log 2>/dev/null
for f in $q/out/hashgrid_*.json; do [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], d['parity'], {k: round(v, 3) for k, v in d['bench'].items() if k.endswith('_ms')})" "$f"; done
for f in $q/out/eval_*.json; do
  [ -f "$f" ] && python3 -c "import json, sys; d = json.load(open(sys.argv[1])); e = d['eval']
print(sys.argv[1].split('/')[-1], d['wall_s'], 's', 'chamfer %.3f%%' % (100 * e['chamfer']), 'iou %.3f' % e['iou'], 'psnr %.2f' % e['psnr'], e['image_kind'])" "$f"
done
cat $q/out/failed.txt 2>/dev/null
