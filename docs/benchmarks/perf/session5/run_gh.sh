#!/usr/bin/env bash
# Session 5, changes G (latent resize as matrix products) and H (hash-grid program per level):
# hash-grid parity/speed, CUDA tests, bench before (_before = session-4 code, `git archive ceb2217`)
# and after. The host-window timing of this call was made with an earlier, ad hoc form of
# scripts/host_window.py.
#   . .whl/gpu_env.sh .whl && docs/benchmarks/perf/session5/run_gh.sh   (results tarred into $OUT)
set -u
R=/tmp/r; mkdir -p $R
python3 scripts/make_tiny_sd.py /tmp/sd21z --full-size --zero-output > $R/make_sd.log 2>&1
python3 scripts/gpu_check_hashgrid.py --out $R/hashgrid.json > $R/hashgrid.log 2>&1; tail -2 $R/hashgrid.log
python3 -m pytest -q -m gpu tests/test_hashgrid.py tests/test_normal_render.py tests/test_dmtet.py tests/test_train_appearance.py > $R/gpu_tests.log 2>&1; tail -2 $R/gpu_tests.log
docs/benchmarks/perf/session4/run_bench.sh $R _before "coarse fine appearance" "coarse appearance"
tar czf $OUT/r.tgz -C /tmp r
python3 -c "import json;d=json.load(open('$R/hashgrid.json'));print(d['parity']);print(d.get('bench'))"
