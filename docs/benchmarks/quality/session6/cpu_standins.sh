#!/usr/bin/env bash
# CPU stand-ins of the full-scale target-mesh runs (issue 9), with and without the published
# 8-GPU camera coverage per step (emulate_gpus=8). The car configs unchanged except for the
# guidance and the scale: device cpu, 128^2 renders, 600 appearance / 240 geometry iterations.
#
#   docs/benchmarks/quality/session6/cpu_standins.sh OUT_DIR [JOB...]
#
# JOBs: s0 s1 s1_e8 (appearance, car strategy 0 / 1 / 1 with emulate_gpus=8; target = textured egg)
#       {thin,cup,bowl}_g<N>[_e8] (car_geometry at grid N; thin = thin_parts)
#       init_<ref>_g<N>       (the same, initialized from the reference's coarse version, custom_mesh)
# Writes OUT_DIR/<job>.eval.json (scripts/evaluate.py) and prints one line per job.
set -euo pipefail
out=$(realpath -m "$1"); shift
jobs=("$@"); [ ${#jobs[@]} -gt 0 ] || jobs=(s0 s1 s1_e8 thin_g32 thin_g32_e8 cup_g32 cup_g32_e8 bowl_g32 bowl_g32_e8)
cd "$(dirname "$0")/../../../.."
refs=${REFS:-/tmp/quality_refs}
[ -f "$refs/manifest.json" ] || python3 scripts/make_reference_meshes.py "$refs" >/dev/null
tex=$refs/textured/textured.obj
mkdir -p "$out"
for job in "${jobs[@]}"; do
  extra=(); [[ $job == *_e8 ]] && extra=(emulate_gpus=8)
  case ${job%_e8} in
    s0|s1) cfg=configs/car_appearance_strategy${job:1:1}.json; ref=$tex; images=albedo
       args=(target_mesh=$tex base_mesh=$tex train_res=[128,128] iter=600 coarse_iter=100
             texture_res=[512,512] env_res=64) ;;
    init_*_g[0-9]*) cfg=configs/car_geometry.json; name=${job#init_}; name=${name%%_g*}; grid=${job##*_g}
       [ -f "$refs/coarse/$name.obj" ] || python3 scripts/make_reference_meshes.py "$refs/coarse" --resolution 24 >/dev/null
       ref=$refs/$name.obj; images=normal
       args=(target_mesh=$ref dmtet_grid=${grid%_e8} train_res=[128,128] iter=240 coarse_iter=120
             sdf_init_shape=custom_mesh sdf_init_shape_scale=[1,1,1] base_mesh=$refs/coarse/$name.obj) ;;
    *_g[0-9]*) cfg=configs/car_geometry.json; name=${job%%_*}; [ "$name" = thin ] && name=thin_parts
       grid=${job#*_g}; grid=${grid%_e8}; ref=$refs/$name.obj; images=normal
       args=(target_mesh=$ref dmtet_grid=$grid train_res=[128,128] iter=240 coarse_iter=120) ;;
    *) echo "unknown job $job" >&2; exit 2 ;;
  esac
  run=$out/$job
  python3 train.py --config $cfg "${args[@]}" "${extra[@]}" guidance=target_mesh video_frames=0 \
    validate=false device=cpu out_dir="$run" > "$run.stdout" 2>&1
  python3 scripts/evaluate.py "$run/dmtet_mesh/mesh.obj" "$ref" --images $images --out "$run.eval.json" >/dev/null
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[2], 'chamfer %.2f%%' % (100 * d['chamfer']), 'iou %.3f' % d['iou'], 'psnr %.2f' % d['psnr'])" "$run.eval.json" "$job"
done
