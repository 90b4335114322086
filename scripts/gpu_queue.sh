#!/usr/bin/env bash
# A queue of GPU work that outlives the device tool's 10-minute calls: start it in one call, then
# collect its results in the next ones (the machine stays warm between back-to-back calls).
#
#   . .whl/gpu_env.sh .whl && bash scripts/gpu_queue.sh start QUEUE_FILE [WAIT_S]   # first call
#   . .whl/gpu_env.sh .whl && bash scripts/gpu_queue.sh collect [WAIT_S]            # later calls
#
# `start` copies this tree to /tmp/gq/repo and runs the queue there in its own process session;
# both modes then wait up to WAIT_S seconds (default 570) and pack what is done into
# $OUT/results.tgz (logs, eval_<tag>.json, log.jsonl.gz, the running jobs' last output) and $OUT/meshes.tgz
# (each finished geometry job's mesh as binary PLY), printing a table last.
# QUEUE_FILE lines, run in order ('#' starts a comment):
#   quality TAG JOB [key=value ...]   scripts/full_scale_quality.sh JOB on all GPUs (torchrun), the
#                                     key=value overrides added (EXTRA); results named TAG
#   shell TAG COMMAND...              any command, run from the tree's root, alone (after every
#                                     quality job before it has ended); output in TAG.log
# QUEUE_SLOTS=N (environment of `start`, default 1): up to N quality jobs at once. Target-mesh jobs
# launch small kernels, so several can share one GPU (3-6 on an H200 ran ~22 grid-128 iterations/s
# in total, docs/benchmarks/quality/session9); timings taken by `shell` lines still run alone.
set -u
q=/tmp/gq
mode=$1
last_lines() { tail -c 3000 "$@" 2>/dev/null | tr '\r' '\n' | tail -8; }   # a run's progress-bar output, readable
if [ "$mode" = start ]; then
  queue=$(realpath "$2"); wait_s=${3:-570}
  rm -rf $q; mkdir -p $q/out $q/meshes
  cp -r "$(cd "$(dirname "$0")/.." && pwd)" $q/repo
  cp "$queue" $q/queue.txt
  setsid nohup bash $q/repo/scripts/gpu_queue.sh run > $q/queue.log 2>&1 < /dev/null &
elif [ "$mode" = run ]; then
  cd $q/repo; o=$q/out
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$gpus" -gt 0 ] || gpus=1   # CPU: one process (a dry run)
  slots=${QUEUE_SLOTS:-1}
  set -f                                  # overrides such as elevation_range=[-10,80] are not globs
  # Written once here: jobs running at once would otherwise each start writing the same folder.
  python3 scripts/make_reference_meshes.py /tmp/quality_refs > /dev/null
  quality() {   # TAG JOB [key=value ...]
    local tag=$1 job=$2; shift 2
    if ! LAUNCH="torchrun --standalone --nproc_per_node=$gpus" RUNS=$q/runs/$tag EXTRA="$*" \
        scripts/full_scale_quality.sh $q/evals/$tag "$job" > $o/$tag.log 2>&1; then
      echo "$tag failed" >> $o/failed.txt
      # torchrun's summary hides the cause: keep the run's own error lines (its last lines are the summary)
      grep -a -E -B3 -A15 -m4 'Traceback|Error|error:' $q/runs/$tag/$job.stdout > $o/$tag.error 2>/dev/null
    fi
    cp $q/evals/$tag/eval_$job.json $o/eval_$tag.json 2>/dev/null
    gzip -c $q/runs/$tag/$job/log.jsonl > $o/$tag.log.jsonl.gz 2>/dev/null   # per-iteration record, failed runs too
    last_lines $q/runs/$tag/$job.stdout > $o/$tag.stdout.end
    head -c 3000 $q/runs/$tag/$job.stdout 2>/dev/null | tr '\r' '\n' | head -4 > $o/$tag.stdout.start   # pretraining
    local mesh=$q/runs/$tag/$job/dmtet_mesh/mesh.obj
    [ -f "$mesh" ] && python3 -c "import sys, trimesh; trimesh.load(sys.argv[1], force='mesh', process=False).export(sys.argv[2])" \
      "$mesh" $q/meshes/$tag.ply
    echo "$tag" >> $q/done.txt
  }
  # The loop runs in this shell (not a pipeline's subshell), so the final wait sees its jobs.
  while read -r kind tag rest; do
    if [ "$kind" = shell ]; then
      wait                                    # a shell line runs alone: its timings must not share the GPU
      echo "$tag" >> $q/started.txt
      bash -c "$rest" > $o/$tag.log 2>&1 < /dev/null; echo "rc $?" >> $o/$tag.log
      echo "$tag" >> $q/done.txt
    else
      while [ "$(jobs -rp | wc -l)" -ge "$slots" ]; do wait -n; done
      echo "$tag" >> $q/started.txt
      quality "$tag" $rest < /dev/null &   # not the queue's lines on its stdin
    fi
  done < <(grep -v '^\s*#' $q/queue.txt | grep -v '^\s*$')
  wait
  echo ALL_DONE >> $q/done.txt
  exit 0
else
  wait_s=${2:-570}
fi
# start and collect: wait, then pack what is done
[ -d $q ] || { echo "no queue on this machine (a fresh machine): run start again"; exit 1; }
end=$((SECONDS + wait_s))
while [ $SECONDS -lt $end ] && ! grep -q ALL_DONE $q/done.txt 2>/dev/null; do sleep 5; done
for running in $(grep -vxF -f <(cat $q/done.txt 2>/dev/null) $q/started.txt 2>/dev/null); do   # jobs still running
  last_lines $q/runs/$running/*.stdout > $q/out/$running.running.end
done
tar -czf "$OUT/results.tgz" -C $q out queue.log queue.txt
tar -czf "$OUT/meshes.tgz" -C $q meshes
echo "done: $(tr '\n' ' ' 2>/dev/null < $q/done.txt)"
for f in $q/out/eval_*.json; do
  [ -f "$f" ] && python3 -c "import json, sys; d = json.load(open(sys.argv[1])); e = d['eval']
print(sys.argv[1].split('/')[-1], d['wall_s'], 's', 'chamfer %.3f%%' % (100 * e['chamfer']), 'iou %.3f' % e['iou'], 'psnr %.2f' % e['psnr'], e['image_kind'])" "$f"
done
cat $q/out/failed.txt 2>/dev/null
head -c 1500 $q/out/*.error 2>/dev/null
exit 0
