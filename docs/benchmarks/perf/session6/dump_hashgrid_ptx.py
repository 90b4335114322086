"""Compile the hash-grid Triton kernels for sm_90 on a machine without a GPU and write their PTX.

    python docs/benchmarks/perf/session6/dump_hashgrid_ptx.py OUT_DIR   (from the repository root)

Used to check a refactor of the kernels' source when no GPU is lent. Besides NAME.ptx it writes
NAME.body: the kernel's instructions alone (no .loc lines, comments, labels or debug sections), so
`diff -r DIR_A DIR_B` on two trees' outputs compares code. Use the Triton version of the GPU
machine (3.6.0 with torch 2.11): PTX differs between Triton versions (session 7 README).
"""
import inspect
import os
import sys
sys.path.insert(0, os.getcwd())
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import geometry.hashgrid_triton as h
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
common = {"x_ptr": "*fp32", "table_ptr": "*fp32", "lo_ptr": "*fp32", "hi_ptr": "*fp32",
          "res_ptr": "*i32", "dense_ptr": "*i32", "off_ptr": "*i64", "N": "i32"}
fwd = {**common, "out_ptr": "*fp32", "L": "constexpr", "F": "constexpr", "HASH_MASK": "constexpr", "BLOCK": "constexpr"}
bwd = {**common, "gout_ptr": "*fp32", "gtable_ptr": "*fp32", "gx_ptr": "*fp32", "L": "constexpr", "F": "constexpr",
       "HASH_MASK": "constexpr", "NEED_TABLE": "constexpr", "NEED_X": "constexpr", "BLOCK": "constexpr"}
def order(fn, sig):
    return {p: sig[p] for p in inspect.signature(fn.fn).parameters}
cx = {"L": 16, "F": 2, "HASH_MASK": (1 << 19) - 1, "BLOCK": 128}
jobs = {"fwd": (h._hash_fwd_kernel, fwd, cx)}
for nt in (True, False):
    for nx in (True, False):
        if nt or nx:
            jobs[f"bwd_t{int(nt)}_x{int(nx)}"] = (h._hash_bwd_kernel, bwd, {**cx, "NEED_TABLE": nt, "NEED_X": nx})
for name, (fn, sig, c) in jobs.items():
    k = triton.compile(ASTSource(fn=fn, signature=order(fn, sig), constexprs=c), target=GPUTarget("cuda", 90, 32), options=h._COMPILE_OPTS)
    ptx = k.asm["ptx"]
    open(f"{out}/{name}.ptx", "w").write(ptx)
    entry = ptx[ptx.index(".visible .entry"):]
    entry = entry[:entry.index("\n}") + 2]
    body = [ln for ln in entry.splitlines() if ln.strip() and not ln.strip().startswith((".loc", "//", "$L__"))]
    open(f"{out}/{name}.body", "w").write("\n".join(body) + "\n")
    print(name, len(k.asm["ptx"].splitlines()), "lines")
