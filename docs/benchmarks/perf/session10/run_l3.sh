#!/usr/bin/env bash
# Session 10: L at the initial surface's size (bench.py --frozen), off / on alternated; tarred to $OUT.
#   . .whl/gpu_env.sh .whl && bash docs/benchmarks/perf/session10/run_l3.sh TAG
set -u
tag=$1; o=/tmp/$tag; mkdir -p $o
sd=/tmp/sd21z
[ -f $sd/model_index.json ] || python3 scripts/make_tiny_sd.py $sd --full-size --zero-output > /dev/null 2>&1
bench() {  # STAGE MODE NAME
  python3 scripts/bench.py --config configs/car_geometry.json --stage "$1" --sd-model $sd --out "$o/$3.json" \
    --frozen render_cuda_graph="$2" 2>&1 | tail -1 >> "$o/bench.log"
}
for r in 1 2; do for mode in off on; do bench coarse $mode l_${mode}_coarse_frozen_$r; done; done
for mode in off on; do bench fine $mode l_${mode}_fine_frozen_1; done
python3 docs/benchmarks/perf/session10/summary.py $o > $o/summary.txt
tar czf "${OUT:-/tmp}/$tag.tgz" -C /tmp $tag
cat $o/summary.txt; python3 -c "import json,glob; [print(p.split('/')[-1], json.load(open(p)).get('faces_median')) for p in sorted(glob.glob('$o/*.json'))]"
