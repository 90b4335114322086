#!/usr/bin/env bash
# A/B speed check of two code trees on one GPU, in one machine session: scripts/bench.py on the car
# configs (full-size SD 2.1-base architecture, random weights, zeroed UNet output), stage by stage,
# alternating the trees so that drift of the machine hits both alike.
#   scripts/dev/ab_bench.sh BEFORE_TREE AFTER_TREE OUT_DIR [stage ...] [-- key=value ...]
# Writes OUT_DIR/<stage>_{before,after}.json and prints one table line per run; BEFORE_TREE '-' times
# AFTER_TREE alone (e.g. with an option on: -- perp_neg=true).
set -euo pipefail
before=$1; [[ $before == - ]] || before=$(realpath "$1"); after=$(realpath "$2"); out=$(realpath -m "$3"); shift 3
stages=(); while [[ $# -gt 0 && $1 != "--" ]]; do stages+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
overrides=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(coarse fine appearance)
mkdir -p "$out"
sd=${SD_MODEL:-/tmp/sd21z}
[[ -d $sd ]] || (cd "$after" && python scripts/make_tiny_sd.py "$sd" --full-size --zero-output > /dev/null)
for stage in "${stages[@]}"; do
  config=configs/car_geometry.json; [[ $stage == appearance ]] && config=configs/car_appearance_strategy0.json
  for side in before after; do
    [[ $side == before && $before == - ]] && continue
    tree=$before; [[ $side == after ]] && tree=$after
    (cd "$tree" && python scripts/bench.py --config "$config" --stage "$stage" --sd-model "$sd" \
       --iters "${ITERS:-30}" --out "$out/${stage}_${side}.json" ${overrides[@]+"${overrides[@]}"} > "$out/${stage}_${side}.log" 2>&1) \
      || { echo "$stage $side: failed"; tail -5 "$out/${stage}_${side}.log"; continue; }
    python - "$out/${stage}_${side}.json" "$stage" "$side" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
eager = r.get('eager_floor_ms_median') or r.get('eager_unet_floor_ms_median') or float('nan')   # older trees: the latter
print(f"{sys.argv[2]:<11} {sys.argv[3]:<7} step {r.get('iteration_ms_median', float('nan')):7.2f} ms  floor "
      f"{r.get('floor_ms_median', float('nan')):7.2f}  eager floor {eager:7.2f}  "
      f"ratio {r.get('ratio_median', float('nan')):.3f}  vs eager {r.get('iteration_ms_median', float('nan')) / eager:.3f}  "
      f"peak {r.get('peak_mem_gib', float('nan')):.1f} GiB  compiled {','.join(r.get('compiled_calls') or []) or '-'} "
      f"({sum((r.get('compile_s') or {}).values()):.0f} s)")
PY
  done
done
