#!/usr/bin/env bash
# Session 10, M: CUDA tests of this tree, then bench.py coarse in this tree (.) and in _l0 (the tree
# before M, a `git archive` copy carried along) alternated, normal and --frozen; tarred to $OUT.
#   . .whl/gpu_env.sh .whl && bash docs/benchmarks/perf/session10/run_m.sh TAG
set -u
tag=$1; o=/tmp/$tag; mkdir -p $o
sd=/tmp/sd21z
[ -f $sd/model_index.json ] || python3 scripts/make_tiny_sd.py $sd --full-size --zero-output > /dev/null 2>&1
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider > $o/gpu_tests.log 2>&1; echo "rc $?" >> $o/gpu_tests.log
bench() {  # TREE NAME [args]
  local tree=$1 name=$2; shift 2
  (cd $tree && python3 scripts/bench.py --config configs/car_geometry.json --stage coarse --sd-model $sd \
    --out "$o/$name.json" "$@" 2>&1 | tail -1 >> "$o/bench.log")
}
for r in 1 2 3; do bench _l0 l_l0_coarse_$r; bench . l_m_coarse_$r; done
for r in 1 2; do bench _l0 l_l0_coarse_frozen_$r --frozen; bench . l_m_coarse_frozen_$r --frozen; done
python3 docs/benchmarks/perf/session10/summary.py $o > $o/summary.txt
tar czf "${OUT:-/tmp}/$tag.tgz" -C /tmp $tag
cat $o/summary.txt; tail -3 $o/gpu_tests.log
