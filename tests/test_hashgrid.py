"""Hash-grid encoding: options per spec, reference gradients, backend selection, Triton parity."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geometry.hashgrid import (GridLayout, HashGridBackendError, HashGridOptions, PRIMES, hash_encode_torch,
                               make_encoder, normalize_to_aabb, published_adamw, triton_unavailable_reason,
                               zero_finer_levels)
from geometry.sdf_net import SDFNetwork
from scripts.dev.gpu_check_hashgrid import TOLERANCES

REPO = Path(__file__).resolve().parent.parent
AABB = torch.tensor([[-1.0, -2.0, -0.5], [1.0, 2.0, 0.5]])


def test_default_options_follow_design() -> None:
    opts = HashGridOptions()
    assert (opts.n_levels, opts.n_features_per_level, opts.log2_hashmap_size) == (16, 2, 19)
    assert opts.output_dim == 32
    assert math.isclose(opts.per_level_scale, math.exp(math.log(4096 / 16) / 15))
    res = opts.level_resolutions()
    assert res[0] == 16 and res[-1] == 4096 and all(a < b for a, b in zip(res, res[1:]))
    expected = [math.floor(16 * opts.per_level_scale ** lvl + 1e-6) for lvl in range(16)]
    assert res == expected
    layout = GridLayout.from_options(opts)
    assert layout.dense == tuple((n + 1) ** 3 <= 2 ** 19 for n in res)
    assert layout.dense[0] and not layout.dense[-1]
    assert all(s <= 2 ** 19 for s in layout.sizes)
    assert layout.rows == sum(layout.sizes)
    assert layout.offsets[1:] == tuple(np.cumsum(layout.sizes)[:-1])


@pytest.mark.parametrize("bad", [dict(n_levels=0), dict(base_resolution=-1),
                                 dict(finest_resolution=8), dict(log2_hashmap_size=40)])
def test_bad_options_rejected(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        HashGridOptions(**bad)


def test_reference_matches_explicit_hash_and_interpolation() -> None:
    """At a lattice point the output is that point's table row: checks normalization, dense and
    hashed indexing against a direct uint32 computation of the instant-ngp hash."""
    opts = HashGridOptions(n_levels=3, base_resolution=4, finest_resolution=64, log2_hashmap_size=13)
    enc = make_encoder(AABB, opts, backend="torch")
    layout = enc.layout
    assert layout.dense == (True, True, False)
    ijk = np.array([[3, 1, 2], [0, 4, 4]])
    for lvl, res in enumerate(layout.resolutions):
        x01 = torch.tensor(ijk / res, dtype=torch.float32)
        x = AABB[0] + x01 * (AABB[1] - AABB[0])
        out = enc(x)[:, 2 * lvl: 2 * lvl + 2]
        if layout.dense[lvl]:
            rows = ijk[:, 0] + ijk[:, 1] * (res + 1) + ijk[:, 2] * (res + 1) ** 2
        else:
            u = ijk.astype(np.uint32)
            h = (u[:, 0] * np.uint32(PRIMES[0])) ^ (u[:, 1] * np.uint32(PRIMES[1])) ^ \
                (u[:, 2] * np.uint32(PRIMES[2]))
            rows = (h % np.uint32(2 ** 13)).astype(np.int64)
        expected = enc.table.detach()[torch.from_numpy(rows) + layout.offsets[lvl]]
        assert torch.allclose(out, expected, atol=1e-6), f"level {lvl}"


def test_reference_gradients_match_finite_differences() -> None:
    opts = HashGridOptions(n_levels=4, base_resolution=3, finest_resolution=24, log2_hashmap_size=8)
    enc = make_encoder(AABB.double(), opts, backend="torch").double()
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    gen = torch.Generator().manual_seed(0)
    x = AABB[0].double() + torch.rand(64, 3, generator=gen, dtype=torch.float64) * (
        AABB[1] - AABB[0]).double() * 0.98 + 0.01
    x.requires_grad_(True)
    table = enc.table.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, t: _encode_with_table(enc, p, t), (x, table),
                                    eps=1e-6, atol=1e-5, fast_mode=True)
    # And through the module itself: autograd reaches the table parameter and the inputs.
    enc(x).sum().backward()
    assert enc.table.grad is not None and x.grad is not None and x.grad.abs().sum() > 0


def _encode_with_table(enc, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return hash_encode_torch(normalize_to_aabb(x, enc.aabb), table, enc.layout)


def test_no_points_encode_to_an_empty_batch() -> None:
    enc = make_encoder(AABB, HashGridOptions(log2_hashmap_size=10), backend="torch")
    assert enc(torch.zeros(0, 3)).shape == (0, 16 * 2)                  # 16 levels x 2 features
    sdf, deform = SDFNetwork(AABB, HashGridOptions(log2_hashmap_size=10), backend="torch")(torch.zeros(0, 3))
    assert sdf.shape == (0,) and deform.shape == (0, 3)


def test_outside_points_are_clamped_with_zero_input_gradient() -> None:
    enc = make_encoder(AABB, HashGridOptions(log2_hashmap_size=10), backend="torch")
    x = torch.tensor([[5.0, 0.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    out = enc(x)
    assert torch.allclose(out[0], out[1])
    out[0].sum().backward()
    assert x.grad[0, 0] == 0


def test_auto_backend_on_cpu_is_torch_and_visible() -> None:
    enc = make_encoder(AABB, HashGridOptions(log2_hashmap_size=10))
    assert enc.backend == "torch"
    assert SDFNetwork(AABB, HashGridOptions(log2_hashmap_size=10)).backend == "torch"


def test_unavailable_backends_are_errors_not_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    opts = HashGridOptions(log2_hashmap_size=10)
    with pytest.raises(HashGridBackendError, match="triton") as err:
        make_encoder(AABB, opts, backend="triton")  # CPU tensors, no interpreter
    reason = triton_unavailable_reason()
    assert (reason or "CUDA") in str(err.value)
    with pytest.raises(HashGridBackendError, match="tiny-cuda-nn"):
        make_encoder(AABB, opts, backend="tcnn")
    with pytest.raises(ValueError, match="backend"):
        make_encoder(AABB, opts, backend="cuda")


def test_sdf_network_shapes_and_fp32() -> None:
    net = SDFNetwork(AABB, HashGridOptions(log2_hashmap_size=10), backend="torch")
    widths = [m.out_features for m in net.mlp if isinstance(m, torch.nn.Linear)]
    assert widths == [32, 32, 4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sdf, deform = net(torch.zeros(5, 3))
    assert sdf.shape == (5,) and deform.shape == (5, 3) and sdf.dtype == torch.float32


def test_published_adamw_is_fused_on_cpu_and_steps_as_the_unfused_one() -> None:
    """The published AdamW settings with the fused kernel on the CPU (the unfused update of the
    hash table was ~40% of a CPU pretraining step); its steps equal the unfused optimizer's to
    float rounding: after 5 steps within 3e-8 of parameters up to 0.2 (two float32 ulps there),
    so atol 1e-7 (plus rtol 1e-5 for the small ones) holds with margin and fails on a real change
    of update rule (lr 1e-2 moves parameters by ~1e-2)."""
    torch.manual_seed(0)
    nets = [SDFNetwork(AABB, HashGridOptions(log2_hashmap_size=10), backend="torch") for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused = published_adamw(list(nets[0].parameters()), lr=1e-2)
    plain = torch.optim.AdamW(list(nets[1].parameters()), lr=1e-2, betas=(0.9, 0.99), eps=1e-15)
    assert fused.defaults["fused"] is True
    assert {k: fused.defaults[k] for k in ("betas", "eps", "weight_decay")} == \
        {"betas": (0.9, 0.99), "eps": 1e-15, "weight_decay": 1e-2}
    x = torch.rand(256, 3) * 2 - 1
    start = [p.detach().clone() for p in nets[0].parameters()]
    for _ in range(5):
        for net, opt in ((nets[0], fused), (nets[1], plain)):
            opt.zero_grad()
            net(x)[0].square().mean().backward()
            opt.step()
    for a, b, a0 in zip(nets[0].parameters(), nets[1].parameters(), start):
        assert not torch.equal(a, a0)                  # the steps moved every parameter
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_published_adamw_rejects_params_on_several_devices() -> None:
    """A parameter left on another device would silently drop the fused kernel: an error names both."""
    here = torch.nn.Parameter(torch.zeros(3))
    elsewhere = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match=r"one device; got \['cpu', 'meta'\]"):
        published_adamw([here, elsewhere], lr=1e-2)


def test_sdf_network_active_levels_hide_the_fine_levels() -> None:
    """set_active_levels(k): the output ignores levels k and finer (whatever their table holds),
    they get no gradient, the k coarse levels do; set_active_levels(n_levels) restores them."""
    torch.manual_seed(0)
    net = SDFNetwork(AABB, HashGridOptions(log2_hashmap_size=10), backend="torch")
    layout = net.encoder.layout
    with torch.no_grad():   # table entries large enough that every level changes the output
        net.encoder.table.uniform_(-1.0, 1.0)
    x = torch.rand(200, 3) * 2 - 1
    full = net(x)[0]
    net.set_active_levels(5)
    masked = net(x)[0]
    fine_rows = slice(layout.offsets[5], layout.rows)
    with torch.no_grad():
        net.encoder.table[fine_rows] = torch.randn_like(net.encoder.table[fine_rows])
    assert torch.equal(net(x)[0], masked)                      # the fine levels are invisible
    assert not torch.allclose(masked, full, atol=1e-3)         # and the mask did something
    net.zero_grad()
    net(x)[0].sum().backward()
    grad = net.encoder.table.grad
    assert grad[fine_rows].abs().max() == 0 and grad[:layout.offsets[5]].abs().max() > 0
    net.set_active_levels(16)
    assert net.active_levels == 16 and not torch.equal(net(x)[0], masked)
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ValueError, match="set_active_levels"):
            net.set_active_levels(bad)


def test_skipping_the_fine_levels_equals_masking_them() -> None:
    """The PyTorch encoder's `levels` skips the finer levels' lookups: its features and its table
    gradient equal the full encoding's with those levels masked, bit for bit (the same per-level
    arithmetic; masked features are exact zeros either way)."""
    torch.manual_seed(1)
    enc = make_encoder(AABB, HashGridOptions(log2_hashmap_size=12), backend="torch")
    with torch.no_grad():
        enc.table.uniform_(-1.0, 1.0)
    x = torch.rand(300, 3) * 2 - 1
    weights = torch.randn(300, enc.output_dim)
    results = []
    for skip in (True, False):
        enc.table.grad = None
        feat = enc(x, levels=5) if skip else zero_finer_levels(enc(x), 5, 16)
        (feat * weights).sum().backward()
        results.append((feat.detach(), enc.table.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][0][:, 10:].abs().max() == 0 and results[0][0][:, :10].abs().max() > 0
    with pytest.raises(ValueError, match=r"'levels' must be None or an int in \[1, 16\]; got 0"):
        enc(x, levels=0)


@pytest.mark.slow
@pytest.mark.skipif(triton_unavailable_reason() is not None, reason="triton not installed")
def test_triton_kernel_matches_reference_in_interpreter(tmp_path: Path) -> None:
    """Runs the GPU check script's parity test on CPU through TRITON_INTERPRET=1 (a subprocess,
    because triton picks interpreted or compiled mode when the kernels are defined)."""
    out = tmp_path / "parity.json"
    cmd = [sys.executable, str(REPO / "scripts" / "dev" / "gpu_check_hashgrid.py"), "--device", "cpu",
           "--check-points", "1000", "--log2-hashmap-size", "14", "--no-bench", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parity = json.loads(out.read_text())["parity"]
    assert set(TOLERANCES) <= set(parity) and all(parity[k] < tol for k, tol in TOLERANCES.items()), parity
