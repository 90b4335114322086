#!/usr/bin/env bash
# Session-5 weak scaling on one H200 x4 host: 1, 2 and 4 processes at the same per-GPU batch.
#   . .whl/gpu_env.sh .whl && docs/benchmarks/scaling/session5/run.sh OUT_DIR
set -u
out=$1; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0          # NVLink multicast off (device/KINDS.md)
t0=$(date +%s)
[ -f /tmp/sd21z/model_index.json ] || python3 scripts/make_tiny_sd.py /tmp/sd21z --full-size --zero-output > "$out/make_sd.log" 2>&1
echo "model ready after $(( $(date +%s) - t0 )) s"
python3 scripts/weak_scaling.py --config configs/car_geometry.json --gpus 1 2 4 \
  --out "$out/weak_scaling_car_geometry.json" \
  sd_model=/tmp/sd21z iter=100 coarse_iter=50 save_interval=50 > "$out/geometry.log" 2>&1
echo "geometry done after $(( $(date +%s) - t0 )) s: $(tail -1 "$out/geometry.log")"
python3 scripts/weak_scaling.py --config configs/car_appearance_strategy0.json --gpus 1 2 4 \
  --out "$out/weak_scaling_car_appearance_strategy0.json" \
  sd_model=/tmp/sd21z base_mesh=data/meshes/bunny_like.obj iter=60 coarse_iter=30 save_interval=30 > "$out/appearance.log" 2>&1
echo "appearance done after $(( $(date +%s) - t0 )) s: $(tail -1 "$out/appearance.log")"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpus.csv"
