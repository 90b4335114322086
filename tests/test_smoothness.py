"""geometry.smoothness: the values of threestudio's definitions (unique edges and neighbours), the
same values and gradients on the training loop's padded surfaces, gradients against finite
differences, and what each term does to a surface under gradient descent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from geometry.smoothness import laplacian_smoothness, normal_consistency

TERMS = [laplacian_smoothness, normal_consistency]


def bumpy_sphere(subdivisions: int = 2, noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A closed icosphere with its vertices moved radially at random: [V, 3] float64, [F, 3] int64."""
    m = trimesh.creation.icosphere(subdivisions)
    rng = np.random.default_rng(seed)
    v = m.vertices * (1.0 + noise * rng.standard_normal((len(m.vertices), 1)))
    return torch.tensor(v, dtype=torch.float64), torch.tensor(m.faces, dtype=torch.int64)


def reference_values(v: np.ndarray, f: np.ndarray) -> tuple[float, float]:
    """threestudio's Mesh.laplacian() and Mesh.normal_consistency(), over unique edges and
    neighbours, written independently with numpy (area-weighted vertex normals: the sum of the
    adjacent faces' cross products, normalized)."""
    edges = {tuple(sorted((int(a), int(b)))) for face in f for a, b in ((face[0], face[1]), (face[1], face[2]),
                                                                        (face[2], face[0]))}
    neighbours: dict[int, set[int]] = {i: set() for i in range(len(v))}
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    lap = np.mean([np.linalg.norm(v[i] - v[sorted(n)].mean(0)) for i, n in neighbours.items() if n])
    cross = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])           # [F, 3], |.| = 2 area
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], cross)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    e = np.array(sorted(edges))
    nc = np.mean(1.0 - (n[e[:, 0]] * n[e[:, 1]]).sum(1))
    return float(lap), float(nc)


def test_values_equal_the_definitions_over_unique_edges() -> None:
    # On a closed surface every edge is in two faces, so counting each per face is a uniform
    # weight that the means divide out.
    v, f = bumpy_sphere()
    lap, nc = reference_values(v.numpy(), f.numpy())
    assert laplacian_smoothness(v, f).item() == pytest.approx(lap, rel=1e-9)
    assert normal_consistency(v, f).item() == pytest.approx(nc, rel=1e-9)


@pytest.mark.parametrize("term", TERMS)
def test_pad_faces_and_rows_change_nothing(term) -> None:
    """The padded surface (geometry.dmtet.PaddedSurface): pad faces (q, q, q), some on real
    vertices, and pad vertex rows at the origin."""
    v, f = bumpy_sphere()
    n_pad_rows, n_pad_faces = 3, 50
    v_pad = torch.cat([v, torch.zeros(n_pad_rows, 3, dtype=v.dtype)]).requires_grad_()
    q = torch.arange(n_pad_faces) % v_pad.shape[0]                       # spread over real and pad rows
    f_pad = torch.cat([f[:40], q[:, None].expand(-1, 3), f[40:]])
    v_real = v.clone().requires_grad_()
    plain, padded = term(v_real, f), term(v_pad, f_pad)
    (g_plain,) = torch.autograd.grad(plain, v_real)
    (g_padded,) = torch.autograd.grad(padded, v_pad)
    assert padded.item() == pytest.approx(plain.item(), rel=1e-12)
    torch.testing.assert_close(g_padded[: v.shape[0]], g_plain, rtol=1e-10, atol=1e-14)
    assert torch.all(g_padded[v.shape[0]:] == 0)


@pytest.mark.parametrize("term", TERMS)
def test_gradients_match_finite_differences(term) -> None:
    # float64 and a smooth surface (no vertex at its ring's centroid, no zero-length normal sum),
    # so central differences with gradcheck's default step agree to its default tolerances.
    v, f = bumpy_sphere(subdivisions=1, noise=0.1, seed=1)
    assert torch.autograd.gradcheck(lambda x: term(x, f), (v.clone().requires_grad_(),))


@pytest.mark.parametrize("term", TERMS)
def test_descent_smooths_a_bumpy_sphere(term) -> None:
    """Gradient descent on either term removes most of the radial noise; that is what the terms
    are for (ridges and spikes go first)."""
    v, f = bumpy_sphere(subdivisions=3, noise=0.05, seed=2)
    x = v.clone().requires_grad_()
    opt = torch.optim.Adam([x], lr=2e-3)

    def roughness(p: torch.Tensor) -> float:
        r = p.detach().norm(dim=1)
        return float(r.std() / r.mean())

    before = roughness(x)
    for _ in range(150):
        opt.zero_grad()
        term(x, f).backward()
        opt.step()
    assert roughness(x) < 0.4 * before


def test_bad_shapes_are_named() -> None:
    v, f = bumpy_sphere(subdivisions=1)
    with pytest.raises(ValueError, match=r"verts_vx3: expected a float \[V, 3\]"):
        laplacian_smoothness(v[:, :2], f)
    with pytest.raises(ValueError, match=r"faces_fx3: expected an integer \[F, 3\]"):
        normal_consistency(v, f.double())
