#!/usr/bin/env bash
# The README's pictures: a full-scale geometry run and an appearance run with target-mesh guidance
# (no model weights needed), each evaluated against its reference, and the last validation strip
# of each, downscaled to 1024 pixels wide.
#
#   scripts/dev/readme_figures.sh OUT_DIR
#
# Geometry: car_geometry.json (grid 128, 512^2, batch 4) on the stool reference with the 8-GPU
# camera coverage per step (emulate_gpus=8). Appearance: car_appearance_strategy0.json on the
# textured egg reference, one GPU's views. Needs a CUDA GPU (about 7 minutes on one H100).
set -euo pipefail
out=$(realpath -m "$1"); mkdir -p "$out"
cd "$(dirname "$0")/../.."
refs=${REFS:-/tmp/readme_refs}; runs=${RUNS:-/tmp/readme_runs}
[ -f "$refs/manifest.json" ] || python3 scripts/make_reference_meshes.py "$refs" >/dev/null
tex=$refs/textured/textured.obj

run() {  # NAME REFERENCE IMAGES ARGS...
  local name=$1 ref=$2 images=$3; shift 3
  local start=$SECONDS
  python3 train.py "$@" guidance=target_mesh target_mesh="$ref" video_frames=0 out_dir="$runs/$name" \
      > "$out/$name.stdout" 2>&1 || { tail -20 "$out/$name.stdout"; exit 1; }
  echo "$name: train.py $* ($((SECONDS - start)) s)"
  python3 scripts/evaluate.py "$runs/$name/dmtet_mesh/mesh.obj" "$ref" --images "$images" --out "$out/eval_$name.json"
}
run geometry "$refs/thin_parts.obj" normal --config configs/car_geometry.json emulate_gpus=8
run appearance "$tex" albedo --config configs/car_appearance_strategy0.json base_mesh="$tex"

python3 - "$runs" "$out" <<'PY'
import sys
from pathlib import Path
import cv2
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
for run, layer in (("geometry", "normal"), ("appearance", "shaded"), ("appearance", "kd")):
    last = sorted((runs / run / "validation").glob(f"it*_{layer}.png"))[-1]
    img = cv2.imread(str(last), cv2.IMREAD_UNCHANGED)
    h, w = img.shape[:2]
    small = cv2.resize(img, (1024, round(h * 1024 / w)), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(out / f"{run}_{layer}.png"), small, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{last} -> {run}_{layer}.png")
PY
