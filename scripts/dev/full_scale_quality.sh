#!/usr/bin/env bash
# Full-scale target-mesh quality runs on one GPU: the shipped configs unchanged except for
# the guidance, each followed by scripts/evaluate.py against its reference.
#
#   scripts/dev/full_scale_quality.sh OUT_DIR JOB...
#
# JOBs: appearance_s0 | appearance_s1 | appearance_s2   (car strategy 0 / car strategy 1 /
#         pineapple strategy 2 appearance configs; target = the textured egg, base_mesh = its shape)
#       grid<N>_<ref>                                   (car_geometry at dmtet_grid=N, e.g. grid128_mug,
#                                                        grid256_torus; <ref> in mug, cup, bowl, thin_parts, torus)
#       pgrid<N>_<ref>                                  (the same with the single-GPU pineapple geometry schedule:
#                                                        batch 6, its own ellipsoid init)
#       custom_<ref> | custom<N>_<ref>                  (user_mesh_geometry: custom_mesh init from a
#                                                        coarse <ref>, target = the full-resolution one;
#                                                        with N: at dmtet_grid=N)
#       <job>_e<K>                                      (the job with emulate_gpus=K: the camera coverage
#                                                        per step of K GPUs; the car configs are the
#                                                        published 8-GPU ones, so e.g. grid128_cup_e8)
#       <job>@<SEED>                                    (the job with seed=SEED, e.g. grid256_bowl_e8@7)
# Every JOB is checked before any runs. Writes OUT_DIR/eval_<job>.json (evaluate.py output plus the
# run's wall time and log summary). Environment: REFS (reference folder), RUNS (run folders), EXTRA
# (more key=value overrides for every job), LAUNCH (the command that starts train.py; default
# python3, e.g. LAUNCH="torchrun --nproc_per_node=4"), EVAL_ARGS (more evaluate.py options, e.g.
# "--views 16"; the last --images wins), PARALLEL (jobs at once on the GPU, default 1;
# the target-mesh runs leave most of an H100 idle, so 4-8 share one well, though their wall times
# are then not timings of one run).
set -euo pipefail
out=$(realpath -m "$1"); shift
here=$(cd "$(dirname "$0")/../.." && pwd)
cd "$here"
refs=${REFS:-/tmp/quality_refs}
tex=$refs/textured/textured.obj

# job_args JOB: sets args (train.py arguments), ref (the reference mesh), images; 1 if unknown
job_args() {
  local base=$1 extra=() name n config
  if [[ $base =~ ^(.+)@([0-9]+)$ ]]; then base=${BASH_REMATCH[1]}; extra+=(seed=${BASH_REMATCH[2]}); fi
  if [[ $base =~ ^(.+)_e([0-9]+)$ ]]; then base=${BASH_REMATCH[1]}; extra+=(emulate_gpus=${BASH_REMATCH[2]}); fi
  case $base in
    appearance_s0) args=(--config configs/car_appearance_strategy0.json target_mesh=$tex base_mesh=$tex); ref=$tex; images=albedo ;;
    appearance_s1) args=(--config configs/car_appearance_strategy1.json target_mesh=$tex base_mesh=$tex); ref=$tex; images=albedo ;;
    appearance_s2) args=(--config configs/pineapple_appearance_strategy2_single_gpu.json target_mesh=$tex base_mesh=$tex); ref=$tex; images=albedo ;;
    grid[0-9]*_* | pgrid[0-9]*_*) name=${base#*_}; n=${base%%_*}; n=${n#*grid}
      config=configs/car_geometry.json; [[ $base == p* ]] && config=configs/pineapple_geometry_single_gpu.json
      args=(--config $config dmtet_grid=$n target_mesh=$refs/$name.obj); ref=$refs/$name.obj; images=normal ;;
    custom_* | custom[0-9]*_*) name=${base#*_}; n=${base%%_*}; n=${n#custom}
      args=(--config configs/user_mesh_geometry.json base_mesh=$refs/coarse/$name.obj target_mesh=$refs/$name.obj)
      [ -n "$n" ] && args+=(dmtet_grid=$n)
      ref=$refs/$name.obj; images=normal ;;
    *) return 1 ;;
  esac
  case $ref in */textured/textured.obj | */bowl.obj | */cup.obj | */mug.obj | */thin_parts.obj | */torus.obj) ;; *) return 1 ;; esac
  args+=("${extra[@]}")
}

for job in "$@"; do
  job_args "$job" || { echo "unknown job $job (see the list at the top of $0)" >&2; exit 2; }
done
mkdir -p "$out"
[ -f "$refs/manifest.json" ] || python3 scripts/make_reference_meshes.py "$refs" >/dev/null
[ -f "$refs/coarse/bowl.obj" ] || python3 scripts/make_reference_meshes.py "$refs/coarse" --resolution 24 >/dev/null

run_job() {
  local job=$1 run start wall
  job_args "$job"
  run=${RUNS:-/tmp/quality_runs}/$job
  rm -rf "$run"; mkdir -p "$(dirname "$run")"
  local common=(guidance=target_mesh video_frames=0 validate=false ${EXTRA:-})
  start=$SECONDS
  ${LAUNCH:-python3} train.py "${args[@]}" "${common[@]}" out_dir="$run" > "$run.stdout" 2>&1 ||
    { echo "$job failed; the end of $run.stdout:" >&2; tail -5 "$run.stdout" >&2; return 1; }
  wall=$((SECONDS - start))
  python3 scripts/evaluate.py "$run/dmtet_mesh/mesh.obj" "$ref" --images "$images" ${EVAL_ARGS:-} --out "$run.eval.json" > /dev/null
  python3 - "$run" "$run.eval.json" "$out/eval_$job.json" "$wall" "$job" "${LAUNCH:-python3} train.py ${args[*]} ${common[*]}" <<'EOF'
import json, statistics, sys
run, ev, dst, wall, job, cmd = sys.argv[1:]
log = [json.loads(line) for line in open(f"{run}/log.jsonl")]
stages = {}
for r in log:
    stages.setdefault(r["stage"], []).append(r["ms"])
data = {"job": job, "command": cmd, "wall_s": int(wall), "iterations": len(log),
        "median_ms": {s: round(statistics.median(v), 2) for s, v in stages.items()},
        "eval": json.load(open(ev))}
json.dump(data, open(dst, "w"), indent=2)
print(job, json.dumps({k: v for k, v in data["eval"].items() if not isinstance(v, (dict, list))}))
EOF
}

pids=()
for job in "$@"; do
  while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-1}" ]; do wait -n || true; done   # statuses: below
  run_job "$job" & pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
exit $failed
