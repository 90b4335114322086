#!/usr/bin/env bash
# Session 10, L in a second lease: graph vs eager spread (graph_vs_eager.py), then bench.py with
# render_cuda_graph off / on alternated, coarse three times and fine twice. Results tarred to $OUT.
#   . .whl/gpu_env.sh .whl && bash docs/benchmarks/perf/session10/run_l2.sh TAG [TAR_DIR]
set -u
tag=$1; o=/tmp/$tag; mkdir -p $o
sd=/tmp/sd21z
python3 docs/benchmarks/perf/session10/graph_vs_eager.py > $o/graph_vs_eager.txt 2>&1
[ -f $sd/model_index.json ] || python3 scripts/make_tiny_sd.py $sd --full-size --zero-output > /dev/null 2>&1
bench() {  # STAGE MODE NAME
  python3 scripts/bench.py --config configs/car_geometry.json --stage "$1" --sd-model $sd --out "$o/$3.json" \
    render_cuda_graph="$2" 2>&1 | tail -1 >> "$o/bench.log"
}
for r in 1 2 3; do for mode in off on; do bench coarse $mode l_${mode}_coarse_$r; done; done
for r in 1 2; do for mode in off on; do bench fine $mode l_${mode}_fine_$r; done; done
python3 docs/benchmarks/perf/session10/summary.py $o > $o/summary.txt
tar czf "${2:-${OUT:-/tmp}}/$tag.tgz" -C /tmp $tag
cat $o/summary.txt; grep -v -i warn $o/graph_vs_eager.txt | tail -24
