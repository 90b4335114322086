#!/usr/bin/env bash
# The bowl at the shipped defaults (car schedule, 8 GPUs' views, seed 42) trained to iteration 1100,
# where session 21's grid-256 run was still clean, then resumed to 1400, when its surface had grown
# froth; cavity_sdf.py reads the cavity's SDF from the checkpoint at each end. Run from the tree's root:
#
#   bash docs/benchmarks/quality/session22/cavity_sdf_runs.sh GRID [OUT_DIR]   # GRID 256, or 128 to compare
#
# EXTRA: more key=value overrides (a CPU dry run: EXTRA="train_res=[64,64] emulate_gpus=1 sdf_init_iter=50").
set -euo pipefail
set -f   # overrides such as train_res=[64,64] are not globs
grid=$1; out=${2:-/tmp/cavity_sdf_$grid}
refs=/tmp/quality_refs
[ -f $refs/manifest.json ] || python3 scripts/make_reference_meshes.py $refs > /dev/null
here=$(dirname "$0")
run() {   # the first leg starts the run, the second resumes it; both stay in the coarse stage
  python3 train.py --config configs/car_geometry.json dmtet_grid=$grid target_mesh=$refs/bowl.obj emulate_gpus=8 \
    guidance=target_mesh video_frames=0 validate=false sdf_init_iter=2000 sealed_air=1 sdf_levels_coarse=5 \
    out_dir=$out ${EXTRA:-} "$@" 2>&1 | tr '\r' '\n' | grep -E -v '^geometry: +[0-9]+%' || true
  [ -f $out/checkpoints/last.pt ] || { echo "no checkpoint in $out"; exit 1; }
  python3 "$here/cavity_sdf.py" $refs/bowl.obj $out/checkpoints/last.pt
  tail -1 $out/log.jsonl
}
rm -rf "$out"
run iter=1100 coarse_iter=1100
run iter=1400 coarse_iter=1400 resume=auto
