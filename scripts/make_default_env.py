"""Write the project's default environment map: a soft studio sky (lat-long Radiance .hdr).

    python scripts/make_default_env.py [--out data/envmaps/studio_sky.hdr] [--height 128]

Procedural and deterministic: a sky gradient over a warm grey floor plus three soft
"softbox" lobes (key, fill, rim), so materials show both diffuse shading and readable
specular highlights. Mean radiance is about 0.7 (sky about 1), a normal exposure at env_scale 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from render.light import DEFAULT_ENVMAP, write_hdr  # noqa: E402
from render.util import latlong_dirs, safe_normalize  # noqa: E402

# (direction, colour, sharpness k of exp(k (cos - 1)), intensity)
SOFTBOXES = (
    ((1.0, 1.2, 1.5), (1.00, 0.97, 0.92), 30.0, 6.0),   # key: front-right, above
    ((-1.5, 0.5, 1.0), (0.90, 0.95, 1.00), 15.0, 1.5),  # fill: front-left, low
    ((0.0, 0.8, -1.5), (1.00, 1.00, 1.00), 25.0, 3.0),  # rim: behind, above
)


def studio_sky(height: int) -> torch.Tensor:
    """[height, 2 * height, 3] float32 linear radiance."""
    d = latlong_dirs(height, 2 * height, dtype=torch.float64)
    y = d[..., 1:2]
    zenith = torch.tensor([0.80, 0.86, 0.95], dtype=torch.float64)
    horizon = torch.tensor([0.95, 0.93, 0.90], dtype=torch.float64)
    ground = torch.tensor([0.22, 0.20, 0.18], dtype=torch.float64)
    sky = horizon + (zenith - horizon) * y.clamp(min=0.0).sqrt()
    # Smooth sky/floor transition over about +-6 degrees, so no hard horizon line aliases.
    blend = ((y + 0.1) / 0.2).clamp(0.0, 1.0)
    blend = blend * blend * (3.0 - 2.0 * blend)
    rad = ground + (sky - ground) * blend
    for direction, colour, k, intensity in SOFTBOXES:
        axis = safe_normalize(torch.tensor(direction, dtype=torch.float64))
        lobe = torch.exp(k * ((d * axis).sum(-1, keepdim=True) - 1.0))
        rad = rad + intensity * lobe * torch.tensor(colour, dtype=torch.float64)
    return rad.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_ENVMAP)
    ap.add_argument("--height", type=int, default=128, help="lat-long height in pixels (width = 2 x height)")
    args = ap.parse_args()
    img = studio_sky(args.height)
    write_hdr(args.out, img.numpy())
    print(f"wrote {args.out} ({2 * args.height}x{args.height}, mean radiance {img.mean():.3f})")


if __name__ == "__main__":
    main()
