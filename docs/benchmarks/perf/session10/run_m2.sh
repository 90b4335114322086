#!/usr/bin/env bash
# Session 10, M again at a fixed surface (bench.py --frozen): two more pairs, then one profiled run
# per tree (. and _l0), with step_timeline.py's reading of each trace; tarred to $OUT.
#   . .whl/gpu_env.sh .whl && bash docs/benchmarks/perf/session10/run_m2.sh TAG
set -u
tag=$1; o=/tmp/$tag; mkdir -p $o
sd=/tmp/sd21z
[ -f $sd/model_index.json ] || python3 scripts/make_tiny_sd.py $sd --full-size --zero-output > /dev/null 2>&1
bench() {  # TREE NAME [args]
  local tree=$1 name=$2; shift 2
  (cd $tree && python3 scripts/bench.py --config configs/car_geometry.json --stage coarse --sd-model $sd \
    --out "$o/$name.json" --frozen "$@" 2>&1 | tail -1 >> "$o/bench.log")
}
for r in 3 4; do bench _l0 l_l0_coarse_frozen_$r; bench . l_m_coarse_frozen_$r; done
bench _l0 l_l0_coarse_frozen_profiled --profile $o/profile_l0
bench . l_m_coarse_frozen_profiled --profile $o/profile_m
for t in l0 m; do python3 docs/benchmarks/perf/session10/step_timeline.py $o/profile_$t/trace.json.gz > $o/step_timeline_$t.txt; done
python3 docs/benchmarks/perf/session10/summary.py $o > $o/summary.txt
tar czf "${OUT:-/tmp}/$tag.tgz" -C /tmp $tag
cat $o/summary.txt; for t in l0 m; do head -12 $o/step_timeline_$t.txt; done
