"""Time one SDF pretraining step on the CPU (torch hash-grid backend, 10240 points) as the code is
now ("after") or with this session's two changes undone in-process ("before": unfused AdamW, rows
gathered by advanced indexing). Run from the repository root:

    python docs/benchmarks/quality/session19/pretraining_step_cpu.py before
    python docs/benchmarks/quality/session19/pretraining_step_cpu.py after
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
import geometry.hashgrid as hg  # noqa: E402
import geometry.sdf_init as si  # noqa: E402
from geometry.dmtet import DMTetGeometry  # noqa: E402

GATHER_NOW = "feats = table_rxf.index_select(0, rows_nxlx8.reshape(-1))"

if sys.argv[1] == "before":
    si.published_adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-15)
    source = Path(hg.__file__).read_text()
    assert GATHER_NOW in source, "the gather line changed: update this script"
    namespace: dict = {}
    exec(compile(source.replace(GATHER_NOW, "feats = table_rxf[rows_nxlx8].flatten(0, 2)"), "hashgrid_before", "exec"), namespace)
    hg.hash_encode_torch = namespace["hash_encode_torch"]   # HashGridEncoder.forward looks it up here

geo = DMTetGeometry(32, 2.3, backend="torch")
shape = si.InitShape(si.InitShapeOptions(shape="ellipsoid", scale=(0.56, 0.56, 0.84)))
si.pretrain_sdf(geo, shape, iters=5)                         # warm-up
start = time.perf_counter()
si.pretrain_sdf(geo, shape, iters=40)
print(sys.argv[1], f"{(time.perf_counter() - start) / 40 * 1000:.1f} ms per pretraining step")
