"""Horizontal surface area inside a cup's cavity by height, facing up and facing down.

    python docs/benchmarks/quality/session11/layers.py MESH... > layers.txt

For each mesh (an exported run or the reference cup, in the reference's frame), the faces whose
centres lie within 0.35 of the y axis and whose normals are within ~45 degrees of +y ("up") or -y
("down"), their area summed in 0.02-high bands. The reference has one band: its floor. A raised
table shows as an extra "up" band above the floor with a "down" band (its underside) between.
"""
import sys

import numpy as np
import trimesh

for path in sys.argv[1:]:
    m = trimesh.load(path, force="mesh", process=False)
    centres, normals, areas = m.triangles_center, m.face_normals, m.area_faces
    radius, height = np.hypot(centres[:, 0], centres[:, 2]), centres[:, 1]
    print(path.split("/")[-1], "  horizontal area in the cavity (r<0.35) by height: up / down")
    for lo in np.arange(-0.20, 0.1, 0.02):
        band = (radius < 0.35) & (height >= lo) & (height < lo + 0.02)
        up, down = areas[band & (normals[:, 1] > 0.7)].sum(), areas[band & (normals[:, 1] < -0.7)].sum()
        if up + down > 0.005:
            print(f"  {lo:+.2f} up {up:.3f} down {down:.3f}")
