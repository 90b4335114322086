"""G-buffer shading: modes, background compositing, ranges, gradients."""
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from render.light import EnvironmentLight
from render.material import MaterialMLP
from render.shading import ShadingError, shade_gbuffer
from tests.test_material import PUBLISHED, FourierEncoder


@pytest.fixture(scope="module")
def light():
    # Smooth sky gradient; 32^2 faces are enough for these range/compositing checks.
    h, w = 16, 32
    sky = torch.linspace(2.0, 0.2, h)[:, None, None].expand(h, w, 3).contiguous()
    return EnvironmentLight.from_latlong(sky, res=32, min_res=8)


def sphere_gbuffer(b=2, res=24):
    """Analytic G-buffer of a unit sphere seen along -z from z = 3 (orthographic rays)."""
    ys, xs = torch.meshgrid(torch.linspace(-1.2, 1.2, res), torch.linspace(-1.2, 1.2, res), indexing="ij")
    r2 = xs ** 2 + ys ** 2
    mask = (r2 < 1).float()[None, ..., None].expand(b, res, res, 1)
    z = torch.sqrt((1 - r2).clamp(min=0))
    pos = torch.stack([xs, ys, z], -1)[None].expand(b, res, res, 3) * mask
    nrm = torch.where(mask > 0, pos, torch.tensor([0.0, 0.0, 1.0]))
    tng = torch.cross(torch.tensor([0.0, 1.0, 0.0]).expand_as(nrm), nrm, dim=-1)
    tng = torch.where(tng.norm(dim=-1, keepdim=True) > 1e-6, tng, torch.tensor([1.0, 0.0, 0.0]))
    view = torch.tensor([[0.0, 0.0, 3.0]]).expand(b, 3)
    return pos.contiguous(), nrm.contiguous(), tng.contiguous(), mask.contiguous(), view.contiguous()


@pytest.mark.parametrize("mode", ["pbr", "diffuse", "kd", "ks", "normal"])
@pytest.mark.parametrize("background", ["black", "white"])
def test_modes_ranges_and_background(light, mode, background):
    torch.manual_seed(0)
    mat = MaterialMLP(FourierEncoder(), **PUBLISHED)
    pos, nrm, tng, mask, view = sphere_gbuffer()
    out = shade_gbuffer(pos, nrm, mask, view, mat, light, gb_tangent=tng, use_bump=True, mode=mode, background=background)
    assert out.rgb.shape == (2, 24, 24, 3)
    assert torch.isfinite(out.rgb).all() and out.rgb.min() >= 0 and out.rgb.max() <= 1
    bg = 0.0 if background == "black" else 1.0
    outside = mask[..., 0] == 0
    assert torch.all(out.rgb[outside] == bg)
    inside = out.rgb[~outside]
    assert inside.std() > 0 and not torch.all(inside == bg)
    assert torch.allclose(out.normal[~outside].norm(dim=-1), torch.ones(int((~outside).sum())), atol=1e-5)


def test_gradients_reach_the_material_network(light):
    mat = MaterialMLP(FourierEncoder(), **PUBLISHED)
    pos, nrm, tng, mask, view = sphere_gbuffer(b=1, res=16)
    out = shade_gbuffer(pos, nrm, mask, view, mat, light, gb_tangent=tng, use_bump=True)
    out.rgb.mean().backward()
    grads = [p.grad for p in mat.net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_back_facing_normals_are_flipped_toward_the_camera(light):
    mat = MaterialMLP(FourierEncoder(), **PUBLISHED)
    pos, nrm, _, mask, view = sphere_gbuffer(b=1, res=16)
    front = shade_gbuffer(pos, nrm, mask, view, mat, light, mode="normal")
    back = shade_gbuffer(pos, -nrm, mask, view, mat, light, mode="normal")
    assert torch.allclose(front.rgb, back.rgb, atol=1e-6)


def test_argument_errors(light):
    mat = MaterialMLP(FourierEncoder(), **PUBLISHED)
    pos, nrm, tng, mask, view = sphere_gbuffer(b=1, res=8)
    with pytest.raises(ShadingError, match="display mode"):
        shade_gbuffer(pos, nrm, mask, view, mat, light, mode="albedo")
    with pytest.raises(ShadingError, match="gb_tangent"):
        shade_gbuffer(pos, nrm, mask, view, mat, light, use_bump=True)
    with pytest.raises(ShadingError, match="background"):
        shade_gbuffer(pos, nrm, mask, view, mat, light, background="grey")
    with pytest.raises(ShadingError, match="mask"):
        shade_gbuffer(pos, nrm, mask[..., 0], view, mat, light)


def _reference_shade_gbuffer():
    """The previous boolean-mask implementation (git history), loaded as the reference."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", "775c342:render/shading.py"], cwd=root, capture_output=True,
                         text=True)
    if src.returncode != 0:
        pytest.skip("reference revision not available (no git history)")
    mod = types.ModuleType("_ref_shading")
    sys.modules["_ref_shading"] = mod          # dataclasses look their module up there
    exec(compile(src.stdout, "_ref_shading.py", "exec"), mod.__dict__)
    return mod.shade_gbuffer


@pytest.mark.parametrize("mode,use_bump", [("pbr", True), ("pbr", False), ("diffuse", False), ("normal", True)])
def test_indexed_gather_matches_boolean_mask_reference(light, mode, use_bump):
    ref = _reference_shade_gbuffer()
    torch.manual_seed(0)
    mat = MaterialMLP(FourierEncoder(), **PUBLISHED)
    pos, nrm, tng, mask, view = sphere_gbuffer(b=3)
    view = view + torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.2, 0.0], [-0.3, 0.1, 0.4]])
    outs = []
    for fn in (ref, shade_gbuffer):
        mat.zero_grad()
        p = pos.clone().requires_grad_(True)
        out = fn(p, nrm, mask, view, mat, light, gb_tangent=tng, use_bump=use_bump, mode=mode)
        (out.rgb.sum() + out.kd.sum() + 0.5 * out.normal.sum()).backward()
        outs.append((out, p.grad, [q.grad.clone() for q in mat.parameters() if q.grad is not None]))
    (a, ga, pa), (b, gb, pb) = outs
    for name in ("rgb", "alpha", "kd", "ks", "normal"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(ga, gb)
    assert len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))
