set -u
# Session 5: cup / mug variants (normal flip off, steep cameras), three jobs side by side on one H200.
#   . .whl/gpu_env.sh .whl && bash docs/benchmarks/quality/session5/run_variants.sh   (eval JSONs into $OUT)
python3 scripts/make_reference_meshes.py /tmp/quality_refs > /dev/null
run() { # name job extra...
  local name=$1 job=$2; shift 2
  (EXTRA="$*" RUNS=/tmp/q_$name scripts/full_scale_quality.sh /tmp/q4_$name $job > /tmp/q4_$name.log 2>&1
   cp /tmp/q4_$name/eval_$job.json $OUT/eval_$name.json) &
}
run cup_noflip grid128_cup if_flip_the_normal=false
run cup_steep grid128_cup "elevation_range=[-10,80]"
run mug_steep grid128_mug "elevation_range=[-10,80]"
wait
for f in $OUT/eval_*.json; do python3 -c "import json;d=json.load(open('$f'));e=d['eval'];print('$f'.split('/')[-1],round(e['chamfer']*100,3),round(e['chamfer_out_to_ref']*100,3),round(e['chamfer_ref_to_out']*100,3),round(e['iou'],3))"; done
