#!/usr/bin/env bash
# Session 10, L (render_cuda_graph): the CUDA tests, then bench.py with the graph off and on,
# alternated in one lease, and one profiled run with it on. Run from the repository root:
#   . .whl/gpu_env.sh .whl && bash docs/benchmarks/perf/session10/run_l.sh
set -u
out=${OUT:-/tmp/l_out}; mkdir -p "$out"
sd=/tmp/sd21z
[ -f $sd/model_index.json ] || python3 scripts/make_tiny_sd.py $sd --full-size --zero-output > /dev/null
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
echo "rc $?" >> "$out/gpu_tests.log"
bench() {  # STAGE MODE TAG [extra args]
  local stage=$1 mode=$2 tag=$3; shift 3
  local cfg=configs/car_geometry.json
  python3 scripts/bench.py --config $cfg --stage "$stage" --sd-model $sd --out "$out/$tag.json" "$@" \
    render_cuda_graph="$mode" 2>&1 | tail -1 >> "$out/bench.log"
}
for r in 1 2 3; do
  for mode in off on; do bench coarse $mode l_${mode}_coarse_$r; done
done
for mode in off on; do bench fine $mode l_${mode}_fine_1; done
bench coarse on l_on_coarse_profiled --profile "$out/profile_on"
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':24s} {'median ms':>9s} {'floor':>7s} {'ratio med':>9s} {'mean ratio':>10s} {'peak GiB':>8s}")
for p in sorted(out.glob("l_*.json")):
    d = json.loads(p.read_text())
    print(f"{p.stem:24s} {d.get('iteration_ms_median', 0):9.3f} {d['floor_ms_median']:7.3f} "
          f"{d.get('ratio_median', 0):9.3f} {d['ratio']:10.3f} {d['peak_mem_gib']:8.3f}")
PY
tail -2 "$out/gpu_tests.log"
